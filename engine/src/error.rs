//! Errors of the engine: every failure names the file or tensor it concerns.

use std::path::PathBuf;

use moera_models::ModelError;

/// Anything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (bad magic {found:02x?})")]
    BadMagic { path: PathBuf, found: Vec<u8> },
    #[error("{path}: unsupported GGUF version {version} (expected 2 or 3)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{path}: file is truncated: {what}")]
    Truncated { path: PathBuf, what: String },
    #[error("{path}: malformed header: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("{path}: tensor `{tensor}` has unknown or unsupported type {type_id}")]
    UnknownTensorType {
        path: PathBuf,
        tensor: String,
        type_id: u32,
    },
    #[error("{path}: data of tensor `{tensor}` lies outside the file ({end} > {file_len} bytes)")]
    TensorOutOfBounds {
        path: PathBuf,
        tensor: String,
        end: u64,
        file_len: u64,
    },
    #[error("{path}: invalid safetensors: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{path}: training checkpoint: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("{path}: LoRA adapter: {reason}")]
    Adapter { path: PathBuf, reason: String },
    #[error("no adapter named {name:?} (loaded: {loaded:?})")]
    UnknownAdapter { name: String, loaded: Vec<String> },
    #[error("{}{}: {reason}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Dataset {
        path: PathBuf,
        line: Option<usize>,
        reason: String,
    },
    #[error("{path}: unknown architecture `{architecture}` (supported: {supported})")]
    UnknownArchitecture {
        path: PathBuf,
        architecture: String,
        supported: String,
    },
    #[error("{path}: {source}")]
    Model {
        path: PathBuf,
        #[source]
        source: ModelError,
    },
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("no tokenizer is available for this model: pass token ids instead of text")]
    NoTokenizer,
    #[error("model path `{0}` is neither a model folder nor a .gguf file")]
    NotAModel(PathBuf),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("tokenization failed: {0}")]
    Tokenize(String),
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("prompt is empty")]
    EmptyPrompt,
    #[error("prompt of {prompt} tokens plus {max_new} new tokens exceeds the context of {context}")]
    PromptTooLong {
        prompt: usize,
        max_new: usize,
        context: usize,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("invalid sampling parameter: {0}")]
    Sampling(String),
    #[error("device `{0}` is not compiled in (enable the cargo feature of the same name)")]
    DeviceUnavailable(String),
    #[error("unknown device `{0}` (expected flex, wgpu or cuda)")]
    UnknownDevice(String),
    #[error("unknown quantization `{0}` (expected auto, none, int8 or int4)")]
    UnknownQuantization(String),
    #[error(transparent)]
    Runtime(#[from] ModelError),
    #[error("the question is empty")]
    EmptyQuestion,
    #[error(
        "{collection}: the collection holds {collection_dim}-dimensional vectors, the embedder makes {embedder_dim}"
    )]
    DimensionMismatch {
        collection: PathBuf,
        collection_dim: usize,
        embedder_dim: usize,
    },
    #[error(transparent)]
    Index(#[from] moera_index::StoreError),
    #[error("generation is unavailable (circuit breaker open); retry in {retry_after:?}")]
    ServiceUnavailable { retry_after: std::time::Duration },
    #[error("setting {variable}: {reason}")]
    Settings { variable: String, reason: String },
    #[error("the scheduler is shutting down and takes no new requests")]
    ShuttingDown,
    #[error("too many requests are waiting ({waiting}); retry later")]
    Overloaded { waiting: usize },
    #[error("generation failed: {0}")]
    Generation(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
