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

    /// Distance between a prepared f32 query and a coded vector, in the metric's terms.
    #[inline]
    pub fn distance(&self, metric: Metric, query: &[f32], codes: &[i8]) -> f32 {
        let value = |d: usize, c: i8| self.low[d] + self.step[d] * (c as f32 + 128.0);
        match metric {
            Metric::Cosine => 1.0 - self.sum(query, codes, |q, v| q * v, value),
            Metric::Dot => -self.sum(query, codes, |q, v| q * v, value),
            Metric::L2 => self.sum(query, codes, |q, v| (q - v) * (q - v), value),
        }
    }

    /// `Σ term(qᵢ, valueᵢ)` over eight accumulators, like the f32 distances.
    #[inline(always)]
    fn sum(
        &self,
        query: &[f32],
        codes: &[i8],
        term: impl Fn(f32, f32) -> f32,
        value: impl Fn(usize, i8) -> f32,
    ) -> f32 {
        const LANES: usize = 8;
        let mut acc = [0f32; LANES];
        let full = query.len() / LANES * LANES;
        for base in (0..full).step_by(LANES) {
            for (lane, sum) in acc.iter_mut().enumerate() {
                let d = base + lane;
                *sum += term(query[d], value(d, codes[d]));
            }
        }
        let tail: f32 = (full..query.len())
            .map(|d| term(query[d], value(d, codes[d])))
            .sum();
        acc.iter().sum::<f32>() + tail
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
                let coded = quantizer.distance(metric, &pair[0], &codes);
                let scale = exact.abs().max(1.0);
                assert!(
                    (exact - coded).abs() / scale < 0.01,
                    "{metric:?}: {exact} vs {coded}"
                );
            }
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
