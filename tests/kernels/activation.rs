//! The fused gated activation `silu(gate)·up` on flex against burn's `silu` and product,
//! forward and backward.

use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor, TensorData};
use moera::kernels::{KernelPath, swiglu, with_kernel_path};

use crate::{pseudo_random, relative_error, values};

/// The output and, on an autodiff device, the gradients of `Σ out ⊙ w` for both inputs.
fn run(device: &Device, fused: bool) -> Vec<(&'static str, Vec<f32>)> {
    // Two rayon chunks of the kernel (2¹⁴ values each) and a partial third; values up to
    // ±12 reach both tails of σ.
    let shape = [37, 1000];
    let tensor = |seed: u64| {
        let values = pseudo_random(seed, shape[0] * shape[1]);
        Tensor::<2>::from_data(TensorData::new(values, shape), device).mul_scalar(12.0)
    };
    let leaf = |seed: u64| match device.is_autodiff() {
        true => tensor(seed).require_grad(),
        false => tensor(seed),
    };
    let (gate, up) = (leaf(1), leaf(2));
    let out = match fused {
        true => with_kernel_path(KernelPath::Fast, || swiglu(gate.clone(), up.clone())),
        false => silu(gate.clone()) * up.clone(),
    };
    let mut results = vec![("out", values(out.clone()))];
    if device.is_autodiff() {
        let grads = (out * tensor(3)).sum().backward();
        results.push(("∂gate", values(gate.grad(&grads).expect("a gradient"))));
        results.push(("∂up", values(up.grad(&grads).expect("a gradient"))));
    }
    results
}

#[test]
fn fused_swiglu_matches_burn_ops_forward_and_backward_on_flex() {
    for device in [Device::flex(), Device::flex().autodiff()] {
        let fused = run(&device, true);
        let reference = run(&device, false);
        assert_eq!(fused.len(), reference.len());
        for ((name, fused), (_, expected)) in fused.iter().zip(&reference) {
            let error = relative_error(fused, expected);
            assert!(
                error < 1e-6,
                "autodiff {}: {name} off by {error}",
                device.is_autodiff()
            );
        }
    }
}
