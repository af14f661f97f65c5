//! The output layer and its cross-entropy as one operation on the CPU (flex): the logits
//! of a block of rows exist only while that block is processed, and their gradient is
//! formed in the same pass (see `loss_cpu`). On an autodiff device the gradients of `x`
//! and the weight, computed in forward, are scaled by the upstream gradient in backward.
//!
//! ```
//! use burn::tensor::{Device, Tensor};
//! use moera_kernels::fused_linear_cross_entropy;
//!
//! let device = Device::flex();
//! let x = Tensor::<2>::zeros([2, 3], &device);
//! let weight = Tensor::<2>::zeros([3, 4], &device);
//! // Uniform logits over 4 classes: each scored row costs ln 4.
//! let loss = fused_linear_cross_entropy(&x, &weight, &[1, 2], &[0.5, 0.5]).unwrap();
//! let value = loss.into_data().try_into_vec::<f32>().unwrap()[0];
//! assert!((value - 4f32.ln()).abs() < 1e-6);
//! ```

use burn::tensor::Tensor;

/// `Σ_r row_weights[r] · (logsumexp(z_r) − z_r[targets[r]])` with `z = x·weight`, as a
/// `[1]` tensor: a mean cross-entropy when the row weights are `1 / scored` on scored rows
/// and 0 elsewhere. `x` `[rows, hidden]`, `weight` `[hidden, vocab]`. `None` where no fused
/// kernel runs on the tensors' device (GPUs, the reference path, non-f32 tensors) or the
/// inputs disagree (lengths, a target outside the vocabulary): the caller then computes
/// the logits and the loss with burn ops.
pub fn fused_linear_cross_entropy(
    x: &Tensor<2>,
    weight: &Tensor<2>,
    targets: &[u32],
    row_weights: &[f32],
) -> Option<Tensor<1>> {
    #[cfg(feature = "flex")]
    {
        let [rows, hidden] = x.dims();
        let [weight_rows, vocab] = weight.dims();
        let agree = hidden == weight_rows
            && targets.len() == rows
            && row_weights.len() == rows
            && targets.iter().all(|&t| (t as usize) < vocab);
        let f32s = [x, weight]
            .iter()
            .all(|t| t.dtype() == burn::tensor::DType::F32);
        if agree && f32s && crate::flex::runs_fused(&x.device()) {
            let loss = <burn::backend::Dispatch as flex::FusedLossOps>::linear_cross_entropy(
                x.clone().into_dispatch(),
                weight.clone().into_dispatch(),
                targets.to_vec(),
                row_weights.to_vec(),
            );
            return Some(Tensor::from_dispatch(loss));
        }
    }
    let _ = (x, weight, targets, row_weights);
    None
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::flex::FlexTensor;
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{Autodiff, Backend, Flex, TensorMetadata, backend_extension};
    use burn::tensor::Shape;

    use crate::flex::{Matrix, host, tensor, values};
    use crate::loss_cpu::{self, Problem};

    /// The fused output layer and cross-entropy (see [`super::fused_linear_cross_entropy`]).
    #[backend_extension(Flex, Autodiff)]
    pub trait FusedLossOps: burn::backend::Backend {
        fn linear_cross_entropy(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            targets: Vec<u32>,
            row_weights: Vec<f32>,
        ) -> FloatTensor<Self>;
    }

    /// The loss `[1]` and, when asked, the gradients of `x` and the weight.
    pub trait LossKernels: Backend {
        fn linear_cross_entropy_with_gradients(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            targets: &[u32],
            row_weights: &[f32],
            want: (bool, bool),
        ) -> Gradient<Self>;
    }

    /// What the forward pass produced.
    pub struct Gradient<B: Backend> {
        loss: FloatTensor<B>,
        d_x: Option<FloatTensor<B>>,
        d_weight: Option<FloatTensor<B>>,
    }

    impl LossKernels for Flex {
        fn linear_cross_entropy_with_gradients(
            x: FlexTensor,
            weight: FlexTensor,
            targets: &[u32],
            row_weights: &[f32],
            (want_d_x, want_d_weight): (bool, bool),
        ) -> Gradient<Self> {
            // The weight may be a transposed view (a decoded quantized head): read in place.
            let (x, weight_matrix) = (host(&x), Matrix::new(&weight));
            let (x_shape, weight_shape) = (x.shape(), weight.shape());
            let problem = Problem {
                x: values(&x),
                weight: weight_matrix.view(),
                targets,
                row_weights,
            };
            let out = loss_cpu::forward(&problem, want_d_x, want_d_weight);
            Gradient {
                loss: tensor(vec![out.loss], vec![1]),
                d_x: out.d_x.map(|g| tensor(g, x_shape.to_vec())),
                d_weight: out.d_weight.map(|g| tensor(g, weight_shape.to_vec())),
            }
        }
    }

    impl FusedLossOps for Flex {
        fn linear_cross_entropy(
            x: FlexTensor,
            weight: FlexTensor,
            targets: Vec<u32>,
            row_weights: Vec<f32>,
        ) -> FlexTensor {
            let no_gradients = (false, false);
            Self::linear_cross_entropy_with_gradients(
                x,
                weight,
                &targets,
                &row_weights,
                no_gradients,
            )
            .loss
        }
    }

    /// The gradients from forward, for `x` and the weight.
    #[derive(Debug, Clone)]
    struct Saved<B: Backend> {
        d_x: Option<FloatTensor<B>>,
        d_weight: Option<FloatTensor<B>>,
    }

    #[derive(Debug)]
    struct LossBackward;

    impl<B: Backend> Backward<B, 2> for LossBackward {
        type State = Saved<B>;

        fn backward(
            self,
            ops: Ops<Self::State, 2>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let upstream = grads.consume::<B>(&ops.node);
            let [node_x, node_weight] = ops.parents;
            let scaled = |gradient: FloatTensor<B>| {
                let upstream = B::float_reshape(upstream.clone(), Shape::new([1, 1]));
                B::float_mul(gradient, upstream)
            };
            if let (Some(node), Some(d_x)) = (node_x, ops.state.d_x) {
                grads.register::<B>(node.id, scaled(d_x));
            }
            if let (Some(node), Some(d_weight)) = (node_weight, ops.state.d_weight) {
                grads.register::<B>(node.id, scaled(d_weight));
            }
        }
    }

    impl<B: Backend + LossKernels, C: CheckpointStrategy> FusedLossOps for Autodiff<B, C> {
        fn linear_cross_entropy(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            targets: Vec<u32>,
            row_weights: Vec<f32>,
        ) -> FloatTensor<Self> {
            let want = (x.is_tracked(), weight.is_tracked());
            let guards = [x.node(), weight.node()];
            let (x, weight) = (x.into_primitive(), weight.into_primitive());
            let out =
                B::linear_cross_entropy_with_gradients(x, weight, &targets, &row_weights, want);
            match LossBackward.prepare::<C>(guards).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let saved = Saved {
                        d_x: out.d_x,
                        d_weight: out.d_weight,
                    };
                    prep.finish(saved, out.loss)
                }
                OpsKind::UnTracked(prep) => prep.finish(out.loss),
            }
        }
    }
}
