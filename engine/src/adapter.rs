//! LoRA adapters in PEFT's format: `adapter_config.json` and `adapter_model.safetensors`
//! with keys like `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::tensor::TensorData;
use moera_models::nn::LoraWeights;
use moera_models::{LinearWeight, ModelError, WeightSource};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::safetensors_source::SafetensorsWeights;

/// The fields of `adapter_config.json` moera reads.
#[derive(Debug, Clone, Deserialize)]
pub struct AdapterConfig {
    #[serde(default = "lora")]
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    /// A list of module names, or one regular expression over module paths.
    #[serde(default)]
    pub target_modules: Option<serde_json::Value>,
    /// Adapted parameters (MoE experts' stacked weights, routers' weights), matched
    /// against the end of a parameter path: `mlp.experts.gate_up_proj`.
    #[serde(default)]
    pub target_parameters: Option<Vec<String>>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub modules_to_save: Option<serde_json::Value>,
}

fn lora() -> String {
    "LORA".into()
}

impl AdapterConfig {
    /// The factor of `B·A`: `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scale(&self) -> f32 {
        let r = self.r as f64;
        let divisor = if self.use_rslora { r.sqrt() } else { r };
        (self.lora_alpha / divisor) as f32
    }
}

/// Whether `targets` (PEFT's `target_parameters`) name the parameter at `path`: equal, or
/// a suffix after a dot.
fn targets_parameter(targets: &[String], path: &str) -> bool {
    targets
        .iter()
        .any(|target| path == target || path.ends_with(&format!(".{target}")))
}

/// `target` with its layer prefix (`model.layers.3.`) dropped, as PEFT's configs list
/// parameters: `mlp.experts.gate_up_proj`.
fn parameter_target(path: &str) -> &str {
    let mut parts = path.splitn(4, '.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(_), Some("layers"), Some(index), Some(rest)) if index.parse::<usize>().is_ok() => {
            rest
        }
        _ => path,
    }
}

/// Folds LoRA factors in PEFT's layout into the linear weight `values` `[out, in]`:
/// `W[o, i] += s · Σ_r B[o, r] · A[r, i]`.
fn fold_lora(
    name: &str,
    values: &mut [f32],
    factors: &LoraWeights,
    [out_features, in_features]: [usize; 2],
) -> std::result::Result<(), ModelError> {
    use moera_models::nn::check_shape;
    let rank = factors.a.shape().first().copied().unwrap_or(0);
    check_shape(&format!("{name} lora_A"), &factors.a, &[rank, in_features])?;
    check_shape(&format!("{name} lora_B"), &factors.b, &[out_features, rank])?;
    let f32s = |data: &TensorData| moera_models::nn::f32_values(data.clone(), name);
    let (a, b) = (f32s(&factors.a)?, f32s(&factors.b)?);
    for (o, row) in values.chunks_exact_mut(in_features).enumerate() {
        for r in 0..rank {
            let coefficient = factors.scale * b[o * rank + r];
            let a_row = &a[r * in_features..(r + 1) * in_features];
            row.iter_mut()
                .zip(a_row)
                .for_each(|(w, &x)| *w += coefficient * x);
        }
    }
    Ok(())
}

/// A PEFT LoRA adapter read from its folder.
pub struct PeftAdapter {
    dir: PathBuf,
    pub config: AdapterConfig,
    weights: SafetensorsWeights,
    /// Keys the model asked for (the rest are reported as not matching the base model).
    used: RefCell<BTreeSet<String>>,
}

/// PEFT's prefix of every key.
const KEY_PREFIX: &str = "base_model.model.";

impl PeftAdapter {
    /// Opens `dir/adapter_config.json` and `dir/adapter_model.safetensors`, rejecting what
    /// moera does not run (other PEFT methods, DoRA, per-module ranks or alphas, extra
    /// trained modules).
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| Error::Io {
            path: config_path.clone(),
            source,
        })?;
        let invalid = |reason: String| Error::Adapter {
            path: config_path.clone(),
            reason,
        };
        let config: AdapterConfig =
            serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if !config.peft_type.eq_ignore_ascii_case("lora") {
            return Err(invalid(format!(
                "PEFT type {} (moera runs LORA adapters)",
                config.peft_type
            )));
        }
        if config.use_dora {
            return Err(invalid("DoRA adapters are not supported".into()));
        }
        if config.r == 0 {
            return Err(invalid("rank r is 0".into()));
        }
        if !config.rank_pattern.is_empty() || !config.alpha_pattern.is_empty() {
            return Err(invalid(
                "per-module ranks or alphas (rank_pattern, alpha_pattern) are not supported".into(),
            ));
        }
        if config
            .modules_to_save
            .as_ref()
            .is_some_and(|m| !m.is_null() && m.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(invalid(
                "modules_to_save (fully trained extra modules) are not supported".into(),
            ));
        }
        let weights = SafetensorsWeights::open_files(&[dir.join("adapter_model.safetensors")])?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            weights,
            used: RefCell::new(BTreeSet::new()),
        })
    }

    /// The factors for linear layer `prefix` (HF module path), if the adapter has them.
    fn lora(&self, prefix: &str) -> std::result::Result<Option<LoraWeights>, ModelError> {
        let key = |factor: &str| format!("{KEY_PREFIX}{prefix}.{factor}.weight");
        let (a, b) = (key("lora_A"), key("lora_B"));
        if !self.weights.contains(&a) && !self.weights.contains(&b) {
            return Ok(None);
        }
        let weights = LoraWeights {
            a: self.weights.tensor(&a)?,
            b: self.weights.tensor(&b)?,
            scale: self.config.scale(),
            dropout: 0.0,
            slot: 0,
        };
        self.used.borrow_mut().extend([a, b]);
        Ok(Some(weights))
    }

    /// The factors for the parameter `{module}.{parameter}` (see
    /// [`WeightSource::parameter_lora`]), if the adapter targets it and has them.
    fn parameter_lora(
        &self,
        module: &str,
        parameter: &str,
        declared: &[&str],
    ) -> std::result::Result<Option<(String, LoraWeights)>, ModelError> {
        let targets = self.config.target_parameters.as_deref().unwrap_or_default();
        let key_path =
            moera_models::nn::peft_parameter_key_path(module, parameter, declared, |p| {
                targets_parameter(targets, p)
            });
        match key_path {
            Some(key_path) => Ok(self.lora(&key_path)?.map(|weights| (key_path, weights))),
            None => Ok(None),
        }
    }

    /// Fails when some of the adapter's tensors were not asked for by the model: the
    /// adapter was trained on another base model (or targets modules moera does not adapt).
    pub fn check_all_used(&self) -> Result<()> {
        let used = self.used.borrow();
        let unused: Vec<&str> = self
            .weights
            .names()
            .filter(|n| !used.contains(*n))
            .collect();
        if unused.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = unused.iter().take(3).copied().collect();
        Err(Error::Adapter {
            path: self.dir.clone(),
            reason: format!(
                "{} tensors match no layer of the model (e.g. {}); was it trained on {}?",
                unused.len(),
                shown.join(", "),
                self.config
                    .base_model_name_or_path
                    .as_deref()
                    .unwrap_or("another base model")
            ),
        })
    }
}

/// A new LoRA adapter to train: rank, scaling, dropout and the modules it adapts.
///
/// ```
/// let spec = moera_engine::adapter::LoraSpec::new(8, 16.0).targets(["q_proj", "v_proj"]);
/// assert_eq!(spec.scale(), 2.0);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    /// PEFT's `lora_dropout`.
    pub dropout: f64,
    /// Module names (`q_proj`, `down_proj`, …), matched as PEFT does against the end of a
    /// module path, or `all-linear` for every linear layer but the head.
    pub target_modules: Vec<String>,
    /// Parameters, as PEFT's `target_parameters`: MoE experts' stacked weights
    /// (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) and routers' weights
    /// (`mlp.gate.weight`), matched against the end of a parameter path. They take no
    /// dropout.
    pub target_parameters: Vec<String>,
    /// Scale by `alpha / √r` instead of `alpha / r`.
    pub use_rslora: bool,
    /// Seed of the `lora_A` initialization.
    pub seed: u64,
}

impl LoraSpec {
    /// Rank `r`, `alpha`, no dropout, adapting the attention projections (`q_proj`,
    /// `k_proj`, `v_proj`, `o_proj`).
    pub fn new(r: usize, alpha: f64) -> Self {
        Self {
            r,
            alpha,
            dropout: 0.0,
            target_modules: ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .into(),
            target_parameters: Vec::new(),
            use_rslora: false,
            seed: 0,
        }
    }

    /// The same spec adapting `modules` instead.
    pub fn targets<S: Into<String>>(mut self, modules: impl IntoIterator<Item = S>) -> Self {
        self.target_modules = modules.into_iter().map(Into::into).collect();
        self
    }

    /// The same spec also adapting `parameters` (see [`LoraSpec::target_parameters`]).
    pub fn target_parameters<S: Into<String>>(
        mut self,
        parameters: impl IntoIterator<Item = S>,
    ) -> Self {
        self.target_parameters = parameters.into_iter().map(Into::into).collect();
        self
    }

    /// The factor of `B·A`.
    pub fn scale(&self) -> f32 {
        self.config(None).scale()
    }

    fn targets_module(&self, path: &str) -> bool {
        self.target_modules.iter().any(|target| {
            (target == "all-linear" && path != "lm_head")
                || path == target
                || path.ends_with(&format!(".{target}"))
        })
    }

    pub(crate) fn config(&self, base_model: Option<String>) -> AdapterConfig {
        AdapterConfig {
            peft_type: lora(),
            r: self.r,
            lora_alpha: self.alpha,
            use_rslora: self.use_rslora,
            use_dora: false,
            target_modules: Some(self.target_modules.clone().into()),
            target_parameters: Some(self.target_parameters.clone()),
            base_model_name_or_path: base_model,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
            modules_to_save: None,
        }
    }
}

/// Fresh LoRA factors for the layers a [`LoraSpec`] targets.
pub(crate) struct FreshLora {
    spec: LoraSpec,
    adapted: RefCell<usize>,
}

impl FreshLora {
    pub fn new(spec: &LoraSpec) -> Result<Self> {
        if spec.r == 0
            || (spec.target_modules.is_empty() && spec.target_parameters.is_empty())
            || !(0.0..1.0).contains(&spec.dropout)
            || !spec.alpha.is_finite()
        {
            return Err(Error::InvalidArgument(format!(
                "a LoRA adapter needs r ≥ 1, a finite alpha, a target module or parameter and \
                 dropout in [0, 1); got r = {}, alpha {}, targets {:?} and {:?}, dropout {}",
                spec.r, spec.alpha, spec.target_modules, spec.target_parameters, spec.dropout
            )));
        }
        if !spec.target_parameters.is_empty() && spec.dropout > 0.0 {
            return Err(Error::InvalidArgument(format!(
                "LoRA on parameters ({:?}) takes no dropout (as PEFT's): set dropout to 0",
                spec.target_parameters
            )));
        }
        Ok(Self {
            spec: spec.clone(),
            adapted: RefCell::new(0),
        })
    }

    fn lora(&self, prefix: &str, in_features: usize, out_features: usize) -> Option<LoraWeights> {
        if !self.spec.targets_module(prefix) {
            return None;
        }
        Some(self.init(prefix, self.spec.r, [out_features, in_features]))
    }

    fn parameter_lora(
        &self,
        module: &str,
        parameter: &str,
        declared: &[&str],
        [experts, out_features, in_features]: [usize; 3],
    ) -> Option<(String, LoraWeights)> {
        let targets = &self.spec.target_parameters;
        let key_path =
            moera_models::nn::peft_parameter_key_path(module, parameter, declared, |p| {
                targets_parameter(targets, p)
            })?;
        // PEFT's ParamWrapper: one `[r·E, in]` / `[out, r·E]` pair for all experts.
        let path = format!("{module}.{parameter}");
        let weights = self.init(&path, self.spec.r * experts, [out_features, in_features]);
        Some((key_path, weights))
    }

    /// PEFT's initialization of `rows` × `in` / `out` × `rows` factors for the layer or
    /// parameter at `path`, counted as adapted.
    fn init(
        &self,
        path: &str,
        rows: usize,
        [out_features, in_features]: [usize; 2],
    ) -> LoraWeights {
        use rand::SeedableRng;
        *self.adapted.borrow_mut() += 1;
        // Each layer's draw depends on the seed and its path only, not on loading order.
        let layer_seed = path
            .bytes()
            .fold(self.spec.seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        let mut rng = rand::rngs::StdRng::seed_from_u64(layer_seed);
        LoraWeights::init(
            rows,
            in_features,
            out_features,
            self.spec.scale(),
            self.spec.dropout,
            &mut rng,
        )
    }
}

/// The LoRA factors a load applies: a PEFT adapter's or fresh ones.
pub(crate) enum AdapterWeights {
    Peft(Box<PeftAdapter>),
    Fresh(FreshLora),
}

impl AdapterWeights {
    fn lora(
        &self,
        prefix: &str,
        in_features: usize,
        out_features: usize,
    ) -> std::result::Result<Option<LoraWeights>, ModelError> {
        match self {
            Self::Peft(adapter) => adapter.lora(prefix),
            Self::Fresh(fresh) => Ok(fresh.lora(prefix, in_features, out_features)),
        }
    }

    fn parameter_lora(
        &self,
        module: &str,
        parameter: &str,
        declared: &[&str],
        shape: [usize; 3],
    ) -> std::result::Result<Option<(String, LoraWeights)>, ModelError> {
        match self {
            Self::Peft(adapter) => {
                let found = adapter.parameter_lora(module, parameter, declared)?;
                // One rank-r pair per expert: another expert count is another model.
                if let Some((key_path, weights)) = &found {
                    let rows = weights.a.shape().first().copied().unwrap_or(0);
                    if rows != adapter.config.r * shape[0] {
                        return Err(ModelError::Weights {
                            name: format!("{key_path}.lora_A.weight"),
                            reason: format!(
                                "{rows} rows, not r = {} for each of {} experts",
                                adapter.config.r, shape[0]
                            ),
                        });
                    }
                }
                Ok(found)
            }
            Self::Fresh(fresh) => Ok(fresh.parameter_lora(module, parameter, declared, shape)),
        }
    }

    /// Fails when a PEFT adapter's tensors were not all used, or when fresh factors adapt
    /// no layer.
    pub fn check_all_used(&self) -> Result<()> {
        match self {
            Self::Peft(adapter) => adapter.check_all_used(),
            Self::Fresh(fresh) if *fresh.adapted.borrow() == 0 => {
                Err(Error::InvalidArgument(format!(
                    "LoRA targets {:?} and {:?} match no linear layer or parameter of the model",
                    fresh.spec.target_modules, fresh.spec.target_parameters
                )))
            }
            Self::Fresh(_) => Ok(()),
        }
    }

    pub fn config(self, base_model: &Path) -> AdapterConfig {
        match self {
            Self::Peft(adapter) => adapter.config,
            Self::Fresh(fresh) => fresh.spec.config(Some(base_model.display().to_string())),
        }
    }
}

/// A weight source with adapters' LoRA factors on top, each tagged with its slot, or the
/// one adapter folded into the weights (`merge`: `W + s·B·A` in f32, no separate factors).
pub(crate) struct Adapted<'a> {
    pub inner: &'a dyn WeightSource,
    /// (slot, adapter).
    pub adapters: &'a [(usize, AdapterWeights)],
    pub merge: bool,
}

impl WeightSource for Adapted<'_> {
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
        let factors = match (self.merge, self.adapters, name.strip_suffix(".weight")) {
            (true, [(_, adapter)], Some(prefix)) => {
                adapter.lora(prefix, in_features, out_features)?
            }
            _ => None,
        };
        let Some(factors) = factors else {
            return self.inner.linear_weight(name, out_features, in_features);
        };
        let weight = self.inner.tensor(name)?;
        moera_models::nn::check_shape(name, &weight, &[out_features, in_features])?;
        let mut values = moera_models::nn::f32_values(weight, name)?;
        fold_lora(name, &mut values, &factors, [out_features, in_features])?;
        let weight = TensorData::new(values, [out_features, in_features]);
        Ok(LinearWeight::Dense(weight))
    }

    fn expert_weight(
        &self,
        name: &str,
        shape: [usize; 3],
    ) -> std::result::Result<LinearWeight, ModelError> {
        self.inner.expert_weight(name, shape)
    }

    fn lora(
        &self,
        prefix: &str,
        in_features: usize,
        out_features: usize,
    ) -> std::result::Result<Vec<LoraWeights>, ModelError> {
        if self.adapters.is_empty() {
            return self.inner.lora(prefix, in_features, out_features);
        }
        // Merged factors are part of the weights already.
        if self.merge {
            return Ok(Vec::new());
        }
        let mut found = Vec::new();
        for (slot, adapter) in self.adapters {
            if let Some(weights) = adapter.lora(prefix, in_features, out_features)? {
                found.push(LoraWeights {
                    slot: *slot,
                    ..weights
                });
            }
        }
        Ok(found)
    }

    fn parameter_lora(
        &self,
        module: &str,
        parameter: &str,
        declared: &[&str],
        shape: [usize; 3],
    ) -> std::result::Result<Vec<(String, LoraWeights)>, ModelError> {
        if self.adapters.is_empty() {
            return self
                .inner
                .parameter_lora(module, parameter, declared, shape);
        }
        // Merged after loading too (`Decoder::merge_parameter_adapters`), whatever the
        // layout the checkpoint stores the experts in.
        let mut found = Vec::new();
        for (slot, adapter) in self.adapters {
            if let Some((key_path, weights)) =
                adapter.parameter_lora(module, parameter, declared, shape)?
            {
                let weights = LoraWeights {
                    slot: *slot,
                    ..weights
                };
                found.push((key_path, weights));
            }
        }
        Ok(found)
    }
}

/// Writes `adapters` (with `config`'s rank and alpha) as a PEFT adapter folder.
pub(crate) fn save(
    dir: &Path,
    config: &AdapterConfig,
    adapters: &[&moera_models::nn::LoraAdapter],
    base_model: &Path,
) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut tensors = Vec::new();
    let mut targets = BTreeSet::new();
    let mut parameters = BTreeSet::new();
    for adapter in adapters {
        for (factor, param) in [("lora_A", &adapter.a), ("lora_B", &adapter.b)] {
            // moera holds `[in, r]` / `[r, out]`; PEFT stores the transposes.
            let value = param.val().transpose();
            let shape = value.dims().to_vec();
            let values = value
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .map_err(|e| Error::InvalidArgument(format!("{e:?}")))?;
            let key = format!("{KEY_PREFIX}{}.{factor}.weight", adapter.path);
            tensors.push((key, shape, values));
        }
        match &adapter.parameter {
            Some(parameter) => {
                parameters.insert(parameter_target(parameter).to_string());
            }
            None => {
                if let Some(module) = adapter.path.rsplit('.').next() {
                    targets.insert(module.to_string());
                }
            }
        }
    }
    crate::safetensors_source::write_f32(&dir.join("adapter_model.safetensors"), &tensors)?;
    let json = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "use_rslora": config.use_rslora,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        // An empty list when only parameters are adapted: PEFT reads null as "the model
        // type's default modules".
        "target_modules": targets,
        "target_parameters": (!parameters.is_empty()).then_some(parameters),
        "base_model_name_or_path": config
            .base_model_name_or_path
            .clone()
            .unwrap_or_else(|| base_model.display().to_string()),
    });
    let config_path = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&json).map_err(|e| Error::Config {
        path: config_path.clone(),
        reason: e.to_string(),
    })?;
    std::fs::write(&config_path, text).map_err(io(&config_path))?;
    Ok(())
}
