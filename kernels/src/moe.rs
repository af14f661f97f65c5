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

use crate::{KernelError, QuantLinear};

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

/// Tile sizes and regime thresholds of the dispatch kernels, process-wide
/// ([`set_moe_tiles`]; `MOERA_MOE_TILES=block_rows,threads` in the environment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeTiles {
    /// Sorted (token, k) slots per block of the grouped GEMM (1 to 32): every expert's
    /// segment is padded to a multiple of it, and each thread computes one output column
    /// for all of them, so one weight read feeds `block_rows` multiply-adds.
    pub block_rows: u32,
    /// Threads per cube of the one-thread-per-column kernels (a power of two, 32 to 1024).
    pub threads: u32,
    /// Up to this many tokens a GEMV runs per (token, expert) slot (decode).
    pub gemv_max_tokens: usize,
    /// The grouped GEMM runs only from this many slots per expert on average (below, its
    /// blocks would be mostly padding).
    pub gemm_min_rows_per_expert: usize,
}

impl MoeTiles {
    /// Measured on lavapipe (see BENCHMARKS.md); GPUs may prefer others.
    pub const DEFAULT: Self = Self {
        block_rows: 8,
        threads: 64,
        gemv_max_tokens: 4,
        gemm_min_rows_per_expert: 4,
    };

    fn check(self) -> Result<Self, KernelError> {
        if !(1..=32).contains(&self.block_rows)
            || !self.threads.is_power_of_two()
            || !(32..=1024).contains(&self.threads)
        {
            return Err(KernelError::Tiles(format!(
                "block_rows {} (1 to 32), threads {} (a power of two, 32 to 1024)",
                self.block_rows, self.threads
            )));
        }
        Ok(self)
    }
}

impl Default for MoeTiles {
    fn default() -> Self {
        Self::DEFAULT
    }
}

static TILES: std::sync::RwLock<Option<MoeTiles>> = std::sync::RwLock::new(None);

thread_local! {
    static THREAD_TILES: std::cell::Cell<Option<MoeTiles>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with this thread's dispatches on `tiles`, whatever the process-wide setting
/// (comparing tile sizes inside one process).
pub fn with_moe_tiles<R>(tiles: MoeTiles, f: impl FnOnce() -> R) -> Result<R, KernelError> {
    let tiles = tiles.check()?;
    let previous = THREAD_TILES.with(|t| t.replace(Some(tiles)));
    let result = f();
    THREAD_TILES.with(|t| t.set(previous));
    Ok(result)
}

/// Sets the dispatch kernels' tiles for the rest of the process.
pub fn set_moe_tiles(tiles: MoeTiles) -> Result<(), KernelError> {
    let tiles = tiles.check()?;
    *TILES.write().unwrap_or_else(|e| e.into_inner()) = Some(tiles);
    Ok(())
}

/// The tiles in use: as set by [`with_moe_tiles`] on this thread, else by
/// [`set_moe_tiles`], else from `MOERA_MOE_TILES` (`block_rows,threads`; ignored with a
/// warning when malformed), else [`MoeTiles::DEFAULT`].
pub fn moe_tiles() -> MoeTiles {
    if let Some(tiles) = THREAD_TILES.with(|t| t.get()) {
        return tiles;
    }
    if let Some(tiles) = *TILES.read().unwrap_or_else(|e| e.into_inner()) {
        return tiles;
    }
    let tiles = match std::env::var("MOERA_MOE_TILES") {
        Ok(value) => parse_tiles(&value).unwrap_or_else(|e| {
            tracing::warn!("MOERA_MOE_TILES={value}: {e}; using the defaults");
            MoeTiles::DEFAULT
        }),
        Err(_) => MoeTiles::DEFAULT,
    };
    *TILES.write().unwrap_or_else(|e| e.into_inner()) = Some(tiles);
    tiles
}

fn parse_tiles(value: &str) -> Result<MoeTiles, KernelError> {
    let numbers: Vec<u32> = value
        .split(',')
        .map(|n| n.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|e| KernelError::Tiles(format!("{e}")))?;
    let [block_rows, threads] = numbers[..] else {
        return Err(KernelError::Tiles("expected block_rows,threads".into()));
    };
    MoeTiles {
        block_rows,
        threads,
        ..MoeTiles::DEFAULT
    }
    .check()
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
            moe_tiles(),
        ))
    }
    #[cfg(not(feature = "cube"))]
    {
        let _ = (ids, weights, experts);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_parse_and_reject_bad_sizes() {
        let tiles = parse_tiles("16, 128").expect("valid");
        assert_eq!((tiles.block_rows, tiles.threads), (16, 128));
        assert_eq!(tiles.gemv_max_tokens, MoeTiles::DEFAULT.gemv_max_tokens);
        for bad in [
            "0,64", "33,64", "8,48", "8,16", "8,2048", "8", "8,64,1", "eight,64", "",
        ] {
            assert!(
                matches!(parse_tiles(bad), Err(KernelError::Tiles(_))),
                "{bad:?} accepted"
            );
        }
        let bad = MoeTiles {
            threads: 100,
            ..MoeTiles::DEFAULT
        };
        assert!(set_moe_tiles(bad).is_err());
        assert!(with_moe_tiles(bad, || ()).is_err());
        let inner = with_moe_tiles(tiles, moe_tiles).expect("valid");
        assert_eq!(inner, tiles);
    }
}
