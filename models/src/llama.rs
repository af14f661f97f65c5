//! Llama (and Llama-shaped dense models such as SmolLM2): RMSNorm, RoPE, grouped-query
//! attention with a causal mask, SwiGLU MLP, tied or untied output head.

use burn::tensor::Device;
use serde::Deserialize;

use crate::attention::{AttentionSpec, QkNorm};
use crate::config::BaseConfig;
use crate::decoder::{Decoder, FeedForward};
use crate::nn::GatedMlp;
use crate::rope::RotaryEmbedding;
use crate::{ModelError, WeightSource};

/// `config.json` of a Llama-family model, as transformers writes it.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    #[serde(flatten)]
    pub base: BaseConfig,
    pub intermediate_size: usize,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
}

impl std::ops::Deref for LlamaConfig {
    type Target = BaseConfig;

    fn deref(&self) -> &BaseConfig {
        &self.base
    }
}

impl LlamaConfig {
    /// Checks the dimensions fit together before any weight is read.
    pub fn validate(&self) -> Result<(), ModelError> {
        self.base.validate(self.head_dim())
    }

    /// The attention of every layer.
    pub fn attention_spec(&self) -> AttentionSpec {
        AttentionSpec {
            hidden: self.hidden_size,
            heads: self.num_attention_heads,
            kv_heads: self.kv_heads(),
            head_dim: self.head_dim(),
            qkv_bias: self.attention_bias,
            o_bias: self.attention_bias,
            qk_norm: QkNorm::None,
            norm_eps: self.rms_norm_eps,
            clip_qkv: None,
            sliding_window: None,
            sinks: false,
        }
    }
}

/// The rotary tables of a standard-attention model.
pub fn rotary(base: &BaseConfig) -> Result<RotaryEmbedding, ModelError> {
    Ok(RotaryEmbedding::new(
        base.head_dim(),
        base.rope_theta(),
        &base.rope_scaling()?,
    ))
}

/// Llama models run as a [`Decoder`] with dense layers.
pub struct Llama;

impl Llama {
    /// Builds the model from HF-named weights; `progress` is called after each layer.
    pub fn load(
        config: &LlamaConfig,
        source: &dyn WeightSource,
        device: &Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Decoder, ModelError> {
        config.validate()?;
        let spec = config.attention_spec();
        Decoder::load(config, rotary(config)?, source, device, progress, |_, p| {
            let mlp = GatedMlp::load(
                source,
                &format!("{p}.mlp"),
                config.hidden_size,
                config.intermediate_size,
                config.mlp_bias,
                device,
            )?;
            Decoder::standard_layer(source, p, config, &spec, FeedForward::Dense(mlp), device)
        })
    }
}
