//! The `config.json` fields every decoder shares, flattened into each architecture's config.

use serde::Deserialize;

use crate::ModelError;
use crate::rope::{RopeParameters, RopeScaling};

/// Sizes, norms and rope settings common to the decoder architectures, as transformers
/// writes them. Rope settings are read from the newer `rope_parameters` object or from the
/// older top-level `rope_theta` plus `rope_scaling`.
#[derive(Debug, Clone, Deserialize)]
pub struct BaseConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub hidden_act: Option<String>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_max_positions() -> usize {
    2048
}

impl BaseConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    fn rope_source(&self) -> Option<&RopeParameters> {
        self.rope_parameters.as_ref().or(self.rope_scaling.as_ref())
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0)
    }

    pub fn rope_scaling(&self) -> Result<RopeScaling, ModelError> {
        self.rope_source()
            .map(|p| p.scaling(self.max_position_embeddings))
            .transpose()
            .map(Option::unwrap_or_default)
            .map_err(ModelError::Config)
    }

    /// The raw rope parameters (DeepSeek reads `mscale_all_dim` from them).
    pub fn rope_parameters(&self) -> Option<&RopeParameters> {
        self.rope_source()
    }

    /// Checks the shared dimensions before any weight is read. `head_dim` is the rotary
    /// width, which must be even.
    pub fn validate(&self, rotary_dim: usize) -> Result<(), ModelError> {
        let fail = |msg: String| Err(ModelError::Config(msg));
        if self.num_attention_heads == 0 || self.num_hidden_layers == 0 || self.hidden_size == 0 {
            return fail(
                "hidden_size, num_hidden_layers and num_attention_heads must be > 0".into(),
            );
        }
        if self.vocab_size == 0 {
            return fail("vocab_size must be > 0".into());
        }
        if self.kv_heads() == 0 || !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return fail(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            return fail(format!(
                "the rotary dimension ({rotary_dim}) must be even and > 0"
            ));
        }
        if let Some(act) = self.hidden_act.as_deref()
            && act != "silu"
        {
            return fail(format!(
                "hidden_act `{act}` is not supported (expected silu)"
            ));
        }
        self.rope_scaling().map(|_| ())
    }
}

/// Whether `layer_types` (transformers' per-layer attention kinds) marks layer `i` sliding.
pub fn is_sliding_layer(layer_types: &[String], i: usize) -> bool {
    layer_types.get(i).map(String::as_str) == Some("sliding_attention")
}
