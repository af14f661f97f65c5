//! Multi-head attention with grouped keys/values and the options the architectures need:
//! q/k RMSNorm (per head or over the whole projection), clipped q/k/v, biases, a sliding
//! window and per-head attention sinks.

use burn::module::{Module, Param};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor};
use moera_kernels::{CausalMask, fused_attention};

use crate::cache::RaggedKvCache;
use crate::nn::{Linear, RmsNorm};
use crate::rope::RopeTables;
use crate::{KvCache, ModelError, WeightSource};

/// Where q/k RMSNorm applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// One norm of `head_dim` weights applied to every head (Qwen3).
    PerHead,
    /// One norm over the whole q (and k) projection (OLMoE).
    Projection,
}

/// Shape and options of a standard attention layer.
#[derive(Debug, Clone)]
pub struct AttentionSpec {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Biases on q, k and v.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    pub qk_norm: QkNorm,
    pub norm_eps: f64,
    /// Clamp q, k and v to `[-c, c]` after projection (OLMoE's `clip_qkv`).
    pub clip_qkv: Option<f64>,
    /// Keys further than this many positions behind a query are not attended to.
    pub sliding_window: Option<usize>,
    /// A learned logit per head that joins every softmax and is then dropped (GPT-OSS).
    pub sinks: bool,
}

/// Settings that are not parameters.
#[derive(Debug, Clone, Copy)]
struct AttentionShape {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    clip_qkv: Option<f64>,
    sliding_window: Option<usize>,
    qk_norm: QkNorm,
}

/// Rotary multi-head attention over a KV cache.
#[derive(Module, Debug)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    sinks: Option<Param<Tensor<1>>>,
    #[module(skip)]
    shape: AttentionShape,
}

impl Attention {
    pub fn linears(&self) -> Vec<&Linear> {
        vec![&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj]
    }

    /// Loads `{prefix}.{q,k,v,o}_proj` (+ `q_norm`, `k_norm`, `sinks` as `spec` says).
    pub fn load(
        source: &dyn WeightSource,
        prefix: &str,
        spec: &AttentionSpec,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let q_width = spec.heads * spec.head_dim;
        let kv_width = spec.kv_heads * spec.head_dim;
        let linear = |name: &str, inp: usize, out: usize, bias: bool| {
            Linear::load(source, &format!("{prefix}.{name}"), inp, out, bias, device)
        };
        let norm = |name: &str, width: usize| {
            RmsNorm::load(
                source,
                &format!("{prefix}.{name}.weight"),
                width,
                spec.norm_eps,
                device,
            )
        };
        let (q_norm, k_norm) = match spec.qk_norm {
            QkNorm::None => (None, None),
            QkNorm::PerHead => (
                Some(norm("q_norm", spec.head_dim)?),
                Some(norm("k_norm", spec.head_dim)?),
            ),
            QkNorm::Projection => (
                Some(norm("q_norm", q_width)?),
                Some(norm("k_norm", kv_width)?),
            ),
        };
        let sinks = if spec.sinks {
            let sinks =
                crate::nn::load_checked(source, &format!("{prefix}.sinks"), [spec.heads], device)?;
            Some(Param::from_tensor(sinks))
        } else {
            None
        };
        Ok(Self {
            q_proj: linear("q_proj", spec.hidden, q_width, spec.qkv_bias)?,
            k_proj: linear("k_proj", spec.hidden, kv_width, spec.qkv_bias)?,
            v_proj: linear("v_proj", spec.hidden, kv_width, spec.qkv_bias)?,
            o_proj: linear("o_proj", q_width, spec.hidden, spec.o_bias)?,
            q_norm,
            k_norm,
            sinks,
            shape: AttentionShape {
                heads: spec.heads,
                kv_heads: spec.kv_heads,
                head_dim: spec.head_dim,
                clip_qkv: spec.clip_qkv,
                sliding_window: spec.sliding_window,
                qk_norm: spec.qk_norm,
            },
        })
    }

    /// Width of a cached key and of a cached value.
    pub fn cache_dims(&self) -> [usize; 2] {
        [self.shape.head_dim; 2]
    }

    pub fn kv_heads(&self) -> usize {
        self.shape.kv_heads
    }

    /// The sliding window of this layer's attention, if any.
    pub fn sliding_window(&self) -> Option<usize> {
        self.shape.sliding_window
    }

    pub fn forward(
        &self,
        x: Tensor<3>,
        rope: &RopeTables,
        cache: &mut KvCache,
        layer: usize,
    ) -> Tensor<3> {
        let start = cache.len();
        let (q, k, v) = self.project(x, rope);
        let (keys, values) = cache.append(layer, k, v);
        let mask = Mask {
            start,
            sliding_window: self.shape.sliding_window,
        };
        let context = attend(q, keys, values, self.scale(), mask, self.sinks());
        self.merge_heads(context)
    }

    /// One new position per row of sequences of different lengths (continuous batching):
    /// `x` `[rows, 1, hidden]`, `rope` from [`crate::rope::RotaryEmbedding::tables_per_row`],
    /// `bias` from [`RaggedKvCache::attention_bias`] for this layer's window.
    pub fn forward_ragged(
        &self,
        x: Tensor<3>,
        rope: &RopeTables,
        cache: &mut RaggedKvCache,
        layer: usize,
        bias: Tensor<4>,
    ) -> Tensor<3> {
        let (q, k, v) = self.project(x, rope);
        let (keys, values) = cache.append(layer, k, v);
        let context = attend_with_bias(q, keys, values, self.scale(), Some(bias), self.sinks());
        self.merge_heads(context)
    }

    /// Queries, keys and values `[batch, heads, seq, head_dim]` of `x`, rotated.
    fn project(&self, x: Tensor<3>, rope: &RopeTables) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let AttentionShape {
            heads,
            kv_heads,
            head_dim,
            clip_qkv,
            qk_norm,
            ..
        } = self.shape;
        let [batch, seq, _] = x.dims();
        let clip = |t: Tensor<3>| match clip_qkv {
            Some(c) => t.clamp(-c, c),
            None => t,
        };
        let mut q = self.q_proj.forward(x.clone());
        let mut k = self.k_proj.forward(x.clone());
        let v = clip(self.v_proj.forward(x));
        if let (QkNorm::Projection, Some(q_norm), Some(k_norm)) =
            (qk_norm, &self.q_norm, &self.k_norm)
        {
            q = q_norm.forward(q);
            k = k_norm.forward(k);
        }
        let split =
            |t: Tensor<3>, heads: usize| t.reshape([batch, seq, heads, head_dim]).swap_dims(1, 2);
        let (mut q, mut k) = (split(clip(q), heads), split(clip(k), kv_heads));
        if let (QkNorm::PerHead, Some(q_norm), Some(k_norm)) = (qk_norm, &self.q_norm, &self.k_norm)
        {
            q = q_norm.forward(q);
            k = k_norm.forward(k);
        }
        (rope.apply(q), rope.apply(k), split(v, kv_heads))
    }

    fn scale(&self) -> f64 {
        1.0 / (self.shape.head_dim as f64).sqrt()
    }

    fn sinks(&self) -> Option<Tensor<1>> {
        self.sinks.as_ref().map(|s| s.val())
    }

    /// Per-head attention outputs `[batch, heads, seq, head_dim]` merged, then `o_proj`.
    fn merge_heads(&self, context: Tensor<4>) -> Tensor<3> {
        let [batch, heads, seq, head_dim] = context.dims();
        let context = context
            .swap_dims(1, 2)
            .reshape([batch, seq, heads * head_dim]);
        self.o_proj.forward(context)
    }
}

/// Which keys each query sees: keys up to its own position, and with a window only the
/// last `window` of them (transformers: `key > query - window`).
#[derive(Debug, Clone, Copy)]
pub struct Mask {
    /// Position of the first query.
    pub start: usize,
    pub sliding_window: Option<usize>,
}

impl Mask {
    /// Whether every query sees every one of `total` cached keys: a single query (the
    /// newest position) and no window shorter than the cache.
    fn is_full(&self, seq: usize, total: usize) -> bool {
        seq == 1 && self.sliding_window.is_none_or(|w| w >= total)
    }

    /// The additive mask `[1, 1, seq, total]` of queries `q` over `keys`, or `None` when
    /// every query sees every key.
    fn bias_for(&self, q: &Tensor<4>, keys: &Tensor<4>) -> Option<Tensor<4>> {
        let (seq, total) = (q.dims()[2], keys.dims()[2]);
        (!self.is_full(seq, total)).then(|| {
            self.bias(seq, total, &q.device())
                .reshape([1, 1, seq, total])
        })
    }

    /// Additive mask `[seq, total]`, built on the device: `-inf` where a key lies after its
    /// query or, with a window, `window` or more positions before it.
    fn bias(&self, seq: usize, total: usize, device: &Device) -> Tensor<2> {
        let start = self.start as i64;
        let queries = Tensor::<1, Int>::arange(start..start + seq as i64, device).reshape([seq, 1]);
        let keys = Tensor::<1, Int>::arange(0..total as i64, device).reshape([1, total]);
        let mut hidden = keys.clone().greater(queries.clone());
        if let Some(window) = self.sliding_window {
            hidden = hidden.bool_or(keys.lower_equal(queries.sub_scalar(window as i64)));
        }
        Tensor::zeros([seq, total], device).mask_fill(hidden, f32::NEG_INFINITY)
    }
}

/// Scaled dot-product attention without repeating keys. Where the device has it (flex) this
/// is the fused causal kernel of `moera_kernels`; otherwise the `g` query heads that share a
/// key/value head are stacked along the sequence axis, so each KV head is read once.
/// `q`: `[b, heads, t, d]`, `keys`: `[b, kv_heads, s, d]`, `values`: `[b, kv_heads, s, dv]`.
/// `sinks` (`[heads]`) join each softmax as one extra logit whose probability is dropped.
pub fn attend(
    q: Tensor<4>,
    keys: Tensor<4>,
    values: Tensor<4>,
    scale: f64,
    mask: Mask,
    sinks: Option<Tensor<1>>,
) -> Tensor<4> {
    if sinks.is_none() {
        let causal = CausalMask {
            start: mask.start,
            window: mask.sliding_window,
        };
        if let Some(context) = fused_attention(&q, &keys, &values, scale as f32, causal) {
            return context;
        }
    }
    let bias = mask.bias_for(&q, &keys);
    attend_with_bias(q, keys, values, scale, bias, sinks)
}

/// [`attend`] with an additive mask `bias` `[1 or batch, 1, seq, total]` (broadcast over
/// the query heads), or none where every query sees every key.
pub fn attend_with_bias(
    q: Tensor<4>,
    keys: Tensor<4>,
    values: Tensor<4>,
    scale: f64,
    bias: Option<Tensor<4>>,
    sinks: Option<Tensor<1>>,
) -> Tensor<4> {
    let [batch, heads, seq, head_dim] = q.dims();
    let [_, kv_heads, total, _] = keys.dims();
    let value_dim = values.dims()[3];
    let group = heads / kv_heads;
    let q = q.reshape([batch, kv_heads, group * seq, head_dim]);
    let mut scores = q.matmul(keys.swap_dims(2, 3)).mul_scalar(scale);
    if let Some(bias) = bias {
        // Rows are (group, seq): one mask per batch row broadcast over the group.
        let bias_rows = bias.dims()[0];
        let bias = bias.reshape([bias_rows, 1, 1, seq, total]);
        scores = (scores.reshape([batch, kv_heads, group, seq, total]) + bias).reshape([
            batch,
            kv_heads,
            group * seq,
            total,
        ]);
    }
    let probs = match sinks {
        Some(sinks) => {
            let sink_logits = sinks
                .reshape([1, kv_heads, group, 1, 1])
                .expand([batch, kv_heads, group, seq, 1])
                .reshape([batch, kv_heads, group * seq, 1]);
            softmax(Tensor::cat(vec![scores, sink_logits], 3), 3).narrow(3, 0, total)
        }
        None => softmax(scores, 3),
    };
    probs.matmul(values).reshape([batch, heads, seq, value_dim])
}
