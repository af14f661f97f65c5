//! Dequant-matmul kernels: `out[m, n] = Σ_k x[m, k] · (scale·code + offset)[n, k]`, with
//! the codes decoded in registers (never an f32 copy of the weights in device memory) and
//! f32 accumulation.

use cubecl::prelude::*;

/// GEMV: lanes of one output row walk its code words; rows per cube.
pub const GEMV_LANES: u32 = 32;
pub const GEMV_ROWS: u32 = 4;
const GEMV_LANES_LOG2: u32 = GEMV_LANES.trailing_zeros();
/// GEMM: a `TILE × TILE` output tile per cube, `TILE_K` weights deep per step, each of the
/// `THREADS_SIDE²` threads computing a 2 × 2 block.
pub const TILE: u32 = 32;
pub const TILE_K: u32 = 32;
pub const THREADS_SIDE: u32 = 16;

/// Code `i` of `word` as the integer it stands for: unsigned 4-bit, two's complement 8-bit.
#[cube]
pub fn decode(word: u32, i: u32, #[comptime] bits: u32) -> f32 {
    let field = (word >> (i * bits)) & ((1u32 << bits) - 1);
    let value = f32::cast_from(field);
    if bits == 8 {
        value - select(field >= 128u32, 256.0f32, 0.0f32)
    } else {
        value
    }
}

/// One lane's share of `x[x_base..x_base + k] · W[row]`: the lane decodes every
/// `GEMV_LANES`-th code word of the row (so the scale and offset are read once per word) and
/// accumulates `scale·Σ x·q + offset·Σ x`. [`sum_lanes`] adds the lanes up.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn lane_dot(
    x: &[f32],
    x_base: u32,
    codes: &[u32],
    scales: &[f32],
    offsets: &[f32],
    row: u32,
    k: u32,
    group: u32,
    #[comptime] bits: u32,
    #[comptime] has_offsets: bool,
) -> f32 {
    let per_word = 32u32 / bits;
    let words = k / per_word;
    let groups = k / group;
    let mut acc = 0.0f32;
    for w in range_stepped(UNIT_POS_X, words, GEMV_LANES) {
        let word = codes[(row * words + w) as usize];
        let col = w * per_word;
        let g = (row * groups + col / group) as usize;
        let base = (x_base + col) as usize;
        let mut dot = 0.0f32;
        let mut sum = 0.0f32;
        #[unroll]
        for i in 0..per_word {
            let xv = x[base + i as usize];
            dot += xv * decode(word, i, bits);
            sum += xv;
        }
        acc += scales[g] * dot;
        if has_offsets {
            acc += offsets[g] * sum;
        }
    }
    acc
}

/// The sum of `value` over the `GEMV_LANES` lanes of each row of the cube (`UNIT_POS_Y`),
/// through `partial` (one slot per unit); valid in lane 0. Every unit must call it.
#[cube]
pub fn sum_lanes(partial: &mut Shared<[f32]>, value: f32) -> f32 {
    let lane = UNIT_POS_X;
    let slot = (UNIT_POS_Y * GEMV_LANES + lane) as usize;
    partial[slot] = value;
    sync_cube();
    #[unroll]
    for level in 1..GEMV_LANES_LOG2 + 1 {
        let stride = GEMV_LANES >> level;
        if lane < stride {
            partial[slot] += partial[slot + stride as usize];
        }
        sync_cube();
    }
    partial[slot]
}

/// One output element per `GEMV_LANES` lanes ([`lane_dot`], then [`sum_lanes`]),
/// `GEMV_ROWS` output rows per cube.
#[cube(launch_unchecked)]
pub fn qgemv_kernel(
    x: &[f32],
    codes: &[u32],
    scales: &[f32],
    offsets: &[f32],
    down: &[f32],
    up: &[f32],
    out: &mut [f32],
    m: u32,
    n: u32,
    k: u32,
    group: u32,
    rank: u32,
    lora_scale: f32,
    #[comptime] bits: u32,
    #[comptime] has_offsets: bool,
    #[comptime] lora: bool,
) {
    let row = CUBE_POS_X * GEMV_ROWS + UNIT_POS_Y;
    let token = CUBE_POS_Y;
    let mut acc = 0.0f32;
    if row < n {
        acc = lane_dot(
            x,
            token * k,
            codes,
            scales,
            offsets,
            row,
            k,
            group,
            bits,
            has_offsets,
        );
    }
    let mut partial = Shared::<[f32]>::new_slice((GEMV_LANES * GEMV_ROWS) as usize);
    let total = sum_lanes(&mut partial, acc);
    if UNIT_POS_X == 0 {
        let epilogue = Epilogue {
            rows: m,
            cols: n,
            rank,
            scale: lora_scale,
        };
        store(out, down, up, &epilogue, token, row, total, lora);
    }
}

/// A `TILE × TILE` block of the output per cube: each `TILE_K` step stages `x` and the
/// decoded weights in shared memory, then every thread accumulates its 2 × 2 outputs.
/// Needs `k` to be a multiple of `TILE_K` (so groups, multiples of a word, align with it).
#[cube(launch_unchecked)]
pub fn qgemm_kernel(
    x: &[f32],
    codes: &[u32],
    scales: &[f32],
    offsets: &[f32],
    down: &[f32],
    up: &[f32],
    out: &mut [f32],
    m: u32,
    n: u32,
    k: u32,
    group: u32,
    rank: u32,
    lora_scale: f32,
    #[comptime] bits: u32,
    #[comptime] has_offsets: bool,
    #[comptime] lora: bool,
) {
    let per_word = 32u32 / bits;
    let words = k / per_word;
    let groups = k / group;
    let tx = UNIT_POS_X;
    let ty = UNIT_POS_Y;
    let thread = ty * THREADS_SIDE + tx;
    let threads = THREADS_SIDE * THREADS_SIDE;
    let token0 = CUBE_POS_Y * TILE;
    let row0 = CUBE_POS_X * TILE;
    // x tile [TILE tokens][TILE_K]; weight tile [TILE rows][TILE_K + 1] (padded: no bank
    // conflicts when threads read down a column).
    let mut xs = Shared::<[f32]>::new_slice((TILE * TILE_K) as usize);
    let mut ws = Shared::<[f32]>::new_slice((TILE * (TILE_K + 1)) as usize);
    let mut acc00 = 0.0f32;
    let mut acc01 = 0.0f32;
    let mut acc10 = 0.0f32;
    let mut acc11 = 0.0f32;
    let words_per_tile_row = TILE_K / per_word;
    let mut k0 = 0u32;
    while k0 < k {
        for i in range_stepped(thread, TILE * TILE_K, threads) {
            let t = token0 + i / TILE_K;
            let kk = i % TILE_K;
            let mut value = 0.0f32;
            if t < m {
                value = x[(t * k + k0 + kk) as usize];
            }
            xs[i as usize] = value;
        }
        for j in range_stepped(thread, TILE * words_per_tile_row, threads) {
            let local = j / words_per_tile_row;
            let wi = j % words_per_tile_row;
            let row = row0 + local;
            let col = k0 + wi * per_word;
            let dst = (local * (TILE_K + 1) + wi * per_word) as usize;
            if row < n {
                let word = codes[(row * words + col / per_word) as usize];
                let g = (row * groups + col / group) as usize;
                let scale = scales[g];
                let mut offset = 0.0f32;
                if has_offsets {
                    offset = offsets[g];
                }
                #[unroll]
                for c in 0..per_word {
                    ws[dst + c as usize] = scale * decode(word, c, bits) + offset;
                }
            } else {
                #[unroll]
                for c in 0..per_word {
                    ws[dst + c as usize] = 0.0f32;
                }
            }
        }
        sync_cube();
        let a0 = (ty * 2 * TILE_K) as usize;
        let a1 = a0 + TILE_K as usize;
        let b0 = (tx * 2 * (TILE_K + 1)) as usize;
        let b1 = b0 + (TILE_K + 1) as usize;
        #[unroll]
        for kk in 0..TILE_K {
            let x0 = xs[a0 + kk as usize];
            let x1 = xs[a1 + kk as usize];
            let w0 = ws[b0 + kk as usize];
            let w1 = ws[b1 + kk as usize];
            acc00 += x0 * w0;
            acc01 += x0 * w1;
            acc10 += x1 * w0;
            acc11 += x1 * w1;
        }
        sync_cube();
        k0 += TILE_K;
    }
    let t0 = token0 + ty * 2;
    let r0 = row0 + tx * 2;
    let epilogue = Epilogue {
        rows: m,
        cols: n,
        rank,
        scale: lora_scale,
    };
    store(out, down, up, &epilogue, t0, r0, acc00, lora);
    store(out, down, up, &epilogue, t0, r0 + 1, acc01, lora);
    store(out, down, up, &epilogue, t0 + 1, r0, acc10, lora);
    store(out, down, up, &epilogue, t0 + 1, r0 + 1, acc11, lora);
}

/// The output's shape and the LoRA term the kernels add to each element.
#[derive(CubeType)]
pub struct Epilogue {
    pub rows: u32,
    pub cols: u32,
    pub rank: u32,
    pub scale: f32,
}

/// Writes `value` (plus, with `lora`, `scale · Σ_j down[t, j] · up[j, col]`) to
/// `out[t, col]` if it lies inside the output. Forward, `down = x·A` and `up = B`, so the
/// adapter's update joins the base product without another pass over the output; backward,
/// `down = ∂y·Bᵀ` and `up = Aᵀ` give the adapter's share of the input gradient.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn store(
    out: &mut [f32],
    down: &[f32],
    up: &[f32],
    epilogue: &Epilogue,
    t: u32,
    col: u32,
    value: f32,
    #[comptime] lora: bool,
) {
    if t < epilogue.rows && col < epilogue.cols {
        let mut total = value;
        if lora {
            let mut update = 0.0f32;
            for j in 0..epilogue.rank {
                update +=
                    down[(t * epilogue.rank + j) as usize] * up[(j * epilogue.cols + col) as usize];
            }
            total += epilogue.scale * update;
        }
        out[(t * epilogue.cols + col) as usize] = total;
    }
}

/// `out[m, k] = Σ_n dy[m, n] · W[n, k]`: the input gradient of `x · Wᵀ`, with `W` decoded
/// tile by tile into shared memory as in [`qgemm_kernel`] (stored transposed, so the inner
/// loop is the same), plus the LoRA epilogue. Needs `k` to be a multiple of the code words.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn qgemm_t_kernel(
    dy: &[f32],
    codes: &[u32],
    scales: &[f32],
    offsets: &[f32],
    down: &[f32],
    up: &[f32],
    out: &mut [f32],
    m: u32,
    n: u32,
    k: u32,
    group: u32,
    rank: u32,
    lora_scale: f32,
    #[comptime] bits: u32,
    #[comptime] has_offsets: bool,
    #[comptime] lora: bool,
) {
    let per_word = 32u32 / bits;
    let words = k / per_word;
    let groups = k / group;
    let tx = UNIT_POS_X;
    let ty = UNIT_POS_Y;
    let thread = ty * THREADS_SIDE + tx;
    let threads = THREADS_SIDE * THREADS_SIDE;
    let token0 = CUBE_POS_Y * TILE;
    let col0 = CUBE_POS_X * TILE;
    // dy tile [TILE tokens][TILE_K rows of W]; weight tile [TILE columns of W][TILE_K + 1].
    let mut ys = Shared::<[f32]>::new_slice((TILE * TILE_K) as usize);
    let mut ws = Shared::<[f32]>::new_slice((TILE * (TILE_K + 1)) as usize);
    let mut acc00 = 0.0f32;
    let mut acc01 = 0.0f32;
    let mut acc10 = 0.0f32;
    let mut acc11 = 0.0f32;
    let words_per_tile_row = TILE / per_word;
    let mut n0 = 0u32;
    while n0 < n {
        for i in range_stepped(thread, TILE * TILE_K, threads) {
            let t = token0 + i / TILE_K;
            let row = n0 + i % TILE_K;
            let mut value = 0.0f32;
            if t < m && row < n {
                value = dy[(t * n + row) as usize];
            }
            ys[i as usize] = value;
        }
        for j in range_stepped(thread, TILE_K * words_per_tile_row, threads) {
            let local_row = j / words_per_tile_row;
            let wi = j % words_per_tile_row;
            let row = n0 + local_row;
            let col = col0 + wi * per_word;
            let mut scale = 0.0f32;
            let mut offset = 0.0f32;
            let mut word = 0u32;
            if row < n && col < k {
                word = codes[(row * words + col / per_word) as usize];
                let g = (row * groups + col / group) as usize;
                scale = scales[g];
                if has_offsets {
                    offset = offsets[g];
                }
            }
            #[unroll]
            for c in 0..per_word {
                // Outside the matrix scale and offset are zero, so the tile is zero-padded.
                ws[((wi * per_word + c) * (TILE_K + 1) + local_row) as usize] =
                    scale * decode(word, c, bits) + offset;
            }
        }
        sync_cube();
        let a0 = (ty * 2 * TILE_K) as usize;
        let a1 = a0 + TILE_K as usize;
        let b0 = (tx * 2 * (TILE_K + 1)) as usize;
        let b1 = b0 + (TILE_K + 1) as usize;
        #[unroll]
        for kk in 0..TILE_K {
            let y0 = ys[a0 + kk as usize];
            let y1 = ys[a1 + kk as usize];
            let w0 = ws[b0 + kk as usize];
            let w1 = ws[b1 + kk as usize];
            acc00 += y0 * w0;
            acc01 += y0 * w1;
            acc10 += y1 * w0;
            acc11 += y1 * w1;
        }
        sync_cube();
        n0 += TILE_K;
    }
    let t0 = token0 + ty * 2;
    let c0 = col0 + tx * 2;
    let epilogue = Epilogue {
        rows: m,
        cols: k,
        rank,
        scale: lora_scale,
    };
    store(out, down, up, &epilogue, t0, c0, acc00, lora);
    store(out, down, up, &epilogue, t0, c0 + 1, acc01, lora);
    store(out, down, up, &epilogue, t0 + 1, c0, acc10, lora);
    store(out, down, up, &epilogue, t0 + 1, c0 + 1, acc11, lora);
}
