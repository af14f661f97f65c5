//! Retrieval-augmented generation: ingestion of documents into a vector collection, the
//! query pipeline (retrieve → rerank → generate with citations), the caches in front of it,
//! the circuit breaker around generation, and the settings that configure it all.
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use moera_engine::embed::{BertEmbedder, Embedder};
//! use moera_engine::hub::resolve_model;
//! use moera_engine::rag::breaker::{BreakerConfig, CircuitBreaker};
//! use moera_engine::rag::chunk::ChunkOptions;
//! use moera_engine::rag::ingest::{Ingestor, open_collection};
//! use moera_engine::rag::pipeline::{ModelGenerator, QueryOptions, RagPipeline};
//! use moera_engine::{Device, Model};
//!
//! # fn main() -> Result<(), moera_engine::Error> {
//! let device = Device::flex();
//! let embedder = Arc::new(BertEmbedder::load(&resolve_model("minilm"), &device)?);
//! let collection = open_collection("collections".as_ref(), "docs", embedder.dimension(), true)?;
//! Ingestor::new(embedder.as_ref(), ChunkOptions::default())?
//!     .ingest("docs".as_ref(), &collection, &mut |_| {})?;
//! let model = Arc::new(Model::load(resolve_model("smollm2"))?);
//! let pipeline = RagPipeline::new(embedder, Arc::new(collection)).with_generator(
//!     Arc::new(ModelGenerator::new(model, "smollm2")),
//!     Arc::new(CircuitBreaker::new(BreakerConfig::default())),
//! );
//! let answer = pipeline.ask("What is ownership?", &QueryOptions::default())?;
//! println!("{}", answer.answer.unwrap_or_default());
//! for (i, passage) in answer.sources.iter().enumerate() {
//!     println!("[{}] {} ({})", i + 1, passage.title, passage.source);
//! }
//! # Ok(())
//! # }
//! ```

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

/// Tests' view of what was logged.
#[cfg(test)]
pub(crate) mod captured_logs {
    use std::fmt;
    use std::sync::{Arc, Mutex, MutexGuard};

    /// A subscriber keeping every event as `LEVEL name=value ...`.
    #[derive(Clone, Default)]
    pub(crate) struct Logged(Arc<Mutex<Vec<String>>>);

    impl Logged {
        pub(crate) fn events(&self) -> MutexGuard<'_, Vec<String>> {
            self.0
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        }
    }

    struct Fields(String);

    impl tracing::field::Visit for Fields {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
            self.0.push_str(&format!(" {}={value:?}", field.name()));
        }
    }

    impl tracing::Subscriber for Logged {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            let mut fields = Fields(event.metadata().level().to_string());
            event.record(&mut fields);
            self.events().push(fields.0);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }
}
