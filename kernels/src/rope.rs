//! Rotary position embeddings in the rotate-half layout as one pass each way on the CPU
//! (flex): `y = x·cos + rotate_half(x)·sin` with `rotate_half([a, b]) = [−b, a]`. burn's
//! composite is five passes forward (a negation, a concatenation, two products and a sum)
//! and more backward, for the queries and the keys of every layer. The kernel reads the
//! heads where the projection left them (`[batch, seq, heads, dim]` seen as
//! `[batch, heads, seq, dim]`), writes the rotated rows in the order attention reads them,
//! and hands backward's gradient back in the input's own order, so neither direction
//! copies a strided view.
//!
//! ```
//! use burn::tensor::{Device, Tensor};
//!
//! let device = Device::flex();
//! // One head, one position, dim 2: cos 0, sin 1 rotates (a, b) into (−b, a).
//! let x = Tensor::<4>::from_floats([[[[3.0, 4.0]]]], &device);
//! let cos = Tensor::<4>::zeros([1, 1, 1, 2], &device);
//! let sin = Tensor::<4>::ones([1, 1, 1, 2], &device);
//! let y = moera_kernels::rotate_half(&x, &cos, &sin).expect("flex runs the fused kernel");
//! assert_eq!(y.into_data().to_vec::<f32>().unwrap(), vec![-4.0, 3.0]);
//! ```

use burn::tensor::Tensor;

/// `x·cos + rotate_half(x)·sin` for `x` `[batch, heads, seq, dim]` (any strides) and
/// `cos`/`sin` `[1, 1, seq, dim]` (one row per position, shared by every sequence and
/// head); the result is laid out row by row. Gradients flow to `x` (the tables are
/// constants). `None` where no fused kernel runs on the tensors' device (GPUs, the
/// reference path, non-f32 tensors) or the shapes do not fit: the caller then runs burn's
/// ops.
pub fn rotate_half(x: &Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Option<Tensor<4>> {
    #[cfg(feature = "flex")]
    {
        let [_, _, seq, dim] = x.dims();
        let tables_fit = cos.dims() == [1, 1, seq, dim] && sin.dims() == [1, 1, seq, dim];
        let f32s = [x, cos, sin]
            .iter()
            .all(|t| t.dtype() == burn::tensor::DType::F32);
        let tracked_tables = cos.is_require_grad() || sin.is_require_grad();
        if tables_fit
            && dim > 0
            && dim.is_multiple_of(2)
            && f32s
            && !tracked_tables
            && crate::flex::runs_fused(&x.device())
        {
            let y = <burn::backend::Dispatch as flex::FusedRopeOps>::rotate_half(
                x.clone().into_dispatch(),
                cos.clone().into_dispatch(),
                sin.clone().into_dispatch(),
            );
            return Some(Tensor::from_dispatch(y));
        }
    }
    let _ = (x, cos, sin);
    None
}

#[cfg(feature = "flex")]
mod host {
    //! The row loops over `[batch, heads, seq, dim]` tensors whose rows (`dim` values) are
    //! contiguous but whose heads and positions may come in either order.

    use rayon::prelude::*;

    /// Where each row of a `[batch, heads, seq, dim]` tensor starts in its buffer.
    #[derive(Debug, Clone, Copy)]
    pub(super) struct Rows {
        pub offset: usize,
        /// Strides of the batch, head and position axes.
        pub strides: [usize; 3],
        pub heads: usize,
        pub seq: usize,
    }

    impl Rows {
        /// Rows in `[batch, heads, seq]` order.
        pub fn heads_major(heads: usize, seq: usize, dim: usize) -> Self {
            Self {
                offset: 0,
                strides: [heads * seq * dim, seq * dim, dim],
                heads,
                seq,
            }
        }

        /// Rows in `[batch, seq, heads]` order (a projection's output split into heads).
        pub fn seq_major(heads: usize, seq: usize, dim: usize) -> Self {
            Self {
                offset: 0,
                strides: [heads * seq * dim, dim, heads * dim],
                heads,
                seq,
            }
        }

        /// The start of row `row` of the `[batch, heads, seq]` order, and its position.
        fn start(&self, row: usize) -> (usize, usize) {
            let position = row % self.seq;
            let head = (row / self.seq) % self.heads;
            let batch = row / (self.seq * self.heads);
            let [b, h, s] = self.strides;
            (self.offset + batch * b + head * h + position * s, position)
        }
    }

    /// Rows per rayon task.
    const ROWS: usize = 64;

    /// `out[row] = rotate(input[row])` for every row, with `out` in `out_rows`' order and
    /// `rotate(row, position, out)` writing one row.
    fn for_each_row(
        input: &[f32],
        input_rows: Rows,
        out_rows: Rows,
        rows: usize,
        dim: usize,
        rotate: impl Fn(&[f32], usize, &mut [f32]) + Sync,
    ) -> Vec<f32> {
        let mut out = vec![0f32; rows * dim];
        let contiguous_out = out_rows.strides[2] == dim;
        if contiguous_out {
            out.par_chunks_mut(ROWS * dim)
                .enumerate()
                .for_each(|(task, chunk)| {
                    for (i, out) in chunk.chunks_mut(dim).enumerate() {
                        let (start, position) = input_rows.start(task * ROWS + i);
                        rotate(&input[start..start + dim], position, out);
                    }
                });
        } else {
            // Written in the input's order, so each task's output rows are one block.
            let out_ptr = SendPtr(out.as_mut_ptr());
            (0..rows.div_ceil(ROWS)).into_par_iter().for_each(|task| {
                for row in task * ROWS..((task + 1) * ROWS).min(rows) {
                    let (start, position) = input_rows.start(row);
                    let (target, _) = out_rows.start(row);
                    // SAFETY: `out_rows` maps distinct rows to distinct, in-bounds `dim`-wide
                    // ranges of `out` (a permutation of its rows), so no two tasks write the
                    // same values, and `out` outlives the parallel loop.
                    let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.at(target), dim) };
                    rotate(&input[start..start + dim], position, out);
                }
            });
        }
        out
    }

    #[derive(Clone, Copy)]
    struct SendPtr(*mut f32);
    // SAFETY: used only to write disjoint rows from rayon tasks (see `for_each_row`).
    unsafe impl Send for SendPtr {}
    unsafe impl Sync for SendPtr {}

    impl SendPtr {
        fn at(self, offset: usize) -> *mut f32 {
            // SAFETY: the caller keeps `offset` inside the allocation.
            unsafe { self.0.add(offset) }
        }
    }

    /// `y = x·cos + [−x₂, x₁]·sin`, rows of `y` in `[batch, heads, seq]` order.
    pub(super) fn forward(
        x: &[f32],
        x_rows: Rows,
        cos: &[f32],
        sin: &[f32],
        rows: usize,
        dim: usize,
    ) -> Vec<f32> {
        let half = dim / 2;
        let out_rows = Rows::heads_major(x_rows.heads, x_rows.seq, dim);
        for_each_row(x, x_rows, out_rows, rows, dim, |x, position, y| {
            let table = position * dim..(position + 1) * dim;
            let (cos, sin) = (&cos[table.clone()], &sin[table]);
            let (x1, x2) = x.split_at(half);
            let (y1, y2) = y.split_at_mut(half);
            for i in 0..half {
                y1[i] = x1[i] * cos[i] - x2[i] * sin[i];
                y2[i] = x2[i] * cos[half + i] + x1[i] * sin[half + i];
            }
        })
    }

    /// `∂x` of [`forward`] from `∂y` (rows in `[batch, heads, seq]` order), written in
    /// `out_rows`' order: `∂x₁ = ∂y₁·cos₁ + ∂y₂·sin₂`, `∂x₂ = ∂y₂·cos₂ − ∂y₁·sin₁`.
    pub(super) fn backward(
        d_y: &[f32],
        out_rows: Rows,
        cos: &[f32],
        sin: &[f32],
        rows: usize,
        dim: usize,
    ) -> Vec<f32> {
        let half = dim / 2;
        let d_y_rows = Rows::heads_major(out_rows.heads, out_rows.seq, dim);
        for_each_row(d_y, d_y_rows, out_rows, rows, dim, |d_y, position, d_x| {
            let table = position * dim..(position + 1) * dim;
            let (cos, sin) = (&cos[table.clone()], &sin[table]);
            let (d_y1, d_y2) = d_y.split_at(half);
            let (d_x1, d_x2) = d_x.split_at_mut(half);
            for i in 0..half {
                d_x1[i] = d_y1[i] * cos[i] + d_y2[i] * sin[half + i];
                d_x2[i] = d_y2[i] * cos[half + i] - d_y1[i] * sin[i];
            }
        })
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::flex::FlexTensor;
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{Autodiff, Backend, Flex, TensorMetadata, backend_extension};

    use super::host::{self, Rows};
    use crate::flex::{host as contiguous, tensor, values};

    /// The fused rotary embedding (see [`super::rotate_half`]).
    #[backend_extension(Flex, Autodiff)]
    pub trait FusedRopeOps: burn::backend::Backend {
        fn rotate_half(
            x: FloatTensor<Self>,
            cos: FloatTensor<Self>,
            sin: FloatTensor<Self>,
        ) -> FloatTensor<Self>;
    }

    /// Which order `x`'s rows come in, so that backward writes its gradient in the same one.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Order {
        HeadsMajor,
        SeqMajor,
    }

    pub trait RopeKernels: Backend {
        /// `y` `[batch, heads, seq, dim]` row by row, and the order of `x`'s rows.
        fn rope_forward(
            x: FloatTensor<Self>,
            cos: FloatTensor<Self>,
            sin: FloatTensor<Self>,
        ) -> (FloatTensor<Self>, Order);

        /// `∂x` `[batch, heads, seq, dim]`, stored in `order`.
        fn rope_backward(
            d_y: FloatTensor<Self>,
            cos: FloatTensor<Self>,
            sin: FloatTensor<Self>,
            order: Order,
        ) -> FloatTensor<Self>;
    }

    /// `x`'s rows read in place when each is contiguous and its strides are non-negative,
    /// else a row-major copy.
    fn rows_of(x: &FlexTensor) -> (FlexTensor, Rows, Order) {
        let shape = x.shape();
        let (heads, seq, dim) = (shape[1], shape[2], shape[3]);
        let layout = x.layout();
        let strides: Option<Vec<usize>> = layout
            .strides()
            .iter()
            .map(|&s| usize::try_from(s).ok())
            .collect();
        if let Some(s) = strides.filter(|s| s[3] == 1) {
            let rows = Rows {
                offset: layout.start_offset(),
                strides: [s[0], s[1], s[2]],
                heads,
                seq,
            };
            let order = match s[1] < s[2] && heads > 1 {
                true => Order::SeqMajor,
                false => Order::HeadsMajor,
            };
            return (x.clone(), rows, order);
        }
        (
            contiguous(x),
            Rows::heads_major(heads, seq, dim),
            Order::HeadsMajor,
        )
    }

    impl RopeKernels for Flex {
        fn rope_forward(x: FlexTensor, cos: FlexTensor, sin: FlexTensor) -> (FlexTensor, Order) {
            let shape = x.shape().to_vec();
            let (x, rows, order) = rows_of(&x);
            let (cos, sin) = (contiguous(&cos), contiguous(&sin));
            let storage = x.storage::<f32>();
            let count = shape[0] * shape[1] * shape[2];
            let y = host::forward(storage, rows, values(&cos), values(&sin), count, shape[3]);
            (tensor(y, shape), order)
        }

        fn rope_backward(
            d_y: FlexTensor,
            cos: FlexTensor,
            sin: FlexTensor,
            order: Order,
        ) -> FlexTensor {
            let [d_y, cos, sin] = [d_y, cos, sin].map(|t| contiguous(&t));
            let shape = d_y.shape().to_vec();
            let [batch, heads, seq, dim] = [shape[0], shape[1], shape[2], shape[3]];
            let out_rows = match order {
                Order::HeadsMajor => Rows::heads_major(heads, seq, dim),
                Order::SeqMajor => Rows::seq_major(heads, seq, dim),
            };
            let count = batch * heads * seq;
            let d_x = host::backward(
                values(&d_y),
                out_rows,
                values(&cos),
                values(&sin),
                count,
                dim,
            );
            match order {
                Order::HeadsMajor => tensor(d_x, shape),
                // Stored as [batch, seq, heads, dim], seen as [batch, heads, seq, dim].
                Order::SeqMajor => tensor(d_x, vec![batch, seq, heads, dim]).transpose(1, 2),
            }
        }
    }

    impl FusedRopeOps for Flex {
        fn rotate_half(x: FlexTensor, cos: FlexTensor, sin: FlexTensor) -> FlexTensor {
            Self::rope_forward(x, cos, sin).0
        }
    }

    /// The tables and the order of `x`'s rows.
    #[derive(Debug, Clone)]
    struct Saved<B: Backend> {
        cos: FloatTensor<B>,
        sin: FloatTensor<B>,
        order: Order,
    }

    #[derive(Debug)]
    struct RopeBackward;

    impl<B: Backend + RopeKernels> Backward<B, 1> for RopeBackward {
        type State = Saved<B>;

        fn backward(
            self,
            ops: Ops<Self::State, 1>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let d_y = grads.consume::<B>(&ops.node);
            let [node_x] = ops.parents;
            if let Some(node) = node_x {
                let s = ops.state;
                grads.register::<B>(node.id, B::rope_backward(d_y, s.cos, s.sin, s.order));
            }
        }
    }

    impl<B: Backend + RopeKernels, C: CheckpointStrategy> FusedRopeOps for Autodiff<B, C> {
        fn rotate_half(
            x: FloatTensor<Self>,
            cos: FloatTensor<Self>,
            sin: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            let guards = [x.node()];
            let (cos, sin) = (cos.into_primitive(), sin.into_primitive());
            let (y, order) = B::rope_forward(x.into_primitive(), cos.clone(), sin.clone());
            match RopeBackward.prepare::<C>(guards).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish(Saved { cos, sin, order }, y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            }
        }
    }
}
