//! One MoE layer's experts: the fused dispatch kernels (cube devices only: counting sort,
//! grouped GEMMs or per-slot GEMVs), the reference sparse dispatch (only the chosen experts
//! run, on their own token rows) and running every expert on every token and masking, for
//! tokens ∈ {1, 8, 64, 512}, experts ∈ {8, 64}, top-k ∈ {2, 8}; hidden 1024, expert
//! intermediate 512, random weights and router logits (softmax → top-k → renormalize).
//! The `-int4` variants hold the experts in int4 (groups of 32 with a min): the fused
//! kernels decode them in place, the reference dequantizes each chosen expert (on flex:
//! the rayon dequant-matmul per expert).
//! Routing is computed beforehand; the timed part is the expert computation, read back,
//! then a device sync (without it some wgpu samples returned before the queue drained and
//! later ones paid for them). On wgpu, f32 E = 64 is skipped: its stacked gate/up weights
//! are one 256 MiB buffer, more than lavapipe allocates (int4: 36 MiB, run).
//!
//!     RAYON_NUM_THREADS=2 cargo bench --bench moe
//!     MOERA_DEVICE=wgpu cargo bench --bench moe --features wgpu   # or cuda
//!
//! Sparse cost should follow k/E; dense cost does not depend on k.

use std::time::Duration;

use burn::tensor::{Tensor, TensorData};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use moera::engine::DeviceKind;
use moera::kernels::{QuantFormat, QuantizedMatrix};
use moera::models::moe::{ExpertActivation, Experts, RouterSpec, Routing, RoutingMethod};
use rand::{Rng, SeedableRng, rngs::StdRng};

const HIDDEN: usize = 1024;
const INTERMEDIATE: usize = 512;

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn routing(rng: &mut StdRng, tokens: usize, experts: usize, top_k: usize) -> Routing {
    let spec = RouterSpec {
        num_experts: experts,
        top_k,
        method: RoutingMethod::SoftmaxTopK { normalize: true },
        scale: 1.0,
        bias: false,
    };
    let logits = random(rng, tokens * experts, 3.0);
    let (mut ids, mut weights) = (Vec::new(), Vec::new());
    for row in logits.chunks(experts) {
        let (i, w) = spec.route_token(row);
        ids.extend(i.into_iter().map(|i| i as u32));
        weights.extend(w);
    }
    Routing {
        num_experts: experts,
        top_k,
        logits,
        ids,
        weights,
    }
}

fn bench(c: &mut Criterion) {
    let device = DeviceKind::default_kind()
        .and_then(|kind| kind.device())
        .expect("device");
    let device_is_wgpu = matches!(DeviceKind::default_kind(), Ok(DeviceKind::Wgpu));
    let mut rng = StdRng::seed_from_u64(7);
    // Every call gets an input no earlier call saw (an elementwise op on the device, timed
    // with the call): with repeated inputs some fused calls on wgpu returned in
    // microseconds and later samples paid for them, which made the timings meaningless.
    let calls = std::cell::Cell::new(0u32);
    let fresh = |x: &Tensor<2>| {
        calls.set(calls.get() + 1);
        x.clone().mul_scalar(1.0 + calls.get() as f32 * 1e-6)
    };
    let mut group = c.benchmark_group("moe_layer");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for experts in [8, 64] {
        let scale = 1.0 / (HIDDEN as f32).sqrt();
        let shape = [experts, HIDDEN, INTERMEDIATE];
        // The same sizes with int4 weights (groups of 32 with a min), in the kernels'
        // `[E·2I, H]` / `[E·H, I]` layout.
        let int4 = QuantFormat::Int4 {
            group: 32,
            asymmetric: true,
        };
        let quantized = |rng: &mut StdRng, rows: usize, cols: usize| {
            let weights = random(rng, rows * cols, scale);
            QuantizedMatrix::quantize(int4, &weights, rows, cols).expect("int4")
        };
        let gate_up = quantized(&mut rng, experts * 2 * INTERMEDIATE, HIDDEN);
        let down = quantized(&mut rng, experts * HIDDEN, INTERMEDIATE);
        let int4_layer =
            Experts::from_quantized(shape, gate_up, down, ExpertActivation::SwiGlu, &device)
                .expect("int4 experts");
        // lavapipe cannot allocate the 256 MiB stacked f32 gate/up tensor of 64 experts.
        let stacked_bytes = experts * HIDDEN * 2 * INTERMEDIATE * 4;
        let f32_layer = if device_is_wgpu && stacked_bytes >= 256 << 20 {
            eprintln!("skipping f32 E{experts} on wgpu: {stacked_bytes} bytes in one buffer");
            None
        } else {
            let layer = Experts::from_stacked(
                shape,
                random(&mut rng, experts * HIDDEN * 2 * INTERMEDIATE, scale),
                random(&mut rng, experts * INTERMEDIATE * HIDDEN, scale),
                None,
                ExpertActivation::SwiGlu,
                &device,
            )
            .expect("experts");
            Some(layer)
        };
        for top_k in [2, 8] {
            for tokens in [1, 8, 64, 512] {
                let routing = routing(&mut rng, tokens, experts, top_k);
                let x = Tensor::<2>::from_data(
                    TensorData::new(random(&mut rng, tokens * HIDDEN, 1.0), [tokens, HIDDEN]),
                    &device,
                );
                group.throughput(Throughput::Elements(tokens as u64));
                let id = format!("E{experts}/k{top_k}/t{tokens}");
                let layers = [("", f32_layer.as_ref()), ("-int4", Some(&int4_layer))];
                for (suffix, layer) in layers {
                    let Some(layer) = layer else { continue };
                    if moera::kernels::moe::fused_on(&device) {
                        let (ids, weights) = routing.to_device(&device);
                        let name = format!("fused{suffix}");
                        group.bench_with_input(BenchmarkId::new(name, &id), &x, |b, x| {
                            b.iter(|| {
                                layer
                                    .forward_fused(fresh(x), ids.clone(), weights.clone())
                                    .expect("fused dispatch")
                                    .into_data();
                                device.sync().expect("device sync")
                            })
                        });
                    }
                    let name = format!("sparse{suffix}");
                    group.bench_with_input(BenchmarkId::new(name, &id), &x, |b, x| {
                        b.iter(|| {
                            layer.forward_sparse(fresh(x), &routing).into_data();
                            device.sync().expect("device sync")
                        })
                    });
                }
                if let Some(layer) = &f32_layer {
                    group.bench_with_input(BenchmarkId::new("dense", &id), &x, |b, x| {
                        b.iter(|| {
                            layer.forward_dense(fresh(x), &routing).into_data();
                            device.sync().expect("device sync")
                        })
                    });
                }
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
