//! Token sampling: greedy, temperature, top-k, top-p (nucleus), with a seeded generator so that
//! the same seed and logits always give the same token.

/// SplitMix64: small, fast, and reproducible across platforms.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// The generator for the token sampled at `position` of a sequence seeded with `seed`:
    /// stateless, so a sequence samples the same tokens whether it runs alone, in a batch, or is
    /// preempted and recomputed.
    pub fn for_token(seed: u64, position: usize) -> Self {
        let mut r = Rng::new(seed ^ (position as u64).wrapping_mul(0xA24B_AED4_963E_E407));
        r.next_u64();
        r
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.next_f64().max(f64::MIN_POSITIVE);
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// Sampling parameters of one request.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 disables nucleus filtering.
    pub top_p: f32,
    /// 0 disables top-k filtering.
    pub top_k: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SamplingError {
    #[error("temperature must be a finite number >= 0, got {0}")]
    Temperature(f32),
    #[error("top_p must be in (0, 1], got {0}")]
    TopP(f32),
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        Ok(())
    }
}

/// What changes the logits before sampling, with OpenAI's and vLLM's meanings: a bias per
/// token, penalties on the tokens generated so far (presence: once; frequency: per
/// occurrence), vLLM's repetition penalty on every token seen (prompt and generated: positive
/// logits divided by it, negative ones multiplied), and a minimum number of tokens before EOS
/// or a stop id may be sampled. `Default` changes nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct Penalties {
    /// `(token, bias)`, added to the token's logit; bias in [-100, 100].
    pub logit_bias: Vec<(u32, f32)>,
    /// In [-2, 2].
    pub presence: f32,
    /// In [-2, 2].
    pub frequency: f32,
    /// Greater than 0; 1 is off.
    pub repetition: f32,
    /// EOS and `stop_ids` are masked until this many tokens were generated.
    pub min_tokens: u32,
    /// The tokens `min_tokens` masks (EOS and the request's stop ids).
    pub stop_ids: Vec<u32>,
}

impl Default for Penalties {
    fn default() -> Self {
        Self {
            logit_bias: Vec::new(),
            presence: 0.0,
            frequency: 0.0,
            repetition: 1.0,
            min_tokens: 0,
            stop_ids: Vec::new(),
        }
    }
}

/// Tokens a sequence has seen: every token of the prompt and the output, and how often each
/// was generated.
#[derive(Clone, Debug, Default)]
pub struct SeenTokens {
    pub generated: std::collections::HashMap<u32, u32>,
    pub seen: std::collections::HashSet<u32>,
    /// Tokens generated so far.
    pub num_generated: usize,
}

impl SeenTokens {
    /// Records `token` at `position`; positions from `prompt_len` on are generated.
    pub fn record(&mut self, token: u32, position: usize, prompt_len: usize) {
        self.seen.insert(token);
        if position >= prompt_len {
            *self.generated.entry(token).or_default() += 1;
            self.num_generated += 1;
        }
    }
}

impl Penalties {
    /// Whether any of them changes a logit.
    pub fn is_active(&self) -> bool {
        *self != Self::default()
    }

    /// Checks the ranges (`vocab`: the model's vocabulary size).
    pub fn validate(&self, vocab: usize) -> Result<(), String> {
        let in_range = |v: f32, lo: f32, hi: f32| v.is_finite() && (lo..=hi).contains(&v);
        if !in_range(self.presence, -2.0, 2.0) {
            return Err(format!(
                "presence_penalty must be in [-2, 2], got {}",
                self.presence
            ));
        }
        if !in_range(self.frequency, -2.0, 2.0) {
            return Err(format!(
                "frequency_penalty must be in [-2, 2], got {}",
                self.frequency
            ));
        }
        if !(self.repetition.is_finite() && self.repetition > 0.0) {
            return Err(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition
            ));
        }
        if self.logit_bias.len() > 1024 {
            return Err(format!(
                "logit_bias has {} entries; at most 1024",
                self.logit_bias.len()
            ));
        }
        for &(t, b) in &self.logit_bias {
            if t as usize >= vocab {
                return Err(format!(
                    "logit_bias: token {t} is outside the vocabulary (size {vocab})"
                ));
            }
            if !in_range(b, -100.0, 100.0) {
                return Err(format!(
                    "logit_bias: the bias of token {t} must be in [-100, 100], got {b}"
                ));
            }
        }
        Ok(())
    }

    /// Applies them to one row of logits, for the token that follows `seen`.
    pub fn apply(&self, logits: &mut [f32], seen: &SeenTokens) {
        if self.repetition != 1.0 {
            for &t in &seen.seen {
                if let Some(v) = logits.get_mut(t as usize) {
                    *v = if *v > 0.0 {
                        *v / self.repetition
                    } else {
                        *v * self.repetition
                    };
                }
            }
        }
        if self.presence != 0.0 || self.frequency != 0.0 {
            for (&t, &n) in &seen.generated {
                if let Some(v) = logits.get_mut(t as usize) {
                    *v -= self.presence + self.frequency * n as f32;
                }
            }
        }
        for &(t, b) in &self.logit_bias {
            if let Some(v) = logits.get_mut(t as usize) {
                *v += b;
            }
        }
        if seen.num_generated < self.min_tokens as usize {
            for &t in &self.stop_ids {
                if let Some(v) = logits.get_mut(t as usize) {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// The sampled token and its log-probability under the (temperature-scaled) distribution.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampled {
    pub id: u32,
    pub logprob: f32,
}

/// Index of the largest logit (ties to the lower index).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Log-softmax of one logit at temperature 1.
pub fn logprob_of(logits: &[f32], id: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = logits
        .iter()
        .map(|&v| ((v - max) as f64).exp())
        .sum::<f64>()
        .ln() as f32
        + max;
    logits[id as usize] - lse
}

/// The `n` most likely tokens and their log-probabilities under the model's distribution
/// (temperature 1, no filtering), most likely first, ties to the lower id.
pub fn top_logprobs(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return vec![];
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = logits
        .iter()
        .map(|&v| ((v - max) as f64).exp())
        .sum::<f64>()
        .ln() as f32
        + max;
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let n = n.min(idx.len());
    idx.select_nth_unstable_by(n - 1, |&a, &b| {
        logits[b as usize]
            .partial_cmp(&logits[a as usize])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    let mut top: Vec<u32> = idx[..n].to_vec();
    top.sort_by(|&a, &b| {
        logits[b as usize]
            .partial_cmp(&logits[a as usize])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    top.into_iter()
        .map(|i| (i, logits[i as usize] - lse))
        .collect()
}

/// Samples one token from `logits` (one row).
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut Rng) -> Sampled {
    if p.temperature == 0.0 {
        let id = argmax(logits);
        return Sampled {
            id,
            logprob: logprob_of(logits, id),
        };
    }
    let t = p.temperature as f64;
    let mut cand: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, v as f64 / t))
        .collect();
    cand.sort_by(|a, b| {
        b.1.partial_cmp(&a.1)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.0.cmp(&b.0))
    });
    if p.top_k > 0 && p.top_k < cand.len() {
        cand.truncate(p.top_k);
    }
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand.iter().map(|c| (c.1 - max).exp()).collect();
    // Masked tokens (-inf) have probability 0 and sort last: never a candidate, not even
    // the fallback pick of a rounding shortfall.
    let live = probs.iter().rposition(|&p| p > 0.0).map_or(1, |i| i + 1);
    probs.truncate(live);
    cand.truncate(live);
    let sum: f64 = probs.iter().sum();
    for v in probs.iter_mut() {
        *v /= sum;
    }
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, v) in probs.iter().enumerate() {
            acc += v;
            if acc >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        cand.truncate(keep);
        let s: f64 = probs.iter().sum();
        for v in probs.iter_mut() {
            *v /= s;
        }
    }
    let u = rng.next_f64();
    let mut acc = 0.0;
    let mut pick = probs.len() - 1;
    for (i, v) in probs.iter().enumerate() {
        acc += v;
        if u < acc {
            pick = i;
            break;
        }
    }
    Sampled {
        id: cand[pick].0,
        logprob: probs[pick].ln() as f32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalties_have_their_openai_and_vllm_meanings() {
        let mut seen = SeenTokens::default();
        // Prompt [1, 2], then 3 generated twice and 1 once.
        for (pos, t) in [1u32, 2, 3, 3, 1].into_iter().enumerate() {
            seen.record(t, pos, 2);
        }
        assert_eq!(seen.num_generated, 3);
        let row = vec![1.0f32, 2.0, -2.0, 4.0, 0.5];
        let p = Penalties {
            presence: 0.5,
            frequency: 0.25,
            ..Default::default()
        };
        let mut r = row.clone();
        p.apply(&mut r, &seen);
        // Token 3: generated twice (4 - 0.5 - 2 x 0.25); token 1 once; 2 only in the prompt.
        assert_eq!(r, vec![1.0, 2.0 - 0.75, -2.0, 3.0, 0.5]);
        let p = Penalties {
            repetition: 2.0,
            ..Default::default()
        };
        let mut r = row.clone();
        p.apply(&mut r, &seen);
        // Every token seen (prompt or output): positive halved, negative doubled.
        assert_eq!(r, vec![1.0, 1.0, -4.0, 2.0, 0.5]);
        let p = Penalties {
            logit_bias: vec![(4, 100.0)],
            min_tokens: 4,
            stop_ids: vec![3],
            ..Default::default()
        };
        let mut r = row.clone();
        p.apply(&mut r, &seen);
        assert_eq!(argmax(&r), 4);
        assert_eq!(
            r[3],
            f32::NEG_INFINITY,
            "3 tokens generated: the stop id is masked"
        );
        seen.record(0, 5, 2);
        let mut r = row.clone();
        p.apply(&mut r, &seen);
        assert_eq!(
            r[3], 4.0,
            "the fourth token generated: the stop id is free again"
        );
        assert!(!Penalties::default().is_active());
        assert!(Penalties {
            presence: 3.0,
            ..Default::default()
        }
        .validate(10)
        .is_err());
        assert!(Penalties {
            repetition: 0.0,
            ..Default::default()
        }
        .validate(10)
        .is_err());
        assert!(Penalties {
            logit_bias: vec![(10, 1.0)],
            ..Default::default()
        }
        .validate(10)
        .is_err());
        assert!(Penalties {
            logit_bias: vec![(9, 101.0)],
            ..Default::default()
        }
        .validate(10)
        .is_err());
        assert!(Penalties {
            logit_bias: vec![(9, -100.0)],
            ..Default::default()
        }
        .validate(10)
        .is_ok());
    }

    #[test]
    fn greedy_and_seeded() {
        let logits = vec![0.1, 2.0, 1.9, -1.0, 0.5];
        let g = SamplingParams::default();
        assert_eq!(sample(&logits, &g, &mut Rng::new(1)).id, 1);
        let p = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let a: Vec<u32> = {
            let mut r = Rng::new(7);
            (0..50).map(|_| sample(&logits, &p, &mut r).id).collect()
        };
        let b: Vec<u32> = {
            let mut r = Rng::new(7);
            (0..50).map(|_| sample(&logits, &p, &mut r).id).collect()
        };
        assert_eq!(a, b);
        assert!(
            a.iter().any(|&x| x != 1),
            "temperature 1 should not be greedy"
        );
    }

    #[test]
    fn top_k_and_top_p_restrict_support() {
        let logits = vec![3.0, 2.9, 0.0, -1.0, -2.0];
        let mut r = Rng::new(3);
        let k = SamplingParams {
            temperature: 5.0,
            top_k: 2,
            ..Default::default()
        };
        for _ in 0..200 {
            assert!(sample(&logits, &k, &mut r).id < 2);
        }
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        for _ in 0..200 {
            assert!(sample(&logits, &p, &mut r).id < 2);
        }
        let mut counts = [0usize; 5];
        let f = SamplingParams {
            temperature: 1.0,
            ..Default::default()
        };
        for _ in 0..20000 {
            counts[sample(&logits, &f, &mut r).id as usize] += 1;
        }
        // Empirical frequencies follow the softmax within sampling noise.
        let z: f64 = logits.iter().map(|&v| (v as f64).exp()).sum();
        for i in 0..5 {
            let want = (logits[i] as f64).exp() / z;
            assert!((counts[i] as f64 / 20000.0 - want).abs() < 0.02, "{i}");
        }
    }
}
