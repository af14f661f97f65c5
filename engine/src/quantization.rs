//! How linear weights are held once loaded: the in-situ quantization policy.

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;

use burn::tensor::TensorData;
use moera_kernels::{QuantFormat, QuantizedMatrix};
use moera_models::{LinearWeight, ModelError, WeightSource};

use crate::error::{Error, Result};

/// The precision of linear weights after loading (`--quant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// GGUF blocks (Q4_0, Q4_1, Q8_0, Q4_K) stay as stored; float weights are quantized by
    /// model size: above 20B parameters to int4, above 7B to int8, otherwise kept as stored.
    #[default]
    Auto,
    /// Every weight in f32 (GGUF blocks dequantized at load).
    None,
    /// 8-bit, one scale per output channel.
    Int8,
    /// 4-bit in groups of 32 with a scale and a minimum each.
    Int4,
}

/// Parameters above which [`Quantization::Auto`] picks int4 for float weights.
pub const INT4_ABOVE_PARAMETERS: u64 = 20_000_000_000;
/// Parameters above which [`Quantization::Auto`] picks int8 for float weights.
pub const INT8_ABOVE_PARAMETERS: u64 = 7_000_000_000;

impl Quantization {
    /// The format float weights of a model of `parameters` are quantized to, if any.
    pub fn in_situ_format(self, parameters: u64) -> Option<QuantFormat> {
        let int4 = QuantFormat::Int4 {
            group: 32,
            asymmetric: true,
        };
        match self {
            Self::None => None,
            Self::Int8 => Some(QuantFormat::Int8),
            Self::Int4 => Some(int4),
            Self::Auto if parameters > INT4_ABOVE_PARAMETERS => Some(int4),
            Self::Auto if parameters > INT8_ABOVE_PARAMETERS => Some(QuantFormat::Int8),
            Self::Auto => None,
        }
    }

    /// Whether GGUF blocks are handed to the kernels as stored.
    pub fn keeps_gguf_blocks(self) -> bool {
        self == Self::Auto
    }
}

impl FromStr for Quantization {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "none" | "f32" => Ok(Self::None),
            "int8" | "q8" => Ok(Self::Int8),
            "int4" | "q4" => Ok(Self::Int4),
            _ => Err(Error::UnknownQuantization(s.to_string())),
        }
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::None => "none",
            Self::Int8 => "int8",
            Self::Int4 => "int4",
        })
    }
}

/// Memory of the linear weights (every projection and the head), as f32 and as loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WeightMemory {
    /// Linear weights loaded.
    pub matrices: usize,
    /// Of which held quantized.
    pub quantized: usize,
    /// Bytes they would take in f32.
    pub f32_bytes: usize,
    /// Bytes they take as loaded.
    pub loaded_bytes: usize,
}

impl fmt::Display for WeightMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        write!(
            f,
            "linear weights: {:.1} MiB as f32 → {:.1} MiB loaded ({} of {} matrices quantized)",
            mib(self.f32_bytes),
            mib(self.loaded_bytes),
            self.quantized,
            self.matrices
        )
    }
}

/// A weight source that quantizes float linear weights to `format` as they load and
/// accounts for the memory of every linear weight it hands over.
pub(crate) struct Quantizing<'a> {
    pub inner: &'a dyn WeightSource,
    pub format: Option<QuantFormat>,
    pub memory: Cell<WeightMemory>,
}

impl<'a> Quantizing<'a> {
    pub fn new(inner: &'a dyn WeightSource, format: Option<QuantFormat>) -> Self {
        Self {
            inner,
            format,
            memory: Cell::new(WeightMemory::default()),
        }
    }
}

impl WeightSource for Quantizing<'_> {
    fn tensor(&self, name: &str) -> std::result::Result<TensorData, ModelError> {
        self.inner.tensor(name)
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn linear_weight(
        &self,
        name: &str,
        out_features: usize,
        in_features: usize,
    ) -> std::result::Result<LinearWeight, ModelError> {
        let weight = self.inner.linear_weight(name, out_features, in_features)?;
        self.quantized(name, weight, out_features, in_features)
    }

    fn expert_weight(
        &self,
        name: &str,
        shape @ [experts, out_features, in_features]: [usize; 3],
    ) -> std::result::Result<LinearWeight, ModelError> {
        let weight = self.inner.expert_weight(name, shape)?;
        self.quantized(name, weight, experts * out_features, in_features)
    }

    fn lora(
        &self,
        prefix: &str,
        in_features: usize,
        out_features: usize,
    ) -> std::result::Result<Vec<moera_models::nn::LoraWeights>, ModelError> {
        self.inner.lora(prefix, in_features, out_features)
    }

    fn parameter_lora(
        &self,
        module: &str,
        parameter: &str,
        declared: &[&str],
        shape: [usize; 3],
    ) -> std::result::Result<Vec<(String, moera_models::nn::LoraWeights)>, ModelError> {
        self.inner
            .parameter_lora(module, parameter, declared, shape)
    }
}

impl Quantizing<'_> {
    /// `weight` (`rows × cols` values, HF layout) quantized to the format if it is f32, and
    /// counted.
    fn quantized(
        &self,
        name: &str,
        mut weight: LinearWeight,
        rows: usize,
        cols: usize,
    ) -> std::result::Result<LinearWeight, ModelError> {
        if let (LinearWeight::Dense(data), Some(format)) = (&weight, self.format) {
            let values = data.as_slice::<f32>().map_err(|e| ModelError::Weights {
                name: name.to_string(),
                reason: format!("{e:?}"),
            })?;
            // A row that does not split into the format's groups stays in f32.
            if let Ok(matrix) = QuantizedMatrix::quantize(format, values, rows, cols) {
                weight = LinearWeight::Quantized(matrix);
            }
        }
        let mut memory = self.memory.get();
        memory.matrices += 1;
        memory.f32_bytes += 4 * rows * cols;
        memory.loaded_bytes += match &weight {
            LinearWeight::Dense(_) => 4 * rows * cols,
            LinearWeight::Quantized(matrix) => {
                memory.quantized += 1;
                matrix.memory_bytes()
            }
        };
        self.memory.set(memory);
        Ok(weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_the_precision_by_model_size() {
        let auto = Quantization::Auto;
        assert_eq!(auto.in_situ_format(135_000_000), None);
        assert_eq!(auto.in_situ_format(8_000_000_000), Some(QuantFormat::Int8));
        assert!(matches!(
            auto.in_situ_format(30_000_000_000),
            Some(QuantFormat::Int4 { .. })
        ));
        assert_eq!(Quantization::None.in_situ_format(30_000_000_000), None);
        assert_eq!(
            Quantization::Int8.in_situ_format(1),
            Some(QuantFormat::Int8)
        );
        assert!("int5".parse::<Quantization>().is_err());
    }
}
