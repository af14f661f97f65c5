//! Mixture-of-experts kernels: fused top-k routing, the counting sort of (token, k) slots by
//! expert, and the grouped expert GEMMs (decode: a GEMV per slot; prefill: blocks of
//! `block_rows` sorted slots × one column per thread over the block-padded segments). The
//! tile sizes (`block_rows`, threads per cube) come from `moe::MoeTiles`.

use cubecl::prelude::*;

use super::qmatmul::{GEMV_LANES, GEMV_ROWS, decode, lane_dot, sum_lanes};

/// Routing methods, as the comptime `method` of [`route_kernel`].
pub const SOFTMAX_TOP_K: u32 = 0;
pub const SOFTMAX_GROUPS: u32 = 1;
pub const SIGMOID_GROUPS: u32 = 2;
pub const TOP_K_SOFTMAX: u32 = 3;

/// Tokens per cube of the routing kernel (one thread routes one token).
pub const ROUTE_THREADS: u32 = 64;

/// Below every biased sigmoid score: the choice value of experts outside the kept groups
/// (and the empty second place of a group). A mutable variable starting from it needs
/// `f32::new(EXCLUDED)`: cubecl does not make a mutable variable from a bare constant.
const EXCLUDED: f32 = -3.0e38;

#[cube]
fn sigmoid(x: f32) -> f32 {
    1.0f32 / (1.0f32 + (-x).exp())
}

/// The value expert `e` is ranked by, before group limiting: its softmax probability, its
/// biased sigmoid score, or its raw logit.
#[cube]
fn choice_score(
    logits: &[f32],
    bias: &[f32],
    row: u32,
    e: u32,
    max: f32,
    sum: f32,
    #[comptime] method: u32,
) -> f32 {
    let logit = logits[(row + e) as usize];
    if method == SIGMOID_GROUPS {
        sigmoid(logit) + bias[e as usize]
    } else if method == TOP_K_SOFTMAX {
        logit
    } else {
        (logit - max).exp() / sum
    }
}

/// A group's rank score: its best probability (DeepSeek-V2) or the sum of its two best
/// biased scores (DeepSeek-V3).
#[cube]
fn group_score(
    logits: &[f32],
    bias: &[f32],
    row: u32,
    group: u32,
    per_group: u32,
    max: f32,
    sum: f32,
    #[comptime] method: u32,
) -> f32 {
    let first = group * per_group;
    let mut best = choice_score(logits, bias, row, first, max, sum, method);
    let mut second = f32::new(EXCLUDED);
    for e in first + 1..first + per_group {
        let v = choice_score(logits, bias, row, e, max, sum, method);
        if v > best {
            second = best;
            best = v;
        } else if v > second {
            second = v;
        }
    }
    if method == SIGMOID_GROUPS {
        if per_group > 1 { best + second } else { best }
    } else {
        best
    }
}

/// One token per thread: scores, optional group limiting, top-k by repeated "best after the
/// previous pick" scans (value descending, then index ascending, so ties go to the lower
/// index without any sort buffer), then renormalization and scaling.
#[cube(launch_unchecked)]
pub fn route_kernel(
    logits: &[f32],
    bias: &[f32],
    ids: &mut [u32],
    weights: &mut [f32],
    tokens: u32,
    experts: u32,
    top_k: u32,
    n_group: u32,
    keep_groups: u32,
    scale: f32,
    #[comptime] method: u32,
    #[comptime] normalize: bool,
) {
    let token = CUBE_POS_X * ROUTE_THREADS + UNIT_POS_X;
    if token < tokens {
        let row = token * experts;
        let mut max = logits[row as usize];
        let mut sum = 0.0f32;
        if method == SOFTMAX_TOP_K || method == SOFTMAX_GROUPS {
            for e in 1..experts {
                max = max.max(logits[(row + e) as usize]);
            }
            for e in 0..experts {
                sum += (logits[(row + e) as usize] - max).exp();
            }
        }
        let per_group = experts / n_group;
        // Bit g set: group g is kept.
        let mut kept = 1u32;
        if method == SOFTMAX_GROUPS || method == SIGMOID_GROUPS {
            kept = 0u32;
            let mut previous = 0.0f32;
            let mut previous_group = 0u32;
            for pick in 0..keep_groups {
                let mut best = 0.0f32;
                let mut best_group = n_group;
                for g in 0..n_group {
                    let v = group_score(logits, bias, row, g, per_group, max, sum, method);
                    let after = pick == 0 || v < previous || (v == previous && g > previous_group);
                    if after && (best_group == n_group || v > best) {
                        best = v;
                        best_group = g;
                    }
                }
                kept |= 1u32 << best_group;
                previous = best;
                previous_group = best_group;
            }
        }
        let out = token * top_k;
        let mut previous = 0.0f32;
        let mut previous_expert = 0u32;
        let mut first = 0.0f32;
        let mut total = 0.0f32;
        for pick in 0..top_k {
            let mut best = 0.0f32;
            let mut best_expert = experts;
            for e in 0..experts {
                let mut v = choice_score(logits, bias, row, e, max, sum, method);
                if ((kept >> (e / per_group)) & 1u32) == 0u32 {
                    if method == SIGMOID_GROUPS {
                        v = EXCLUDED;
                    } else {
                        v = 0.0f32;
                    }
                }
                let after = pick == 0 || v < previous || (v == previous && e > previous_expert);
                if after && (best_expert == experts || v > best) {
                    best = v;
                    best_expert = e;
                }
            }
            let mut weight = best;
            if method == SIGMOID_GROUPS {
                weight = sigmoid(logits[(row + best_expert) as usize]);
            }
            if pick == 0 {
                first = best;
            }
            if method == TOP_K_SOFTMAX {
                total += (best - first).exp();
            } else {
                total += weight;
            }
            ids[(out + pick) as usize] = best_expert;
            weights[(out + pick) as usize] = weight;
            previous = best;
            previous_expert = best_expert;
        }
        for j in 0..top_k {
            let slot = (out + j) as usize;
            let mut w = weights[slot];
            if method == TOP_K_SOFTMAX {
                w = (w - first).exp() / total;
            } else if normalize {
                if method == SIGMOID_GROUPS {
                    w /= total + 1e-20f32;
                } else {
                    w /= total;
                }
            }
            weights[slot] = w * scale;
        }
    }
}

/// The gated activation of one gate/up pair (`clamped`: GPT-OSS's clamped SwiGLU).
#[cube]
fn activate(gate: f32, up: f32, alpha: f32, limit: f32, #[comptime] clamped: bool) -> f32 {
    if clamped {
        let g = gate.min(limit);
        let u = up.max(-limit).min(limit);
        (u + 1.0f32) * g * sigmoid(alpha * g)
    } else {
        gate * sigmoid(gate) * up
    }
}

/// Decode, gate/up: one thread per (slot, intermediate column) computes the gate and up
/// dot products over the hidden size against expert `ids[slot]`'s stacked `[H, 2I]`
/// weights and writes the activation `act[slot, column]`.
#[cube(launch_unchecked)]
pub fn gemv_gate_up_kernel(
    x: &[f32],
    ids: &[u32],
    gate_up: &[f32],
    gate_up_bias: &[f32],
    act: &mut [f32],
    hidden: u32,
    inter: u32,
    top_k: u32,
    alpha: f32,
    limit: f32,
    #[comptime] has_bias: bool,
    #[comptime] clamped: bool,
) {
    let column = CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X;
    let slot = CUBE_POS_Y;
    if column < inter {
        let expert = ids[slot as usize];
        let width = 2 * inter;
        let weights = expert * hidden * width;
        let row = (slot / top_k) * hidden;
        let mut gate = 0.0f32;
        let mut up = 0.0f32;
        for h in 0..hidden {
            let xv = x[(row + h) as usize];
            let w = weights + h * width + column;
            gate += xv * gate_up[w as usize];
            up += xv * gate_up[(w + inter) as usize];
        }
        if has_bias {
            gate += gate_up_bias[(expert * width + column) as usize];
            up += gate_up_bias[(expert * width + inter + column) as usize];
        }
        act[(slot * inter + column) as usize] = activate(gate, up, alpha, limit, clamped);
    }
}

/// Decode, down: one thread per (slot, hidden column); the routing weight is applied here,
/// so `out[slot]` is the slot's weighted contribution.
#[cube(launch_unchecked)]
pub fn gemv_down_kernel(
    act: &[f32],
    ids: &[u32],
    routing: &[f32],
    down: &[f32],
    down_bias: &[f32],
    out: &mut [f32],
    hidden: u32,
    inter: u32,
    #[comptime] has_bias: bool,
) {
    let column = CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X;
    let slot = CUBE_POS_Y;
    if column < hidden {
        let expert = ids[slot as usize];
        let weights = expert * inter * hidden;
        let row = slot * inter;
        let mut acc = 0.0f32;
        for i in 0..inter {
            acc += act[(row + i) as usize] * down[(weights + i * hidden + column) as usize];
        }
        if has_bias {
            acc += down_bias[(expert * hidden + column) as usize];
        }
        out[(slot * hidden + column) as usize] = acc * routing[slot as usize];
    }
}

/// Histogram: one thread per expert counts its slots.
#[cube(launch_unchecked)]
pub fn count_kernel(ids: &[u32], counts: &mut [u32], slots: u32, experts: u32) {
    let expert = CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X;
    if expert < experts {
        let mut count = 0u32;
        for s in 0..slots {
            if ids[s as usize] == expert {
                count += 1;
            }
        }
        counts[expert as usize] = count;
    }
}

/// Padded prefix sum (one thread; `experts` steps): `offsets[e]` is where expert `e`'s
/// segment starts, each segment padded to a multiple of `block_rows`; `block_expert[b]` names
/// the expert of block `b`, and `block_expert[max_blocks]` holds the number of blocks.
#[cube(launch_unchecked)]
pub fn offsets_kernel(
    counts: &[u32],
    offsets: &mut [u32],
    block_expert: &mut [u32],
    experts: u32,
    max_blocks: u32,
    block_rows: u32,
) {
    if UNIT_POS_X == 0 {
        let mut start = 0u32;
        for e in 0..experts {
            offsets[e as usize] = start;
            let blocks = counts[e as usize].div_ceil(block_rows);
            for b in 0..blocks {
                block_expert[(start / block_rows + b) as usize] = e;
            }
            start += blocks * block_rows;
        }
        offsets[experts as usize] = start;
        block_expert[max_blocks as usize] = start / block_rows;
    }
}

/// Scatter: one thread per expert writes its slots, in slot order (a stable sort), into its
/// segment of `sorted`, and marks the padding with `slots` (no slot).
#[cube(launch_unchecked)]
pub fn scatter_kernel(ids: &[u32], offsets: &[u32], sorted: &mut [u32], slots: u32, experts: u32) {
    let expert = CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X;
    if expert < experts {
        let mut position = offsets[expert as usize];
        for s in 0..slots {
            if ids[s as usize] == expert {
                sorted[position as usize] = s;
                position += 1;
            }
        }
        let end = offsets[(expert + 1) as usize];
        while position < end {
            sorted[position as usize] = slots;
            position += 1;
        }
    }
}

/// The gate/up epilogue of a block of sorted slots: the bias at `bias_index` (gate) and
/// `bias_index + inter` (up), the activation, and `act[position, column]` for the block's
/// real slots (padding is skipped).
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_activations(
    act: &mut [f32],
    sorted: &[u32],
    gate: &Array<f32>,
    up: &Array<f32>,
    gate_up_bias: &[f32],
    bias_index: u32,
    position0: u32,
    column: u32,
    inter: u32,
    slots: u32,
    alpha: f32,
    limit: f32,
    #[comptime] block_rows: u32,
    #[comptime] has_bias: bool,
    #[comptime] clamped: bool,
) {
    let mut gate_bias = 0.0f32;
    let mut up_bias = 0.0f32;
    if has_bias {
        gate_bias = gate_up_bias[bias_index as usize];
        up_bias = gate_up_bias[(bias_index + inter) as usize];
    }
    #[unroll]
    for r in 0..block_rows {
        let position = position0 + r;
        if sorted[position as usize] < slots {
            act[(position * inter + column) as usize] = activate(
                gate[r as usize] + gate_bias,
                up[r as usize] + up_bias,
                alpha,
                limit,
                clamped,
            );
        }
    }
}

/// The down epilogue of a block: the bias at `bias_index` and each slot's routing weight,
/// written to the slot's row of `out` (padding is skipped).
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_outputs(
    out: &mut [f32],
    sorted: &[u32],
    routing: &[f32],
    acc: &Array<f32>,
    down_bias: &[f32],
    bias_index: u32,
    position0: u32,
    column: u32,
    hidden: u32,
    slots: u32,
    #[comptime] block_rows: u32,
    #[comptime] has_bias: bool,
) {
    let mut bias = 0.0f32;
    if has_bias {
        bias = down_bias[bias_index as usize];
    }
    #[unroll]
    for r in 0..block_rows {
        let slot = sorted[(position0 + r) as usize];
        if slot < slots {
            out[(slot * hidden + column) as usize] =
                (acc[r as usize] + bias) * routing[slot as usize];
        }
    }
}

/// Prefill, gate/up: block `b` of the sorted slots (`block_rows` of them, all one expert's) times
/// that expert's gate and up weights, one intermediate column per thread. Each weight read
/// (coalesced across the threads) feeds `block_rows` multiply-adds; the slots' token rows of `x`
/// are gathered where they are read (no permuted copy), and the activation is applied
/// before writing `act[position, column]` in sorted order. Padding rows compute on row 0
/// and are not written.
#[cube(launch_unchecked)]
pub fn grouped_gate_up_kernel(
    x: &[f32],
    sorted: &[u32],
    block_expert: &[u32],
    gate_up: &[f32],
    gate_up_bias: &[f32],
    act: &mut [f32],
    slots: u32,
    hidden: u32,
    inter: u32,
    top_k: u32,
    max_blocks: u32,
    alpha: f32,
    limit: f32,
    #[comptime] block_rows: u32,
    #[comptime] has_bias: bool,
    #[comptime] clamped: bool,
) {
    let column = CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X;
    let block = CUBE_POS_Y;
    if column < inter && block < block_expert[max_blocks as usize] {
        let expert = block_expert[block as usize];
        let width = 2 * inter;
        let weights = expert * hidden * width + column;
        let position0 = block * block_rows;
        let mut rows = Array::<u32>::new(block_rows as usize);
        let mut gate = Array::<f32>::new(block_rows as usize);
        let mut up = Array::<f32>::new(block_rows as usize);
        #[unroll]
        for r in 0..block_rows {
            let slot = sorted[(position0 + r) as usize];
            rows[r as usize] = select(slot < slots, (slot / top_k) * hidden, 0u32);
            gate[r as usize] = 0.0f32;
            up[r as usize] = 0.0f32;
        }
        for h in 0..hidden {
            let w = weights + h * width;
            let g = gate_up[w as usize];
            let u = gate_up[(w + inter) as usize];
            #[unroll]
            for r in 0..block_rows {
                let xv = x[(rows[r as usize] + h) as usize];
                gate[r as usize] += xv * g;
                up[r as usize] += xv * u;
            }
        }
        store_activations(
            act,
            sorted,
            &gate,
            &up,
            gate_up_bias,
            expert * width + column,
            position0,
            column,
            inter,
            slots,
            alpha,
            limit,
            block_rows,
            has_bias,
            clamped,
        );
    }
}

/// Prefill, down: block `b` of the sorted activations times its expert's `[I, H]` weights,
/// one hidden column per thread; the bias and each slot's routing weight are applied
/// before writing the slot's row of `out` (padding rows are skipped).
#[cube(launch_unchecked)]
pub fn grouped_down_kernel(
    act: &[f32],
    sorted: &[u32],
    block_expert: &[u32],
    routing: &[f32],
    down: &[f32],
    down_bias: &[f32],
    out: &mut [f32],
    slots: u32,
    hidden: u32,
    inter: u32,
    max_blocks: u32,
    #[comptime] block_rows: u32,
    #[comptime] has_bias: bool,
) {
    let column = CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X;
    let block = CUBE_POS_Y;
    if column < hidden && block < block_expert[max_blocks as usize] {
        let expert = block_expert[block as usize];
        let weights = expert * inter * hidden + column;
        let position0 = block * block_rows;
        let mut acc = Array::<f32>::new(block_rows as usize);
        #[unroll]
        for r in 0..block_rows {
            acc[r as usize] = 0.0f32;
        }
        for i in 0..inter {
            let w = down[(weights + i * hidden) as usize];
            #[unroll]
            for r in 0..block_rows {
                acc[r as usize] += act[((position0 + r) * inter + i) as usize] * w;
            }
        }
        store_outputs(
            out,
            sorted,
            routing,
            &acc,
            down_bias,
            expert * hidden + column,
            position0,
            column,
            hidden,
            slots,
            block_rows,
            has_bias,
        );
    }
}

/// The f32 weight at `(row, col)` of a quantized matrix of `k` columns, decoded from its
/// code word, scale and offset.
#[cube]
#[allow(clippy::too_many_arguments)]
fn quant_weight(
    codes: &[u32],
    scales: &[f32],
    offsets: &[f32],
    row: u32,
    col: u32,
    k: u32,
    group: u32,
    #[comptime] bits: u32,
    #[comptime] has_offsets: bool,
) -> f32 {
    let per_word = 32u32 / bits;
    let word = codes[(row * (k / per_word) + col / per_word) as usize];
    let g = (row * (k / group) + col / group) as usize;
    let mut weight = scales[g] * decode(word, col % per_word, bits);
    if has_offsets {
        weight += offsets[g];
    }
    weight
}

/// Decode, gate/up, quantized experts (`[E·2I, H]`, see `ExpertMatrix::Quantized`): the
/// `GEMV_LANES` lanes of a cube row share one (slot, intermediate column) — the dot products
/// of the slot's token row with that column's gate row and up row, each lane decoding every
/// `GEMV_LANES`-th code word — and lane 0 writes the activation.
#[cube(launch_unchecked)]
pub fn qgemv_gate_up_kernel(
    x: &[f32],
    ids: &[u32],
    codes: &[u32],
    scales: &[f32],
    offsets: &[f32],
    gate_up_bias: &[f32],
    act: &mut [f32],
    hidden: u32,
    inter: u32,
    top_k: u32,
    group: u32,
    alpha: f32,
    limit: f32,
    #[comptime] bits: u32,
    #[comptime] has_offsets: bool,
    #[comptime] has_bias: bool,
    #[comptime] clamped: bool,
) {
    let column = CUBE_POS_X * GEMV_ROWS + UNIT_POS_Y;
    let slot = CUBE_POS_Y;
    let expert = ids[slot as usize];
    let gate_row = expert * 2 * inter + column;
    let x_base = (slot / top_k) * hidden;
    let mut gate = 0.0f32;
    let mut up = 0.0f32;
    if column < inter {
        gate = lane_dot(
            x,
            x_base,
            codes,
            scales,
            offsets,
            gate_row,
            hidden,
            group,
            bits,
            has_offsets,
        );
        up = lane_dot(
            x,
            x_base,
            codes,
            scales,
            offsets,
            gate_row + inter,
            hidden,
            group,
            bits,
            has_offsets,
        );
    }
    let mut partial = Shared::<[f32]>::new_slice((GEMV_LANES * GEMV_ROWS) as usize);
    let mut gate_total = sum_lanes(&mut partial, gate);
    sync_cube();
    let mut up_total = sum_lanes(&mut partial, up);
    if UNIT_POS_X == 0 && column < inter {
        if has_bias {
            gate_total += gate_up_bias[gate_row as usize];
            up_total += gate_up_bias[(gate_row + inter) as usize];
        }
        act[(slot * inter + column) as usize] =
            activate(gate_total, up_total, alpha, limit, clamped);
    }
}

/// Decode, down, quantized experts (`[E·H, I]`): lanes share one (slot, hidden column) as
/// in [`qgemv_gate_up_kernel`]; the bias and routing weight are applied by lane 0.
#[cube(launch_unchecked)]
pub fn qgemv_down_kernel(
    act: &[f32],
    ids: &[u32],
    routing: &[f32],
    codes: &[u32],
    scales: &[f32],
    offsets: &[f32],
    down_bias: &[f32],
    out: &mut [f32],
    hidden: u32,
    inter: u32,
    group: u32,
    #[comptime] bits: u32,
    #[comptime] has_offsets: bool,
    #[comptime] has_bias: bool,
) {
    let column = CUBE_POS_X * GEMV_ROWS + UNIT_POS_Y;
    let slot = CUBE_POS_Y;
    let expert = ids[slot as usize];
    let row = expert * hidden + column;
    let mut acc = 0.0f32;
    if column < hidden {
        acc = lane_dot(
            act,
            slot * inter,
            codes,
            scales,
            offsets,
            row,
            inter,
            group,
            bits,
            has_offsets,
        );
    }
    let mut partial = Shared::<[f32]>::new_slice((GEMV_LANES * GEMV_ROWS) as usize);
    let mut total = sum_lanes(&mut partial, acc);
    if UNIT_POS_X == 0 && column < hidden {
        if has_bias {
            total += down_bias[row as usize];
        }
        out[(slot * hidden + column) as usize] = total * routing[slot as usize];
    }
}

/// Prefill, gate/up, quantized experts: [`grouped_gate_up_kernel`] with each weight decoded
/// from its code where it is read (once per `block_rows` multiply-adds).
#[cube(launch_unchecked)]
pub fn qgrouped_gate_up_kernel(
    x: &[f32],
    sorted: &[u32],
    block_expert: &[u32],
    codes: &[u32],
    scales: &[f32],
    offsets: &[f32],
    gate_up_bias: &[f32],
    act: &mut [f32],
    slots: u32,
    hidden: u32,
    inter: u32,
    top_k: u32,
    max_blocks: u32,
    group: u32,
    alpha: f32,
    limit: f32,
    #[comptime] block_rows: u32,
    #[comptime] bits: u32,
    #[comptime] has_offsets: bool,
    #[comptime] has_bias: bool,
    #[comptime] clamped: bool,
) {
    let column = CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X;
    let block = CUBE_POS_Y;
    if column < inter && block < block_expert[max_blocks as usize] {
        let expert = block_expert[block as usize];
        let gate_row = expert * 2 * inter + column;
        let position0 = block * block_rows;
        let mut rows = Array::<u32>::new(block_rows as usize);
        let mut gate = Array::<f32>::new(block_rows as usize);
        let mut up = Array::<f32>::new(block_rows as usize);
        #[unroll]
        for r in 0..block_rows {
            let slot = sorted[(position0 + r) as usize];
            rows[r as usize] = select(slot < slots, (slot / top_k) * hidden, 0u32);
            gate[r as usize] = 0.0f32;
            up[r as usize] = 0.0f32;
        }
        for h in 0..hidden {
            let g = quant_weight(
                codes,
                scales,
                offsets,
                gate_row,
                h,
                hidden,
                group,
                bits,
                has_offsets,
            );
            let u = quant_weight(
                codes,
                scales,
                offsets,
                gate_row + inter,
                h,
                hidden,
                group,
                bits,
                has_offsets,
            );
            #[unroll]
            for r in 0..block_rows {
                let xv = x[(rows[r as usize] + h) as usize];
                gate[r as usize] += xv * g;
                up[r as usize] += xv * u;
            }
        }
        store_activations(
            act,
            sorted,
            &gate,
            &up,
            gate_up_bias,
            gate_row,
            position0,
            column,
            inter,
            slots,
            alpha,
            limit,
            block_rows,
            has_bias,
            clamped,
        );
    }
}

/// Prefill, down, quantized experts: [`grouped_down_kernel`] decoding each weight where it
/// is read.
#[cube(launch_unchecked)]
pub fn qgrouped_down_kernel(
    act: &[f32],
    sorted: &[u32],
    block_expert: &[u32],
    routing: &[f32],
    codes: &[u32],
    scales: &[f32],
    offsets: &[f32],
    down_bias: &[f32],
    out: &mut [f32],
    slots: u32,
    hidden: u32,
    inter: u32,
    max_blocks: u32,
    group: u32,
    #[comptime] block_rows: u32,
    #[comptime] bits: u32,
    #[comptime] has_offsets: bool,
    #[comptime] has_bias: bool,
) {
    let column = CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X;
    let block = CUBE_POS_Y;
    if column < hidden && block < block_expert[max_blocks as usize] {
        let expert = block_expert[block as usize];
        let row = expert * hidden + column;
        let position0 = block * block_rows;
        let mut acc = Array::<f32>::new(block_rows as usize);
        #[unroll]
        for r in 0..block_rows {
            acc[r as usize] = 0.0f32;
        }
        for i in 0..inter {
            let w = quant_weight(
                codes,
                scales,
                offsets,
                row,
                i,
                inter,
                group,
                bits,
                has_offsets,
            );
            #[unroll]
            for r in 0..block_rows {
                acc[r as usize] += act[((position0 + r) * inter + i) as usize] * w;
            }
        }
        store_outputs(
            out, sorted, routing, &acc, down_bias, row, position0, column, hidden, slots,
            block_rows, has_bias,
        );
    }
}
