//! Diversity of a set of generated captions: a model that writes one caption for every image
//! can still score a fair CIDEr-D, so the report shows these beside the scores.

use std::collections::{HashMap, HashSet};

use super::{tokenize, Tokenize};

/// See `docs/store.md` (`distinct_ratio`, `top_caption_share`, `vocab_used`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Diversity {
    /// Distinct captions / captions.
    pub distinct_ratio: f64,
    /// Share of the captions that are the most frequent one.
    pub top_share: f64,
    /// Distinct tokens (under `mode`) over all captions.
    pub vocab: usize,
}

pub fn diversity(captions: &[String], mode: Tokenize) -> Diversity {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    let mut vocab: HashSet<String> = HashSet::new();
    for c in captions {
        *counts.entry(c.as_str()).or_default() += 1;
        vocab.extend(tokenize(c, mode));
    }
    let n = captions.len().max(1) as f64;
    Diversity {
        distinct_ratio: counts.len() as f64 / n,
        top_share: counts.values().copied().max().unwrap_or(0) as f64 / n,
        vocab: vocab.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_distinct_top_and_vocabulary() {
        let caps: Vec<String> = ["红色T恤", "红色T恤", "蓝色帽子", "红色T恤"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let d = diversity(&caps, Tokenize::Char);
        assert_eq!(d.distinct_ratio, 0.5);
        assert_eq!(d.top_share, 0.75);
        // 红 色 T 恤 蓝 帽 子 ("T" is one ASCII run).
        assert_eq!(d.vocab, 7);
    }
}
