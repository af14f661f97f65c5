//! DeepSeek-V2 and DeepSeek-V3: multi-head latent attention (MLA) and a sparse MoE with
//! shared experts after the first `first_k_dense_replace` dense layers.
//!
//! MLA projects keys and values through a small latent (`kv_lora_rank`) that is what the
//! cache holds, beside one shared rotary key of `qk_rope_head_dim`; queries optionally go
//! through their own latent (`q_lora_rank`). Heads split into a part without position
//! (`qk_nope_head_dim`) and a rotary part. The checkpoints rotate interleaved pairs; the
//! loader permutes those weight rows once so the usual rotate-half tables apply.
//! V2 routes softmax → (group-limited) greedy top-k; V3 routes sigmoid + correction bias →
//! group-limited top-k → renormalize; both scale by `routed_scaling_factor`.

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use serde::Deserialize;

use crate::attention::{Mask, attend};
use crate::config::BaseConfig;
use crate::decoder::{Decoder, DecoderLayer, FeedForward, Mixer};
use crate::moe::{
    ExpertActivation, ExpertLayout, ExpertSpec, RouterSpec, RoutingMethod, SparseMoe,
};
use crate::nn::{GatedMlp, Linear, RmsNorm, checked_data, deinterleave_rows, f32_values};
use crate::rope::{RopeTables, RotaryEmbedding, yarn_mscale};
use crate::{KvCache, ModelError, WeightSource};

/// Which generation a config describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeepseekVersion {
    V2,
    V3,
}

/// `config.json` of a DeepSeek-V2 or -V3 model.
#[derive(Debug, Clone, Deserialize)]
pub struct DeepseekConfig {
    #[serde(flatten)]
    pub base: BaseConfig,
    /// Width of the dense MLP layers.
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub n_routed_experts: usize,
    pub num_experts_per_tok: usize,
    #[serde(default)]
    pub n_shared_experts: Option<usize>,
    #[serde(default)]
    pub first_k_dense_replace: Option<usize>,
    #[serde(default)]
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    #[serde(default)]
    pub n_group: Option<usize>,
    #[serde(default)]
    pub topk_group: Option<usize>,
    /// V2: `greedy` or `group_limited_greedy`.
    #[serde(default)]
    pub topk_method: Option<String>,
    #[serde(default)]
    pub norm_topk_prob: Option<bool>,
    #[serde(default)]
    pub routed_scaling_factor: Option<f32>,
    /// V3: whether the rotary dimensions are stored as interleaved pairs (V2 always are).
    #[serde(default)]
    pub rope_interleave: Option<bool>,
    #[serde(default)]
    pub attention_bias: bool,
}

impl std::ops::Deref for DeepseekConfig {
    type Target = BaseConfig;

    fn deref(&self) -> &BaseConfig {
        &self.base
    }
}

/// transformers' defaults for keys a config leaves out, per version:
/// (`n_shared_experts`, `first_k_dense_replace`, `n_group`, `topk_group`, `routed_scaling_factor`).
fn version_defaults(version: DeepseekVersion) -> (usize, usize, usize, usize, f32) {
    match version {
        DeepseekVersion::V2 => (2, 0, 1, 1, 1.0),
        DeepseekVersion::V3 => (1, 3, 8, 4, 2.5),
    }
}

impl DeepseekConfig {
    pub fn n_shared_experts(&self, version: DeepseekVersion) -> usize {
        self.n_shared_experts.unwrap_or(version_defaults(version).0)
    }

    /// How many leading layers are dense.
    pub fn first_k_dense_replace(&self, version: DeepseekVersion) -> usize {
        self.first_k_dense_replace
            .unwrap_or(version_defaults(version).1)
    }

    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// The router of the MoE layers; V3's correction bias is read per layer.
    pub fn router_spec(
        &self,
        version: DeepseekVersion,
        correction_bias: Vec<f32>,
    ) -> Result<RouterSpec, ModelError> {
        let (_, _, n_group, topk_group, scale) = version_defaults(version);
        let groups = (
            self.n_group.unwrap_or(n_group),
            self.topk_group.unwrap_or(topk_group),
        );
        let method = match version {
            DeepseekVersion::V2 => match self.topk_method.as_deref().unwrap_or("greedy") {
                "greedy" => RoutingMethod::SoftmaxGroupLimited { groups: None },
                "group_limited_greedy" => RoutingMethod::SoftmaxGroupLimited {
                    groups: Some(groups),
                },
                other => {
                    return Err(ModelError::Config(format!(
                        "topk_method `{other}` is not supported (greedy, group_limited_greedy)"
                    )));
                }
            },
            DeepseekVersion::V3 => RoutingMethod::SigmoidGroupLimited {
                groups,
                normalize: self.norm_topk_prob.unwrap_or(true),
                correction_bias,
            },
        };
        Ok(RouterSpec {
            num_experts: self.n_routed_experts,
            top_k: self.num_experts_per_tok,
            method,
            scale: self.routed_scaling_factor.unwrap_or(scale),
            bias: false,
        })
    }

    /// The softmax scale: `1/sqrt(qk_head_dim)`, times YaRN's `mscale_all_dim` correction
    /// squared when the rope is scaled.
    pub fn softmax_scale(&self) -> Result<f64, ModelError> {
        let mut scale = 1.0 / (self.qk_head_dim() as f64).sqrt();
        if let Some(params) = self.rope_parameters()
            && params.kind() != "default"
            && let Some(all_dim) = params.mscale_all_dim.filter(|&m| m != 0.0)
        {
            let factor = params
                .factor
                .ok_or_else(|| ModelError::Config("rope scaling is missing `factor`".into()))?;
            let m = yarn_mscale(factor, all_dim);
            scale *= m * m;
        }
        Ok(scale)
    }

    pub fn validate(&self, version: DeepseekVersion) -> Result<(), ModelError> {
        self.base.validate(self.qk_rope_head_dim)?;
        if self.kv_lora_rank == 0 || self.qk_nope_head_dim == 0 || self.v_head_dim == 0 {
            return Err(ModelError::Config(
                "kv_lora_rank, qk_nope_head_dim and v_head_dim must be > 0".into(),
            ));
        }
        if self.first_k_dense_replace(version) < self.num_hidden_layers {
            let bias = vec![0.0; self.n_routed_experts];
            self.router_spec(version, bias)?.validate()?;
        }
        Ok(())
    }
}

/// [`deinterleave_rows`] over weight data: rows `[offset, offset + rope)` of every
/// `stride`-row block go from interleaved pairs to halves.
fn deinterleave_data(data: TensorData, stride: usize, offset: usize, rope: usize) -> TensorData {
    let shape = data.shape().as_slice().to_vec();
    let cols = if shape.len() == 2 { shape[1] } else { 1 };
    let values = data.try_to_vec::<f32>().expect("weight sources yield f32");
    TensorData::new(
        deinterleave_rows(&values, cols, stride, offset, rope),
        shape,
    )
}

/// Shapes of a latent attention layer.
#[derive(Debug, Clone, Copy)]
struct LatentShape {
    heads: usize,
    nope: usize,
    rope: usize,
    value: usize,
    kv_lora_rank: usize,
    scale: f64,
}

/// Multi-head latent attention.
#[derive(Module, Debug)]
pub struct LatentAttention {
    q_proj: Option<Linear>,
    q_a_proj: Option<Linear>,
    q_a_layernorm: Option<RmsNorm>,
    q_b_proj: Option<Linear>,
    kv_a_proj_with_mqa: Linear,
    kv_a_layernorm: RmsNorm,
    kv_b_proj: Linear,
    o_proj: Linear,
    #[module(skip)]
    shape: LatentShape,
}

impl LatentAttention {
    pub fn linears(&self) -> Vec<&Linear> {
        [&self.q_proj, &self.q_a_proj, &self.q_b_proj]
            .into_iter()
            .flatten()
            .chain([&self.kv_a_proj_with_mqa, &self.kv_b_proj, &self.o_proj])
            .collect()
    }

    fn load(
        config: &DeepseekConfig,
        version: DeepseekVersion,
        source: &dyn WeightSource,
        prefix: &str,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let hidden = config.hidden_size;
        let heads = config.num_attention_heads;
        let (nope, rope, qk) = (
            config.qk_nope_head_dim,
            config.qk_rope_head_dim,
            config.qk_head_dim(),
        );
        let lora = config.kv_lora_rank;
        let interleaved = version == DeepseekVersion::V2 || config.rope_interleave.unwrap_or(true);
        // transformers builds these two norms with their default eps, not the config's.
        const LATENT_NORM_EPS: f64 = 1e-6;
        let name = |n: &str| format!("{prefix}.{n}");
        let bias = config.attention_bias;
        // A linear whose output rows carry rotary dims at `offset` in each `stride` block.
        let rotary_linear =
            |n: &str, inp: usize, out: usize, stride: usize, offset: usize, with_bias: bool| {
                let mut weight = checked_data(source, &name(&format!("{n}.weight")), &[out, inp])?;
                let mut b = if with_bias {
                    Some(checked_data(source, &name(&format!("{n}.bias")), &[out])?)
                } else {
                    None
                };
                if interleaved {
                    weight = deinterleave_data(weight, stride, offset, rope);
                    b = b.map(|b| deinterleave_data(b, stride, offset, rope));
                }
                let b = b.map(|b| burn::module::Param::from_tensor(Tensor::from_data(b, device)));
                Ok::<_, ModelError>(Linear::from_hf_weight(&weight, b, device))
            };
        let (q_proj, q_a_proj, q_a_layernorm, q_b_proj) = match config.q_lora_rank {
            None => (
                Some(rotary_linear(
                    "q_proj",
                    hidden,
                    heads * qk,
                    qk,
                    nope,
                    false,
                )?),
                None,
                None,
                None,
            ),
            Some(rank) => (
                None,
                Some(Linear::load(
                    source,
                    &name("q_a_proj"),
                    hidden,
                    rank,
                    bias,
                    device,
                )?),
                Some(RmsNorm::load(
                    source,
                    &name("q_a_layernorm.weight"),
                    rank,
                    LATENT_NORM_EPS,
                    device,
                )?),
                Some(rotary_linear(
                    "q_b_proj",
                    rank,
                    heads * qk,
                    qk,
                    nope,
                    false,
                )?),
            ),
        };
        Ok(Self {
            q_proj,
            q_a_proj,
            q_a_layernorm,
            q_b_proj,
            kv_a_proj_with_mqa: rotary_linear(
                "kv_a_proj_with_mqa",
                hidden,
                lora + rope,
                lora + rope,
                lora,
                bias,
            )?,
            kv_a_layernorm: RmsNorm::load(
                source,
                &name("kv_a_layernorm.weight"),
                lora,
                LATENT_NORM_EPS,
                device,
            )?,
            kv_b_proj: Linear::load(
                source,
                &name("kv_b_proj"),
                lora,
                heads * (nope + config.v_head_dim),
                false,
                device,
            )?,
            o_proj: Linear::load(
                source,
                &name("o_proj"),
                heads * config.v_head_dim,
                hidden,
                bias,
                device,
            )?,
            shape: LatentShape {
                heads,
                nope,
                rope,
                value: config.v_head_dim,
                kv_lora_rank: lora,
                scale: config.softmax_scale()?,
            },
        })
    }

    /// The cache holds the normalized latent and the rotated shared key.
    pub fn cache_dims(&self) -> [usize; 2] {
        [self.shape.kv_lora_rank, self.shape.rope]
    }

    pub fn forward(
        &self,
        x: Tensor<3>,
        rope: &RopeTables,
        cache: &mut KvCache,
        layer: usize,
    ) -> Tensor<3> {
        let LatentShape {
            heads,
            nope,
            rope: rope_dim,
            value,
            kv_lora_rank,
            scale,
        } = self.shape;
        let [batch, seq, _] = x.dims();
        let start = cache.len();
        let q = match (
            &self.q_proj,
            &self.q_a_proj,
            &self.q_a_layernorm,
            &self.q_b_proj,
        ) {
            (Some(q_proj), ..) => q_proj.forward(x.clone()),
            (None, Some(a), Some(norm), Some(b)) => b.forward(norm.forward(a.forward(x.clone()))),
            _ => unreachable!("load sets either q_proj or the q latent"),
        };
        let q = q
            .reshape([batch, seq, heads, nope + rope_dim])
            .swap_dims(1, 2);
        let q_nope = q.clone().narrow(3, 0, nope);
        let q_rot = rope.apply(q.narrow(3, nope, rope_dim));

        let compressed = self.kv_a_proj_with_mqa.forward(x);
        let latent = self
            .kv_a_layernorm
            .forward(compressed.clone().narrow(2, 0, kv_lora_rank))
            .reshape([batch, 1, seq, kv_lora_rank]);
        let k_rot = rope.apply(
            compressed
                .narrow(2, kv_lora_rank, rope_dim)
                .reshape([batch, 1, seq, rope_dim]),
        );
        let (latents, k_rots) = cache.append(layer, latent, k_rot);
        let total = latents.dims()[2];
        let kv = self
            .kv_b_proj
            .forward(latents.reshape([batch, total, kv_lora_rank]))
            .reshape([batch, total, heads, nope + value])
            .swap_dims(1, 2);
        let keys = Tensor::cat(
            vec![
                kv.clone().narrow(3, 0, nope),
                k_rots.expand([batch, heads, total, rope_dim]),
            ],
            3,
        );
        let values = kv.narrow(3, nope, value);
        let queries = Tensor::cat(vec![q_nope, q_rot], 3);
        let mask = Mask {
            start,
            sliding_window: None,
        };
        let context = attend(queries, keys, values, scale, mask, None);
        self.o_proj
            .forward(context.swap_dims(1, 2).reshape([batch, seq, heads * value]))
    }
}

/// Builds a DeepSeek-V2 or -V3 [`Decoder`].
pub fn load(
    version: DeepseekVersion,
    config: &DeepseekConfig,
    source: &dyn WeightSource,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Decoder, ModelError> {
    config.validate(version)?;
    let hidden = config.hidden_size;
    let rope = RotaryEmbedding::new(
        config.qk_rope_head_dim,
        config.rope_theta(),
        &config.rope_scaling()?,
    );
    Decoder::load(config, rope, source, device, progress, |i, p| {
        let (input_layernorm, post_attention_layernorm) =
            Decoder::layer_norms(source, p, config, device)?;
        let self_attn = Mixer::Latent(LatentAttention::load(
            config,
            version,
            source,
            &format!("{p}.self_attn"),
            device,
        )?);
        let mlp_prefix = format!("{p}.mlp");
        let mlp = if i < config.first_k_dense_replace(version) {
            FeedForward::Dense(GatedMlp::load(
                source,
                &mlp_prefix,
                hidden,
                config.intermediate_size,
                false,
                device,
            )?)
        } else {
            let experts = config.n_routed_experts;
            let correction_bias = match version {
                DeepseekVersion::V2 => vec![],
                DeepseekVersion::V3 => {
                    let name = format!("{mlp_prefix}.gate.e_score_correction_bias");
                    f32_values(checked_data(source, &name, &[experts])?, &name)?
                }
            };
            let shared = match config.n_shared_experts(version) {
                0 => None,
                n => Some(GatedMlp::load(
                    source,
                    &format!("{mlp_prefix}.shared_experts"),
                    hidden,
                    config.moe_intermediate_size * n,
                    false,
                    device,
                )?),
            };
            let moe = SparseMoe::load(
                source,
                &mlp_prefix,
                "gate",
                config.router_spec(version, correction_bias)?,
                ExpertSpec {
                    layout: ExpertLayout::HF,
                    hidden,
                    intermediate: config.moe_intermediate_size,
                    activation: ExpertActivation::SwiGlu,
                },
                device,
            )?;
            FeedForward::Sparse(SparseMoe { shared, ..moe })
        };
        Ok(DecoderLayer {
            input_layernorm,
            self_attn,
            post_attention_layernorm,
            mlp,
        })
    })
}
