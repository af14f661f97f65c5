//! Retrieval-augmented generation: ingestion of documents into a vector collection, the
//! query pipeline (retrieve → rerank → generate with citations), the caches in front of it,
//! the circuit breaker around generation, and the settings that configure it all.

pub mod breaker;
pub mod cache;
pub mod chunk;
pub mod cross_encoder;
pub mod extract;
pub mod ingest;
pub mod pipeline;
pub mod settings;

use crate::error::Result;

/// Scores passages for a query: higher is more relevant. Cross-encoders implement it.
pub trait Reranker: Send + Sync {
    /// One score per passage, in order.
    fn score(&self, query: &str, passages: &[&str]) -> Result<Vec<f32>>;
}
