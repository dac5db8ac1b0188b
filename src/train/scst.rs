//! Self-critical sequence training (Rennie et al., 2017, "Self-critical Sequence Training for Image
//! Captioning"): the `cider-optimize` stage's loss.
//!
//! For each image of a micro-batch the policy samples k captions; each sample's reward (CIDEr-D against
//! the image's references in the real stage) minus a baseline is its advantage, and the loss is
//! `-mean(advantage * log p(sample))`, a REINFORCE estimate whose baseline needs no critic:
//! - [`Baseline::Greedy`]: the reward of the policy's own greedy caption (the paper's choice);
//! - [`Baseline::Mean`]: the mean reward of the image's *other* k-1 samples (leave-one-out, so the
//!   baseline does not depend on the sample it is subtracted from and the estimate stays unbiased).
//!
//! Diversity regulariser (optional, `diversity_weight` w): sampled captions of one image tend to collapse
//! onto the same phrase under CIDEr optimisation. Each sample gets an overlap score, the mean Jaccard
//! similarity of its set of unigrams and bigrams with those of the image's other samples; the advantage
//! becomes `(r_i - b_i) - w * (o_i - mean_j o_j)`. Centring the penalty among the k samples keeps it from
//! shifting all advantages of an image together (it only ranks samples by how much they repeat the
//! others), so it changes which samples are reinforced, not the overall push.
//!
//! The policy is a trait so the loop is tested here on a toy categorical policy and driven by the real
//! captioner in the stage. Sampling and greedy decoding should run on detached weights (no autograd graph);
//! only [`Policy::log_probs`] builds one.

use std::collections::HashSet;

use candle_core::Tensor;
use rand::seq::index;
use rand_chacha::ChaCha8Rng;

pub use super::config::Baseline;
use super::config::ScstConfig;
use super::trainer::{Micro, StepCtx};
use super::{BoxError, Result, TrainError};

/// How the policy samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleOpts {
    /// Captions per image.
    pub k: usize,
    pub temperature: f64,
    pub max_len: usize,
}

/// A captioning policy as SCST needs it. Image arguments are data-set indices.
pub trait Policy {
    /// `k` sampled token sequences per image, drawn with `rng`: `out[i]` holds the k samples of
    /// `images[i]`.
    fn sample(
        &mut self,
        images: &[usize],
        opts: &SampleOpts,
        rng: &mut ChaCha8Rng,
    ) -> std::result::Result<Vec<Vec<Vec<u32>>>, BoxError>;

    /// The greedy caption of each image.
    fn greedy(
        &mut self,
        images: &[usize],
        max_len: usize,
    ) -> std::result::Result<Vec<Vec<u32>>, BoxError>;

    /// Log-probability (summed over tokens, end token included if the policy emits one) of `seqs[i]`
    /// given `images[i]`, with its autograd graph; shape `[seqs.len()]`.
    fn log_probs(
        &mut self,
        images: &[usize],
        seqs: &[Vec<u32>],
    ) -> std::result::Result<Tensor, BoxError>;
}

/// What one SCST micro-batch measured, besides its loss.
#[derive(Debug, Clone, PartialEq)]
pub struct ScstStats {
    /// Mean reward of the samples (before the diversity term).
    pub mean_reward: f64,
    /// Mean reward of the greedy captions (greedy baseline only).
    pub greedy_reward: Option<f64>,
    /// Mean pairwise unigram+bigram Jaccard overlap among an image's samples (1: all identical).
    pub overlap: f64,
}

fn ngram_set(seq: &[u32]) -> HashSet<(u32, Option<u32>)> {
    let mut s: HashSet<_> = seq.iter().map(|&t| (t, None)).collect();
    s.extend(seq.windows(2).map(|w| (w[0], Some(w[1]))));
    s
}

/// Jaccard similarity of the unigram+bigram sets of two sequences (two empty sequences: 1).
pub fn overlap(a: &[u32], b: &[u32]) -> f64 {
    let (sa, sb) = (ngram_set(a), ngram_set(b));
    let union = sa.union(&sb).count();
    if union == 0 {
        return 1.0;
    }
    sa.intersection(&sb).count() as f64 / union as f64
}

/// Per sample, its mean overlap with the other samples of the same image (0 when k = 1).
fn overlap_scores(samples: &[Vec<u32>]) -> Vec<f64> {
    let k = samples.len();
    if k < 2 {
        return vec![0.0; k];
    }
    let mut o = vec![0.0; k];
    for i in 0..k {
        for j in (i + 1)..k {
            let x = overlap(&samples[i], &samples[j]);
            o[i] += x;
            o[j] += x;
        }
    }
    o.iter_mut().for_each(|x| *x /= (k - 1) as f64);
    o
}

/// `n` distinct image indices out of `0..n_images` (all of them, shuffled, if fewer), drawn with `rng`.
pub fn draw_images(n_images: usize, n: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    index::sample(rng, n_images, n.min(n_images)).into_vec()
}

/// The SCST loss of one micro-batch of `images`.
pub fn scst_loss<P, R>(
    policy: &mut P,
    images: &[usize],
    cfg: &ScstConfig,
    reward: &R,
    rng: &mut ChaCha8Rng,
) -> Result<(Micro, ScstStats)>
where
    P: Policy + ?Sized,
    R: Fn(usize, &[u32]) -> f64,
{
    let policy_err = |source| TrainError::Policy { source };
    let k = cfg.samples;
    let opts = SampleOpts {
        k,
        temperature: cfg.temperature,
        max_len: cfg.max_len,
    };
    let samples = policy.sample(images, &opts, rng).map_err(policy_err)?;
    if samples.len() != images.len() || samples.iter().any(|s| s.len() != k) {
        return Err(TrainError::Policy {
            source: format!(
                "sample returned the wrong number of sequences (want {} x {k})",
                images.len()
            )
            .into(),
        });
    }
    let greedy = match cfg.baseline {
        Baseline::Greedy => {
            let g = policy.greedy(images, cfg.max_len).map_err(policy_err)?;
            if g.len() != images.len() {
                return Err(TrainError::Policy {
                    source: "greedy returned the wrong number of sequences".into(),
                });
            }
            Some(
                images
                    .iter()
                    .zip(&g)
                    .map(|(&i, s)| reward(i, s))
                    .collect::<Vec<f64>>(),
            )
        }
        Baseline::Mean => None,
    };

    let n = images.len() * k;
    let mut adv = Vec::with_capacity(n);
    let mut flat_images = Vec::with_capacity(n);
    let mut flat_seqs = Vec::with_capacity(n);
    let (mut reward_sum, mut overlap_sum) = (0.0, 0.0);
    for (b, (&img, seqs)) in images.iter().zip(samples).enumerate() {
        let r: Vec<f64> = seqs.iter().map(|s| reward(img, s)).collect();
        let total: f64 = r.iter().sum();
        reward_sum += total;
        let o = overlap_scores(&seqs);
        let o_mean = o.iter().sum::<f64>() / k as f64;
        overlap_sum += o_mean;
        for (j, seq) in seqs.into_iter().enumerate() {
            let base = match &greedy {
                Some(g) => g[b],
                None => (total - r[j]) / (k - 1).max(1) as f64,
            };
            let div = if cfg.diversity_weight > 0.0 {
                cfg.diversity_weight * (o[j] - o_mean)
            } else {
                0.0
            };
            adv.push((r[j] - base - div) as f32);
            flat_images.push(img);
            flat_seqs.push(seq);
        }
    }
    let logp = policy
        .log_probs(&flat_images, &flat_seqs)
        .map_err(policy_err)?;
    if logp.dims() != [n] {
        return Err(TrainError::Policy {
            source: format!("log_probs returned shape {:?}, want [{n}]", logp.dims()).into(),
        });
    }
    let adv = Tensor::from_vec(adv, n, logp.device())?.to_dtype(logp.dtype())?;
    let loss = (logp * adv)?.mean_all()?.neg()?;
    let stats = ScstStats {
        mean_reward: reward_sum / n.max(1) as f64,
        greedy_reward: greedy.map(|g| g.iter().sum::<f64>() / g.len().max(1) as f64),
        overlap: overlap_sum / images.len().max(1) as f64,
    };
    Ok((
        Micro::new(loss, images.len()).with_reward(stats.mean_reward),
        stats,
    ))
}

/// A loss closure for [`super::Trainer::fit`]: each micro-batch draws `cfg.batch_size` images out of
/// `0..n_images` with the loop's rng and returns their SCST loss; the curves get the mean sample reward.
pub fn scst_closure<'a, P, R>(
    policy: &'a mut P,
    n_images: usize,
    cfg: &'a ScstConfig,
    reward: R,
) -> impl FnMut(&mut StepCtx<'_>) -> std::result::Result<Micro, BoxError> + 'a
where
    P: Policy + ?Sized,
    R: Fn(usize, &[u32]) -> f64 + 'a,
{
    move |ctx: &mut StepCtx<'_>| {
        let images = draw_images(n_images, cfg.batch_size, ctx.rng);
        let (micro, _) = scst_loss(policy, &images, cfg, &reward, ctx.rng)?;
        Ok(micro)
    }
}

#[cfg(test)]
mod tests {
    use super::{overlap, overlap_scores};

    #[test]
    fn overlap_is_jaccard_of_unigrams_and_bigrams() {
        assert_eq!(overlap(&[1, 2, 3], &[1, 2, 3]), 1.0);
        assert_eq!(overlap(&[1, 2], &[3, 4]), 0.0);
        // {1,2,(1,2)} vs {1,3,(1,3)}: one shared of five
        assert!((overlap(&[1, 2], &[1, 3]) - 0.2).abs() < 1e-12);
        assert_eq!(overlap(&[], &[]), 1.0);
    }

    #[test]
    fn overlap_scores_single_out_the_odd_sample() {
        let s = overlap_scores(&[vec![1, 2], vec![1, 2], vec![5, 6]]);
        assert!(s[0] > s[2] && s[1] > s[2]);
        assert_eq!(overlap_scores(&[vec![1]]), vec![0.0]);
    }
}
