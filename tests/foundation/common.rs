//! Shared helpers: fixture paths, reference tensors, comparisons.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use moera::engine::{Device, Model, TokenEvent};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

/// Tensors of a reference `.safetensors` file, as f32 (ints converted).
/// Reference tensors by name: shape and values.
pub type Reference = HashMap<String, (Vec<usize>, Vec<f64>)>;

pub fn reference(path: &Path) -> Reference {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("valid reference file");
    tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data();
            let values: Vec<f64> = match view.dtype() {
                safetensors::Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::I64 => data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("unexpected dtype {other:?} in {name}"),
            };
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

pub fn ids(values: &[f64]) -> Vec<u32> {
    values.iter().map(|&v| v as u32).collect()
}

/// Largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max)
}

pub fn load_on(path: &Path, device: &Device) -> Model {
    Model::load_on(path, device, &mut |_| {})
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

/// The GPU device under test: CUDA when built with `cuda` (unless `MOERA_DEVICE=wgpu`), else
/// wgpu (Mesa lavapipe in CI).
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub fn gpu() -> Device {
    use moera::engine::DeviceKind;
    let kind = match DeviceKind::default_kind() {
        Ok(kind) if kind != DeviceKind::Flex => kind,
        _ if cfg!(feature = "cuda") => DeviceKind::Cuda,
        _ => DeviceKind::Wgpu,
    };
    kind.device()
        .unwrap_or_else(|e| panic!("{kind} device: {e}"))
}

pub fn flex() -> Device {
    Device::flex()
}

/// The SmolLM2 GGUF from the model cache, or `None` (with a note) when it was not fetched.
pub fn smollm2_path() -> Option<PathBuf> {
    cached_model("smollm2")
}

/// all-MiniLM-L6-v2's folder from the model cache, or `None` (with a note).
pub fn minilm_path() -> Option<PathBuf> {
    cached_model("minilm")
}

/// A default model (`scripts/fetch-models.sh`) by its alias, or `None` (with a note) when it
/// was not fetched.
fn cached_model(alias: &str) -> Option<PathBuf> {
    let path = moera::engine::hub::resolve_model(alias);
    if path.exists() {
        Some(path)
    } else {
        eprintln!(
            "SKIPPED: {alias} is not in the model cache ({}); run scripts/fetch-models.sh",
            path.display()
        );
        None
    }
}

/// A scratch directory removed on drop.
pub fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}

/// Copies a fixture model folder into a scratch directory for mutation.
pub fn copy_fixture(name: &str, into: &Path) -> PathBuf {
    let dest = into.join(name);
    std::fs::create_dir_all(&dest).unwrap();
    for entry in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dest.join(entry.file_name())).unwrap();
    }
    dest
}

/// Token ids a greedy generation of `max_tokens` yields after `prompt`.
pub fn greedy_ids(model: &Model, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let request = moera::engine::GenerationRequest::ids(prompt.to_vec())
        .max_tokens(max_tokens)
        .sampling(moera::engine::SamplingParams::greedy());
    token_ids(model.generate(&request).expect("generate"))
}

/// The ids of the token events of a generation.
pub fn token_ids(events: impl Iterator<Item = moera::engine::Result<TokenEvent>>) -> Vec<u32> {
    events
        .filter_map(|e| match e.expect("event") {
            TokenEvent::Token { id, .. } => Some(id),
            TokenEvent::Done { .. } => None,
        })
        .collect()
}
