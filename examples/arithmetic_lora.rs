//! LoRA on SmolLM2-135M-Instruct for two-digit addition asked in chat form, on the CPU:
//! held-out accuracy (greedy answers) before and after training, and the loss curve.
//!
//! `cargo run --release --example arithmetic_lora -- [STEPS] [--checkpointing]`
//! (fetch the model first with `scripts/fetch-models.sh smollm2`).

use std::io::Write;

use moera::engine::adapter::LoraSpec;
use moera::engine::dataset::{Dataset, DatasetOptions};
use moera::engine::hub::resolve_model;
use moera::engine::train::{
    Checkpointing, Schedule, Trainer, TrainingConfig, TrainingEvent, TrainingStrategy,
};
use moera::engine::{ChatMessage, Device, GenerationRequest, Model, SamplingParams};
use rand::{Rng, SeedableRng};

fn question(a: u32, b: u32) -> String {
    format!("What is {a} + {b}? Answer with the number only.")
}

/// `count` distinct (a, b) pairs of two-digit numbers, seeded.
fn pairs(count: usize, seed: u64, avoid: &[(u32, u32)]) -> Vec<(u32, u32)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out: Vec<(u32, u32)> = Vec::new();
    while out.len() < count {
        let pair = (rng.random_range(10..100), rng.random_range(10..100));
        if !out.contains(&pair) && !avoid.contains(&pair) {
            out.push(pair);
        }
    }
    out
}

/// Share of `pairs` the model answers right (greedy; the first number in the reply counts).
fn accuracy(model: &Model, pairs: &[(u32, u32)]) -> moera::engine::Result<f64> {
    let greedy = SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    };
    let mut right = 0;
    for &(a, b) in pairs {
        let request = GenerationRequest::chat(vec![ChatMessage::user(question(a, b))])
            .max_tokens(16)
            .sampling(greedy.clone());
        let (reply, _) = model.generate_text(&request)?;
        let answer: String = reply
            .chars()
            .skip_while(|c| !c.is_ascii_digit())
            .take_while(char::is_ascii_digit)
            .collect();
        right += usize::from(answer == (a + b).to_string());
    }
    Ok(right as f64 / pairs.len() as f64)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let steps: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(60);
    let checkpointing = if args.iter().any(|a| a == "--checkpointing") {
        Checkpointing::Layers
    } else {
        Checkpointing::Off
    };
    let path = resolve_model("smollm2");
    let test = pairs(100, 1, &[]);
    let train = pairs(steps * 8, 2, &test);

    let dir = tempfile::tempdir()?;
    let data_path = dir.path().join("train.jsonl");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&data_path)?);
    for &(a, b) in &train {
        let line = serde_json::json!({"messages": [
            {"role": "user", "content": question(a, b)},
            {"role": "assistant", "content": (a + b).to_string()},
        ]});
        writeln!(file, "{line}")?;
    }
    drop(file);

    let base = Model::load(&path)?;
    let before = accuracy(&base, &test)?;
    println!("held-out accuracy before: {:.1} %", 100.0 * before);
    drop(base);

    let config = TrainingConfig {
        strategy: TrainingStrategy::Lora(LoraSpec {
            seed: 0,
            ..LoraSpec::new(8, 16.0).targets(["all-linear"])
        }),
        learning_rate: 1e-3,
        batch_size: 8,
        warmup_steps: steps / 10,
        schedule: Schedule::Cosine,
        max_steps: Some(steps),
        checkpointing,
        seed: 0,
        ..TrainingConfig::default()
    };
    let mut trainer = Trainer::new(&path, &Device::flex(), config)?;
    let data = Dataset::from_jsonl(&data_path, trainer.model(), &DatasetOptions::default())?;
    let events = trainer.events().subscribe();
    let printer = std::thread::spawn(move || {
        for event in events {
            if let TrainingEvent::Step {
                step,
                loss,
                tokens_per_second,
                ..
            } = event
            {
                println!("step {step:>3}  loss {loss:.4}  {tokens_per_second:.0} tokens/s");
            }
        }
    });
    let summary = trainer.train(&data)?;
    let model = trainer.into_model().map_decoder(|decoder| {
        use burn::module::Module;
        decoder.valid()
    });
    printer.join().ok();
    let after = accuracy(&model, &test)?;
    println!(
        "{} steps in {:.0} s ({:.0} tokens/s); held-out accuracy {:.1} % → {:.1} %",
        summary.steps,
        summary.seconds,
        summary.tokens as f64 / summary.seconds,
        100.0 * before,
        100.0 * after
    );
    Ok(())
}
