//! The fused rotary embedding on flex against burn's composite `x·cos + [−x₂, x₁]·sin`,
//! forward and backward, for heads read in the projection's order, in their own order, and
//! as a narrowed part of wider rows (DeepSeek's rotated slice of each head).

use burn::tensor::{Device, Tensor, TensorData};
use moera::kernels::rotate_half;

use crate::{pseudo_random, relative_error, values};

const BATCH: usize = 2;
const HEADS: usize = 3;
/// Three rayon tasks of 64 rows and a partial fourth.
const SEQ: usize = 37;
const DIM: usize = 8;

#[derive(Debug, Clone, Copy)]
enum Input {
    /// `[batch, seq, heads·dim]` split into heads: a strided view.
    Projected,
    /// `[batch, heads, seq, dim]` row by row.
    HeadsMajor,
    /// The last `DIM` of `DIM + 5` values of each row.
    Narrowed,
}

fn composite(x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>) -> Tensor<4> {
    let half = DIM / 2;
    let first = x.clone().narrow(3, 0, half);
    let second = x.clone().narrow(3, half, half);
    x * cos + Tensor::cat(vec![second.neg(), first], 3) * sin
}

/// The output and, on an autodiff device, the gradient of `Σ y ⊙ c` for the leaf `x` is
/// taken from.
fn run(device: &Device, input: Input, fused: bool) -> Vec<(&'static str, Vec<f32>)> {
    let leaf_shape = match input {
        Input::Projected => [BATCH, SEQ, HEADS * DIM],
        Input::HeadsMajor => [BATCH, HEADS, SEQ * DIM],
        Input::Narrowed => [BATCH, HEADS, SEQ * (DIM + 5)],
    };
    let count: usize = leaf_shape.iter().product();
    let leaf = Tensor::<3>::from_data(TensorData::new(pseudo_random(1, count), leaf_shape), device);
    let leaf = match device.is_autodiff() {
        true => leaf.require_grad(),
        false => leaf,
    };
    let x = match input {
        Input::Projected => leaf
            .clone()
            .reshape([BATCH, SEQ, HEADS, DIM])
            .swap_dims(1, 2),
        Input::HeadsMajor => leaf.clone().reshape([BATCH, HEADS, SEQ, DIM]),
        Input::Narrowed => leaf
            .clone()
            .reshape([BATCH, HEADS, SEQ, DIM + 5])
            .narrow(3, 5, DIM),
    };
    // Tables with distinct halves, so that a swapped cos/sin half shows.
    let table = |seed: u64| {
        let values = pseudo_random(seed, SEQ * DIM);
        Tensor::<4>::from_data(TensorData::new(values, [1, 1, SEQ, DIM]), device)
    };
    let (cos, sin) = (table(2), table(3));
    let y = match fused {
        true => rotate_half(&x, &cos, &sin).expect("flex runs the fused kernel"),
        false => composite(x, cos, sin),
    };
    let mut results = vec![("y", values(y.clone()))];
    if device.is_autodiff() {
        let cotangent = Tensor::<4>::from_data(
            TensorData::new(pseudo_random(4, BATCH * HEADS * SEQ * DIM), y.dims()),
            device,
        );
        let grads = (y * cotangent).sum().backward();
        results.push(("∂x", values(leaf.grad(&grads).expect("a gradient"))));
    }
    results
}

#[test]
fn fused_rotary_embedding_matches_burn_ops_forward_and_backward_on_flex() {
    for device in [Device::flex(), Device::flex().autodiff()] {
        for input in [Input::Projected, Input::HeadsMajor, Input::Narrowed] {
            let fused = run(&device, input, true);
            let reference = run(&device, input, false);
            assert_eq!(fused.len(), reference.len());
            for ((name, fused), (_, expected)) in fused.iter().zip(&reference) {
                let error = relative_error(fused, expected);
                assert!(
                    error < 1e-6,
                    "autodiff {}, {input:?}: {name} off by {error}",
                    device.is_autodiff()
                );
            }
        }
    }
}

#[test]
fn the_fused_rotary_embedding_declines_tables_that_do_not_fit() {
    let device = Device::flex();
    let x = Tensor::<4>::ones([1, 2, 3, 4], &device);
    let tables = Tensor::<4>::ones([1, 1, 3, 4], &device);
    assert!(rotate_half(&x, &tables, &tables).is_some());
    // One position per batch row (batched decoding) is not this kernel's layout.
    let per_row = Tensor::<4>::ones([1, 1, 1, 4], &device);
    assert!(rotate_half(&x, &per_row, &per_row).is_none());
    // An odd width has no halves.
    let odd = Tensor::<4>::ones([1, 2, 3, 5], &device);
    let odd_tables = Tensor::<4>::ones([1, 1, 3, 5], &device);
    assert!(rotate_half(&odd, &odd_tables, &odd_tables).is_none());
}
