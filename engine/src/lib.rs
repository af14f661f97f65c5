//! The moera runtime: loading models (Hugging Face folders and GGUF files), tokenizers and
//! chat templates, sampling, and streaming generation on any compiled-in backend.
//!
//! ```no_run
//! use moera_engine::{ChatMessage, GenerationRequest, Model, TokenEvent};
//!
//! # fn main() -> Result<(), moera_engine::Error> {
//! let model = Model::load(moera_engine::hub::resolve_model("smollm2"))?;
//! let request = GenerationRequest::chat(vec![ChatMessage::user("What is the capital of France?")])
//!     .max_tokens(32);
//! for event in model.generate(&request)? {
//!     if let TokenEvent::Token { text, .. } = event? {
//!         print!("{text}");
//!     }
//! }
//! # Ok(())
//! # }
//! ```

pub mod adapter;
pub mod batch;
pub mod chat;
pub mod dataset;
pub mod device;
pub mod embed;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod model;
pub mod quant;
pub mod quantization;
pub mod rag;
pub mod safetensors_source;
pub mod sampler;
pub mod tokenizer;
pub mod train;

pub use burn::tensor::Device;
pub use chat::{ChatMessage, ChatTemplate};
pub use device::DeviceKind;
pub use error::{Error, Result};
pub use generate::{FinishReason, Generation, GenerationRequest, Prompt, TokenEvent, Usage};
pub use model::{LoadOptions, LoadProgress, Model, Perplexity};
pub use moera_models::{RouterTrace, Routing};
pub use quantization::{Quantization, WeightMemory};
pub use sampler::{Sampler, SamplingParams};
