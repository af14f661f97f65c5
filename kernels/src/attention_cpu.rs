//! Causal attention on the CPU as one operation, forward and backward, over row-major f32
//! slices: no `[seq, seq]` score tensor is kept, key blocks after a query block are never
//! multiplied, and the backward pass recomputes the probabilities from each row's
//! log-sum-exp (FlashAttention-2's recurrence, blocked by query rows).
//!
//! Forward, per head and block of query rows `Q` over the keys `K`, values `V` they see:
//! `P = softmax(scale·QKᵀ)` (masked), `O = P·V`, `lse = log Σ exp(scale·QKᵀ)`.
//! Backward, with `Δ = rowsum(dO ∘ O)`: `dV += Pᵀ·dO`, `dP = dO·Vᵀ`,
//! `dS = P ∘ (dP − Δ)·scale`, `dQ = dS·K`, `dK += dSᵀ·Q`.

use std::ops::Range;

use rayon::prelude::*;

use crate::cpu::{dot, exp_nonpositive, lanes_max, lanes_sum, simd_available};
use crate::cpu_gemm::{View, gemm};

/// Query rows per block: a block's scores (`BLOCK × keys` floats) stay in L2.
const BLOCK: usize = 64;

/// What one fused attention call computes. Tensors are row-major: queries
/// `[batch, heads, queries, head_dim]`, keys `[batch, kv_heads, keys, head_dim]`, values
/// `[batch, kv_heads, keys, value_dim]`; query head `h` reads key/value head
/// `h / (heads / kv_heads)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Problem {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub queries: usize,
    pub keys: usize,
    pub head_dim: usize,
    pub value_dim: usize,
    pub scale: f32,
    /// Position of the first query; query `i` sees keys `..= start + i`.
    pub start: usize,
    /// With a window, only the last `window` of those keys.
    pub window: Option<usize>,
}

impl Problem {
    /// The keys query row `i` sees.
    fn visible(&self, i: usize) -> Range<usize> {
        let end = (self.start + i + 1).min(self.keys);
        let first = self
            .window
            .map_or(0, |w| (self.start + i + 1).saturating_sub(w));
        first.min(end)..end
    }

    /// The keys any of rows `rows` sees (rows are non-empty).
    fn visible_span(&self, rows: &Range<usize>) -> Range<usize> {
        let (first, last) = (self.visible(rows.start), self.visible(rows.end - 1));
        first.start..last.end.max(first.start)
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn query_len(&self) -> usize {
        self.batch * self.heads * self.queries * self.head_dim
    }

    fn key_len(&self) -> usize {
        self.batch * self.kv_heads * self.keys * self.head_dim
    }

    fn value_len(&self) -> usize {
        self.batch * self.kv_heads * self.keys * self.value_dim
    }

    fn output_len(&self) -> usize {
        self.batch * self.heads * self.queries * self.value_dim
    }

    /// The key and value rows of query head `bh` (`batch · heads + head`) in `span`.
    fn kv_rows<'a>(
        &self,
        keys: &'a [f32],
        values: &'a [f32],
        bh: usize,
        span: &Range<usize>,
    ) -> (View<'a>, View<'a>) {
        let kv = (bh / self.heads) * self.kv_heads + (bh % self.heads) / self.group();
        let first = kv * self.keys + span.start;
        let k = &keys[first * self.head_dim..(first + span.len()) * self.head_dim];
        let v = &values[first * self.value_dim..(first + span.len()) * self.value_dim];
        (
            View::row_major(k, span.len(), self.head_dim),
            View::row_major(v, span.len(), self.value_dim),
        )
    }

    fn check(&self, q: &[f32], k: &[f32], v: &[f32]) {
        assert!(self.kv_heads > 0 && self.heads.is_multiple_of(self.kv_heads));
        assert_eq!(q.len(), self.query_len(), "queries");
        assert_eq!(k.len(), self.key_len(), "keys");
        assert_eq!(v.len(), self.value_len(), "values");
    }
}

/// The attention output `[batch, heads, queries, value_dim]` and each query row's
/// log-sum-exp of its scaled scores `[batch, heads, queries]` (−∞ for a row that sees no
/// key, whose output is zero).
pub(crate) fn forward(p: &Problem, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    p.check(q, k, v);
    let (rows, dq, dv) = (p.queries, p.head_dim, p.value_dim);
    let mut out = vec![0f32; p.output_len()];
    let mut lse = vec![0f32; p.batch * p.heads * rows];
    if rows == 0 {
        return (out, lse);
    }
    // One task per head and block of query rows.
    let mut tasks = Vec::new();
    for (head, (mut out, mut lse)) in out
        .chunks_mut(rows * dv)
        .zip(lse.chunks_mut(rows))
        .enumerate()
    {
        for first in (0..rows).step_by(BLOCK) {
            let range = first..(first + BLOCK).min(rows);
            let (block_out, rest_out) = out.split_at_mut(range.len() * dv);
            let (block_lse, rest_lse) = lse.split_at_mut(range.len());
            (out, lse) = (rest_out, rest_lse);
            tasks.push(ForwardTask {
                head,
                range,
                out: block_out,
                lse: block_lse,
            });
        }
    }
    tasks.into_par_iter().for_each(|task| {
        let ForwardTask {
            head,
            range,
            out,
            lse,
        } = task;
        let span = p.visible_span(&range);
        let queries = View::row_major(&q[(head * rows + range.start) * dq..], range.len(), dq);
        if span.is_empty() {
            lse.fill(f32::NEG_INFINITY);
            return;
        }
        let (keys, values) = p.kv_rows(k, v, head, &span);
        let width = span.len();
        let mut probs = vec![0f32; range.len() * width];
        gemm(&mut probs, queries, keys.t(), p.scale, false);
        for (r, (row, lse)) in probs
            .chunks_exact_mut(width)
            .zip(lse.iter_mut())
            .enumerate()
        {
            *lse = softmax_row(row, local(p.visible(range.start + r), &span));
        }
        gemm(
            out,
            View::row_major(&probs, range.len(), width),
            values,
            1.0,
            false,
        );
    });
    (out, lse)
}

/// One block of query rows of one head (`batch · heads + head`) and its outputs.
struct ForwardTask<'a> {
    head: usize,
    range: Range<usize>,
    out: &'a mut [f32],
    lse: &'a mut [f32],
}

/// Gradients `(dq, dk, dv)` of [`forward`] for the output gradient `d_out`.
pub(crate) fn backward(
    p: &Problem,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    d_out: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    p.check(q, k, v);
    assert_eq!(out.len(), p.output_len(), "output");
    assert_eq!(d_out.len(), p.output_len(), "output gradient");
    let (rows, dq_width, dv_width) = (p.queries, p.head_dim, p.value_dim);
    let mut d_q = vec![0f32; p.query_len()];
    if rows == 0 {
        return (d_q, vec![0f32; p.key_len()], vec![0f32; p.value_len()]);
    }
    // Each query head's share of its key/value head's gradients, summed over the group below.
    let per_head: Vec<(Vec<f32>, Vec<f32>)> = d_q
        .par_chunks_mut(rows * dq_width)
        .enumerate()
        .map(|(bh, d_q)| {
            let mut d_k = vec![0f32; p.keys * dq_width];
            let mut d_v = vec![0f32; p.keys * dv_width];
            let head_rows = bh * rows..(bh + 1) * rows;
            let out = &out[head_rows.start * dv_width..head_rows.end * dv_width];
            let d_out = &d_out[head_rows.start * dv_width..head_rows.end * dv_width];
            let lse = &lse[head_rows.clone()];
            let delta: Vec<f32> = out
                .chunks_exact(dv_width)
                .zip(d_out.chunks_exact(dv_width))
                .map(|(o, d)| dot::<false>(o, d))
                .collect();
            // One block's P and dS, reused by every block of this head.
            let mut probs = Vec::new();
            let mut d_scores = Vec::new();
            for first in (0..rows).step_by(BLOCK) {
                let range = first..(first + BLOCK).min(rows);
                let span = p.visible_span(&range);
                if span.is_empty() {
                    continue;
                }
                let width = span.len();
                let n = range.len();
                let queries = View::row_major(&q[(bh * rows + first) * dq_width..], n, dq_width);
                let d_out_block = View::row_major(&d_out[first * dv_width..], n, dv_width);
                let (keys, values) = p.kv_rows(k, v, bh, &span);
                // P, recomputed from the saved log-sum-exp.
                probs.resize(n * width, 0.0);
                gemm(&mut probs, queries, keys.t(), p.scale, false);
                for (r, row) in probs.chunks_exact_mut(width).enumerate() {
                    let visible = local(p.visible(first + r), &span);
                    probabilities_row(row, visible, lse[first + r]);
                }
                let probs_view = View::row_major(&probs, n, width);
                let key_rows = span.start * dv_width..span.end * dv_width;
                gemm(&mut d_v[key_rows], probs_view.t(), d_out_block, 1.0, true);
                // dS = P ∘ (dO·Vᵀ − Δ)·scale, written over dP.
                d_scores.resize(n * width, 0.0);
                gemm(&mut d_scores, d_out_block, values.t(), 1.0, false);
                for ((d_row, p_row), r) in d_scores
                    .chunks_exact_mut(width)
                    .zip(probs.chunks_exact(width))
                    .zip(range.clone())
                {
                    score_gradient_row(d_row, p_row, delta[r], p.scale);
                }
                let d_scores_view = View::row_major(&d_scores, n, width);
                let d_q_block = &mut d_q[first * dq_width..(first + n) * dq_width];
                gemm(d_q_block, d_scores_view, keys, 1.0, false);
                let key_rows = span.start * dq_width..span.end * dq_width;
                gemm(&mut d_k[key_rows], d_scores_view.t(), queries, 1.0, true);
            }
            (d_k, d_v)
        })
        .collect();
    let mut d_k = vec![0f32; p.key_len()];
    let mut d_v = vec![0f32; p.value_len()];
    let group = p.group();
    for (kv, (d_k, d_v)) in d_k
        .chunks_mut((p.keys * dq_width).max(1))
        .zip(d_v.chunks_mut((p.keys * dv_width).max(1)))
        .enumerate()
    {
        for (head_k, head_v) in &per_head[kv * group..(kv + 1) * group] {
            add_assign(d_k, head_k);
            add_assign(d_v, head_v);
        }
    }
    (d_q, d_k, d_v)
}

/// `range` relative to the start of `span`.
fn local(range: Range<usize>, span: &Range<usize>) -> Range<usize> {
    range.start - span.start..range.end - span.start
}

/// Softmax of `row[visible]` in place, zeros elsewhere; returns the log-sum-exp.
fn softmax_row(row: &mut [f32], visible: Range<usize>) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { softmax_row_avx2(row, visible) };
    }
    softmax_row_portable(row, visible)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx2(row: &mut [f32], visible: Range<usize>) -> f32 {
    softmax_row_portable(row, visible)
}

#[inline(always)]
fn softmax_row_portable(row: &mut [f32], visible: Range<usize>) -> f32 {
    if visible.is_empty() {
        row.fill(0.0);
        return f32::NEG_INFINITY;
    }
    row[..visible.start].fill(0.0);
    row[visible.end..].fill(0.0);
    let values = &mut row[visible];
    let max = lanes_max(values);
    for x in values.iter_mut() {
        *x = exp_nonpositive(*x - max);
    }
    let sum = lanes_sum(values);
    let inverse = 1.0 / sum;
    for x in values.iter_mut() {
        *x *= inverse;
    }
    max + sum.ln()
}

/// `exp(row − lse)` on `row[visible]`, zeros elsewhere.
fn probabilities_row(row: &mut [f32], visible: Range<usize>, lse: f32) {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: the CPU has AVX2 and FMA.
        unsafe { probabilities_row_avx2(row, visible, lse) };
        return;
    }
    probabilities_row_portable(row, visible, lse);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn probabilities_row_avx2(row: &mut [f32], visible: Range<usize>, lse: f32) {
    probabilities_row_portable(row, visible, lse);
}

#[inline(always)]
fn probabilities_row_portable(row: &mut [f32], visible: Range<usize>, lse: f32) {
    row[..visible.start].fill(0.0);
    row[visible.end..].fill(0.0);
    for x in row[visible].iter_mut() {
        // Scores never exceed their log-sum-exp; `min` guards rounding.
        *x = exp_nonpositive((*x - lse).min(0.0));
    }
}

/// `d = p·(d − delta)·scale`, elementwise.
fn score_gradient_row(d: &mut [f32], p: &[f32], delta: f32, scale: f32) {
    for (d, &p) in d.iter_mut().zip(p) {
        *d = p * (*d - delta) * scale;
    }
}

fn add_assign(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}
