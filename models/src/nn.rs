//! Small building blocks shared by the architectures.

use burn::module::{Module, Param};
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::{ModelError, WeightSource};

/// Reads tensor `name` and checks it has `expected` shape.
pub fn checked_data(
    source: &dyn WeightSource,
    name: &str,
    expected: &[usize],
) -> Result<TensorData, ModelError> {
    let data = source.tensor(name)?;
    let found = data.shape().as_slice().to_vec();
    if found.as_slice() != expected {
        return Err(ModelError::ShapeMismatch {
            name: name.to_string(),
            expected: expected.to_vec(),
            found,
        });
    }
    Ok(data)
}

/// Loads tensor `name` onto `device`, checking it has `expected` shape.
pub fn load_checked<const D: usize>(
    source: &dyn WeightSource,
    name: &str,
    expected: [usize; D],
    device: &Device,
) -> Result<Tensor<D>, ModelError> {
    Ok(Tensor::from_data(
        checked_data(source, name, &expected)?,
        device,
    ))
}

/// A linear layer `y = x·Wᵀ + b`, with `W` kept transposed (`[in, out]`) for the matmul.
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
}

impl Linear {
    /// Loads `{prefix}.weight` (HF layout `[out, in]`) and, if `bias`, `{prefix}.bias`.
    pub fn load(
        source: &dyn WeightSource,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let name = format!("{prefix}.weight");
        let weight = checked_data(source, &name, &[out_features, in_features])?;
        let bias = if bias {
            let b = load_checked(source, &format!("{prefix}.bias"), [out_features], device)?;
            Some(Param::from_tensor(b))
        } else {
            None
        };
        Ok(Self::from_hf_weight(&weight, bias, device))
    }

    /// Wraps HF-layout `[out, in]` weight data.
    pub fn from_hf_weight(
        weight: &TensorData,
        bias: Option<Param<Tensor<1>>>,
        device: &Device,
    ) -> Self {
        // Stored as a contiguous [in, out] matrix so every forward is a plain row-major matmul.
        let weight = Tensor::from_data(transpose_2d(weight), device);
        Self {
            weight: Param::from_tensor(weight),
            bias,
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        burn::tensor::module::linear(x, self.weight.val(), self.bias.as_ref().map(|b| b.val()))
    }
}

/// Host-side transpose of an f32 matrix.
pub fn transpose_2d(data: &TensorData) -> TensorData {
    let (rows, cols) = (data.shape()[0], data.shape()[1]);
    let values = data.as_slice::<f32>().expect("weight sources yield f32");
    let mut out = vec![0f32; values.len()];
    for (r, row) in values.chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            out[c * rows + r] = v;
        }
    }
    TensorData::new(out, [cols, rows])
}

/// Root-mean-square layer norm: `x / sqrt(mean(x²) + eps) · w`.
#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(
        source: &dyn WeightSource,
        name: &str,
        size: usize,
        eps: f64,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let weight = load_checked(source, name, [size], device)?;
        Ok(Self {
            weight: Param::from_tensor(weight),
            eps,
        })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let inv_rms = x
            .clone()
            .square()
            .mean_dim(D - 1)
            .add_scalar(self.eps)
            .sqrt()
            .recip();
        x * inv_rms * self.weight.val().unsqueeze()
    }
}

/// Token embedding table `[vocab, hidden]`.
#[derive(Module, Debug)]
pub struct Embedding {
    pub weight: Param<Tensor<2>>,
}

impl Embedding {
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        burn::tensor::module::embedding(self.weight.val(), tokens)
    }
}

/// Builds an int tensor `[rows, cols]` of token ids on `device`.
pub fn token_tensor(ids: &[u32], rows: usize, device: &Device) -> Tensor<2, Int> {
    let cols = ids.len() / rows.max(1);
    let ids: Vec<i64> = ids.iter().map(|&id| id as i64).collect();
    Tensor::from_data(TensorData::new(ids, [rows, cols]), device)
}
