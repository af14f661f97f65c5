//! The cubecl kernels, reached from burn tensors through a backend extension.

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Cube, Dispatch, DispatchDevice, ExtensionType, backend_extension};
use burn::tensor::{DType, Device, Int, IntDType, Tensor};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

pub mod moe;
mod qlinear;
mod qmatmul;

pub use qlinear::quant_linear;

/// Whether `device` runs on a cubecl runtime (wgpu, cuda).
pub fn is_cube(device: &Device) -> bool {
    matches!(device.as_dispatch(), DispatchDevice::Cube(_))
}

/// Whether `device` is an autodiff device over a cubecl runtime: only the differentiable
/// kernels ([`quant_linear`]) run there; the others take the CPU backends' path.
pub fn is_autodiff_cube(device: &Device) -> bool {
    match device.as_dispatch() {
        DispatchDevice::Autodiff(inner) => matches!(**inner, DispatchDevice::Cube(_)),
        _ => false,
    }
}

/// The operations moera implements as cubecl kernels.
#[backend_extension(Cube)]
pub trait KernelOps: burn::backend::Backend {
    /// `x` `[m, k]` times the transposed quantized `[n, k]` matrix given by its packed
    /// `codes`, `scales` `[n, k / group]` and `offsets` (same shape); with `has_lora`, plus
    /// `lora_scale · down · up` (`down` `[m, r]`, `up` `[r, n]`; otherwise not read).
    #[allow(clippy::too_many_arguments)]
    fn quant_matmul(
        x: FloatTensor<Self>,
        codes: IntTensor<Self>,
        scales: FloatTensor<Self>,
        offsets: FloatTensor<Self>,
        down: FloatTensor<Self>,
        up: FloatTensor<Self>,
        lora_scale: f32,
        bits: u32,
        group: usize,
        has_offsets: bool,
        has_lora: bool,
    ) -> FloatTensor<Self>;

    /// `dy` `[m, n]` times the quantized `[n, k]` matrix (the input gradient of
    /// [`quant_matmul`](KernelOps::quant_matmul)); with `has_lora`, plus
    /// `lora_scale · down · up` (`down` `[m, r]`, `up` `[r, k]`).
    #[allow(clippy::too_many_arguments)]
    fn quant_matmul_t(
        dy: FloatTensor<Self>,
        codes: IntTensor<Self>,
        scales: FloatTensor<Self>,
        offsets: FloatTensor<Self>,
        down: FloatTensor<Self>,
        up: FloatTensor<Self>,
        lora_scale: f32,
        bits: u32,
        group: usize,
        has_offsets: bool,
        has_lora: bool,
    ) -> FloatTensor<Self>;

    /// Routes each row of `logits` `[tokens, experts]`: ids `[tokens, top_k]` (u32 in i32
    /// storage) and weights. `method` is one of the `moe::*` method codes; `groups` is
    /// (`n_group`, `topk_group`), (1, 1) when the method has none; `correction_bias`
    /// `[experts]` is read by the sigmoid method only.
    fn moe_route(
        logits: FloatTensor<Self>,
        correction_bias: FloatTensor<Self>,
        top_k: usize,
        groups: (u32, u32),
        scale: f32,
        method: u32,
        normalize: bool,
    ) -> (IntTensor<Self>, FloatTensor<Self>);

    /// The routed experts on `x` `[tokens, H]`: returns each (token, k) slot's weighted
    /// output `[tokens · top_k, H]`, to be summed over k. The biases (`[E, 2I]`, `[E, H]`)
    /// are read only if `has_bias`; `activation` is `None` for SwiGLU, or GPT-OSS's
    /// (alpha, limit).
    #[allow(clippy::too_many_arguments)]
    fn moe_experts(
        x: FloatTensor<Self>,
        ids: IntTensor<Self>,
        weights: FloatTensor<Self>,
        #[extension_type] gate_up: ExpertWeights<Self>,
        gate_up_bias: FloatTensor<Self>,
        #[extension_type] down: ExpertWeights<Self>,
        down_bias: FloatTensor<Self>,
        experts_inter: (usize, usize),
        tiles: crate::moe::MoeTiles,
        has_bias: bool,
        activation: Option<(f32, f32)>,
    ) -> FloatTensor<Self>;
}

/// One stacked expert projection as the kernels read it (see `moe::ExpertMatrix`).
#[derive(ExtensionType)]
pub enum ExpertWeights<B: burn::backend::Backend> {
    /// f32 `[E, in, out]`.
    Dense(FloatTensor<B>),
    /// `[E·out, in]` as packed code words, `scales` / `offsets` `[E·out, in / group]`.
    Quantized {
        codes: IntTensor<B>,
        scales: FloatTensor<B>,
        offsets: FloatTensor<B>,
        bits: u32,
        group: u32,
        has_offsets: bool,
    },
}

impl ExpertWeights<Dispatch> {
    fn new(matrix: &crate::moe::ExpertMatrix) -> Self {
        match matrix {
            crate::moe::ExpertMatrix::Dense(weights) => {
                Self::Dense(weights.clone().into_dispatch())
            }
            crate::moe::ExpertMatrix::Quantized(linear) => {
                let weights = linear.device_weights();
                let format = linear.format();
                Self::Quantized {
                    codes: weights.codes.clone().into_dispatch(),
                    scales: weights.scales.clone().into_dispatch(),
                    offsets: weights.offsets.clone().into_dispatch(),
                    bits: format.code_bits(),
                    group: linear.group() as u32,
                    has_offsets: format.has_offsets(),
                }
            }
        }
    }
}

/// Up to this many tokens each output element gets its own reduction over `k` (decode);
/// above it, the tiled GEMM (prefill).
const GEMV_MAX_TOKENS: usize = 4;

/// A quantized matrix's buffers, checked for the dequant-matmul kernels.
struct QuantArgs {
    codes: CubeTensor,
    scales: CubeTensor,
    offsets: CubeTensor,
    group: u32,
}

impl QuantArgs {
    fn new(
        codes: CubeTensor,
        scales: CubeTensor,
        offsets: CubeTensor,
        bits: u32,
        group: usize,
        has_offsets: bool,
    ) -> Self {
        assert!(
            matches!(codes.dtype, DType::I32 | DType::U32),
            "quantized codes must be 32-bit words, found {:?}",
            codes.dtype
        );
        // The kernels read a word's codes with one scale: groups hold whole words.
        assert_eq!(group % (32 / bits as usize), 0, "group of whole code words");
        Self {
            codes,
            scales: into_contiguous(scales),
            offsets: if has_offsets {
                into_contiguous(offsets)
            } else {
                offsets
            },
            group: group as u32,
        }
    }
}

/// The LoRA epilogue's operands: `down` `[m, r]` and `up` `[r, cols]`, read only when
/// `has_lora` (otherwise whatever buffers were passed stand in, unread).
struct LoraArgs {
    down: CubeTensor,
    up: CubeTensor,
    rank: u32,
    scale: f32,
}

impl LoraArgs {
    fn new(down: CubeTensor, up: CubeTensor, scale: f32, has_lora: bool, cols: usize) -> Self {
        if !has_lora {
            return Self {
                down,
                up,
                rank: 0,
                scale: 0.0,
            };
        }
        assert_eq!(down.dtype, DType::F32, "LoRA operands are f32");
        let rank = up.meta.shape()[0];
        assert_eq!(up.meta.shape()[1], cols, "LoRA up-projection width");
        assert_eq!(down.meta.shape()[1], rank, "LoRA rank");
        Self {
            down: into_contiguous(down),
            up: into_contiguous(up),
            rank: rank as u32,
            scale,
        }
    }
}

impl KernelOps for Cube {
    fn quant_matmul(
        x: CubeTensor,
        codes: CubeTensor,
        scales: CubeTensor,
        offsets: CubeTensor,
        down: CubeTensor,
        up: CubeTensor,
        lora_scale: f32,
        bits: u32,
        group: usize,
        has_offsets: bool,
        has_lora: bool,
    ) -> CubeTensor {
        assert_eq!(
            x.dtype,
            DType::F32,
            "quantized matmul takes f32 activations"
        );
        let x = into_contiguous(x);
        let (m, k) = (x.meta.shape()[0], x.meta.shape()[1]);
        let n = scales.meta.shape()[0];
        let weights = QuantArgs::new(codes, scales, offsets, bits, group, has_offsets);
        let lora = LoraArgs::new(down, up, lora_scale, has_lora, n);
        let out = empty_device::<f32>(x.client.clone(), x.device.clone(), [m, n].into());
        let client = x.client.clone();
        let dims = (m as u32, n as u32, k as u32);
        if m <= GEMV_MAX_TOKENS || k % qmatmul::TILE_K as usize != 0 {
            let rows_per_cube = qmatmul::GEMV_ROWS as usize;
            let count = CubeCount::Static(n.div_ceil(rows_per_cube) as u32, m as u32, 1);
            let dim = CubeDim::new_2d(qmatmul::GEMV_LANES, qmatmul::GEMV_ROWS);
            unsafe {
                qmatmul::qgemv_kernel::launch_unchecked(
                    &client,
                    count,
                    dim,
                    x.into_buffer_arg(),
                    weights.codes.into_buffer_arg(),
                    weights.scales.into_buffer_arg(),
                    weights.offsets.into_buffer_arg(),
                    lora.down.into_buffer_arg(),
                    lora.up.into_buffer_arg(),
                    out.clone().into_buffer_arg(),
                    dims.0,
                    dims.1,
                    dims.2,
                    weights.group,
                    lora.rank,
                    lora.scale,
                    bits,
                    has_offsets,
                    has_lora,
                );
            }
        } else {
            let tile = qmatmul::TILE as usize;
            let count = CubeCount::Static(n.div_ceil(tile) as u32, m.div_ceil(tile) as u32, 1);
            let dim = CubeDim::new_2d(qmatmul::THREADS_SIDE, qmatmul::THREADS_SIDE);
            unsafe {
                qmatmul::qgemm_kernel::launch_unchecked(
                    &client,
                    count,
                    dim,
                    x.into_buffer_arg(),
                    weights.codes.into_buffer_arg(),
                    weights.scales.into_buffer_arg(),
                    weights.offsets.into_buffer_arg(),
                    lora.down.into_buffer_arg(),
                    lora.up.into_buffer_arg(),
                    out.clone().into_buffer_arg(),
                    dims.0,
                    dims.1,
                    dims.2,
                    weights.group,
                    lora.rank,
                    lora.scale,
                    bits,
                    has_offsets,
                    has_lora,
                );
            }
        }
        out
    }

    fn quant_matmul_t(
        dy: CubeTensor,
        codes: CubeTensor,
        scales: CubeTensor,
        offsets: CubeTensor,
        down: CubeTensor,
        up: CubeTensor,
        lora_scale: f32,
        bits: u32,
        group: usize,
        has_offsets: bool,
        has_lora: bool,
    ) -> CubeTensor {
        assert_eq!(dy.dtype, DType::F32, "quantized matmul takes f32 gradients");
        let dy = into_contiguous(dy);
        let (m, n) = (dy.meta.shape()[0], dy.meta.shape()[1]);
        assert_eq!(scales.meta.shape()[0], n, "quantized matrix rows");
        let k = codes.meta.shape()[0] / n * (32 / bits as usize);
        let weights = QuantArgs::new(codes, scales, offsets, bits, group, has_offsets);
        let lora = LoraArgs::new(down, up, lora_scale, has_lora, k);
        let out = empty_device::<f32>(dy.client.clone(), dy.device.clone(), [m, k].into());
        let client = dy.client.clone();
        let tile = qmatmul::TILE as usize;
        let count = CubeCount::Static(k.div_ceil(tile) as u32, m.div_ceil(tile) as u32, 1);
        let dim = CubeDim::new_2d(qmatmul::THREADS_SIDE, qmatmul::THREADS_SIDE);
        unsafe {
            qmatmul::qgemm_t_kernel::launch_unchecked(
                &client,
                count,
                dim,
                dy.into_buffer_arg(),
                weights.codes.into_buffer_arg(),
                weights.scales.into_buffer_arg(),
                weights.offsets.into_buffer_arg(),
                lora.down.into_buffer_arg(),
                lora.up.into_buffer_arg(),
                out.clone().into_buffer_arg(),
                m as u32,
                n as u32,
                k as u32,
                weights.group,
                lora.rank,
                lora.scale,
                bits,
                has_offsets,
                has_lora,
            );
        }
        out
    }

    fn moe_route(
        logits: CubeTensor,
        correction_bias: CubeTensor,
        top_k: usize,
        (n_group, keep_groups): (u32, u32),
        scale: f32,
        method: u32,
        normalize: bool,
    ) -> (CubeTensor, CubeTensor) {
        let logits = into_contiguous(logits);
        let (tokens, experts) = (logits.meta.shape()[0], logits.meta.shape()[1]);
        let client = logits.client.clone();
        let device = logits.device.clone();
        let ids = empty_device::<i32>(client.clone(), device.clone(), [tokens, top_k].into());
        let weights = empty_device::<f32>(client.clone(), device, [tokens, top_k].into());
        let bias = into_contiguous(correction_bias);
        let count = CubeCount::Static(tokens.div_ceil(moe::ROUTE_THREADS as usize) as u32, 1, 1);
        unsafe {
            moe::route_kernel::launch_unchecked(
                &client,
                count,
                CubeDim::new_1d(moe::ROUTE_THREADS),
                logits.into_buffer_arg(),
                bias.into_buffer_arg(),
                ids.clone().into_buffer_arg(),
                weights.clone().into_buffer_arg(),
                tokens as u32,
                experts as u32,
                top_k as u32,
                n_group,
                keep_groups,
                scale,
                method,
                normalize,
            );
        }
        (ids, weights)
    }

    #[allow(clippy::too_many_arguments)]
    fn moe_experts(
        x: CubeTensor,
        ids: CubeTensor,
        weights: CubeTensor,
        gate_up: ExpertWeights<Self>,
        gate_up_bias: CubeTensor,
        down: ExpertWeights<Self>,
        down_bias: CubeTensor,
        (experts, inter): (usize, usize),
        tiles: crate::moe::MoeTiles,
        has_bias: bool,
        activation: Option<(f32, f32)>,
    ) -> CubeTensor {
        assert!(
            matches!(ids.dtype, DType::I32 | DType::U32),
            "expert ids must be 32-bit, found {:?}",
            ids.dtype
        );
        let x = into_contiguous(x);
        let ids = into_contiguous(ids);
        let weights = into_contiguous(weights);
        let gate_up = gate_up.into_contiguous();
        let down = down.into_contiguous();
        let (tokens, hidden) = (x.meta.shape()[0], x.meta.shape()[1]);
        let top_k = ids.meta.shape()[1];
        let slots = tokens * top_k;
        let client = x.client.clone();
        let device = x.device.clone();
        let buffer =
            |shape: Vec<usize>| empty_device::<f32>(client.clone(), device.clone(), shape.into());
        let words = |len: usize| empty_device::<u32>(client.clone(), device.clone(), [len].into());
        let gate_up_bias = into_contiguous(gate_up_bias);
        let down_bias = into_contiguous(down_bias);
        let (alpha, limit) = activation.unwrap_or((1.0, 0.0));
        let clamped = activation.is_some();
        let out = buffer(vec![slots, hidden]);
        let line = |columns: usize, rows: usize| {
            CubeCount::Static(
                columns.div_ceil(tiles.threads as usize) as u32,
                rows as u32,
                1,
            )
        };
        let line_dim = CubeDim::new_1d(tiles.threads);
        // Quantized GEMVs: `GEMV_LANES` lanes per output column, `GEMV_ROWS` columns a cube.
        let lanes = |columns: usize, rows: usize| {
            CubeCount::Static(
                columns.div_ceil(qmatmul::GEMV_ROWS as usize) as u32,
                rows as u32,
                1,
            )
        };
        let lanes_dim = CubeDim::new_2d(qmatmul::GEMV_LANES, qmatmul::GEMV_ROWS);
        // A GEMV per slot when decoding or when experts would get few rows each (tiles of
        // mostly padding); the grouped GEMM when each expert's weights serve many rows.
        let rows_per_expert = slots / experts.min(slots).max(1);
        if tokens <= tiles.gemv_max_tokens || rows_per_expert < tiles.gemm_min_rows_per_expert {
            let act = buffer(vec![slots, inter]);
            unsafe {
                match gate_up {
                    ExpertWeights::Dense(gate_up) => moe::gemv_gate_up_kernel::launch_unchecked(
                        &client,
                        line(inter, slots),
                        line_dim,
                        x.into_buffer_arg(),
                        ids.clone().into_buffer_arg(),
                        gate_up.into_buffer_arg(),
                        gate_up_bias.into_buffer_arg(),
                        act.clone().into_buffer_arg(),
                        hidden as u32,
                        inter as u32,
                        top_k as u32,
                        alpha,
                        limit,
                        has_bias,
                        clamped,
                    ),
                    ExpertWeights::Quantized {
                        codes,
                        scales,
                        offsets,
                        bits,
                        group,
                        has_offsets,
                    } => moe::qgemv_gate_up_kernel::launch_unchecked(
                        &client,
                        lanes(inter, slots),
                        lanes_dim,
                        x.into_buffer_arg(),
                        ids.clone().into_buffer_arg(),
                        codes.into_buffer_arg(),
                        scales.into_buffer_arg(),
                        offsets.into_buffer_arg(),
                        gate_up_bias.into_buffer_arg(),
                        act.clone().into_buffer_arg(),
                        hidden as u32,
                        inter as u32,
                        top_k as u32,
                        group,
                        alpha,
                        limit,
                        bits,
                        has_offsets,
                        has_bias,
                        clamped,
                    ),
                }
                match down {
                    ExpertWeights::Dense(down) => moe::gemv_down_kernel::launch_unchecked(
                        &client,
                        line(hidden, slots),
                        line_dim,
                        act.into_buffer_arg(),
                        ids.into_buffer_arg(),
                        weights.into_buffer_arg(),
                        down.into_buffer_arg(),
                        down_bias.into_buffer_arg(),
                        out.clone().into_buffer_arg(),
                        hidden as u32,
                        inter as u32,
                        has_bias,
                    ),
                    ExpertWeights::Quantized {
                        codes,
                        scales,
                        offsets,
                        bits,
                        group,
                        has_offsets,
                    } => moe::qgemv_down_kernel::launch_unchecked(
                        &client,
                        lanes(hidden, slots),
                        lanes_dim,
                        act.into_buffer_arg(),
                        ids.into_buffer_arg(),
                        weights.into_buffer_arg(),
                        codes.into_buffer_arg(),
                        scales.into_buffer_arg(),
                        offsets.into_buffer_arg(),
                        down_bias.into_buffer_arg(),
                        out.clone().into_buffer_arg(),
                        hidden as u32,
                        inter as u32,
                        group,
                        bits,
                        has_offsets,
                        has_bias,
                    ),
                }
            }
            return out;
        }
        // Every expert's segment is padded to whole blocks: at most one partial block per
        // expert that received a slot.
        let block_rows = tiles.block_rows;
        let rows = block_rows as usize;
        let max_blocks = slots.div_ceil(rows) + experts.min(slots);
        let counts = words(experts);
        let offsets = words(experts + 1);
        let block_expert = words(max_blocks + 1);
        let sorted = words(max_blocks * rows);
        let act = buffer(vec![max_blocks * rows, inter]);
        unsafe {
            moe::count_kernel::launch_unchecked(
                &client,
                line(experts, 1),
                line_dim,
                ids.clone().into_buffer_arg(),
                counts.clone().into_buffer_arg(),
                slots as u32,
                experts as u32,
            );
            moe::offsets_kernel::launch_unchecked(
                &client,
                CubeCount::Static(1, 1, 1),
                CubeDim::new_1d(1),
                counts.into_buffer_arg(),
                offsets.clone().into_buffer_arg(),
                block_expert.clone().into_buffer_arg(),
                experts as u32,
                max_blocks as u32,
                block_rows,
            );
            moe::scatter_kernel::launch_unchecked(
                &client,
                line(experts, 1),
                line_dim,
                ids.into_buffer_arg(),
                offsets.into_buffer_arg(),
                sorted.clone().into_buffer_arg(),
                slots as u32,
                experts as u32,
            );
            match gate_up {
                ExpertWeights::Dense(gate_up) => moe::grouped_gate_up_kernel::launch_unchecked(
                    &client,
                    line(inter, max_blocks),
                    line_dim,
                    x.into_buffer_arg(),
                    sorted.clone().into_buffer_arg(),
                    block_expert.clone().into_buffer_arg(),
                    gate_up.into_buffer_arg(),
                    gate_up_bias.into_buffer_arg(),
                    act.clone().into_buffer_arg(),
                    slots as u32,
                    hidden as u32,
                    inter as u32,
                    top_k as u32,
                    max_blocks as u32,
                    alpha,
                    limit,
                    block_rows,
                    has_bias,
                    clamped,
                ),
                ExpertWeights::Quantized {
                    codes,
                    scales,
                    offsets,
                    bits,
                    group,
                    has_offsets,
                } => moe::qgrouped_gate_up_kernel::launch_unchecked(
                    &client,
                    line(inter, max_blocks),
                    line_dim,
                    x.into_buffer_arg(),
                    sorted.clone().into_buffer_arg(),
                    block_expert.clone().into_buffer_arg(),
                    codes.into_buffer_arg(),
                    scales.into_buffer_arg(),
                    offsets.into_buffer_arg(),
                    gate_up_bias.into_buffer_arg(),
                    act.clone().into_buffer_arg(),
                    slots as u32,
                    hidden as u32,
                    inter as u32,
                    top_k as u32,
                    max_blocks as u32,
                    group,
                    alpha,
                    limit,
                    block_rows,
                    bits,
                    has_offsets,
                    has_bias,
                    clamped,
                ),
            }
            match down {
                ExpertWeights::Dense(down) => moe::grouped_down_kernel::launch_unchecked(
                    &client,
                    line(hidden, max_blocks),
                    line_dim,
                    act.into_buffer_arg(),
                    sorted.into_buffer_arg(),
                    block_expert.into_buffer_arg(),
                    weights.into_buffer_arg(),
                    down.into_buffer_arg(),
                    down_bias.into_buffer_arg(),
                    out.clone().into_buffer_arg(),
                    slots as u32,
                    hidden as u32,
                    inter as u32,
                    max_blocks as u32,
                    block_rows,
                    has_bias,
                ),
                ExpertWeights::Quantized {
                    codes,
                    scales,
                    offsets,
                    bits,
                    group,
                    has_offsets,
                } => moe::qgrouped_down_kernel::launch_unchecked(
                    &client,
                    line(hidden, max_blocks),
                    line_dim,
                    act.into_buffer_arg(),
                    sorted.into_buffer_arg(),
                    block_expert.into_buffer_arg(),
                    weights.into_buffer_arg(),
                    codes.into_buffer_arg(),
                    scales.into_buffer_arg(),
                    offsets.into_buffer_arg(),
                    down_bias.into_buffer_arg(),
                    out.clone().into_buffer_arg(),
                    slots as u32,
                    hidden as u32,
                    inter as u32,
                    max_blocks as u32,
                    group,
                    block_rows,
                    bits,
                    has_offsets,
                    has_bias,
                ),
            }
        }
        out
    }
}

impl ExpertWeights<Cube> {
    fn into_contiguous(self) -> Self {
        match self {
            Self::Dense(weights) => Self::Dense(into_contiguous(weights)),
            Self::Quantized {
                codes,
                scales,
                offsets,
                bits,
                group,
                has_offsets,
            } => Self::Quantized {
                codes: into_contiguous(codes),
                scales: into_contiguous(scales),
                offsets: into_contiguous(offsets),
                bits,
                group,
                has_offsets,
            },
        }
    }
}

/// [`KernelOps::moe_route`] on burn tensors.
pub fn moe_route(
    logits: Tensor<2>,
    correction_bias: Option<Tensor<1>>,
    top_k: usize,
    groups: (u32, u32),
    scale: f32,
    method: u32,
    normalize: bool,
) -> (Tensor<2, Int>, Tensor<2>) {
    // Only the sigmoid method reads the bias: otherwise any buffer stands in (no allocation).
    let correction_bias = correction_bias.unwrap_or_else(|| logits.clone().reshape([-1]));
    let (ids, weights) = <Dispatch as KernelOps>::moe_route(
        logits.into_dispatch(),
        correction_bias.into_dispatch(),
        top_k,
        groups,
        scale,
        method,
        normalize,
    );
    (Tensor::from_dispatch(ids), Tensor::from_dispatch(weights))
}

/// [`KernelOps::moe_experts`] on burn tensors, summed over each token's k slots.
pub fn moe_experts(
    x: Tensor<2>,
    ids: Tensor<2, Int>,
    weights: Tensor<2>,
    experts: &crate::moe::StackedExperts,
    [num_experts, inter]: [usize; 2],
    tiles: crate::moe::MoeTiles,
) -> Tensor<2> {
    let [tokens, hidden] = x.dims();
    let [_, top_k] = ids.dims();
    let ids = if ids.dtype() == DType::I32 {
        ids
    } else {
        ids.cast(IntDType::I32)
    };
    let device = x.device();
    let activation = match experts.activation {
        crate::moe::ExpertActivation::SwiGlu => None,
        crate::moe::ExpertActivation::ClampedSwiGlu { alpha, limit } => Some((alpha, limit)),
    };
    // One bias without the other reads zeros for the missing one.
    let has_bias = experts.gate_up_bias.is_some() || experts.down_bias.is_some();
    // Without biases the kernels read none, and `x` stands in for both (no allocation).
    let zeros = |shape: [usize; 2]| Tensor::<2>::zeros(shape, &device);
    let (gate_up_bias, down_bias) = match (&experts.gate_up_bias, &experts.down_bias) {
        (None, None) => (x.clone(), x.clone()),
        (gate_up_bias, down_bias) => (
            gate_up_bias
                .clone()
                .unwrap_or_else(|| zeros([num_experts, 2 * inter])),
            down_bias
                .clone()
                .unwrap_or_else(|| zeros([num_experts, hidden])),
        ),
    };
    let slots = <Dispatch as KernelOps>::moe_experts(
        x.into_dispatch(),
        ids.into_dispatch(),
        weights.into_dispatch(),
        ExpertWeights::new(&experts.gate_up),
        gate_up_bias.into_dispatch(),
        ExpertWeights::new(&experts.down),
        down_bias.into_dispatch(),
        (num_experts, inter),
        tiles,
        has_bias,
        activation,
    );
    Tensor::<2>::from_dispatch(slots)
        .reshape([tokens, top_k, hidden])
        .sum_dim(1)
        .reshape([tokens, hidden])
}
