//! Mixtral: Llama attention (optionally with a sliding window) and a sparse MoE in every
//! layer, routed softmax → top-k → renormalize.

use burn::tensor::Device;
use serde::Deserialize;

use crate::attention::{AttentionSpec, QkNorm};
use crate::config::BaseConfig;
use crate::decoder::{Decoder, FeedForward};
use crate::llama::rotary;
use crate::moe::{ExpertActivation, ExpertLayout, ExpertSpec, RouterSpec, SparseMoe};
use crate::{ModelError, WeightSource};

/// `config.json` of a Mixtral model.
#[derive(Debug, Clone, Deserialize)]
pub struct MixtralConfig {
    #[serde(flatten)]
    pub base: BaseConfig,
    /// Each expert's hidden width.
    pub intermediate_size: usize,
    pub num_local_experts: usize,
    pub num_experts_per_tok: usize,
    #[serde(default)]
    pub sliding_window: Option<usize>,
}

impl std::ops::Deref for MixtralConfig {
    type Target = BaseConfig;

    fn deref(&self) -> &BaseConfig {
        &self.base
    }
}

impl MixtralConfig {
    pub fn router_spec(&self) -> RouterSpec {
        RouterSpec::softmax_top_k(self.num_local_experts, self.num_experts_per_tok, true)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        self.base.validate(self.head_dim())?;
        self.router_spec().validate()
    }
}

/// Builds a Mixtral [`Decoder`]. Experts load from transformers' fused tensors, per-expert
/// `w1/w2/w3` under `block_sparse_moe` (the original checkpoints) or GGUF's stacked ones.
pub fn load(
    config: &MixtralConfig,
    source: &dyn WeightSource,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Decoder, ModelError> {
    config.validate()?;
    let spec = AttentionSpec {
        hidden: config.hidden_size,
        heads: config.num_attention_heads,
        kv_heads: config.kv_heads(),
        head_dim: config.head_dim(),
        qkv_bias: false,
        o_bias: false,
        qk_norm: QkNorm::None,
        norm_eps: config.rms_norm_eps,
        clip_qkv: None,
        sliding_window: config.sliding_window.filter(|&w| w > 0),
        sinks: false,
    };
    Decoder::load(config, rotary(config)?, source, device, progress, |_, p| {
        // The original checkpoints name the block `block_sparse_moe`; transformers 5 `mlp`.
        let moe = if source.contains(&format!("{p}.block_sparse_moe.gate.weight")) {
            format!("{p}.block_sparse_moe")
        } else {
            format!("{p}.mlp")
        };
        let moe = SparseMoe::load(
            source,
            &moe,
            "gate",
            config.router_spec(),
            ExpertSpec {
                layout: ExpertLayout::MIXTRAL,
                hidden: config.hidden_size,
                intermediate: config.intermediate_size,
                activation: ExpertActivation::SwiGlu,
            },
            device,
        )?;
        Decoder::standard_layer(source, p, config, &spec, FeedForward::Sparse(moe), device)
    })
}
