//! Foundation tests: loading, Llama parity with transformers, GGUF, tokenizers, generation,
//! the CLI, and bad input. One test binary for the whole area keeps CI link time small.

mod bad_input;
mod batching;
mod cli;
mod common;
mod cross_encoder;
mod embeddings;
mod generation;
mod gguf;
mod llama_parity;
mod lora;
mod moe_parity;
mod rag;
mod smollm2;
mod training;
