//! The linear layer with a fused LoRA update (forward and backward) against burn's autodiff
//! of the plain-burn reference (two matmuls for the update, added): on a quantized base
//! (cubecl on the GPU, the decoded weights on flex) and on an f32 base (flex).

use burn::tensor::{Device, Tensor, TensorData};
use moera::kernels::{
    KernelPath, LoraUpdate, QuantLinear, fused_linear, fused_lora_linear, with_kernel_path,
};

use crate::quant::sweep;
use crate::{pseudo_random, relative_error, values};

const RANK: usize = 4;
const LORA_SCALE: f32 = 0.75;

/// How the adapter is attached.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Adapter {
    /// The frozen base alone: only `x` gets a gradient.
    None,
    /// The adapter reads `x` itself (no dropout): one fused input gradient.
    SameInput,
    /// The adapter reads another tensor (as after dropout): separate input gradients.
    OwnInput,
}

/// `y` and the gradients of `Σ y ⊙ w` with respect to every input that has one.
fn forward_backward(
    linear: &QuantLinear,
    device: &Device,
    tokens: usize,
    adapter: Adapter,
) -> Vec<(&'static str, Vec<f32>)> {
    let [rows, cols] = linear.dims();
    let tensor = |seed: u64, shape: [usize; 2]| {
        let values = pseudo_random(seed, shape[0] * shape[1]);
        Tensor::<2>::from_data(TensorData::new(values, shape), device)
    };
    let leaf = |seed: u64, shape: [usize; 2]| match device.is_autodiff() {
        true => tensor(seed, shape).require_grad(),
        false => tensor(seed, shape),
    };
    let x = leaf(1, [tokens, cols]);
    let a = leaf(2, [cols, RANK]);
    let b = leaf(3, [RANK, rows]);
    let own_input = leaf(4, [tokens, cols]);
    let update = |input: Option<&Tensor<2>>| LoraUpdate {
        input: input.cloned(),
        a: a.clone(),
        b: b.clone(),
        scale: LORA_SCALE,
    };
    let lora = match adapter {
        Adapter::None => None,
        Adapter::SameInput => Some(update(None)),
        Adapter::OwnInput => Some(update(Some(&own_input))),
    };
    let y = linear.forward_with_lora(x.clone(), lora);
    let mut out = vec![("y", values(y.clone()))];
    if !device.is_autodiff() {
        return out;
    }
    let grads = (y * tensor(5, [tokens, rows])).sum().backward();
    let grad = |t: &Tensor<2>| values(t.grad(&grads).expect("a gradient"));
    out.push(("∂x", grad(&x)));
    if adapter != Adapter::None {
        out.push(("∂A", grad(&a)));
        out.push(("∂B", grad(&b)));
    }
    if adapter == Adapter::OwnInput {
        out.push(("∂input", grad(&own_input)));
    }
    out
}

/// The devices with a fused LoRA kernel: flex, and the GPU where built.
fn devices() -> Vec<Device> {
    let mut devices = vec![Device::flex(), Device::flex().autodiff()];
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    devices.extend([crate::gpu(), crate::gpu().autodiff()]);
    devices
}

#[test]
fn fused_lora_linear_matches_the_reference_forward_and_backward() {
    for device in devices() {
        for matrix in sweep() {
            let (format, rows, cols) = (matrix.format, matrix.rows, matrix.cols);
            let linear = QuantLinear::new(matrix, &device);
            // 3 tokens: the GEMV kernel forward; 37: the tiled GEMM (backward is always tiled).
            for tokens in [3, 37] {
                for adapter in [Adapter::None, Adapter::SameInput, Adapter::OwnInput] {
                    let run = |path| {
                        with_kernel_path(path, || {
                            forward_backward(&linear, &device, tokens, adapter)
                        })
                    };
                    let fused = run(KernelPath::Fast);
                    let reference = run(KernelPath::Reference);
                    for ((name, fused), (_, expected)) in fused.iter().zip(&reference) {
                        let error = relative_error(fused, expected);
                        assert!(
                            error < 1e-5,
                            "{format} [{rows}, {cols}], {tokens} tokens, {adapter:?}, \
                             autodiff {}: {name} off by {error}",
                            device.is_autodiff()
                        );
                    }
                }
            }
        }
    }
}

/// An f32 base: `y = x·W + s·(x·A)·B` (or `x·W` alone without `adapter`) and the gradients
/// of `Σ y ⊙ w`, through the fused kernel or burn's ops. `W` is trained too with
/// `train_weight`, and with `transposed` it is the transposed view of a `[out, in]` matrix
/// (as a decoded quantized weight is).
fn dense(
    device: &Device,
    fused: bool,
    adapter: bool,
    train_weight: bool,
    transposed: bool,
) -> Vec<(&'static str, Vec<f32>)> {
    const TOKENS: usize = 37;
    const IN: usize = 48;
    const OUT: usize = 70;
    let tensor = |seed: u64, shape: [usize; 2]| {
        let values = pseudo_random(seed, shape[0] * shape[1]);
        Tensor::<2>::from_data(TensorData::new(values, shape), device)
    };
    let leaf = |seed: u64, shape: [usize; 2], train: bool| match device.is_autodiff() && train {
        true => tensor(seed, shape).require_grad(),
        false => tensor(seed, shape),
    };
    let x = leaf(1, [TOKENS, IN], true);
    let stored = match transposed {
        true => leaf(2, [OUT, IN], train_weight),
        false => leaf(2, [IN, OUT], train_weight),
    };
    let weight = match transposed {
        true => stored.clone().transpose(),
        false => stored.clone(),
    };
    let update = LoraUpdate {
        input: None,
        a: leaf(3, [IN, RANK], true),
        b: leaf(4, [RANK, OUT], true),
        scale: LORA_SCALE,
    };
    let y = match (fused, adapter) {
        (true, true) => fused_lora_linear(&x, &weight, &update),
        (true, false) => fused_linear(&x, &weight),
        (false, true) => Some(x.clone().matmul(weight.clone()) + update.clone().apply(x.clone())),
        (false, false) => Some(x.clone().matmul(weight.clone())),
    }
    .expect("flex runs the fused linear layers");
    let mut out = vec![("y", values(y.clone()))];
    if device.is_autodiff() {
        let grads = (y * tensor(5, [TOKENS, OUT])).sum().backward();
        let grad = |t: &Tensor<2>| values(t.grad(&grads).expect("a gradient"));
        out.push(("∂x", grad(&x)));
        if adapter {
            out.push(("∂A", grad(&update.a)));
            out.push(("∂B", grad(&update.b)));
        }
        if train_weight {
            out.push(("∂W", grad(&stored)));
        }
    }
    out
}

#[test]
fn fused_linear_layers_on_an_f32_base_match_burn_ops_on_flex() {
    for device in [Device::flex(), Device::flex().autodiff()] {
        for adapter in [true, false] {
            for train_weight in [false, true] {
                for transposed in [false, true] {
                    let run = |fused| dense(&device, fused, adapter, train_weight, transposed);
                    let (fused, reference) = (run(true), run(false));
                    assert_eq!(fused.len(), reference.len());
                    for ((name, fused), (_, expected)) in fused.iter().zip(&reference) {
                        let error = relative_error(fused, expected);
                        assert!(
                            error < 1e-5,
                            "autodiff {}, adapter {adapter}, W trained {train_weight}, \
                             transposed {transposed}: {name} off by {error}",
                            device.is_autodiff()
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn fused_lora_linear_declines_what_it_does_not_run() {
    let device = Device::flex();
    let tensor = |shape: [usize; 2]| Tensor::<2>::ones(shape, &device);
    let update = |input: Option<Tensor<2>>, b_rows: usize| LoraUpdate {
        input,
        a: tensor([8, 2]),
        b: tensor([b_rows, 5]),
        scale: 1.0,
    };
    let (x, weight) = (tensor([3, 8]), tensor([8, 5]));
    assert!(fused_lora_linear(&x, &weight, &update(None, 2)).is_some());
    // Dropout (the adapter's own input), mismatched ranks, the reference path.
    assert!(fused_lora_linear(&x, &weight, &update(Some(x.clone()), 2)).is_none());
    assert!(fused_lora_linear(&x, &weight, &update(None, 3)).is_none());
    let reference = with_kernel_path(KernelPath::Reference, || {
        fused_lora_linear(&x, &weight, &update(None, 2))
    });
    assert!(reference.is_none());
}
