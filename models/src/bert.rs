//! BERT encoders (all-MiniLM-L6-v2 and other sentence-transformers models): token, position
//! and segment embeddings, post-norm encoder layers with full (padding-masked) attention and
//! a GELU MLP, then mean pooling over the real tokens and L2 normalization; and
//! `BertForSequenceClassification` (cross-encoder rerankers such as ms-marco-MiniLM): the
//! encoder, a tanh pooler on the `[CLS]` state and a linear classifier.

use std::collections::HashMap;

use burn::module::{Module, Param};
use burn::tensor::activation::{softmax, tanh};
use burn::tensor::{Device, Int, Tensor, TensorData};
use moera_kernels::gelu;
use serde::Deserialize;

use crate::nn::{Embedding, Linear, load_checked};
use crate::{ModelError, WeightSource};

/// `config.json` of a BERT model, as transformers writes it.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    #[serde(default = "layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "gelu_name")]
    pub hidden_act: String,
    #[serde(default = "absolute")]
    pub position_embedding_type: String,
    /// The head's class (`BertForSequenceClassification`, …); absent for some bare encoders.
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    /// The labels of a classification head, by index (`{"0": "LABEL_0"}`).
    #[serde(default)]
    pub id2label: Option<HashMap<String, String>>,
    /// The number of labels, where a config states it instead of `id2label`.
    #[serde(default)]
    pub num_labels: Option<usize>,
}

fn two() -> usize {
    2
}

fn layer_norm_eps() -> f64 {
    1e-12
}

fn gelu_name() -> String {
    "gelu".into()
}

fn absolute() -> String {
    "absolute".into()
}

impl BertConfig {
    /// Outputs of a classification head: as transformers counts them, `id2label`'s size, else
    /// `num_labels`, else 2.
    pub fn labels(&self) -> usize {
        match (&self.id2label, self.num_labels) {
            (Some(labels), _) => labels.len(),
            (None, Some(n)) => n,
            (None, None) => 2,
        }
    }

    /// Checks the configuration describes an encoder this module runs.
    pub fn validate(&self) -> Result<(), ModelError> {
        let invalid = |reason: String| Err(ModelError::Config(reason));
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return invalid(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.hidden_act != "gelu" {
            return invalid(format!(
                "hidden_act {:?} (BERT encoders here use gelu)",
                self.hidden_act
            ));
        }
        if self.position_embedding_type != "absolute" {
            return invalid(format!(
                "position_embedding_type {:?} (only absolute positions are supported)",
                self.position_embedding_type
            ));
        }
        Ok(())
    }
}

/// Layer normalization with a bias: `(x − mean) / √(var + eps) · w + b`.
#[derive(Module, Debug)]
pub struct LayerNorm {
    weight: Param<Tensor<1>>,
    bias: Param<Tensor<1>>,
    #[module(skip)]
    eps: f64,
}

impl LayerNorm {
    pub fn load(
        source: &dyn WeightSource,
        prefix: &str,
        size: usize,
        eps: f64,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let param = |name: &str| -> Result<_, ModelError> {
            let tensor = load_checked(source, &format!("{prefix}.{name}"), [size], device)?;
            Ok(Param::from_tensor(tensor))
        };
        Ok(Self {
            weight: param("weight")?,
            bias: param("bias")?,
            eps,
        })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let (var, mean) = x.clone().var_mean_bias(D - 1);
        let normalized = (x - mean) / var.add_scalar(self.eps).sqrt();
        normalized * self.weight.val().unsqueeze() + self.bias.val().unsqueeze()
    }
}

/// One post-norm encoder layer: self-attention, then the MLP, each added to its input and
/// normalized.
#[derive(Module, Debug)]
struct EncoderLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    #[module(skip)]
    heads: usize,
}

impl EncoderLayer {
    fn load(
        source: &dyn WeightSource,
        prefix: &str,
        config: &BertConfig,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let hidden = config.hidden_size;
        let linear = |name: &str, input: usize, output: usize| {
            Linear::load(
                source,
                &format!("{prefix}.{name}"),
                input,
                output,
                true,
                device,
            )
        };
        let norm = |name: &str| {
            LayerNorm::load(
                source,
                &format!("{prefix}.{name}"),
                hidden,
                config.layer_norm_eps,
                device,
            )
        };
        Ok(Self {
            query: linear("attention.self.query", hidden, hidden)?,
            key: linear("attention.self.key", hidden, hidden)?,
            value: linear("attention.self.value", hidden, hidden)?,
            attention_output: linear("attention.output.dense", hidden, hidden)?,
            attention_norm: norm("attention.output.LayerNorm")?,
            intermediate: linear("intermediate.dense", hidden, config.intermediate_size)?,
            output: linear("output.dense", config.intermediate_size, hidden)?,
            output_norm: norm("output.LayerNorm")?,
            heads: config.num_attention_heads,
        })
    }

    /// `x` `[b, t, h]`; `mask_bias` `[b, 1, 1, t]`: 0 for tokens, a large negative number
    /// for padding, so no position attends to padding.
    fn forward(&self, x: Tensor<3>, mask_bias: Tensor<4>) -> Tensor<3> {
        let [batch, seq, hidden] = x.dims();
        let head_dim = hidden / self.heads;
        let split = |t: Tensor<3>| {
            t.reshape([batch, seq, self.heads, head_dim])
                .swap_dims(1, 2)
        };
        let q = split(self.query.forward(x.clone()));
        let k = split(self.key.forward(x.clone()));
        let v = split(self.value.forward(x.clone()));
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar(1.0 / (head_dim as f64).sqrt())
            + mask_bias;
        let context = softmax(scores, 3)
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([batch, seq, hidden]);
        let x = self
            .attention_norm
            .forward(self.attention_output.forward(context) + x);
        let mlp = self
            .output
            .forward(gelu(self.intermediate.forward(x.clone())));
        self.output_norm.forward(mlp + x)
    }
}

/// A BERT encoder with sentence-transformers' mean pooling.
#[derive(Module, Debug)]
pub struct Bert {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    embedding_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    #[module(skip)]
    max_positions: usize,
}

impl Bert {
    /// Loads the encoder named as transformers' `BertModel` saves it (`embeddings.*`,
    /// `encoder.layer.N.*`; a `bert.` prefix, as `BertFor*` heads save it, is accepted).
    pub fn load(
        config: &BertConfig,
        source: &dyn WeightSource,
        device: &Device,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        let prefix = encoder_prefix(source);
        let hidden = config.hidden_size;
        let table = |name: &str, rows: usize| -> Result<Embedding, ModelError> {
            let name = format!("{prefix}embeddings.{name}.weight");
            Ok(Embedding {
                weight: Param::from_tensor(load_checked(source, &name, [rows, hidden], device)?),
            })
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                EncoderLayer::load(
                    source,
                    &format!("{prefix}encoder.layer.{i}"),
                    config,
                    device,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            word_embeddings: table("word_embeddings", config.vocab_size)?,
            position_embeddings: table("position_embeddings", config.max_position_embeddings)?,
            token_type_embeddings: table("token_type_embeddings", config.type_vocab_size)?,
            embedding_norm: LayerNorm::load(
                source,
                &format!("{prefix}embeddings.LayerNorm"),
                hidden,
                config.layer_norm_eps,
                device,
            )?,
            layers,
            max_positions: config.max_position_embeddings,
        })
    }

    /// The most tokens one sequence may have.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// The last hidden states `[b, t, h]` of right-padded token ids `[b, t]`, `lengths[i]`
    /// real tokens in row `i` (segment 0 throughout).
    pub fn forward(&self, ids: Tensor<2, Int>, lengths: &[usize]) -> Tensor<3> {
        let segments = Tensor::<2, Int>::zeros(ids.dims(), &ids.device());
        self.forward_with_segments(ids, segments, lengths)
    }

    /// [`Bert::forward`] with segment (token type) ids `[b, t]`: for a pair
    /// `[CLS] a [SEP] b [SEP]`, 0 up to the first `[SEP]`, 1 after it.
    pub fn forward_with_segments(
        &self,
        ids: Tensor<2, Int>,
        segments: Tensor<2, Int>,
        lengths: &[usize],
    ) -> Tensor<3> {
        let [batch, seq] = ids.dims();
        let device = ids.device();
        let positions = Tensor::<1, Int>::arange(0..seq as i64, &device)
            .reshape([1, seq])
            .expand([batch, seq]);
        let x = self.word_embeddings.forward(ids)
            + self.position_embeddings.forward(positions)
            + self.token_type_embeddings.forward(segments);
        let mut x = self.embedding_norm.forward(x);
        let mask_bias = padding_bias(lengths, seq, &device).reshape([batch, 1, 1, seq]);
        for layer in &self.layers {
            x = layer.forward(x, mask_bias.clone());
        }
        x
    }

    /// Mean of each row's real tokens' hidden states, `[b, h]` (sentence-transformers'
    /// `pooling_mode_mean_tokens`).
    pub fn mean_pool(hidden: Tensor<3>, lengths: &[usize]) -> Tensor<2> {
        let [batch, seq, width] = hidden.dims();
        let device = hidden.device();
        let keep: Vec<f32> = lengths
            .iter()
            .flat_map(|&len| (0..seq).map(move |t| if t < len { 1.0 } else { 0.0 }))
            .collect();
        let keep = Tensor::<2>::from_data(TensorData::new(keep, [batch, seq]), &device);
        let counts: Vec<f32> = lengths.iter().map(|&len| len.max(1) as f32).collect();
        let counts = Tensor::<2>::from_data(TensorData::new(counts, [batch, 1]), &device);
        (hidden * keep.reshape([batch, seq, 1]))
            .sum_dim(1)
            .reshape([batch, width])
            / counts
    }

    /// The first token's (`[CLS]`) state of each row, `[b, h]`.
    pub fn cls_pool(hidden: Tensor<3>) -> Tensor<2> {
        let [batch, _, width] = hidden.dims();
        hidden.narrow(1, 0, 1).reshape([batch, width])
    }
}

/// transformers' `BertForSequenceClassification`: the encoder, the pooler (`dense` and tanh on
/// the `[CLS]` state) and a linear classifier, `num_labels` logits per sequence.
#[derive(Module, Debug)]
pub struct BertForSequenceClassification {
    bert: Bert,
    pooler: Linear,
    classifier: Linear,
    #[module(skip)]
    labels: usize,
}

impl BertForSequenceClassification {
    /// Loads the head as transformers saves it: the encoder and `pooler.dense.*` under `bert.`
    /// (or without the prefix), `classifier.*` at the top level.
    pub fn load(
        config: &BertConfig,
        source: &dyn WeightSource,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let bert = Bert::load(config, source, device)?;
        let hidden = config.hidden_size;
        let labels = config.labels();
        let prefix = encoder_prefix(source);
        Ok(Self {
            bert,
            pooler: Linear::load(
                source,
                &format!("{prefix}pooler.dense"),
                hidden,
                hidden,
                true,
                device,
            )?,
            classifier: Linear::load(source, "classifier", hidden, labels, true, device)?,
            labels,
        })
    }

    /// The number of logits per sequence.
    pub fn labels(&self) -> usize {
        self.labels
    }

    /// The most tokens one sequence may have.
    pub fn max_positions(&self) -> usize {
        self.bert.max_positions()
    }

    /// Logits `[b, num_labels]` of right-padded token ids `[b, t]` with their segment ids,
    /// `lengths[i]` real tokens in row `i`.
    pub fn forward(
        &self,
        ids: Tensor<2, Int>,
        segments: Tensor<2, Int>,
        lengths: &[usize],
    ) -> Tensor<2> {
        let hidden = self.bert.forward_with_segments(ids, segments, lengths);
        let pooled = tanh(self.pooler.forward(Bert::cls_pool(hidden)));
        self.classifier.forward(pooled)
    }
}

/// The prefix the encoder's weights are stored under: `bert.` in a `BertFor*` head's
/// checkpoint, none in a bare `BertModel`'s.
fn encoder_prefix(source: &dyn WeightSource) -> &'static str {
    if source.contains("bert.embeddings.word_embeddings.weight") {
        "bert."
    } else {
        ""
    }
}

/// `[b, t]`: 0 for the first `lengths[i]` positions of row `i`, −1e9 after them.
fn padding_bias(lengths: &[usize], seq: usize, device: &Device) -> Tensor<2> {
    let values: Vec<f32> = lengths
        .iter()
        .flat_map(|&len| (0..seq).map(move |t| if t < len { 0.0 } else { -1e9 }))
        .collect();
    Tensor::from_data(TensorData::new(values, [lengths.len(), seq]), device)
}

/// Rows scaled to unit L2 norm (sentence-transformers' `Normalize`).
pub fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norms = x.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
    x / norms
}
