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
    df: DocFreq,
    log_n: f64,
    images: Vec<Vec<RefVec>>,
}

/// Shards of the document-frequency table. Built in parallel, one shard per
/// task, each small enough to stay in cache while it is filled.
const SHARDS: usize = 256;

/// Document frequencies: n-gram -> number of images with it in a reference,
/// sharded by a hash independent of the one inside each map.
#[derive(Debug, Clone)]
struct DocFreq {
    shards: Vec<FastMap<Key, u32>>,
    /// `ln(max(1, df))` for every possible df (0..=N).
    ln: Vec<f64>,
}

impl DocFreq {
    fn shard(key: Key) -> usize {
        let x = (key as u64) ^ ((key >> 64) as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
        (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as usize % SHARDS
    }

    fn get(&self, key: Key) -> u32 {
        self.shards[Self::shard(key)].get(&key).copied().unwrap_or(0)
    }

    /// `ln N - ln max(1, df)`: the idf factor of a weight.
    fn idf(&self, log_n: f64, df: u32) -> f64 {
        log_n - self.ln.get(df as usize).copied().unwrap_or_else(|| f64::from(df.max(1)).ln())
    }
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
        Self::from_counts(vocab, mode, counts)
    }

    /// Consumes the counts: at 10k images they are hundreds of MB.
    pub(crate) fn from_counts(vocab: Vocab, mode: Tokenize, images: Vec<Vec<RefCounts>>) -> Self {
        let log_n = (images.len() as f64).ln();
        // per image, the n-grams of all its references, sorted and distinct
        let unions: Vec<Vec<Key>> = images
            .par_iter()
            .map(|refs| {
                let mut keys: Vec<Key> = refs.iter().flat_map(|r| r.counts.iter().map(|e| e.0)).collect();
                keys.sort_unstable();
                keys.dedup();
                keys
            })
            .collect();
        let (df, dfs) = document_frequency(&unions, images.len());
        let images = images
            .into_par_iter()
            .zip(unions)
            .zip(dfs)
            .map(|((refs, union), dfs)| {
                refs.into_iter()
                    .map(|r| {
                        let (grams, norm) = weigh_known(&r.counts, &union, &dfs, &df, log_n);
                        RefVec { grams, norm, length: r.length }
                    })
                    .collect()
            })
            .collect();
        CiderD { mode, vocab, df, log_n, images }
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
        let (grams, norm) = weigh(counts, |k| self.df.idf(self.log_n, self.df.get(k)));
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

/// Per n-gram, the number of images with it in at least one reference
/// (`unions`: each image's distinct reference n-grams), and that number for
/// every entry of `unions`. Keys go to shards (in parallel, per chunk of
/// images), each shard is counted on its own, and counts are written back
/// to the union entries from the shard while it is hot in cache.
fn document_frequency(unions: &[Vec<Key>], n_images: usize) -> (DocFreq, Vec<Vec<u32>>) {
    let chunk = unions.len().div_ceil(4 * rayon::current_num_threads()).max(1);
    // per chunk and shard: keys, and where each came from (image, position)
    type Bucket = (Vec<Key>, Vec<(u32, u32)>);
    let buckets: Vec<Vec<Bucket>> = unions
        .par_chunks(chunk)
        .enumerate()
        .map(|(c, part)| {
            let mut b: Vec<Bucket> = vec![(Vec::new(), Vec::new()); SHARDS];
            for (i, union) in part.iter().enumerate() {
                let image = (c * chunk + i) as u32;
                for (pos, &k) in union.iter().enumerate() {
                    let s = &mut b[DocFreq::shard(k)];
                    s.0.push(k);
                    s.1.push((image, pos as u32));
                }
            }
            b
        })
        .collect();
    let counted: Vec<(FastMap<Key, u32>, Vec<((u32, u32), u32)>)> = (0..SHARDS)
        .into_par_iter()
        .map(|s| {
            let cap = buckets.iter().map(|b| b[s].0.len()).sum();
            let mut map: FastMap<Key, u32> = FastMap::with_capacity_and_hasher(cap, Default::default());
            for &k in buckets.iter().flat_map(|b| &b[s].0) {
                *map.entry(k).or_insert(0) += 1;
            }
            let back = buckets
                .iter()
                .flat_map(|b| b[s].0.iter().zip(&b[s].1))
                .map(|(k, &at)| (at, map.get(k).copied().unwrap_or(0)))
                .collect();
            (map, back)
        })
        .collect();
    drop(buckets);
    let mut dfs: Vec<Vec<u32>> = unions.iter().map(|u| vec![0; u.len()]).collect();
    let mut shards = Vec::with_capacity(SHARDS);
    for (map, back) in counted {
        for ((image, pos), d) in back {
            dfs[image as usize][pos as usize] = d;
        }
        shards.push(map);
    }
    let ln = (0..=n_images).map(|d| (d.max(1) as f64).ln()).collect();
    (DocFreq { shards, ln }, dfs)
}

/// tf-idf weights (sorted like `counts`) and per-order norms.
fn weigh(counts: &[(Key, u32)], mut idf: impl FnMut(Key) -> f64) -> (Vec<(Key, f64)>, [f64; MAX_N]) {
    let mut norm = [0.0f64; MAX_N];
    let grams = counts
        .iter()
        .map(|&(key, tf)| {
            let w = f64::from(tf) * idf(key);
            norm[order(key) - 1] += w * w;
            (key, w)
        })
        .collect();
    (grams, norm.map(f64::sqrt))
}

/// [`weigh`] for a reference, whose n-grams all lie in the sorted `union`
/// with known frequencies `dfs`: a merge instead of hash lookups.
fn weigh_known(
    counts: &[(Key, u32)],
    union: &[Key],
    dfs: &[u32],
    df: &DocFreq,
    log_n: f64,
) -> (Vec<(Key, f64)>, [f64; MAX_N]) {
    let mut j = 0;
    weigh(counts, |key| {
        while j < union.len() && union[j] < key {
            j += 1;
        }
        let d = if union.get(j) == Some(&key) { dfs[j] } else { df.get(key) };
        df.idf(log_n, d)
    })
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
