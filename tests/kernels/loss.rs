//! The fused output layer + cross-entropy on flex against the same loss written in burn ops
//! (matmul, log-softmax, gather, weighted sum) and differentiated by burn's autodiff.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use moera::kernels::{KernelPath, fused_linear_cross_entropy, with_kernel_path};

use crate::{pseudo_random, relative_error, values};

const ROWS: usize = 300; // two row blocks of the kernel, the second partial
const HIDDEN: usize = 24;
const VOCAB: usize = 1000;

/// The loss and, on an autodiff device, the gradients of `x` and the weight. With
/// `transposed` the weight is the transposed view of a `[vocab, hidden]` matrix (as a
/// decoded quantized head is).
fn run(device: &Device, fused: bool, transposed: bool) -> Vec<(&'static str, Vec<f32>)> {
    let leaf = |seed: u64, shape: [usize; 2]| {
        let values = pseudo_random(seed, shape[0] * shape[1]);
        let t = Tensor::<2>::from_data(TensorData::new(values, shape), device).mul_scalar(3.0);
        if device.is_autodiff() {
            t.require_grad()
        } else {
            t
        }
    };
    let x = leaf(1, [ROWS, HIDDEN]);
    let stored = match transposed {
        true => leaf(2, [VOCAB, HIDDEN]),
        false => leaf(2, [HIDDEN, VOCAB]),
    };
    let weight = match transposed {
        true => stored.clone().transpose(),
        false => stored.clone(),
    };
    let targets: Vec<u32> = (0..ROWS).map(|r| ((r * 7919) % VOCAB) as u32).collect();
    // Every fifth row unscored, the others sharing the mean.
    let scored = (0..ROWS).filter(|r| r % 5 != 0).count() as f32;
    let row_weights: Vec<f32> = (0..ROWS)
        .map(|r| if r % 5 == 0 { 0.0 } else { 1.0 / scored })
        .collect();
    let loss = if fused {
        with_kernel_path(KernelPath::Fast, || {
            fused_linear_cross_entropy(&x, &weight, &targets, &row_weights)
        })
        .expect("flex runs the fused loss")
    } else {
        let ids: Vec<i64> = targets.iter().map(|&t| i64::from(t)).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [ROWS, 1]), device);
        let w = Tensor::<1>::from_data(TensorData::new(row_weights, [ROWS]), device);
        let picked = log_softmax(x.clone().matmul(weight.clone()), 1).gather(1, ids);
        (picked.reshape([ROWS]) * w).sum().neg()
    };
    let mut out = vec![(
        "loss",
        loss.clone()
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap(),
    )];
    if device.is_autodiff() {
        // A large upstream gradient, so errors are not lost under `relative_error`'s floor of 1.
        let grads = loss.mul_scalar(500.0).backward();
        out.push(("∂x", values(x.grad(&grads).expect("a gradient"))));
        out.push(("∂W", values(stored.grad(&grads).expect("a gradient"))));
    }
    out
}

#[test]
fn fused_cross_entropy_matches_burn_ops_forward_and_backward_on_flex() {
    for device in [Device::flex(), Device::flex().autodiff()] {
        for transposed in [false, true] {
            let fused = run(&device, true, transposed);
            let reference = run(&device, false, transposed);
            for ((name, fused), (_, expected)) in fused.iter().zip(&reference) {
                let error = relative_error(fused, expected);
                assert!(
                    error < 1e-5,
                    "autodiff {}, transposed {transposed}: {name} off by {error}",
                    device.is_autodiff()
                );
            }
        }
    }
}

#[test]
fn the_fused_loss_refuses_what_it_cannot_take() {
    let device = Device::flex();
    let x = Tensor::<2>::zeros([2, 3], &device);
    let weight = Tensor::<2>::zeros([3, 4], &device);
    // A target outside the vocabulary, a length mismatch, the reference path.
    assert!(fused_linear_cross_entropy(&x, &weight, &[1, 4], &[1.0, 1.0]).is_none());
    assert!(fused_linear_cross_entropy(&x, &weight, &[1], &[1.0]).is_none());
    let reference = with_kernel_path(KernelPath::Reference, || {
        fused_linear_cross_entropy(&x, &weight, &[1, 2], &[1.0, 1.0])
    });
    assert!(reference.is_none());
}
