//! Token sampling: greedy, temperature, top-k, top-p, min-p and repetition penalty,
//! applied in the order transformers applies its logits processors.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How the next token is chosen. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep the `k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `p` (1 = off).
    pub top_p: f32,
    /// Drop tokens below `min_p ×` the top probability (0 = off).
    pub min_p: f32,
    /// Divides positive (multiplies negative) logits of tokens already seen (1 = off).
    pub repetition_penalty: f32,
    /// Seed for reproducible sampling; `None` draws one from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    pub fn validate(&self) -> Result<()> {
        let fail = |msg: String| Err(Error::Sampling(msg));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return fail(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return fail(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return fail(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return fail(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// A sampler with its own random state.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Ok(Self { params, rng })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits`, given the tokens seen so far (for the penalty).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.is_greedy() {
            return argmax(logits);
        }
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .collect();
        let by_logit_desc =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < candidates.len() {
            candidates.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            candidates.truncate(p.top_k);
        }
        candidates.sort_unstable_by(by_logit_desc);
        // Softmax over the remaining candidates.
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates.iter().map(|c| (c.1 - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut cumulative = 0.0;
            for (i, q) in probs.iter().enumerate() {
                cumulative += q;
                if cumulative >= p.top_p {
                    keep = keep.min(i + 1);
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let threshold = p.min_p * probs[0];
            keep = keep.min(probs.iter().take_while(|&&q| q >= threshold).count().max(1));
        }
        let total: f32 = probs[..keep].iter().sum();
        let mut draw = self.rng.random::<f32>() * total;
        for (i, q) in probs[..keep].iter().enumerate() {
            if draw < *q {
                return candidates[i].0;
            }
            draw -= q;
        }
        candidates[keep - 1].0
    }
}

/// Index of the largest value; the lowest index wins ties, like `torch.argmax`.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params).unwrap()
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = sampler(SamplingParams::greedy());
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let params = SamplingParams {
            temperature: 1.5,
            top_k: 1,
            seed: Some(1),
            ..Default::default()
        };
        let mut s = sampler(params);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.5, 0.1, 2.0, 1.9], &[]), 2);
        }
    }

    #[test]
    fn same_seed_same_tokens() {
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(7),
            ..Default::default()
        };
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = || {
            let mut s = sampler(params.clone());
            (0..30)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // p = softmax([ln 1, ln 3]) = [0.25, 0.75]: brute-force frequency over many draws.
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(3),
            ..Default::default()
        };
        let mut s = sampler(params);
        let n = 20_000;
        let ones = (0..n)
            .filter(|_| s.sample(&mut [0.0, 3f32.ln()], &[]) == 1)
            .count();
        let freq = ones as f64 / n as f64;
        assert!((freq - 0.75).abs() < 0.015, "frequency {freq}");
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // probs ≈ [0.665, 0.245, 0.09]: top_p 0.6 keeps only the first.
        let logits = [2.0f32, 1.0, 0.0];
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.6,
            seed: Some(5),
            ..Default::default()
        };
        let mut s = sampler(params);
        assert!((0..200).all(|_| s.sample(&mut logits.clone(), &[]) == 0));
        // min_p 0.3: 0.09 < 0.3·0.665 is dropped, 0.245 kept.
        let params = SamplingParams {
            temperature: 1.0,
            min_p: 0.3,
            seed: Some(5),
            ..Default::default()
        };
        let mut s = sampler(params);
        let draws: Vec<u32> = (0..500)
            .map(|_| s.sample(&mut logits.clone(), &[]))
            .collect();
        assert!(draws.contains(&1) && !draws.contains(&2));
    }

    #[test]
    fn repetition_penalty_matches_transformers_rule() {
        // transformers: score < 0 → score·penalty, else score/penalty.
        let mut s = sampler(SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        });
        let mut logits = [4.0f32, 3.0, -1.0];
        assert_eq!(s.sample(&mut logits, &[0, 2]), 1);
        assert_eq!(logits, [2.0, 3.0, -2.0]);
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        for bad in [
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                min_p: 1.5,
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
        ] {
            assert!(matches!(Sampler::new(bad), Err(Error::Sampling(_))));
        }
    }
}
