//! moera's in-process vector index: an HNSW graph in a flat, hnswlib-like layout
//! (fixed-size neighbour blocks per node, vectors contiguous), with payload-style filters
//! applied during the graph traversal.
//!
//! ```
//! use moera_index::{Hnsw, HnswParams, Metric};
//!
//! let mut index = Hnsw::new(3, Metric::Cosine, HnswParams::default());
//! index.insert(&[1.0, 0.0, 0.0]).unwrap();
//! index.insert(&[0.0, 1.0, 0.0]).unwrap();
//! let hits = index.search(&[0.9, 0.1, 0.0], 1, 16, None).unwrap();
//! assert_eq!(hits[0].id, 0);
//! ```

pub mod collection;
mod column;
pub mod distance;
pub mod filter;
pub mod hnsw;
pub mod npy;
pub mod quant;
pub mod store;

pub use collection::{Collection, CollectionConfig, Point, Quantization, ScoredPoint};
pub use distance::Metric;
pub use filter::Filter;
pub use hnsw::{Hit, Hnsw, HnswParams};
pub use store::{CompactReport, DurableCollection, OpenOptions, OpenReport, StoreError};

/// Errors of the index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("vector has {found} dimensions, the index {expected}")]
    Dimension { expected: usize, found: usize },
    #[error("vector contains a NaN or infinite value")]
    NonFinite,
    #[error("the index holds at most {0} points")]
    Full(usize),
    #[error("{path}: {reason}")]
    Npy {
        path: std::path::PathBuf,
        reason: String,
    },
}
