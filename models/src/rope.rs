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
    /// YaRN: interpolated low frequencies, extrapolated high ones, a linear ramp between the
    /// `beta_fast`/`beta_slow` correction dimensions, and cos/sin scaled by `attention_factor`.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        truncate: bool,
        attention_factor: f64,
    },
}

impl RopeScaling {
    /// The factor transformers multiplies into cos and sin (YaRN's attention temperature).
    pub fn attention_factor(&self) -> f64 {
        match self {
            RopeScaling::Yarn {
                attention_factor, ..
            } => *attention_factor,
            _ => 1.0,
        }
    }
}

/// YaRN's magnitude correction `0.1·m·ln(scale) + 1` (1 when not scaling up).
pub fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

/// The rope parameters as written in `config.json`: the old `rope_scaling` object or the
/// newer `rope_parameters` one (which also carries `rope_theta`).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct RopeParameters {
    pub rope_type: Option<String>,
    /// The older spelling of `rope_type` (some configs carry both).
    #[serde(rename = "type")]
    pub legacy_type: Option<String>,
    pub rope_theta: Option<f64>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
    pub beta_fast: Option<f64>,
    pub beta_slow: Option<f64>,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    pub attention_factor: Option<f64>,
    pub truncate: Option<bool>,
}

impl RopeParameters {
    /// `rope_type`, or the older `type`, or `default`.
    pub fn kind(&self) -> &str {
        self.rope_type
            .as_deref()
            .or(self.legacy_type.as_deref())
            .unwrap_or("default")
    }

    /// The scaling these parameters describe; `max_position_embeddings` fills YaRN's
    /// defaults the way transformers does.
    pub fn scaling(&self, max_position_embeddings: usize) -> Result<RopeScaling, String> {
        let need = |value: Option<f64>, key: &str| {
            value.ok_or_else(|| format!("rope scaling is missing `{key}`"))
        };
        match self.kind() {
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
            "yarn" => {
                let original = self
                    .original_max_position_embeddings
                    .unwrap_or(max_position_embeddings);
                let factor = self
                    .factor
                    .unwrap_or(max_position_embeddings as f64 / original.max(1) as f64);
                let truthy = |v: Option<f64>| v.filter(|&v| v != 0.0);
                let attention_factor = match (
                    self.attention_factor,
                    truthy(self.mscale),
                    truthy(self.mscale_all_dim),
                ) {
                    (Some(given), _, _) => given,
                    (None, Some(m), Some(all)) => yarn_mscale(factor, m) / yarn_mscale(factor, all),
                    _ => yarn_mscale(factor, 1.0),
                };
                Ok(RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: truthy(self.beta_fast).unwrap_or(32.0),
                    beta_slow: truthy(self.beta_slow).unwrap_or(1.0),
                    truncate: self.truncate.unwrap_or(true),
                    attention_factor,
                })
            }
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
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            truncate,
            ..
        } => {
            // Dimension at which a frequency completes `rotations` turns over the old context.
            let correction_dim = |rotations: f64| {
                head_dim as f64
                    * (original_max_position_embeddings as f64
                        / (rotations * 2.0 * std::f64::consts::PI))
                        .ln()
                    / (2.0 * theta.ln())
            };
            let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
            if truncate {
                (low, high) = (low.floor(), high.ceil());
            }
            let (low, mut high) = (low.max(0.0) as f32, high.min(head_dim as f64 - 1.0) as f32);
            if low == high {
                high += 0.001;
            }
            let factor = factor as f32;
            base.iter()
                .enumerate()
                .map(|(i, &extrapolated)| {
                    let position_freq = (theta as f32).powf((2 * i) as f32 / head_dim as f32);
                    let interpolated = 1.0 / (factor * position_freq);
                    let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                    let keep = 1.0 - ramp;
                    interpolated * (1.0 - keep) + extrapolated * keep
                })
                .collect()
        }
    }
}

/// Rotary frequencies of a model; [`RotaryEmbedding::tables`] turns them into the cos/sin
/// rows of the positions one forward pass needs (so no table grows with the context length).
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f32>,
    attention_factor: f32,
    head_dim: usize,
}

/// cos/sin (each frequency repeated twice) of the positions one forward pass needs, computed
/// once per pass and shared by every layer: `[1, 1, seq, head_dim]` for consecutive positions
/// of every row, or `[batch, 1, 1, head_dim]` for one position per row (batched decoding).
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Tensor<4>,
    sin: Tensor<4>,
    head_dim: usize,
}

impl RotaryEmbedding {
    pub fn new(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Self {
        Self {
            inv_freq: inverse_frequencies(head_dim, theta, scaling),
            attention_factor: scaling.attention_factor() as f32,
            head_dim,
        }
    }

    /// The tables of positions `start..start + seq`, as transformers computes them
    /// (`position · inv_freq` in f32, then cos/sin times the attention factor).
    pub fn tables(&self, start: usize, seq: usize, device: &Device) -> RopeTables {
        let positions: Vec<usize> = (start..start + seq).collect();
        self.tables_of(&positions, [1, 1, seq, self.head_dim], device)
    }

    /// The tables of one position per batch row (`positions[row]`), for decoding sequences
    /// of different lengths together.
    pub fn tables_per_row(&self, positions: &[usize], device: &Device) -> RopeTables {
        self.tables_of(positions, [positions.len(), 1, 1, self.head_dim], device)
    }

    fn tables_of(&self, positions: &[usize], shape: [usize; 4], device: &Device) -> RopeTables {
        let mut cos = Vec::with_capacity(positions.len() * self.head_dim);
        let mut sin = Vec::with_capacity(positions.len() * self.head_dim);
        for &pos in positions {
            for _ in 0..2 {
                for f in &self.inv_freq {
                    let angle = pos as f32 * f;
                    cos.push(angle.cos() * self.attention_factor);
                    sin.push(angle.sin() * self.attention_factor);
                }
            }
        }
        RopeTables {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
            head_dim: self.head_dim,
        }
    }
}

impl RopeTables {
    /// Rotates `x` `[batch, heads, seq, head_dim]` in the rotate-half layout.
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        if let Some(rotated) = moera_kernels::rotate_half(&x, &self.cos, &self.sin) {
            return rotated;
        }
        let (cos, sin) = (self.cos.clone(), self.sin.clone());
        let half = self.head_dim / 2;
        let first = x.clone().narrow(3, 0, half);
        let second = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![second.neg(), first], 3);
        x * cos + rotated * sin
    }
}
