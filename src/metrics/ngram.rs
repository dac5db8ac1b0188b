//! Interned tokens and packed n-gram keys: the representation BLEU, ROUGE-L
//! and CIDEr-D work on once tokenization is done. Tokens become `u32` ids and
//! an n-gram (n <= 4) becomes one integer holding its ids ([`GramKey`]), so
//! counting and matching never hash or compare strings.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::tokenize::{is_py_space, Tokenize};

/// Highest n-gram order of BLEU and CIDEr-D.
pub const MAX_N: usize = 4;

/// An n-gram of up to four token ids packed into one integer: each limb holds
/// `id + 1`, lowest limb last token, so limbs of shorter n-grams are zero and
/// orders never collide. `u64` (16-bit limbs) serves vocabularies under 2^16
/// tokens (always the case in `char` mode) at half the memory and hashing of
/// `u128` (32-bit limbs), which serves any vocabulary.
pub trait GramKey:
    Copy + Ord + Eq + std::hash::Hash + Default + Send + Sync + std::fmt::Debug + 'static
{
    /// Bits per token.
    const LIMB: u32;
    /// `self` with token `id` appended (the caller checks [`fits`]).
    fn push(self, id: u32) -> Self;
    /// The order (1..=4) of a key.
    fn order(self) -> usize;
    /// Well-mixed bits of the key, independent of the map hasher: the shard.
    fn spread(self) -> u64;
}

impl GramKey for u64 {
    const LIMB: u32 = 16;
    #[inline]
    fn push(self, id: u32) -> Self {
        (self << 16) | u64::from(id + 1)
    }
    #[inline]
    fn order(self) -> usize {
        (64 - self.leading_zeros() as usize).div_ceil(16)
    }
    #[inline]
    fn spread(self) -> u64 {
        (self ^ (self >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
}

impl GramKey for u128 {
    const LIMB: u32 = 32;
    #[inline]
    fn push(self, id: u32) -> Self {
        (self << 32) | u128::from(id + 1)
    }
    #[inline]
    fn order(self) -> usize {
        order(self)
    }
    #[inline]
    fn spread(self) -> u64 {
        let x = (self as u64) ^ ((self >> 64) as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
        x.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
}

/// Whether token `id` fits a limb of `K`.
#[inline]
pub fn fits<K: GramKey>(id: u32) -> bool {
    u64::from(id) + 1 < (1u64 << K::LIMB)
}

/// A key with 32-bit limbs, for n-grams whose ids do not fit `K`.
pub type Wide = u128;

/// The order (1..=4) of a [`Wide`] key.
pub fn order(key: Wide) -> usize {
    (128 - key.leading_zeros() as usize).div_ceil(32)
}

/// A small multiply-rotate hasher with a splitmix finalizer: the keys here
/// are short and trusted, so SipHash's DoS resistance buys nothing.
#[derive(Default, Clone, Copy)]
pub struct FastHasher(u64);

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(26) ^ word).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(buf));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    fn write_u128(&mut self, i: u128) {
        self.add(i as u64);
        self.add((i >> 64) as u64);
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    fn finish(&self) -> u64 {
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// Token string -> id, built from the reference corpus. Single characters of
/// the Basic Multilingual Plane (nearly every `char`-mode token) are looked
/// up in a direct table instead of hashing a string.
#[derive(Debug, Clone, Default)]
pub struct Vocab {
    ids: FastMap<Box<str>, u32>,
    /// `bmp[c]`: id of the one-character token `c`, `u32::MAX` if none
    /// (allocated on the first such token).
    bmp: Vec<u32>,
    len: u32,
}

/// The code point of a token that is one BMP character.
#[inline]
fn single_bmp(token: &str) -> Option<usize> {
    let mut chars = token.chars();
    let c = chars.next()?;
    (chars.next().is_none() && u32::from(c) < 0x1_0000).then_some(c as usize)
}

impl Vocab {
    pub fn intern(&mut self, token: &str) -> u32 {
        if let Some(id) = self.get(token) {
            return id;
        }
        let id = self.len.min(u32::MAX - 1);
        self.len = self.len.saturating_add(1);
        match single_bmp(token) {
            Some(c) => {
                if self.bmp.is_empty() {
                    self.bmp = vec![u32::MAX; 0x1_0000];
                }
                self.bmp[c] = id;
            }
            None => {
                self.ids.insert(token.into(), id);
            }
        }
        id
    }

    #[inline]
    pub fn get(&self, token: &str) -> Option<u32> {
        match single_bmp(token) {
            Some(c) => self.bmp.get(c).copied().filter(|&id| id != u32::MAX),
            None => self.ids.get(token).copied(),
        }
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }
}

/// Ids for tokens of one candidate that the reference vocabulary lacks: each
/// distinct unknown string gets its own id past the vocabulary, so repeated
/// unknown tokens still count as repeats.
pub struct Unknowns<'a> {
    base: usize,
    seen: Vec<&'a str>,
}

impl<'a> Unknowns<'a> {
    pub fn new(vocab: &Vocab) -> Self {
        Unknowns {
            base: vocab.len(),
            seen: Vec::new(),
        }
    }

    pub fn id(&mut self, vocab: &Vocab, token: &'a str) -> u32 {
        if let Some(id) = vocab.get(token) {
            return id;
        }
        let pos = match self.seen.iter().position(|s| *s == token) {
            Some(p) => p,
            None => {
                self.seen.push(token);
                self.seen.len() - 1
            }
        };
        u32::try_from(self.base + pos).unwrap_or(u32::MAX - 1)
    }
}

/// One caption as pycocoevalcap sees it, as token ids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caption {
    /// `str.split()` of the fed string: BLEU and CIDEr-D.
    pub words: Vec<u32>,
    /// `str.split(" ")` of the fed string where it differs from `words`
    /// (an empty caption is one empty token; `space` mode keeps empty tokens).
    pub rouge: Option<Vec<u32>>,
}

impl Caption {
    /// Ids of `tokens` (as [`super::tokenize_into`] gives them).
    pub fn encode<'a>(
        tokens: &[&'a str],
        mode: Tokenize,
        mut id: impl FnMut(&'a str) -> u32,
    ) -> Caption {
        if tokens.is_empty() {
            return Caption {
                words: Vec::new(),
                rouge: Some(vec![id("")]),
            };
        }
        let rouge: Vec<u32> = tokens.iter().map(|t| id(*t)).collect();
        if mode != Tokenize::Space {
            // char and jieba tokens are never empty and hold no whitespace
            return Caption {
                words: rouge,
                rouge: None,
            };
        }
        let clean = tokens
            .iter()
            .all(|t| !t.is_empty() && !t.contains(is_py_space));
        if clean {
            return Caption {
                words: rouge,
                rouge: None,
            };
        }
        let words = tokens
            .iter()
            .flat_map(|t| t.split(is_py_space))
            .filter(|w| !w.is_empty())
            .map(&mut id)
            .collect();
        Caption {
            words,
            rouge: Some(rouge),
        }
    }

    pub fn rouge_tokens(&self) -> &[u32] {
        self.rouge.as_deref().unwrap_or(&self.words)
    }
}

/// Images tokenized per chunk before their tokens are interned: bounds the borrowed token
/// lists alive at once (16 bytes a token) while tokenizing stays parallel.
const ENCODE_CHUNK: usize = 1024;

/// Every image's reference captions (`captions(image)`) tokenized with `mode` and interned into
/// one vocabulary, ids in order of first appearance.
pub fn encode_references<T: Sync, S: AsRef<str> + Sync>(
    images: &[T],
    captions: impl Fn(&T) -> &[S] + Sync,
    mode: Tokenize,
) -> (Vocab, Vec<Vec<Caption>>) {
    use rayon::prelude::*;
    let mut vocab = Vocab::default();
    let mut out = Vec::with_capacity(images.len());
    for chunk in images.chunks(ENCODE_CHUNK) {
        let tokens: Vec<Vec<Vec<&str>>> = chunk
            .par_iter()
            .map(|im| {
                captions(im)
                    .iter()
                    .map(|c| {
                        let mut t = Vec::new();
                        super::tokenize::tokenize_into(c.as_ref(), mode, &mut t);
                        t
                    })
                    .collect()
            })
            .collect();
        out.extend(tokens.iter().map(|caps| {
            caps.iter()
                .map(|t| Caption::encode(t, mode, |s| vocab.intern(s)))
                .collect::<Vec<_>>()
        }));
    }
    (vocab, out)
}

/// All 1..=4-grams of `words` with their counts, sorted by key, into `out`;
/// n-grams holding an id that does not fit `K` (only a candidate's unknown
/// tokens can: they never match a reference) go to `wide`, also counted.
///
/// Keys are generated and sorted one order at a time: every key of order n is
/// below every key of order n + 1 (its highest limb is zero, ids are stored
/// plus one), so the sorted orders laid end to end are the sorted whole, and
/// four sorts of a caption's ~20 keys each cost about half of one sort of ~80
/// (the counting runs for every reference of every image, twice: document
/// frequencies, then scoring).
pub fn count_ngrams<K: GramKey>(
    words: &[u32],
    keys: &mut Vec<K>,
    out: &mut Vec<(K, u32)>,
    wide: &mut Vec<(Wide, u32)>,
) {
    keys.clear();
    out.clear();
    wide.clear();
    let mut wide_keys: Vec<Wide> = Vec::new();
    let top = MAX_N.min(words.len());
    // where each order's keys start in `keys`
    let mut bounds = [0usize; MAX_N + 1];
    if words.iter().all(|&w| fits::<K>(w)) {
        // every key of order n extends the one of order n - 1 at the same start
        keys.extend(words.iter().map(|&w| K::default().push(w)));
        bounds[1] = keys.len();
        for n in 2..=top {
            let prev = bounds[n - 2];
            for (i, &w) in words[n - 1..].iter().enumerate() {
                let key = keys[prev + i].push(w);
                keys.push(key);
            }
            bounds[n] = keys.len();
        }
    } else {
        for n in 1..=top {
            for window in words.windows(n) {
                if window.iter().all(|&w| fits::<K>(w)) {
                    keys.push(window.iter().fold(K::default(), |key, &w| key.push(w)));
                } else {
                    wide_keys.push(
                        window
                            .iter()
                            .fold(0, |key: Wide, &w| (key << 32) | Wide::from(w + 1)),
                    );
                }
            }
            bounds[n] = keys.len();
        }
    }
    for n in 1..=top {
        keys[bounds[n - 1]..bounds[n]].sort_unstable();
    }
    debug_assert!(keys.is_sorted());
    run_lengths(keys, out);
    if !wide_keys.is_empty() {
        wide_keys.sort_unstable();
        run_lengths(&wide_keys, wide);
    }
}

fn run_lengths<K: Copy + Eq>(sorted: &[K], out: &mut Vec<(K, u32)>) {
    for &key in sorted {
        match out.last_mut() {
            Some((k, c)) if *k == key => *c += 1,
            _ => out.push((key, 1)),
        }
    }
}

/// Bigram count of a caption: pycocoevalcap's CIDEr-D "length" (its
/// `if n == 1: length += term_freq` sums the 2-gram counts).
pub fn cider_length(words: &[u32]) -> i64 {
    words.len().saturating_sub(1) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_know_their_order_and_counts_are_sorted() {
        let (mut keys, mut out, mut wide) = (Vec::new(), Vec::new(), Vec::new());
        count_ngrams::<u64>(&[0, 1, 0, 1], &mut keys, &mut out, &mut wide);
        let by_order = |n| out.iter().filter(|(k, _)| k.order() == n).count();
        assert_eq!(
            [by_order(1), by_order(2), by_order(3), by_order(4)],
            [2, 2, 2, 1]
        );
        assert!(out.windows(2).all(|w| w[0].0 < w[1].0));
        let unigram_zero = out.iter().find(|(k, _)| *k == 1).map(|e| e.1);
        assert_eq!(unigram_zero, Some(2));
        assert!(wide.is_empty());
    }

    #[test]
    fn counts_equal_a_map_over_every_window() {
        use rand::{Rng, SeedableRng};
        use std::collections::BTreeMap;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (mut keys, mut out, mut wide) = (Vec::new(), Vec::new(), Vec::new());
        for case in 0..500 {
            let len = rng.gen_range(0..40usize);
            // a few ids past the narrow limb in every other case
            let big = if case % 2 == 0 { 3 } else { 0 };
            let words: Vec<u32> = (0..len)
                .map(|_| match rng.gen_range(0..10 + big) {
                    i if i < 10 => i,
                    _ => 70_000,
                })
                .collect();
            let mut model: BTreeMap<Wide, u32> = BTreeMap::new();
            for n in 1..=MAX_N {
                for w in words.windows(n) {
                    let key = w
                        .iter()
                        .fold(0, |k: Wide, &id| (k << 32) | Wide::from(id + 1));
                    *model.entry(key).or_default() += 1;
                }
            }
            count_ngrams::<u64>(&words, &mut keys, &mut out, &mut wide);
            assert!(out.windows(2).all(|w| w[0].0 < w[1].0));
            // the narrow keys, widened to 32-bit limbs, plus the wide ones: the model
            let mut got: BTreeMap<Wide, u32> = wide.iter().copied().collect();
            for &(k, c) in &out {
                let limbs = (0..k.order()).rev().map(|i| (k >> (16 * i)) & 0xffff);
                let key = limbs.fold(0, |w: Wide, l| (w << 32) | Wide::from(l));
                got.insert(key, c);
            }
            assert_eq!(got, model, "{words:?}");
        }
    }

    #[test]
    fn ids_past_a_narrow_limb_go_wide_with_their_counts() {
        let (mut keys, mut out, mut wide) = (Vec::new(), Vec::new(), Vec::new());
        let big = 70_000;
        count_ngrams::<u64>(&[3, big, 3, big], &mut keys, &mut out, &mut wide);
        // narrow: the unigram 3 (twice); wide: everything touching `big`
        assert_eq!(out, [(4u64, 2)]);
        let total: u32 = wide.iter().map(|e| e.1).sum();
        assert_eq!(total, 10 - 2);
        let big_unigram = wide
            .iter()
            .find(|(k, _)| *k == Wide::from(big + 1))
            .map(|e| e.1);
        assert_eq!(big_unigram, Some(2));
        let (mut k2, mut o2, mut w2) = (Vec::new(), Vec::new(), Vec::new());
        count_ngrams::<u128>(&[3, big, 3, big], &mut k2, &mut o2, &mut w2);
        assert_eq!(o2.len(), out.len() + wide.len());
        assert!(w2.is_empty());
    }

    #[test]
    fn vocab_ids_are_dense_and_stable_across_both_tables() {
        let mut v = Vocab::default();
        let toks = ["红", "iPhone", "", "\u{1F600}", "红", "色", "iPhone"];
        let ids: Vec<u32> = toks.iter().map(|t| v.intern(t)).collect();
        assert_eq!(ids, [0, 1, 2, 3, 0, 4, 1]);
        assert_eq!(v.len(), 5);
        assert_eq!(v.get("色"), Some(4));
        assert_eq!(v.get("蓝"), None);
        assert_eq!(Vocab::default().get("蓝"), None);
    }

    #[test]
    fn space_mode_keeps_empty_tokens_for_rouge_only() {
        let mut v = Vocab::default();
        let c = Caption::encode(&["a", "", "b"], Tokenize::Space, |t| v.intern(t));
        assert_eq!(c.words.len(), 2);
        assert_eq!(c.rouge_tokens().len(), 3);
        let e = Caption::encode(&[], Tokenize::Char, |t| v.intern(t));
        assert!(e.words.is_empty());
        assert_eq!(e.rouge_tokens(), &[v.intern("")]);
    }
}
