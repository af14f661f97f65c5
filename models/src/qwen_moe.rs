//! Qwen2-MoE and Qwen3-MoE, and the dense Qwen2 and Qwen3 they extend. The MoE models route
//! softmax → top-k (renormalized if `norm_topk_prob`) and keep dense MLP layers where
//! `mlp_only_layers` or `decoder_sparse_step` say; a config without experts is all dense.
//! Qwen2 has q/k/v biases (Qwen2-MoE adds a shared expert behind a sigmoid gate); Qwen3 has
//! per-head q/k RMSNorm instead. Layers `layer_types` marks as sliding attend to a window.

use burn::tensor::{Device, TensorData};
use serde::Deserialize;

use crate::attention::{AttentionSpec, QkNorm};
use crate::config::BaseConfig;
use crate::decoder::{Decoder, FeedForward};
use crate::llama::rotary;
use crate::moe::{ExpertActivation, ExpertLayout, ExpertSpec, RouterSpec, SparseMoe};
use crate::nn::{GatedMlp, Linear, checked_data, f32_values};
use crate::{ModelError, WeightSource};

/// Which of the two generations a config describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QwenMoeVariant {
    Qwen2,
    Qwen3,
}

/// `config.json` of a Qwen2-MoE or Qwen3-MoE model.
#[derive(Debug, Clone, Deserialize)]
pub struct QwenMoeConfig {
    #[serde(flatten)]
    pub base: BaseConfig,
    /// Width of the dense MLP layers.
    pub intermediate_size: usize,
    #[serde(default)]
    pub moe_intermediate_size: usize,
    /// Routed experts: `num_experts` (Qwen3-MoE configs saved by transformers 5 spell it
    /// `num_local_experts`).
    #[serde(default)]
    num_experts: Option<usize>,
    #[serde(default)]
    num_local_experts: Option<usize>,
    #[serde(default)]
    pub num_experts_per_tok: usize,
    #[serde(default)]
    pub norm_topk_prob: bool,
    #[serde(default = "one")]
    pub decoder_sparse_step: usize,
    #[serde(default)]
    pub mlp_only_layers: Vec<usize>,
    /// Qwen2-MoE: width of the gated shared expert (0 or absent: none).
    #[serde(default)]
    pub shared_expert_intermediate_size: usize,
    /// Qwen2-MoE's q/k/v biases.
    #[serde(default)]
    pub qkv_bias: Option<bool>,
    /// Qwen3-MoE's attention biases.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default = "default_max_window_layers")]
    pub max_window_layers: usize,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
}

fn one() -> usize {
    1
}

fn default_max_window_layers() -> usize {
    28
}

impl std::ops::Deref for QwenMoeConfig {
    type Target = BaseConfig;

    fn deref(&self) -> &BaseConfig {
        &self.base
    }
}

impl QwenMoeConfig {
    pub fn num_experts(&self) -> usize {
        self.num_experts.or(self.num_local_experts).unwrap_or(0)
    }

    pub fn router_spec(&self) -> RouterSpec {
        RouterSpec::softmax_top_k(
            self.num_experts(),
            self.num_experts_per_tok,
            self.norm_topk_prob,
        )
    }

    /// Whether layer `i` is sparse (transformers' rule).
    pub fn is_sparse(&self, i: usize) -> bool {
        !self.mlp_only_layers.contains(&i)
            && self.num_experts() > 0
            && (i + 1).is_multiple_of(self.decoder_sparse_step.max(1))
    }

    /// The sliding window of layer `i`, if it has one. Without `use_sliding_window` there
    /// is none; else `layer_types` decides, or when absent each config class's rule:
    /// dense Qwen2/Qwen3 slide on layers from `max_window_layers` on, Qwen2-MoE on even
    /// layers below it, Qwen3-MoE on every layer.
    pub fn sliding_window(&self, variant: QwenMoeVariant, i: usize) -> Option<usize> {
        let window = self
            .sliding_window
            .filter(|&w| w > 0 && self.use_sliding_window)?;
        let sliding = match &self.layer_types {
            Some(types) => crate::config::is_sliding_layer(types, i),
            None => match (variant, self.num_experts() > 0) {
                (_, false) => i >= self.max_window_layers,
                (QwenMoeVariant::Qwen2, true) => i.is_multiple_of(2) && i < self.max_window_layers,
                (QwenMoeVariant::Qwen3, true) => true,
            },
        };
        sliding.then_some(window)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        self.base.validate(self.head_dim())?;
        if (0..self.num_hidden_layers).any(|i| self.is_sparse(i)) {
            self.router_spec().validate()?;
        }
        Ok(())
    }
}

/// Builds a Qwen2-MoE or Qwen3-MoE [`Decoder`].
pub fn load(
    variant: QwenMoeVariant,
    config: &QwenMoeConfig,
    source: &dyn WeightSource,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Decoder, ModelError> {
    config.validate()?;
    let hidden = config.hidden_size;
    let (qkv_bias, o_bias, qk_norm) = match variant {
        QwenMoeVariant::Qwen2 => (config.qkv_bias.unwrap_or(true), false, QkNorm::None),
        QwenMoeVariant::Qwen3 => (
            config.attention_bias,
            config.attention_bias,
            QkNorm::PerHead,
        ),
    };
    Decoder::load(config, rotary(config)?, source, device, progress, |i, p| {
        let spec = AttentionSpec {
            hidden,
            heads: config.num_attention_heads,
            kv_heads: config.kv_heads(),
            head_dim: config.head_dim(),
            qkv_bias,
            o_bias,
            qk_norm,
            norm_eps: config.rms_norm_eps,
            clip_qkv: None,
            sliding_window: config.sliding_window(variant, i),
            sinks: false,
        };
        let mlp = format!("{p}.mlp");
        let mlp = if config.is_sparse(i) {
            let shared_width = config.shared_expert_intermediate_size;
            let (shared, shared_gate) = if shared_width > 0 {
                let shared = GatedMlp::load(
                    source,
                    &format!("{mlp}.shared_expert"),
                    hidden,
                    shared_width,
                    false,
                    device,
                )?;
                // `[1, H]`, or `[H]` in GGUF files whose converter squeezed it.
                let name = format!("{mlp}.shared_expert_gate.weight");
                let weight = source.tensor(&name)?;
                let weight = if weight.shape().as_slice() == [hidden] {
                    TensorData::new(f32_values(weight, &name)?, [1, hidden])
                } else {
                    checked_data(source, &name, &[1, hidden])?
                };
                let gate = Linear::from_hf_weight(&weight, None, device);
                (Some(shared), Some(gate))
            } else {
                (None, None)
            };
            let moe = SparseMoe::load(
                source,
                &mlp,
                "gate",
                config.router_spec(),
                ExpertSpec {
                    layout: ExpertLayout::HF,
                    hidden,
                    intermediate: config.moe_intermediate_size,
                    activation: ExpertActivation::SwiGlu,
                },
                device,
            )?;
            FeedForward::Sparse(SparseMoe {
                shared,
                shared_gate,
                ..moe
            })
        } else {
            FeedForward::Dense(GatedMlp::load(
                source,
                &mlp,
                hidden,
                config.intermediate_size,
                false,
                device,
            )?)
        };
        Decoder::standard_layer(source, p, config, &spec, mlp, device)
    })
}
