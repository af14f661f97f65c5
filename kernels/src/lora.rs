//! A linear layer with its LoRA update as one operation on the CPU (flex), forward and, on
//! an autodiff device, backward: `y = x·W + s·(x·A)·B`. In burn ops the update is a
//! separate full-width tensor, scaled and added (two passes over the output each way), and
//! `x`'s gradient is summed from two branches; here the update is accumulated into the
//! base product by the GEMM itself, and `∂x = ∂y·Wᵀ + (s·∂y·Bᵀ)·Aᵀ` is formed the same
//! way. The products run on all of the batch's rows at once (burn's batched matmul splits
//! a `[batch, seq, in]` input per sequence).
//!
//! ```
//! use burn::tensor::{Device, Tensor};
//! use moera_kernels::{LoraUpdate, fused_lora_linear};
//!
//! let device = Device::flex();
//! let x = Tensor::<2>::ones([3, 4], &device);
//! let update = LoraUpdate {
//!     input: None,
//!     a: Tensor::<2>::ones([4, 2], &device),
//!     b: Tensor::<2>::ones([2, 5], &device),
//!     scale: 0.5,
//! };
//! let y = fused_lora_linear(&x, &Tensor::<2>::zeros([4, 5], &device), &update).unwrap();
//! // Each output: 0.5 · (4 + 4) = 4.
//! assert_eq!(y.into_data().to_vec::<f32>().unwrap(), vec![4.0; 15]);
//! ```

use burn::tensor::Tensor;

use crate::LoraUpdate;

/// `x·weight + update.scale·(x·update.a)·update.b`, `x` `[tokens, in]`, `weight`
/// `[in, out]` (row-major or a transposed view), `a` `[in, r]`, `b` `[r, out]`; gradients
/// flow to every tracked input. `None` where no fused kernel runs on the tensors' device
/// (GPUs, the reference path, non-f32 tensors), the shapes disagree, or the adapter has
/// its own input (dropout): the caller then runs burn's ops.
pub fn fused_lora_linear(
    x: &Tensor<2>,
    weight: &Tensor<2>,
    update: &LoraUpdate<2>,
) -> Option<Tensor<2>> {
    #[cfg(feature = "flex")]
    {
        let [_, input] = x.dims();
        let [weight_in, out] = weight.dims();
        let [a_in, rank] = update.a.dims();
        let [b_rank, b_out] = update.b.dims();
        let agree = input == weight_in
            && input == a_in
            && rank == b_rank
            && out == b_out
            && rank > 0
            && update.input.is_none();
        let f32s = [x, weight, &update.a, &update.b]
            .iter()
            .all(|t| t.dtype() == burn::tensor::DType::F32);
        if agree && f32s && crate::flex::runs_fused(&x.device()) {
            let y = <burn::backend::Dispatch as flex::FusedLoraOps>::lora_linear(
                x.clone().into_dispatch(),
                weight.clone().into_dispatch(),
                update.a.clone().into_dispatch(),
                update.b.clone().into_dispatch(),
                update.scale,
            );
            return Some(Tensor::from_dispatch(y));
        }
    }
    let _ = (x, weight, update);
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

    use crate::cpu_gemm::{View, gemm_parallel};
    use crate::flex::{Matrix, host, tensor, values};

    /// The fused LoRA linear layer (see [`super::fused_lora_linear`]).
    #[backend_extension(Flex, Autodiff)]
    pub trait FusedLoraOps: burn::backend::Backend {
        fn lora_linear(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            a: FloatTensor<Self>,
            b: FloatTensor<Self>,
            scale: f32,
        ) -> FloatTensor<Self>;
    }

    /// Forward (with the adapter's `x·A`, which backward reuses) and backward.
    pub trait LoraKernels: Backend {
        fn contiguous(t: FloatTensor<Self>) -> FloatTensor<Self>;

        /// `(y, x·A)`.
        fn lora_forward(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            a: FloatTensor<Self>,
            b: FloatTensor<Self>,
            scale: f32,
        ) -> (FloatTensor<Self>, FloatTensor<Self>);

        /// `[∂x, ∂W, ∂A, ∂B]`, each computed only where `want` says.
        fn lora_backward(
            saved: Saved<Self>,
            d_y: FloatTensor<Self>,
        ) -> [Option<FloatTensor<Self>>; 4];
    }

    /// What backward needs: the inputs, `x·A`, and which gradients to form.
    #[derive(Debug, Clone)]
    pub struct Saved<B: Backend> {
        x: FloatTensor<B>,
        weight: FloatTensor<B>,
        a: FloatTensor<B>,
        b: FloatTensor<B>,
        down: FloatTensor<B>,
        scale: f32,
        want: [bool; 4],
    }

    impl LoraKernels for Flex {
        fn contiguous(t: FlexTensor) -> FlexTensor {
            host(&t)
        }

        fn lora_forward(
            x: FlexTensor,
            weight: FlexTensor,
            a: FlexTensor,
            b: FlexTensor,
            scale: f32,
        ) -> (FlexTensor, FlexTensor) {
            let x = host(&x);
            let [weight, a, b] = [&weight, &a, &b].map(Matrix::new);
            let (weight, a, b) = (weight.view(), a.view(), b.view());
            let tokens = x.shape()[0];
            let x = View::row_major(values(&x), tokens, weight.rows());
            let (out, rank) = (weight.cols(), a.cols());
            let mut down = vec![0f32; tokens * rank];
            gemm_parallel(&mut down, x, a, 1.0, false);
            let mut y = vec![0f32; tokens * out];
            gemm_parallel(&mut y, x, weight, 1.0, false);
            let down_view = View::row_major(&down, tokens, rank);
            gemm_parallel(&mut y, down_view, b, scale, true);
            (
                tensor(y, vec![tokens, out]),
                tensor(down, vec![tokens, rank]),
            )
        }

        fn lora_backward(saved: Saved<Self>, d_y: FlexTensor) -> [Option<FlexTensor>; 4] {
            let [want_x, want_weight, want_a, want_b] = saved.want;
            let (x, down, d_y) = (host(&saved.x), host(&saved.down), host(&d_y));
            let [weight, a, b] = [&saved.weight, &saved.a, &saved.b].map(Matrix::new);
            let (weight, a, b) = (weight.view(), a.view(), b.view());
            let (tokens, input, out, rank) =
                (down.shape()[0], weight.rows(), weight.cols(), a.cols());
            let x = View::row_major(values(&x), tokens, input);
            let down = View::row_major(values(&down), tokens, rank);
            let d_y = View::row_major(values(&d_y), tokens, out);
            // ∂(x·A) = s·∂y·Bᵀ, shared by ∂x and ∂A.
            let mut d_down = vec![0f32; tokens * rank];
            if want_x || want_a {
                gemm_parallel(&mut d_down, d_y, b.t(), saved.scale, false);
            }
            let d_down_view = View::row_major(&d_down, tokens, rank);
            let d_x = want_x.then(|| {
                let mut d_x = vec![0f32; tokens * input];
                gemm_parallel(&mut d_x, d_y, weight.t(), 1.0, false);
                gemm_parallel(&mut d_x, d_down_view, a.t(), 1.0, true);
                tensor(d_x, vec![tokens, input])
            });
            let d_weight = want_weight.then(|| {
                let mut d_weight = vec![0f32; input * out];
                gemm_parallel(&mut d_weight, x.t(), d_y, 1.0, false);
                tensor(d_weight, vec![input, out])
            });
            let d_a = want_a.then(|| {
                let mut d_a = vec![0f32; input * rank];
                gemm_parallel(&mut d_a, x.t(), d_down_view, 1.0, false);
                tensor(d_a, vec![input, rank])
            });
            let d_b = want_b.then(|| {
                let mut d_b = vec![0f32; rank * out];
                gemm_parallel(&mut d_b, down.t(), d_y, saved.scale, false);
                tensor(d_b, vec![rank, out])
            });
            [d_x, d_weight, d_a, d_b]
        }
    }

    impl FusedLoraOps for Flex {
        fn lora_linear(
            x: FlexTensor,
            weight: FlexTensor,
            a: FlexTensor,
            b: FlexTensor,
            scale: f32,
        ) -> FlexTensor {
            Self::lora_forward(x, weight, a, b, scale).0
        }
    }

    #[derive(Debug)]
    struct LoraBackward;

    impl<B: Backend + LoraKernels> Backward<B, 4> for LoraBackward {
        type State = Saved<B>;

        fn backward(
            self,
            ops: Ops<Self::State, 4>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let d_y = grads.consume::<B>(&ops.node);
            let gradients = B::lora_backward(ops.state, d_y);
            for (node, gradient) in ops.parents.into_iter().zip(gradients) {
                if let (Some(node), Some(gradient)) = (node, gradient) {
                    grads.register::<B>(node.id, gradient);
                }
            }
        }
    }

    impl<B: Backend + LoraKernels, C: CheckpointStrategy> FusedLoraOps for Autodiff<B, C> {
        fn lora_linear(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            a: FloatTensor<Self>,
            b: FloatTensor<Self>,
            scale: f32,
        ) -> FloatTensor<Self> {
            let want = [&x, &weight, &a, &b].map(|t| t.is_tracked());
            let guards = [x.node(), weight.node(), a.node(), b.node()];
            let x = B::contiguous(x.into_primitive());
            let [weight, a, b] = [weight, a, b].map(|t| t.into_primitive());
            let (y, down) = B::lora_forward(x.clone(), weight.clone(), a.clone(), b.clone(), scale);
            match LoraBackward.prepare::<C>(guards).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let saved = Saved {
                        x,
                        weight,
                        a,
                        b,
                        down,
                        scale,
                        want,
                    };
                    prep.finish(saved, y)
                }
                OpsKind::UnTracked(prep) => prep.finish(y),
            }
        }
    }
}
