//! `moera train`: fine-tune a model on a JSONL file with LoRA or full training.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use moera::engine::adapter::LoraSpec;
use moera::engine::dataset::{Dataset, DatasetOptions};
use moera::engine::train::{
    Checkpointing, Schedule, Trainer, TrainingConfig, TrainingEvent, TrainingStrategy,
    format_duration, log_events_as_jsonl,
};

#[derive(Clone, Copy, ValueEnum)]
pub enum StrategyArg {
    Lora,
    Full,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ScheduleArg {
    Constant,
    Linear,
    Cosine,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum CheckpointingArg {
    Off,
    Layers,
    Balanced,
}

#[derive(Args)]
pub struct TrainArgs {
    /// Model folder, .gguf file or alias (smollm2).
    #[arg(long, short)]
    model: String,
    /// Training data: JSONL lines of {"prompt", "completion"} or {"messages": [...]}.
    #[arg(long)]
    data: PathBuf,
    #[arg(long, value_enum, default_value = "lora")]
    strategy: StrategyArg,
    /// Where the adapter (LoRA) and checkpoints go.
    #[arg(long)]
    out: PathBuf,
    /// Backend: flex (CPU), wgpu or cuda.
    #[arg(long)]
    device: Option<String>,
    /// Frozen base weights for LoRA: auto (GGUF blocks as stored), none (f32), int8, int4.
    #[arg(long, default_value = "auto")]
    quant: String,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    r: usize,
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// LoRA target modules (comma-separated), or all-linear.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj"
    )]
    targets: Vec<String>,
    /// LoRA target parameters (comma-separated, as PEFT's target_parameters): MoE experts'
    /// stacked weights and routers, e.g.
    /// mlp.experts.gate_up_proj,mlp.experts.down_proj,mlp.gate.weight.
    #[arg(long, value_delimiter = ',')]
    target_parameters: Vec<String>,
    /// Scale LoRA by alpha/√r (rsLoRA).
    #[arg(long)]
    rslora: bool,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    #[arg(long, value_enum, default_value = "linear")]
    schedule: ScheduleArg,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Global gradient norm clip (0 turns clipping off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f32,
    #[arg(long)]
    max_steps: Option<usize>,
    /// Longest example in tokens (longer ones are truncated with a warning).
    #[arg(long, default_value_t = 1024)]
    seq_len: usize,
    /// Gradient checkpointing: layers recomputes each decoder layer in backward.
    #[arg(long, value_enum, default_value = "off", num_args = 0..=1, default_missing_value = "layers")]
    checkpointing: CheckpointingArg,
    /// Share of the examples held out for evaluation.
    #[arg(long, default_value_t = 0.0)]
    validation: f64,
    #[arg(long)]
    eval_every: Option<usize>,
    /// Save a checkpoint every this many steps (and at the end).
    #[arg(long)]
    save_every: Option<usize>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Continue from a checkpoint folder (OUT/checkpoint-N) of the same run.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Skip (and count) malformed JSONL lines instead of stopping at the first.
    #[arg(long)]
    skip_malformed: bool,
    /// Also write every training event as a JSON line to this file.
    #[arg(long)]
    log: Option<PathBuf>,
}

pub fn train(args: &TrainArgs) -> Result<()> {
    let (_, device, path) = crate::device_and_model(args.device.as_deref(), &args.model)?;
    let strategy = match args.strategy {
        StrategyArg::Lora => TrainingStrategy::Lora(LoraSpec {
            r: args.r,
            alpha: args.alpha,
            dropout: args.dropout,
            target_modules: args.targets.clone(),
            target_parameters: args.target_parameters.clone(),
            use_rslora: args.rslora,
            seed: args.seed,
        }),
        StrategyArg::Full => TrainingStrategy::Full,
    };
    let config = TrainingConfig {
        strategy,
        learning_rate: args.lr,
        epochs: args.epochs,
        batch_size: args.batch_size,
        gradient_accumulation: args.grad_accum,
        warmup_steps: args.warmup,
        schedule: match args.schedule {
            ScheduleArg::Constant => Schedule::Constant,
            ScheduleArg::Linear => Schedule::Linear,
            ScheduleArg::Cosine => Schedule::Cosine,
        },
        weight_decay: args.weight_decay,
        max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
        max_steps: args.max_steps,
        checkpointing: match args.checkpointing {
            CheckpointingArg::Off => Checkpointing::Off,
            CheckpointingArg::Layers => Checkpointing::Layers,
            CheckpointingArg::Balanced => Checkpointing::Balanced,
        },
        eval_every: args.eval_every,
        checkpoint_every: args.save_every,
        output_dir: Some(args.out.clone()),
        seed: args.seed,
        quantization: args.quant.parse()?,
    };
    let mut trainer = match &args.resume {
        Some(dir) => Trainer::resume(&path, dir, &device, config),
        None => Trainer::new(&path, &device, config),
    }
    .with_context(|| format!("loading {} for training", path.display()))?;
    let options = DatasetOptions {
        max_len: args.seq_len,
        skip_malformed: args.skip_malformed,
        validation_fraction: args.validation,
        seed: args.seed,
    };
    let data = Dataset::from_jsonl(&args.data, trainer.model(), &options)?;
    if data.skipped_lines > 0 {
        eprintln!("skipped {} malformed lines", data.skipped_lines);
    }
    if data.unscored > 0 {
        eprintln!("skipped {} examples with no token to learn", data.unscored);
    }
    if data.truncated > 0 {
        eprintln!(
            "{} examples truncated to {} tokens",
            data.truncated, args.seq_len
        );
    }
    let log = args
        .log
        .as_deref()
        .map(|file| log_events_as_jsonl(trainer.events().subscribe(), file))
        .transpose()?;
    let progress = show_progress(trainer.events().subscribe());
    let summary = trainer.train(&data);
    let out = args.out.clone();
    let model = trainer.into_model();
    // Dropping the trainer closed the bus: the subscribers drain and stop.
    progress.join().ok();
    if let Some(log) = log {
        log.join().ok().transpose()?;
    }
    let summary = summary?;
    if matches!(args.strategy, StrategyArg::Lora) {
        model.save_adapter(&out)?;
        println!(
            "adapter saved to {} ({} steps, loss {:.4}, {:.0} tokens/s)",
            out.display(),
            summary.steps,
            summary.final_loss,
            summary.tokens as f64 / summary.seconds
        );
    } else {
        println!(
            "trained weights are in the last checkpoint under {} ({} steps, loss {:.4})",
            out.display(),
            summary.steps,
            summary.final_loss
        );
    }
    Ok(())
}

/// Draws a progress bar from training events until the bus closes.
fn show_progress(events: std::sync::mpsc::Receiver<TrainingEvent>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let bar = ProgressBar::new(0).with_style(
            ProgressStyle::with_template(
                "train [{bar:30}] {pos}/{len} steps {msg} (elapsed {elapsed}, eta {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        for event in events {
            match event {
                TrainingEvent::Started {
                    total_steps,
                    trainable_parameters,
                    ..
                } => {
                    bar.set_length(total_steps as u64);
                    bar.println(format!("training {trainable_parameters} parameters"));
                }
                TrainingEvent::Step {
                    step,
                    loss,
                    learning_rate,
                    tokens_per_second,
                    ..
                } => {
                    bar.set_position(step as u64);
                    bar.set_message(format!(
                        "loss {loss:.4} lr {learning_rate:.2e} {tokens_per_second:.0} tok/s"
                    ));
                }
                TrainingEvent::Eval { step, loss } => {
                    bar.println(format!("step {step}: eval loss {loss:.4}"));
                }
                TrainingEvent::CheckpointSaved { path, .. } => {
                    bar.println(format!("checkpoint saved to {}", path.display()));
                }
                TrainingEvent::Finished {
                    steps,
                    loss,
                    seconds,
                } => {
                    bar.finish_and_clear();
                    eprintln!(
                        "finished {steps} steps in {}, loss {loss:.4}",
                        format_duration(std::time::Duration::from_secs_f64(seconds))
                    );
                }
                TrainingEvent::Failed { step, error } => {
                    bar.abandon_with_message(format!("failed at step {step}: {error}"));
                }
            }
        }
    })
}
