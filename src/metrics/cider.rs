//! CIDEr-D as pycocoevalcap 1.2's `cider_scorer.py` (its `Cider` class is
//! CIDEr-D): tf-idf vectors of 1..4-grams, clipped cosine per order, Gaussian
//! length penalty (σ = 6), mean over orders and references, ×10.
//!
//! The document frequencies come from a fixed reference corpus given once to
//! [`CiderD::new`]: for evaluation that is the evaluated split itself (as
//! pycocoevalcap does), for SCST rewards the *training* references, so that
//! every sampled caption is scored against one stable idf table.

use rayon::prelude::*;

use super::ngram::{
    cider_length, count_ngrams, fits, order, Caption, GramKey, Unknowns, Vocab, MAX_N,
};
use super::tokenize::{tokenize_into, Tokenize};
use super::MetricsError;

const SIGMA: f64 = 6.0;

/// Shards of the document-frequency table. Built in parallel, one shard per
/// task, each small enough to stay in cache while it is filled.
const SHARDS: usize = 256;

/// One reference caption: its n-grams are its image's `entries` from the
/// previous caption's `end` to its own.
#[derive(Debug, Clone)]
struct RefVec {
    end: u32,
    norm: [f64; MAX_N],
    length: i64,
}

/// The references of one image. Each distinct n-gram is kept once, with its
/// document frequency and BLEU clipping ceiling; a caption only lists
/// (index, count) pairs into that table, and its tf-idf weights are
/// `count * idf` computed when needed (the same product, so the same bits).
#[derive(Debug, Clone, Default)]
struct ImageGrams<K> {
    /// Distinct n-grams of all the image's references, sorted.
    keys: Vec<K>,
    /// Document frequency of each key.
    df: Vec<u32>,
    /// Highest count of each key in any single reference (BLEU's clip).
    refmax: Vec<u32>,
    /// Per reference, (index into `keys`, count), by index.
    entries: Vec<(u32, u32)>,
    refs: Vec<RefVec>,
}

/// Every image's n-gram tables and the corpus document frequencies, sharded
/// by [`GramKey::spread`] (independent of the hash inside each map).
#[derive(Debug, Clone)]
struct Grams<K> {
    images: Vec<ImageGrams<K>>,
    shards: Vec<Shard<K>>,
}

/// One shard of the document frequencies: an open-addressing table of
/// (key, df) with linear probing, sized to its distinct keys plus a third
/// (a hash map rounds to a power of two and doubles this). The empty slot is
/// the zero key, which no n-gram has. Only n-grams a candidate shares with
/// no reference of its image look here.
#[derive(Debug, Clone, Default)]
struct Shard<K> {
    slots: Vec<(K, u32)>,
}

impl<K: GramKey> Shard<K> {
    fn with_distinct(n: usize) -> Self {
        Shard {
            slots: vec![(K::default(), 0); n + n / 3 + 1],
        }
    }

    #[inline]
    fn home(&self, key: K) -> usize {
        let x = key.spread();
        let h = (x ^ (x >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        ((u128::from(h) * self.slots.len() as u128) >> 64) as usize
    }

    fn insert(&mut self, key: K, df: u32) {
        let mut i = self.home(key);
        while self.slots[i].0 != K::default() {
            i = if i + 1 == self.slots.len() { 0 } else { i + 1 };
        }
        self.slots[i] = (key, df);
    }

    fn get(&self, key: K) -> u32 {
        if self.slots.is_empty() {
            return 0;
        }
        let mut i = self.home(key);
        loop {
            let (k, d) = self.slots[i];
            if k == key {
                return d;
            }
            if k == K::default() {
                return 0;
            }
            i = if i + 1 == self.slots.len() { 0 } else { i + 1 };
        }
    }
}

/// The key width is chosen once from the vocabulary size.
#[derive(Debug, Clone)]
enum Tables {
    Narrow(Grams<u64>),
    Wide(Grams<u128>),
}

/// `ln N` and `ln max(1, df)` for every possible df: the idf factors.
#[derive(Debug, Clone)]
struct Idf {
    log_n: f64,
    ln: Vec<f64>,
}

impl Idf {
    fn new(images: usize) -> Self {
        let ln = (0..=images).map(|d| (d.max(1) as f64).ln()).collect();
        Idf {
            log_n: (images as f64).ln(),
            ln,
        }
    }

    /// `ln N - ln max(1, df)`: the idf factor of a weight.
    #[inline]
    fn of(&self, df: u32) -> f64 {
        self.log_n
            - self
                .ln
                .get(df as usize)
                .copied()
                .unwrap_or_else(|| f64::from(df.max(1)).ln())
    }
}

/// A CIDEr-D scorer over a fixed reference corpus.
#[derive(Debug, Clone)]
pub struct CiderD {
    mode: Tokenize,
    vocab: Vocab,
    idf: Idf,
    tables: Tables,
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
            .map(|caps| {
                caps.iter()
                    .map(|t| Caption::encode(t, mode, |s| vocab.intern(s)))
                    .collect()
            })
            .collect();
        Self::from_captions(vocab, mode, &captions, false)
    }

    /// The scorer of interned reference captions (`wide`: 32-bit limbs even
    /// where 16 would do, for tests).
    pub(crate) fn from_captions(
        vocab: Vocab,
        mode: Tokenize,
        images: &[Vec<Caption>],
        wide: bool,
    ) -> Self {
        let idf = Idf::new(images.len());
        let narrow = u32::try_from(vocab.len()).is_ok_and(|l| l == 0 || fits::<u64>(l - 1));
        let tables = if narrow && !wide {
            Tables::Narrow(Grams::build(images, &idf))
        } else {
            Tables::Wide(Grams::build(images, &idf))
        };
        CiderD {
            mode,
            vocab,
            idf,
            tables,
        }
    }

    /// Number of reference images (N).
    pub fn images(&self) -> usize {
        match &self.tables {
            Tables::Narrow(g) => g.images.len(),
            Tables::Wide(g) => g.images.len(),
        }
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
        Ok(self.score_words(image, &cap.words)?.0)
    }

    /// The core: CIDEr-D of a candidate (token ids, `str.split()` of its
    /// string) for image `image`, and its BLEU clipped counts per order.
    pub(crate) fn score_words(
        &self,
        image: usize,
        words: &[u32],
    ) -> Result<(f64, [u32; MAX_N]), MetricsError> {
        let scored = match &self.tables {
            Tables::Narrow(g) => g.score(image, words, &self.idf),
            Tables::Wide(g) => g.score(image, words, &self.idf),
        };
        scored.ok_or(MetricsError::ImageIndex {
            index: image,
            images: self.images(),
        })
    }
}

impl<K: GramKey> Grams<K> {
    fn build(captions: &[Vec<Caption>], idf: &Idf) -> Self {
        let mut images: Vec<ImageGrams<K>> = captions
            .par_iter()
            .map(|caps| ImageGrams::count(caps))
            .collect();
        let shards = document_frequency(&mut images);
        images.par_iter_mut().for_each(|im| im.weigh(idf));
        Grams { images, shards }
    }

    fn shard(key: K) -> usize {
        (key.spread() >> 40) as usize % SHARDS
    }

    fn df(&self, key: K) -> u32 {
        self.shards[Self::shard(key)].get(key)
    }

    /// CIDEr-D and BLEU clipped counts of a candidate for one image; `None`
    /// for an image out of range.
    fn score(&self, image: usize, words: &[u32], idf: &Idf) -> Option<(f64, [u32; MAX_N])> {
        let im = self.images.get(image)?;
        let (mut keys, mut counts, mut wide) = (Vec::new(), Vec::new(), Vec::new());
        count_ngrams::<K>(words, &mut keys, &mut counts, &mut wide);
        drop(keys);
        let mut norm = [0.0f64; MAX_N];
        let mut correct = [0u32; MAX_N];
        // n-grams the references share: (index, order, weight, idf)
        let mut shared: Vec<(u32, usize, f64, f64)> = Vec::with_capacity(counts.len());
        let mut j = 0;
        for &(key, c) in &counts {
            while j < im.keys.len() && im.keys[j] < key {
                j += 1;
            }
            let o = key.order() - 1;
            let w = if j < im.keys.len() && im.keys[j] == key {
                let f = idf.of(im.df[j]);
                correct[o] += c.min(im.refmax[j]);
                let w = f64::from(c) * f;
                shared.push((j as u32, o, w, f));
                w
            } else {
                f64::from(c) * idf.of(self.df(key))
            };
            norm[o] += w * w;
        }
        for &(key, c) in &wide {
            // an unknown token: in no reference, df 0
            let w = f64::from(c) * idf.of(0);
            norm[order(key) - 1] += w * w;
        }
        let norm = norm.map(f64::sqrt);
        let length = cider_length(words);
        let mut total = [0.0f64; MAX_N];
        let mut start = 0usize;
        for r in &im.refs {
            let entries = &im.entries[start..r.end as usize];
            start = r.end as usize;
            let mut val = [0.0f64; MAX_N];
            let mut e = 0;
            for &(pos, o, wc, f) in &shared {
                while e < entries.len() && entries[e].0 < pos {
                    e += 1;
                }
                if e < entries.len() && entries[e].0 == pos {
                    let wr = f64::from(entries[e].1) * f;
                    val[o] += wc.min(wr) * wr;
                }
            }
            let delta = (length - r.length) as f64;
            // pycocoevalcap writes `np.e**(...)`; pow of e, not exp, to the last bit
            let penalty = std::f64::consts::E.powf(-(delta * delta) / (2.0 * SIGMA * SIGMA));
            for k in 0..MAX_N {
                if norm[k] != 0.0 && r.norm[k] != 0.0 {
                    val[k] /= norm[k] * r.norm[k];
                }
                total[k] += val[k] * penalty;
            }
        }
        let mean = (((total[0] + total[1]) + total[2]) + total[3]) / MAX_N as f64;
        Some((mean / im.refs.len() as f64 * 10.0, correct))
    }
}

impl<K: GramKey> ImageGrams<K> {
    /// Count every reference's n-grams and merge them into one table (the
    /// reference ids all fit `K`: it was chosen from the vocabulary size).
    fn count(caps: &[Caption]) -> Self {
        let (mut scratch, mut wide) = (Vec::new(), Vec::new());
        let counted: Vec<Vec<(K, u32)>> = caps
            .iter()
            .map(|c| {
                let mut counts = Vec::new();
                count_ngrams::<K>(&c.words, &mut scratch, &mut counts, &mut wide);
                counts
            })
            .collect();
        let mut keys: Vec<K> = Vec::new();
        let mut merged: Vec<K> = Vec::new();
        for counts in &counted {
            merge_keys(&keys, counts, &mut merged);
            std::mem::swap(&mut keys, &mut merged);
        }
        let mut refmax = vec![0u32; keys.len()];
        let mut entries = Vec::with_capacity(counted.iter().map(Vec::len).sum());
        let mut refs = Vec::with_capacity(caps.len());
        for (counts, cap) in counted.iter().zip(caps) {
            let mut j = 0;
            for &(key, c) in counts {
                while keys[j] < key {
                    j += 1;
                }
                entries.push((j as u32, c));
                refmax[j] = refmax[j].max(c);
            }
            let end = u32::try_from(entries.len()).unwrap_or(u32::MAX);
            refs.push(RefVec {
                end,
                norm: [0.0; MAX_N],
                length: cider_length(&cap.words),
            });
        }
        let df = vec![0; keys.len()];
        ImageGrams {
            keys,
            df,
            refmax,
            entries,
            refs,
        }
    }

    /// The references' tf-idf norms, once `df` is known.
    fn weigh(&mut self, idf: &Idf) {
        let mut start = 0usize;
        for r in &mut self.refs {
            let mut norm = [0.0f64; MAX_N];
            for &(pos, tf) in &self.entries[start..r.end as usize] {
                let w = f64::from(tf) * idf.of(self.df[pos as usize]);
                norm[self.keys[pos as usize].order() - 1] += w * w;
            }
            r.norm = norm.map(f64::sqrt);
            start = r.end as usize;
        }
    }
}

/// The sorted union of distinct `a` and the keys of sorted `b`, into `out`.
fn merge_keys<K: Ord + Copy>(a: &[K], b: &[(K, u32)], out: &mut Vec<K>) {
    out.clear();
    out.reserve(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j].0) {
            std::cmp::Ordering::Less => {
                out.push(a[i]);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                out.push(b[j].0);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                out.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend(b[j..].iter().map(|e| e.0));
}

/// Per n-gram, the number of images with it in at least one reference,
/// written into every image's `df`; returns the shards for later lookups.
/// Keys go to shards (in parallel, per chunk of images, into buckets sized
/// exactly by a first pass), each shard is counted by sorting and lists the
/// df of its bucket entries in bucket order, and each chunk reads its dfs
/// back by walking its keys again: no positions stored, no vector regrown.
fn document_frequency<K: GramKey>(images: &mut [ImageGrams<K>]) -> Vec<Shard<K>> {
    let chunk = images
        .len()
        .div_ceil(4 * rayon::current_num_threads())
        .max(1);
    let shard = Grams::<K>::shard;
    let buckets: Vec<Vec<Vec<K>>> = images
        .par_chunks(chunk)
        .map(|part| {
            let mut sizes = vec![0usize; SHARDS];
            for k in part.iter().flat_map(|im| &im.keys) {
                sizes[shard(*k)] += 1;
            }
            let mut b: Vec<Vec<K>> = sizes.iter().map(|&n| Vec::with_capacity(n)).collect();
            for &k in part.iter().flat_map(|im| &im.keys) {
                b[shard(k)].push(k);
            }
            b
        })
        .collect();
    // where chunk c's entries start in shard s's list
    let mut starts = vec![vec![0usize; SHARDS]; buckets.len()];
    let mut run = vec![0usize; SHARDS];
    for (c, b) in buckets.iter().enumerate() {
        for s in 0..SHARDS {
            starts[c][s] = run[s];
            run[s] += b[s].len();
        }
    }
    let counted: Vec<(Shard<K>, Vec<u32>)> = (0..SHARDS)
        .into_par_iter()
        .map(|s| {
            // (key, place in bucket order), sorted: runs are the distinct keys
            let mut order: Vec<(K, u32)> = buckets
                .iter()
                .flat_map(|b| &b[s])
                .enumerate()
                .map(|(i, &k)| (k, i as u32))
                .collect();
            order.sort_unstable();
            let mut dfs = vec![0u32; order.len()];
            let mut shard = Shard::with_distinct(order.chunk_by(|a, b| a.0 == b.0).count());
            for run in order.chunk_by(|a, b| a.0 == b.0) {
                let d = run.len() as u32;
                shard.insert(run[0].0, d);
                for &(_, i) in run {
                    dfs[i as usize] = d;
                }
            }
            (shard, dfs)
        })
        .collect();
    drop(buckets);
    images
        .par_chunks_mut(chunk)
        .zip(starts)
        .for_each(|(part, mut cursor)| {
            for im in part {
                for (k, d) in im.keys.iter().zip(im.df.iter_mut()) {
                    let s = shard(*k);
                    *d = counted[s].1[cursor[s]];
                    cursor[s] += 1;
                }
            }
        });
    counted.into_iter().map(|(shard, _)| shard).collect()
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
        let refs = vec![
            vec!["红色连衣裙", "红色长裙"],
            vec!["黑色皮鞋"],
            vec!["白色衬衫"],
        ];
        let c = CiderD::new(&refs, Tokenize::Char);
        let good = c.score_text(0, "红色连衣裙").unwrap_or(f64::NAN);
        let bad = c.score_text(0, "蓝色帽子").unwrap_or(f64::NAN);
        assert!(good > bad && bad >= 0.0, "{good} {bad}");
        assert!(c.score_text(3, "x").is_err());
        let toks = c
            .score(0, &["红", "色", "连", "衣", "裙"])
            .unwrap_or(f64::NAN);
        assert_eq!(toks, good);
    }

    #[test]
    fn narrow_and_wide_keys_score_alike_with_unknown_tokens() {
        let refs = [
            vec!["红色连衣裙", "红色长裙 2023"],
            vec!["黑色皮鞋"],
            vec!["白色衬衫", "白色连衣裙"],
        ];
        let mut vocab = Vocab::default();
        let captions: Vec<Vec<Caption>> = refs
            .iter()
            .map(|caps| {
                caps.iter()
                    .map(|c| {
                        let mut t = Vec::new();
                        tokenize_into(c, Tokenize::Char, &mut t);
                        Caption::encode(&t, Tokenize::Char, |s| vocab.intern(s))
                    })
                    .collect()
            })
            .collect();
        let narrow = CiderD::from_captions(vocab.clone(), Tokenize::Char, &captions, false);
        let wide = CiderD::from_captions(vocab, Tokenize::Char, &captions, true);
        assert!(
            matches!(narrow.tables, Tables::Narrow(_)) && matches!(wide.tables, Tables::Wide(_))
        );
        for (i, cand) in ["红色连衣裙", "白色长裙 2023 猫猫", "猫 猫 猫 狗", ""]
            .iter()
            .enumerate()
        {
            let image = i % refs.len();
            let a = narrow.score_text(image, cand).unwrap_or(f64::NAN);
            let b = wide.score_text(image, cand).unwrap_or(f64::NAN);
            assert_eq!(a.to_bits(), b.to_bits(), "{cand}: {a} vs {b}");
        }
    }
}
