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

/// [`gemm`] spread over rayon's threads, for products large enough to share.
pub(crate) fn gemm_parallel(dst: &mut [f32], lhs: View, rhs: View, alpha: f32, accumulate: bool) {
    let threads = rayon::current_num_threads();
    gemm_with(
        dst,
        lhs,
        rhs,
        alpha,
        accumulate,
        ::gemm::Parallelism::Rayon(threads),
    );
}

fn gemm_with(
    dst: &mut [f32],
    lhs: View,
    rhs: View,
    alpha: f32,
    accumulate: bool,
    parallelism: ::gemm::Parallelism,
) {
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    assert_eq!(rhs.rows, k, "inner dimensions");
    assert!(dst.len() >= m * n && lhs.in_bounds() && rhs.in_bounds());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: the three matrices lie inside their slices (checked above) and `dst` does not
    // alias the inputs (it is borrowed mutably).
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
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
