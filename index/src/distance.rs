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
        self.kernel()(a, b)
    }

    /// The distance function for this metric on this CPU (AVX2 + FMA when it has them),
    /// chosen once so that hot loops call it without dispatching again.
    pub fn kernel(self) -> fn(&[f32], &[f32]) -> f32 {
        let kernels = kernels();
        match self {
            Metric::Cosine => kernels.cosine,
            Metric::Dot => kernels.dot,
            Metric::L2 => kernels.l2,
        }
    }

    /// Up to this distance two stored vectors count as copies (for cosine, unit vectors
    /// whose product rounds just below 1).
    pub(crate) fn floor(self) -> f32 {
        match self {
            Metric::Cosine => 1e-6,
            Metric::L2 => 0.0,
            Metric::Dot => f32::NEG_INFINITY,
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

struct Kernels {
    cosine: fn(&[f32], &[f32]) -> f32,
    dot: fn(&[f32], &[f32]) -> f32,
    l2: fn(&[f32], &[f32]) -> f32,
}

fn kernels() -> &'static Kernels {
    static KERNELS: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
    KERNELS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Kernels {
                cosine: |a, b| 1.0 - avx2::dot_checked(a, b),
                dot: |a, b| -avx2::dot_checked(a, b),
                l2: avx2::l2_checked,
            };
        }
        Kernels {
            cosine: |a, b| 1.0 - dot(a, b),
            dot: |a, b| -dot(a, b),
            l2: l2_squared,
        }
    })
}

/// Explicit AVX2 + FMA kernels: two 8-lane accumulators, then a scalar tail.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// Only reachable through `kernels()`, after the CPU was seen to have AVX2 and FMA.
    pub fn dot_checked(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: the features were detected before this function was selected.
        unsafe { reduce::<false>(a, b) }
    }

    pub fn l2_checked(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: as above.
        unsafe { reduce::<true>(a, b) }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn horizontal_sum(v: __m256) -> f32 {
        let pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let quad = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
        _mm_cvtss_f32(_mm_add_ss(quad, _mm_shuffle_ps(quad, quad, 1)))
    }

    /// `acc + x·y`, or `acc + (x − y)²` for the squared L2 distance.
    #[target_feature(enable = "avx2,fma")]
    fn accumulate<const SQUARED_DIFFERENCE: bool>(x: __m256, y: __m256, acc: __m256) -> __m256 {
        if SQUARED_DIFFERENCE {
            let d = _mm256_sub_ps(x, y);
            _mm256_fmadd_ps(d, d, acc)
        } else {
            _mm256_fmadd_ps(x, y, acc)
        }
    }

    /// `Σ aᵢ·bᵢ` or `Σ (aᵢ − bᵢ)²`: two 8-lane accumulators, then a scalar tail.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn reduce<const SQUARED_DIFFERENCE: bool>(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        // SAFETY: every load reads 8 values at an offset i with i + 8 ≤ n.
        let load = |p: *const f32, i: usize| unsafe { _mm256_loadu_ps(p.add(i)) };
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            acc0 = accumulate::<SQUARED_DIFFERENCE>(load(pa, i), load(pb, i), acc0);
            acc1 = accumulate::<SQUARED_DIFFERENCE>(load(pa, i + 8), load(pb, i + 8), acc1);
            i += 16;
        }
        if i + 8 <= n {
            acc0 = accumulate::<SQUARED_DIFFERENCE>(load(pa, i), load(pb, i), acc0);
            i += 8;
        }
        let mut sum = horizontal_sum(_mm256_add_ps(acc0, acc1));
        for j in i..n {
            let (x, y) = (a[j], b[j]);
            sum += if SQUARED_DIFFERENCE {
                (x - y) * (x - y)
            } else {
                x * y
            };
        }
        sum
    }
}

/// Hints the CPU to start loading the cache line at `data` (no effect elsewhere).
#[inline(always)]
pub(crate) fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let bytes = std::mem::size_of_val(data);
        let start = data.as_ptr().cast::<i8>();
        for offset in (0..bytes).step_by(64) {
            // SAFETY: prefetching is a hint; the address lies inside `data`.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    start.add(offset),
                )
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

const LANES: usize = 8;

/// `Σ term(aᵢ, bᵢ)` over eight independent accumulators, which the compiler turns into SIMD:
/// the portable kernels, and the reference the AVX2 ones are tested against.
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

    #[test]
    fn dispatched_kernels_agree_with_the_portable_ones_at_every_length() {
        for len in 0..70 {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
            let close = |x: f32, y: f32| (x - y).abs() <= 1e-5 * (1.0 + y.abs());
            assert!(
                close(Metric::Dot.distance(&a, &b), -dot(&a, &b)),
                "dot, {len}"
            );
            assert!(
                close(Metric::L2.distance(&a, &b), l2_squared(&a, &b)),
                "l2, {len}"
            );
            assert!(
                close(Metric::Cosine.distance(&a, &b), 1.0 - dot(&a, &b)),
                "cos, {len}"
            );
        }
    }
}
