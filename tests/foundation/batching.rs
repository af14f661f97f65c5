//! Continuous batching against transformers: sequences of different lengths decoded in one
//! shared step give transformers' logits and greedy tokens, whenever they join or leave.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moera::engine::batch::{Scheduler, SchedulerConfig};
use moera::engine::{Device, Error, GenerationRequest, Model, SamplingParams, TokenEvent};
use moera_models::nn::token_tensor;
use moera_models::{KvCache, LogitsMode, RaggedKvCache};

use crate::common::{fixtures, flex, ids, load_on, max_abs_diff, reference};

fn to_vec(logits: burn::tensor::Tensor<2>) -> Vec<f32> {
    logits
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 logits")
}

/// A single-row cache prefilled with `prompt`, able to hold `capacity` positions.
fn prefilled(model: &Model, prompt: &[u32], capacity: usize) -> KvCache {
    let lm = model.causal_lm();
    let mut cache = lm.new_cache(1, capacity);
    lm.forward(
        token_tensor(prompt, 1, &model.device()),
        &mut cache,
        LogitsMode::Last,
    )
    .expect("prefill");
    cache
}

/// Rows start after 2, 5 and 8 prompt tokens (caches of different capacities), then decode
/// the rest of transformers' prompt one shared step at a time; a fourth row joins midway and
/// rows leave as they reach the end. Every row's logits match transformers' at its position.
fn ragged_steps_match_transformers(fixture: &str, device: &Device) {
    let dir = fixtures().join(fixture);
    let model = load_on(&dir, device);
    let reference = reference(&dir.join("reference.safetensors"));
    let prompt = ids(&reference["prompt_ids"].1);
    let logits = &reference["logits"].1;
    let vocab = model.vocab_size();
    assert!(model.causal_lm().supports_ragged(), "{fixture}");

    let mut cache = RaggedKvCache::new();
    // Each row: the position it feeds next.
    let mut next: Vec<usize> = Vec::new();
    for (start, capacity) in [
        (2, prompt.len()),
        (5, prompt.len() + 7),
        (8, prompt.len() + 3),
    ] {
        cache.push(prefilled(&model, &prompt[..start], capacity));
        next.push(start);
    }
    let mut worst = 0f64;
    let mut joined = false;
    let mut steps = 0;
    while !next.is_empty() {
        let tokens: Vec<u32> = next.iter().map(|&p| prompt[p]).collect();
        let out = to_vec(
            model
                .causal_lm()
                .forward_ragged(&tokens, &mut cache)
                .expect("ragged step"),
        );
        for (row, &position) in next.iter().enumerate() {
            let expected = &logits[position * vocab..(position + 1) * vocab];
            worst = worst.max(max_abs_diff(&out[row * vocab..(row + 1) * vocab], expected));
        }
        for p in &mut next {
            *p += 1;
        }
        steps += 1;
        let keep: Vec<bool> = next.iter().map(|&p| p < prompt.len()).collect();
        cache.retain(&keep);
        next.retain(|&p| p < prompt.len());
        assert_eq!(
            cache.lens(),
            next.as_slice(),
            "{fixture}: lengths follow the rows"
        );
        if !joined && steps == 2 {
            cache.push(prefilled(&model, &prompt[..1], prompt.len() + 20));
            next.push(1);
            joined = true;
        }
    }
    assert!(worst < 1e-4, "{fixture}: ragged logits differ by {worst}");
}

#[test]
fn ragged_decoding_matches_transformers_on_flex() {
    // Llama; Qwen3-MoE (per-head QK norm, sparse experts); GPT-OSS (sliding window, sinks).
    for fixture in ["tiny-llama", "tiny-qwen3-moe", "tiny-gpt-oss"] {
        ragged_steps_match_transformers(fixture, &flex());
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
#[test]
fn ragged_decoding_matches_transformers_on_gpu() {
    for fixture in ["tiny-llama", "tiny-qwen3-moe"] {
        ragged_steps_match_transformers(fixture, &crate::common::gpu());
    }
}

fn greedy(prompt: &[u32], max_tokens: usize) -> GenerationRequest {
    GenerationRequest::ids(prompt.to_vec())
        .max_tokens(max_tokens)
        .sampling(SamplingParams::greedy())
}

/// Collects a stream's token ids, and whether it ended with `Done`.
async fn collect(mut stream: moera::engine::batch::GenerationStream) -> (Vec<u32>, bool) {
    let mut tokens = Vec::new();
    while let Some(event) = stream.next_event().await {
        match event.expect("event") {
            TokenEvent::Token { id, .. } => tokens.push(id),
            TokenEvent::Done { .. } => return (tokens, true),
        }
    }
    (tokens, false)
}

/// The counters once nothing runs (10 s at most).
fn settled(scheduler: &Scheduler) -> moera::engine::batch::SchedulerStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    while scheduler.stats().running > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    scheduler.stats()
}

/// Requests that overlap in time share decode steps and each still gets transformers'
/// greedy continuation, including one that joins a batch already running (whose cache then
/// grows past its first size).
#[test]
fn scheduler_batches_requests_and_keeps_transformers_greedy_tokens() {
    scheduler_keeps_greedy_tokens("tiny-llama", true);
}

/// DeepSeek's latent attention decodes one sequence per pass: the scheduler still serves
/// concurrent requests, each over its own cache, with transformers' tokens.
#[test]
fn scheduler_serves_models_without_batched_decoding() {
    scheduler_keeps_greedy_tokens("tiny-deepseek-v2", false);
}

fn scheduler_keeps_greedy_tokens(fixture: &str, shares_steps: bool) {
    let dir = fixtures().join(fixture);
    let model = Arc::new(load_on(&dir, &flex()));
    let reference = reference(&dir.join("reference.safetensors"));
    let prompt = ids(&reference["prompt_ids"].1);
    let expected = ids(&reference["greedy_ids"].1);
    let scheduler = Scheduler::start(Arc::clone(&model), SchedulerConfig::default());
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        // A long request on a shorter prompt runs first, so the others join a batch
        // whose rows hold other lengths.
        // 200 tokens: longer than a batch's first cache (prompt + 128), so it grows.
        let mut early = scheduler.submit(greedy(&prompt[..4], 200)).expect("submit");
        for _ in 0..3 {
            early.next_event().await.expect("event").expect("token");
        }
        let streams: Vec<_> = (0..4)
            .map(|_| {
                scheduler
                    .submit(greedy(&prompt, expected.len()))
                    .expect("submit")
            })
            .collect();
        let results = futures::future::join_all(streams.into_iter().map(collect)).await;
        for (tokens, done) in results {
            assert!(done, "every stream ends with Done");
            assert_eq!(tokens, expected, "transformers' greedy tokens");
        }
        let (rest, done) = collect(early).await;
        assert!(
            done && rest.len() == 197,
            "the first request ran to its end"
        );
    });
    // The last rows retire just after their final event.
    let stats = settled(&scheduler);
    // Rows decoded in a step another row paid for: the four concurrent requests have 60
    // decode rows in all (15 each), nearly all of them beside the long request.
    let shared = stats.decoded_rows - stats.decode_steps;
    if shares_steps {
        assert!(shared >= 40, "steps were shared: {stats:?}");
    } else {
        assert_eq!(shared, 0, "{stats:?}");
    }
    assert_eq!((stats.running, stats.waiting, stats.cancelled), (0, 0, 0));
    scheduler.join();
}

/// A dropped stream is cancelled at the next step and frees its place; bad requests are
/// refused before any token; a draining scheduler takes nothing new.
#[test]
fn scheduler_cancels_dropped_streams_and_refuses_bad_requests() {
    let dir = fixtures().join("tiny-llama");
    let model = Arc::new(load_on(&dir, &flex()));
    let scheduler = Scheduler::start(model, SchedulerConfig::default());
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut stream = scheduler.submit(greedy(&[1, 2, 3], 200)).expect("submit");
        for _ in 0..2 {
            stream.next_event().await.expect("event").expect("token");
        }
        drop(stream);
    });
    let stats = settled(&scheduler);
    assert_eq!((stats.running, stats.cancelled), (0, 1), "{stats:?}");
    assert!(stats.generated_tokens < 200, "{stats:?}");

    let too_long = greedy(&[1; 8], 100_000);
    assert!(matches!(
        scheduler.submit(too_long),
        Err(Error::PromptTooLong { .. })
    ));
    assert!(matches!(
        scheduler.submit(greedy(&[], 4)),
        Err(Error::EmptyPrompt)
    ));
    assert!(matches!(
        scheduler.submit(greedy(&[1_000_000], 4)),
        Err(Error::TokenOutOfRange { .. })
    ));
    let mut adapter = greedy(&[1, 2], 4);
    adapter.adapter = Some("missing".into());
    assert!(matches!(
        scheduler.submit(adapter),
        Err(Error::UnknownAdapter { .. })
    ));
    scheduler.drain();
    assert!(matches!(
        scheduler.submit(greedy(&[1, 2], 4)),
        Err(Error::ShuttingDown)
    ));
    scheduler.join();
}
