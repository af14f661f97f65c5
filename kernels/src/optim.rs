//! One AdamW step per parameter tensor. burn's AdamW runs a dozen elementwise ops, each a
//! pass over the parameter's size (over the whole model in full fine-tuning); on flex this
//! is one vectorized pass that reads the parameter, its gradient and both moments and
//! updates them in place (the tensors' buffers are reused when nothing else holds them).
//! Elsewhere the same arithmetic runs as burn ops.
//!
//! ```
//! use burn::tensor::{Device, Tensor};
//! use moera_kernels::{AdamWStep, adamw_step};
//!
//! let device = Device::flex();
//! let step = AdamWStep {
//!     lr: 0.1,
//!     beta_1: 0.9,
//!     beta_2: 0.999,
//!     epsilon: 1e-8,
//!     weight_decay: 0.0,
//!     time: 1,
//!     grad_scale: 1.0,
//! };
//! let param = Tensor::<1>::from_floats([1.0, 1.0], &device);
//! let grad = Tensor::<1>::from_floats([2.0, -2.0], &device);
//! let (param, _, _) = adamw_step(param, grad, None, step);
//! // The first step moves each weight by the learning rate against its gradient's sign.
//! let param = param.into_data().to_vec::<f32>().unwrap();
//! assert!((param[0] - 0.9).abs() < 1e-6 && (param[1] - 1.1).abs() < 1e-6);
//! ```

use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

use crate::{Executor, executor};

/// The constants of one AdamW step (PyTorch's `AdamW`, as burn's): `time` counts steps
/// from 1 for the bias corrections; the gradient is multiplied by `grad_scale` first (1
/// for none: a clipping factor or an accumulation's mean folded into the step, saving a
/// pass over every gradient).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
    pub time: i32,
    pub grad_scale: f32,
}

impl AdamWStep {
    /// `1 / (1 − β₁ᵗ)` and `1 / (1 − β₂ᵗ)`.
    fn corrections(&self) -> (f32, f32) {
        (
            1.0 / (1.0 - self.beta_1.powi(self.time)),
            1.0 / (1.0 - self.beta_2.powi(self.time)),
        )
    }
}

/// `(parameter, m, v)` after one step with gradient `grad` from the moments `moments`
/// (`None` before the first step: both zero), with `g = grad_scale·grad`:
/// `m = β₁m + (1−β₁)g`, `v = β₂v + (1−β₂)g²`,
/// `p = p·(1 − lr·λ) − lr·(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε)`.
pub fn adamw_step<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    moments: Option<(Tensor<D>, Tensor<D>)>,
    step: AdamWStep,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let device = param.device();
    let on_host = executor(&device) == Executor::Cpu
        && !device.is_autodiff()
        && [&param, &grad].iter().all(|t| t.dtype() == DType::F32)
        && moments
            .as_ref()
            .is_none_or(|(m, v)| m.dtype() == DType::F32 && v.dtype() == DType::F32);
    if !on_host {
        return reference(param, grad, moments, step);
    }
    let shape = param.shape();
    // Moved out without a copy where the tensor's buffer is not shared (flex's into_data).
    let data = |t: Tensor<D>| t.into_data();
    let (mut p, g) = (data(param), data(grad));
    let (mut m, mut v) = match moments {
        Some((m, v)) => (data(m), data(v)),
        None => {
            let zeros = TensorData::new(vec![0f32; shape.num_elements()], shape.clone());
            (zeros.clone(), zeros)
        }
    };
    {
        let (Ok(p), Ok(g), Ok(m), Ok(v)) = (
            p.as_mut_slice::<f32>(),
            g.as_slice::<f32>(),
            m.as_mut_slice::<f32>(),
            v.as_mut_slice::<f32>(),
        ) else {
            unreachable!("f32 tensors (checked above) give f32 data");
        };
        update(p, g, m, v, step);
    }
    let tensor = |data: TensorData| Tensor::<D>::from_data(data, &device);
    (tensor(p), tensor(m), tensor(v))
}

/// Values per rayon task.
const CHUNK: usize = 1 << 14;

fn update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], step: AdamWStep) {
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .zip(g.par_chunks(CHUNK))
        .for_each(|((p, (m, v)), g)| {
            #[cfg(target_arch = "x86_64")]
            if crate::cpu::simd_available() {
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                unsafe { update_avx2(p, g, m, v, step) };
                return;
            }
            update_slice(p, g, m, v, step)
        });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn update_avx2(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], step: AdamWStep) {
    update_slice(p, g, m, v, step)
}

#[inline(always)]
fn update_slice(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], step: AdamWStep) {
    let AdamWStep {
        lr,
        beta_1,
        beta_2,
        epsilon,
        weight_decay,
        grad_scale,
        ..
    } = step;
    let (correct_1, correct_2) = step.corrections();
    let decay = 1.0 - lr * weight_decay;
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = g * grad_scale;
        *m = beta_1 * *m + (1.0 - beta_1) * g;
        *v = beta_2 * *v + (1.0 - beta_2) * (g * g);
        let delta = (*m * correct_1) / ((*v * correct_2).sqrt() + epsilon);
        *p = *p * decay - lr * delta;
    }
}

/// The same step in burn ops (GPUs, autodiff tensors, other float types).
fn reference<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    moments: Option<(Tensor<D>, Tensor<D>)>,
    step: AdamWStep,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let grad = match step.grad_scale {
        1.0 => grad,
        scale => grad.mul_scalar(scale),
    };
    let (m, v) = match moments {
        Some((m, v)) => (
            m.mul_scalar(step.beta_1) + grad.clone().mul_scalar(1.0 - step.beta_1),
            v.mul_scalar(step.beta_2) + grad.square().mul_scalar(1.0 - step.beta_2),
        ),
        None => (
            grad.clone().mul_scalar(1.0 - step.beta_1),
            grad.square().mul_scalar(1.0 - step.beta_2),
        ),
    };
    let (correct_1, correct_2) = step.corrections();
    let delta = m.clone().mul_scalar(correct_1)
        / v.clone()
            .mul_scalar(correct_2)
            .sqrt()
            .add_scalar(step.epsilon);
    let param = param.mul_scalar(1.0 - step.lr * step.weight_decay) - delta.mul_scalar(step.lr);
    (param, m, v)
}

/// `Σ t²` as a `[1]` tensor on `t`'s device, and `t` itself. On the CPU this is one
/// vectorized pass over the values, moved out of the tensor and back (no copy where its
/// buffer is not shared); elsewhere burn's ops. For a global gradient norm over every
/// parameter (full fine-tuning reads 135 M gradients per step).
///
/// ```
/// use burn::tensor::{Device, Tensor};
///
/// let t = Tensor::<1>::from_floats([3.0, 4.0], &Device::flex());
/// let (squares, t) = moera_kernels::sum_of_squares(t);
/// assert_eq!(squares.into_data().to_vec::<f32>().unwrap(), vec![25.0]);
/// assert_eq!(t.dims(), [2]);
/// ```
pub fn sum_of_squares<const D: usize>(t: Tensor<D>) -> (Tensor<1>, Tensor<D>) {
    let device = t.device();
    let on_host =
        executor(&device) == Executor::Cpu && !device.is_autodiff() && t.dtype() == DType::F32;
    if !on_host {
        return (t.clone().square().sum(), t);
    }
    let data = t.into_data();
    let values = data
        .as_slice::<f32>()
        .unwrap_or_else(|_| unreachable!("an f32 tensor (checked above) gives f32 data"));
    let sum: f64 = values
        .par_chunks(CHUNK)
        .map(|chunk| f64::from(squares(chunk)))
        .sum();
    let sum = Tensor::<1>::from_data(TensorData::new(vec![sum as f32], [1]), &device);
    (sum, Tensor::from_data(data, &device))
}

fn squares(values: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::simd_available() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { squares_avx2(values) };
    }
    crate::cpu::dot::<false>(values, values)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn squares_avx2(values: &[f32]) -> f32 {
    crate::cpu::dot::<true>(values, values)
}
