//! CIDEr-D as pycocoevalcap 1.2's `cider_scorer.py` (its `Cider` class is
//! CIDEr-D): tf-idf vectors of 1..4-grams, clipped cosine per order, Gaussian
//! length penalty (σ = 6), mean over orders and references, ×10.
//!
//! The document frequencies come from a fixed reference corpus given once to
//! [`CiderD::new`]: for evaluation that is the evaluated split itself (as
//! pycocoevalcap does), for SCST rewards the *training* references, so that
//! every sampled caption is scored against one stable idf table.

use rayon::prelude::*;

use super::ngram::{cider_length, count_ngrams, order, Caption, FastMap, Key, Unknowns, Vocab, MAX_N};
use super::tokenize::{tokenize_into, Tokenize};
use super::MetricsError;

const SIGMA: f64 = 6.0;

/// One reference caption as a tf-idf vector.
#[derive(Debug, Clone)]
struct RefVec {
    /// (n-gram, weight), sorted by n-gram.
    grams: Vec<(Key, f64)>,
    norm: [f64; MAX_N],
    length: i64,
}

/// A CIDEr-D scorer over a fixed reference corpus.
#[derive(Debug, Clone)]
pub struct CiderD {
    mode: Tokenize,
    vocab: Vocab,
    /// `ln N - ln max(1, df)` for every n-gram seen in some reference; an
    /// n-gram seen in none weighs `ln N`.
    idf: FastMap<Key, f64>,
    log_n: f64,
    images: Vec<Vec<RefVec>>,
}

/// N-gram counts of one reference caption, as the corpus builder keeps them.
pub(crate) struct RefCounts {
    pub counts: Vec<(Key, u32)>,
    pub length: i64,
}

impl RefCounts {
    pub fn of(caption: &Caption) -> Self {
        let mut counts = Vec::new();
        count_ngrams(&caption.words, &mut counts);
        RefCounts { counts, length: cider_length(&caption.words) }
    }
}

impl CiderD {
    /// A scorer whose references (and document frequencies) are `refs`: one
    /// entry per image, each a list of reference captions, each caption as
    /// text, tokenized with `mode`. N is the number of images.
    pub fn new<S: AsRef<str> + Sync>(refs: &[Vec<S>], mode: Tokenize) -> Self {
        let tokens: Vec<Vec<Vec<&str>>> = refs
            .par_iter()
            .map(|caps| {
                caps.iter()
                    .map(|c| {
                        let mut t = Vec::new();
                        tokenize_into(c.as_ref(), mode, &mut t);
                        t
                    })
                    .collect()
            })
            .collect();
        let mut vocab = Vocab::default();
        let captions: Vec<Vec<Caption>> = tokens
            .iter()
            .map(|caps| caps.iter().map(|t| Caption::encode(t, mode, |s| vocab.intern(s))).collect())
            .collect();
        let counts: Vec<Vec<RefCounts>> = captions
            .par_iter()
            .map(|caps| caps.iter().map(RefCounts::of).collect())
            .collect();
        Self::from_counts(vocab, mode, &counts)
    }

    pub(crate) fn from_counts(vocab: Vocab, mode: Tokenize, images: &[Vec<RefCounts>]) -> Self {
        let log_n = (images.len() as f64).ln();
        let df = document_frequency(images);
        let idf: FastMap<Key, f64> = df
            .into_iter()
            .map(|(k, d)| (k, log_n - f64::from(d.max(1)).ln()))
            .collect();
        let images = images
            .par_iter()
            .map(|refs| {
                refs.iter()
                    .map(|r| {
                        let (grams, norm) = weigh(&r.counts, &idf, log_n);
                        RefVec { grams, norm, length: r.length }
                    })
                    .collect()
            })
            .collect();
        CiderD { mode, vocab, idf, log_n, images }
    }

    /// Number of reference images (N).
    pub fn images(&self) -> usize {
        self.images.len()
    }

    pub fn tokenize_mode(&self) -> Tokenize {
        self.mode
    }

    pub(crate) fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    /// CIDEr-D of a caption (raw text, tokenized with this scorer's mode)
    /// for reference image `image`.
    pub fn score_text(&self, image: usize, text: &str) -> Result<f64, MetricsError> {
        let mut tokens = Vec::new();
        tokenize_into(text, self.mode, &mut tokens);
        self.score(image, &tokens)
    }

    /// CIDEr-D of an already tokenized caption for reference image `image`.
    pub fn score<S: AsRef<str>>(&self, image: usize, candidate: &[S]) -> Result<f64, MetricsError> {
        let tokens: Vec<&str> = candidate.iter().map(AsRef::as_ref).collect();
        let mut unknown = Unknowns::new(&self.vocab);
        // pre-tokenized input may carry anything: split it as pycocoevalcap would
        let cap = Caption::encode(&tokens, Tokenize::Space, |t| unknown.id(&self.vocab, t));
        let mut counts = Vec::new();
        count_ngrams(&cap.words, &mut counts);
        self.score_counts(image, &counts, cider_length(&cap.words))
    }

    /// The core: a candidate's sorted n-gram counts and bigram length.
    pub(crate) fn score_counts(&self, image: usize, counts: &[(Key, u32)], length: i64) -> Result<f64, MetricsError> {
        let refs = self
            .images
            .get(image)
            .ok_or(MetricsError::ImageIndex { index: image, images: self.images.len() })?;
        let (grams, norm) = weigh(counts, &self.idf, self.log_n);
        let mut total = [0.0f64; MAX_N];
        for r in refs {
            let sim = similarity(&grams, &norm, length, r);
            for k in 0..MAX_N {
                total[k] += sim[k];
            }
        }
        let mean = (((total[0] + total[1]) + total[2]) + total[3]) / MAX_N as f64;
        Ok(mean / refs.len() as f64 * 10.0)
    }
}

/// Per n-gram, the number of images with it in at least one reference.
fn document_frequency(images: &[Vec<RefCounts>]) -> FastMap<Key, u32> {
    images
        .par_iter()
        .fold(FastMap::default, |mut df: FastMap<Key, u32>, refs| {
            let mut keys: Vec<Key> = refs.iter().flat_map(|r| r.counts.iter().map(|e| e.0)).collect();
            keys.sort_unstable();
            keys.dedup();
            for k in keys {
                *df.entry(k).or_insert(0) += 1;
            }
            df
        })
        .reduce(FastMap::default, |mut a, b| {
            let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, std::mem::take(&mut a)) };
            for (k, d) in small {
                *big.entry(k).or_insert(0) += d;
            }
            big
        })
}

/// tf-idf weights (sorted like `counts`) and per-order norms.
fn weigh(counts: &[(Key, u32)], idf: &FastMap<Key, f64>, log_n: f64) -> (Vec<(Key, f64)>, [f64; MAX_N]) {
    let mut norm = [0.0f64; MAX_N];
    let grams = counts
        .iter()
        .map(|&(key, tf)| {
            let w = f64::from(tf) * idf.get(&key).copied().unwrap_or(log_n);
            norm[order(key) - 1] += w * w;
            (key, w)
        })
        .collect();
    (grams, norm.map(f64::sqrt))
}

/// Clipped cosine per order with the length penalty, against one reference.
fn similarity(grams: &[(Key, f64)], norm: &[f64; MAX_N], length: i64, r: &RefVec) -> [f64; MAX_N] {
    let mut val = [0.0f64; MAX_N];
    let mut j = 0;
    for &(key, wc) in grams {
        while j < r.grams.len() && r.grams[j].0 < key {
            j += 1;
        }
        if j < r.grams.len() && r.grams[j].0 == key {
            let wr = r.grams[j].1;
            val[order(key) - 1] += wc.min(wr) * wr;
        }
    }
    let delta = (length - r.length) as f64;
    // pycocoevalcap writes `np.e**(...)`; pow of e, not exp, to the last bit
    let penalty = std::f64::consts::E.powf(-(delta * delta) / (2.0 * SIGMA * SIGMA));
    for k in 0..MAX_N {
        if norm[k] != 0.0 && r.norm[k] != 0.0 {
            val[k] /= norm[k] * r.norm[k];
        }
        val[k] *= penalty;
    }
    val
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_image_scores_zero() {
        let c = CiderD::new(&[vec!["红色连衣裙"]], Tokenize::Char);
        assert_eq!(c.score_text(0, "红色连衣裙").ok(), Some(0.0));
    }

    #[test]
    fn a_reference_outscores_a_stranger_and_bad_index_is_an_error() {
        let refs = vec![vec!["红色连衣裙", "红色长裙"], vec!["黑色皮鞋"], vec!["白色衬衫"]];
        let c = CiderD::new(&refs, Tokenize::Char);
        let good = c.score_text(0, "红色连衣裙").unwrap_or(f64::NAN);
        let bad = c.score_text(0, "蓝色帽子").unwrap_or(f64::NAN);
        assert!(good > bad && bad >= 0.0, "{good} {bad}");
        assert!(c.score_text(3, "x").is_err());
        let toks = c.score(0, &["红", "色", "连", "衣", "裙"]).unwrap_or(f64::NAN);
        assert_eq!(toks, good);
    }
}
