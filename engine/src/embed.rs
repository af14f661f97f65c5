//! Sentence embeddings: the [`Embedder`] trait the RAG pipeline and the index use, and
//! [`BertEmbedder`], a sentence-transformers model folder (all-MiniLM-L6-v2 and the like) run
//! by moera's BERT encoder.

use std::path::Path;

use burn::tensor::{Device, Tensor};
use moera_models::bert::{Bert, BertConfig, l2_normalize};
use moera_models::nn::token_tensor;
use serde_json::Value as Json;
use tokenizers::{Tokenizer, TruncationParams, TruncationStrategy};

use crate::error::{Error, Result};
use crate::model::{read_json, read_optional_json};
use crate::safetensors_source::SafetensorsWeights;

/// Turns texts into fixed-size vectors.
pub trait Embedder: Send + Sync {
    /// The length of every vector.
    fn dimension(&self) -> usize;

    /// One vector per text, in order.
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>>;

    /// The tokens of `text` without special tokens or truncation: what chunking counts.
    fn token_count(&self, text: &str) -> Result<usize>;

    /// The most tokens (special ones included) one text may have before it is truncated.
    fn max_tokens(&self) -> usize;

    /// What identifies the model (its folder, say): vectors of different embedders do not
    /// mix in one collection.
    fn name(&self) -> String;
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
    /// The same tokenizer without truncation, to count tokens.
    counter: Tokenizer,
    max_tokens: usize,
    /// The model folder.
    name: String,
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
        let (config, _) = read_bert_config(dir)?;
        let weights = SafetensorsWeights::open_folder(dir)?;
        let model = Bert::load(&config, &weights, device).map_err(|source| Error::Model {
            path: dir.to_path_buf(),
            source,
        })?;
        let max_tokens = max_seq_length(dir, model.max_positions())?;
        let tokenizer = load_tokenizer(dir, Some(max_tokens))?;
        let counter = load_tokenizer(dir, None)?;
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
        let mut normalize = false;
        for kind in module_types(dir)? {
            match kind.rsplit('.').next() {
                Some("Transformer" | "Pooling") => {}
                Some("Normalize") => normalize = true,
                _ => {
                    // A Dense projection, say, would change the vectors: refuse.
                    return Err(Error::Config {
                        path: dir.join("modules.json"),
                        reason: format!("module {kind:?} is not supported"),
                    });
                }
            }
        }
        Ok(Self {
            model,
            tokenizer,
            counter,
            max_tokens,
            name: std::fs::canonicalize(dir)
                .unwrap_or_else(|_| dir.to_path_buf())
                .display()
                .to_string(),
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

    /// Vectors of the token id rows `ids`, in one padded forward pass.
    fn embed_batch(&self, ids: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let lengths: Vec<usize> = ids.iter().map(Vec::len).collect();
        // Padding is masked out of attention and pooling.
        let tokens = token_tensor(&pad_rows(ids), ids.len(), &self.device);
        let hidden = self.model.forward(tokens, &lengths);
        let pooled = match self.pooling {
            Pooling::Mean => Bert::mean_pool(hidden, &lengths),
            Pooling::Cls => Bert::cls_pool(hidden),
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
        let ids = texts
            .iter()
            .map(|text| self.token_ids(text))
            .collect::<Result<Vec<_>>>()?;
        // Batches of texts of similar length pad little (sentence-transformers sorts too).
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
        let mut out = vec![Vec::new(); texts.len()];
        for batch in order.chunks(self.batch_size.max(1)) {
            let rows: Vec<Vec<u32>> = batch.iter().map(|&i| ids[i].clone()).collect();
            for (&i, vector) in batch.iter().zip(self.embed_batch(&rows)?) {
                out[i] = vector;
            }
        }
        Ok(out)
    }

    fn token_count(&self, text: &str) -> Result<usize> {
        let encoding = self
            .counter
            .encode(text, false)
            .map_err(|e| Error::InvalidArgument(format!("tokenizing for embedding: {e}")))?;
        Ok(encoding.len())
    }

    fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    fn name(&self) -> String {
        self.name.clone()
    }
}

// What sentence-transformers model folders share, embedders and cross-encoders alike.

/// `dir/config.json` as a [`BertConfig`], and as the JSON it was read from (for the keys a
/// head adds).
pub(crate) fn read_bert_config(dir: &Path) -> Result<(BertConfig, Json)> {
    let path = dir.join("config.json");
    let json = read_json(&path)?;
    let config = serde_json::from_value(json.clone()).map_err(|e| Error::Config {
        path,
        reason: e.to_string(),
    })?;
    Ok((config, json))
}

/// The most tokens one input may have, as sentence-transformers sets it: `max_seq_length` of
/// `sentence_bert_config.json`, else the tokenizer's `model_max_length`
/// (`tokenizer_config.json`), never more than the model's `max_positions`.
pub(crate) fn max_seq_length(dir: &Path, max_positions: usize) -> Result<usize> {
    let configured = |file: &str, key: &str| -> Result<Option<usize>> {
        Ok(read_optional_json(&dir.join(file))?.and_then(|c| {
            // transformers writes an unset limit as 1e30, which no u64 holds.
            let n = c.get(key)?;
            n.as_u64()
                .or_else(|| n.as_f64().map(|f| f as u64))
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
        }))
    };
    let limit = match configured("sentence_bert_config.json", "max_seq_length")? {
        Some(n) => Some(n),
        None => configured("tokenizer_config.json", "model_max_length")?,
    };
    Ok(limit.map_or(max_positions, |n| n.min(max_positions)))
}

/// `dir/tokenizer.json` without padding, truncating to `max_tokens` (special tokens included;
/// a pair loses tokens from its longer side first, as transformers' `longest_first`) or, with
/// `None`, not at all.
pub(crate) fn load_tokenizer(dir: &Path, max_tokens: Option<usize>) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    let error = |reason: String| Error::Tokenizer {
        path: path.clone(),
        reason,
    };
    let mut tokenizer = Tokenizer::from_file(&path).map_err(|e| error(e.to_string()))?;
    tokenizer
        .with_truncation(max_tokens.map(|max_length| TruncationParams {
            max_length,
            strategy: TruncationStrategy::LongestFirst,
            ..Default::default()
        }))
        .map_err(|e| error(e.to_string()))?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}

/// The `type` of each module in `dir/modules.json` (`sentence_transformers.models.Pooling`, …);
/// none when the folder has no such file.
pub(crate) fn module_types(dir: &Path) -> Result<Vec<String>> {
    let modules = read_optional_json(&dir.join("modules.json"))?;
    Ok(modules
        .as_ref()
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .map(|module| {
            module
                .get("type")
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_string()
        })
        .collect())
}

/// Rows of token ids right-padded with 0 to the longest (at least 1), concatenated: a
/// `[rows.len(), longest]` batch.
pub(crate) fn pad_rows(rows: &[Vec<u32>]) -> Vec<u32> {
    let seq = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
    rows.iter()
        .flat_map(|row| {
            row.iter()
                .copied()
                .chain(std::iter::repeat_n(0, seq - row.len()))
        })
        .collect()
}
