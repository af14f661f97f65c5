//! Distances, written so the compiler vectorizes them (eight independent accumulators).
//! Every metric is a dissimilarity: smaller is closer. None of them asserts on its input.

/// How vectors are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// `1 − cos(a, b)`; vectors are normalized when stored, so this is `1 − a·b`.
    Cosine,
    /// `−a·b` (maximum inner product).
    Dot,
    /// Squared Euclidean distance.
    L2,
}

impl Metric {
    /// Distance between `a` and `b` as stored (cosine vectors already normalized).
    #[inline]
    pub fn distance(self, a: &[f32], b: &[f32]) -> f32 {
        match self {
            Metric::Cosine => 1.0 - dot(a, b),
            Metric::Dot => -dot(a, b),
            Metric::L2 => l2_squared(a, b),
        }
    }

    /// Brings a vector into stored form: unit length for cosine (zero vectors stay zero).
    pub fn prepare(self, vector: &mut [f32]) {
        if self == Metric::Cosine {
            let norm = dot(vector, vector).sqrt();
            if norm > 0.0 {
                vector.iter_mut().for_each(|v| *v /= norm);
            }
        }
    }
}

const LANES: usize = 8;

/// `Σ term(aᵢ, bᵢ)` over eight independent accumulators, which the compiler turns into SIMD.
#[inline(always)]
fn sum_lanes(a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(&x, &y)| term(x, y))
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for i in 0..LANES {
            acc[i] += term(x[i], y[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    sum_lanes(a, b, |x, y| x * y)
}

#[inline]
pub fn l2_squared(a: &[f32], b: &[f32]) -> f32 {
    sum_lanes(a, b, |x, y| (x - y) * (x - y))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances_match_their_definitions() {
        let a: Vec<f32> = (0..19).map(|i| (i as f32 * 0.7).sin()).collect();
        let b: Vec<f32> = (0..19).map(|i| (i as f32 * 0.3).cos()).collect();
        let naive_dot: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let naive_l2: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
            .sum();
        assert!((Metric::Dot.distance(&a, &b) as f64 + naive_dot).abs() < 1e-5);
        assert!((Metric::L2.distance(&a, &b) as f64 - naive_l2).abs() < 1e-5);
        let (mut na, mut nb) = (a.clone(), b.clone());
        Metric::Cosine.prepare(&mut na);
        Metric::Cosine.prepare(&mut nb);
        let norms = (a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>()
            * b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>())
        .sqrt();
        let cosine = 1.0 - naive_dot / norms;
        assert!((Metric::Cosine.distance(&na, &nb) as f64 - cosine).abs() < 1e-5);
    }

    #[test]
    fn identical_unit_vectors_may_round_below_zero_without_panicking() {
        let mut v = vec![0.1f32; 50];
        Metric::Cosine.prepare(&mut v);
        let d = Metric::Cosine.distance(&v, &v);
        assert!(d.abs() < 1e-6);
        assert_eq!(Metric::Cosine.distance(&[0.0; 4], &[0.0; 4]), 1.0);
    }
}
