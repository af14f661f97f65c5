//! SmolLM2-135M-Instruct Q4_1 on flex: prefill tokens/s (128-token prompt) and decode
//! tokens/s (128 new tokens), then the process's peak RSS.
//!
//!     scripts/fetch-models.sh smollm2
//!     RAYON_NUM_THREADS=2 cargo bench --bench generation
//!
//! The llama.cpp figures beside these in BENCHMARKS.md come from benches/llama_cpp_peer.py,
//! run on the same machine in the same session with the same prompt.

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use moera::engine::{Device, GenerationRequest, Model, SamplingParams};

const PROMPT_TOKENS: usize = 128;
const DECODE_TOKENS: usize = 128;

fn prompt(model: &Model) -> Vec<u32> {
    let text = include_str!("../tests/fixtures/english.txt");
    let ids = model.encode(text, true).expect("tokenize");
    ids[..PROMPT_TOKENS].to_vec()
}

fn run(model: &Model, prompt: &[u32], new_tokens: usize) {
    let mut request = GenerationRequest::ids(prompt.to_vec())
        .max_tokens(new_tokens)
        .sampling(SamplingParams::greedy());
    request.stop_at_eos = false;
    let events = model.generate(&request).expect("generate").count();
    assert_eq!(events, new_tokens + 1);
}

fn bench(c: &mut Criterion) {
    let path = moera::engine::hub::resolve_model("smollm2");
    if !path.exists() {
        eprintln!("SmolLM2 not fetched: run scripts/fetch-models.sh smollm2");
        return;
    }
    let model = Model::load_on(&path, &Device::flex(), &mut |_| {}).expect("load SmolLM2");
    let prompt = prompt(&model);

    let mut group = c.benchmark_group("smollm2-q4_1-flex");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));
    // Prefill: the 128-token prompt and one sampled token.
    group.throughput(Throughput::Elements(PROMPT_TOKENS as u64));
    group.bench_function("prefill-128", |b| b.iter(|| run(&model, &prompt, 1)));
    // Decode: 128 tokens after an 8-token prompt (its prefill is ~1% of the time).
    group.throughput(Throughput::Elements(DECODE_TOKENS as u64));
    group.bench_function("decode-128", |b| {
        b.iter(|| run(&model, &prompt[..8], DECODE_TOKENS))
    });
    group.finish();

    if let Some(peak) = moera::process::peak_rss_mib() {
        println!("peak RSS (VmHWM): {peak:.0} MiB");
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
