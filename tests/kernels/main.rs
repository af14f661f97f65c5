//! Kernel tests: each kernel against its plain-burn reference (on flex, and on wgpu in CI),
//! and the quantized formats against the `gguf` Python package's dequantization.

mod activation;
mod attention;
mod lora;
mod loss;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod moe;
mod norm;
mod optim;
mod quant;
mod rope;

use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

/// Deterministic values in [-1, 1).
pub fn pseudo_random(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Largest `|a − b|` relative to the largest `|b|` (at least 1).
pub fn relative_error(actual: &[f32], expected: &[f32]) -> f32 {
    assert_eq!(actual.len(), expected.len(), "lengths differ");
    let scale = expected.iter().fold(1f32, |m, v| m.max(v.abs()));
    let diff = actual
        .iter()
        .zip(expected)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

pub fn values<const D: usize>(tensor: burn::tensor::Tensor<D>) -> Vec<f32> {
    tensor.into_data().convert::<f32>().try_into_vec().unwrap()
}

/// The GPU device under test: CUDA when built with `cuda` (unless `MOERA_DEVICE=wgpu`), else
/// wgpu (Mesa lavapipe in CI).
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub fn gpu() -> burn::tensor::Device {
    use moera::engine::DeviceKind;
    let kind = match DeviceKind::default_kind() {
        Ok(kind) if kind != DeviceKind::Flex => kind,
        _ if cfg!(feature = "cuda") => DeviceKind::Cuda,
        _ => DeviceKind::Wgpu,
    };
    kind.device()
        .unwrap_or_else(|e| panic!("{kind} device: {e}"))
}
