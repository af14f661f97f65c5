//! The fused AdamW step against burn's `AdamW` (an implementation we did not write), over
//! several steps with weight decay and a gradient factor, on flex (the fused pass) and autodiff-flex tensors (the
//! burn-ops path).

use burn::optim::{AdamWConfig, Optimizer};
use burn::tensor::{Device, Tensor, TensorData};
use moera::kernels::{AdamWStep, adamw_step, sum_of_squares};

use crate::{pseudo_random, relative_error};

fn vector(seed: u64, n: usize, device: &Device) -> Tensor<1> {
    Tensor::from_data(TensorData::new(pseudo_random(seed, n), [n]), device)
}

fn host(t: &Tensor<1>) -> Vec<f32> {
    t.clone()
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .unwrap()
}

#[test]
fn fused_adamw_matches_burns_adamw_over_several_steps() {
    // Two rayon chunks of the kernel and a partial third.
    const N: usize = 40_000;
    let (lr, decay) = (3e-3, 0.1);
    let burns = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(decay)
        .build();
    for device in [Device::flex(), Device::flex().autodiff()] {
        let mut ours = vector(1, N, &device);
        let mut moments = None;
        let mut theirs = ours.clone();
        let mut state = None;
        for time in 1..=4 {
            // Gradients of several scales, and steps where the moments have history.
            let grad = vector(10 + time as u64, N, &device).mul_scalar(10f32.powi(time - 2));
            // One step folds a factor (clipping) into the update; burn gets the scaled gradient.
            let grad_scale = if time == 3 { 0.25 } else { 1.0 };
            let step = AdamWStep {
                lr,
                beta_1: 0.9,
                beta_2: 0.999,
                epsilon: 1e-8,
                weight_decay: decay,
                time,
                grad_scale,
            };
            let (param, m, v) = adamw_step(ours, grad.clone(), moments, step);
            (ours, moments) = (param, Some((m, v)));
            let scaled = grad.mul_scalar(grad_scale);
            (theirs, state) = burns.step(f64::from(lr), theirs, scaled, state);
            let error = relative_error(&host(&ours), &host(&theirs));
            assert!(
                error < 1e-6,
                "autodiff {}, step {time}: off by {error}",
                device.is_autodiff()
            );
        }
        let (m, v) = moments.expect("moments after a step");
        let momentum = state.expect("burn's state").momentum;
        assert_eq!(momentum.time, 4);
        assert!(relative_error(&host(&m), &host(&momentum.moment_1)) < 1e-6);
        assert!(relative_error(&host(&v), &host(&momentum.moment_2)) < 1e-6);
    }
}

#[test]
fn sum_of_squares_matches_burn_ops_and_keeps_the_tensor() {
    // Two rayon chunks and a partial third; a shared buffer (the clone) must stay intact.
    const N: usize = 40_000;
    for device in [Device::flex(), Device::flex().autodiff()] {
        let t = vector(7, N, &device).mul_scalar(3.0);
        let expected = host(&t.clone().square().sum());
        let kept = t.clone();
        let (sum, t) = sum_of_squares(t);
        assert!(relative_error(&host(&sum), &expected) < 1e-5);
        assert_eq!(host(&t), host(&kept));
    }
}
