//! RMS normalization `x / √(mean(x²) + ε) · w` over the last axis as one pass each way on
//! the CPU (flex): burn's composite is seven ops forward and about twice as many backward,
//! each a pass over the activations, twice per decoder layer.
//!
//! ```
//! use burn::tensor::{Device, Tensor};
//!
//! let device = Device::flex();
//! let x = Tensor::<2>::from_floats([[3.0, 4.0]], &device);
//! let weight = Tensor::<1>::from_floats([1.0, 2.0], &device);
//! let y = moera_kernels::rms_norm(x, weight, 0.0).into_data().to_vec::<f32>().unwrap();
//! // The root mean square of (3, 4) is √12.5.
//! let rms = 12.5f32.sqrt();
//! assert!((y[0] - 3.0 / rms).abs() < 1e-6 && (y[1] - 8.0 / rms).abs() < 1e-6);
//! ```

use burn::tensor::{DType, Tensor};

/// `x / √(mean(x²) + eps) · weight` over `x`'s last axis (`weight` as wide); on flex (with
/// or without autodiff) the fused kernel, elsewhere burn's ops.
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f32) -> Tensor<D> {
    #[cfg(feature = "flex")]
    {
        let dims = x.dims();
        let width = dims[D - 1];
        let fused = weight.dims()[0] == width
            && width > 0
            && x.dtype() == DType::F32
            && weight.dtype() == DType::F32
            && crate::flex::runs_fused(&x.device());
        if fused {
            let rows = dims[..D - 1].iter().product::<usize>();
            let y = <burn::backend::Dispatch as flex::FusedNormOps>::rms_norm(
                x.reshape([rows, width]).into_dispatch(),
                weight.into_dispatch(),
                eps,
            );
            return Tensor::<2>::from_dispatch(y).reshape(dims);
        }
    }
    let inv_rms = x
        .clone()
        .square()
        .mean_dim(D - 1)
        .add_scalar(eps)
        .sqrt()
        .recip();
    x * inv_rms * weight.unsqueeze()
}

#[cfg(feature = "flex")]
mod host {
    //! The row loops.

    use rayon::prelude::*;

    use crate::cpu::dot;

    /// Rows per rayon task.
    const ROWS: usize = 16;

    /// `(y, r)` with `r` each row's `1/√(mean(x²) + ε)`.
    pub(super) fn forward(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
        let width = w.len();
        let rows = x.len() / width;
        let mut y = vec![0f32; x.len()];
        let mut r = vec![0f32; rows];
        y.par_chunks_mut(ROWS * width)
            .zip(r.par_chunks_mut(ROWS))
            .zip(x.par_chunks(ROWS * width))
            .for_each(|((y, r), x)| {
                for ((y, r), x) in y.chunks_mut(width).zip(r).zip(x.chunks(width)) {
                    *r = inverse_rms(x, eps);
                    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                        *y = x * *r * w;
                    }
                }
            });
        (y, r)
    }

    /// `(∂x, ∂w)`: with `u = ∂y ⊙ w`, `∂x = r·u − x·r³·(u·x)/width` per row and
    /// `∂w = Σ_rows ∂y ⊙ x·r`.
    pub(super) fn backward(
        x: &[f32],
        w: &[f32],
        r: &[f32],
        d_y: &[f32],
        want_d_w: bool,
    ) -> (Vec<f32>, Vec<f32>) {
        let width = w.len();
        let mut d_x = vec![0f32; x.len()];
        let d_w = d_x
            .par_chunks_mut(ROWS * width)
            .zip(x.par_chunks(ROWS * width))
            .zip(d_y.par_chunks(ROWS * width).zip(r.par_chunks(ROWS)))
            .fold(
                || vec![0f32; if want_d_w { width } else { 0 }],
                |mut d_w, ((d_x, x), (d_y, r))| {
                    let rows = d_x.chunks_mut(width).zip(x.chunks(width));
                    for ((d_x, x), (d_y, &r)) in rows.zip(d_y.chunks(width).zip(r)) {
                        let mut lanes = [0f32; 8];
                        for (i, ((&d, &w), &x)) in d_y.iter().zip(w).zip(x).enumerate() {
                            lanes[i % 8] += d * w * x;
                        }
                        let coefficient = r * r * r * lanes.iter().sum::<f32>() / width as f32;
                        for (((d_x, &d), &w), &x) in d_x.iter_mut().zip(d_y).zip(w).zip(x) {
                            *d_x = r * d * w - x * coefficient;
                        }
                        for ((d_w, &d), &x) in d_w.iter_mut().zip(d_y).zip(x) {
                            *d_w += d * x * r;
                        }
                    }
                    d_w
                },
            )
            .reduce_with(|mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            })
            .unwrap_or_default();
        (d_x, d_w)
    }

    fn inverse_rms(x: &[f32], eps: f32) -> f32 {
        1.0 / (dot::<false>(x, x) / x.len() as f32 + eps).sqrt()
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

    use crate::flex::{host, tensor, values};

    /// The fused RMS normalization (see [`super::rms_norm`]) of `[rows, width]` inputs.
    #[backend_extension(Flex, Autodiff)]
    pub trait FusedNormOps: burn::backend::Backend {
        fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f32)
        -> FloatTensor<Self>;
    }

    /// Forward with each row's `1/rms`, and backward.
    pub trait NormKernels: Backend {
        fn contiguous(t: FloatTensor<Self>) -> FloatTensor<Self>;

        /// `(y, r)`.
        fn norm_forward(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            eps: f32,
        ) -> (FloatTensor<Self>, FloatTensor<Self>);

        /// `(∂x, ∂weight if asked)`.
        fn norm_backward(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            r: FloatTensor<Self>,
            d_y: FloatTensor<Self>,
            want_d_weight: bool,
        ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>);
    }

    impl NormKernels for Flex {
        fn contiguous(t: FlexTensor) -> FlexTensor {
            host(&t)
        }

        fn norm_forward(x: FlexTensor, weight: FlexTensor, eps: f32) -> (FlexTensor, FlexTensor) {
            let (x, weight) = (host(&x), host(&weight));
            let shape = x.shape().to_vec();
            let (y, r) = super::host::forward(values(&x), values(&weight), eps);
            let rows = r.len();
            (tensor(y, shape), tensor(r, vec![rows]))
        }

        fn norm_backward(
            x: FlexTensor,
            weight: FlexTensor,
            r: FlexTensor,
            d_y: FlexTensor,
            want_d_weight: bool,
        ) -> (FlexTensor, Option<FlexTensor>) {
            let [x, weight, r, d_y] = [x, weight, r, d_y].map(|t| host(&t));
            let (shape, width) = (x.shape().to_vec(), weight.shape()[0]);
            let (d_x, d_w) = super::host::backward(
                values(&x),
                values(&weight),
                values(&r),
                values(&d_y),
                want_d_weight,
            );
            (
                tensor(d_x, shape),
                want_d_weight.then(|| tensor(d_w, vec![width])),
            )
        }
    }

    impl FusedNormOps for Flex {
        fn rms_norm(x: FlexTensor, weight: FlexTensor, eps: f32) -> FlexTensor {
            Self::norm_forward(x, weight, eps).0
        }
    }

    /// What backward needs: the inputs and each row's `1/rms`.
    #[derive(Debug, Clone)]
    struct Saved<B: Backend> {
        x: FloatTensor<B>,
        weight: FloatTensor<B>,
        r: FloatTensor<B>,
        want_d_weight: bool,
    }

    #[derive(Debug)]
    struct NormBackward;

    impl<B: Backend + NormKernels> Backward<B, 2> for NormBackward {
        type State = Saved<B>;

        fn backward(
            self,
            ops: Ops<Self::State, 2>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let d_y = grads.consume::<B>(&ops.node);
            let [node_x, node_weight] = ops.parents;
            let s = ops.state;
            let (d_x, d_weight) = B::norm_backward(s.x, s.weight, s.r, d_y, s.want_d_weight);
            if let Some(node) = node_x {
                grads.register::<B>(node.id, d_x);
            }
            if let (Some(node), Some(d_weight)) = (node_weight, d_weight) {
                grads.register::<B>(node.id, d_weight);
            }
        }
    }

    impl<B: Backend + NormKernels, C: CheckpointStrategy> FusedNormOps for Autodiff<B, C> {
        fn rms_norm(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            eps: f32,
        ) -> FloatTensor<Self> {
            let want_d_weight = weight.is_tracked();
            let guards = [x.node(), weight.node()];
            let x = B::contiguous(x.into_primitive());
            let weight = B::contiguous(weight.into_primitive());
            let (y, r) = B::norm_forward(x.clone(), weight.clone(), eps);
            match NormBackward.prepare::<C>(guards).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let saved = Saved {
                        x,
                        weight,
                        r,
                        want_d_weight,
                    };
                    prep.finish(saved, y)
                }
                OpsKind::UnTracked(prep) => prep.finish(y),
            }
        }
    }
}
