//! The output layer and its cross-entropy as one CPU operation: `Σ_r w_r·(lse_r − z_r,t_r)`
//! with `z = x·W`, and in the same pass the gradients of that sum for `x` and `W`
//! (`∂z = w·(softmax(z) − onehot(t))`, `∂x = ∂z·Wᵀ`, `∂W = xᵀ·∂z`). The logits of a block
//! of rows live only while that block is processed: no `[rows, vocab]` tensor, its
//! log-softmax, gather and their backward, each a pass over it.

use rayon::prelude::*;

use crate::cpu::{exp_nonpositive, simd_available};
use crate::cpu_gemm::{View, gemm_parallel, transpose};

/// Rows whose logits are held at once (`ROWS × vocab` floats).
const ROWS: usize = 256;

/// One call: `x` `[rows, hidden]` (row-major), `weight` `[hidden, vocab]`, a target and
/// a weight per row (rows weighted 0 contribute nothing).
pub(crate) struct Problem<'a> {
    pub x: &'a [f32],
    pub weight: View<'a>,
    pub targets: &'a [u32],
    pub row_weights: &'a [f32],
}

/// The weighted loss, and the gradients asked for.
pub(crate) struct Output {
    pub loss: f32,
    /// `[rows, hidden]`.
    pub d_x: Option<Vec<f32>>,
    /// `[hidden, vocab]`.
    pub d_weight: Option<Vec<f32>>,
}

pub(crate) fn forward(p: &Problem, want_d_x: bool, want_d_weight: bool) -> Output {
    let weight = p.weight;
    let (hidden, vocab, rows) = (weight.rows(), weight.cols(), p.targets.len());
    assert_eq!(p.x.len(), rows * hidden, "one input row per target");
    assert_eq!(p.row_weights.len(), rows, "one weight per target");
    assert!(p.targets.iter().all(|&t| (t as usize) < vocab), "targets");
    let mut d_x = want_d_x.then(|| vec![0f32; rows * hidden]);
    let mut d_weight = want_d_weight.then(|| vec![0f32; hidden * vocab]);
    let mut logits = vec![0f32; ROWS.min(rows) * vocab];
    // Buffers for `∂x` through `∂zᵀ` (see below), when the weight is row-major.
    let mut transposed = (want_d_x && weight.is_row_major()).then(|| {
        (
            vec![0f32; ROWS.min(rows) * vocab],
            vec![0f32; ROWS.min(rows) * hidden],
        )
    });
    let mut loss = 0f64;
    for first in (0..rows).step_by(ROWS) {
        let n = ROWS.min(rows - first);
        let x = View::row_major(&p.x[first * hidden..(first + n) * hidden], n, hidden);
        let logits = &mut logits[..n * vocab];
        gemm_parallel(logits, x, weight, 1.0, false);
        let targets = &p.targets[first..first + n];
        let row_weights = &p.row_weights[first..first + n];
        loss += logits
            .par_chunks_mut(vocab)
            .zip(targets.par_iter().zip(row_weights))
            .map(|(row, (&target, &w))| row_loss_and_gradient(row, target as usize, w) as f64)
            .sum::<f64>();
        let d_logits = View::row_major(logits, n, vocab);
        if let Some(d_x) = &mut d_x {
            let d_x = &mut d_x[first * hidden..(first + n) * hidden];
            match &mut transposed {
                // `∂z·Wᵀ` with a row-major `W` is the product gemm's AVX-512 kernels run at
                // half speed (they repack `W` for every block of rows); `(W·∂zᵀ)ᵀ` from a
                // transposed copy of `∂z` runs at full speed.
                Some((d_logits_t, d_x_t)) => {
                    let (d_logits_t, d_x_t) =
                        (&mut d_logits_t[..vocab * n], &mut d_x_t[..hidden * n]);
                    transpose(d_logits, d_logits_t);
                    let d_logits_t = View::row_major(d_logits_t, vocab, n);
                    gemm_parallel(d_x_t, weight, d_logits_t, 1.0, false);
                    transpose(View::row_major(d_x_t, hidden, n), d_x);
                }
                None => gemm_parallel(d_x, d_logits, weight.t(), 1.0, false),
            }
        }
        if let Some(d_weight) = &mut d_weight {
            gemm_parallel(d_weight, x.t(), d_logits, 1.0, true);
        }
    }
    Output {
        loss: loss as f32,
        d_x,
        d_weight,
    }
}

/// Turns a row of logits into its loss gradient `w·(softmax − onehot(target))` in place;
/// returns `w·(lse − z_target)`.
fn row_loss_and_gradient(row: &mut [f32], target: usize, w: f32) -> f32 {
    if w == 0.0 {
        row.fill(0.0);
        return 0.0;
    }
    let z_target = row[target];
    let (max, sum) = exp_shifted(row);
    let lse = max + sum.ln();
    let scale = w / sum;
    for x in row.iter_mut() {
        *x *= scale;
    }
    row[target] -= w;
    w * (lse - z_target)
}

/// `row = exp(row − max)`; returns `(max, Σ row)`.
fn exp_shifted(row: &mut [f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { exp_shifted_avx2(row) };
    }
    exp_shifted_portable(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(row: &mut [f32]) -> (f32, f32) {
    exp_shifted_portable(row)
}

#[inline(always)]
fn exp_shifted_portable(row: &mut [f32]) -> (f32, f32) {
    let max = crate::cpu::lanes_max(row);
    for x in row.iter_mut() {
        *x = exp_nonpositive(*x - max);
    }
    (max, crate::cpu::lanes_sum(row))
}
