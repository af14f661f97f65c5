//! Cross-encoder reranking: [`CrossEncoder`], a sentence-transformers CrossEncoder folder (a
//! BERT with a one-label sequence-classification head, such as
//! cross-encoder/ms-marco-MiniLM-L6-v2) that reads the query and a passage together,
//! `[CLS] query [SEP] passage [SEP]`, and scores how well the passage answers the query.

use std::path::Path;

use burn::tensor::Device;
use moera_models::bert::BertForSequenceClassification;
use moera_models::nn::token_tensor;
use serde_json::Value as Json;
use tokenizers::Tokenizer;

use super::Reranker;
use crate::embed::{load_tokenizer, max_seq_length, module_types, pad_rows, read_bert_config};
use crate::error::{Error, Result};
use crate::model::read_optional_json;
use crate::safetensors_source::SafetensorsWeights;

/// What turns the classifier's logit into the score, as sentence-transformers'
/// `CrossEncoder.predict` applies it (its `activation_fn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreActivation {
    /// The logit itself (`torch.nn.Identity`).
    Identity,
    /// `1 / (1 + e^−logit)` (`torch.nn.Sigmoid`), sentence-transformers' default for one label.
    Sigmoid,
}

impl ScoreActivation {
    fn apply(self, logit: f32) -> f32 {
        match self {
            Self::Identity => logit,
            Self::Sigmoid => 1.0 / (1.0 + (-logit).exp()),
        }
    }
}

/// A query and a passage as the model reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairTokens {
    /// `[CLS] query [SEP] passage [SEP]`, truncated from the longer side to the model's limit.
    pub ids: Vec<u32>,
    /// Segment (token type) ids: 0 through the first `[SEP]`, 1 after it.
    pub segments: Vec<u32>,
}

/// A sentence-transformers CrossEncoder folder: `config.json` (`BertForSequenceClassification`,
/// one label), `model.safetensors`, `tokenizer.json`, and optionally `tokenizer_config.json`
/// (`model_max_length`), `sentence_bert_config.json` (`max_seq_length`), `modules.json` and
/// `config_sentence_transformers.json` (`activation_fn`).
///
/// Its scores are what `CrossEncoder(dir).predict(pairs)` returns in sentence-transformers 6:
/// the classifier's logit passed through the activation the folder names
/// (`config_sentence_transformers.json`'s `activation_fn`, else `config.json`'s
/// `sentence_transformers.activation_fn`, else its older `sbert_ce_default_activation_function`),
/// and a sigmoid when none is named. Most published rerankers name `Identity`: their scores are
/// raw logits.
///
/// ```no_run
/// use moera_engine::rag::Reranker;
/// use moera_engine::rag::cross_encoder::CrossEncoder;
/// let path = std::path::Path::new("ms-marco-MiniLM-L6-v2");
/// let reranker = CrossEncoder::load(path, &moera_engine::Device::flex())?;
/// let scores = reranker.score("What is ownership?", &["Rules for memory.", "A crab."])?;
/// assert_eq!(scores.len(), 2);
/// # Ok::<(), moera_engine::Error>(())
/// ```
#[derive(Debug)]
pub struct CrossEncoder {
    model: BertForSequenceClassification,
    tokenizer: Tokenizer,
    device: Device,
    activation: ScoreActivation,
    max_tokens: usize,
    /// Pairs scored per forward pass.
    pub batch_size: usize,
}

impl CrossEncoder {
    /// Loads the model folder `dir` on `device`. A folder whose model is not a one-label
    /// `BertForSequenceClassification`, or that adds modules or an activation this type does
    /// not run, is an [`Error::Config`].
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let (config, json) = read_bert_config(dir)?;
        let refuse = |file: &str, reason: String| Error::Config {
            path: dir.join(file),
            reason,
        };
        if let Some(architectures) = &config.architectures
            && architectures.as_slice() != ["BertForSequenceClassification"]
        {
            return Err(refuse(
                "config.json",
                format!(
                    "architectures {architectures:?}: the cross-encoder runs \
                     BertForSequenceClassification only"
                ),
            ));
        }
        if let Some(model_type) = json.get("model_type").and_then(Json::as_str)
            && model_type != "bert"
        {
            return Err(refuse(
                "config.json",
                format!("model_type {model_type:?}: the cross-encoder runs BERT only"),
            ));
        }
        if config.labels() != 1 {
            return Err(refuse(
                "config.json",
                format!(
                    "num_labels {} (id2label {:?}): a reranker needs a one-label head, one \
                     score per passage",
                    config.labels(),
                    config
                        .id2label
                        .as_ref()
                        .map(|labels| labels.values().collect::<Vec<_>>())
                ),
            ));
        }
        for kind in module_types(dir)? {
            if !kind.ends_with("Transformer") {
                return Err(refuse(
                    "modules.json",
                    format!("module {kind:?} is not supported (only the Transformer)"),
                ));
            }
        }
        if let Some(task) = read_optional_json(&dir.join("sentence_bert_config.json"))?
            .as_ref()
            .and_then(|c| c.get("transformer_task")?.as_str())
            && task != "sequence-classification"
        {
            return Err(refuse(
                "sentence_bert_config.json",
                format!("transformer_task {task:?}: expected \"sequence-classification\""),
            ));
        }
        let activation = score_activation(dir, &json)?;
        let weights = SafetensorsWeights::open_folder(dir)?;
        let model =
            BertForSequenceClassification::load(&config, &weights, device).map_err(|source| {
                Error::Model {
                    path: dir.to_path_buf(),
                    source,
                }
            })?;
        let max_tokens = max_seq_length(dir, model.max_positions())?;
        Ok(Self {
            model,
            tokenizer: load_tokenizer(dir, Some(max_tokens))?,
            device: device.clone(),
            activation,
            max_tokens,
            batch_size: 32,
        })
    }

    /// The activation applied to each logit.
    pub fn activation(&self) -> ScoreActivation {
        self.activation
    }

    /// The most tokens (special ones included) one pair may have before it is truncated.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// `query` and `passage` as the model reads them.
    pub fn encode(&self, query: &str, passage: &str) -> Result<PairTokens> {
        let encoding = self
            .tokenizer
            .encode((query, passage), true)
            .map_err(|e| Error::Tokenize(format!("query and passage for reranking: {e}")))?;
        Ok(PairTokens {
            ids: encoding.get_ids().to_vec(),
            segments: encoding.get_type_ids().to_vec(),
        })
    }

    /// The classifier's logit for each passage (before the activation), in order.
    pub fn logits(&self, query: &str, passages: &[&str]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(passages.len());
        for batch in passages.chunks(self.batch_size.max(1)) {
            out.extend(self.logits_batch(query, batch)?);
        }
        Ok(out)
    }

    fn logits_batch(&self, query: &str, passages: &[&str]) -> Result<Vec<f32>> {
        let pairs = passages
            .iter()
            .map(|passage| self.encode(query, passage))
            .collect::<Result<Vec<_>>>()?;
        let lengths: Vec<usize> = pairs.iter().map(|pair| pair.ids.len()).collect();
        let (ids, segments): (Vec<_>, Vec<_>) =
            pairs.into_iter().map(|p| (p.ids, p.segments)).unzip();
        // Padding is masked out of attention; only the [CLS] state reaches the head.
        let rows = passages.len();
        let logits = self.model.forward(
            token_tensor(&pad_rows(&ids), rows, &self.device),
            token_tensor(&pad_rows(&segments), rows, &self.device),
            &lengths,
        );
        logits
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| Error::InvalidArgument(format!("reading reranker logits: {e:?}")))
    }
}

impl Reranker for CrossEncoder {
    /// The activation (see [`CrossEncoder`]) of each passage's logit.
    fn score(&self, query: &str, passages: &[&str]) -> Result<Vec<f32>> {
        let logits = self.logits(query, passages)?;
        Ok(logits
            .into_iter()
            .map(|logit| self.activation.apply(logit))
            .collect())
    }
}

/// The activation sentence-transformers 6 applies in `CrossEncoder.predict`: the first of
/// `config_sentence_transformers.json`'s `activation_fn`, `config.json`'s
/// `sentence_transformers.activation_fn` and `sbert_ce_default_activation_function` that is
/// set, else a sigmoid (its default for one label).
fn score_activation(dir: &Path, config: &Json) -> Result<ScoreActivation> {
    let st_path = dir.join("config_sentence_transformers.json");
    let st_config = read_optional_json(&st_path)?;
    let named = [
        (
            st_path,
            st_config.as_ref().and_then(|c| c.get("activation_fn")),
        ),
        (
            dir.join("config.json"),
            config
                .get("sentence_transformers")
                .and_then(|c| c.get("activation_fn")),
        ),
        (
            dir.join("config.json"),
            config.get("sbert_ce_default_activation_function"),
        ),
    ];
    for (path, value) in named {
        let Some(name) = value.and_then(Json::as_str) else {
            continue;
        };
        // A class path such as torch.nn.modules.linear.Identity or torch.nn.Sigmoid.
        let class = name
            .strip_prefix("torch.")
            .and_then(|n| n.rsplit('.').next());
        return match class {
            Some("Identity") => Ok(ScoreActivation::Identity),
            Some("Sigmoid") => Ok(ScoreActivation::Sigmoid),
            _ => Err(Error::Config {
                path,
                reason: format!(
                    "activation_fn {name:?} is not supported (torch.nn.Identity or \
                     torch.nn.Sigmoid)"
                ),
            }),
        };
    }
    Ok(ScoreActivation::Sigmoid)
}
