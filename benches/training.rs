//! Training speed and memory: one configuration per process (peak RSS is per process).
//!
//! `cargo bench --bench training -- STRATEGY CHECKPOINTING SEQ BATCH STEPS [QUANT]`
//! e.g. `-- lora off 256 4 3 auto`: LoRA r=8 (all-linear: q,k,v,o,gate,up,down) or full fine-tuning
//! of SmolLM2-135M on random token batches, on flex (CPU) or the device `MOERA_DEVICE` names.
//! `MOERA_TRAIN_MODEL` picks another model (a path; default `smollm2`). Prints one JSON line:
//! seconds per step (the first step excluded), tokens/s, and peak RSS above the loaded model.
//! `benches/training_peer.py` measures PEFT + PyTorch the same way; `benches/training.sh`
//! runs both.

use moera::engine::DeviceKind;
use moera::engine::adapter::LoraSpec;
use moera::engine::dataset::Batch;
use moera::engine::hub::resolve_model;
use moera::engine::train::{Checkpointing, Trainer, TrainingConfig, TrainingStrategy};
use rand::{Rng, SeedableRng};

#[path = "../src/allocator.rs"]
mod allocator;

/// `VmRSS` and `VmHWM` (peak) of this process in MiB, from /proc/self/status.
fn memory_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map_or(f64::NAN, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn main() {
    allocator::keep_freed_memory();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let strategy = match arg(0, "lora").as_str() {
        "full" => TrainingStrategy::Full,
        _ => TrainingStrategy::Lora(LoraSpec::new(8, 16.0).targets(["all-linear"])),
    };
    let checkpointing = match arg(1, "off").as_str() {
        "layers" => Checkpointing::Layers,
        "balanced" => Checkpointing::Balanced,
        _ => Checkpointing::Off,
    };
    let seq: usize = arg(2, "256").parse().expect("SEQ");
    let batch: usize = arg(3, "4").parse().expect("BATCH");
    let steps: usize = arg(4, "3").parse().expect("STEPS");
    let quant = arg(5, "auto");
    let config = TrainingConfig {
        strategy: strategy.clone(),
        checkpointing,
        quantization: quant.parse().expect("QUANT"),
        ..TrainingConfig::default()
    };
    let model = std::env::var("MOERA_TRAIN_MODEL").unwrap_or_else(|_| "smollm2".into());
    let kind = DeviceKind::default_kind().expect("MOERA_DEVICE");
    let device = kind.device().expect("device");
    let trainer = Trainer::new(resolve_model(&model), &device, config).expect("load the model");
    let (loaded, _) = memory_mib();
    let vocab = trainer.model().vocab_size() as u32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut times = Vec::new();
    let mut trainer = trainer;
    for _ in 0..steps {
        let ids: Vec<Vec<u32>> = (0..batch)
            .map(|_| (0..seq).map(|_| rng.random_range(0..vocab)).collect())
            .collect();
        let labels = ids
            .iter()
            .map(|row| row.iter().map(|&t| i64::from(t)).collect())
            .collect();
        let started = std::time::Instant::now();
        trainer
            .step_on(&[Batch { ids, labels }])
            .expect("training step");
        times.push(started.elapsed().as_secs_f64());
    }
    // The first steps compile kernels (and autotune them on GPUs): `MOERA_WARMUP_STEPS`
    // (default 1) are left out of the mean.
    let warmup: usize = std::env::var("MOERA_WARMUP_STEPS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(1);
    let measured = &times[warmup.min(times.len() - 1)..];
    let per_step = measured.iter().sum::<f64>() / measured.len() as f64;
    let (_, peak) = memory_mib();
    println!(
        "{}",
        serde_json::json!({
            "engine": "moera",
            "device": kind.to_string(),
            "strategy": arg(0, "lora"),
            "checkpointing": arg(1, "off"),
            "quant": quant,
            "seq": seq,
            "batch": batch,
            "seconds_per_step": per_step,
            "tokens_per_second": (seq * batch) as f64 / per_step,
            "loaded_rss_mib": loaded,
            "peak_rss_mib": peak,
            "peak_above_loaded_mib": peak - loaded,
        })
    );
}
