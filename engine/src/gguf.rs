//! GGUF (v2/v3) reader: metadata, tensor infos and dequantization, over a memory map.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::TensorData;
use memmap2::Mmap;
use moera_kernels::{QuantFormat, QuantizedMatrix};
use moera_models::moe::check_stacked_shape;
use moera_models::nn::{check_shape, gather_rows};
use moera_models::{LinearWeight, Metadata, ModelError, WeightSource};

use crate::error::{Error, Result};
use crate::quant::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in GGML order: `dims[0]` is the contiguous (fastest) one.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    pub size: u64,
}

impl TensorInfo {
    pub fn element_count(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Shape in row-major order (outermost first), as the rest of moera uses.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An opened GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    index: BTreeMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len());
        let Some(end) = end else {
            return Err(Error::Truncated {
                path: self.path.to_path_buf(),
                what: format!("{what} at byte {} needs {n} bytes", self.pos),
            });
        };
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self
            .take(N, what)?
            .try_into()
            .expect("take returns N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn malformed(&self, reason: String) -> Error {
        Error::Malformed {
            path: self.path.to_path_buf(),
            reason,
        }
    }

    /// A count that must fit in what is left of the file (each item takes `min_item` bytes).
    fn count(&mut self, what: &str, min_item: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_item as u64) > left {
            return Err(Error::Truncated {
                path: self.path.to_path_buf(),
                what: format!("{what} of {n} does not fit in the remaining {left} bytes"),
            });
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.count(what, 1)?;
        let bytes = self.take(len, what)?;
        // Some vocabularies hold invalid UTF-8 pieces; keep them readable rather than fail.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, type_id: u32, depth: usize) -> Result<Value> {
        let v = match type_id {
            0 => Value::U8(self.array::<1>("u8")?[0]),
            1 => Value::I8(self.array::<1>("i8")?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array("u16")?)),
            3 => Value::I16(i16::from_le_bytes(self.array("i16")?)),
            4 => Value::U32(self.u32("u32")?),
            5 => Value::I32(i32::from_le_bytes(self.array("i32")?)),
            6 => Value::F32(f32::from_le_bytes(self.array("f32")?)),
            7 => Value::Bool(self.array::<1>("bool")?[0] != 0),
            8 => Value::String(self.string("string")?),
            9 => {
                if depth > 4 {
                    return Err(self.malformed("metadata arrays nested too deeply".into()));
                }
                let item_type = self.u32("array type")?;
                let len = self.count("array length", 1)?;
                let mut items = Vec::with_capacity(len);
                for _ in 0..len {
                    items.push(self.value(item_type, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64("u64")?),
            11 => Value::I64(i64::from_le_bytes(self.array("i64")?)),
            12 => Value::F64(f64::from_le_bytes(self.array("f64")?)),
            other => return Err(self.malformed(format!("unknown metadata value type {other}"))),
        };
        Ok(v)
    }
}

impl GgufFile {
    /// Opens and validates a GGUF file: header, metadata, tensor infos and that every
    /// tensor's data lies inside the file. Tensor data is not read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: the map is read-only; moera never writes model files while they are open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, mmap)
    }

    fn parse(path: PathBuf, mmap: Mmap) -> Result<Self> {
        let mut cur = Cursor {
            bytes: &mmap,
            pos: 0,
            path: &path,
        };
        let magic = cur.take(4, "magic").map_err(|_| Error::BadMagic {
            path: path.clone(),
            found: mmap.to_vec(),
        })?;
        if magic != MAGIC {
            return Err(Error::BadMagic {
                path: path.clone(),
                found: magic.to_vec(),
            });
        }
        let version = cur.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::UnsupportedVersion {
                path: path.clone(),
                version,
            });
        }
        let tensor_count = cur.count("tensor count", 24)?;
        let kv_count = cur.count("metadata count", 12)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = cur.string("metadata key")?;
            let type_id = cur.u32("metadata type")?;
            let value = cur.value(type_id, 0)?;
            metadata.insert(key, value);
        }
        let mut raw = Vec::with_capacity(tensor_count);
        for _ in 0..tensor_count {
            let name = cur.string("tensor name")?;
            let n_dims = cur.u32("tensor rank")?;
            if n_dims == 0 || n_dims > 4 {
                return Err(cur.malformed(format!("tensor `{name}` has rank {n_dims}")));
            }
            let dims = (0..n_dims)
                .map(|_| cur.u64("tensor dimension"))
                .collect::<Result<Vec<_>>>()?;
            let type_id = cur.u32("tensor type")?;
            let offset = cur.u64("tensor offset")?;
            raw.push((name, dims, type_id, offset));
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => return Err(cur.malformed(format!("invalid general.alignment {v:?}"))),
            },
        };
        let data_start = (cur.pos as u64).div_ceil(alignment) * alignment;
        let file_len = mmap.len() as u64;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut index = BTreeMap::new();
        for (name, dims, type_id, rel_offset) in raw {
            let Some(ggml_type) = GgmlType::from_id(type_id) else {
                return Err(Error::UnknownTensorType {
                    path: path.clone(),
                    tensor: name,
                    type_id,
                });
            };
            let elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n > 0);
            let size = elements.and_then(|n| ggml_type.byte_size(n));
            let Some(size) = size else {
                return Err(cur.malformed(format!(
                    "tensor `{name}` has dims {dims:?}, which do not fit {ggml_type:?} blocks"
                )));
            };
            let offset = data_start.checked_add(rel_offset);
            let end = offset.and_then(|o| o.checked_add(size));
            match (offset, end) {
                (Some(offset), Some(end)) if end <= file_len => {
                    index.insert(name.clone(), tensors.len());
                    tensors.push(TensorInfo {
                        name,
                        dims,
                        ggml_type,
                        offset,
                        size,
                    });
                }
                _ => {
                    return Err(Error::TensorOutOfBounds {
                        path: path.clone(),
                        tensor: name,
                        end: end.unwrap_or(u64::MAX),
                        file_len,
                    });
                }
            }
        }
        Ok(Self {
            path,
            mmap,
            version,
            metadata,
            tensors,
            index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw (possibly quantized) bytes of a tensor.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[info.offset as usize..(info.offset + info.size) as usize]
    }

    /// Dequantizes a tensor to f32, in row-major order with [`TensorInfo::shape`].
    pub fn dequantize(&self, name: &str) -> Option<Vec<f32>> {
        let info = self.tensor_info(name)?;
        Some(info.ggml_type.dequantize(self.tensor_bytes(info)))
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    /// Error helper: a config problem in this file.
    pub fn config_error(&self, reason: impl Into<String>) -> Error {
        Error::Config {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }
}

impl Metadata for GgufFile {
    fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key)?.as_f64()
    }

    fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }
}

/// GGUF tensors seen through Hugging Face names.
pub struct GgufWeights<'a> {
    pub file: &'a GgufFile,
    /// Maps an HF name to the GGUF name (per architecture).
    pub name_map: fn(&str) -> Option<String>,
    /// `(heads, kv_heads)` when Q/K rows carry llama.cpp's RoPE permutation.
    pub unpermute_qk: Option<(usize, usize)>,
    /// Hand linear weights in Q4_0/Q4_1/Q8_0/Q4_K over as their blocks instead of f32.
    pub keep_quantized: bool,
}

impl GgufWeights<'_> {
    fn info(&self, hf_name: &str) -> Option<&TensorInfo> {
        (self.name_map)(hf_name).and_then(|n| self.file.tensor_info(&n))
    }

    fn found(&self, name: &str) -> Result<&TensorInfo, ModelError> {
        self.info(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }

    /// Rotary heads of a Q/K projection whose rows llama.cpp permuted.
    fn permuted_heads(&self, name: &str) -> Option<usize> {
        let (heads, kv_heads) = self.unpermute_qk?;
        if name.ends_with("self_attn.q_proj.weight") {
            Some(heads)
        } else if name.ends_with("self_attn.k_proj.weight") {
            Some(kv_heads)
        } else {
            None
        }
    }

    /// The HF row order of a permuted Q/K projection: HF row `i` is GGUF row `order[i]`.
    fn unpermuted_order(&self, name: &str, rows: usize) -> Result<Option<Vec<usize>>, ModelError> {
        let Some(heads) = self.permuted_heads(name) else {
            return Ok(None);
        };
        unpermute_order(rows, heads)
            .map(Some)
            .map_err(|reason| ModelError::Weights {
                name: name.to_string(),
                reason,
            })
    }
}

impl WeightSource for GgufWeights<'_> {
    fn tensor(&self, name: &str) -> Result<TensorData, ModelError> {
        let info = self.found(name)?;
        let shape = info.shape();
        let values = info.ggml_type.dequantize(self.file.tensor_bytes(info));
        let rows = shape.first().copied().unwrap_or(1);
        let values = match self.unpermuted_order(name, rows)? {
            Some(order) => gather_rows(&values, values.len() / rows.max(1), &order),
            None => values,
        };
        Ok(TensorData::new(values, shape))
    }

    fn contains(&self, name: &str) -> bool {
        self.info(name).is_some()
    }

    fn linear_weight(
        &self,
        name: &str,
        out_features: usize,
        in_features: usize,
    ) -> Result<LinearWeight, ModelError> {
        let info = self.found(name)?;
        let format = info
            .ggml_type
            .kept_quantized()
            .filter(|_| self.keep_quantized);
        let Some(format) = format else {
            let data = self.tensor(name)?;
            check_shape(name, &data, &[out_features, in_features])?;
            return Ok(LinearWeight::Dense(data));
        };
        let shape = info.shape();
        if shape != [out_features, in_features] {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                expected: vec![out_features, in_features],
                found: shape,
            });
        }
        let matrix = self.blocks(name, info, format, out_features, in_features)?;
        Ok(LinearWeight::Quantized(
            match self.unpermuted_order(name, out_features)? {
                Some(order) => matrix.permute_rows(&order),
                None => matrix,
            },
        ))
    }

    fn expert_weight(&self, name: &str, shape: [usize; 3]) -> Result<LinearWeight, ModelError> {
        let info = self.found(name)?;
        check_stacked_shape(name, &info.shape(), &shape)?;
        let format = info
            .ggml_type
            .kept_quantized()
            .filter(|_| self.keep_quantized);
        let [experts, out_features, in_features] = shape;
        Ok(match format {
            // `[E, out, in]` blocks are already every expert's rows one after the other.
            Some(format) => LinearWeight::Quantized(self.blocks(
                name,
                info,
                format,
                experts * out_features,
                in_features,
            )?),
            None => LinearWeight::Dense(self.tensor(name)?),
        })
    }
}

impl GgufWeights<'_> {
    /// A tensor's blocks re-laid out as a `[rows, cols]` quantized matrix.
    fn blocks(
        &self,
        name: &str,
        info: &TensorInfo,
        format: QuantFormat,
        rows: usize,
        cols: usize,
    ) -> Result<QuantizedMatrix, ModelError> {
        QuantizedMatrix::from_ggml(format, self.file.tensor_bytes(info), rows, cols).map_err(|e| {
            ModelError::Weights {
                name: name.to_string(),
                reason: e.to_string(),
            }
        })
    }
}

/// The row order undoing the permutation llama.cpp's converter applies to Q/K projections
/// for its interleaved RoPE: GGUF row `h·d + 2i + j` holds HF row `h·d + j·d/2 + i`, so HF
/// row `r` is GGUF row `order[r]`.
pub fn unpermute_order(rows: usize, heads: usize) -> Result<Vec<usize>, String> {
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(format!(
            "{rows} rows do not split into {heads} rotary heads"
        ));
    }
    let head_dim = rows / heads;
    Ok(moera_models::nn::deinterleave_order(
        rows, head_dim, 0, head_dim,
    ))
}
