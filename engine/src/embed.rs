//! Sentence embeddings: the [`Embedder`] trait the RAG pipeline and the index use, and
//! [`BertEmbedder`], a sentence-transformers model folder (all-MiniLM-L6-v2 and the like) run
//! by moera's BERT encoder.

use std::path::Path;

use burn::tensor::{Device, Tensor};
use moera_models::bert::{Bert, BertConfig, l2_normalize};
use moera_models::nn::token_tensor;
use serde_json::Value as Json;
use tokenizers::{Tokenizer, TruncationParams};

use crate::error::{Error, Result};
use crate::model::{read_json, read_optional_json};
use crate::safetensors_source::SafetensorsWeights;

/// Turns texts into fixed-size vectors.
pub trait Embedder: Send + Sync {
    /// The length of every vector.
    fn dimension(&self) -> usize;

    /// One vector per text, in order.
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>>;
}

/// How token states become one vector (sentence-transformers' `Pooling` module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The mean over the real tokens.
    Mean,
    /// The first token's (`[CLS]`) state.
    Cls,
}

/// A sentence-transformers model folder: `config.json`, `model.safetensors`,
/// `tokenizer.json`, and (optional) `sentence_bert_config.json` (`max_seq_length`),
/// `1_Pooling/config.json` and `modules.json` (a `Normalize` module).
///
/// ```no_run
/// use moera_engine::embed::{BertEmbedder, Embedder};
/// let path = moera_engine::hub::resolve_model("minilm");
/// let embedder = BertEmbedder::load(&path, &moera_engine::Device::flex())?;
/// let vectors = embedder.embed(&["What is ownership?", "Borrowing rules"])?;
/// assert_eq!(vectors[0].len(), embedder.dimension());
/// # Ok::<(), moera_engine::Error>(())
/// ```
#[derive(Debug)]
pub struct BertEmbedder {
    model: Bert,
    tokenizer: Tokenizer,
    device: Device,
    dimension: usize,
    pooling: Pooling,
    normalize: bool,
    /// Texts encoded per forward pass.
    pub batch_size: usize,
}

impl BertEmbedder {
    /// Loads the model folder `dir` on `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config: BertConfig =
            serde_json::from_value(read_json(&config_path)?).map_err(|e| Error::Config {
                path: config_path.clone(),
                reason: e.to_string(),
            })?;
        let weights = SafetensorsWeights::open_folder(dir)?;
        let model = Bert::load(&config, &weights, device).map_err(|source| Error::Model {
            path: dir.to_path_buf(),
            source,
        })?;
        let max_tokens = read_optional_json(&dir.join("sentence_bert_config.json"))?
            .and_then(|c| c.get("max_seq_length")?.as_u64())
            .map_or(model.max_positions(), |n| n as usize)
            .min(model.max_positions());
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer_error = |reason: String| Error::Tokenizer {
            path: tokenizer_path.clone(),
            reason,
        };
        let mut tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(|e| tokenizer_error(e.to_string()))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| tokenizer_error(e.to_string()))?;
        tokenizer.with_padding(None);
        let pooling_path = dir.join("1_Pooling/config.json");
        let pooling = match read_optional_json(&pooling_path)? {
            None => Pooling::Mean,
            Some(c) => {
                // Every `pooling_mode_*` flag that is on: exactly one of the two we run.
                let on: Vec<&str> = c
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(key, value)| {
                        key.starts_with("pooling_mode_") && value == &&Json::Bool(true)
                    })
                    .map(|(key, _)| key.as_str())
                    .collect();
                match on.as_slice() {
                    ["pooling_mode_mean_tokens"] => Pooling::Mean,
                    ["pooling_mode_cls_token"] => Pooling::Cls,
                    _ => {
                        return Err(Error::Config {
                            path: pooling_path,
                            reason: format!(
                                "pooling {on:?}: only mean or CLS pooling is supported"
                            ),
                        });
                    }
                }
            }
        };
        let modules_path = dir.join("modules.json");
        let mut normalize = false;
        if let Some(modules) = read_optional_json(&modules_path)? {
            for module in modules.as_array().into_iter().flatten() {
                let kind = module
                    .get("type")
                    .and_then(Json::as_str)
                    .unwrap_or_default();
                match kind.rsplit('.').next() {
                    Some("Transformer" | "Pooling") => {}
                    Some("Normalize") => normalize = true,
                    _ => {
                        // A Dense projection, say, would change the vectors: refuse.
                        return Err(Error::Config {
                            path: modules_path,
                            reason: format!("module {kind:?} is not supported"),
                        });
                    }
                }
            }
        }
        Ok(Self {
            model,
            tokenizer,
            device: device.clone(),
            dimension: config.hidden_size,
            pooling,
            normalize,
            batch_size: 32,
        })
    }

    /// Token ids of `text` as the encoder reads them: `[CLS] … [SEP]`, truncated to the
    /// model's `max_seq_length`.
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::InvalidArgument(format!("tokenizing for embedding: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let ids = texts
            .iter()
            .map(|text| self.token_ids(text))
            .collect::<Result<Vec<_>>>()?;
        let lengths: Vec<usize> = ids.iter().map(Vec::len).collect();
        let seq = lengths.iter().copied().max().unwrap_or(0).max(1);
        // Right-padded with id 0; padding is masked out of attention and pooling.
        let padded: Vec<u32> = ids
            .iter()
            .flat_map(|row| {
                row.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, seq - row.len()))
            })
            .collect();
        let tokens = token_tensor(&padded, texts.len(), &self.device);
        let hidden = self.model.forward(tokens, &lengths);
        let pooled = match self.pooling {
            Pooling::Mean => Bert::mean_pool(hidden, &lengths),
            Pooling::Cls => {
                let [batch, _, width] = hidden.dims();
                hidden.narrow(1, 0, 1).reshape([batch, width])
            }
        };
        let pooled: Tensor<2> = if self.normalize {
            l2_normalize(pooled)
        } else {
            pooled
        };
        let values = pooled
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| Error::InvalidArgument(format!("reading embeddings: {e:?}")))?;
        Ok(values.chunks(self.dimension).map(<[f32]>::to_vec).collect())
    }
}

impl Embedder for BertEmbedder {
    fn dimension(&self) -> usize {
        self.dimension
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(texts.len());
        for batch in texts.chunks(self.batch_size.max(1)) {
            out.extend(self.embed_batch(batch)?);
        }
        Ok(out)
    }
}
