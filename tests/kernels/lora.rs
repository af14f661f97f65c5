//! The quantized linear layer with a fused LoRA update (cubecl, forward and backward)
//! against burn's autodiff of the plain-burn reference: the weights dequantized with burn
//! ops, two matmuls for the update.

use burn::tensor::{Device, Tensor, TensorData};
use moera::kernels::{KernelPath, LoraUpdate, QuantLinear, with_kernel_path};

use crate::quant::sweep;
use crate::{gpu, pseudo_random, relative_error, values};

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

#[test]
fn fused_lora_linear_matches_the_reference_forward_and_backward_on_wgpu() {
    for device in [gpu(), gpu().autodiff()] {
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
