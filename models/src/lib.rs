//! Model architectures for moera, one file each, in the style of candle-transformers.
//!
//! An architecture builds itself from a [`WeightSource`] (tensors by their Hugging Face
//! names, whatever the file format) and runs as a [`CausalLm`] over a [`KvCache`].

pub mod attention;
pub mod bert;
pub mod cache;
pub mod config;
pub mod decoder;
pub mod deepseek;
pub mod factory;
pub mod gpt_oss;
pub mod llama;
pub mod mixtral;
pub mod moe;
pub mod nn;
pub mod olmoe;
pub mod qwen_moe;
pub mod rope;

pub use cache::{KvCache, RaggedKvCache};
pub use decoder::{Decoder, RouterTrace};
pub use factory::{Architecture, SUPPORTED_ARCHITECTURES, SUPPORTED_GGUF_ARCHITECTURES};
pub use moe::Routing;

use burn::tensor::{Device, Int, Tensor, TensorData};

/// Errors raised while building or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("tensor `{0}` is missing from the weights")]
    MissingTensor(String),
    #[error("tensor `{name}` has shape {found:?}, but the config implies {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("config.json does not describe the architecture: {0}")]
    ConfigJson(String),
    #[error("unsupported architecture `{name}` (supported: {supported})")]
    UnsupportedArchitecture { name: String, supported: String },
    #[error("no tokens to run")]
    EmptyInput,
    #[error("sequence of {requested} tokens exceeds the KV cache capacity of {capacity}")]
    ContextOverflow { requested: usize, capacity: usize },
    #[error("{0} tokens given for a batch of {1} sequences")]
    BatchMismatch(usize, usize),
    #[error("this model cannot decode sequences of different lengths together")]
    RaggedUnsupported,
    #[error("failed to read tensor `{name}`: {reason}")]
    Weights { name: String, reason: String },
    #[error("tensor `{name}` holds {found} experts, but the config says {config}")]
    ExpertCount {
        name: String,
        config: usize,
        found: usize,
    },
}

/// A source of weights addressed by Hugging Face tensor names.
///
/// Loaders (safetensors folders, GGUF files) implement it; they translate names and
/// layouts so that every architecture sees the HF convention (`[out, in]` linear weights).
pub trait WeightSource {
    /// The tensor as f32 values with its shape, or [`ModelError::MissingTensor`].
    fn tensor(&self, name: &str) -> Result<TensorData, ModelError>;
    /// Whether the tensor exists (used for optional weights such as an untied head).
    fn contains(&self, name: &str) -> bool;
    /// A linear layer's `[out, in]` weight: f32 by default; a source may hand over quantized
    /// codes instead (GGUF blocks, in-situ quantization), which the kernels consume as they are.
    fn linear_weight(
        &self,
        name: &str,
        out_features: usize,
        in_features: usize,
    ) -> Result<LinearWeight, ModelError> {
        let data = self.tensor(name)?;
        nn::check_shape(name, &data, &[out_features, in_features])?;
        Ok(LinearWeight::Dense(data))
    }

    /// A stacked projection of every expert, `[experts, out, in]` (HF layout per expert):
    /// f32 by default; a source may hand over quantized codes instead, the experts' rows one
    /// after the other (`[experts·out, in]`). A different expert count is
    /// [`ModelError::ExpertCount`].
    fn expert_weight(&self, name: &str, shape: [usize; 3]) -> Result<LinearWeight, ModelError> {
        moe::check_stacked(name, self.tensor(name)?, &shape).map(LinearWeight::Dense)
    }

    /// A LoRA adapter for the linear layer `prefix` (e.g. `model.layers.0.self_attn.q_proj`)
    /// of `in_features` → `out_features`, if the source carries one: none by default.
    fn lora(
        &self,
        prefix: &str,
        in_features: usize,
        out_features: usize,
    ) -> Result<Vec<nn::LoraWeights>, ModelError> {
        let _ = (prefix, in_features, out_features);
        Ok(Vec::new())
    }

    /// A LoRA adapter on the parameter `{module}.{parameter}` of `shape` `[experts, out,
    /// in]` (PEFT's `target_parameters`: a router's `weight` with `experts` 1, experts'
    /// stacked weights), if the source carries one: its factors in PEFT's layout and the
    /// module path PEFT keys them under. `declared` lists the module's parameters in
    /// declaration order: PEFT nests the wrappers of several adapted parameters of one
    /// module in that order (see [`nn::peft_parameter_key_path`]).
    fn parameter_lora(
        &self,
        module: &str,
        parameter: &str,
        declared: &[&str],
        shape: [usize; 3],
    ) -> Result<Vec<(String, nn::LoraWeights)>, ModelError> {
        let _ = (module, parameter, declared, shape);
        Ok(Vec::new())
    }
}

/// A linear layer's weight as a [`WeightSource`] hands it over.
#[derive(Debug)]
pub enum LinearWeight {
    /// f32 values, HF layout `[out, in]`.
    Dense(TensorData),
    /// Codes and scales for the quantized kernels.
    Quantized(moera_kernels::QuantizedMatrix),
}

/// Which positions the forward pass turns into logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// Every position: scoring, perplexity, reference comparisons.
    All,
    /// Only the last position: generation, which needs nothing else.
    Last,
}

/// A decoder-only language model.
pub trait CausalLm: Send + Sync {
    /// Number of entries in the vocabulary (width of the logits).
    fn vocab_size(&self) -> usize;
    /// Longest context the model was trained for.
    fn max_context(&self) -> usize;
    /// A KV cache for `batch` sequences of at most `capacity` tokens.
    fn new_cache(&self, batch: usize, capacity: usize) -> KvCache;
    /// Runs `tokens` `[batch, seq]` after the tokens already in `cache`, appending to it.
    /// Returns logits `[batch, seq or 1, vocab]`.
    fn forward(
        &self,
        tokens: Tensor<2, Int>,
        cache: &mut KvCache,
        mode: LogitsMode,
    ) -> Result<Tensor<3>, ModelError> {
        self.forward_traced(tokens, cache, mode, None)
    }
    /// [`CausalLm::forward`] that also appends each MoE layer's expert choices to `trace`.
    fn forward_traced(
        &self,
        tokens: Tensor<2, Int>,
        cache: &mut KvCache,
        mode: LogitsMode,
        trace: Option<&mut RouterTrace>,
    ) -> Result<Tensor<3>, ModelError>;
    /// Runs one new token per sequence of `cache` (`tokens[row]`), each after that row's own
    /// cached positions, appending to it: continuous batching's shared decode step.
    /// Returns logits `[rows, vocab]`.
    fn forward_ragged(
        &self,
        _tokens: &[u32],
        _cache: &mut RaggedKvCache,
    ) -> Result<Tensor<2>, ModelError> {
        Err(ModelError::RaggedUnsupported)
    }
    /// Whether [`CausalLm::forward_ragged`] works for this model.
    fn supports_ragged(&self) -> bool {
        false
    }
    /// The device the weights live on.
    fn device(&self) -> Device;
    /// The LoRA adapters on the model's linear layers (empty without an adapter).
    fn lora_adapters(&self) -> Vec<&nn::LoraAdapter> {
        Vec::new()
    }
}

/// Key/value lookups into file metadata, used to build configs from GGUF headers.
pub trait Metadata {
    fn get_u64(&self, key: &str) -> Option<u64>;
    fn get_f64(&self, key: &str) -> Option<f64>;
    fn get_str(&self, key: &str) -> Option<&str>;
}
