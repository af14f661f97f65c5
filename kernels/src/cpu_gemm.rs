//! Row-major f32 matrix products on the CPU through the `gemm` crate (the AVX-512/AVX2
//! kernels burn-flex's matmul also runs), on strided views of plain slices.

/// A strided read-only matrix.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> View<'a> {
    /// The first `rows × cols` values of `data`, row by row.
    pub(crate) fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// `rows × cols` values of `data`, element `(r, c)` at `r·row_stride + c·col_stride`.
    pub(crate) fn strided(
        data: &'a [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// Whether rows are stored one after another (each row contiguous).
    pub(crate) fn is_row_major(&self) -> bool {
        self.col_stride == 1 && self.row_stride == self.cols
    }

    /// Rows `first..first + rows`.
    pub(crate) fn rows_from(self, first: usize, rows: usize) -> Self {
        assert!(first + rows <= self.rows, "rows out of range");
        let offset = if rows == 0 {
            0
        } else {
            first * self.row_stride
        };
        Self {
            data: &self.data[offset.min(self.data.len())..],
            rows,
            ..self
        }
    }

    /// Columns `first..first + cols`.
    pub(crate) fn cols_from(self, first: usize, cols: usize) -> Self {
        self.t().rows_from(first, cols).t()
    }

    pub(crate) fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// Writes `src` transposed into `dst` (row-major `[src.cols, src.rows]`), in parallel over
/// bands of output rows; each band reads short runs of every source row.
pub(crate) fn transpose(src: View, dst: &mut [f32]) {
    use rayon::prelude::*;
    const BAND: usize = 32;
    let rows = src.rows;
    assert!(dst.len() >= rows * src.cols && src.in_bounds());
    dst[..rows * src.cols]
        .par_chunks_mut(BAND * rows)
        .enumerate()
        .for_each(|(band, out)| {
            let first = band * BAND;
            for r in 0..rows {
                for (c, row) in out.chunks_exact_mut(rows).enumerate() {
                    row[r] = src.data[r * src.row_stride + (first + c) * src.col_stride];
                }
            }
        });
}

/// `dst = alpha·lhs·rhs` (`+ dst` with `accumulate`), `dst` row-major `[lhs.rows, rhs.cols]`,
/// on the calling thread.
pub(crate) fn gemm(dst: &mut [f32], lhs: View, rhs: View, alpha: f32, accumulate: bool) {
    gemm_with(dst, lhs, rhs, alpha, accumulate, ::gemm::Parallelism::None);
}

/// [`gemm`] spread over rayon's threads, for products large enough to share. A thin
/// product (a LoRA factor's: one side at most [`THIN`] wide) is split into one block of
/// output rows or columns per thread, each a single-threaded product: gemm's own threading
/// of such shapes ran slower on two threads than on one.
pub(crate) fn gemm_parallel(dst: &mut [f32], lhs: View, rhs: View, alpha: f32, accumulate: bool) {
    let threads = rayon::current_num_threads();
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    let thin = m.min(n).min(k) <= THIN;
    if threads < 2 || !thin || m.saturating_mul(n).saturating_mul(k) < SPLIT_WORK {
        let parallelism = match threads {
            0 | 1 => ::gemm::Parallelism::None,
            _ => ::gemm::Parallelism::Rayon(threads),
        };
        gemm_with(dst, lhs, rhs, alpha, accumulate, parallelism);
        return;
    }
    assert!(dst.len() >= m * n, "destination too small");
    use rayon::prelude::*;
    if m >= n {
        let block = m.div_ceil(threads);
        dst[..m * n]
            .par_chunks_mut(block * n)
            .enumerate()
            .for_each(|(i, dst)| {
                let lhs = lhs.rows_from(i * block, dst.len() / n);
                gemm_with(dst, lhs, rhs, alpha, accumulate, ::gemm::Parallelism::None);
            });
    } else {
        let block = n.div_ceil(threads);
        let dst = SharedDst(dst.as_mut_ptr());
        (0..n.div_ceil(block)).into_par_iter().for_each(|i| {
            let (first, cols) = (i * block, block.min(n - i * block));
            let rhs = rhs.cols_from(first, cols);
            // SAFETY: each task writes the columns `first..first + cols` of the `m × n`
            // row-major destination (checked to fit above), which no other task touches,
            // and the destination is borrowed mutably for the whole loop.
            unsafe {
                gemm_raw(
                    dst.at(first),
                    n,
                    lhs,
                    rhs,
                    alpha,
                    accumulate,
                    ::gemm::Parallelism::None,
                );
            }
        });
    }
}

/// The narrowest side at which a product counts as thin for [`gemm_parallel`].
const THIN: usize = 32;

/// Below this many multiply-adds a thin product runs on the calling thread alone.
const SPLIT_WORK: usize = 1 << 16;

/// The destination of [`gemm_parallel`]'s column blocks, shared by its tasks.
#[derive(Clone, Copy)]
struct SharedDst(*mut f32);
// SAFETY: the tasks write disjoint columns (see `gemm_parallel`).
unsafe impl Send for SharedDst {}
unsafe impl Sync for SharedDst {}

impl SharedDst {
    /// The destination's value `offset`; a method, so that closures capture the whole
    /// (shareable) struct rather than its raw pointer.
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

fn gemm_with(
    dst: &mut [f32],
    lhs: View,
    rhs: View,
    alpha: f32,
    accumulate: bool,
    parallelism: ::gemm::Parallelism,
) {
    let (m, n) = (lhs.rows, rhs.cols);
    assert!(dst.len() >= m * n, "destination too small");
    // SAFETY: `dst` holds the `m × n` row-major destination (checked above) and, borrowed
    // mutably, aliases neither input.
    unsafe {
        gemm_raw(
            dst.as_mut_ptr(),
            n,
            lhs,
            rhs,
            alpha,
            accumulate,
            parallelism,
        )
    }
}

/// `dst = alpha·lhs·rhs` (`+ dst` with `accumulate`) with `dst` row `r` at
/// `dst + r·dst_row_stride`.
///
/// # Safety
/// `dst` must be valid for writes of `lhs.rows` rows of `rhs.cols` values at that stride,
/// overlap neither input, and not be written by anyone else meanwhile.
unsafe fn gemm_raw(
    dst: *mut f32,
    dst_row_stride: usize,
    lhs: View,
    rhs: View,
    alpha: f32,
    accumulate: bool,
    parallelism: ::gemm::Parallelism,
) {
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    assert_eq!(rhs.rows, k, "inner dimensions");
    assert!(lhs.in_bounds() && rhs.in_bounds());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in 0..m {
                // SAFETY: row `row` of the destination is valid for `n` writes (caller).
                unsafe { std::slice::from_raw_parts_mut(dst.add(row * dst_row_stride), n) }
                    .fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the inputs lie inside their slices (checked above); the destination is the
    // caller's to write.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `alpha·lhs·rhs (+ dst)` by the definition, in f64.
    fn naive(dst: &[f32], lhs: View, rhs: View, alpha: f32, accumulate: bool) -> Vec<f32> {
        let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
        let at = |v: &View, r: usize, c: usize| v.data[r * v.row_stride + c * v.col_stride] as f64;
        let mut out = vec![0f32; m * n];
        for r in 0..m {
            for c in 0..n {
                let sum: f64 = (0..k).map(|i| at(&lhs, r, i) * at(&rhs, i, c)).sum();
                let base = if accumulate {
                    dst[r * n + c] as f64
                } else {
                    0.0
                };
                out[r * n + c] = (base + alpha as f64 * sum) as f32;
            }
        }
        out
    }

    fn values(seed: u32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
            .collect()
    }

    /// Thin products split by rows (`m ≥ n`) and by columns (`m < n`), with transposed
    /// operands, a scale and accumulation, on two threads, against the definition.
    #[test]
    fn thin_products_split_across_threads_match_the_definition() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        // (m, k, n): x·A, (x·A)·B, ∂A = xᵀ·∂(xA), ∂B = (xA)ᵀ·∂y, and an odd split.
        let shapes = [
            (301, 96, 8),
            (301, 8, 97),
            (96, 301, 8),
            (8, 301, 97),
            (7, 1000, 33),
        ];
        for (m, k, n) in shapes {
            assert!(m * n * k >= SPLIT_WORK && m.min(n).min(k) <= THIN);
            for transposed in [false, true] {
                let (a, b) = (values(1, m * k), values(2, k * n));
                let lhs = match transposed {
                    false => View::row_major(&a, m, k),
                    true => View::row_major(&a, k, m).t(),
                };
                let rhs = match transposed {
                    false => View::row_major(&b, k, n),
                    true => View::row_major(&b, n, k).t(),
                };
                for accumulate in [false, true] {
                    let mut dst = values(3, m * n);
                    let expected = naive(&dst, lhs, rhs, 0.75, accumulate);
                    pool.install(|| gemm_parallel(&mut dst, lhs, rhs, 0.75, accumulate));
                    let worst = dst
                        .iter()
                        .zip(&expected)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(worst < 1e-4, "{m}×{k}×{n} transposed {transposed}: {worst}");
                }
            }
        }
    }
}
