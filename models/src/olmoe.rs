//! OLMoE: q/k RMSNorm over the whole projection, optional q/k/v clipping, and a sparse MoE
//! in every layer routed softmax → top-k (renormalized only if `norm_topk_prob`).

use burn::tensor::Device;
use serde::Deserialize;

use crate::attention::{AttentionSpec, QkNorm};
use crate::config::BaseConfig;
use crate::decoder::{Decoder, FeedForward};
use crate::llama::rotary;
use crate::moe::{ExpertActivation, ExpertLayout, ExpertSpec, RouterSpec, SparseMoe};
use crate::{ModelError, WeightSource};

/// `config.json` of an OLMoE model.
#[derive(Debug, Clone, Deserialize)]
pub struct OlmoeConfig {
    #[serde(flatten)]
    pub base: BaseConfig,
    /// Each expert's hidden width.
    pub intermediate_size: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    #[serde(default)]
    pub norm_topk_prob: bool,
    #[serde(default)]
    pub clip_qkv: Option<f64>,
    #[serde(default)]
    pub attention_bias: bool,
}

impl std::ops::Deref for OlmoeConfig {
    type Target = BaseConfig;

    fn deref(&self) -> &BaseConfig {
        &self.base
    }
}

impl OlmoeConfig {
    pub fn router_spec(&self) -> RouterSpec {
        RouterSpec::softmax_top_k(
            self.num_experts,
            self.num_experts_per_tok,
            self.norm_topk_prob,
        )
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        self.base.validate(self.head_dim())?;
        self.router_spec().validate()
    }
}

/// Builds an OLMoE [`Decoder`].
pub fn load(
    config: &OlmoeConfig,
    source: &dyn WeightSource,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Decoder, ModelError> {
    config.validate()?;
    let hidden = config.hidden_size;
    let spec = AttentionSpec {
        hidden,
        heads: config.num_attention_heads,
        kv_heads: config.kv_heads(),
        head_dim: config.head_dim(),
        qkv_bias: config.attention_bias,
        o_bias: config.attention_bias,
        qk_norm: QkNorm::Projection,
        norm_eps: config.rms_norm_eps,
        clip_qkv: config.clip_qkv,
        sliding_window: None,
        sinks: false,
    };
    Decoder::load(config, rotary(config)?, source, device, progress, |_, p| {
        let moe = SparseMoe::load(
            source,
            &format!("{p}.mlp"),
            "gate",
            config.router_spec(),
            ExpertSpec {
                layout: ExpertLayout::HF,
                hidden,
                intermediate: config.intermediate_size,
                activation: ExpertActivation::SwiGlu,
            },
            device,
        )?;
        Decoder::standard_layer(source, p, config, &spec, FeedForward::Sparse(moe), device)
    })
}
