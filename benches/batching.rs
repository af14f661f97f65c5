//! Continuous batching in the engine: generated tokens/s of one sequence alone, then of
//! `CLIENTS` sequences submitted together to one `Scheduler` (they share decode steps).
//!
//! `cargo bench --bench batching -- [CLIENTS] [TOKENS]` (default 32 clients, 64 tokens each)
//! on SmolLM2-135M (`MOERA_MODEL` names another model or folder, `MOERA_DEVICE` the device,
//! `MOERA_QUANT` the weights' precision: `auto` keeps the GGUF's blocks, `none` is f32).
//! Greedy decoding with end-of-sequence ignored, so every sequence makes `TOKENS` tokens.
//! Prints one JSON line.

use std::sync::Arc;
use std::time::Instant;

use moera::engine::batch::{Scheduler, SchedulerConfig};
use moera::engine::hub::resolve_model;
use moera::engine::{
    DeviceKind, GenerationRequest, LoadOptions, Model, SamplingParams, TokenEvent,
};

#[path = "../src/allocator.rs"]
mod allocator;

fn request(index: usize, tokens: usize) -> GenerationRequest {
    let mut request = GenerationRequest::ids(vec![1, 100 + index as u32, 200, 300])
        .max_tokens(tokens)
        .sampling(SamplingParams::greedy());
    request.stop_at_eos = false;
    request
}

/// Runs `clients` requests at once; returns (seconds, tokens, mean time to first token).
fn run(scheduler: &Scheduler, clients: usize, tokens: usize) -> (f64, usize, f64) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let started = Instant::now();
    let streams: Vec<_> = (0..clients)
        .map(|i| scheduler.submit(request(i, tokens)).expect("submit"))
        .collect();
    let results = runtime.block_on(async {
        let tasks = streams.into_iter().map(|mut stream| async move {
            let (mut count, mut first) = (0, None);
            while let Some(event) = stream.next_event().await {
                if let TokenEvent::Token { .. } = event.expect("event") {
                    first.get_or_insert_with(|| started.elapsed().as_secs_f64());
                    count += 1;
                }
            }
            (count, first.unwrap_or(f64::NAN))
        });
        futures::future::join_all(tasks).await
    });
    let seconds = started.elapsed().as_secs_f64();
    let generated = results.iter().map(|(n, _)| n).sum();
    let ttft = results.iter().map(|(_, t)| t).sum::<f64>() / clients as f64;
    (seconds, generated, ttft)
}

fn main() {
    allocator::keep_freed_memory();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let clients = args.first().copied().unwrap_or(32);
    let tokens = args.get(1).copied().unwrap_or(64);
    let name = std::env::var("MOERA_MODEL").unwrap_or_else(|_| "smollm2".into());
    let kind = DeviceKind::default_kind().expect("MOERA_DEVICE");
    let device = kind.device().expect("device");
    let quant = std::env::var("MOERA_QUANT").unwrap_or_else(|_| "auto".into());
    let options = LoadOptions {
        quantization: quant.parse().expect("MOERA_QUANT"),
        ..LoadOptions::default()
    };
    let model = Arc::new(
        Model::load_with(resolve_model(&name), &device, options, &mut |_| {}).expect("load"),
    );
    let scheduler = Scheduler::start(
        model,
        SchedulerConfig {
            max_batch: clients,
            ..SchedulerConfig::default()
        },
    );
    // Warm-up: compiles kernels on GPUs.
    run(&scheduler, 2, 4);
    let (single_s, single_n, single_ttft) = run(&scheduler, 1, tokens);
    let (batch_s, batch_n, batch_ttft) = run(&scheduler, clients, tokens);
    let stats = scheduler.stats();
    println!(
        "{}",
        serde_json::json!({
            "model": name,
            "device": kind.to_string(),
            "quant": quant,
            "clients": clients,
            "tokens_per_client": tokens,
            "single_tokens_per_second": single_n as f64 / single_s,
            "single_ttft_seconds": single_ttft,
            "batched_tokens_per_second": batch_n as f64 / batch_s,
            "batched_mean_ttft_seconds": batch_ttft,
            "speedup": (batch_n as f64 / batch_s) / (single_n as f64 / single_s),
            "mean_rows_per_step": stats.decoded_rows as f64 / stats.decode_steps.max(1) as f64,
        })
    );
    scheduler.join();
}
