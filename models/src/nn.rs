//! Small building blocks shared by the architectures.

use burn::module::{Module, Param};
use burn::tensor::{Device, Int, Tensor, TensorData};

use moera_kernels::{LoraUpdate, QuantLinear};

use crate::{LinearWeight, ModelError, WeightSource};

/// Reads tensor `name` and checks it has `expected` shape.
pub fn checked_data(
    source: &dyn WeightSource,
    name: &str,
    expected: &[usize],
) -> Result<TensorData, ModelError> {
    let data = source.tensor(name)?;
    check_shape(name, &data, expected)?;
    Ok(data)
}

/// [`ModelError::ShapeMismatch`] unless `data` has `expected` shape.
pub fn check_shape(name: &str, data: &TensorData, expected: &[usize]) -> Result<(), ModelError> {
    check_dims(name, data.shape().as_slice(), expected)
}

/// [`ModelError::ShapeMismatch`] unless `found` is `expected`.
pub fn check_dims(name: &str, found: &[usize], expected: &[usize]) -> Result<(), ModelError> {
    if found != expected {
        return Err(ModelError::ShapeMismatch {
            name: name.to_string(),
            expected: expected.to_vec(),
            found: found.to_vec(),
        });
    }
    Ok(())
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

/// A linear layer `y = x·Wᵀ + b`: `W` as f32, kept transposed (`[in, out]`) for the
/// matmul, or quantized for the dequant-matmul kernels; optionally with a LoRA adapter
/// adding `s·(x·A)·B`.
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Option<Param<Tensor<2>>>,
    #[module(skip)]
    pub quantized: Option<QuantLinear>,
    pub bias: Option<Param<Tensor<1>>>,
    /// LoRA adapters, one per loaded adapter that targets this layer; the one of the
    /// thread's active slot applies ([`with_lora_slot`]).
    pub lora: Vec<LoraAdapter>,
}

/// A low-rank update of a linear layer: `y += scale · (x·A)·B`, `A` `[in, r]`, `B`
/// `[r, out]` (PEFT stores their transposes, `lora_A` `[r, in]` and `lora_B` `[out, r]`).
#[derive(Module, Debug)]
pub struct LoraAdapter {
    pub a: Param<Tensor<2>>,
    pub b: Param<Tensor<2>>,
    #[module(skip)]
    pub scale: f32,
    /// The adapted layer's HF module path (`model.layers.0.self_attn.q_proj`): PEFT's keys.
    #[module(skip)]
    pub path: String,
    /// Probability of zeroing an input of `A` while training (on an autodiff device).
    #[module(skip)]
    pub dropout: f64,
    /// Experts sharing the factors (PEFT's `ParamWrapper` on a stacked `[E, out, in]`
    /// weight): expert `e` reads columns `e·r..(e+1)·r` of `A` and rows `e, E + e, …` of
    /// `B`. 1 for a linear layer.
    #[module(skip)]
    pub experts: usize,
    /// The adapted parameter's path when the adapter targets a parameter rather than a
    /// module (PEFT's `target_parameters`), e.g. `model.layers.0.mlp.experts.gate_up_proj`.
    #[module(skip)]
    pub parameter: Option<String>,
    /// Which of the model's loaded adapters this is ([`with_lora_slot`]).
    #[module(skip)]
    pub slot: usize,
}

/// A LoRA adapter's factors as a [`WeightSource`] hands them over, in PEFT's layout.
#[derive(Debug)]
pub struct LoraWeights {
    /// `lora_A` `[r, in]`.
    pub a: TensorData,
    /// `lora_B` `[out, r]`.
    pub b: TensorData,
    /// `alpha / r`, or `alpha / √r` with rsLoRA.
    pub scale: f32,
    /// PEFT's `lora_dropout`, applied only while training.
    pub dropout: f64,
    /// Which of the model's loaded adapters these factors belong to ([`with_lora_slot`]).
    pub slot: usize,
}

impl LoraWeights {
    /// Fresh factors as PEFT initializes them: `lora_A` Kaiming-uniform (bound `1/√in`),
    /// `lora_B` zero, so the adapted layer starts equal to the base. `rng` draws `A`.
    pub fn init(
        rank: usize,
        in_features: usize,
        out_features: usize,
        scale: f32,
        dropout: f64,
        rng: &mut impl rand::Rng,
    ) -> Self {
        // torch's kaiming_uniform_(a=√5) on a [r, in] weight: gain √(2/6), bound gain·√(3/in).
        let bound = 1.0 / (in_features as f32).sqrt();
        let a: Vec<f32> = (0..rank * in_features)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        Self {
            a: TensorData::new(a, [rank, in_features]),
            b: TensorData::new(vec![0f32; out_features * rank], [out_features, rank]),
            scale,
            dropout,
            slot: 0,
        }
    }
}

impl LoraAdapter {
    /// Wraps PEFT-layout factors for a layer of `in_features` → `out_features`, checking
    /// their shapes.
    pub fn new(
        name: &str,
        weights: LoraWeights,
        in_features: usize,
        out_features: usize,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let rank = weights.a.shape().first().copied().unwrap_or(0);
        check_shape(
            &format!("{name}.lora_A.weight"),
            &weights.a,
            &[rank, in_features],
        )?;
        check_shape(
            &format!("{name}.lora_B.weight"),
            &weights.b,
            &[out_features, rank],
        )?;
        let param =
            |data: &TensorData| Param::from_tensor(Tensor::from_data(transpose_2d(data), device));
        Ok(Self {
            a: param(&weights.a),
            b: param(&weights.b),
            scale: weights.scale,
            path: name.to_string(),
            dropout: weights.dropout,
            experts: 1,
            parameter: None,
            slot: weights.slot,
        })
    }

    /// Wraps PEFT-layout factors adapting the parameter `parameter` (`[out, in]`, or
    /// `[experts, out, in]` stacked): `lora_A` `[r·experts, in]`, `lora_B` `[out, r·experts]`,
    /// stored under the module path `key_path` (PEFT nests the wrappers of several
    /// parameters of one module: the inner ones' keys gain `.base_layer`).
    pub fn for_parameter(
        key_path: &str,
        parameter: &str,
        weights: LoraWeights,
        [experts, out_features, in_features]: [usize; 3],
        device: &Device,
    ) -> Result<Self, ModelError> {
        if weights.dropout > 0.0 {
            return Err(ModelError::Weights {
                name: parameter.to_string(),
                reason: "LoRA on a parameter takes no dropout (as PEFT's ParamWrapper)".into(),
            });
        }
        let rows = weights.a.shape().first().copied().unwrap_or(0);
        if experts == 0 || rows % experts != 0 {
            return Err(ModelError::Weights {
                name: format!("{key_path}.lora_A.weight"),
                reason: format!("{rows} rows are not a rank times {experts} experts"),
            });
        }
        let mut adapter = Self::new(key_path, weights, in_features, out_features, device)?;
        adapter.experts = experts;
        adapter.parameter = Some(parameter.to_string());
        Ok(adapter)
    }

    /// The rank `r` (per expert).
    pub fn rank(&self) -> usize {
        self.a.val().dims()[1] / self.experts
    }

    /// Expert `expert`'s update of its rows `x` `[n, in]`: `scale · (x·A_e)·B_e`.
    pub fn expert_forward(&self, expert: usize, x: Tensor<2>) -> Tensor<2> {
        let rank = self.rank();
        let [_, out] = self.b.val().dims();
        let a = self.a.val().narrow(1, expert * rank, rank);
        let b = self
            .b
            .val()
            .reshape([rank, self.experts, out])
            .narrow(1, expert, 1)
            .reshape([rank, out]);
        x.matmul(a).matmul(b).mul_scalar(self.scale)
    }

    /// `scale · A_e·B_e` for every expert, `[experts, in, out]`: the update of a stacked
    /// `[E, in, out]` weight (or, with one expert, of a linear layer's `[in, out]`).
    pub fn stacked_delta(&self) -> Tensor<3> {
        let rank = self.rank();
        let [input, _] = self.a.val().dims();
        let [_, out] = self.b.val().dims();
        let a = self
            .a
            .val()
            .reshape([input, self.experts, rank])
            .swap_dims(0, 1);
        let b = self
            .b
            .val()
            .reshape([rank, self.experts, out])
            .swap_dims(0, 1);
        a.matmul(b).mul_scalar(self.scale)
    }

    /// The update `scale · (dropout(x)·A)·B` for the layer input `x`, for a quantized
    /// layer's fused kernel or [`LoraUpdate::apply`]; dropout only while [`lora_dropout`]
    /// is on (training), as PEFT drops only in training mode.
    pub fn update<const D: usize>(&self, x: &Tensor<D>) -> LoraUpdate<D> {
        let input =
            lora_dropout_mask(x.shape(), self.dropout, &x.device()).map(|mask| x.clone() * mask);
        LoraUpdate {
            input,
            a: self.a.val(),
            b: self.b.val(),
            scale: self.scale,
        }
    }
}

/// `path` as transformers 5 names the module (and so PEFT's keys and targets do): it loads
/// Mixtral's `block_sparse_moe` as `mlp`.
pub fn transformers_module_path(path: &str) -> String {
    path.replace(".block_sparse_moe", ".mlp")
}

/// The module path PEFT stores the adapter of `{module}.{parameter}` under, if `targeted`
/// says that parameter is adapted: each adapted parameter declared after it wraps it once
/// more, adding `.base_layer` (PEFT wraps a module's parameters in declaration order).
/// `module` is transformers' path ([`transformers_module_path`]).
pub fn peft_parameter_key_path(
    module: &str,
    parameter: &str,
    declared: &[&str],
    targeted: impl Fn(&str) -> bool,
) -> Option<String> {
    let path = |name: &str| format!("{module}.{name}");
    if !targeted(&path(parameter)) {
        return None;
    }
    let position = declared.iter().position(|&name| name == parameter)?;
    let outer = declared[position + 1..]
        .iter()
        .filter(|name| targeted(&path(name)))
        .count();
    Some(format!("{module}{}", ".base_layer".repeat(outer)))
}

thread_local! {
    /// The adapter slot this thread's forward passes apply: unset (slot 0, the adapter
    /// given at load), `Some(None)` (the base alone) or `Some(Some(slot))`.
    static ACTIVE_SLOT: std::cell::Cell<Option<Option<usize>>> =
        const { std::cell::Cell::new(None) };
}

/// Runs `f` with the adapter of `slot` applied by every forward pass this thread makes
/// (`None`: the base model alone), so one base serves several adapters, chosen per
/// request. Outside such a call slot 0 (the adapter given at load) applies.
pub fn with_lora_slot<R>(slot: Option<usize>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Option<usize>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            ACTIVE_SLOT.with(|active| active.set(self.0));
        }
    }
    let _restore = Restore(ACTIVE_SLOT.with(|active| active.replace(Some(slot))));
    f()
}

/// The adapter slot forward passes on this thread apply now (`None`: the base alone).
pub fn active_lora_slot() -> Option<usize> {
    ACTIVE_SLOT.with(|active| active.get()).unwrap_or(Some(0))
}

/// The adapter among `adapters` that applies on this thread now, if any.
pub fn active_lora(adapters: &[LoraAdapter]) -> Option<&LoraAdapter> {
    let slot = active_lora_slot()?;
    adapters.iter().find(|adapter| adapter.slot == slot)
}

thread_local! {
    /// This thread's LoRA dropout: its seed and the generator of the current layer.
    static DROPOUT: std::cell::RefCell<Option<(u64, rand::rngs::StdRng)>> =
        const { std::cell::RefCell::new(None) };
}

/// Turns LoRA dropout on for this thread with `seed` (training), or off with `None`.
/// Masks are drawn from a generator reseeded at each decoder layer from the seed and the
/// layer's index ([`lora_dropout_layer`]), so recomputing a layer (gradient checkpointing)
/// or resuming a run draws the same masks.
pub fn lora_dropout(seed: Option<u64>) {
    use rand::SeedableRng;
    DROPOUT.with(|d| {
        *d.borrow_mut() = seed.map(|s| (s, rand::rngs::StdRng::seed_from_u64(s)));
    });
}

/// Reseeds this thread's LoRA dropout (if on) for decoder layer `layer`.
pub fn lora_dropout_layer(layer: usize) {
    use rand::SeedableRng;
    DROPOUT.with(|d| {
        if let Some((seed, rng)) = d.borrow_mut().as_mut() {
            let layer_seed =
                seed.wrapping_add((layer as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            *rng = rand::rngs::StdRng::seed_from_u64(layer_seed);
        }
    });
}

/// An inverted-dropout mask (kept entries `1/(1−p)`) when dropout is on and `p > 0`.
fn lora_dropout_mask<const D: usize>(
    shape: burn::tensor::Shape,
    p: f64,
    device: &Device,
) -> Option<Tensor<D>> {
    use rand::Rng;
    if p <= 0.0 {
        return None;
    }
    DROPOUT.with(|d| {
        let mut state = d.borrow_mut();
        let (_, rng) = state.as_mut()?;
        let kept = (1.0 / (1.0 - p)) as f32;
        let values: Vec<f32> = (0..shape.num_elements())
            .map(|_| if rng.random_bool(1.0 - p) { kept } else { 0.0 })
            .collect();
        Some(Tensor::from_data(TensorData::new(values, shape), device))
    })
}

impl Linear {
    /// Loads `{prefix}.weight` (HF layout `[out, in]`, f32 or quantized as the source
    /// gives it) and, if `bias`, `{prefix}.bias`.
    pub fn load(
        source: &dyn WeightSource,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let weight =
            source.linear_weight(&format!("{prefix}.weight"), out_features, in_features)?;
        let bias = if bias {
            let b = load_checked(source, &format!("{prefix}.bias"), [out_features], device)?;
            Some(Param::from_tensor(b))
        } else {
            None
        };
        let mut linear = Self::from_weight(weight, bias, device);
        for lora in source.lora(prefix, in_features, out_features)? {
            let adapter = LoraAdapter::new(prefix, lora, in_features, out_features, device)?;
            linear.lora.push(adapter);
        }
        Ok(linear)
    }

    /// Wraps a weight as a source handed it over.
    pub fn from_weight(
        weight: LinearWeight,
        bias: Option<Param<Tensor<1>>>,
        device: &Device,
    ) -> Self {
        match weight {
            LinearWeight::Dense(data) => Self::from_hf_weight(&data, bias, device),
            LinearWeight::Quantized(matrix) => Self {
                weight: None,
                quantized: Some(QuantLinear::new(matrix, device)),
                bias,
                lora: Vec::new(),
            },
        }
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
            weight: Some(Param::from_tensor(weight)),
            quantized: None,
            bias,
            lora: Vec::new(),
        }
    }

    /// Folds the adapters into an f32 weight (`W + s·A·B`) and drops them; a quantized
    /// weight with an adapter is refused.
    pub fn merge_lora(&mut self) -> Result<(), ModelError> {
        for lora in std::mem::take(&mut self.lora) {
            let Some(weight) = &mut self.weight else {
                return Err(unmergeable(&lora));
            };
            let [input, out] = weight.val().dims();
            let delta = lora.stacked_delta().reshape([input, out]);
            *weight = Param::from_tensor(weight.val() + delta);
        }
        Ok(())
    }

    /// `W` `[in, out]` as f32 on `device` when the layer is that product alone (no bias, no
    /// active adapter): the weights, or quantized ones decoded from their host copy (CPU
    /// layers only, as a transposed view of the decoded `[out, in]`).
    pub fn plain_weight(&self, device: &Device) -> Option<Tensor<2>> {
        if self.bias.is_some() || active_lora(&self.lora).is_some() {
            return None;
        }
        match (&self.weight, &self.quantized) {
            (Some(weight), _) => Some(weight.val()),
            (None, Some(quantized)) => Some(quantized.host_dequantized(device)?.transpose()),
            (None, None) => None,
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let bias = self.bias.as_ref().map(|b| b.val());
        let lora = active_lora(&self.lora).map(|adapter| adapter.update(&x));
        match (&self.weight, &self.quantized) {
            (Some(weight), _) => {
                let y = match fused_rows(&x, &weight.val(), lora.clone()) {
                    Some(y) => y,
                    None => {
                        let y = burn::tensor::module::linear(x.clone(), weight.val(), None);
                        match lora {
                            Some(update) => y + update.apply(x),
                            None => y,
                        }
                    }
                };
                match bias {
                    Some(b) => y + b.unsqueeze(),
                    None => y,
                }
            }
            // The quantized kernels take the adapter's update into the same pass.
            (None, Some(quantized)) => {
                let y = quantized.forward_with_lora(x, lora);
                match bias {
                    Some(b) => y + b.unsqueeze(),
                    None => y,
                }
            }
            (None, None) => unreachable!("a linear layer has a dense or a quantized weight"),
        }
    }
}

/// `x·weight` plus the LoRA update, if any, through `moera_kernels`' fused kernels on
/// `x`'s rows as one matrix; `None` where they do not run. Without an adapter only while
/// training (burn's product serves inference).
fn fused_rows<const D: usize>(
    x: &Tensor<D>,
    weight: &Tensor<2>,
    lora: Option<LoraUpdate<D>>,
) -> Option<Tensor<D>> {
    if lora.is_none() && !x.is_autodiff() {
        return None;
    }
    let dims = x.dims();
    let tokens = dims[..D - 1].iter().product::<usize>();
    let rows = x.clone().reshape([tokens, dims[D - 1]]);
    let y = match lora {
        Some(update) => moera_kernels::fused_lora_linear(&rows, weight, &update.flatten(tokens)),
        None => moera_kernels::fused_linear(&rows, weight),
    }?;
    let mut out = dims;
    out[D - 1] = weight.dims()[1];
    Some(y.reshape(out))
}

/// The error for merging `lora` into quantized weights.
pub(crate) fn unmergeable(lora: &LoraAdapter) -> ModelError {
    ModelError::Weights {
        name: lora.parameter.clone().unwrap_or_else(|| lora.path.clone()),
        reason: "an adapter cannot be merged into quantized weights: load them unquantized \
                 or keep the adapter separate"
            .into(),
    }
}

/// Host-side transpose of an f32 matrix.
pub fn transpose_2d(data: &TensorData) -> TensorData {
    let (rows, cols) = (data.shape()[0], data.shape()[1]);
    let values = data.as_slice::<f32>().expect("weight sources yield f32");
    let mut out = vec![0f32; values.len()];
    transpose_into(values, cols, &mut out, rows);
    TensorData::new(out, [cols, rows])
}

/// Writes the transpose of the row-major matrix `block` (rows of `cols` values) into `out`,
/// whose rows are `stride` apart: element `(r, c)` lands at `out[c·stride + r]`. Used to
/// stack expert matrices side by side as `[in, out]`.
pub fn transpose_into(block: &[f32], cols: usize, out: &mut [f32], stride: usize) {
    for (r, row) in block.chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            out[c * stride + r] = v;
        }
    }
}

/// Rows of `cols` values, in blocks of `stride` rows: the `width` rows from `offset` in
/// each block are reordered from interleaved pairs `(r0, r1), (r2, r3), ...` to halves
/// `r0, r2, ..., r1, r3, ...` (row `2i + j` moves to `j·width/2 + i`). Rotary weights
/// stored for pairwise rotation (llama.cpp's Q/K, DeepSeek's rope dims) become the
/// rotate-half layout this way.
pub fn deinterleave_rows(
    values: &[f32],
    cols: usize,
    stride: usize,
    offset: usize,
    width: usize,
) -> Vec<f32> {
    let rows = values.len() / cols.max(1);
    gather_rows(
        values,
        cols,
        &deinterleave_order(rows, stride, offset, width),
    )
}

/// Rows of `cols` values reordered: output row `i` is input row `order[i]`.
pub fn gather_rows(values: &[f32], cols: usize, order: &[usize]) -> Vec<f32> {
    order
        .iter()
        .flat_map(|&from| &values[from * cols..(from + 1) * cols])
        .copied()
        .collect()
}

/// The row order [`deinterleave_rows`] applies: output row `i` is input row `order[i]`.
pub fn deinterleave_order(rows: usize, stride: usize, offset: usize, width: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rows).collect();
    let half = width / 2;
    for block in (0..rows / stride.max(1)).map(|b| b * stride + offset) {
        for i in 0..half {
            for j in 0..2 {
                order[block + j * half + i] = block + 2 * i + j;
            }
        }
    }
    order
}

/// The f32 values of weight data, or an error naming the tensor.
pub fn f32_values(data: TensorData, name: &str) -> Result<Vec<f32>, ModelError> {
    data.try_into_vec::<f32>().map_err(|e| ModelError::Weights {
        name: name.to_string(),
        reason: format!("{e:?}"),
    })
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
        moera_kernels::rms_norm(x, self.weight.val(), self.eps as f32)
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

impl RmsNorm {
    /// Number of weights (the normalized width).
    pub fn width(&self) -> usize {
        self.weight.val().dims()[0]
    }
}

/// The SwiGLU feed-forward block `down(silu(gate(x)) · up(x))`.
#[derive(Module, Debug)]
pub struct GatedMlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl GatedMlp {
    pub fn linears(&self) -> Vec<&Linear> {
        vec![&self.gate_proj, &self.up_proj, &self.down_proj]
    }

    /// Loads `{prefix}.{gate,up,down}_proj`.
    pub fn load(
        source: &dyn WeightSource,
        prefix: &str,
        hidden: usize,
        intermediate: usize,
        bias: bool,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let linear = |name: &str, inp: usize, out: usize| {
            Linear::load(source, &format!("{prefix}.{name}"), inp, out, bias, device)
        };
        Ok(Self {
            gate_proj: linear("gate_proj", hidden, intermediate)?,
            up_proj: linear("up_proj", hidden, intermediate)?,
            down_proj: linear("down_proj", intermediate, hidden)?,
        })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let gate = self.gate_proj.forward(x.clone());
        self.down_proj
            .forward(moera_kernels::swiglu(gate, self.up_proj.forward(x)))
    }
}
