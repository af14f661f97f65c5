//! Scalar int8 quantization of stored vectors, as Qdrant offers it: each dimension's range
//! (between low and high quantiles of the stored values, so outliers do not stretch it) is
//! split into 256 steps. Searches walk the graph with the query in f32 against the 1-byte
//! codes (4× less memory to touch) and rescore the best candidates with the f32 vectors.

use crate::Metric;

/// Fraction of values left outside each dimension's range at either end.
const OUTLIER_QUANTILE: f64 = 0.0005;

/// Per-dimension affine map between a value and its code: `value ≈ low + step · (code + 128)`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalarQuantizer {
    pub(crate) low: Vec<f32>,
    pub(crate) step: Vec<f32>,
}

impl ScalarQuantizer {
    /// Fits the ranges to `vectors` (rows of `dim` values, as stored).
    pub fn fit(vectors: impl Iterator<Item = f32>, dim: usize) -> Self {
        let mut per_dim: Vec<Vec<f32>> = vec![Vec::new(); dim];
        for (i, v) in vectors.enumerate() {
            per_dim[i % dim].push(v);
        }
        let (low, step) = per_dim
            .into_iter()
            .map(|mut values| {
                if values.is_empty() {
                    return (0.0, 1.0 / 255.0);
                }
                values.sort_unstable_by(f32::total_cmp);
                let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
                let (low, high) = (at(OUTLIER_QUANTILE), at(1.0 - OUTLIER_QUANTILE));
                let step = ((high - low) / 255.0).max(f32::MIN_POSITIVE);
                (low, step)
            })
            .unzip();
        Self { low, step }
    }

    pub fn dim(&self) -> usize {
        self.low.len()
    }

    /// Codes of a stored vector; values outside the fitted range are clamped.
    pub fn encode(&self, vector: &[f32], codes: &mut Vec<i8>) {
        codes.extend(vector.iter().enumerate().map(|(d, &v)| {
            let level = ((v - self.low[d]) / self.step[d]).round().clamp(0.0, 255.0);
            (level - 128.0) as i8
        }));
    }

    /// The query folded with the ranges, so that a distance to codes costs one
    /// multiply-add per dimension (see [`QueryCodes::distance`]).
    pub fn prepare_query(&self, metric: Metric, query: &[f32]) -> QueryCodes {
        // value_d = low_d + step_d·(c_d + 128) = offset_d + step_d·c_d
        let offset = |d: usize| self.low[d] + 128.0 * self.step[d];
        match metric {
            Metric::Cosine | Metric::Dot => QueryCodes {
                metric,
                kernels: coded_kernels(),
                // q·value = Σ q_d·offset_d + Σ (q_d·step_d)·c_d
                weights: (0..query.len()).map(|d| query[d] * self.step[d]).collect(),
                residuals: Vec::new(),
                constant: (0..query.len()).map(|d| query[d] * offset(d)).sum(),
            },
            Metric::L2 => QueryCodes {
                metric,
                kernels: coded_kernels(),
                // (q_d − value_d)² = ((q_d − offset_d) − step_d·c_d)²
                weights: self.step.clone(),
                residuals: (0..query.len()).map(|d| query[d] - offset(d)).collect(),
                constant: 0.0,
            },
        }
    }
}

/// A query prepared for distances to int8 codes.
pub struct QueryCodes {
    metric: Metric,
    /// Chosen once per query, so the walk does not dispatch again per distance.
    kernels: &'static CodedKernels,
    weights: Vec<f32>,
    residuals: Vec<f32>,
    constant: f32,
}

impl QueryCodes {
    /// Distance to a coded vector, in the metric's terms.
    #[inline]
    pub fn distance(&self, codes: &[i8]) -> f32 {
        let kernels = self.kernels;
        match self.metric {
            Metric::Cosine => 1.0 - self.constant - (kernels.dot)(&self.weights, codes),
            Metric::Dot => -self.constant - (kernels.dot)(&self.weights, codes),
            Metric::L2 => (kernels.l2)(&self.weights, &self.residuals, codes),
        }
    }
}

/// `Σ wᵢ·cᵢ` and `Σ (rᵢ − wᵢ·cᵢ)²` over codes: AVX2 + FMA when the CPU has them.
struct CodedKernels {
    dot: fn(&[f32], &[i8]) -> f32,
    l2: fn(&[f32], &[f32], &[i8]) -> f32,
}

fn coded_kernels() -> &'static CodedKernels {
    static KERNELS: std::sync::OnceLock<CodedKernels> = std::sync::OnceLock::new();
    KERNELS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return CodedKernels {
                // SAFETY: the features were detected just above.
                dot: |w, c| unsafe { avx2::dot(w, c) },
                l2: |w, r, c| unsafe { avx2::l2(w, r, c) },
            };
        }
        CodedKernels {
            dot: portable_dot,
            l2: portable_l2,
        }
    })
}

const LANES: usize = 8;

/// The portable kernels, in eight accumulators the compiler vectorizes.
fn portable_dot(w: &[f32], c: &[i8]) -> f32 {
    let mut acc = [0f32; LANES];
    let n = w.len().min(c.len());
    let full = n / LANES * LANES;
    for base in (0..full).step_by(LANES) {
        for (lane, sum) in acc.iter_mut().enumerate() {
            *sum += w[base + lane] * c[base + lane] as f32;
        }
    }
    acc.iter().sum::<f32>() + (full..n).map(|d| w[d] * c[d] as f32).sum::<f32>()
}

fn portable_l2(w: &[f32], r: &[f32], c: &[i8]) -> f32 {
    let mut acc = [0f32; LANES];
    let n = w.len().min(r.len()).min(c.len());
    let full = n / LANES * LANES;
    let term = |d: usize| {
        let t = r[d] - w[d] * c[d] as f32;
        t * t
    };
    for base in (0..full).step_by(LANES) {
        for (lane, sum) in acc.iter_mut().enumerate() {
            *sum += term(base + lane);
        }
    }
    acc.iter().sum::<f32>() + (full..n).map(term).sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::distance::avx2::horizontal_sum;

    /// Eight codes from `at`, widened to f32.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn codes8(c: &[i8], at: usize) -> __m256 {
        // SAFETY: the caller keeps at + 8 ≤ c.len().
        let bytes = unsafe { _mm_loadl_epi64(c.as_ptr().add(at).cast()) };
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(w: &[f32], c: &[i8]) -> f32 {
        let n = w.len().min(c.len());
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 ≤ n for both slices.
            let weights = unsafe { _mm256_loadu_ps(w.as_ptr().add(i)) };
            acc = _mm256_fmadd_ps(weights, unsafe { codes8(c, i) }, acc);
            i += 8;
        }
        horizontal_sum(acc) + (i..n).map(|d| w[d] * c[d] as f32).sum::<f32>()
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn l2(w: &[f32], r: &[f32], c: &[i8]) -> f32 {
        let n = w.len().min(r.len()).min(c.len());
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 ≤ n for all three slices.
            let (weights, residuals) = unsafe {
                (
                    _mm256_loadu_ps(w.as_ptr().add(i)),
                    _mm256_loadu_ps(r.as_ptr().add(i)),
                )
            };
            let t = _mm256_fnmadd_ps(weights, unsafe { codes8(c, i) }, residuals);
            acc = _mm256_fmadd_ps(t, t, acc);
            i += 8;
        }
        let tail = (i..n)
            .map(|d| (r[d] - w[d] * c[d] as f32).powi(2))
            .sum::<f32>();
        horizontal_sum(acc) + tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn coded_distances_stay_close_to_exact_ones() {
        let mut rng = StdRng::seed_from_u64(1);
        let dim = 37;
        let rows: Vec<Vec<f32>> = (0..500)
            .map(|_| {
                (0..dim)
                    .map(|d| rng.random::<f32>() * (d as f32 + 1.0))
                    .collect()
            })
            .collect();
        let quantizer = ScalarQuantizer::fit(rows.iter().flatten().copied(), dim);
        for metric in [Metric::Cosine, Metric::Dot, Metric::L2] {
            for pair in rows.chunks(2).take(50) {
                let mut codes = Vec::new();
                quantizer.encode(&pair[1], &mut codes);
                let exact = metric.distance(&pair[0], &pair[1]);
                let coded = quantizer.prepare_query(metric, &pair[0]).distance(&codes);
                let scale = exact.abs().max(1.0);
                assert!(
                    (exact - coded).abs() / scale < 0.01,
                    "{metric:?}: {exact} vs {coded}"
                );
            }
        }
    }

    #[test]
    fn dispatched_coded_kernels_agree_with_the_portable_ones() {
        for len in 0..40 {
            let w: Vec<f32> = (0..len).map(|i| (i as f32 * 0.3).sin()).collect();
            let r: Vec<f32> = (0..len).map(|i| (i as f32 * 0.7).cos()).collect();
            let c: Vec<i8> = (0..len).map(|i| ((i * 37) % 256) as u8 as i8).collect();
            let close = |x: f32, y: f32| (x - y).abs() <= 1e-3 * (1.0 + y.abs());
            let kernels = coded_kernels();
            assert!(
                close((kernels.dot)(&w, &c), portable_dot(&w, &c)),
                "dot {len}"
            );
            assert!(
                close((kernels.l2)(&w, &r, &c), portable_l2(&w, &r, &c)),
                "l2 {len}"
            );
        }
    }

    #[test]
    fn values_outside_the_range_are_clamped() {
        let quantizer = ScalarQuantizer::fit([0.0f32, 1.0, 0.5, 0.25].into_iter(), 1);
        let mut codes = Vec::new();
        quantizer.encode(&[-5.0], &mut codes);
        quantizer.encode(&[5.0], &mut codes);
        assert_eq!(codes, vec![-128, 127]);
    }
}
