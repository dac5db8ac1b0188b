//! Caption tokenizer: the step between caption text and the token ids the
//! language model trains on (preprocessing writes the ids, decoding turns
//! generated ids back into text for the metrics).
//!
//! Two kinds behind one type:
//! - [`CaptionTokenizer::train`] builds a `tokenizers` WordLevel model whose
//!   pre-tokenizer follows the metrics' `char` rule (whitespace dropped, a
//!   maximal run of ASCII letters/digits is one token, every other character
//!   is one token), so the model's units are exactly the units CIDEr-D
//!   counts. Its `tokenizer.json` is an ordinary Hugging Face file.
//! - [`CaptionTokenizer::load`] of any other `tokenizer.json` (a real
//!   checkpoint's BPE/WordPiece) uses that file's own pipeline and decoder.
//!
//! Whitespace: the char rule drops it, so [`CaptionTokenizer::decode`] of a
//! trained tokenizer writes tokens back to back and puts one ASCII space only
//! between two neighbouring ASCII letter/digit runs (they were only separate
//! tokens because something separated them). A caption therefore round-trips
//! exactly when it has no whitespace other than single spaces between ASCII
//! runs, which holds for MUGE captions and for every synthetic caption.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::Split;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::{ModelWrapper, SplitDelimiterBehavior, Tokenizer};

/// Special tokens of a trained tokenizer; they take ids 0..=3 in this order.
pub const PAD: &str = "[PAD]";
pub const BOS: &str = "[BOS]";
pub const EOS: &str = "[EOS]";
pub const UNK: &str = "[UNK]";

/// What an unknown id decodes to: one character, so it costs one token in
/// the `char` metric rule rather than five for the literal `[UNK]`.
pub const UNK_TEXT: &str = "\u{FFFD}";

/// Regex of the second pre-tokenizer step (after whitespace removal).
const CHAR_RULE_REGEX: &str = "[A-Za-z0-9]+|[^A-Za-z0-9]";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer: {0}")]
    Build(String),
    #[error("cannot read tokenizer {path}: {msg}")]
    Load { path: PathBuf, msg: String },
    #[error("cannot write tokenizer {path}: {msg}")]
    Save { path: PathBuf, msg: String },
    #[error("tokenizer {path} has no {role} token (tried {tried})")]
    MissingSpecial {
        path: PathBuf,
        role: &'static str,
        tried: String,
    },
    #[error("cannot encode {text:?}: {msg}")]
    Encode { text: String, msg: String },
}

/// Which pipeline the ids come from; decides how ids are turned into text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    /// Trained here with the `char` rule; decoded by [`join_char_tokens`].
    Char,
    /// A checkpoint's own tokenizer; decoded by its own decoder.
    External,
}

/// A caption tokenizer (see the module doc for the two kinds).
#[derive(Clone)]
pub struct CaptionTokenizer {
    inner: Tokenizer,
    kind: TokenizerKind,
    /// The `char` kind's vocabulary, for the fast encoding path (empty for
    /// the external kind).
    vocab: HashMap<String, u32>,
    pad: u32,
    bos: u32,
    eos: u32,
    unk: u32,
}

impl std::fmt::Debug for CaptionTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptionTokenizer")
            .field("kind", &self.kind)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

/// Splits text by the metrics' `char` rule: whitespace dropped, a maximal run
/// of ASCII letters/digits is one token, any other character one token.
pub fn char_tokens(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut run_start: Option<usize> = None;
    for (i, c) in text.char_indices() {
        if c.is_ascii_alphanumeric() {
            run_start.get_or_insert(i);
            continue;
        }
        if let Some(s) = run_start.take() {
            out.push(&text[s..i]);
        }
        if !c.is_whitespace() {
            out.push(&text[i..i + c.len_utf8()]);
        }
    }
    if let Some(s) = run_start {
        out.push(&text[s..]);
    }
    out
}

/// Joins `char`-rule tokens back into text: back to back, with one space
/// between two neighbouring ASCII letter/digit runs.
pub fn join_char_tokens<S: AsRef<str>>(tokens: &[S]) -> String {
    let mut out = String::new();
    let mut prev_ascii_run = false;
    for t in tokens {
        let t = t.as_ref();
        let ascii_run = !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric());
        if ascii_run && prev_ascii_run {
            out.push(' ');
        }
        out.push_str(t);
        prev_ascii_run = ascii_run;
    }
    out
}

fn build_err(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Build(e.to_string())
}

impl CaptionTokenizer {
    /// Trains a `char`-rule WordLevel tokenizer on `captions`. Tokens seen
    /// fewer than `min_freq` times map to UNK. Ids are assigned by descending
    /// count, ties by the token's text, so the result depends only on the
    /// multiset of captions, never on hash order or thread count.
    pub fn train<I, S>(captions: I, min_freq: u32) -> Result<Self, TokenizerError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut counts: HashMap<String, u64> = HashMap::new();
        for c in captions {
            for t in char_tokens(c.as_ref()) {
                if let Some(n) = counts.get_mut(t) {
                    *n += 1;
                } else {
                    counts.insert(t.to_owned(), 1);
                }
            }
        }
        let mut entries: Vec<(String, u64)> = counts
            .into_iter()
            .filter(|(t, n)| {
                *n >= u64::from(min_freq.max(1)) && ![PAD, BOS, EOS, UNK].contains(&t.as_str())
            })
            .collect();
        entries.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let mut vocab: HashMap<String, u32> = HashMap::new();
        for (i, s) in [PAD, BOS, EOS, UNK].iter().enumerate() {
            vocab.insert((*s).to_owned(), i as u32);
        }
        for (i, (t, _)) in entries.into_iter().enumerate() {
            vocab.insert(t, i as u32 + 4);
        }
        let model = WordLevel::builder()
            .vocab(vocab.into_iter().collect())
            .unk_token(UNK.to_owned())
            .build()
            .map_err(build_err)?;
        let split = Split::new(
            tokenizers::pre_tokenizers::split::SplitPattern::Regex(CHAR_RULE_REGEX.to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(build_err)?;
        let pre = Sequence::new(vec![WhitespaceSplit.into(), split.into()]);
        let mut inner = Tokenizer::new(ModelWrapper::WordLevel(model));
        inner.with_pre_tokenizer(Some(pre));
        let vocab = inner.get_vocab(false);
        Ok(Self {
            inner,
            kind: TokenizerKind::Char,
            vocab,
            pad: 0,
            bos: 1,
            eos: 2,
            unk: 3,
        })
    }

    /// Loads a `tokenizer.json`: one written by [`Self::save`] comes back as
    /// the `char` kind; any other is used as an external tokenizer, its
    /// special tokens found by their usual names.
    pub fn load(path: &Path) -> Result<Self, TokenizerError> {
        let inner = Tokenizer::from_file(path).map_err(|e| TokenizerError::Load {
            path: path.to_owned(),
            msg: e.to_string(),
        })?;
        let is_ours = matches!(inner.get_model(), ModelWrapper::WordLevel(_))
            && [PAD, BOS, EOS, UNK]
                .iter()
                .enumerate()
                .all(|(i, s)| inner.token_to_id(s) == Some(i as u32));
        if is_ours {
            let vocab = inner.get_vocab(false);
            return Ok(Self {
                inner,
                kind: TokenizerKind::Char,
                vocab,
                pad: 0,
                bos: 1,
                eos: 2,
                unk: 3,
            });
        }
        let find = |role: &'static str, names: &[&str]| {
            names
                .iter()
                .find_map(|n| inner.token_to_id(n))
                .ok_or_else(|| TokenizerError::MissingSpecial {
                    path: path.to_owned(),
                    role,
                    tried: names.join(" "),
                })
        };
        let bos = find("bos", &["<s>", "[CLS]", "<|startoftext|>", "<bos>", BOS])?;
        let eos = find("eos", &["</s>", "[SEP]", "<|endoftext|>", "<eos>", EOS])?;
        let pad = find("pad", &["<pad>", PAD, "<|endoftext|>", "</s>"])?;
        let unk = find("unk", &["<unk>", UNK, "<|endoftext|>"])?;
        Ok(Self {
            inner,
            kind: TokenizerKind::External,
            vocab: HashMap::new(),
            pad,
            bos,
            eos,
            unk,
        })
    }

    /// Writes the Hugging Face `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<(), TokenizerError> {
        self.inner
            .save(path, true)
            .map_err(|e| TokenizerError::Save {
                path: path.to_owned(),
                msg: e.to_string(),
            })
    }

    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    /// Token ids of `text`, without BOS/EOS (the caller adds them).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        if self.kind == TokenizerKind::Char {
            // Same result as the `tokenizers` pipeline (WordLevel over the
            // char-rule pieces, no normalizer, no added tokens; a test holds
            // them equal), without its per-call overhead: this runs for
            // every caption of every preprocessing run.
            return Ok(char_tokens(text)
                .into_iter()
                .map(|t| self.vocab.get(t).copied().unwrap_or(self.unk))
                .collect());
        }
        self.encode_with_pipeline(text)
    }

    /// Token ids through the wrapped `tokenizers` pipeline itself.
    pub fn encode_with_pipeline(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode {
                text: text.to_owned(),
                msg: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; PAD/BOS/EOS are skipped, decoding stops at nothing (the
    /// caller cuts at EOS). Unknown ids and UNK become [`UNK_TEXT`].
    pub fn decode(&self, ids: &[u32]) -> String {
        match self.kind {
            TokenizerKind::Char => {
                let toks: Vec<String> = ids
                    .iter()
                    .filter(|&&i| i != self.pad && i != self.bos && i != self.eos)
                    .map(|&i| {
                        if i == self.unk {
                            return UNK_TEXT.to_owned();
                        }
                        self.inner
                            .id_to_token(i)
                            .unwrap_or_else(|| UNK_TEXT.to_owned())
                    })
                    .collect();
                join_char_tokens(&toks)
            }
            TokenizerKind::External => {
                let kept: Vec<u32> = ids
                    .iter()
                    .copied()
                    .filter(|&i| i != self.pad && i != self.bos && i != self.eos)
                    .collect();
                self.inner
                    .decode(&kept, true)
                    .unwrap_or_else(|_| UNK_TEXT.to_owned())
            }
        }
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }
    pub fn bos_id(&self) -> u32 {
        self.bos
    }
    pub fn eos_id(&self) -> u32 {
        self.eos
    }
    pub fn unk_id(&self) -> u32 {
        self.unk
    }
    /// Number of ids, specials and added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The wrapped `tokenizers` tokenizer, for callers that need more.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_rule_splits_ascii_runs_and_drops_whitespace() {
        assert_eq!(
            char_tokens("新款T恤 XL码，iPhone 15"),
            ["新", "款", "T", "恤", "XL", "码", "，", "iPhone", "15"]
        );
        assert_eq!(char_tokens("  "), Vec::<&str>::new());
        assert_eq!(char_tokens("a_b"), ["a", "_", "b"]);
    }

    #[test]
    fn join_inserts_space_only_between_ascii_runs() {
        assert_eq!(
            join_char_tokens(&["iPhone", "15", "手", "机", "X"]),
            "iPhone 15手机X"
        );
    }

    #[test]
    fn trained_tokenizer_agrees_with_char_rule_and_round_trips() {
        let caps = ["夏季新款红色T恤，宽松百搭", "iPhone 15手机壳XL码", "A_b c"];
        let tok = CaptionTokenizer::train(caps, 1).unwrap();
        for c in caps {
            let ids = tok.encode(c).unwrap();
            assert_eq!(ids.len(), char_tokens(c).len(), "{c}");
            assert!(!ids.contains(&tok.unk_id()));
            assert_eq!(tok.decode(&ids), c);
        }
        for weird in ["", "  ", "紫色 iPhone_15\t新款", "[PAD][UNK]", "a\u{3000}b"] {
            assert_eq!(
                tok.encode(weird).unwrap(),
                tok.encode_with_pipeline(weird).unwrap(),
                "{weird:?}"
            );
        }
        // Whitespace next to a non-ASCII-run token is not kept (documented).
        let ids = tok.encode("手机壳 XL码").unwrap();
        assert_eq!(tok.decode(&ids), "手机壳XL码");
        let ids = tok.encode("紫").unwrap();
        assert_eq!(ids, [tok.unk_id()]);
        assert_eq!(tok.decode(&ids), UNK_TEXT);
    }
}
