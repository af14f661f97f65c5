//! GELU with the exact error function (BERT's `gelu`). burn's flex backend evaluates it with
//! a scalar `erf` per value, a sixth of a MiniLM forward pass; on the CPU this runs one
//! vectorized pass instead (AVX2/FMA where present): erf by Abramowitz & Stegun 7.1.26
//! (absolute error ≤ 1.5e-7) with a Cephes-style polynomial `exp`. GPUs and autodiff
//! devices keep burn's.

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
