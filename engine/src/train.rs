//! Fine-tuning: LoRA or full, with AdamW, a warmup + decay schedule, gradient accumulation
//! and clipping, per-layer gradient checkpointing, evaluation, checkpoints that resume
//! exactly, and progress published on a [`TrainingEventBus`].
//!
//! ```no_run
//! use moera_engine::adapter::LoraSpec;
//! use moera_engine::dataset::{Dataset, DatasetOptions};
//! use moera_engine::train::{Trainer, TrainingConfig, TrainingStrategy};
//!
//! # fn main() -> Result<(), moera_engine::Error> {
//! let config = TrainingConfig {
//!     strategy: TrainingStrategy::Lora(LoraSpec::new(8, 16.0)),
//!     ..TrainingConfig::default()
//! };
//! let mut trainer = Trainer::new("model-dir", &moera_engine::Device::flex(), config)?;
//! let data = Dataset::from_jsonl("train.jsonl".as_ref(), trainer.model(), &DatasetOptions::default())?;
//! let events = trainer.events().subscribe();
//! trainer.train(&data)?;
//! trainer.model().save_adapter("adapter-out".as_ref())?;
//! # drop(events);
//! # Ok(())
//! # }
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::optim::{
    AdamWState, AdaptiveMomentumState, GradientsAccumulator, GradientsParams, LearningRate,
    ModuleOptimizer, Optimizer,
};
use burn::tensor::{Device, Tensor};
use moera_models::nn::token_tensor;
use moera_models::{CausalLm, Decoder};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::adapter::LoraSpec;
use crate::dataset::{Batch, Dataset, TokenizedExample, batches};
use crate::error::{Error, Result};
use crate::model::{LoadOptions, LossTargets, Model};
use crate::quantization::Quantization;
use crate::safetensors_source::SafetensorsWeights;
use moera_models::nn::checked_data;

/// What a run trains.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainingStrategy {
    /// A new LoRA adapter on the frozen (possibly quantized) base.
    Lora(LoraSpec),
    /// Every weight, in f32 (quantized files are dequantized at load).
    Full,
}

/// How the learning rate decays after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

/// Which activations the backward pass recomputes instead of storing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Checkpointing {
    /// Every activation is kept.
    Off,
    /// Only each decoder layer's input is kept; a layer's inner activations are recomputed
    /// when backward reaches it.
    Layers,
    /// burn's op-level balanced checkpointing (it recomputes cheap ops, keeps the rest).
    Balanced,
}

/// Settings of a run.
#[derive(Debug, Clone)]
pub struct TrainingConfig {
    pub strategy: TrainingStrategy,
    /// Peak learning rate.
    pub learning_rate: f64,
    pub epochs: usize,
    /// Sequences per forward pass.
    pub batch_size: usize,
    /// Forward passes whose gradients are averaged into one optimizer step (each batch's
    /// mean loss weighs the same, as transformers before 4.46; not by scored tokens).
    pub gradient_accumulation: usize,
    /// Optimizer steps of linear warmup from 0.
    pub warmup_steps: usize,
    pub schedule: Schedule,
    /// AdamW's decoupled weight decay (not applied to norms and biases).
    pub weight_decay: f32,
    /// Gradients are scaled down to this global L2 norm when above it.
    pub max_grad_norm: Option<f32>,
    /// Caps the run (and the schedule) at this many optimizer steps.
    pub max_steps: Option<usize>,
    pub checkpointing: Checkpointing,
    /// Evaluate on the validation examples every this many steps (and at the end).
    pub eval_every: Option<usize>,
    /// Save a checkpoint under `output_dir` every this many steps (and at the end).
    pub checkpoint_every: Option<usize>,
    pub output_dir: Option<PathBuf>,
    /// Seeds the data order and dropout.
    pub seed: u64,
    /// Precision of the frozen base weights for LoRA (`Auto` keeps GGUF blocks).
    pub quantization: Quantization,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            strategy: TrainingStrategy::Lora(LoraSpec::new(8, 16.0)),
            learning_rate: 2e-4,
            epochs: 1,
            batch_size: 4,
            gradient_accumulation: 1,
            warmup_steps: 0,
            schedule: Schedule::Linear,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            max_steps: None,
            checkpointing: Checkpointing::Off,
            eval_every: None,
            checkpoint_every: None,
            output_dir: None,
            seed: 42,
            quantization: Quantization::Auto,
        }
    }
}

/// The learning rate of optimizer step `step` (0-based) of `total`, as transformers'
/// `get_{constant,linear,cosine}_schedule_with_warmup` give it.
pub fn learning_rate(config: &TrainingConfig, step: usize, total: usize) -> f64 {
    let peak = config.learning_rate;
    let warmup = config.warmup_steps;
    if step < warmup {
        return peak * step as f64 / warmup as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / decay_steps).min(1.0);
    match config.schedule {
        Schedule::Constant => peak,
        Schedule::Linear => peak * (1.0 - progress),
        Schedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

/// What a run reports while it goes.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TrainingEvent {
    Started {
        total_steps: usize,
        trainable_parameters: usize,
        train_examples: usize,
        validation_examples: usize,
    },
    Step {
        step: usize,
        total_steps: usize,
        epoch: usize,
        loss: f32,
        learning_rate: f64,
        grad_norm: f32,
        tokens_per_second: f64,
        eta_seconds: f64,
    },
    Eval {
        step: usize,
        loss: f32,
    },
    CheckpointSaved {
        step: usize,
        path: PathBuf,
    },
    Finished {
        steps: usize,
        loss: f32,
        seconds: f64,
    },
    Failed {
        step: usize,
        error: String,
    },
}

/// A publish/subscribe bus of [`TrainingEvent`]s: each subscriber gets every event published
/// after it subscribed, on its own channel; subscribers that hung up are dropped.
#[derive(Debug, Clone, Default)]
pub struct TrainingEventBus {
    subscribers: Arc<Mutex<Vec<Sender<TrainingEvent>>>>,
}

impl TrainingEventBus {
    pub fn subscribe(&self) -> Receiver<TrainingEvent> {
        let (sender, receiver) = channel();
        self.lock().push(sender);
        receiver
    }

    pub fn publish(&self, event: TrainingEvent) {
        self.lock()
            .retain(|subscriber| subscriber.send(event.clone()).is_ok());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Sender<TrainingEvent>>> {
        // A subscriber list stays valid even if a publisher panicked holding it.
        self.subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Writes every event of `events` to `path` as a JSON line with its time (seconds since
/// the Unix epoch), until the bus is dropped. Runs on its own thread.
pub fn log_events_as_jsonl(
    events: Receiver<TrainingEvent>,
    path: &Path,
) -> Result<std::thread::JoinHandle<Result<()>>> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let file = std::fs::File::create(path).map_err(io(path))?;
    let path = path.to_path_buf();
    Ok(std::thread::spawn(move || {
        let mut out = std::io::BufWriter::new(file);
        for event in events {
            let mut line = serde_json::to_value(&event).unwrap_or_default();
            let time = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            line["time"] = time.as_secs_f64().into();
            writeln!(out, "{line}").map_err(io(&path))?;
            out.flush().map_err(io(&path))?;
        }
        Ok(())
    }))
}

/// Where a run stands: what a checkpoint stores besides weights and optimizer state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// Mean training loss of each step.
    pub losses: Vec<f32>,
    /// `(step, loss)` of each evaluation.
    pub eval_losses: Vec<(usize, f32)>,
    pub seed: u64,
    /// The settings that decide what a step does (strategy, base precision, batching,
    /// schedule): a checkpoint resumes only under the same ones.
    #[serde(default)]
    pub run: String,
}

/// What a finished (or interrupted) run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingSummary {
    pub steps: usize,
    pub final_loss: f32,
    pub tokens: usize,
    pub seconds: f64,
}

/// Trains a [`Model`] with a [`TrainingConfig`].
pub struct Trainer {
    /// Always `Some` between calls: taken out only while an update maps it.
    model: Option<Model>,
    optimizer: ModuleOptimizer,
    /// The factor of the next optimizer step's gradients (clipping and the mean over
    /// accumulated batches), read by every group's [`AdamW`].
    grad_scale: GradScale,
    config: TrainingConfig,
    state: TrainerState,
    events: TrainingEventBus,
}

impl Trainer {
    /// Loads the model at `path` on `device` (made an autodiff device) as the strategy needs
    /// it: LoRA adds fresh factors to the chosen modules and freezes the base; full training
    /// loads every weight in f32 and trains all of them.
    pub fn new(path: impl AsRef<Path>, device: &Device, config: TrainingConfig) -> Result<Self> {
        let model = load_for_training(path.as_ref(), device, &config)?;
        Self::from_model(model, config)
    }

    /// A trainer for a model already loaded for training (see [`Trainer::new`]).
    pub fn from_model(model: Model, config: TrainingConfig) -> Result<Self> {
        if config.batch_size == 0 || config.gradient_accumulation == 0 || config.epochs == 0 {
            return Err(Error::InvalidArgument(
                "batch size, gradient accumulation and epochs must be ≥ 1".into(),
            ));
        }
        if !(config.learning_rate.is_finite() && config.learning_rate > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "learning rate {} must be positive",
                config.learning_rate
            )));
        }
        if !(config.weight_decay.is_finite() && config.weight_decay >= 0.0)
            || config
                .max_grad_norm
                .is_some_and(|max| !(max.is_finite() && max > 0.0))
        {
            return Err(Error::InvalidArgument(format!(
                "weight decay {} must be ≥ 0 and the gradient clip {:?} positive",
                config.weight_decay, config.max_grad_norm
            )));
        }
        if !model.device().is_autodiff() {
            return Err(Error::InvalidArgument(
                "the model is not on an autodiff device (load it with Trainer::new)".into(),
            ));
        }
        // transformers' Trainer decays neither norms nor biases.
        let grad_scale = GradScale::default();
        let adamw = |weight_decay| AdamW {
            weight_decay,
            grad_scale: grad_scale.clone(),
        };
        let optimizer = ModuleOptimizer::from(adamw(config.weight_decay)).with_group(
            ParamGroup::from_any_predicates(vec!["norm", "bias"]),
            adamw(0.0),
            None,
        );
        if config.max_steps == Some(0) {
            return Err(Error::InvalidArgument("max_steps must be ≥ 1".into()));
        }
        let state = TrainerState {
            seed: config.seed,
            run: run_fingerprint(&config),
            ..TrainerState::default()
        };
        Ok(Self {
            model: Some(model),
            optimizer,
            grad_scale,
            config,
            state,
            events: TrainingEventBus::default(),
        })
    }

    /// Continues the run saved in checkpoint `dir` (see [`Trainer::save_checkpoint`]) on
    /// the model at `path`, with `config` (the same as the interrupted run's).
    pub fn resume(
        path: impl AsRef<Path>,
        dir: &Path,
        device: &Device,
        config: TrainingConfig,
    ) -> Result<Self> {
        let mut trainer = Self::new(path, device, config)?;
        trainer.load_checkpoint(dir)?;
        Ok(trainer)
    }

    pub fn model(&self) -> &Model {
        self.model
            .as_ref()
            .expect("the trainer holds its model between calls")
    }

    pub fn into_model(self) -> Model {
        self.model
            .expect("the trainer holds its model between calls")
    }

    /// Replaces the model's decoder by `f` of it.
    fn map_decoder(&mut self, f: impl FnOnce(Decoder) -> Decoder) {
        let model = self
            .model
            .take()
            .expect("the trainer holds its model between calls");
        self.model = Some(model.map_decoder(f));
    }

    pub fn state(&self) -> &TrainerState {
        &self.state
    }

    pub fn config(&self) -> &TrainingConfig {
        &self.config
    }

    /// The bus this trainer publishes its progress on.
    pub fn events(&self) -> &TrainingEventBus {
        &self.events
    }

    /// Parameters the run updates.
    pub fn trainable_parameters(&self) -> usize {
        let mut count = TrainableCount(0);
        self.model().decoder().visit(&mut count);
        count.0
    }

    /// Optimizer steps of the whole run over `data`.
    pub fn total_steps(&self, data: &Dataset) -> usize {
        let batches = data.train.len().div_ceil(self.config.batch_size);
        let per_epoch = batches.div_ceil(self.config.gradient_accumulation);
        let total = per_epoch * self.config.epochs;
        self.config.max_steps.map_or(total, |cap| cap.min(total))
    }

    /// Trains on `data` to the end of the run.
    pub fn train(&mut self, data: &Dataset) -> Result<TrainingSummary> {
        self.train_for(data, usize::MAX)
    }

    /// Trains on `data` for at most `steps` more optimizer steps (the schedule still spans
    /// the whole run): an interrupted run, as a checkpoint then resumes it.
    pub fn train_for(&mut self, data: &Dataset, steps: usize) -> Result<TrainingSummary> {
        let result = self.run(data, steps);
        if let Err(error) = &result {
            self.events.publish(TrainingEvent::Failed {
                step: self.state.step,
                error: error.to_string(),
            });
        }
        result
    }

    fn run(&mut self, data: &Dataset, steps: usize) -> Result<TrainingSummary> {
        if data.train.is_empty() {
            return Err(Error::InvalidArgument("no training examples".into()));
        }
        let total = self.total_steps(data);
        if self.state.step >= total {
            return Err(Error::InvalidArgument(format!(
                "nothing to train: the run is at step {} of {total}",
                self.state.step
            )));
        }
        let stop = total.min(self.state.step.saturating_add(steps));
        self.events.publish(TrainingEvent::Started {
            total_steps: total,
            trainable_parameters: self.trainable_parameters(),
            train_examples: data.train.len(),
            validation_examples: data.validation.len(),
        });
        let started = Instant::now();
        let first_step = self.state.step;
        let mut tokens = 0;
        let mut loss = f32::NAN;
        while self.state.step < stop {
            let step_started = Instant::now();
            let group = self.step_batches(data, self.state.step);
            let step_tokens: usize = group.iter().map(|b| b.tokens).sum();
            let grad_norm;
            (loss, grad_norm) = self.step(&group, total)?;
            tokens += step_tokens;
            let done = self.state.step - first_step;
            let per_step = started.elapsed().as_secs_f64() / done as f64;
            self.events.publish(TrainingEvent::Step {
                step: self.state.step,
                total_steps: total,
                epoch: (self.state.step - 1) / self.steps_per_epoch(data),
                loss,
                learning_rate: learning_rate(&self.config, self.state.step - 1, total),
                grad_norm,
                tokens_per_second: step_tokens as f64 / step_started.elapsed().as_secs_f64(),
                eta_seconds: per_step * (total - self.state.step) as f64,
            });
            let at = |every: Option<usize>| {
                every.is_some_and(|n| n > 0 && self.state.step.is_multiple_of(n))
                    || self.state.step == total
            };
            if at(self.config.eval_every) && !data.validation.is_empty() {
                let eval = self.evaluate(&data.validation)?;
                self.state.eval_losses.push((self.state.step, eval));
                self.events.publish(TrainingEvent::Eval {
                    step: self.state.step,
                    loss: eval,
                });
            }
            if let Some(out) = &self.config.output_dir
                && at(self.config.checkpoint_every)
            {
                let dir = out.join(format!("checkpoint-{}", self.state.step));
                self.save_checkpoint(&dir)?;
                self.events.publish(TrainingEvent::CheckpointSaved {
                    step: self.state.step,
                    path: dir,
                });
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        if self.state.step == total {
            self.events.publish(TrainingEvent::Finished {
                steps: total,
                loss,
                seconds,
            });
        }
        Ok(TrainingSummary {
            steps: self.state.step,
            final_loss: loss,
            tokens,
            seconds,
        })
    }

    fn steps_per_epoch(&self, data: &Dataset) -> usize {
        data.train
            .len()
            .div_ceil(self.config.batch_size)
            .div_ceil(self.config.gradient_accumulation)
    }

    /// The batches of optimizer step `step`: epoch `e` visits the training examples in an
    /// order shuffled by `seed + e`, so a resumed run sees what an uninterrupted one would.
    fn step_batches(&self, data: &Dataset, step: usize) -> Vec<CountedBatch> {
        let per_epoch = self.steps_per_epoch(data);
        let epoch = step / per_epoch;
        let mut order: Vec<&TokenizedExample> = data.train.iter().collect();
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(self.config.seed.wrapping_add(epoch as u64));
        order.shuffle(&mut rng);
        let per_step = self.config.batch_size * self.config.gradient_accumulation;
        let start = (step % per_epoch) * per_step;
        let chosen: Vec<TokenizedExample> = order
            .iter()
            .skip(start)
            .take(per_step)
            .map(|&e| e.clone())
            .collect();
        let pad = self.model().eos_ids().first().copied().unwrap_or(0);
        chosen
            .chunks(self.config.batch_size)
            .map(|chunk| CountedBatch {
                tokens: chunk.iter().map(|e| e.ids.len()).sum(),
                batch: batches(chunk, chunk.len(), pad).remove(0),
            })
            .collect()
    }

    /// One optimizer step on `batches` (their gradients averaged), outside a run: the
    /// learning rate is the schedule's at the current step of a run of `max_steps` (without
    /// it, the peak after warmup). Returns the mean loss and the gradient norm before
    /// clipping.
    pub fn step_on(&mut self, batches: &[Batch]) -> Result<(f32, f32)> {
        let group: Vec<CountedBatch> = batches
            .iter()
            .map(|batch| CountedBatch {
                tokens: batch.ids.iter().map(Vec::len).sum(),
                batch: batch.clone(),
            })
            .collect();
        // Without max_steps there is no end to decay towards: the peak rate after warmup.
        let total = self.config.max_steps.unwrap_or(usize::MAX);
        self.step(&group, total)
    }

    /// One optimizer step over `group`: the mean of its batches' losses, the global norm of
    /// their mean gradient (before clipping).
    fn step(&mut self, group: &[CountedBatch], total: usize) -> Result<(f32, f32)> {
        let decoder = self.model().decoder();
        let mut accumulator = GradientsAccumulator::<Decoder>::new();
        let mut loss_sum = 0.0;
        for (micro, counted) in group.iter().enumerate() {
            // Dropout masks depend on the seed, the step and the batch only.
            let seed = self.config.seed.wrapping_mul(1_000_003)
                ^ ((self.state.step as u64) << 16 | micro as u64);
            moera_models::nn::lora_dropout(Some(seed));
            let result = self.loss_and_gradients(&counted.batch);
            moera_models::nn::lora_dropout(None);
            let (loss, grads) = result?;
            loss_sum += loss;
            accumulator.accumulate(decoder, grads);
        }
        let mut grads = accumulator.grads();
        let count = group.len() as f32;
        let mut norm = GradNorm {
            grads: &mut grads,
            squares: None,
        };
        decoder.visit(&mut norm);
        let squares = norm.squares.as_ref().map_or(0.0, scalar);
        let grad_norm = squares.sqrt() / count;
        let clip = match self.config.max_grad_norm {
            Some(max) if grad_norm > max => max / (grad_norm + 1e-6),
            _ => 1.0,
        };
        // The mean over the batches and the clipping, applied inside the optimizer's pass.
        self.grad_scale.set(clip / count);
        let rate = learning_rate(&self.config, self.state.step, total);
        let optimizer = &mut self.optimizer;
        let model = self
            .model
            .take()
            .expect("the trainer holds its model between calls");
        self.model = Some(model.map_decoder(|decoder| optimizer.step(rate, decoder, grads)));
        let loss = loss_sum / count;
        self.state.step += 1;
        self.state.losses.push(loss);
        Ok((loss, grad_norm))
    }

    /// The loss of `batch` and the gradients of the trainable parameters.
    pub fn loss_and_gradients(&self, batch: &Batch) -> Result<(f32, GradientsParams)> {
        let decoder = self.model().decoder();
        if self.config.checkpointing != Checkpointing::Layers {
            let loss = self.model().loss(&batch.ids, &batch.labels)?;
            let value = scalar(&loss);
            let grads = GradientsParams::from_grads(loss.backward(), decoder);
            return Ok((value, grads));
        }
        let targets = self.model().loss_targets(&batch.ids, &batch.labels)?;
        layer_checkpointed_gradients(decoder, &targets)
    }

    /// The mean loss over `examples` (each batch weighted by its scored tokens), without
    /// autodiff.
    pub fn evaluate(&self, examples: &[TokenizedExample]) -> Result<f32> {
        let plain = self.model().decoder().valid();
        let pad = self.model().eos_ids().first().copied().unwrap_or(0);
        let scored: Vec<TokenizedExample> = examples
            .iter()
            .filter(|e| e.learned_tokens() > 0)
            .cloned()
            .collect();
        let (mut sum, mut count) = (0.0, 0.0);
        for batch in batches(&scored, self.config.batch_size, pad) {
            let targets = self.model().loss_targets(&batch.ids, &batch.labels)?;
            let loss = Model::loss_on(&plain, &targets)?;
            sum += f64::from(scalar(&loss)) * targets.scored as f64;
            count += targets.scored as f64;
        }
        if count == 0.0 {
            return Err(Error::InvalidArgument(
                "no validation token is scored".into(),
            ));
        }
        Ok((sum / count) as f32)
    }

    /// Saves the run to `dir`: the trainable weights (`trainable.safetensors`, by module
    /// path), the optimizer state (`optimizer.bpk`), `trainer_state.json`, and for LoRA the
    /// adapter in PEFT's format (`adapter/`).
    ///
    /// The files are written to `{dir}.partial` and the folder renamed into place, so an
    /// interrupted save leaves the previous checkpoint of that name, not a torn one.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        let mut partial = dir.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(io(&partial))?;
        }
        std::fs::create_dir_all(&partial).map_err(io(&partial))?;
        self.write_checkpoint(&partial)?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io(dir))?;
        }
        std::fs::rename(&partial, dir).map_err(io(dir))
    }

    /// The files of a checkpoint, into the existing folder `dir`.
    fn write_checkpoint(&self, dir: &Path) -> Result<()> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        let invalid = |reason: String| Error::Checkpoint {
            path: dir.to_path_buf(),
            reason,
        };
        let mut collect = CollectTrainable::default();
        self.model().decoder().visit(&mut collect);
        let weights_path = dir.join("trainable.safetensors");
        crate::safetensors_source::write_f32(&weights_path, &collect.tensors)?;
        self.optimizer
            .save(dir.join("optimizer.bpk"))
            .map_err(|e| invalid(format!("optimizer state: {e:?}")))?;
        let state_path = dir.join("trainer_state.json");
        let text = serde_json::to_string_pretty(&self.state).map_err(|e| invalid(e.to_string()))?;
        std::fs::write(&state_path, text).map_err(io(&state_path))?;
        if matches!(self.config.strategy, TrainingStrategy::Lora(_)) {
            self.model().save_adapter(&dir.join("adapter"))?;
        }
        Ok(())
    }

    /// Restores what [`Trainer::save_checkpoint`] wrote into this trainer.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let invalid = |reason: String| Error::Checkpoint {
            path: dir.to_path_buf(),
            reason,
        };
        let state_path = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&state_path).map_err(|source| Error::Io {
            path: state_path.clone(),
            source,
        })?;
        let state: TrainerState =
            serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if state.seed != self.config.seed || state.run != self.state.run {
            return Err(invalid(format!(
                "saved by a run with other settings (seed {}, {}); resumed with seed {}, {}",
                state.seed, state.run, self.config.seed, self.state.run
            )));
        }
        let file = SafetensorsWeights::open_files(&[dir.join("trainable.safetensors")])?;
        let mut restore = RestoreTrainable {
            file: &file,
            path: Vec::new(),
            restored: 0,
            error: None,
        };
        self.map_decoder(|decoder| decoder.map(&mut restore));
        if let Some(reason) = restore.error {
            return Err(invalid(reason));
        }
        let saved = file.names().count();
        if restore.restored != saved {
            return Err(invalid(format!(
                "{saved} saved tensors for {} trainable parameters of this model: another \
                 strategy or base model?",
                restore.restored
            )));
        }
        let optimizer = self.optimizer.clone();
        self.optimizer = optimizer
            .load(dir.join("optimizer.bpk"))
            .map_err(|e| invalid(format!("optimizer state: {e:?}")))?;
        self.state = state;
        Ok(())
    }
}

/// What decides a run's steps besides the seed, for checking a resume.
fn run_fingerprint(config: &TrainingConfig) -> String {
    format!(
        "{:?}, base {}, batch {} × {}, {} epochs, max steps {:?}, lr {} {:?} warmup {}, \
         decay {}, clip {:?}",
        config.strategy,
        config.quantization,
        config.batch_size,
        config.gradient_accumulation,
        config.epochs,
        config.max_steps,
        config.learning_rate,
        config.schedule,
        config.warmup_steps,
        config.weight_decay,
        config.max_grad_norm
    )
}

/// A batch and its tokens before padding.
struct CountedBatch {
    batch: Batch,
    tokens: usize,
}

/// Loads `path` on an autodiff `device` with what `config`'s strategy trains made
/// trainable, every other parameter frozen, and parameter ids numbered in module order so
/// optimizer state saved by one process finds its parameters in another.
pub fn load_for_training(path: &Path, device: &Device, config: &TrainingConfig) -> Result<Model> {
    let device = match config.checkpointing {
        Checkpointing::Balanced => device.clone().autodiff().gradient_checkpointing(),
        _ => device.clone().autodiff(),
    };
    let options = match &config.strategy {
        TrainingStrategy::Lora(spec) => LoadOptions {
            quantization: config.quantization,
            new_adapter: Some(spec.clone()),
            ..LoadOptions::default()
        },
        TrainingStrategy::Full => {
            if !matches!(config.quantization, Quantization::Auto | Quantization::None) {
                return Err(Error::InvalidArgument(format!(
                    "full fine-tuning trains f32 weights; quantization {} is for LoRA",
                    config.quantization
                )));
            }
            LoadOptions {
                quantization: Quantization::None,
                ..LoadOptions::default()
            }
        }
    };
    let model = Model::load_with(path, &device, options, &mut |_| {})?;
    let lora = matches!(config.strategy, TrainingStrategy::Lora(_));
    let trained: std::collections::HashSet<ParamId> = model
        .decoder()
        .lora_adapters()
        .iter()
        .flat_map(|adapter| [adapter.a.id, adapter.b.id])
        .collect();
    Ok(model.map_decoder(|decoder| {
        decoder.map(&mut PrepareParams {
            next_id: 1,
            train: |id: &ParamId| !lora || trained.contains(id),
        })
    }))
}

/// Per-layer gradient checkpointing: a forward without autodiff keeps each layer's input
/// only; backward then runs the head, and each layer from the last, again with autodiff,
/// seeding its backward with the gradient of its output (`Σ out ⊙ ∂L/∂out`) and passing
/// on the gradient of its input. At most one layer's activations live at a time.
fn layer_checkpointed_gradients(
    decoder: &Decoder,
    targets: &LossTargets,
) -> Result<(f32, GradientsParams)> {
    let plain = decoder.valid();
    let device = plain.device();
    let tokens = token_tensor(&targets.tokens, targets.batch, &device);
    let layers = decoder.num_layers();
    let mut inputs = Vec::with_capacity(layers);
    let mut x = plain.embed(tokens.clone());
    for i in 0..layers {
        inputs.push(x.clone());
        x = plain.layer_forward(i, x)?;
    }
    drop(plain);

    let mut accumulator = GradientsAccumulator::<Decoder>::new();
    let hidden = x.autodiff().require_grad();
    let loss = targets.loss_of_hidden(decoder, hidden.clone());
    let value = scalar(&loss);
    let mut grads = loss.backward();
    let mut upstream = output_gradient(&hidden, &grads)?;
    accumulator.accumulate(decoder, GradientsParams::from_module(&mut grads, decoder));
    for i in (0..layers).rev() {
        let input = inputs
            .pop()
            .expect("one input per layer")
            .autodiff()
            .require_grad();
        let output = decoder.layer_forward(i, input.clone())?;
        let mut grads = (output * upstream).sum().backward();
        upstream = output_gradient(&input, &grads)?;
        accumulator.accumulate(decoder, GradientsParams::from_module(&mut grads, decoder));
    }
    let embedded = decoder.embed(token_tensor(
        &targets.tokens,
        targets.batch,
        &decoder.device(),
    ));
    if embedded.is_tracked() {
        let mut grads = (embedded * upstream).sum().backward();
        accumulator.accumulate(decoder, GradientsParams::from_module(&mut grads, decoder));
    }
    Ok((value, accumulator.grads()))
}

fn output_gradient(tensor: &Tensor<3>, grads: &burn::tensor::Gradients) -> Result<Tensor<3>> {
    tensor
        .grad(grads)
        .ok_or_else(|| Error::InvalidArgument("no gradient reached a layer boundary".into()))
}

fn scalar(tensor: &Tensor<1>) -> f32 {
    tensor
        .clone()
        .into_data()
        .convert::<f32>()
        .as_slice::<f32>()
        .map_or(f32::NAN, |v| v[0])
}

/// Sets which parameters require gradients and numbers the trainable ones 1, 2, … in
/// module order (frozen ones keep their ids): optimizer state is keyed by these ids, and
/// numbering only what is trained keeps them independent of how the base is held.
struct PrepareParams<F> {
    next_id: u64,
    train: F,
}

impl<F: Fn(&ParamId) -> bool> ModuleMapper for PrepareParams<F> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let train = (self.train)(&param.id);
        let param = param.set_require_grad(train);
        if !train {
            return param;
        }
        let (_, value, mapper) = param.consume();
        let id = ParamId::from(self.next_id);
        self.next_id += 1;
        Param::from_mapped_value(id, value, mapper)
    }
}

struct TrainableCount(usize);

impl ModuleVisitor for TrainableCount {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if param.val().is_require_grad() {
            self.0 += param.val().shape().num_elements();
        }
    }
}

/// The sum of squares of the gradients in `grads`, summed on the device (one read back).
struct GradNorm<'a> {
    grads: &'a mut GradientsParams,
    squares: Option<Tensor<1>>,
}

impl ModuleVisitor for GradNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        // Taken out and put back so that the CPU pass reads the values in place.
        if let Some(grad) = self.grads.remove::<D>(param.id) {
            let (sum, grad) = moera_kernels::sum_of_squares(grad);
            self.grads.register(param.id, grad);
            self.squares = Some(match self.squares.take() {
                Some(total) => total + sum,
                None => sum,
            });
        }
    }
}

/// The trainable parameters' values by module path (`layers.0.self_attn...lora.0.a`).
#[derive(Default)]
struct CollectTrainable {
    path: Vec<String>,
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl ModuleVisitor for CollectTrainable {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        if !value.is_require_grad() {
            return;
        }
        let shape = value.dims().to_vec();
        let values = value
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap_or_default();
        self.tensors.push((self.path.join("."), shape, values));
    }
}

/// Replaces trainable parameters by the values a checkpoint saved under their path.
struct RestoreTrainable<'a> {
    file: &'a SafetensorsWeights,
    path: Vec<String>,
    restored: usize,
    error: Option<String>,
}

impl ModuleMapper for RestoreTrainable<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if !param.val().is_require_grad() {
            return param;
        }
        let name = self.path.join(".");
        let data = checked_data(self.file, &name, &param.val().dims());
        let data = match data {
            Ok(data) => data,
            Err(e) => {
                self.error.get_or_insert(e.to_string());
                return param;
            }
        };
        self.restored += 1;
        param.map(|value| Tensor::<D>::from_data(data, &value.device()).require_grad())
    }
}

/// How long `duration` is, as `1h02m03s`.
pub fn format_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    match (secs / 3600, secs / 60 % 60, secs % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, s) => format!("{h}h{m:02}m{s:02}s"),
    }
}

/// AdamW as transformers' Trainer runs it (β = (0.9, 0.999), ε = 1e-8, decoupled weight
/// decay), one fused pass per parameter on flex ([`moera_kernels::adamw_step`]), the
/// gradients scaled by the trainer's [`GradScale`] in the same pass. Its state is burn's
/// `AdamWState`, so checkpoints keep burn's optimizer record.
#[derive(Debug, Clone)]
struct AdamW {
    weight_decay: f32,
    grad_scale: GradScale,
}

/// A factor shared by the trainer, which sets it before each step, and its optimizers,
/// which multiply every gradient by it (1 until set).
#[derive(Debug, Clone)]
struct GradScale(Arc<AtomicU32>);

impl Default for GradScale {
    fn default() -> Self {
        Self(Arc::new(AtomicU32::new(1f32.to_bits())))
    }
}

impl GradScale {
    fn set(&self, factor: f32) {
        self.0.store(factor.to_bits(), Ordering::Relaxed);
    }

    fn get(&self) -> f32 {
        f32::from_bits(self.0.load(Ordering::Relaxed))
    }
}

impl Optimizer for AdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let (moments, time) = match state {
            Some(state) => {
                let momentum = state.momentum;
                (
                    Some((momentum.moment_1, momentum.moment_2)),
                    momentum.time + 1,
                )
            }
            None => (None, 1),
        };
        let step = moera_kernels::AdamWStep {
            lr: lr as f32,
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
            weight_decay: self.weight_decay,
            time: i32::try_from(time).unwrap_or(i32::MAX),
            grad_scale: self.grad_scale.get(),
        };
        let (tensor, moment_1, moment_2) = moera_kernels::adamw_step(tensor, grad, moments, step);
        let momentum = AdaptiveMomentumState::new(time, moment_1, moment_2);
        (tensor, Some(AdamWState::new(momentum)))
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}
