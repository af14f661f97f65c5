//! LoRA adapters in PEFT's format: a PEFT-made adapter on tiny-llama gives PEFT's logits,
//! and adapters that do not fit the model are refused with a clear error.

use std::path::Path;

use burn::tensor::Tensor;
use moera::engine::{Device, Error, LoadOptions, Model};

use crate::common::*;

pub(crate) fn with_adapter(model: &str, adapter: &Path, device: &Device) -> Result<Model, Error> {
    let options = LoadOptions {
        adapter: Some(adapter.to_path_buf()),
        ..Default::default()
    };
    Model::load_with(fixtures().join(model), device, options, &mut |_| {})
}

fn refused(result: Result<Model, Error>) -> Error {
    match result {
        Ok(_) => panic!("the adapter was accepted"),
        Err(e) => e,
    }
}

/// PEFT's adapters: on tiny-llama's attention and MLP, and on tiny-mixtral's experts
/// (stacked `gate_up_proj`/`down_proj`) and router through PEFT's `target_parameters`.
const PEFT_ADAPTERS: [(&str, &str); 2] = [
    ("tiny-llama", "tiny-llama-lora"),
    ("tiny-mixtral", "tiny-mixtral-lora-experts"),
];

fn check_peft_logits(device: &Device) {
    for (base, adapter) in PEFT_ADAPTERS {
        let adapter = fixtures().join(adapter);
        let reference = reference(&adapter.join("reference.safetensors"));
        let prompt = ids(&reference["prompt_ids"].1);
        let model = with_adapter(base, &adapter, device).expect("load with adapter");
        let logits = model.logits(&prompt).expect("forward");
        let diff = max_abs_diff(&logits, &reference["logits"].1);
        assert!(
            diff < 1e-4,
            "{base}: logits with the adapter differ from PEFT's by {diff}"
        );
        // The adapter matters: without it the logits are the base model's.
        let base_model = load_on(&fixtures().join(base), device);
        let base_diff = max_abs_diff(&base_model.logits(&prompt).unwrap(), &reference["logits"].1);
        assert!(
            base_diff > 0.05,
            "{base}: the adapter changes nothing ({base_diff})"
        );
    }
}

#[test]
fn peft_adapter_gives_peft_logits() {
    check_peft_logits(&flex());
}

/// An adapter merged into the weights at load gives PEFT's logits too, with no separate
/// factors left.
#[test]
fn merged_adapter_gives_peft_logits() {
    use moera::models::CausalLm;
    for (base, adapter) in PEFT_ADAPTERS {
        let adapter = fixtures().join(adapter);
        let reference = reference(&adapter.join("reference.safetensors"));
        let prompt = ids(&reference["prompt_ids"].1);
        let options = LoadOptions {
            adapter: Some(adapter.clone()),
            merge_adapter: true,
            ..Default::default()
        };
        let model = Model::load_with(fixtures().join(base), &flex(), options, &mut |_| {})
            .expect("load merged");
        assert!(model.decoder().lora_adapters().is_empty());
        let diff = max_abs_diff(&model.logits(&prompt).unwrap(), &reference["logits"].1);
        assert!(
            diff < 1e-4,
            "{base}: merged adapter: logits differ from PEFT's by {diff}"
        );
        assert!(model.save_adapter(&scratch().path().join("a")).is_err());
    }

    let merge_nothing = LoadOptions {
        merge_adapter: true,
        ..Default::default()
    };
    let err = Model::load_with(
        fixtures().join("tiny-llama"),
        &flex(),
        merge_nothing,
        &mut |_| {},
    )
    .expect_err("nothing to merge");
    assert!(err.to_string().contains("needs an adapter"), "{err}");
}

/// Two PEFT adapters loaded by name beside one tiny-mixtral (one on attention, one on the
/// experts and routers), chosen per request: each gives its own PEFT logits, no choice
/// gives the base model's (transformers' reference), and two threads using different
/// adapters at once each get theirs. An unknown name is a typed error.
#[test]
fn named_adapters_are_chosen_per_request() {
    let names = ["attention", "experts"];
    let dirs = ["tiny-mixtral-lora", "tiny-mixtral-lora-experts"].map(|d| fixtures().join(d));
    let options = LoadOptions {
        named_adapters: names
            .iter()
            .zip(&dirs)
            .map(|(name, dir)| (name.to_string(), dir.clone()))
            .collect(),
        ..Default::default()
    };
    let model = Model::load_with(
        fixtures().join("tiny-mixtral"),
        &flex(),
        options,
        &mut |_| {},
    )
    .expect("load with named adapters");
    assert_eq!(model.adapter_names().collect::<Vec<_>>(), names);
    let base = reference(&fixtures().join("tiny-mixtral/reference.safetensors"));
    let prompt = ids(&base["prompt_ids"].1);
    let expected: Vec<Reference> = dirs
        .iter()
        .map(|dir| reference(&dir.join("reference.safetensors")))
        .collect();
    let logits = |name: Option<&str>| {
        model
            .with_adapter(name, |model| model.logits(&prompt))
            .expect("known adapter")
            .expect("forward")
    };
    for (name, reference) in names.iter().zip(&expected) {
        let diff = max_abs_diff(&logits(Some(name)), &reference["logits"].1);
        assert!(diff < 1e-4, "{name}: logits differ from PEFT's by {diff}");
    }
    let diff = max_abs_diff(&logits(None), &base["logits"].1);
    assert!(
        diff < 1e-4,
        "no adapter: logits differ from transformers' by {diff}"
    );
    // No load-time adapter: outside `with_adapter` the base model runs.
    let diff = max_abs_diff(&model.logits(&prompt).unwrap(), &base["logits"].1);
    assert!(
        diff < 1e-4,
        "default: logits differ from the base model's by {diff}"
    );

    std::thread::scope(|scope| {
        let runs: Vec<_> = names
            .iter()
            .zip(&expected)
            .map(|(name, reference)| {
                let logits = &logits;
                scope.spawn(move || {
                    for _ in 0..3 {
                        let diff = max_abs_diff(&logits(Some(name)), &reference["logits"].1);
                        assert!(diff < 1e-4, "{name} beside another adapter: off by {diff}");
                    }
                })
            })
            .collect();
        for run in runs {
            run.join().expect("thread");
        }
    });

    // Generation: the adapter named in the request, or chosen when the generation starts
    // (iterated later, or streamed from another thread), decodes every token with it: the
    // tokens of a model loaded with that adapter alone.
    use moera::engine::{GenerationRequest, SamplingParams};
    let alone = with_adapter("tiny-mixtral", &dirs[0], &flex()).expect("load one adapter");
    let expected_ids = greedy_ids(&alone, &prompt, 8);
    assert_ne!(
        greedy_ids(&model, &prompt, 8),
        expected_ids,
        "the adapter changes nothing"
    );
    let request = GenerationRequest::ids(prompt.clone())
        .max_tokens(8)
        .sampling(SamplingParams::greedy());
    let named = GenerationRequest {
        adapter: Some("attention".into()),
        ..request.clone()
    };
    assert_eq!(token_ids(model.generate(&named).unwrap()), expected_ids);
    let started = model
        .with_adapter(Some("attention"), |model| model.generate(&request))
        .unwrap()
        .unwrap();
    assert_eq!(
        token_ids(started),
        expected_ids,
        "chosen at start, decoded after"
    );
    let shared = std::sync::Arc::new(model);
    let stream = shared
        .with_adapter(Some("attention"), |_| {
            shared.generate_stream(request.clone())
        })
        .unwrap();
    let streamed: Vec<_> = futures::executor::block_on_stream(stream).collect();
    assert_eq!(token_ids(streamed.into_iter()), expected_ids, "streamed");
    let unknown = GenerationRequest {
        adapter: Some("nope".into()),
        ..request
    };
    assert!(matches!(
        shared.generate(&unknown).err(),
        Some(Error::UnknownAdapter { .. })
    ));
    let model = shared;

    let err = model
        .with_adapter(Some("nope"), |_| ())
        .expect_err("unknown adapter");
    assert!(
        matches!(err, Error::UnknownAdapter { ref name, .. } if name == "nope"),
        "{err}"
    );
    let merged = LoadOptions {
        adapter: Some(dirs[0].clone()),
        merge_adapter: true,
        named_adapters: vec![("experts".into(), dirs[1].clone())],
        ..Default::default()
    };
    let err = Model::load_with(
        fixtures().join("tiny-mixtral"),
        &flex(),
        merged,
        &mut |_| {},
    )
    .expect_err("merge with named adapters");
    assert!(err.to_string().contains("one adapter"), "{err}");
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
#[test]
fn peft_adapter_gives_peft_logits_on_wgpu() {
    let device = gpu();
    check_peft_logits(&device);
}

#[test]
fn adapters_that_do_not_fit_are_refused() {
    let adapter = fixtures().join("tiny-llama-lora");
    // Another base model: its MLP has experts, so the adapter's gate/down factors match
    // nothing.
    let err = refused(with_adapter("tiny-qwen2-moe", &adapter, &flex()));
    assert!(
        matches!(&err, Error::Adapter { reason, .. } if reason.contains("match no layer")),
        "{err}"
    );

    let dir = scratch();
    let copy = dir.path().join("adapter");
    std::fs::create_dir(&copy).unwrap();
    let config = std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap();
    let weights = adapter.join("adapter_model.safetensors");
    let write = |config: &str| {
        std::fs::write(copy.join("adapter_config.json"), config).unwrap();
        refused(with_adapter("tiny-llama", &copy, &flex()))
    };
    // No weights file.
    let err = write(&config);
    assert!(matches!(err, Error::Io { .. }), "{err}");
    std::fs::copy(&weights, copy.join("adapter_model.safetensors")).unwrap();
    for (from, to, expected) in [
        ("\"peft_type\": \"LORA\"", "\"peft_type\": \"IA3\"", "IA3"),
        ("\"use_dora\": false", "\"use_dora\": true", "DoRA"),
        ("\"r\": 4", "\"r\": 0", "rank"),
        (
            "\"rank_pattern\": {}",
            "\"rank_pattern\": {\"q_proj\": 2}",
            "rank_pattern",
        ),
        ("\"r\": 4", "\"r\": \"four\"", "invalid type"),
    ] {
        assert!(config.contains(from), "{from}");
        let err = write(&config.replace(from, to));
        assert!(
            matches!(&err, Error::Adapter { reason, .. } if reason.contains(expected)),
            "{from} → {to}: {err}"
        );
    }
    // Factors of the wrong rank for their layer: a shape error naming the tensor.
    let bad = safetensors::serialize(
        [
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    vec![4, 63],
                    &[0u8; 4 * 4 * 63],
                )
                .unwrap(),
            ),
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    vec![64, 4],
                    &[0u8; 4 * 64 * 4],
                )
                .unwrap(),
            ),
        ],
        None,
    )
    .unwrap();
    std::fs::write(copy.join("adapter_model.safetensors"), bad).unwrap();
    let err = write(&config);
    assert!(err.to_string().contains("lora_A"), "{err}");

    // GPT-OSS interleaves gate and up columns: LoRA on its experts is refused, not wrong.
    let spec = moera::engine::adapter::LoraSpec::new(4, 8.0)
        .target_parameters(["mlp.experts.gate_up_proj"]);
    let options = LoadOptions {
        new_adapter: Some(spec),
        ..Default::default()
    };
    let err = refused(Model::load_with(
        fixtures().join("tiny-gpt-oss"),
        &flex(),
        options,
        &mut |_| {},
    ));
    assert!(err.to_string().contains("interleaved"), "{err}");
}

/// The fixture's training batch: token ids and labels (−100: not scored), `[2][10]`.
pub(crate) fn training_batch(reference: &Reference) -> (Vec<Vec<u32>>, Vec<Vec<i64>>) {
    let (shape, batch) = &reference["batch_ids"];
    let labels = reference["batch_labels"]
        .1
        .chunks(shape[1])
        .map(|row| row.iter().map(|&l| l as i64).collect())
        .collect();
    (batch.chunks(shape[1]).map(ids).collect(), labels)
}

/// One training step's loss and LoRA gradients against PEFT + PyTorch's for the same
/// adapter and batch (2 × 10 tokens, the first 4 of each not scored), on flex with autodiff:
/// tiny-llama (attention and MLP adapted), tiny-mixtral with attention adapted (the
/// gradients pass back through the experts and the routing weights), and tiny-mixtral with
/// its experts' stacked weights and its router adapted (PEFT's `target_parameters`).
#[test]
fn lora_loss_and_gradients_match_peft() {
    check_loss_and_gradients(&Device::flex().autodiff());
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
#[test]
fn lora_loss_and_gradients_match_peft_on_wgpu() {
    check_loss_and_gradients(&gpu().autodiff());
}

fn check_loss_and_gradients(device: &Device) {
    for (base, adapter, adapted_layers) in [
        ("tiny-llama", "tiny-llama-lora", 2 * 5),
        ("tiny-mixtral", "tiny-mixtral-lora", 2 * 4),
        // q_proj, the router and both stacked expert weights of each layer.
        ("tiny-mixtral", "tiny-mixtral-lora-experts", 2 * 4),
    ] {
        let adapter = fixtures().join(adapter);
        let reference = reference(&adapter.join("reference.safetensors"));
        let model = with_adapter(base, &adapter, device).expect("load with adapter");
        let (loss, grads) = loss_and_lora_gradients(&model, &reference);
        let expected = reference["loss"].1[0];
        assert!(
            (loss as f64 - expected).abs() < 1e-5,
            "{base}: loss {loss}, PEFT {expected}"
        );
        assert_eq!(
            grads.len(),
            2 * adapted_layers,
            "{adapter:?}: adapted layers"
        );
        for (key, grad) in grads {
            let (shape, expected) = &reference[&key];
            assert_eq!(grad.dims().to_vec(), *shape, "{key}");
            let scale = expected.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(&values(grad), expected);
            assert!(
                diff / scale < 1e-4,
                "{base} {key}: gradient differs by {diff} (scale {scale})"
            );
        }
    }
}

/// The loss on the fixture's batch and each LoRA factor's gradient, keyed and shaped as
/// PEFT's (`grad.base_model.model.{path}.lora_A.weight`, `[r, in]` / `[out, r]`).
fn loss_and_lora_gradients(
    model: &Model,
    reference: &Reference,
) -> (f32, Vec<(String, Tensor<2>)>) {
    let (ids, labels) = training_batch(reference);
    let loss = model.loss(&ids, &labels).expect("loss");
    let value = values(loss.clone().reshape([1, 1]))[0];
    let grads = loss.backward();
    let mut out = Vec::new();
    for adapter in model.causal_lm().lora_adapters() {
        for (factor, param) in [("lora_A", &adapter.a), ("lora_B", &adapter.b)] {
            let key = format!("grad.base_model.model.{}.{factor}.weight", adapter.path);
            // moera holds the factors transposed (`[in, r]`, `[r, out]`).
            let grad = param.val().grad(&grads).expect("a gradient").transpose();
            out.push((key, grad));
        }
    }
    (value, out)
}

fn values(tensor: Tensor<2>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap()
}

/// QLoRA on wgpu: over an int8 or int4 base the fused dequant-matmul kernels (the adapter's
/// update in their epilogue, forward and backward) give the loss and LoRA gradients of the
/// CPU path (weights dequantized on the host, burn's autodiff) for the same quantized model.
/// The loss stays near PEFT's over the f32 base.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
#[test]
fn lora_over_a_quantized_base_matches_on_wgpu_and_flex() {
    use moera::engine::Quantization;

    let adapter = fixtures().join("tiny-llama-lora");
    let reference = reference(&adapter.join("reference.safetensors"));
    // How far quantizing the tiny model's random weights may move the loss from PEFT's.
    for (quantization, loss_tolerance) in [(Quantization::Int8, 0.05), (Quantization::Int4, 0.2)] {
        let load = |device: &Device| {
            let options = LoadOptions {
                quantization,
                adapter: Some(adapter.clone()),
                ..Default::default()
            };
            let model =
                Model::load_with(fixtures().join("tiny-llama"), device, options, &mut |_| {});
            model.expect("load quantized with adapter")
        };
        let (cpu_loss, cpu_grads) = loss_and_lora_gradients(&load(&flex().autodiff()), &reference);
        let (gpu_loss, gpu_grads) = loss_and_lora_gradients(&load(&gpu().autodiff()), &reference);
        let peft = reference["loss"].1[0];
        assert!(
            (cpu_loss as f64 - peft).abs() < loss_tolerance,
            "{quantization:?}: loss {cpu_loss} far from PEFT's {peft} over f32"
        );
        assert!(
            (gpu_loss - cpu_loss).abs() < 1e-5,
            "{quantization:?}: loss {gpu_loss} on wgpu, {cpu_loss} on flex"
        );
        assert_eq!(gpu_grads.len(), 20);
        for ((key, gpu), (_, cpu)) in gpu_grads.into_iter().zip(cpu_grads) {
            let cpu = values(cpu);
            let scale = cpu.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(
                &values(gpu),
                &cpu.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            );
            assert!(
                diff / (scale as f64) < 1e-4,
                "{quantization:?} {key}: wgpu and flex differ by {diff} (scale {scale})"
            );
        }
    }
}

#[test]
fn loss_rejects_malformed_batches() {
    let model = load_on(&fixtures().join("tiny-llama"), &flex());
    let ids = vec![vec![1, 2, 3], vec![4, 5, 6]];
    let labels = vec![vec![1, 2, 3], vec![4, 5, 6]];
    assert!(model.loss(&ids, &labels).is_ok());
    type Case = (Vec<Vec<u32>>, Vec<Vec<i64>>, &'static str);
    let cases: [Case; 7] = [
        (
            vec![vec![1, 2, 3], vec![4, 5]],
            labels.clone(),
            "one length",
        ),
        (ids.clone(), vec![vec![1, 2, 3]], "label rows"),
        (
            ids.clone(),
            vec![vec![1, 2, 3], vec![4, 5]],
            "labels for a sequence",
        ),
        (
            ids.clone(),
            vec![vec![-100; 3], vec![-100; 3]],
            "no label is scored",
        ),
        (
            ids.clone(),
            vec![vec![1, 2, 9999], vec![4, 5, 6]],
            "outside the vocabulary",
        ),
        (
            ids.clone(),
            vec![vec![1, 2, -5], vec![4, 5, 6]],
            "labels are token ids",
        ),
        (vec![vec![1], vec![2]], vec![vec![1], vec![2]], "≥ 2"),
    ];
    for (ids, labels, expected) in cases {
        let err = model.loss(&ids, &labels).expect_err(expected);
        assert!(err.to_string().contains(expected), "{expected}: {err}");
    }
}

/// Plain gradient descent on the LoRA factors with moera's gradients, one step.
struct AdapterStep {
    grads: std::collections::HashMap<burn::module::ParamId, burn::tensor::TensorData>,
    learning_rate: f32,
}

impl burn::module::ModuleMapper for AdapterStep {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<burn::tensor::Tensor<D>>,
    ) -> burn::module::Param<burn::tensor::Tensor<D>> {
        let Some(grad) = self.grads.get(&param.id).cloned() else {
            return param;
        };
        let rate = self.learning_rate;
        param.map(|value| {
            let grad = burn::tensor::Tensor::<D>::from_data(grad, &value.device());
            (value - grad.mul_scalar(rate)).detach()
        })
    }
}

/// An adapter changed by a step on moera's own gradients, saved in PEFT's format: the same
/// keys and shapes as PEFT's file, moera reloads it with the same logits, and PEFT itself
/// gives moera's logits (`scripts/check_peft_adapter.py`; run when Python has torch,
/// transformers and peft, required with `MOERA_REQUIRE_PEFT=1`).
#[test]
fn trained_adapter_saves_in_peft_format() {
    for (base, adapter) in PEFT_ADAPTERS {
        check_trained_adapter(base, &fixtures().join(adapter));
    }
}

fn check_trained_adapter(base: &str, adapter: &Path) {
    use burn::module::Module;
    use moera::models::CausalLm;

    let reference = reference(&adapter.join("reference.safetensors"));
    let model = with_adapter(base, adapter, &Device::flex().autodiff()).expect("load");
    let (batch_ids, labels) = training_batch(&reference);
    let before = model.loss(&batch_ids, &labels).expect("loss");
    let grads = before.backward();
    let mut step = AdapterStep {
        grads: Default::default(),
        learning_rate: 0.5,
    };
    for adapter in model.decoder().lora_adapters() {
        for param in [&adapter.a, &adapter.b] {
            let grad = param.val().grad(&grads).expect("gradient");
            step.grads.insert(param.id, grad.into_data());
        }
    }
    let model = model.map_decoder(|decoder| decoder.map(&mut step));
    let prompt = ids(&reference["prompt_ids"].1);
    let trained = model.logits(&prompt).expect("forward");
    let untrained = max_abs_diff(&trained, &reference["logits"].1);
    assert!(untrained > 1e-3, "the step changed nothing ({untrained})");

    let dir = scratch();
    let saved = dir.path().join("adapter");
    model.save_adapter(&saved).expect("save");
    let keys = |path: &Path| -> Vec<(String, Vec<usize>)> {
        let bytes = std::fs::read(path).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut keys: Vec<_> = file
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, view.shape().to_vec()))
            .collect();
        keys.sort();
        keys
    };
    assert_eq!(
        keys(&saved.join("adapter_model.safetensors")),
        keys(&adapter.join("adapter_model.safetensors")),
        "keys and shapes as PEFT writes them"
    );
    let reloaded = with_adapter(base, &saved, &flex()).expect("reload");
    let diff = max_abs_diff(
        &reloaded.logits(&prompt).unwrap(),
        &trained.iter().map(|&v| v as f64).collect::<Vec<_>>(),
    );
    assert!(diff < 1e-5, "reloaded adapter: logits differ by {diff}");

    // PEFT loads the adapter moera wrote and gives moera's logits.
    let logits_path = dir.path().join("moera_logits.safetensors");
    let prompt_bytes: Vec<u8> = prompt
        .iter()
        .flat_map(|&i| (i as i64).to_le_bytes())
        .collect();
    let logit_bytes: Vec<u8> = trained.iter().flat_map(|v| v.to_le_bytes()).collect();
    let vocab = trained.len() / prompt.len();
    let tensors = [
        (
            "prompt_ids",
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::I64,
                vec![prompt.len()],
                &prompt_bytes,
            )
            .unwrap(),
        ),
        (
            "logits",
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![prompt.len(), vocab],
                &logit_bytes,
            )
            .unwrap(),
        ),
    ];
    std::fs::write(&logits_path, safetensors::serialize(tensors, None).unwrap()).unwrap();
    let has_peft = std::process::Command::new("python3")
        .args(["-c", "import torch, transformers, peft"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_peft {
        assert!(
            std::env::var("MOERA_REQUIRE_PEFT").is_err(),
            "MOERA_REQUIRE_PEFT is set but python3 cannot import torch, transformers and peft"
        );
        eprintln!("note: PEFT check skipped (python3 lacks torch/transformers/peft)");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_peft_adapter.py");
    let output = std::process::Command::new("python3")
        .arg(script)
        .arg(fixtures().join(base))
        .arg(&saved)
        .arg(&logits_path)
        .output()
        .expect("run python3");
    assert!(
        output.status.success(),
        "PEFT check failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Trains only the parameters in `ids`: every other parameter stops requiring gradients.
struct TrainOnly(std::collections::HashSet<burn::module::ParamId>);

impl burn::module::ModuleMapper for TrainOnly {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<burn::tensor::Tensor<D>>,
    ) -> burn::module::Param<burn::tensor::Tensor<D>> {
        let train = self.0.contains(&param.id);
        param.set_require_grad(train)
    }
}

/// burn's AdamW on moera's LoRA gradients, with the base frozen, gives the factors
/// PyTorch's AdamW gives after one step (lr 0.01, eps 1e-8, decoupled weight decay 0.1).
#[test]
fn adamw_step_on_the_adapter_matches_pytorch() {
    use burn::module::Module;
    use burn::optim::{AdamWConfig, GradientsParams};
    use moera::models::CausalLm;

    let adapter = fixtures().join("tiny-llama-lora");
    let reference = reference(&adapter.join("reference.safetensors"));
    let model = with_adapter("tiny-llama", &adapter, &Device::flex().autodiff()).expect("load");
    let lora_ids = model
        .decoder()
        .lora_adapters()
        .iter()
        .flat_map(|a| [a.a.id, a.b.id])
        .collect();
    let model = model.map_decoder(|decoder| decoder.map(&mut TrainOnly(lora_ids)));
    let (ids, labels) = training_batch(&reference);
    let grads = model.loss(&ids, &labels).expect("loss").backward();
    let grads = GradientsParams::from_grads(grads, model.decoder());
    assert_eq!(grads.len(), 20, "only the LoRA factors get gradients");
    let mut optimizer = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.1)
        .init();
    let model = model.map_decoder(|decoder| optimizer.step(0.01, decoder, grads));
    for adapter in model.decoder().lora_adapters() {
        for (factor, param) in [("lora_A", &adapter.a), ("lora_B", &adapter.b)] {
            let key = format!("adamw.base_model.model.{}.{factor}.weight", adapter.path);
            let value = param.val().transpose().into_data().convert::<f32>();
            let diff = max_abs_diff(&value.try_to_vec::<f32>().unwrap(), &reference[&key].1);
            assert!(diff < 1e-5, "{key}: differs from PyTorch's AdamW by {diff}");
        }
    }
}
