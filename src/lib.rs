//! moera: run, fine-tune and serve Mixture-of-Experts language models on GPUs and CPUs.
//!
//! This facade re-exports the crates of the workspace:
//! [`engine`] (loading, tokenizers, sampling, generation) and [`models`] (architectures).
//!
//! ```no_run
//! use moera::engine::{ChatMessage, GenerationRequest, Model, TokenEvent};
//!
//! # fn main() -> Result<(), moera::engine::Error> {
//! // A folder with config.json + safetensors, a .gguf file, or an alias such as "smollm2".
//! let model = Model::load(moera::engine::hub::resolve_model("smollm2"))?;
//! let messages = vec![ChatMessage::user("What is the capital of France?")];
//! for event in model.generate(&GenerationRequest::chat(messages).max_tokens(32))? {
//!     match event? {
//!         TokenEvent::Token { text, .. } => print!("{text}"),
//!         TokenEvent::Done { reason, usage } => println!("\n[{reason:?}, {usage:?}]"),
//!     }
//! }
//! # Ok(())
//! # }
//! ```

pub use moera_engine as engine;
pub use moera_models as models;

/// Compiles the Rust examples of README.md as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
