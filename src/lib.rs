//! The facade crate of moera: re-exports [`engine`] (loading, tokenizers, sampling,
//! generation) and [`models`] (architectures). README.md, below, is its documentation, and its
//! Rust examples compile as doc tests.
#![doc = include_str!("../README.md")]

pub use moera_engine as engine;
pub use moera_index as index;
pub use moera_kernels as kernels;

pub mod process;
pub use moera_models as models;
#[cfg(feature = "server")]
pub use moera_server as server;
