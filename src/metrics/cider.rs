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
    cider_length, count_ngrams, encode_references, fits, order, Caption, GramKey, Unknowns, Vocab,
    MAX_N,
};
use super::tokenize::{tokenize_into, Tokenize};
use super::MetricsError;

const SIGMA: f64 = 6.0;

/// Shards of the document-frequency count while it is built: one task each, each small enough
/// to stay in cache while it is sorted.
const SHARDS: usize = 256;

/// Every reference caption's words, end to end, and the n-grams that more than one image's
/// references hold, with that document frequency.
///
/// Nothing else is kept per image: scoring an image counts its references' n-grams again (the
/// same work preparing them once would do, and an evaluation scores each image once), which
/// keeps the memory of a 10,000-image split to its token ids. An n-gram missing from `common`
/// has df 1 if one of the image's own references holds it and 0 otherwise, and the idf of
/// both is `ln N - ln max(1, df) = ln N`, so the table need not know which. On real splits
/// most 3- and 4-grams are in one image only.
#[derive(Debug, Clone)]
struct Grams<K> {
    /// Token ids of every reference caption.
    words: Vec<u32>,
    /// `words[word_end[c - 1]..word_end[c]]` is caption `c`.
    word_end: Vec<usize>,
    /// Image `i`'s captions are `caption_end[i - 1]..caption_end[i]`.
    caption_end: Vec<usize>,
    common: Common<K>,
}

/// The n-grams of df >= 2, one table per order: scoring looks up every n-gram of an image's
/// references and candidate, and most lookups go to the small tables of unigrams and of long
/// n-grams, which stay in cache, instead of one table the size of all four.
#[derive(Debug, Clone, Default)]
struct Common<K> {
    orders: [Table<K>; MAX_N],
}

impl<K: GramKey> Common<K> {
    /// A table for `keys` (distinct, any order) with their dfs.
    fn new(keys: &[(K, u32)]) -> Self {
        let mut sizes = [0usize; MAX_N];
        for (k, _) in keys {
            sizes[k.order() - 1] += 1;
        }
        let mut orders = sizes.map(Table::with_keys);
        for &(k, df) in keys {
            orders[k.order() - 1].insert(k, df);
        }
        Common { orders }
    }

    /// The df of `key` (of order `o + 1`) if it is 2 or more, else 0.
    #[inline]
    fn get(&self, o: usize, key: K) -> u32 {
        self.orders[o].get(key)
    }
}

/// Open addressing with linear probing, sized to its keys plus a third; the keys apart from
/// their dfs, so probes read 8 bytes a slot. The empty slot is the zero key, which no n-gram has.
#[derive(Debug, Clone, Default)]
struct Table<K> {
    keys: Vec<K>,
    df: Vec<u32>,
}

impl<K: GramKey> Table<K> {
    fn with_keys(n: usize) -> Self {
        let slots = if n == 0 { 0 } else { n + n / 3 + 1 };
        Table {
            keys: vec![K::default(); slots],
            df: vec![0; slots],
        }
    }

    #[inline]
    fn home(&self, key: K) -> usize {
        let x = key.spread();
        let h = (x ^ (x >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        ((u128::from(h) * self.keys.len() as u128) >> 64) as usize
    }

    fn insert(&mut self, key: K, df: u32) {
        let mut i = self.home(key);
        while self.keys[i] != K::default() {
            i = if i + 1 == self.keys.len() { 0 } else { i + 1 };
        }
        self.keys[i] = key;
        self.df[i] = df;
    }

    #[inline]
    fn get(&self, key: K) -> u32 {
        if self.keys.is_empty() {
            return 0;
        }
        let mut i = self.home(key);
        loop {
            let k = self.keys[i];
            if k == key {
                return self.df[i];
            }
            if k == K::default() {
                return 0;
            }
            i = if i + 1 == self.keys.len() { 0 } else { i + 1 };
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
        let (vocab, captions) = encode_references(refs, Vec::as_slice, mode);
        Self::from_captions(vocab, mode, captions, false)
    }

    /// The scorer of interned reference captions (`wide`: 32-bit limbs even
    /// where 16 would do, for tests).
    pub(crate) fn from_captions(
        vocab: Vocab,
        mode: Tokenize,
        images: Vec<Vec<Caption>>,
        wide: bool,
    ) -> Self {
        let idf = Idf::new(images.len());
        let narrow = u32::try_from(vocab.len()).is_ok_and(|l| l == 0 || fits::<u64>(l - 1));
        let tables = if narrow && !wide {
            Tables::Narrow(Grams::build(images))
        } else {
            Tables::Wide(Grams::build(images))
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
            Tables::Narrow(g) => g.images(),
            Tables::Wide(g) => g.images(),
        }
    }

    pub fn tokenize_mode(&self) -> Tokenize {
        self.mode
    }

    pub(crate) fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    /// The token ids (`str.split()` of the fed string) of image `image`'s references.
    pub(crate) fn ref_words(&self, image: usize) -> Option<Vec<&[u32]>> {
        match &self.tables {
            Tables::Narrow(g) => g.refs(image).map(Iterator::collect),
            Tables::Wide(g) => g.refs(image).map(Iterator::collect),
        }
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
    /// The references' words (`captions` is freed before the document frequencies are counted).
    fn build(captions: Vec<Vec<Caption>>) -> Self {
        let total = captions.iter().flatten().map(|c| c.words.len()).sum();
        let mut words = Vec::with_capacity(total);
        let mut word_end = Vec::with_capacity(captions.iter().map(Vec::len).sum());
        let mut caption_end = Vec::with_capacity(captions.len());
        for caps in captions {
            for c in caps {
                words.extend_from_slice(&c.words);
                word_end.push(words.len());
            }
            caption_end.push(word_end.len());
        }
        let mut grams = Grams {
            words,
            word_end,
            caption_end,
            common: Common::default(),
        };
        grams.common = grams.document_frequency();
        grams
    }

    fn images(&self) -> usize {
        self.caption_end.len()
    }

    /// The reference captions of `image`, `None` out of range.
    fn refs(&self, image: usize) -> Option<impl Iterator<Item = &[u32]> + '_> {
        let end = *self.caption_end.get(image)?;
        let start = image.checked_sub(1).map_or(0, |i| self.caption_end[i]);
        Some((start..end).map(|c| {
            let from = c.checked_sub(1).map_or(0, |p| self.word_end[p]);
            &self.words[from..self.word_end[c]]
        }))
    }

    /// The words of the references of `images`, end to end.
    fn refs_span(&self, images: std::ops::Range<usize>) -> &[u32] {
        let caption = |i: usize| i.checked_sub(1).map_or(0, |p| self.caption_end[p]);
        let word = |c: usize| c.checked_sub(1).map_or(0, |p| self.word_end[p]);
        let (from, to) = (caption(images.start), caption(images.end));
        &self.words[word(from)..word(to)]
    }

    /// CIDEr-D and BLEU clipped counts of a candidate for one image; `None`
    /// for an image out of range.
    fn score(&self, image: usize, words: &[u32], idf: &Idf) -> Option<(f64, [u32; MAX_N])> {
        let refs = self.refs(image)?;
        let (mut keys, mut cand, mut wide) = (Vec::new(), Vec::new(), Vec::new());
        count_ngrams::<K>(words, &mut keys, &mut cand, &mut wide);
        // each candidate n-gram's tf-idf weight and idf; its highest count in one reference
        let mut weight: Vec<(f64, f64)> = Vec::with_capacity(cand.len());
        let mut refmax = vec![0u32; cand.len()];
        let mut norm = [0.0f64; MAX_N];
        for &(key, c) in &cand {
            let o = key.order() - 1;
            let f = idf.of(self.common.get(o, key));
            let w = f64::from(c) * f;
            weight.push((w, f));
            norm[o] += w * w;
        }
        for &(key, c) in &wide {
            // an unknown token: in no reference, df 0
            let w = f64::from(c) * idf.of(0);
            norm[order(key) - 1] += w * w;
        }
        let norm = norm.map(f64::sqrt);
        let length = cider_length(words);
        let (mut counts, mut none) = (Vec::new(), Vec::new());
        let mut total = [0.0f64; MAX_N];
        let mut n_refs = 0usize;
        for r in refs {
            n_refs += 1;
            // reference ids always fit `K`: `none` stays empty
            count_ngrams::<K>(r, &mut keys, &mut counts, &mut none);
            let mut val = [0.0f64; MAX_N];
            let mut rnorm = [0.0f64; MAX_N];
            let mut j = 0;
            for &(key, e) in &counts {
                let o = key.order() - 1;
                while j < cand.len() && cand[j].0 < key {
                    j += 1;
                }
                if j < cand.len() && cand[j].0 == key {
                    // the same idf as the candidate's weight of this n-gram
                    let (wc, f) = weight[j];
                    let wr = f64::from(e) * f;
                    val[o] += wc.min(wr) * wr;
                    rnorm[o] += wr * wr;
                    refmax[j] = refmax[j].max(e);
                } else {
                    let wr = f64::from(e) * idf.of(self.common.get(o, key));
                    rnorm[o] += wr * wr;
                }
            }
            let rnorm = rnorm.map(f64::sqrt);
            let delta = (length - cider_length(r)) as f64;
            // pycocoevalcap writes `np.e**(...)`; pow of e, not exp, to the last bit
            let penalty = std::f64::consts::E.powf(-(delta * delta) / (2.0 * SIGMA * SIGMA));
            for k in 0..MAX_N {
                if norm[k] != 0.0 && rnorm[k] != 0.0 {
                    val[k] /= norm[k] * rnorm[k];
                }
                total[k] += val[k] * penalty;
            }
        }
        let mut correct = [0u32; MAX_N];
        for (&(key, c), &m) in cand.iter().zip(&refmax) {
            correct[key.order() - 1] += c.min(m);
        }
        let mean = (((total[0] + total[1]) + total[2]) + total[3]) / MAX_N as f64;
        Some((mean / n_refs as f64 * 10.0, correct))
    }

    /// The distinct n-grams of `image`'s references, sorted, into `out`: per order, every
    /// reference's keys, sorted and deduplicated. Orders occupy disjoint ranges of keys (see
    /// [`count_ngrams`]), so the orders laid end to end are sorted; one sort of the ~100 keys
    /// of an order costs less than counting each reference and merging the five.
    fn distinct(&self, image: usize, out: &mut Vec<K>) {
        out.clear();
        for n in 1..=MAX_N {
            let from = out.len();
            for r in self.refs(image).into_iter().flatten() {
                // reference ids always fit `K`
                out.extend(
                    r.windows(n)
                        .map(|w| w.iter().fold(K::default(), |key, &id| key.push(id))),
                );
            }
            out[from..].sort_unstable();
            let mut kept = from;
            for i in from..out.len() {
                if kept == from || out[i] != out[kept - 1] {
                    out[kept] = out[i];
                    kept += 1;
                }
            }
            out.truncate(kept);
        }
    }

    /// The n-grams held by the references of two images or more, with their counts. Each
    /// image's distinct n-grams go to shards (in parallel, per chunk of images, into buckets
    /// sized exactly by a first pass); each shard is sorted and its runs of two or more kept.
    fn document_frequency(&self) -> Common<K> {
        let n = self.images();
        let chunk = n.div_ceil(4 * rayon::current_num_threads()).max(1);
        let shard = |k: K| (k.spread() >> 40) as usize % SHARDS;
        let buckets: Vec<Vec<Vec<K>>> = (0..n.div_ceil(chunk))
            .into_par_iter()
            .map(|c| {
                let images = c * chunk..((c + 1) * chunk).min(n);
                // at most 4 n-grams a word: reserved once (untouched pages cost nothing), so
                // the list never moves while it grows
                let words = self.refs_span(images.clone()).len();
                let mut all = Vec::with_capacity(4 * words);
                let mut one = Vec::new();
                for image in images {
                    self.distinct(image, &mut one);
                    all.extend_from_slice(&one);
                }
                let mut sizes = vec![0usize; SHARDS];
                for &k in &all {
                    sizes[shard(k)] += 1;
                }
                let mut b: Vec<Vec<K>> = sizes.iter().map(|&s| Vec::with_capacity(s)).collect();
                for k in all {
                    b[shard(k)].push(k);
                }
                b
            })
            .collect();
        let common: Vec<Vec<(K, u32)>> = (0..SHARDS)
            .into_par_iter()
            .map(|s| {
                let mut keys: Vec<K> = buckets.iter().flat_map(|b| &b[s]).copied().collect();
                keys.sort_unstable();
                keys.chunk_by(|a, b| a == b)
                    .filter(|run| run.len() >= 2)
                    .map(|run| (run[0], u32::try_from(run.len()).unwrap_or(u32::MAX)))
                    .collect()
            })
            .collect();
        drop(buckets);
        Common::new(&common.concat())
    }
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
        let narrow = CiderD::from_captions(vocab.clone(), Tokenize::Char, captions.clone(), false);
        let wide = CiderD::from_captions(vocab, Tokenize::Char, captions, true);
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
