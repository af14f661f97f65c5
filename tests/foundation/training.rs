//! The trainer: per-layer gradient checkpointing gives the gradients PEFT gives, training
//! lowers the loss, an interrupted run resumes to the uninterrupted run's weights, and bad
//! settings are refused.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams};
use burn::tensor::Tensor;
use moera::engine::adapter::LoraSpec;
use moera::engine::dataset::{Batch, Dataset, TokenizedExample};
use moera::engine::train::{
    Checkpointing, Schedule, Trainer, TrainingConfig, TrainingEvent, TrainingStrategy,
};
use moera::engine::{Device, LoadOptions, Model};
use moera::models::{CausalLm, Decoder};

use crate::common::*;
use crate::lora::{training_batch, with_adapter};

/// The reference batch of the LoRA fixture (2 × 10 tokens, 4 prompt tokens each).
fn reference_batch() -> (Batch, Reference) {
    let reference = reference(&fixtures().join("tiny-llama-lora/reference.safetensors"));
    let (ids, labels) = training_batch(&reference);
    (Batch { ids, labels }, reference)
}

/// Every parameter's gradient (or, without gradients, its value) by module path.
struct ByPath<'a> {
    grads: Option<&'a GradientsParams>,
    path: Vec<String>,
    found: BTreeMap<String, Vec<f32>>,
}

impl ModuleVisitor for ByPath<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let tensor = match self.grads {
            Some(grads) => grads.get::<D>(param.id),
            None => Some(param.val()),
        };
        if let Some(tensor) = tensor {
            let values = tensor.into_data().convert::<f32>().try_to_vec().unwrap();
            self.found.insert(self.path.join("."), values);
        }
    }
}

fn by_path(decoder: &Decoder, grads: Option<&GradientsParams>) -> BTreeMap<String, Vec<f32>> {
    let mut visitor = ByPath {
        grads,
        path: Vec::new(),
        found: BTreeMap::new(),
    };
    decoder.visit(&mut visitor);
    visitor.found
}

fn grads_by_path(trainer: &Trainer, batch: &Batch) -> (f32, BTreeMap<String, Vec<f32>>) {
    let (loss, grads) = trainer.loss_and_gradients(batch).expect("gradients");
    (loss, by_path(trainer.model().decoder(), Some(&grads)))
}

fn config(strategy: TrainingStrategy, checkpointing: Checkpointing) -> TrainingConfig {
    TrainingConfig {
        strategy,
        checkpointing,
        ..TrainingConfig::default()
    }
}

/// Per-layer checkpointing recomputes each layer in backward: the loss and every gradient
/// equal those of the plain backward (and so does burn's op-level checkpointing), for full training (every weight, the embedding
/// included) and for the PEFT fixture's adapter, whose gradients also match PEFT's.
#[test]
fn layer_checkpointing_gives_the_same_loss_and_gradients() {
    let (batch, reference) = reference_batch();
    for name in ["tiny-llama", "tiny-mixtral"] {
        let tiny = fixtures().join(name);
        let full = |checkpointing| {
            let config = config(TrainingStrategy::Full, checkpointing);
            let trainer = Trainer::new(&tiny, &flex(), config).expect("trainer");
            grads_by_path(&trainer, &batch)
        };
        let (plain_loss, plain) = full(Checkpointing::Off);
        assert!(plain.len() > 20 && plain.contains_key("embed_tokens.weight"));
        // Per-layer recomputation, and burn's op-level strategy (inside backward).
        for strategy in [Checkpointing::Layers, Checkpointing::Balanced] {
            let (loss, grads) = full(strategy);
            assert!(
                (plain_loss - loss).abs() < 1e-6,
                "{strategy:?}: {plain_loss} vs {loss}"
            );
            assert_eq!(
                plain.keys().collect::<Vec<_>>(),
                grads.keys().collect::<Vec<_>>()
            );
            for (param, grad) in &plain {
                let other: Vec<f64> = grads[param].iter().map(|&v| v as f64).collect();
                let scale = grad.iter().fold(1e-6f32, |m, v| m.max(v.abs())) as f64;
                let diff = max_abs_diff(grad, &other);
                assert!(
                    diff / scale < 1e-5,
                    "{name} {param} {strategy:?}: differs by {diff} (scale {scale})"
                );
            }
        }
    }

    // PEFT's adapter, checkpointed: PEFT's loss and gradients.
    let adapter = fixtures().join("tiny-llama-lora");
    let model = with_adapter("tiny-llama", &adapter, &Device::flex().autodiff()).unwrap();
    let lora = TrainingStrategy::Lora(LoraSpec::new(4, 8.0));
    let trainer = Trainer::from_model(model, config(lora, Checkpointing::Layers)).unwrap();
    let (loss, grads) = trainer.loss_and_gradients(&batch).unwrap();
    assert!(
        (loss as f64 - reference["loss"].1[0]).abs() < 1e-5,
        "loss {loss}"
    );
    for adapter in trainer.model().decoder().lora_adapters() {
        for (factor, param) in [("lora_A", &adapter.a), ("lora_B", &adapter.b)] {
            let key = format!("grad.base_model.model.{}.{factor}.weight", adapter.path);
            let grad = grads.get::<2>(param.id).expect("gradient").transpose();
            let grad: Vec<f32> = grad.into_data().convert::<f32>().try_to_vec().unwrap();
            let expected = &reference[&key].1;
            let scale = expected.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(&grad, expected);
            assert!(diff / scale < 1e-4, "{key}: differs from PEFT by {diff}");
        }
    }
}

/// A small memorization task on tiny-llama: the reference batch's examples.
fn tiny_dataset() -> Dataset {
    let (batch, _) = reference_batch();
    let examples: Vec<TokenizedExample> = batch
        .ids
        .iter()
        .zip(&batch.labels)
        .map(|(ids, labels)| TokenizedExample {
            ids: ids.clone(),
            labels: labels.clone(),
        })
        .collect();
    Dataset {
        train: [examples.clone(), examples.clone()].concat(),
        validation: examples,
        skipped_lines: 0,
        truncated: 0,
        unscored: 0,
    }
}

fn lora_config() -> TrainingConfig {
    TrainingConfig {
        strategy: TrainingStrategy::Lora(LoraSpec {
            dropout: 0.1,
            seed: 7,
            ..LoraSpec::new(4, 8.0).targets(["all-linear"])
        }),
        learning_rate: 2e-2,
        epochs: 4,
        batch_size: 1,
        gradient_accumulation: 2,
        warmup_steps: 1,
        schedule: Schedule::Cosine,
        weight_decay: 0.01,
        max_grad_norm: Some(1.0),
        eval_every: Some(2),
        ..TrainingConfig::default()
    }
}

/// A fresh adapter starts as the base model (PEFT's zero `B`); LoRA training on a tiny
/// task lowers the training and validation loss, and the bus reports every step.
#[test]
fn lora_training_lowers_the_loss() {
    let tiny = fixtures().join("tiny-llama");
    let data = tiny_dataset();
    let mut trainer = Trainer::new(&tiny, &flex(), lora_config()).expect("trainer");
    let base = load_on(&tiny, &flex());
    let prompt = &data.validation[0].ids;
    let diff = max_abs_diff(
        &trainer.model().logits(prompt).unwrap(),
        &base
            .logits(prompt)
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .collect::<Vec<_>>(),
    );
    assert!(diff < 1e-5, "a fresh adapter changes the logits by {diff}");
    let adapters = trainer.model().decoder().lora_adapters().len();
    assert_eq!(adapters, 2 * 7, "all-linear adapts 7 linears per layer");
    let before = trainer.evaluate(&data.validation).unwrap();
    let events = trainer.events().subscribe();
    let summary = trainer.train(&data).expect("train");
    assert_eq!(summary.steps, 8);
    let after = trainer.evaluate(&data.validation).unwrap();
    assert!(after < 0.7 * before, "validation loss {before} → {after}");
    let events: Vec<TrainingEvent> = events.try_iter().collect();
    let steps = events
        .iter()
        .filter(|e| matches!(e, TrainingEvent::Step { .. }))
        .count();
    let evals = events
        .iter()
        .filter(|e| matches!(e, TrainingEvent::Eval { .. }))
        .count();
    assert_eq!((steps, evals), (8, 4), "{events:?}");
    assert!(matches!(
        events.first(),
        Some(TrainingEvent::Started { total_steps: 8, .. })
    ));
    assert!(matches!(
        events.last(),
        Some(TrainingEvent::Finished { steps: 8, .. })
    ));
}

/// LoRA on an MoE model's experts (their stacked weights) and routers, as PEFT's
/// `target_parameters`: a fresh adapter is the base model, training lowers the loss and
/// moves every factor, and the saved adapter reloads with the trained model's logits.
#[test]
fn lora_on_experts_and_routers_trains_and_reloads() {
    let tiny = fixtures().join("tiny-mixtral");
    let data = tiny_dataset();
    let spec = LoraSpec {
        seed: 3,
        ..LoraSpec::new(4, 8.0)
            .targets(["q_proj"])
            .target_parameters([
                "mlp.experts.gate_up_proj",
                "mlp.experts.down_proj",
                "mlp.gate.weight",
            ])
    };
    let config = TrainingConfig {
        strategy: TrainingStrategy::Lora(spec.clone()),
        ..lora_config()
    };
    let mut trainer = Trainer::new(&tiny, &flex(), config).expect("trainer");
    let prompt = &data.validation[0].ids;
    let base = load_on(&tiny, &flex()).logits(prompt).unwrap();
    let as_f64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let diff = max_abs_diff(&trainer.model().logits(prompt).unwrap(), &as_f64(&base));
    assert!(diff < 1e-5, "a fresh adapter changes the logits by {diff}");
    let parameters = trainer
        .model()
        .decoder()
        .lora_adapters()
        .iter()
        .filter(|a| a.parameter.is_some())
        .count();
    assert_eq!(parameters, 2 * 3, "router, gate_up and down of both layers");
    let before = trainer.evaluate(&data.validation).unwrap();
    trainer.train(&data).expect("train");
    let after = trainer.evaluate(&data.validation).unwrap();
    assert!(after < 0.8 * before, "validation loss {before} → {after}");
    for adapter in trainer.model().decoder().lora_adapters() {
        let b = adapter.b.val().abs().max().into_scalar::<f32>();
        assert!(b > 0.0, "{}: lora_B never moved", adapter.path);
    }
    let dir = scratch();
    trainer.model().save_adapter(dir.path()).expect("save");
    let reloaded = Model::load_with(
        &tiny,
        &flex(),
        LoadOptions {
            adapter: Some(dir.path().to_path_buf()),
            ..Default::default()
        },
        &mut |_| {},
    )
    .expect("reload");
    let trained = trainer.model().logits(prompt).unwrap();
    let diff = max_abs_diff(&reloaded.logits(prompt).unwrap(), &as_f64(&trained));
    assert!(diff < 1e-5, "reloaded adapter: logits differ by {diff}");
    let refused = Trainer::new(
        &tiny,
        &flex(),
        TrainingConfig {
            strategy: TrainingStrategy::Lora(LoraSpec {
                dropout: 0.1,
                ..spec
            }),
            ..lora_config()
        },
    );
    let msg = refused.err().expect("dropout on parameters").to_string();
    assert!(msg.contains("no dropout"), "{msg}");
}

fn lora_factors(trainer: &Trainer) -> Vec<f32> {
    trainer
        .model()
        .decoder()
        .lora_adapters()
        .iter()
        .flat_map(|a| [a.a.val(), a.b.val()])
        .flat_map(|t| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap())
        .collect()
}

/// Train 3 steps, checkpoint, resume in a new trainer and finish: the weights equal an
/// uninterrupted run's (same data order, dropout masks, optimizer moments and schedule).
#[test]
fn an_interrupted_run_resumes_where_it_stopped() {
    let tiny = fixtures().join("tiny-llama");
    let data = tiny_dataset();
    let mut straight = Trainer::new(&tiny, &flex(), lora_config()).unwrap();
    straight.train(&data).unwrap();

    let dir = scratch();
    let mut first = Trainer::new(&tiny, &flex(), lora_config()).unwrap();
    first.train_for(&data, 3).unwrap();
    assert_eq!(first.state().step, 3);
    let checkpoint = dir.path().join("checkpoint-3");
    // A torn earlier save of the same name is replaced; saving twice keeps one folder.
    std::fs::create_dir_all(dir.path().join("checkpoint-3.partial/junk")).unwrap();
    first.save_checkpoint(&checkpoint).unwrap();
    first.save_checkpoint(&checkpoint).unwrap();
    assert!(!dir.path().join("checkpoint-3.partial").exists());
    assert!(
        checkpoint
            .join("adapter/adapter_model.safetensors")
            .exists()
    );
    drop(first);
    let mut resumed = Trainer::resume(&tiny, &checkpoint, &flex(), lora_config()).unwrap();
    assert_eq!(resumed.state().step, 3);
    resumed.train(&data).unwrap();
    assert_eq!(
        resumed.state().losses,
        straight.state().losses,
        "step losses"
    );
    let diff = max_abs_diff(
        &lora_factors(&resumed),
        &lora_factors(&straight)
            .iter()
            .map(|&v| v as f64)
            .collect::<Vec<_>>(),
    );
    assert!(diff < 1e-6, "resumed weights differ by {diff}");

    // Other batching, or another strategy: the checkpoint does not fit.
    let other_batching = TrainingConfig {
        batch_size: 2,
        gradient_accumulation: 1,
        ..lora_config()
    };
    let err = Trainer::resume(&tiny, &checkpoint, &flex(), other_batching)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("other settings"), "{err}");
    let mut finished = Trainer::resume(&tiny, &checkpoint, &flex(), lora_config()).unwrap();
    finished.train(&data).unwrap();
    let err = finished.train(&data).expect_err("nothing left");
    assert!(err.to_string().contains("nothing to train"), "{err}");
    let full = config(TrainingStrategy::Full, Checkpointing::Off);
    let err = Trainer::resume(
        &tiny,
        &checkpoint,
        &flex(),
        TrainingConfig { seed: 42, ..full },
    )
    .err()
    .expect("refused");
    assert!(err.to_string().contains("training checkpoint"), "{err}");
}

#[test]
fn bad_training_settings_are_refused() {
    let tiny = fixtures().join("tiny-llama");
    let refused = |config: TrainingConfig| {
        Trainer::new(&tiny, &flex(), config)
            .err()
            .expect("refused")
            .to_string()
    };
    let lora = |spec: LoraSpec| TrainingConfig {
        strategy: TrainingStrategy::Lora(spec),
        ..TrainingConfig::default()
    };
    let msg = refused(lora(LoraSpec::new(4, 8.0).targets(["no_such_proj"])));
    assert!(msg.contains("match no linear layer"), "{msg}");
    let msg = refused(lora(LoraSpec::new(0, 8.0)));
    assert!(msg.contains("r ≥ 1"), "{msg}");
    let msg = refused(lora(LoraSpec::new(4, f64::NAN)));
    assert!(msg.contains("finite alpha"), "{msg}");
    let msg = refused(TrainingConfig {
        max_grad_norm: Some(-1.0),
        ..TrainingConfig::default()
    });
    assert!(msg.contains("gradient clip"), "{msg}");
    let msg = refused(TrainingConfig {
        batch_size: 0,
        ..TrainingConfig::default()
    });
    assert!(msg.contains("batch size"), "{msg}");
    let msg = refused(TrainingConfig {
        max_steps: Some(0),
        ..TrainingConfig::default()
    });
    assert!(msg.contains("max_steps"), "{msg}");
    let msg = refused(TrainingConfig {
        strategy: TrainingStrategy::Full,
        quantization: moera::engine::Quantization::Int8,
        ..TrainingConfig::default()
    });
    assert!(msg.contains("full fine-tuning"), "{msg}");
    let mut trainer = Trainer::new(&tiny, &flex(), TrainingConfig::default()).unwrap();
    let empty = Dataset {
        train: vec![],
        validation: vec![],
        skipped_lines: 0,
        truncated: 0,
        unscored: 0,
    };
    let events = trainer.events().subscribe();
    let msg = trainer.train(&empty).expect_err("refused").to_string();
    assert!(msg.contains("no training examples"), "{msg}");
    assert!(matches!(
        events.try_recv(),
        Ok(TrainingEvent::Failed { .. })
    ));
}

/// Multiplies every gradient by a factor, or sums their squares: the reference arithmetic of
/// PyTorch's `clip_grad_norm_` in plain burn ops.
struct ClipReference<'a> {
    grads: &'a mut GradientsParams,
    factor: Option<f32>,
    squares: f64,
}

impl ModuleVisitor for ClipReference<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(grad) = self.grads.remove::<D>(param.id) else {
            return;
        };
        let sum = grad.clone().square().sum().into_scalar::<f32>();
        self.squares += f64::from(sum);
        let grad = match self.factor {
            Some(factor) => grad.mul_scalar(factor),
            None => grad,
        };
        self.grads.register(param.id, grad);
    }
}

/// Two steps, the first over two batches, each with a gradient above the clip: the trainer
/// folds the mean over the batches and the clipping factor into its AdamW pass. Every
/// weight must move as burn's AdamW moves it on the mean gradient scaled as PyTorch's
/// `clip_grad_norm_` scales it (`max / (norm + 1e-6)`), and the reported norms are those of
/// the mean gradients. (AdamW ignores a factor shared by every step: the second step, with
/// another batch count and norm, is what shows a factor gone wrong.)
#[test]
fn clipped_accumulated_steps_match_burns_adamw_on_clipped_gradients() {
    let (first, _) = reference_batch();
    // The same rows rotated by three positions: other sequences, other gradients.
    fn rotate<T: Clone>(rows: &[Vec<T>]) -> Vec<Vec<T>> {
        rows.iter()
            .map(|row| {
                let mut row = row.clone();
                row.rotate_left(3);
                row
            })
            .collect()
    }
    let second = Batch {
        ids: rotate(&first.ids),
        labels: rotate(&first.labels),
    };
    let steps = [vec![first, second.clone()], vec![second]];
    let tiny = fixtures().join("tiny-llama");
    let lr = 1e-2;
    let max = 0.05;
    let config = TrainingConfig {
        strategy: TrainingStrategy::Full,
        learning_rate: lr,
        warmup_steps: 0,
        schedule: Schedule::Constant,
        weight_decay: 0.0,
        max_grad_norm: Some(max),
        ..TrainingConfig::default()
    };
    // The reference: burn's accumulation, the clip in burn ops, burn's AdamW.
    let mut model = Trainer::new(&tiny, &flex(), config.clone())
        .expect("trainer")
        .into_model();
    let mut adamw = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.0)
        .init();
    let mut expected_norms = Vec::new();
    for batches in &steps {
        let decoder = model.decoder().clone();
        let mut accumulator = GradientsAccumulator::<Decoder>::new();
        for batch in batches {
            let loss = model.loss(&batch.ids, &batch.labels).expect("loss");
            accumulator.accumulate(
                &decoder,
                GradientsParams::from_grads(loss.backward(), &decoder),
            );
        }
        let mut grads = accumulator.grads();
        let mut norm = ClipReference {
            grads: &mut grads,
            factor: None,
            squares: 0.0,
        };
        decoder.visit(&mut norm);
        let count = batches.len() as f32;
        let mean_norm = norm.squares.sqrt() as f32 / count;
        assert!(mean_norm > max, "the clip must act");
        expected_norms.push(mean_norm);
        decoder.visit(&mut ClipReference {
            grads: &mut grads,
            factor: Some(max / (mean_norm + 1e-6) / count),
            squares: 0.0,
        });
        model = model.map_decoder(|decoder| adamw.step(lr, decoder, grads));
    }
    let expected = by_path(model.decoder(), None);

    let mut trainer = Trainer::new(&tiny, &flex(), config).expect("trainer");
    for (batches, expected_norm) in steps.iter().zip(expected_norms) {
        let (_, grad_norm) = trainer.step_on(batches).expect("step");
        assert!(
            (grad_norm - expected_norm).abs() <= 1e-4 * expected_norm,
            "norm {grad_norm} vs {expected_norm}"
        );
    }
    let actual = by_path(trainer.model().decoder(), None);
    assert_eq!(actual.len(), expected.len());
    let (worst, path) = expected
        .iter()
        .map(|(path, expected)| {
            let diff = actual[path]
                .iter()
                .zip(expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            (diff, path)
        })
        .fold((0f32, ""), |worst, (diff, path)| match diff > worst.0 {
            true => (diff, path.as_str()),
            false => worst,
        });
    assert!(worst < 1e-5, "{path}: differs from burn's AdamW by {worst}");
}
