//! Mixture-of-experts kernels: fused top-k routing and the sparse expert dispatch.
//!
//! Both run as cubecl kernels on cube devices (wgpu, cuda) and keep everything on the
//! device: routing writes ids and weights, a counting sort (histogram → padded prefix sum
//! → stable scatter) groups the (token, k) slots by expert into tile-padded segments, and
//! grouped GEMMs run each expert on its segment, gathering token rows in their prologue,
//! fusing gate/up with the activation, and applying the routing weight in the down
//! projection's epilogue; a sum over k finishes. A few tokens (decode) take a GEMV per
//! slot instead. Elsewhere [`route`] and [`dispatch`] return `None` and the caller runs its
//! plain-burn reference (moera-models' `RouterSpec::route_token` and
//! `Experts::forward_sparse`).

use burn::tensor::{Int, Tensor};

use crate::QuantLinear;

/// How router logits become expert ids and weights.
#[derive(Debug, Clone, PartialEq)]
pub enum RoutingMethod {
    /// softmax → top-k, optionally renormalized to sum to one (Mixtral, Qwen-MoE, OLMoE).
    SoftmaxTopK { normalize: bool },
    /// softmax → top-k, with `groups` = (`n_group`, `topk_group`) first keeping only the
    /// experts of the best groups by their highest score (DeepSeek-V2 greedy and
    /// group-limited greedy).
    SoftmaxGroupLimited { groups: Option<(usize, usize)> },
    /// sigmoid, plus a per-expert correction bias for the choice only; groups ranked by the
    /// sum of their two best biased scores; the unbiased scores of the chosen experts are the
    /// weights, optionally renormalized (DeepSeek-V3).
    SigmoidGroupLimited {
        groups: (usize, usize),
        normalize: bool,
        correction_bias: Vec<f32>,
    },
    /// top-k over the raw logits, then softmax over the k chosen (GPT-OSS).
    TopKSoftmax,
}

/// The gated activation of the experts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExpertActivation {
    /// `silu(gate) · up`.
    SwiGlu,
    /// GPT-OSS: `gate` clamped above at `limit`, `up` to `±limit`, then
    /// `(up + 1) · gate · sigmoid(alpha · gate)`.
    ClampedSwiGlu { alpha: f32, limit: f32 },
}

/// One projection of every expert of a layer, stacked.
// Built per call from the model's parameters and dropped after it: not worth boxing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum ExpertMatrix {
    /// f32, input-major `[E, in, out]`: gate/up `[E, H, 2I]` (gate in columns `..I`, up in
    /// `I..`), down `[E, I, H]`.
    Dense(Tensor<3>),
    /// Quantized in HF layout `[E·out, in]`, expert `e` in rows `e·out..(e + 1)·out`:
    /// gate/up `[E·2I, H]` (each expert's gate rows, then its up rows), down `[E·H, I]`.
    /// The kernels decode the codes where they read them.
    Quantized(QuantLinear),
}

impl ExpertMatrix {
    /// Expert `expert`'s projection of its rows `x` `[n, in]` to `[n, out]`.
    pub fn forward_expert(&self, expert: usize, x: Tensor<2>, out: usize) -> Tensor<2> {
        match self {
            Self::Dense(weights) => {
                let [_, input, _] = weights.dims();
                x.matmul(weights.clone().narrow(0, expert, 1).reshape([input, out]))
            }
            Self::Quantized(linear) => linear.forward_rows(x, expert * out..(expert + 1) * out),
        }
    }

    /// Bytes of weights held on the device (f32 values, or codes, scales and offsets).
    pub fn memory_bytes(&self) -> usize {
        match self {
            Self::Dense(weights) => 4 * weights.shape().num_elements(),
            Self::Quantized(linear) => linear.memory_bytes(),
        }
    }
}

/// One layer's routed experts: `gate_up` and `down` (see [`ExpertMatrix`]), optional biases
/// `[E, 2I]` / `[E, H]`.
#[derive(Debug, Clone)]
pub struct StackedExperts {
    pub gate_up: ExpertMatrix,
    pub gate_up_bias: Option<Tensor<2>>,
    pub down: ExpertMatrix,
    pub down_bias: Option<Tensor<2>>,
    pub activation: ExpertActivation,
}

impl StackedExperts {
    /// The number of experts `E`.
    pub fn num_experts(&self) -> usize {
        match (&self.gate_up, &self.down) {
            (ExpertMatrix::Dense(w), _) | (_, ExpertMatrix::Dense(w)) => w.dims()[0],
            (ExpertMatrix::Quantized(gate_up), ExpertMatrix::Quantized(down)) => {
                // gate/up `[E·2I, H]`, down `[E·H, I]`.
                let [_, hidden] = gate_up.dims();
                down.dims()[0] / hidden
            }
        }
    }

    /// The intermediate size `I` of each expert.
    pub fn intermediate(&self) -> usize {
        match &self.down {
            ExpertMatrix::Dense(w) => w.dims()[1],
            ExpertMatrix::Quantized(down) => down.dims()[1],
        }
    }
}

/// Groups the routing kernel keeps as a bit mask.
#[cfg(feature = "cube")]
const MAX_GROUPS: usize = 32;

/// Whether [`route`] and [`dispatch`] run kernels for tensors on `device`: a cube device
/// on the fast [`KernelPath`](crate::KernelPath).
pub fn fused_on(device: &burn::tensor::Device) -> bool {
    #[cfg(feature = "cube")]
    if crate::executor(device) == crate::Executor::Cube {
        return true;
    }
    let _ = device;
    false
}

/// Routes router logits `[tokens, experts]` in one launch: chosen ids `[tokens, top_k]`
/// (best first, ties to the lower index) and their weights (renormalized as `method` says,
/// times `scale`). `device_bias` is the sigmoid method's correction bias already on the
/// device (kept by the caller so it is not uploaded per call); without it the bias is
/// uploaded from `method`. `None` where no kernel runs (see [`fused_on`]) or the method
/// keeps more than 32 groups.
pub fn route(
    logits: Tensor<2>,
    method: &RoutingMethod,
    top_k: usize,
    scale: f32,
    device_bias: Option<&Tensor<1>>,
) -> Option<(Tensor<2, Int>, Tensor<2>)> {
    if !fused_on(&logits.device()) {
        return None;
    }
    let [tokens, _] = logits.dims();
    if tokens == 0 {
        let device = logits.device();
        return Some((
            Tensor::zeros([0, top_k], &device),
            Tensor::zeros([0, top_k], &device),
        ));
    }
    #[cfg(feature = "cube")]
    {
        use crate::cube::moe as codes;
        let device = logits.device();
        let (code, groups, normalize, bias) = match method {
            RoutingMethod::SoftmaxTopK { normalize } => {
                (codes::SOFTMAX_TOP_K, (1, 1), *normalize, None)
            }
            RoutingMethod::SoftmaxGroupLimited { groups } => {
                (codes::SOFTMAX_GROUPS, groups.unwrap_or((1, 1)), false, None)
            }
            RoutingMethod::SigmoidGroupLimited {
                groups,
                normalize,
                correction_bias,
            } => {
                let bias = device_bias
                    .cloned()
                    .unwrap_or_else(|| Tensor::<1>::from_data(correction_bias.as_slice(), &device));
                (codes::SIGMOID_GROUPS, *groups, *normalize, Some(bias))
            }
            RoutingMethod::TopKSoftmax => (codes::TOP_K_SOFTMAX, (1, 1), false, None),
        };
        if groups.0 > MAX_GROUPS {
            return None;
        }
        let groups = (groups.0 as u32, groups.1 as u32);
        Some(crate::cube::moe_route(
            logits, bias, top_k, groups, scale, code, normalize,
        ))
    }
    #[cfg(not(feature = "cube"))]
    {
        let _ = (method, top_k, scale, device_bias);
        None
    }
}

/// The routed experts on token rows `x` `[tokens, H]` given the routing `ids`/`weights`
/// `[tokens, top_k]`: `Σ_k weight · expert(x)`, computed only for the chosen experts, all
/// on the device. `None` where no kernel runs (see [`fused_on`]).
pub fn dispatch(
    x: Tensor<2>,
    ids: Tensor<2, Int>,
    weights: Tensor<2>,
    experts: &StackedExperts,
) -> Option<Tensor<2>> {
    if !fused_on(&x.device()) {
        return None;
    }
    let [tokens, hidden] = x.dims();
    if tokens == 0 {
        return Some(Tensor::zeros([0, hidden], &x.device()));
    }
    #[cfg(feature = "cube")]
    {
        Some(crate::cube::moe_experts(
            x,
            ids,
            weights,
            experts,
            [experts.num_experts(), experts.intermediate()],
        ))
    }
    #[cfg(not(feature = "cube"))]
    {
        let _ = (ids, weights, experts);
        None
    }
}
