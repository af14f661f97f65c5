//! Causal scaled dot-product attention as one fused operation on the CPU (flex), forward
//! and, on an autodiff device, backward: burn's composite attention keeps the
//! `[heads, seq, seq]` probabilities of every layer for backward and runs its softmax as
//! five passes over them; this kernel keeps each row's log-sum-exp instead, skips the keys
//! a causal mask hides, and recomputes the probabilities block by block in backward.
//!
//! ```
//! use burn::tensor::{Device, Tensor};
//! use moera_kernels::{CausalMask, fused_attention};
//!
//! let device = Device::flex();
//! let q = Tensor::<4>::ones([1, 4, 3, 8], &device);
//! let kv = Tensor::<4>::ones([1, 2, 3, 8], &device);
//! let mask = CausalMask { start: 0, window: None };
//! let out = fused_attention(&q, &kv, &kv, 0.35, mask).expect("flex has the fused kernel");
//! assert_eq!(out.dims(), [1, 4, 3, 8]);
//! ```

use burn::tensor::Tensor;

/// Which keys each query sees: query `i` sits at position `start + i` and sees the keys at
/// positions up to its own, and with a window only the last `window` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CausalMask {
    pub start: usize,
    pub window: Option<usize>,
}

/// `softmax(scale·q·kᵀ + mask)·v` with grouped key/value heads, or `None` where no fused
/// kernel runs on the tensors' device (GPUs, the reference path, non-f32 tensors): the
/// caller then runs its composite attention. `q` `[batch, heads, seq, head_dim]`, `k`
/// `[batch, kv_heads, total, head_dim]`, `v` `[batch, kv_heads, total, value_dim]`, with
/// `heads` a multiple of `kv_heads` (query head `h` reads key/value head
/// `h / (heads / kv_heads)`). Returns `[batch, heads, seq, value_dim]`.
pub fn fused_attention(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    scale: f32,
    mask: CausalMask,
) -> Option<Tensor<4>> {
    #[cfg(feature = "flex")]
    {
        let [batch, heads, _, head_dim] = q.dims();
        let [k_batch, kv_heads, total, k_dim] = k.dims();
        let [v_batch, v_heads, v_total, value_dim] = v.dims();
        let shapes_agree = batch == k_batch
            && batch == v_batch
            && kv_heads == v_heads
            && total == v_total
            && head_dim == k_dim
            && head_dim > 0
            && value_dim > 0
            && kv_heads > 0
            && heads.is_multiple_of(kv_heads);
        let f32s = [q, k, v]
            .iter()
            .all(|t| t.dtype() == burn::tensor::DType::F32);
        if shapes_agree && f32s && crate::flex::runs_fused(&q.device()) {
            return Some(flex::attention(q, k, v, scale, mask));
        }
    }
    let _ = (q, k, v, scale, mask);
    None
}

#[cfg(feature = "flex")]
mod flex {
    //! The kernel behind burn's backend extension: flex runs it, and autodiff over flex
    //! records it with its own backward.

    use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::flex::FlexTensor;
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
    use burn::tensor::Tensor;

    use super::CausalMask;
    use crate::attention_cpu::{self, Problem};
    use crate::flex::{host, tensor, values};

    pub(super) fn attention(
        q: &Tensor<4>,
        k: &Tensor<4>,
        v: &Tensor<4>,
        scale: f32,
        mask: CausalMask,
    ) -> Tensor<4> {
        let out = <Dispatch as FusedAttentionOps>::causal_attention(
            q.clone().into_dispatch(),
            k.clone().into_dispatch(),
            v.clone().into_dispatch(),
            scale,
            mask.start,
            mask.window,
        );
        Tensor::from_dispatch(out)
    }

    /// Fused causal attention (see [`super::fused_attention`]).
    #[backend_extension(Flex, Autodiff)]
    pub trait FusedAttentionOps: burn::backend::Backend {
        fn causal_attention(
            q: FloatTensor<Self>,
            k: FloatTensor<Self>,
            v: FloatTensor<Self>,
            scale: f32,
            start: usize,
            window: Option<usize>,
        ) -> FloatTensor<Self>;
    }

    /// The forward pass with its log-sum-exp, and the backward pass, on host tensors.
    pub trait AttentionKernels: Backend {
        /// `t` laid out row by row (a copy only for strided views), so that forward and
        /// backward both read it in place.
        fn contiguous(t: FloatTensor<Self>) -> FloatTensor<Self>;

        /// The output and each query row's log-sum-exp `[batch, heads, seq]`.
        fn attention_forward(
            q: FloatTensor<Self>,
            k: FloatTensor<Self>,
            v: FloatTensor<Self>,
            problem: &Problem,
        ) -> (FloatTensor<Self>, FloatTensor<Self>);

        /// `(dq, dk, dv)`.
        #[allow(clippy::too_many_arguments)]
        fn attention_backward(
            q: FloatTensor<Self>,
            k: FloatTensor<Self>,
            v: FloatTensor<Self>,
            out: FloatTensor<Self>,
            lse: FloatTensor<Self>,
            d_out: FloatTensor<Self>,
            problem: &Problem,
        ) -> [FloatTensor<Self>; 3];
    }

    fn problem<T: TensorMetadata>(
        q: &T,
        k: &T,
        v: &T,
        scale: f32,
        start: usize,
        window: Option<usize>,
    ) -> Problem {
        let (qs, ks, vs) = (q.shape(), k.shape(), v.shape());
        Problem {
            batch: qs[0],
            heads: qs[1],
            kv_heads: ks[1],
            queries: qs[2],
            keys: ks[2],
            head_dim: qs[3],
            value_dim: vs[3],
            scale,
            start,
            window,
        }
    }

    impl AttentionKernels for Flex {
        fn contiguous(t: FlexTensor) -> FlexTensor {
            host(&t)
        }

        fn attention_forward(
            q: FlexTensor,
            k: FlexTensor,
            v: FlexTensor,
            p: &Problem,
        ) -> (FlexTensor, FlexTensor) {
            let (q, k, v) = (host(&q), host(&k), host(&v));
            let (out, lse) = attention_cpu::forward(p, values(&q), values(&k), values(&v));
            (
                tensor(out, vec![p.batch, p.heads, p.queries, p.value_dim]),
                tensor(lse, vec![p.batch, p.heads, p.queries]),
            )
        }

        fn attention_backward(
            q: FlexTensor,
            k: FlexTensor,
            v: FlexTensor,
            out: FlexTensor,
            lse: FlexTensor,
            d_out: FlexTensor,
            p: &Problem,
        ) -> [FlexTensor; 3] {
            let [q, k, v, out, lse, d_out] = [q, k, v, out, lse, d_out].map(|t| host(&t));
            let (d_q, d_k, d_v) = attention_cpu::backward(
                p,
                values(&q),
                values(&k),
                values(&v),
                values(&out),
                values(&lse),
                values(&d_out),
            );
            [
                tensor(d_q, vec![p.batch, p.heads, p.queries, p.head_dim]),
                tensor(d_k, vec![p.batch, p.kv_heads, p.keys, p.head_dim]),
                tensor(d_v, vec![p.batch, p.kv_heads, p.keys, p.value_dim]),
            ]
        }
    }

    impl FusedAttentionOps for Flex {
        fn causal_attention(
            q: FlexTensor,
            k: FlexTensor,
            v: FlexTensor,
            scale: f32,
            start: usize,
            window: Option<usize>,
        ) -> FlexTensor {
            let p = problem(&q, &k, &v, scale, start, window);
            Self::attention_forward(q, k, v, &p).0
        }
    }

    /// What backward needs: the inputs, the output and its log-sum-exp.
    #[derive(Debug, Clone)]
    struct Saved<B: Backend> {
        q: FloatTensor<B>,
        k: FloatTensor<B>,
        v: FloatTensor<B>,
        out: FloatTensor<B>,
        lse: FloatTensor<B>,
        problem: Problem,
    }

    #[derive(Debug)]
    struct AttentionBackward;

    impl<B: Backend + AttentionKernels> Backward<B, 3> for AttentionBackward {
        type State = Saved<B>;

        fn backward(
            self,
            ops: Ops<Self::State, 3>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let d_out = grads.consume::<B>(&ops.node);
            let s = ops.state;
            let gradients = B::attention_backward(s.q, s.k, s.v, s.out, s.lse, d_out, &s.problem);
            for (node, gradient) in ops.parents.into_iter().zip(gradients) {
                if let Some(node) = node {
                    grads.register::<B>(node.id, gradient);
                }
            }
        }
    }

    impl<B: Backend + AttentionKernels, C: CheckpointStrategy> FusedAttentionOps for Autodiff<B, C> {
        fn causal_attention(
            q: FloatTensor<Self>,
            k: FloatTensor<Self>,
            v: FloatTensor<Self>,
            scale: f32,
            start: usize,
            window: Option<usize>,
        ) -> FloatTensor<Self> {
            let guards = [q.node(), k.node(), v.node()];
            let [q, k, v] = [q, k, v].map(|t| B::contiguous(t.into_primitive()));
            let problem = problem(&q, &k, &v, scale, start, window);
            let (out, lse) = B::attention_forward(q.clone(), k.clone(), v.clone(), &problem);
            match AttentionBackward
                .prepare::<C>(guards)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let saved = Saved {
                        q,
                        k,
                        v,
                        out: out.clone(),
                        lse,
                        problem,
                    };
                    prep.finish(saved, out)
                }
                OpsKind::UnTracked(prep) => prep.finish(out),
            }
        }
    }
}
