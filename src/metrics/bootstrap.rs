//! Uncertainty of corpus scores by resampling images: percentile confidence
//! intervals, and a paired test between two prediction sets on the same
//! references. Both work from per-image records alone ([`ImageScore`]), so
//! reports can run them from the store.
//!
//! # Document frequencies are not recomputed per resample
//!
//! Each resample keeps the CIDEr-D document frequencies of the full evaluated
//! split: a resample's CIDEr-D is the mean of the images' stored scores. A
//! resample draws images with replacement, so recomputing df on it would
//! count a duplicated image's references several times — an idf table no real
//! evaluation ever produces, biased towards the duplicated images' n-grams.
//! The quantity whose sampling variability we estimate is "the mean per-image
//! CIDEr-D under the split's weighting"; the weighting is part of the metric's
//! definition, not a statistic of the sample. (With a split of thousands of
//! images, df moves little between resamples anyway.) BLEU, in contrast, is
//! not a mean of images: each resample re-sums the clipped n-gram counts and
//! lengths and applies the corpus formula again.
//!
//! # Randomness
//!
//! Resample `r` draws its image indices from `ChaCha8Rng::seed_from_u64(seed)`
//! on stream `r`, so results depend on the seed only, not on the thread count.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::ngram::FastMap;
use super::scores::{ImageScore, Metric, Scores};
use super::MetricsError;

/// Coverage of the reported intervals.
pub const LEVEL: f64 = 0.95;

/// A percentile bootstrap interval of one corpus metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub metric: Metric,
    /// The corpus score on all images.
    pub estimate: f64,
    pub low: f64,
    pub high: f64,
}

/// A paired comparison of system A against system B on one metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Paired {
    pub metric: Metric,
    pub a: f64,
    pub b: f64,
    /// `a - b` on all images.
    pub delta: f64,
    /// Percentile interval of the delta.
    pub low: f64,
    pub high: f64,
    /// One-sided p-value of "A is no better than B".
    pub p_value: f64,
}

/// 95% percentile intervals of every corpus metric, from `resamples`
/// resamples of the images.
pub fn confidence_interval(
    images: &[ImageScore],
    resamples: usize,
    seed: u64,
) -> Result<Vec<Interval>, MetricsError> {
    check(images.len(), resamples)?;
    let full = Scores::from_images(images);
    let samples = resample(images.len(), resamples, seed, |idx| {
        let s = Scores::from_sample(images, idx);
        Metric::ALL.map(|m| s.get(m))
    });
    Ok(Metric::ALL
        .iter()
        .enumerate()
        .map(|(k, &metric)| {
            let mut v: Vec<f64> = samples.iter().map(|s| s[k]).collect();
            let (low, high) = percentile_interval(&mut v);
            Interval {
                metric,
                estimate: full.get(metric),
                low,
                high,
            }
        })
        .collect())
}

/// Paired bootstrap of A against B, scored on the same reference images
/// (matched by image id; the two sets must hold the same ids).
///
/// Every resample draws one set of images and scores both systems on it. The
/// p-value tests "A is no better than B" by shifting the bootstrap
/// distribution of the delta to mean zero (Berg-Kirkpatrick et al., 2012):
/// `p = (1 + #{δ* − δ ≥ δ}) / (1 + resamples)`. Identical systems give 1; the
/// smallest possible value is `1 / (1 + resamples)`.
pub fn paired(
    a: &[ImageScore],
    b: &[ImageScore],
    resamples: usize,
    seed: u64,
) -> Result<Vec<Paired>, MetricsError> {
    check(a.len(), resamples)?;
    let b_pos: FastMap<&str, usize> = b
        .iter()
        .enumerate()
        .map(|(i, s)| (s.image_id.as_str(), i))
        .collect();
    if b_pos.len() != a.len() || b.len() != a.len() {
        return Err(MetricsError::ImageSets {
            a: a.len(),
            b: b.len(),
        });
    }
    let b_of_a = a
        .iter()
        .map(|s| {
            b_pos
                .get(s.image_id.as_str())
                .copied()
                .ok_or_else(|| MetricsError::NotInB {
                    id: s.image_id.clone(),
                })
        })
        .collect::<Result<Vec<usize>, _>>()?;
    // B in A's order, so that the result does not depend on how B was listed
    let (full_a, full_b) = (Scores::from_images(a), Scores::from_sample(b, &b_of_a));
    let samples = resample(a.len(), resamples, seed, |idx| {
        let sa = Scores::from_sample(a, idx);
        let idx_b: Vec<usize> = idx.iter().map(|&i| b_of_a[i]).collect();
        let sb = Scores::from_sample(b, &idx_b);
        Metric::ALL.map(|m| sa.get(m) - sb.get(m))
    });
    Ok(Metric::ALL
        .iter()
        .enumerate()
        .map(|(k, &metric)| {
            let delta = full_a.get(metric) - full_b.get(metric);
            let mut v: Vec<f64> = samples.iter().map(|s| s[k]).collect();
            let extreme = v.iter().filter(|&&d| d - delta >= delta).count();
            let p_value = (1 + extreme) as f64 / (1 + resamples) as f64;
            let (low, high) = percentile_interval(&mut v);
            Paired {
                metric,
                a: full_a.get(metric),
                b: full_b.get(metric),
                delta,
                low,
                high,
                p_value,
            }
        })
        .collect())
}

fn check(images: usize, resamples: usize) -> Result<(), MetricsError> {
    if images == 0 {
        return Err(MetricsError::NoImages);
    }
    if resamples == 0 {
        return Err(MetricsError::NoResamples);
    }
    Ok(())
}

/// Run `stat` on `resamples` index draws of `0..n`, in parallel.
fn resample<T: Send>(
    n: usize,
    resamples: usize,
    seed: u64,
    stat: impl Fn(&[usize]) -> T + Sync,
) -> Vec<T> {
    (0..resamples)
        .into_par_iter()
        .map_init(Vec::new, |idx, r| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(r as u64);
            idx.clear();
            idx.extend((0..n).map(|_| rng.gen_range(0..n)));
            stat(idx)
        })
        .collect()
}

/// The (2.5%, 97.5%) quantiles, linearly interpolated (numpy's default).
fn percentile_interval(v: &mut [f64]) -> (f64, f64) {
    v.sort_unstable_by(f64::total_cmp);
    let alpha = (1.0 - LEVEL) / 2.0;
    (quantile(v, alpha), quantile(v, 1.0 - alpha))
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_interpolates_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(quantile(&v, 0.5), 3.0);
        assert!((quantile(&v, 0.025) - 1.1).abs() < 1e-12);
        assert!((quantile(&v, 0.975) - 4.9).abs() < 1e-12);
    }
}
