//! Dequant-matmul: our kernel (rayon on flex, cubecl on wgpu/cuda) against the plain-burn
//! reference and against an f32 matmul of the same shape, for a decode GEMV (1 token) and a
//! prefill GEMM (64 tokens). Shapes are SmolLM2's MLP projection `[1536, 576]` and a larger
//! `[4096, 4096]`. Throughput is in bytes of weights read, so criterion's rate for the GEMV
//! is its achieved bandwidth; `copy` measures the device's copy bandwidth (read + write of a
//! 64 MiB buffer) to compare it with.
//!
//! `attention`: the fused causal attention (flex) against the composite of burn ops that
//! other devices run, at SmolLM2's heads (9 query, 3 key/value, 64 wide): one decoded
//! position over 512 cached keys, a 128-token prefill, and a training step's forward and
//! backward over 1024 positions.
//!
//!     RAYON_NUM_THREADS=2 cargo bench --bench kernels
//!     MOERA_DEVICE=wgpu cargo bench --bench kernels --features wgpu   # or cuda

use std::time::Duration;

use burn::tensor::{Tensor, TensorData};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use moera::engine::DeviceKind;
use moera::kernels::{
    CausalMask, KernelPath, QuantFormat, QuantLinear, QuantizedMatrix, fused_attention,
    with_kernel_path,
};
use moera::models::attention::{Mask, attend};
use rand::{Rng, SeedableRng, rngs::StdRng};

fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn bench(c: &mut Criterion) {
    let device = DeviceKind::default_kind()
        .and_then(|kind| kind.device())
        .expect("device");
    let mut rng = StdRng::seed_from_u64(11);
    let mut group = c.benchmark_group("qmatmul");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));

    // Copy bandwidth: x + 0 reads and writes every element once.
    let elements = 16 << 20;
    let buffer = Tensor::<1>::from_data(
        TensorData::new(random(&mut rng, elements), [elements]),
        &device,
    );
    group.throughput(Throughput::Bytes(8 * elements as u64));
    group.bench_function("copy/device/64MiB", |b| {
        // Reading one element back waits for the whole op without copying it to the host.
        b.iter(|| buffer.clone().add_scalar(0.0).slice(0..1).into_data())
    });
    let host = random(&mut rng, elements);
    group.bench_function("copy/host/64MiB", |b| b.iter(|| host.clone()));

    let formats = [
        QuantFormat::Int8,
        QuantFormat::Int4 {
            group: 32,
            asymmetric: true,
        },
    ];
    for (rows, cols) in [(1536, 576), (4096, 4096)] {
        let weights = random(&mut rng, rows * cols);
        let dense = Tensor::<2>::from_data(TensorData::new(weights.clone(), [rows, cols]), &device)
            .transpose();
        for tokens in [1, 64] {
            let x = Tensor::<2>::from_data(
                TensorData::new(random(&mut rng, tokens * cols), [tokens, cols]),
                &device,
            );
            let shape = format!("{rows}x{cols}/t{tokens}");
            group.throughput(Throughput::Bytes(4 * (rows * cols) as u64));
            group.bench_function(format!("f32/{shape}"), |b| {
                b.iter(|| x.clone().matmul(dense.clone()).into_data())
            });
            for format in formats {
                let matrix = QuantizedMatrix::quantize(format, &weights, rows, cols).unwrap();
                group.throughput(Throughput::Bytes(matrix.memory_bytes() as u64));
                let linear = QuantLinear::new(matrix, &device);
                group.bench_function(format!("{format}/kernel/{shape}"), |b| {
                    b.iter(|| linear.forward(x.clone()).into_data())
                });
                if rows * cols <= 1 << 20 {
                    group.bench_function(format!("{format}/reference/{shape}"), |b| {
                        b.iter(|| linear.reference(x.clone()).into_data())
                    });
                }
            }
        }
    }
    group.finish();
}

fn bench_attention(c: &mut Criterion) {
    let device = DeviceKind::default_kind()
        .and_then(|kind| kind.device())
        .expect("device");
    let mut rng = StdRng::seed_from_u64(12);
    let mut group = c.benchmark_group("attention");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    let (heads, kv_heads, head_dim) = (9, 3, 64);
    let scale = 1.0 / (head_dim as f64).sqrt();
    let cases = [
        ("decode/512", 1, 511, false),
        ("prefill/128", 128, 0, false),
        ("train/1024", 1024, 0, true),
    ];
    for (name, seq, start, train) in cases {
        let device = if train {
            device.clone().autodiff()
        } else {
            device.clone()
        };
        let mut tensor = |shape: [usize; 4]| {
            let t = Tensor::<4>::from_data(
                TensorData::new(random(&mut rng, shape.iter().product()), shape),
                &device,
            );
            if train { t.require_grad() } else { t }
        };
        let q = tensor([1, heads, seq, head_dim]);
        let k = tensor([1, kv_heads, start + seq, head_dim]);
        let v = tensor([1, kv_heads, start + seq, head_dim]);
        let mask = Mask {
            start,
            sliding_window: None,
        };
        let run = |path| {
            with_kernel_path(path, || {
                let out = attend(q.clone(), k.clone(), v.clone(), scale, mask, None);
                if train {
                    let grads = out.sum().backward();
                    q.grad(&grads)
                        .map(|g| g.slice([0..1, 0..1, 0..1, 0..1]).into_data());
                } else {
                    out.slice([0..1, 0..1, 0..1, 0..1]).into_data();
                }
            })
        };
        let causal = CausalMask {
            start,
            window: None,
        };
        if fused_attention(&q, &k, &v, scale as f32, causal).is_some() {
            group.bench_function(format!("fused/{name}"), |b| {
                b.iter(|| run(KernelPath::Fast))
            });
        }
        group.bench_function(format!("composite/{name}"), |b| {
            b.iter(|| run(KernelPath::Reference))
        });
    }
    group.finish();
}

criterion_group!(benches, bench, bench_attention);
criterion_main!(benches);
