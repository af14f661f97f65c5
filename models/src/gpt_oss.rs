//! GPT-OSS: attention with q/k/v/o biases and a learned sink logit per head, a sliding
//! window on the layers `layer_types` marks, and experts with a fused, interleaved
//! `gate_up_proj`, biases and a clamped SwiGLU; routed top-k over biased logits, then
//! softmax over the chosen.

use burn::tensor::Device;
use serde::Deserialize;

use crate::attention::{AttentionSpec, QkNorm};
use crate::config::BaseConfig;
use crate::decoder::{Decoder, FeedForward};
use crate::llama::rotary;
use crate::moe::{
    ExpertActivation, ExpertLayout, ExpertSpec, RouterSpec, RoutingMethod, SparseMoe,
};
use crate::{ModelError, WeightSource};

/// `config.json` of a GPT-OSS model.
#[derive(Debug, Clone, Deserialize)]
pub struct GptOssConfig {
    #[serde(flatten)]
    pub base: BaseConfig,
    /// Each expert's hidden width.
    pub intermediate_size: usize,
    pub num_local_experts: usize,
    pub num_experts_per_tok: usize,
    #[serde(default = "default_window")]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "default_alpha")]
    pub swiglu_alpha: f32,
    #[serde(default = "default_limit")]
    pub swiglu_limit: f32,
    #[serde(default = "yes")]
    pub attention_bias: bool,
}

fn default_window() -> Option<usize> {
    Some(128)
}

fn default_alpha() -> f32 {
    1.702
}

fn default_limit() -> f32 {
    7.0
}

fn yes() -> bool {
    true
}

impl std::ops::Deref for GptOssConfig {
    type Target = BaseConfig;

    fn deref(&self) -> &BaseConfig {
        &self.base
    }
}

impl GptOssConfig {
    pub fn router_spec(&self) -> RouterSpec {
        RouterSpec {
            num_experts: self.num_local_experts,
            top_k: self.num_experts_per_tok,
            method: RoutingMethod::TopKSoftmax,
            scale: 1.0,
            bias: true,
        }
    }

    /// The sliding window of layer `i`: transformers' default alternates sliding and full
    /// attention, starting with sliding.
    pub fn sliding_window(&self, i: usize) -> Option<usize> {
        let sliding = match &self.layer_types {
            Some(types) => crate::config::is_sliding_layer(types, i),
            None => i.is_multiple_of(2),
        };
        sliding
            .then_some(self.sliding_window)
            .flatten()
            .filter(|&w| w > 0)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        self.base.validate(self.head_dim())?;
        if self.swiglu_limit.is_nan() || self.swiglu_limit <= 0.0 || !self.swiglu_alpha.is_finite()
        {
            return Err(ModelError::Config(format!(
                "swiglu_limit ({}) must be > 0 and swiglu_alpha ({}) finite",
                self.swiglu_limit, self.swiglu_alpha
            )));
        }
        self.router_spec().validate()
    }
}

/// Builds a GPT-OSS [`Decoder`] from unquantized weights (the published checkpoints store
/// experts as MXFP4 blocks, which are not read yet: they fail as a missing tensor).
pub fn load(
    config: &GptOssConfig,
    source: &dyn WeightSource,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Decoder, ModelError> {
    // transformers' GPT-OSS default head width, which is not hidden / heads.
    let mut config = config.clone();
    config.base.head_dim.get_or_insert(64);
    let config = &config;
    config.validate()?;
    let hidden = config.hidden_size;
    Decoder::load(config, rotary(config)?, source, device, progress, |i, p| {
        let spec = AttentionSpec {
            hidden,
            heads: config.num_attention_heads,
            kv_heads: config.kv_heads(),
            head_dim: config.head_dim(),
            qkv_bias: config.attention_bias,
            o_bias: config.attention_bias,
            qk_norm: QkNorm::None,
            norm_eps: config.rms_norm_eps,
            clip_qkv: None,
            sliding_window: config.sliding_window(i),
            sinks: true,
        };
        let activation = ExpertActivation::ClampedSwiGlu {
            alpha: config.swiglu_alpha,
            limit: config.swiglu_limit,
        };
        let moe = SparseMoe::load(
            source,
            &format!("{p}.mlp"),
            "router",
            config.router_spec(),
            ExpertSpec {
                layout: ExpertLayout::InterleavedWithBias,
                hidden,
                intermediate: config.intermediate_size,
                activation,
            },
            device,
        )?;
        Decoder::standard_layer(source, p, config, &spec, FeedForward::Sparse(moe), device)
    })
}
