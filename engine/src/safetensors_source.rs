//! Memory-mapped safetensors weights: one file or shards listed in `model.safetensors.index.json`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::TensorData;
use half::{bf16, f16};
use memmap2::Mmap;
use moera_models::{ModelError, WeightSource};
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// One mapped `.safetensors` file with its parsed header.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

impl Shard {
    fn open(path: &Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: read-only map of a file moera does not modify.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let shard = Self {
            path: path.to_path_buf(),
            mmap,
        };
        shard.view()?; // validate header, dtypes and offsets up front
        Ok(shard)
    }

    fn view(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap).map_err(|e| Error::Safetensors {
            path: self.path.clone(),
            reason: e.to_string(),
        })
    }
}

/// Writes `tensors` (name, shape, values) as an f32 safetensors file at `path`.
pub fn write_f32(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<()> {
    let invalid = |reason: String| Error::Safetensors {
        path: path.to_path_buf(),
        reason,
    };
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, values)| values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), data)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|view| (name.as_str(), view))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| invalid(e.to_string()))?;
    let file = safetensors::serialize(views, None).map_err(|e| invalid(e.to_string()))?;
    std::fs::write(path, file).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Weights of a Hugging Face model folder.
pub struct SafetensorsWeights {
    shards: Vec<Shard>,
    /// Tensor name → shard index.
    index: BTreeMap<String, usize>,
}

impl SafetensorsWeights {
    /// Opens `model.safetensors`, or the shards named by `model.safetensors.index.json`.
    pub fn open_folder(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|source| Error::Io {
                path: index_path.clone(),
                source,
            })?;
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: BTreeMap<String, String>,
            }
            let parsed: Index = serde_json::from_str(&text).map_err(|e| Error::Config {
                path: index_path.clone(),
                reason: e.to_string(),
            })?;
            let files: std::collections::BTreeSet<&String> = parsed.weight_map.values().collect();
            let paths: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
            Self::open_files(&paths)
        } else {
            Self::open_files(&[dir.join("model.safetensors")])
        }
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut index = BTreeMap::new();
        for path in paths {
            let shard = Shard::open(path)?;
            for name in shard.view()?.names() {
                index.insert(name.to_string(), shards.len());
            }
            shards.push(shard);
        }
        Ok(Self { shards, index })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Parameters in every tensor of the folder (from the headers; nothing is read).
    pub fn parameter_count(&self) -> u64 {
        self.shards
            .iter()
            .filter_map(|shard| shard.view().ok())
            .flat_map(|view| {
                view.tensors()
                    .into_iter()
                    .map(|(_, t)| t.shape().iter().product::<usize>() as u64)
                    .collect::<Vec<_>>()
            })
            .sum()
    }

    /// Path of the file holding `name`, for error messages.
    pub fn path_of(&self, name: &str) -> Option<&Path> {
        self.index.get(name).map(|&i| self.shards[i].path.as_path())
    }
}

impl WeightSource for SafetensorsWeights {
    fn tensor(&self, name: &str) -> Result<TensorData, ModelError> {
        let shard = self
            .index
            .get(name)
            .map(|&i| &self.shards[i])
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        let fail = |reason: String| ModelError::Weights {
            name: name.to_string(),
            reason,
        };
        let view = shard.view().map_err(|e| fail(e.to_string()))?;
        let tensor = view.tensor(name).map_err(|e| fail(e.to_string()))?;
        let bytes = tensor.data();
        let values: Vec<f32> = match tensor.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => return Err(fail(format!("dtype {other:?} is not supported"))),
        };
        Ok(TensorData::new(values, tensor.shape().to_vec()))
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}
