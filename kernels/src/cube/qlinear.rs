//! The quantized linear layer as one differentiable operation on the cube backends: the
//! dequant-matmul kernels with a LoRA update fused into their epilogue, forward and
//! backward, so LoRA trains on a quantized base (QLoRA-style) without an f32 copy of it.
//!
//! With `y = x·Wᵀ + s·(x̃·A)·B` (`x̃` the adapter's input, `x` after dropout) and `g = ∂y·Bᵀ`:
//! `∂x = ∂y·W` (+ `s·g·Aᵀ` when `x̃` is `x`, in the same kernel's epilogue),
//! `∂x̃ = s·g·Aᵀ`, `∂A = s·x̃ᵀ·g`, `∂B = s·(x̃·A)ᵀ·∂y`. `W` gets no gradient: it is frozen.

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Backend, Cube, Dispatch, backend_extension};
use burn::tensor::Tensor;
use burn_cubecl::tensor::CubeTensor;

use super::KernelOps;
use crate::linear::{DeviceWeights, LoraUpdate};

/// The differentiable quantized linear layer.
#[backend_extension(Cube, Autodiff)]
pub trait QuantLinearOps: burn::backend::Backend {
    /// `x` `[m, k]` times the transposed quantized `[n, k]` matrix; with `has_lora`, plus
    /// `lora_scale · (lora_x·a)·b` (`lora_x` `[m, k]`, `a` `[k, r]`, `b` `[r, n]`; otherwise
    /// they are not read). Gradients reach `x`, `lora_x`, `a` and `b`; `same_input` says
    /// `lora_x` is `x` (one fused input gradient).
    #[allow(clippy::too_many_arguments)]
    fn quant_linear(
        x: FloatTensor<Self>,
        lora_x: FloatTensor<Self>,
        codes: IntTensor<Self>,
        scales: FloatTensor<Self>,
        offsets: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        lora_scale: f32,
        bits: u32,
        group: usize,
        has_offsets: bool,
        has_lora: bool,
        same_input: bool,
    ) -> FloatTensor<Self>;
}

impl QuantLinearOps for Cube {
    fn quant_linear(
        x: CubeTensor,
        lora_x: CubeTensor,
        codes: CubeTensor,
        scales: CubeTensor,
        offsets: CubeTensor,
        a: CubeTensor,
        b: CubeTensor,
        lora_scale: f32,
        bits: u32,
        group: usize,
        has_offsets: bool,
        has_lora: bool,
        _same_input: bool,
    ) -> CubeTensor {
        let down = if has_lora {
            Cube::float_matmul(lora_x, a)
        } else {
            x.clone()
        };
        Cube::quant_matmul(
            x,
            codes,
            scales,
            offsets,
            down,
            b,
            lora_scale,
            bits,
            group,
            has_offsets,
            has_lora,
        )
    }
}

/// The frozen quantized matrix, kept for the backward pass.
#[derive(Debug, Clone)]
struct Frozen<B: Backend> {
    codes: IntTensor<B>,
    scales: FloatTensor<B>,
    offsets: FloatTensor<B>,
    bits: u32,
    group: usize,
    has_offsets: bool,
}

impl<B: Backend + KernelOps> Frozen<B> {
    /// `dy·W`, plus `scale · down · up` when given.
    fn input_gradient(
        &self,
        dy: FloatTensor<B>,
        lora: Option<(FloatTensor<B>, FloatTensor<B>, f32)>,
    ) -> FloatTensor<B> {
        let has_lora = lora.is_some();
        let (down, up, scale) = lora.unwrap_or_else(|| (dy.clone(), dy.clone(), 0.0));
        B::quant_matmul_t(
            dy,
            self.codes.clone(),
            self.scales.clone(),
            self.offsets.clone(),
            down,
            up,
            scale,
            self.bits,
            self.group,
            self.has_offsets,
            has_lora,
        )
    }
}

/// What the adapter's gradients need.
#[derive(Debug, Clone)]
struct Adapter<B: Backend> {
    input: FloatTensor<B>,
    /// `input · a`, from the forward pass.
    down: FloatTensor<B>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    scale: f32,
    /// The adapter reads the layer's own input (no dropout): one fused input gradient.
    same_input: bool,
}

#[derive(Debug)]
struct QuantLinearBackward;

impl<B: Backend + KernelOps> Backward<B, 4> for QuantLinearBackward {
    type State = (Frozen<B>, Option<Adapter<B>>);

    fn backward(
        self,
        ops: Ops<Self::State, 4>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_lora_x, node_a, node_b] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (frozen, adapter) = ops.state;
        let Some(adapter) = adapter else {
            if let Some(node) = node_x {
                grads.register::<B>(node.id, frozen.input_gradient(dy, None));
            }
            return;
        };
        let scale = adapter.scale;
        let scaled = |t: FloatTensor<B>| B::float_mul_scalar(t, (scale as f64).into());
        let g = B::float_matmul(dy.clone(), B::float_transpose(adapter.b));
        if let Some(node) = node_b {
            let down_t = B::float_transpose(adapter.down);
            grads.register::<B>(node.id, scaled(B::float_matmul(down_t, dy.clone())));
        }
        if let Some(node) = node_a {
            let input_t = B::float_transpose(adapter.input);
            grads.register::<B>(node.id, scaled(B::float_matmul(input_t, g.clone())));
        }
        let a_t = B::float_transpose(adapter.a);
        if adapter.same_input {
            if let Some(node) = node_x {
                let dx = frozen.input_gradient(dy, Some((g, a_t, scale)));
                grads.register::<B>(node.id, dx);
            }
            return;
        }
        if let Some(node) = node_x {
            grads.register::<B>(node.id, frozen.input_gradient(dy, None));
        }
        if let Some(node) = node_lora_x {
            grads.register::<B>(node.id, scaled(B::float_matmul(g, a_t)));
        }
    }
}

impl<B: Backend + KernelOps, C: CheckpointStrategy> QuantLinearOps for Autodiff<B, C> {
    fn quant_linear(
        x: FloatTensor<Self>,
        lora_x: FloatTensor<Self>,
        codes: IntTensor<Self>,
        scales: FloatTensor<Self>,
        offsets: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        lora_scale: f32,
        bits: u32,
        group: usize,
        has_offsets: bool,
        has_lora: bool,
        same_input: bool,
    ) -> FloatTensor<Self> {
        let guards = [x.node(), lora_x.node(), a.node(), b.node()];
        let frozen = Frozen::<B> {
            codes,
            scales: scales.into_primitive(),
            offsets: offsets.into_primitive(),
            bits,
            group,
            has_offsets,
        };
        let x = x.into_primitive();
        let adapter: Option<Adapter<B>> = has_lora.then(|| {
            let input = lora_x.into_primitive();
            let a = a.into_primitive();
            Adapter {
                down: B::float_matmul(input.clone(), a.clone()),
                input,
                a,
                b: b.into_primitive(),
                scale: lora_scale,
                same_input,
            }
        });
        let y = {
            let (down, up) = match &adapter {
                Some(adapter) => (adapter.down.clone(), adapter.b.clone()),
                None => (x.clone(), x.clone()),
            };
            B::quant_matmul(
                x,
                frozen.codes.clone(),
                frozen.scales.clone(),
                frozen.offsets.clone(),
                down,
                up,
                lora_scale,
                bits,
                group,
                has_offsets,
                has_lora,
            )
        };
        match QuantLinearBackward
            .prepare::<C>(guards)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((frozen, adapter), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }
}

/// [`QuantLinearOps::quant_linear`] on burn tensors: `x` `[m, k]` → `[m, n]`.
pub fn quant_linear(
    x: Tensor<2>,
    lora: Option<LoraUpdate<2>>,
    weights: &DeviceWeights,
    bits: u32,
    group: usize,
    has_offsets: bool,
) -> Tensor<2> {
    let has_lora = lora.is_some();
    let same_input = lora.as_ref().is_none_or(|update| update.input.is_none());
    // Without an adapter `x` stands in for its operands (never read, no allocation).
    let (input, a, b, scale) = match lora {
        Some(update) => {
            let input = update.input.unwrap_or_else(|| x.clone());
            (input, update.a, update.b, update.scale)
        }
        None => (x.clone(), x.clone(), x.clone(), 0.0),
    };
    let out = <Dispatch as QuantLinearOps>::quant_linear(
        x.into_dispatch(),
        input.into_dispatch(),
        weights.codes.clone().into_dispatch(),
        weights.scales.clone().into_dispatch(),
        weights.offsets.clone().into_dispatch(),
        a.into_dispatch(),
        b.into_dispatch(),
        scale,
        bits,
        group,
        has_offsets,
        has_lora,
        same_input,
    );
    Tensor::from_dispatch(out)
}
