//! Activations as one vectorized pass on the CPU (AVX2/FMA where present), where burn's
//! flex backend runs several passes with a scalar `exp` or `erf` per value:
//!
//! - [`gelu`] with the exact error function (BERT's `gelu`, a sixth of a MiniLM forward
//!   pass in burn's): erf by Abramowitz & Stegun 7.1.26 (absolute error ≤ 1.5e-7) with a
//!   Cephes-style polynomial `exp`. GPUs and autodiff devices keep burn's.
//! - [`swiglu`], `silu(gate)·up`, the gated MLP's activation, forward and (through burn's
//!   backend extension, on autodiff over flex) backward: in burn ops it costs as much as
//!   the gate projection itself while training.

use burn::tensor::{DType, Device, Tensor, TensorData};
use rayon::prelude::*;

use crate::cpu::exp_nonpositive;
use crate::{Executor, executor};

/// `0.5·x·(1 + erf(x/√2))` elementwise.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let device = x.device();
    if executor(&device) != Executor::Cpu || is_autodiff(&device) || x.dtype() != DType::F32 {
        return burn::tensor::activation::gelu(x);
    }
    let shape = x.shape();
    let Ok(mut values) = x.clone().into_data().try_into_vec::<f32>() else {
        return burn::tensor::activation::gelu(x);
    };
    values.par_chunks_mut(1 << 14).for_each(gelu_in_place);
    Tensor::from_data(TensorData::new(values, shape), &device)
}

/// `silu(gate)·up` elementwise (`gate·σ(gate)·up`), for tensors of one shape; on flex
/// (with or without autodiff) one fused pass each way, elsewhere burn's ops.
///
/// ```
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// let gate = Tensor::<1>::from_floats([0.0, 1.0], &device);
/// let up = Tensor::<1>::from_floats([3.0, 2.0], &device);
/// let out = moera_kernels::swiglu(gate, up).into_data().to_vec::<f32>().unwrap();
/// assert_eq!(out[0], 0.0);
/// assert!((out[1] - 2.0 / (1.0 + (-1f32).exp())).abs() < 1e-6);
/// ```
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "flex")]
    {
        let fused = gate.dims() == up.dims()
            && gate.dtype() == DType::F32
            && up.dtype() == DType::F32
            && crate::flex::runs_fused(&gate.device());
        if fused {
            let out = <burn::backend::Dispatch as flex::FusedActivationOps>::swiglu(
                gate.into_dispatch(),
                up.into_dispatch(),
            );
            return Tensor::from_dispatch(out);
        }
    }
    burn::tensor::activation::silu(gate) * up
}

/// `σ(x)` from `exp(−|x|)`, which cannot overflow.
#[inline(always)]
fn sigmoid_one(x: f32) -> f32 {
    let e = exp_nonpositive(-x.abs());
    let positive = 1.0 / (1.0 + e);
    if x >= 0.0 { positive } else { e * positive }
}

/// Values per rayon task: large enough to amortize the split, small enough to share.
const CHUNK: usize = 1 << 14;

/// `out = silu(gate)·up`.
fn swiglu_forward(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; gate.len()];
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(out, (gate, up))| {
            #[cfg(target_arch = "x86_64")]
            if crate::cpu::simd_available() {
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                unsafe { swiglu_forward_avx2(gate, up, out) };
                return;
            }
            swiglu_forward_slice(gate, up, out)
        });
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_forward_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    swiglu_forward_slice(gate, up, out)
}

#[inline(always)]
fn swiglu_forward_slice(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g * sigmoid_one(g) * u;
    }
}

/// `(∂gate, ∂up)` of `silu(gate)·up` given `∂out`: `∂up = ∂out·g·σ(g)` and
/// `∂gate = ∂out·u·σ(g)·(1 + g·(1 − σ(g)))`.
fn swiglu_backward(gate: &[f32], up: &[f32], d_out: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut d_gate = vec![0f32; gate.len()];
    let mut d_up = vec![0f32; gate.len()];
    d_gate
        .par_chunks_mut(CHUNK)
        .zip(d_up.par_chunks_mut(CHUNK))
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .zip(d_out.par_chunks(CHUNK))
        .for_each(|(((d_gate, d_up), (gate, up)), d_out)| {
            let inputs = [gate, up, d_out];
            #[cfg(target_arch = "x86_64")]
            if crate::cpu::simd_available() {
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                unsafe { swiglu_backward_avx2(inputs, d_gate, d_up) };
                return;
            }
            swiglu_backward_slice(inputs, d_gate, d_up)
        });
    (d_gate, d_up)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_backward_avx2(inputs: [&[f32]; 3], d_gate: &mut [f32], d_up: &mut [f32]) {
    swiglu_backward_slice(inputs, d_gate, d_up)
}

#[inline(always)]
fn swiglu_backward_slice([gate, up, d_out]: [&[f32]; 3], d_gate: &mut [f32], d_up: &mut [f32]) {
    let values = gate.iter().zip(up).zip(d_out);
    for ((dg, du), ((&g, &u), &d)) in d_gate.iter_mut().zip(d_up.iter_mut()).zip(values) {
        let s = sigmoid_one(g);
        *du = d * g * s;
        *dg = d * u * s * (1.0 + g * (1.0 - s));
    }
}

#[cfg(feature = "flex")]
mod flex {
    //! [`super::swiglu`] behind burn's backend extension: flex runs it, and autodiff over
    //! flex records it with its own backward.

    use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::flex::FlexTensor;
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{Autodiff, Backend, Flex, TensorMetadata, backend_extension};

    use crate::flex::{host, tensor, values};

    /// The fused gated activation (see [`super::swiglu`]).
    #[backend_extension(Flex, Autodiff)]
    pub trait FusedActivationOps: burn::backend::Backend {
        fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
    }

    /// Forward on row-major host copies, and backward.
    pub trait ActivationKernels: Backend {
        fn contiguous(t: FloatTensor<Self>) -> FloatTensor<Self>;

        fn swiglu_forward(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;

        /// `[∂gate, ∂up]`.
        fn swiglu_backward(
            gate: FloatTensor<Self>,
            up: FloatTensor<Self>,
            d_out: FloatTensor<Self>,
        ) -> [FloatTensor<Self>; 2];
    }

    impl ActivationKernels for Flex {
        fn contiguous(t: FlexTensor) -> FlexTensor {
            host(&t)
        }

        fn swiglu_forward(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
            let (gate, up) = (host(&gate), host(&up));
            let out = super::swiglu_forward(values(&gate), values(&up));
            tensor(out, gate.shape().to_vec())
        }

        fn swiglu_backward(gate: FlexTensor, up: FlexTensor, d_out: FlexTensor) -> [FlexTensor; 2] {
            let [gate, up, d_out] = [gate, up, d_out].map(|t| host(&t));
            let shape = gate.shape().to_vec();
            let (d_gate, d_up) = super::swiglu_backward(values(&gate), values(&up), values(&d_out));
            [tensor(d_gate, shape.clone()), tensor(d_up, shape)]
        }
    }

    impl FusedActivationOps for Flex {
        fn swiglu(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
            Self::swiglu_forward(gate, up)
        }
    }

    #[derive(Debug)]
    struct SwigluBackward;

    impl<B: Backend + ActivationKernels> Backward<B, 2> for SwigluBackward {
        /// The inputs: σ is recomputed, which costs less than keeping it.
        type State = (FloatTensor<B>, FloatTensor<B>);

        fn backward(
            self,
            ops: Ops<Self::State, 2>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let d_out = grads.consume::<B>(&ops.node);
            let (gate, up) = ops.state;
            let gradients = B::swiglu_backward(gate, up, d_out);
            for (node, gradient) in ops.parents.into_iter().zip(gradients) {
                if let Some(node) = node {
                    grads.register::<B>(node.id, gradient);
                }
            }
        }
    }

    impl<B: Backend + ActivationKernels, C: CheckpointStrategy> FusedActivationOps for Autodiff<B, C> {
        fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
            let guards = [gate.node(), up.node()];
            let [gate, up] = [gate, up].map(|t| B::contiguous(t.into_primitive()));
            let out = B::swiglu_forward(gate.clone(), up.clone());
            match SwigluBackward
                .prepare::<C>(guards)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish((gate, up), out),
                OpsKind::UnTracked(prep) => prep.finish(out),
            }
        }
    }
}

fn is_autodiff(device: &Device) -> bool {
    matches!(
        device.as_dispatch(),
        burn::backend::DispatchDevice::Autodiff(_)
    )
}

fn gelu_in_place(values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::simd_available() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        unsafe { gelu_avx2(values) };
        return;
    }
    gelu_slice(values);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_avx2(values: &mut [f32]) {
    gelu_slice(values);
}

/// Straight-line code over a slice, for the compiler to vectorize.
#[inline(always)]
fn gelu_slice(values: &mut [f32]) {
    for v in values.iter_mut() {
        *v = gelu_one(*v);
    }
}

#[inline(always)]
fn gelu_one(x: f32) -> f32 {
    const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
    let z = (x * FRAC_1_SQRT_2).abs();
    // erfc(z) = poly(t)·exp(−z²) for z ≥ 0.
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    let erfc = poly * exp_nonpositive(-z * z);
    // 1 + erf(x/√2) is erfc(|z|) for negative x (no cancellation), 2 − erfc(z) otherwise.
    let one_plus_erf = if x < 0.0 { erfc } else { 2.0 - erfc };
    0.5 * x * one_plus_erf
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `0.5·x·erfc(−x/√2)` in f64 from a long continued/series evaluation: the reference.
    fn gelu_f64(x: f64) -> f64 {
        0.5 * x * (1.0 + erf_f64(x / std::f64::consts::SQRT_2))
    }

    /// erf by its Taylor series (|x| < 3) or continued fraction of erfc (|x| ≥ 3), in f64.
    fn erf_f64(x: f64) -> f64 {
        let a = x.abs();
        let value = if a < 3.0 {
            let mut term = a;
            let mut sum = a;
            for n in 1..200 {
                term *= -a * a / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // Lentz's continued fraction for erfc.
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (a + f);
            }
            1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f)
        };
        value.copysign(x)
    }

    #[test]
    fn sigmoid_is_accurate_and_saturates() {
        for i in -2000..=2000 {
            let x = i as f32 / 50.0;
            let want = 1.0 / (1.0 + (-(x as f64)).exp());
            assert!((sigmoid_one(x) as f64 - want).abs() < 2e-7, "σ({x})");
        }
        assert!(sigmoid_one(-200.0) < 1e-37);
        assert_eq!(sigmoid_one(200.0), 1.0);
    }

    #[test]
    fn matches_the_exact_gelu() {
        let mut worst = 0f64;
        for i in -24_000..=24_000 {
            let x = i as f32 / 1000.0;
            let got = gelu_one(x) as f64;
            let want = gelu_f64(x as f64);
            let error = (got - want).abs() / want.abs().max(1.0);
            worst = worst.max(error);
        }
        assert!(worst < 5e-7, "worst error {worst:e}");
        assert!(gelu_one(-200.0).abs() < 1e-30);
        assert_eq!(gelu_one(200.0), 200.0);
        assert_eq!(gelu_one(0.0), 0.0);
        assert!(gelu_one(f32::NAN).is_nan());
    }

    #[test]
    fn the_tensor_path_matches_burn() {
        let device = Device::flex();
        let values: Vec<f32> = (0..5000).map(|i| (i as f32 - 2500.0) / 300.0).collect();
        let x = Tensor::<1>::from_data(TensorData::new(values.clone(), [5000]), &device);
        let ours = gelu(x.clone()).into_data().try_into_vec::<f32>().unwrap();
        let burns = burn::tensor::activation::gelu(x)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        for ((a, b), x) in ours.iter().zip(&burns).zip(&values) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{x}: {a} vs {b}");
        }
    }
}
