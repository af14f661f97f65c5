//! A linear layer with its LoRA update as one operation on the CPU (flex), forward and, on
//! an autodiff device, backward: `y = x·W + s·(x·A)·B`. In burn ops the update is a
//! separate full-width tensor, scaled and added (two passes over the output each way), and
//! `x`'s gradient is summed from two branches; here the update is accumulated into the
//! base product by the GEMM itself, and `∂x = ∂y·Wᵀ + (s·∂y·Bᵀ)·Aᵀ` is formed the same
//! way. The products run on all of the batch's rows at once (burn's batched matmul splits
//! a `[batch, seq, in]` input per sequence); [`fused_linear`] is the same op without an
//! adapter, for training an f32 base (full fine-tuning).
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

/// `x·weight` (`x` `[tokens, in]`, `weight` `[in, out]`) as one product over all rows,
/// with gradients for `x` and `weight` where tracked. `None` where no fused kernel runs on
/// the tensors' device, the shapes disagree or a tensor is not f32.
pub fn fused_linear(x: &Tensor<2>, weight: &Tensor<2>) -> Option<Tensor<2>> {
    #[cfg(feature = "flex")]
    {
        let agree = x.dims()[1] == weight.dims()[0];
        let f32s = [x, weight]
            .iter()
            .all(|t| t.dtype() == burn::tensor::DType::F32);
        if agree && f32s && crate::flex::runs_fused(&x.device()) {
            let y = <burn::backend::Dispatch as flex::FusedLoraOps>::linear(
                x.clone().into_dispatch(),
                weight.clone().into_dispatch(),
            );
            return Some(Tensor::from_dispatch(y));
        }
    }
    let _ = (x, weight);
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

    /// The fused linear layers (see [`super::fused_lora_linear`] and [`super::fused_linear`]).
    #[backend_extension(Flex, Autodiff)]
    pub trait FusedLoraOps: burn::backend::Backend {
        fn lora_linear(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            a: FloatTensor<Self>,
            b: FloatTensor<Self>,
            scale: f32,
        ) -> FloatTensor<Self>;

        fn linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;
    }

    /// A LoRA adapter's factors `A` `[in, r]` and `B` `[r, out]`, its scale, and after
    /// forward its `x·A` `[tokens, r]` (which backward reuses).
    #[derive(Debug, Clone)]
    pub struct Adapter<B: Backend> {
        a: FloatTensor<B>,
        b: FloatTensor<B>,
        scale: f32,
        down: Option<FloatTensor<B>>,
    }

    /// What backward needs: the inputs, and which gradients to form (`x`, `W`, `A`, `B`).
    #[derive(Debug, Clone)]
    pub struct Saved<B: Backend> {
        x: FloatTensor<B>,
        weight: FloatTensor<B>,
        adapter: Option<Adapter<B>>,
        want: [bool; 4],
    }

    /// Forward and backward on host tensors.
    pub trait LoraKernels: Backend {
        fn contiguous(t: FloatTensor<Self>) -> FloatTensor<Self>;

        /// `y`, and the adapter with its `x·A`.
        fn lora_forward(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            adapter: Option<Adapter<Self>>,
        ) -> (FloatTensor<Self>, Option<Adapter<Self>>);

        /// `[∂x, ∂W, ∂A, ∂B]`, each computed only where `saved.want` says.
        fn lora_backward(
            saved: Saved<Self>,
            d_y: FloatTensor<Self>,
        ) -> [Option<FloatTensor<Self>>; 4];
    }

    impl LoraKernels for Flex {
        fn contiguous(t: FlexTensor) -> FlexTensor {
            host(&t)
        }

        fn lora_forward(
            x: FlexTensor,
            weight: FlexTensor,
            adapter: Option<Adapter<Self>>,
        ) -> (FlexTensor, Option<Adapter<Self>>) {
            let x = host(&x);
            let weight = Matrix::new(&weight);
            let weight = weight.view();
            let (tokens, out) = (x.shape()[0], weight.cols());
            let x = View::row_major(values(&x), tokens, weight.rows());
            let mut y = vec![0f32; tokens * out];
            gemm_parallel(&mut y, x, weight, 1.0, false);
            let adapter = adapter.map(|adapter| {
                let (a, b) = (Matrix::new(&adapter.a), Matrix::new(&adapter.b));
                let rank = a.view().cols();
                let mut down = vec![0f32; tokens * rank];
                gemm_parallel(&mut down, x, a.view(), 1.0, false);
                let down_view = View::row_major(&down, tokens, rank);
                gemm_parallel(&mut y, down_view, b.view(), adapter.scale, true);
                Adapter {
                    down: Some(tensor(down, vec![tokens, rank])),
                    ..adapter
                }
            });
            (tensor(y, vec![tokens, out]), adapter)
        }

        fn lora_backward(saved: Saved<Self>, d_y: FlexTensor) -> [Option<FlexTensor>; 4] {
            let [want_x, want_weight, want_a, want_b] = saved.want;
            let (x, d_y) = (host(&saved.x), host(&d_y));
            let weight = Matrix::new(&saved.weight);
            let weight = weight.view();
            let (tokens, input, out) = (x.shape()[0], weight.rows(), weight.cols());
            let x = View::row_major(values(&x), tokens, input);
            let d_y = View::row_major(values(&d_y), tokens, out);
            let mut d_x = want_x.then(|| {
                let mut d_x = vec![0f32; tokens * input];
                gemm_parallel(&mut d_x, d_y, weight.t(), 1.0, false);
                d_x
            });
            let d_weight = want_weight.then(|| {
                let mut d_weight = vec![0f32; input * out];
                gemm_parallel(&mut d_weight, x.t(), d_y, 1.0, false);
                tensor(d_weight, vec![input, out])
            });
            let (mut d_a, mut d_b) = (None, None);
            if let Some(adapter) = saved.adapter {
                let (a, b) = (Matrix::new(&adapter.a), Matrix::new(&adapter.b));
                let (a, b) = (a.view(), b.view());
                let rank = a.cols();
                let down = host(adapter.down.as_ref().expect("forward keeps x·A"));
                let down = View::row_major(values(&down), tokens, rank);
                if want_x || want_a {
                    // ∂(x·A) = s·∂y·Bᵀ, shared by ∂x and ∂A.
                    let mut d_down = vec![0f32; tokens * rank];
                    gemm_parallel(&mut d_down, d_y, b.t(), adapter.scale, false);
                    let d_down = View::row_major(&d_down, tokens, rank);
                    if let Some(d_x) = &mut d_x {
                        gemm_parallel(d_x, d_down, a.t(), 1.0, true);
                    }
                    d_a = want_a.then(|| {
                        let mut d_a = vec![0f32; input * rank];
                        gemm_parallel(&mut d_a, x.t(), d_down, 1.0, false);
                        tensor(d_a, vec![input, rank])
                    });
                }
                d_b = want_b.then(|| {
                    let mut d_b = vec![0f32; rank * out];
                    gemm_parallel(&mut d_b, down.t(), d_y, adapter.scale, false);
                    tensor(d_b, vec![rank, out])
                });
            }
            let d_x = d_x.map(|d_x| tensor(d_x, vec![tokens, input]));
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
            let adapter = Adapter {
                a,
                b,
                scale,
                down: None,
            };
            Self::lora_forward(x, weight, Some(adapter)).0
        }

        fn linear(x: FlexTensor, weight: FlexTensor) -> FlexTensor {
            Self::lora_forward(x, weight, None).0
        }
    }

    /// Backward of the linear layer with (`N` = 4: `x`, `W`, `A`, `B`) or without (`N` = 2)
    /// an adapter.
    #[derive(Debug)]
    struct LinearBackward;

    impl<B: Backend + LoraKernels, const N: usize> Backward<B, N> for LinearBackward {
        type State = Saved<B>;

        fn backward(
            self,
            ops: Ops<Self::State, N>,
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
            let weight = weight.into_primitive();
            let adapter = Adapter {
                a: a.into_primitive(),
                b: b.into_primitive(),
                scale,
                down: None,
            };
            let (y, adapter) = B::lora_forward(x.clone(), weight.clone(), Some(adapter));
            match LinearBackward
                .prepare::<C>(guards)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let saved = Saved {
                        x,
                        weight,
                        adapter,
                        want,
                    };
                    prep.finish(saved, y)
                }
                OpsKind::UnTracked(prep) => prep.finish(y),
            }
        }

        fn linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
            let want = [x.is_tracked(), weight.is_tracked(), false, false];
            let guards = [x.node(), weight.node()];
            let x = B::contiguous(x.into_primitive());
            let weight = weight.into_primitive();
            let (y, _) = B::lora_forward(x.clone(), weight.clone(), None);
            match LinearBackward
                .prepare::<C>(guards)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let saved = Saved {
                        x,
                        weight,
                        adapter: None,
                        want,
                    };
                    prep.finish(saved, y)
                }
                OpsKind::UnTracked(prep) => prep.finish(y),
            }
        }
    }
}
