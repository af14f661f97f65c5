//! The fused RMS normalization on flex against burn's composite `x·(mean(x²) + ε)^(-1/2)·w`,
//! forward and backward (for the input and, when it is trained, the weight).

use burn::tensor::{Device, Tensor, TensorData};
use moera::kernels::{KernelPath, rms_norm, with_kernel_path};

use crate::{pseudo_random, relative_error, values};

/// The output and, on an autodiff device, the gradients of `Σ y ⊙ c` for `x` and, when
/// `train_weight`, for the weight.
fn run(device: &Device, fused: bool, train_weight: bool) -> Vec<(&'static str, Vec<f32>)> {
    // Three batches of 37 rows (two rayon tasks of 16 rows and a partial third) of a width
    // that is not a multiple of the 8 lanes; a weight with both signs.
    let shape = [3, 37, 203];
    let elements = shape.iter().product::<usize>();
    let x = Tensor::<3>::from_data(TensorData::new(pseudo_random(1, elements), shape), device)
        .mul_scalar(4.0);
    let weight = Tensor::<1>::from_data(TensorData::new(pseudo_random(2, 203), [203]), device);
    let (x, weight) = match device.is_autodiff() {
        true if train_weight => (x.require_grad(), weight.require_grad()),
        true => (x.require_grad(), weight),
        false => (x, weight),
    };
    let eps = 1e-5;
    let y = match fused {
        true => with_kernel_path(KernelPath::Fast, || {
            rms_norm(x.clone(), weight.clone(), eps)
        }),
        false => {
            let inv_rms = x
                .clone()
                .square()
                .mean_dim(2)
                .add_scalar(eps)
                .sqrt()
                .recip();
            x.clone() * inv_rms * weight.clone().unsqueeze()
        }
    };
    let mut results = vec![("y", values(y.clone()))];
    if device.is_autodiff() {
        let cotangent =
            Tensor::<3>::from_data(TensorData::new(pseudo_random(3, elements), shape), device);
        let grads = (y * cotangent).sum().backward();
        results.push(("∂x", values(x.grad(&grads).expect("a gradient"))));
        if train_weight {
            results.push(("∂w", values(weight.grad(&grads).expect("a gradient"))));
        }
    }
    results
}

#[test]
fn fused_rms_norm_matches_burn_ops_forward_and_backward_on_flex() {
    let cases = [
        (Device::flex(), false),
        (Device::flex().autodiff(), false),
        (Device::flex().autodiff(), true),
    ];
    for (device, train_weight) in cases {
        let fused = run(&device, true, train_weight);
        let reference = run(&device, false, train_weight);
        assert_eq!(fused.len(), reference.len());
        for ((name, fused), (_, expected)) in fused.iter().zip(&reference) {
            let error = relative_error(fused, expected);
            assert!(
                error < 1e-5,
                "autodiff {}, weight trained {train_weight}: {name} off by {error}",
                device.is_autodiff()
            );
        }
    }
}
