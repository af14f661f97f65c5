//! moera's compute kernels, each beside a reference written in plain burn ops.
//!
//! - [`moe`]: fused top-k routing and the sparse expert dispatch (counting sort by expert,
//!   grouped GEMMs) as cubecl kernels on the cube backends.
//! - [`quant`]: weight-only quantized matrices (int8, int4, GGUF Q4_0/Q4_1/Q8_0/Q4_K) and
//!   [`QuantLinear`], their matrix product: a cubecl GEMV/GEMM on the cube backends (wgpu,
//!   cuda), a rayon kernel on flex, and the plain-burn reference everywhere.
//!
//! Which implementation runs is decided per call from the tensor's device and the
//! [`KernelPath`] switch ([`set_kernel_path`], or `MOERA_KERNELS=reference` in the
//! environment), so tests and debugging can force the reference path anywhere.
//!
//! ```
//! use burn::tensor::{Device, Tensor};
//! use moera_kernels::{QuantFormat, QuantLinear, QuantizedMatrix};
//!
//! let device = Device::flex();
//! let weights: Vec<f32> = (0..4 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
//! let matrix = QuantizedMatrix::quantize(QuantFormat::Int8, &weights, 4, 64).unwrap();
//! let linear = QuantLinear::new(matrix, &device);
//! let x = Tensor::<2>::ones([3, 64], &device);
//! assert_eq!(linear.forward(x).dims(), [3, 4]);
//! ```

use std::sync::atomic::{AtomicU8, Ordering};

mod activation;
mod attention;
#[cfg(feature = "flex")]
mod attention_cpu;
mod cpu;
#[cfg(feature = "flex")]
mod cpu_gemm;
#[cfg(feature = "cube")]
mod cube;
#[cfg(feature = "flex")]
mod flex;
mod linear;
mod lora;
mod loss;
#[cfg(feature = "flex")]
mod loss_cpu;
pub mod moe;
mod norm;
mod optim;
pub mod quant;
mod rope;

pub use activation::{gelu, swiglu};
pub use attention::{CausalMask, fused_attention};
pub use linear::{LoraUpdate, QuantLinear};
pub use lora::{fused_linear, fused_lora_linear};
pub use loss::fused_linear_cross_entropy;
pub use norm::rms_norm;
pub use optim::{AdamWStep, adamw_step, sum_of_squares};
pub use quant::{QuantFormat, QuantizedMatrix};
pub use rope::rotate_half;

/// Errors from preparing kernel inputs.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{0}")]
    Shape(String),
    #[error("{0} is not a GGUF block format kept quantized")]
    NotAGgmlFormat(QuantFormat),
    #[error("{0} cannot be produced by in-situ quantization (use int8 or int4)")]
    NotAnInSituFormat(QuantFormat),
    #[error("MoE kernel tiles: {0}")]
    Tiles(String),
}

/// Which implementation of each operation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPath {
    /// Our kernels where the device has them (cubecl on wgpu/cuda, rayon on flex).
    Fast,
    /// The plain-burn reference everywhere.
    Reference,
}

const UNSET: u8 = 0;
const FAST: u8 = 1;
const REFERENCE: u8 = 2;
static PATH: AtomicU8 = AtomicU8::new(UNSET);

/// Forces every operation onto `path` for the rest of the process (tests, debugging).
pub fn set_kernel_path(path: KernelPath) {
    let value = match path {
        KernelPath::Fast => FAST,
        KernelPath::Reference => REFERENCE,
    };
    PATH.store(value, Ordering::Relaxed);
}

thread_local! {
    static THREAD_PATH: std::cell::Cell<Option<KernelPath>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with every operation this thread issues on `path`, whatever the process-wide
/// setting: for comparing the two paths inside one process (tests run in parallel threads).
pub fn with_kernel_path<R>(path: KernelPath, f: impl FnOnce() -> R) -> R {
    let previous = THREAD_PATH.with(|p| p.replace(Some(path)));
    let result = f();
    THREAD_PATH.with(|p| p.set(previous));
    result
}

/// The current path: as set by [`with_kernel_path`] on this thread, else by
/// [`set_kernel_path`], else `MOERA_KERNELS=reference` from the
/// environment, else [`KernelPath::Fast`].
pub fn kernel_path() -> KernelPath {
    if let Some(path) = THREAD_PATH.with(|p| p.get()) {
        return path;
    }
    match PATH.load(Ordering::Relaxed) {
        FAST => KernelPath::Fast,
        REFERENCE => KernelPath::Reference,
        _ => {
            let reference =
                std::env::var("MOERA_KERNELS").is_ok_and(|v| v.eq_ignore_ascii_case("reference"));
            let path = if reference {
                KernelPath::Reference
            } else {
                KernelPath::Fast
            };
            set_kernel_path(path);
            path
        }
    }
}

/// What runs an operation on a given device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Executor {
    Reference,
    Cpu,
    #[cfg(feature = "cube")]
    Cube,
}

fn executor(device: &burn::tensor::Device) -> Executor {
    if kernel_path() == KernelPath::Reference {
        return Executor::Reference;
    }
    #[cfg(feature = "cube")]
    if cube::is_cube(device) {
        return Executor::Cube;
    }
    // Every other backend is a CPU one: our rayon kernels read its tensors as host data.
    let _ = device;
    Executor::Cpu
}

/// [`executor`] for an operation with a differentiable kernel: on an autodiff device over a
/// cube runtime it runs that kernel too.
fn differentiable_executor(device: &burn::tensor::Device) -> Executor {
    match executor(device) {
        #[cfg(feature = "cube")]
        Executor::Cpu if cube::is_autodiff_cube(device) => Executor::Cube,
        other => other,
    }
}
