//! The fused causal attention on flex (forward, and backward on an autodiff device) against
//! the composite attention of plain burn ops that the reference path runs: matmul, additive
//! mask, softmax, matmul, differentiated by burn's autodiff. The composite itself is checked
//! against transformers by the foundation tests.

use burn::tensor::{Device, Tensor, TensorData};
use moera::kernels::{CausalMask, KernelPath, fused_attention, with_kernel_path};
use moera::models::attention::{Mask, attend};

use crate::{pseudo_random, relative_error};

/// One attention problem: `[batch, heads, seq, head_dim]` queries over `start + seq` keys.
#[derive(Debug, Clone, Copy)]
struct Case {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq: usize,
    start: usize,
    head_dim: usize,
    value_dim: usize,
    window: Option<usize>,
}

const CASES: [Case; 6] = [
    // Training: a whole sequence, grouped heads, two query blocks (the second partial).
    Case {
        batch: 2,
        heads: 6,
        kv_heads: 2,
        seq: 70,
        start: 0,
        head_dim: 16,
        value_dim: 16,
        window: None,
    },
    // Prefill after cached positions, keys wider than values (DeepSeek's latent attention).
    Case {
        batch: 1,
        heads: 4,
        kv_heads: 4,
        seq: 9,
        start: 5,
        head_dim: 24,
        value_dim: 8,
        window: None,
    },
    // A sliding window shorter than the sequence (Mistral, GPT-OSS, Qwen3's sliding layers).
    Case {
        batch: 1,
        heads: 4,
        kv_heads: 1,
        seq: 150,
        start: 0,
        head_dim: 8,
        value_dim: 8,
        window: Some(20),
    },
    // One decoded position over a cache, with and without a window.
    Case {
        batch: 3,
        heads: 2,
        kv_heads: 1,
        seq: 1,
        start: 40,
        head_dim: 8,
        value_dim: 8,
        window: None,
    },
    Case {
        batch: 1,
        heads: 2,
        kv_heads: 2,
        seq: 1,
        start: 40,
        head_dim: 8,
        value_dim: 8,
        window: Some(7),
    },
    // Long enough that most key blocks lie above the diagonal.
    Case {
        batch: 1,
        heads: 3,
        kv_heads: 3,
        seq: 300,
        start: 0,
        head_dim: 32,
        value_dim: 32,
        window: None,
    },
];

/// The output and, on an autodiff device, the gradients of `Σ out ⊙ w` for q, k and v.
fn run(case: Case, device: &Device) -> Vec<(&'static str, Vec<f32>)> {
    let total = case.start + case.seq;
    let tensor = |seed: u64, shape: [usize; 4]| {
        let values = pseudo_random(seed, shape.iter().product());
        let t = Tensor::<4>::from_data(TensorData::new(values, shape), device).mul_scalar(2.0);
        if device.is_autodiff() {
            t.require_grad()
        } else {
            t
        }
    };
    let q = tensor(1, [case.batch, case.heads, case.seq, case.head_dim]);
    let k = tensor(2, [case.batch, case.kv_heads, total, case.head_dim]);
    let v = tensor(3, [case.batch, case.kv_heads, total, case.value_dim]);
    let mask = Mask {
        start: case.start,
        sliding_window: case.window,
    };
    let scale = 1.0 / (case.head_dim as f64).sqrt();
    let out = attend(q.clone(), k.clone(), v.clone(), scale, mask, None);
    let flat = |t: Tensor<4>| {
        t.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap()
    };
    let mut results = vec![("out", flat(out.clone()))];
    if device.is_autodiff() {
        let weights = Tensor::<4>::from_data(
            TensorData::new(pseudo_random(4, out.shape().num_elements()), out.dims()),
            device,
        );
        let grads = (out * weights).sum().backward();
        for (name, t) in [("∂q", &q), ("∂k", &k), ("∂v", &v)] {
            results.push((name, flat(t.grad(&grads).expect("a gradient"))));
        }
    }
    results
}

#[test]
fn fused_attention_matches_the_composite_forward_and_backward_on_flex() {
    for device in [Device::flex(), Device::flex().autodiff()] {
        for case in CASES {
            let fused = with_kernel_path(KernelPath::Fast, || run(case, &device));
            let reference = with_kernel_path(KernelPath::Reference, || run(case, &device));
            for ((name, fused), (_, expected)) in fused.iter().zip(&reference) {
                let error = relative_error(fused, expected);
                assert!(
                    error < 2e-5,
                    "{case:?}, autodiff {}: {name} off by {error}",
                    device.is_autodiff()
                );
            }
        }
    }
}

#[test]
fn the_fused_kernel_runs_where_it_should() {
    let q = |device: &Device| Tensor::<4>::ones([1, 2, 3, 4], device);
    let mask = CausalMask {
        start: 0,
        window: None,
    };
    let flex = Device::flex();
    let fused = |device: &Device| {
        let t = q(device);
        fused_attention(&t, &t, &t, 0.5, mask).is_some()
    };
    assert!(with_kernel_path(KernelPath::Fast, || fused(&flex)));
    assert!(with_kernel_path(KernelPath::Fast, || fused(
        &flex.clone().autodiff()
    )));
    assert!(!with_kernel_path(KernelPath::Reference, || fused(&flex)));
    // Heads that are no multiple of the key/value heads are left to the caller.
    let keys = Tensor::<4>::ones([1, 3, 3, 4], &flex);
    let queries = q(&flex);
    assert!(fused_attention(&queries, &keys, &keys, 0.5, mask).is_none());
}
