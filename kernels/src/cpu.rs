//! rayon CPU kernels, used on flex (and any other CPU backend) instead of the reference.
//!
//! The inner loops are written so the compiler vectorizes them; on x86-64 they are compiled a
//! second time with AVX2 and FMA (variable per-lane shifts decode eight 4-bit codes at once)
//! and that version is picked at run time when the CPU has them.

use std::ops::Range;
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::quant::QuantizedMatrix;

/// Output rows per rayon task: enough work to amortize scheduling, few enough to balance.
const ROWS_PER_TASK: usize = 32;

/// `x · W[rows]ᵀ` for `x` `[m, cols]` row-major: `[m, rows.len()]`, never materializing
/// the f32 matrix (`rows`: a range of `W`'s rows, e.g. one expert's in a stacked matrix).
///
/// Per group: `Σ x·(s·q + o) = s·Σ x·q + o·Σ x`, so the offset costs one multiply per group
/// with the group sums of `x` computed once.
pub fn quant_matmul(w: &QuantizedMatrix, rows: Range<usize>, x: &[f32], m: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * w.cols);
    debug_assert!(rows.end <= w.rows);
    #[cfg(target_arch = "x86_64")]
    if m == 1 && w.format.code_bits() == 4 && w.group.is_multiple_of(32) && simd_available() {
        // SAFETY: the CPU reported AVX2 and FMA.
        return unsafe { q8::gemv(w, rows, x) };
    }
    let x_sums: Vec<f32> = if w.offsets.is_some() {
        x.chunks_exact(w.group).map(|g| g.iter().sum()).collect()
    } else {
        Vec::new()
    };
    let job = Job { w, x, m, x_sums };
    // Computed as [rows, m] so each task owns whole output rows, then transposed.
    let n = rows.len();
    let mut by_row = vec![0f32; n * m];
    let fast = simd_available();
    by_row
        .par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, out)| {
            let first = rows.start + task * ROWS_PER_TASK;
            #[cfg(target_arch = "x86_64")]
            if fast {
                // SAFETY: the CPU reported AVX2 and FMA.
                unsafe { rows_avx2(&job, first, out) };
                return;
            }
            let _ = fast;
            job.rows::<false>(first, out);
        });
    if m == 1 {
        return by_row;
    }
    let mut out = vec![0f32; m * n];
    for (row, values) in by_row.chunks_exact(m).enumerate() {
        for (t, &v) in values.iter().enumerate() {
            out[t * n + row] = v;
        }
    }
    out
}

/// `exp(x)` for `x ≤ 0` (below −87 it is 0): `2ⁿ·e^r` with `r` in about ±ln2/2 and a
/// degree-6 polynomial for `e^r` (Cephes' `expf`).
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    let x = x.max(-87.0);
    // Rounds the non-positive `x·log2 e` to nearest (a cast truncates toward zero).
    let n = (x * LOG2_E - 0.5) as i32;
    let nf = n as f32;
    let r = x - nf * 0.693_359_4 + nf * 2.121_944_4e-4;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    e_r * f32::from_bits(((n + 127) as u32) << 23)
}

/// Eight running lanes, so the reduction vectorizes.
#[inline(always)]
pub(crate) fn lanes_sum(values: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += x;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[inline(always)]
pub(crate) fn lanes_max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(x);
        }
    }
    lanes.iter().fold(tail, |m, &x| m.max(x))
}

pub(crate) fn simd_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(job: &Job, first: usize, out: &mut [f32]) {
    job.rows::<true>(first, out);
}

struct Job<'a> {
    w: &'a QuantizedMatrix,
    x: &'a [f32],
    m: usize,
    x_sums: Vec<f32>,
}

impl Job<'_> {
    /// Output rows `first..` into `out` (`m` values per row).
    #[inline(always)]
    fn rows<const FMA: bool>(&self, first: usize, out: &mut [f32]) {
        let w = self.w;
        let (k, group, m) = (w.cols, w.group, self.m);
        let groups = w.groups_per_row();
        let words = w.words_per_row();
        let words_per_group = group / w.codes_per_word();
        let four_bit = w.format.code_bits() == 4;
        let mut decoded = vec![0f32; if m > 1 { group } else { 0 }];
        for (local, out) in out.chunks_exact_mut(m).enumerate() {
            let row = first + local;
            let codes = &w.codes[row * words..(row + 1) * words];
            for g in 0..groups {
                let words = &codes[g * words_per_group..(g + 1) * words_per_group];
                let scale = w.scales[row * groups + g];
                let offset = w.offsets.as_ref().map_or(0.0, |o| o[row * groups + g]);
                if m == 1 {
                    // Decode: one pass, codes decoded straight into the dot product.
                    let xs = &self.x[g * group..(g + 1) * group];
                    let dot = if four_bit {
                        dot4::<FMA>(words, xs)
                    } else {
                        dot8::<FMA>(words, xs)
                    };
                    out[0] += scale * dot + offset * self.x_sums.get(g).copied().unwrap_or(0.0);
                    continue;
                }
                // Several tokens: decode the group once, then one dot product per token.
                if four_bit {
                    decode4(words, &mut decoded);
                } else {
                    decode8(words, &mut decoded);
                }
                for (t, y) in out.iter_mut().enumerate() {
                    let xs = &self.x[t * k + g * group..t * k + (g + 1) * group];
                    let mut acc = scale * dot::<FMA>(&decoded, xs);
                    if offset != 0.0 {
                        acc += offset * self.x_sums[t * groups + g];
                    }
                    *y += acc;
                }
            }
        }
    }
}

#[inline(always)]
fn fma<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `Σ code·x` over 4-bit codes, eight lanes (one per nibble position) so it vectorizes.
#[inline(always)]
fn dot4<const FMA: bool>(words: &[u32], x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    for (&word, xs) in words.iter().zip(x.chunks_exact(8)) {
        for l in 0..8 {
            let code = ((word >> (4 * l)) & 0x0f) as i32 as f32;
            lanes[l] = fma::<FMA>(code, xs[l], lanes[l]);
        }
    }
    lanes.iter().sum()
}

/// `Σ code·x` over 8-bit codes, in eight lanes.
#[inline(always)]
fn dot8<const FMA: bool>(words: &[u32], x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    for (pair, xs) in words.chunks_exact(2).zip(x.chunks_exact(8)) {
        let bytes = [pair[0].to_le_bytes(), pair[1].to_le_bytes()];
        for l in 0..8 {
            let code = bytes[l / 4][l % 4] as i8 as f32;
            lanes[l] = fma::<FMA>(code, xs[l], lanes[l]);
        }
    }
    lanes.iter().sum()
}

#[inline(always)]
fn decode4(words: &[u32], out: &mut [f32]) {
    for (word, out) in words.iter().zip(out.chunks_exact_mut(8)) {
        for (i, y) in out.iter_mut().enumerate() {
            *y = ((word >> (4 * i)) & 0x0f) as i32 as f32;
        }
    }
}

#[inline(always)]
fn decode8(words: &[u32], out: &mut [f32]) {
    for (word, out) in words.iter().zip(out.chunks_exact_mut(4)) {
        for (y, byte) in out.iter_mut().zip(word.to_le_bytes()) {
            *y = byte as i8 as f32;
        }
    }
}

/// A dot product in eight independent lanes, so it vectorizes without reassociation.
#[inline(always)]
pub(crate) fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let split = a.len() / 8 * 8;
    for (a, b) in a[..split].chunks_exact(8).zip(b[..split].chunks_exact(8)) {
        for l in 0..8 {
            lanes[l] = fma::<FMA>(a[l], b[l], lanes[l]);
        }
    }
    let tail: f32 = a[split..].iter().zip(&b[split..]).map(|(a, b)| a * b).sum();
    lanes.iter().sum::<f32>() + tail
}

/// Decode with 8-bit activations, as llama.cpp does: `x` is quantized per block of 32
/// (`d = max|x| / 127`), so one 32-code block of 4-bit weights is a `maddubs` of unsigned
/// codes by signed activations, widened and scaled once: `scale·d·Σ q·c` (+ `offset·Σ x`,
/// with the exact f32 sums). The activations' rounding moves each output by at most
/// `Σ |w|·d/2` over its blocks.
#[cfg(target_arch = "x86_64")]
mod q8 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use rayon::prelude::*;

    use super::ROWS_PER_TASK;
    use crate::quant::QuantizedMatrix;

    const BLOCK: usize = 32;

    /// `x` in blocks of 32: the codes of the even positions, then of the odd ones (the order
    /// of the low and high nibbles of 16 packed bytes), and each block's scale.
    pub fn quantize_activations(x: &[f32]) -> (Vec<i8>, Vec<f32>) {
        let mut codes = vec![0i8; x.len()];
        let mut scales = Vec::with_capacity(x.len() / BLOCK);
        for (block, out) in x.chunks_exact(BLOCK).zip(codes.chunks_exact_mut(BLOCK)) {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = max / 127.0;
            let inverse = if d > 0.0 { 1.0 / d } else { 0.0 };
            for j in 0..BLOCK / 2 {
                out[j] = (block[2 * j] * inverse).round() as i8;
                out[BLOCK / 2 + j] = (block[2 * j + 1] * inverse).round() as i8;
            }
            scales.push(d);
        }
        (codes, scales)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gemv(w: &QuantizedMatrix, rows: Range<usize>, x: &[f32]) -> Vec<f32> {
        let (xq, xd) = quantize_activations(x);
        let x_sums: Vec<f32> = if w.offsets.is_some() {
            x.chunks_exact(w.group).map(|g| g.iter().sum()).collect()
        } else {
            Vec::new()
        };
        let mut out = vec![0f32; rows.len()];
        out.par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .for_each(|(task, out)| {
                let first = rows.start + task * ROWS_PER_TASK;
                for (local, y) in out.iter_mut().enumerate() {
                    // SAFETY: the caller checked AVX2 and FMA.
                    *y = unsafe { row(w, first + local, &xq, &xd, &x_sums) };
                }
            });
        out
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn row(w: &QuantizedMatrix, row: usize, xq: &[i8], xd: &[f32], x_sums: &[f32]) -> f32 {
        let words = w.words_per_row();
        let groups = w.groups_per_row();
        let blocks_per_group = w.group / BLOCK;
        let codes = &w.codes[row * words..(row + 1) * words];
        let low = _mm_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        let mut offset_part = 0f32;
        for g in 0..groups {
            let scale = w.scales[row * groups + g];
            for b in 0..blocks_per_group {
                let block = g * blocks_per_group + b;
                // 16 bytes = 32 codes; `block * 4` words in.
                let packed =
                    unsafe { _mm_loadu_si128(codes.as_ptr().add(block * 4) as *const __m128i) };
                let even = _mm_and_si128(packed, low);
                let odd = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
                let c = _mm256_set_m128i(odd, even);
                let q =
                    unsafe { _mm256_loadu_si256(xq.as_ptr().add(block * BLOCK) as *const __m256i) };
                let pairs = _mm256_maddubs_epi16(c, q);
                let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                acc = _mm256_fmadd_ps(sums, _mm256_set1_ps(scale * xd[block]), acc);
            }
            if let Some(offsets) = &w.offsets {
                offset_part += offsets[row * groups + g] * x_sums[g];
            }
        }
        let mut lanes = [0f32; 8];
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        lanes.iter().sum::<f32>() + offset_part
    }
}
