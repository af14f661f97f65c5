//! Rotary position embeddings (RoPE) in the Hugging Face "rotate half" layout.

use burn::tensor::{Device, Tensor, TensorData};
use serde::Deserialize;

/// How the rotary frequencies are scaled for long contexts.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum RopeScaling {
    #[default]
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// The rope parameters as written in `config.json`: the old `rope_scaling` object or the
/// newer `rope_parameters` one (which also carries `rope_theta`).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct RopeParameters {
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    pub rope_theta: Option<f64>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
}

impl RopeParameters {
    pub fn scaling(&self) -> Result<RopeScaling, String> {
        let need = |value: Option<f64>, key: &str| {
            value.ok_or_else(|| format!("rope scaling is missing `{key}`"))
        };
        match self.rope_type.as_deref().unwrap_or("default") {
            "default" => Ok(RopeScaling::Default),
            "linear" => Ok(RopeScaling::Linear {
                factor: need(self.factor, "factor")?,
            }),
            "llama3" => Ok(RopeScaling::Llama3 {
                factor: need(self.factor, "factor")?,
                low_freq_factor: need(self.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: need(self.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: self
                    .original_max_position_embeddings
                    .ok_or("rope scaling is missing `original_max_position_embeddings`")?,
            }),
            other => Err(format!("unsupported rope type `{other}`")),
        }
    }
}

/// Inverse frequencies `1 / theta^(2i/d)` after scaling, computed in f32 as transformers does.
pub fn inverse_frequencies(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f32> {
    let base: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    match *scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let (factor, low, high) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
            );
            let old_context = original_max_position_embeddings as f32;
            let low_freq_wavelen = old_context / low;
            let high_freq_wavelen = old_context / high;
            base.iter()
                .map(|&freq| {
                    let wavelen = 2.0 * std::f32::consts::PI / freq;
                    if wavelen < high_freq_wavelen {
                        freq
                    } else if wavelen > low_freq_wavelen {
                        freq / factor
                    } else {
                        let smooth = (old_context / wavelen - low) / (high - low);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    }
                })
                .collect()
        }
    }
}

/// Precomputed cos/sin tables `[max_positions, head_dim]` (each frequency repeated twice).
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    cos: Tensor<2>,
    sin: Tensor<2>,
    head_dim: usize,
}

impl RotaryEmbedding {
    pub fn new(
        head_dim: usize,
        max_positions: usize,
        theta: f64,
        scaling: &RopeScaling,
        device: &Device,
    ) -> Self {
        let inv_freq = inverse_frequencies(head_dim, theta, scaling);
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_positions * head_dim);
        let mut sin = Vec::with_capacity(max_positions * head_dim);
        for pos in 0..max_positions {
            let angles: Vec<f32> = inv_freq.iter().map(|f| pos as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().take(half).map(|a| a.cos()));
                sin.extend(angles.iter().take(half).map(|a| a.sin()));
            }
        }
        let shape = [max_positions, head_dim];
        Self {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
            head_dim,
        }
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Rotates `x` `[batch, heads, seq, head_dim]` whose first token sits at `start`.
    pub fn apply(&self, x: Tensor<4>, start: usize) -> Tensor<4> {
        let seq = x.dims()[2];
        let rows = [start..start + seq, 0..self.head_dim];
        let cos = self.cos.clone().slice(rows.clone()).unsqueeze::<4>();
        let sin = self.sin.clone().slice(rows).unsqueeze::<4>();
        let half = self.head_dim / 2;
        let first = x.clone().narrow(3, 0, half);
        let second = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![second.neg(), first], 3);
        x * cos + rotated * sin
    }
}
