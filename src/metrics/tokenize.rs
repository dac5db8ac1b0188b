//! Caption tokenization: the first step of scoring. Every metric sees the
//! tokens joined by single spaces, exactly the pre-tokenized string
//! pycocoevalcap would be fed (docs/metrics.md).

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// How a caption is cut into tokens before scoring.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Tokenize {
    /// The MUGE rule: whitespace separates and is dropped, a maximal run of
    /// ASCII letters/digits is one token, every other character is one token.
    #[default]
    Char,
    /// Split on single ASCII spaces, as pycocoevalcap does with a caption that
    /// is already tokenized (empty tokens kept, as ROUGE-L's `split(" ")`).
    Space,
    /// Chinese word segmentation with jieba-rs (default dictionary, HMM on),
    /// run on each whitespace-separated chunk.
    Jieba,
}

impl Tokenize {
    pub const ALL: [Tokenize; 3] = [Tokenize::Char, Tokenize::Space, Tokenize::Jieba];

    pub fn as_str(self) -> &'static str {
        match self {
            Tokenize::Char => "char",
            Tokenize::Space => "space",
            Tokenize::Jieba => "jieba",
        }
    }
}

impl fmt::Display for Tokenize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown tokenization name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown tokenization `{0}` (expected char, space or jieba)")]
pub struct UnknownTokenize(pub String);

impl FromStr for Tokenize {
    type Err = UnknownTokenize;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tokenize::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownTokenize(s.to_string()))
    }
}

/// Python's `str.isspace`, which is what `str.split()` splits on inside
/// pycocoevalcap: Unicode White_Space plus the four ASCII separators
/// U+001C..U+001F.
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Tokens of `text`; joined by single spaces they are the string
/// pycocoevalcap scores. `char` and `jieba` never yield empty tokens or
/// tokens with whitespace; `space` keeps what `split(" ")` gives.
pub fn tokenize(text: &str, mode: Tokenize) -> Vec<String> {
    let mut out = Vec::new();
    tokenize_into(text, mode, &mut out);
    out.into_iter().map(str::to_string).collect()
}

/// [`tokenize`] without allocating strings: the tokens borrow from `text`.
pub fn tokenize_into<'a>(text: &'a str, mode: Tokenize, out: &mut Vec<&'a str>) {
    out.clear();
    match mode {
        Tokenize::Char => char_tokens(text, out),
        Tokenize::Space => out.extend(text.split(' ')),
        Tokenize::Jieba => {
            let jieba = jieba();
            for chunk in text.split(is_py_space).filter(|c| !c.is_empty()) {
                out.extend(jieba.cut(chunk, true).into_iter().filter(|w| !w.is_empty()));
            }
        }
    }
}

fn char_tokens<'a>(text: &'a str, out: &mut Vec<&'a str>) {
    // Start byte of the ASCII letter/digit run being read, if any.
    let mut run: Option<usize> = None;
    for (i, c) in text.char_indices() {
        if c.is_ascii_alphanumeric() {
            run.get_or_insert(i);
            continue;
        }
        if let Some(start) = run.take() {
            out.push(&text[start..i]);
        }
        if !is_py_space(c) {
            out.push(&text[i..i + c.len_utf8()]);
        }
    }
    if let Some(start) = run {
        out.push(&text[start..]);
    }
}

/// The jieba dictionary takes a few hundred milliseconds to load: once per
/// process, and only when asked for.
fn jieba() -> &'static jieba_rs::Jieba {
    static JIEBA: OnceLock<jieba_rs::Jieba> = OnceLock::new();
    JIEBA.get_or_init(jieba_rs::Jieba::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_rule_keeps_ascii_runs_and_drops_whitespace() {
        assert_eq!(
            tokenize("iPhone14 Pro  256GB手机壳！\u{3000}好", Tokenize::Char),
            ["iPhone14", "Pro", "256GB", "手", "机", "壳", "！", "好"]
        );
        assert!(tokenize(" \t\u{a0}", Tokenize::Char).is_empty());
    }

    #[test]
    fn space_rule_is_split_on_single_spaces() {
        assert_eq!(tokenize("a  b", Tokenize::Space), ["a", "", "b"]);
        assert_eq!(tokenize("", Tokenize::Space), [""]);
    }

    #[test]
    fn jieba_segments_words_without_whitespace() {
        let words = tokenize("新款女士连衣裙 iPhone 手机壳", Tokenize::Jieba);
        assert!(words
            .iter()
            .all(|w| !w.is_empty() && !w.contains(is_py_space)));
        assert_eq!(words.concat(), "新款女士连衣裙iPhone手机壳");
        assert!(words.len() < "新款女士连衣裙手机壳".chars().count() + 1);
    }

    #[test]
    fn names_round_trip() {
        for t in Tokenize::ALL {
            assert_eq!(t.to_string().parse::<Tokenize>(), Ok(t));
        }
        assert!("words".parse::<Tokenize>().is_err());
    }
}
