//! BLEU-1..4 as pycocoevalcap 1.2's `bleu_scorer.py` computes it with
//! `option='closest'`. An image contributes integer counts; the corpus score
//! is a function of their sums, which is why [`BleuCounts`] is what the
//! per-image records keep (a bootstrap resample just sums them again).

use serde::{Deserialize, Serialize};

use super::ngram::MAX_N;

const TINY: f64 = 1e-15;
const SMALL: f64 = 1e-9;

/// What one image adds to corpus BLEU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BleuCounts {
    /// Candidate length in tokens.
    pub testlen: u32,
    /// Length of the reference closest to `testlen` (ties to the shorter).
    pub reflen: u32,
    /// Candidate n-grams per order: `max(0, testlen - n + 1)`.
    pub guess: [u32; MAX_N],
    /// Candidate n-grams per order clipped by their most frequent count in any
    /// single reference.
    pub correct: [u32; MAX_N],
}

/// Sums of [`BleuCounts`] over a (re)sampled corpus.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BleuTotals {
    pub testlen: u64,
    pub reflen: u64,
    pub guess: [u64; MAX_N],
    pub correct: [u64; MAX_N],
}

impl BleuTotals {
    pub fn add(&mut self, c: &BleuCounts) {
        self.testlen += u64::from(c.testlen);
        self.reflen += u64::from(c.reflen);
        for k in 0..MAX_N {
            self.guess[k] += u64::from(c.guess[k]);
            self.correct[k] += u64::from(c.correct[k]);
        }
    }

    /// Corpus BLEU-1..4.
    pub fn bleu(&self) -> [f64; MAX_N] {
        let correct = self.correct.map(|c| c as f64);
        let guess = self.guess.map(|g| g as f64);
        bleu_from(self.testlen as f64, self.reflen as f64, &correct, &guess)
    }
}

impl BleuCounts {
    /// pycocoevalcap's per-image BLEU-1..4 (its `bleu_list`).
    pub fn bleu(&self) -> [f64; MAX_N] {
        let correct = self.correct.map(f64::from);
        let guess = self.guess.map(f64::from);
        bleu_from(
            f64::from(self.testlen),
            f64::from(self.reflen),
            &correct,
            &guess,
        )
    }
}

/// The shared formula: cumulative product of smoothed precisions, k-th root,
/// brevity penalty `exp(1 - 1/ratio)` when the ratio is below one.
fn bleu_from(
    testlen: f64,
    reflen: f64,
    correct: &[f64; MAX_N],
    guess: &[f64; MAX_N],
) -> [f64; MAX_N] {
    let mut out = [0.0; MAX_N];
    let mut product = 1.0;
    for k in 0..MAX_N {
        product *= (correct[k] + TINY) / (guess[k] + SMALL);
        out[k] = product.powf(1.0 / (k + 1) as f64);
    }
    let ratio = (testlen + TINY) / (reflen + SMALL);
    if ratio < 1.0 {
        let bp = (1.0 - 1.0 / ratio).exp();
        for v in &mut out {
            *v *= bp;
        }
    }
    out
}

/// The counts of one candidate of `testlen` tokens whose n-grams, clipped by
/// their most frequent count in any single reference, match `correct` times
/// per order; `reflens` are the reference lengths.
pub fn image_counts(testlen: usize, reflens: &[u32], correct: [u32; MAX_N]) -> BleuCounts {
    let testlen = u32::try_from(testlen).unwrap_or(u32::MAX);
    let reflen = reflens
        .iter()
        .copied()
        .min_by_key(|&l| (l.abs_diff(testlen), l))
        .unwrap_or(0);
    let mut guess = [0u32; MAX_N];
    for (k, g) in guess.iter_mut().enumerate() {
        *g = testlen.saturating_sub(k as u32);
    }
    BleuCounts {
        testlen,
        reflen,
        guess,
        correct,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_reference_length_ties_to_the_shorter() {
        let c = image_counts(5, &[3, 7, 9], [0; MAX_N]);
        assert_eq!(c.reflen, 3);
        let c = image_counts(6, &[9, 7, 4], [0; MAX_N]);
        assert_eq!(c.reflen, 7);
        assert_eq!(c.guess, [6, 5, 4, 3]);
    }

    #[test]
    fn empty_candidate_scores_zero() {
        let c = image_counts(0, &[4], [0; MAX_N]);
        assert!(c.bleu().iter().all(|&b| b == 0.0));
    }
}
