//! Preprocessing (the `preprocess` stage's code): MUGE files in, tensor
//! shards and token ids out, so that training never decodes a JPEG.
//!
//! Output layout of [`run`] (all under `out_dir`):
//! - `preprocess.json`: format version, parameters, seed, per-split counts,
//!   skipped records and shard names ([`PreprocessMeta`]).
//! - `tokenizer.json`: the caption tokenizer (trained on the captions of
//!   `IC_train` and `ALIGN_train`, or a copy of a real checkpoint's).
//! - `<split>/shard-NNNNN.safetensors`: one tensor `images`, dtype **u8**,
//!   shape (rows, 3, size, size), raw RGB after crop/resize/augmentation.
//!   Storing u8 keeps shards 4x smaller than f32 and loses nothing: the
//!   mean/std normalisation is applied by [`Split::load`].
//! - `<split>/index.jsonl`: one line per row, in row order:
//!   `{"image_id", "copy", "captions": [...], "tokens": [[id, ...], ...]}`
//!   (`copy` 0 is the clean view, 1.. the augmented ones; tokens carry no
//!   BOS/EOS).
//!
//! Splits: `train` (IC_train, plus augmented copies), `valid`, `test`,
//! `align_train` (ALIGN_train, when present) and `align_valid` (when present);
//! or, with [`PreprocessParams::foundation`], the foundation corpus alone
//! (`foundation`, from FOUNDATION_train).
//! Work is streamed a chunk of images at a time; a shard holds at most
//! ~64 MiB, so memory stays flat whatever the split size.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub use super::augment::AugmentParams;
use super::augment::{augmented_view, clean_view};
use super::muge::{self, BadRecordPolicy, MugeError, ReadOptions, Record};
use super::tokenizer::{CaptionTokenizer, TokenizerError};

/// Bumped whenever the output layout or the pixels for given inputs change.
pub const FORMAT_VERSION: u32 = 1;

const SHARD_BYTES: usize = 64 << 20;

/// Split names and the MUGE file prefix each reads.
pub const SPLITS: &[(&str, &str)] = &[
    ("train", "IC_train"),
    ("valid", "IC_valid"),
    ("test", "IC_test"),
    ("align_train", "ALIGN_train"),
    ("align_valid", "ALIGN_valid"),
];

/// The split name and file prefix of the foundation stages' corpus (see
/// [`PreprocessParams::foundation`]).
pub const FOUNDATION_SPLIT: &str = "foundation";
pub const FOUNDATION_PREFIX: &str = "FOUNDATION_train";

/// Bad-record policy per split (docs/data.md: `skip` for training data,
/// `fail` for what is scored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SplitPolicies {
    pub train: BadRecordPolicy,
    pub valid: BadRecordPolicy,
    pub test: BadRecordPolicy,
    pub align: BadRecordPolicy,
    /// Whether test images need references (false for a MUGE test split
    /// that carries ids only; such a split cannot be scored).
    pub test_requires_refs: bool,
}

impl Default for SplitPolicies {
    fn default() -> Self {
        Self {
            train: BadRecordPolicy::Skip,
            valid: BadRecordPolicy::Fail,
            test: BadRecordPolicy::Fail,
            align: BadRecordPolicy::Skip,
            test_requires_refs: true,
        }
    }
}

/// Where the tokenizer comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenizerParams {
    /// A real checkpoint's `tokenizer.json`; when absent, one is trained on
    /// the training captions with the `char` rule.
    pub path: Option<PathBuf>,
    /// Tokens seen fewer times map to UNK (trained tokenizer only).
    pub min_freq: u32,
}

impl Default for TokenizerParams {
    fn default() -> Self {
        Self {
            path: None,
            min_freq: 1,
        }
    }
}

/// Everything preprocessing depends on besides the data and the seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreprocessParams {
    /// Side of the square model input (64 for tiny presets, 224/336/384 for
    /// real backbones).
    pub image_size: u32,
    /// Per-channel mean and std on the [0, 1] scale (default: CLIP's).
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub augment: AugmentParams,
    pub policy: SplitPolicies,
    pub tokenizer: TokenizerParams,
    /// Longest accepted line of a data file, in bytes.
    pub max_line_bytes: usize,
    /// Preprocess the generic-domain pretraining corpus alone, as split `foundation`
    /// (`FOUNDATION_train`, or `ALIGN_train` where a data set has none): the input of the
    /// foundation stages, at the vision tower's resolution, kept apart from the IC splits so
    /// that a large corpus is decoded once per sweep rather than once per image size.
    #[serde(default)]
    pub foundation: bool,
}

impl Default for PreprocessParams {
    fn default() -> Self {
        Self {
            image_size: 64,
            mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
            augment: AugmentParams::default(),
            policy: SplitPolicies::default(),
            tokenizer: TokenizerParams::default(),
            max_line_bytes: 16 << 20,
            foundation: false,
        }
    }
}

impl PreprocessParams {
    /// Every problem with the parameters, for one error listing them all.
    pub fn problems(&self) -> Vec<String> {
        let mut p = self.augment.problems();
        if !(8..=1024).contains(&self.image_size) {
            p.push(format!(
                "image_size {} must be in 8..=1024",
                self.image_size
            ));
        }
        if self.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            p.push(format!("std {:?} must be positive", self.std));
        }
        if self.mean.iter().any(|m| !m.is_finite()) {
            p.push(format!("mean {:?} must be finite", self.mean));
        }
        if self.max_line_bytes < 64 {
            p.push(format!(
                "max_line_bytes {} is too small",
                self.max_line_bytes
            ));
        }
        p
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error(transparent)]
    Data(#[from] MugeError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("bad preprocess parameters: {}", .0.join("; "))]
    Params(Vec<String>),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error(
        "unknown split {0:?} (expected train, valid, test, align_train, align_valid or foundation)"
    )]
    UnknownSplit(String),
    #[error("split {split} was not preprocessed into {dir}")]
    MissingSplit { split: String, dir: PathBuf },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PreprocessError + '_ {
    move |source| PreprocessError::Io {
        path: path.to_owned(),
        source,
    }
}

fn format_err(path: &Path, msg: impl std::fmt::Display) -> PreprocessError {
    PreprocessError::Format {
        path: path.to_owned(),
        msg: msg.to_string(),
    }
}

/// What one split became.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitSummary {
    pub name: String,
    /// Good source images.
    pub images: usize,
    /// Rows written (images × (1 + copies) for train).
    pub rows: usize,
    /// Bad records left out under `skip`.
    pub skipped: usize,
    /// The bad records, `file:line: reason`, at most 100.
    pub bad: Vec<String>,
    pub shards: Vec<String>,
}

/// Contents of `preprocess.json`; also what [`run`] returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessMeta {
    pub format_version: u32,
    pub params: PreprocessParams,
    pub seed: u64,
    pub vocab_size: usize,
    pub splits: Vec<SplitSummary>,
}

/// Summary of a preprocessing run (the same record as `preprocess.json`).
pub type PreprocessSummary = PreprocessMeta;

impl PreprocessMeta {
    pub fn load(out_dir: &Path) -> Result<Self, PreprocessError> {
        let path = out_dir.join("preprocess.json");
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        serde_json::from_slice(&bytes).map_err(|e| format_err(&path, e))
    }

    pub fn split(&self, name: &str) -> Option<&SplitSummary> {
        self.splits.iter().find(|s| s.name == name)
    }
}

/// One row of `index.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct IndexRow {
    image_id: String,
    copy: u32,
    captions: Vec<String>,
    tokens: Vec<Vec<u32>>,
}

/// The seeded stream of one augmented copy.
fn copy_rng(seed: u64, split: &str, id: &str, copy: u32) -> ChaCha8Rng {
    let mut h = blake3::Hasher::new();
    h.update(b"ecic-augment-v1");
    h.update(&seed.to_le_bytes());
    h.update(split.as_bytes());
    h.update(&[0]);
    h.update(id.as_bytes());
    h.update(&copy.to_le_bytes());
    ChaCha8Rng::from_seed(*h.finalize().as_bytes())
}

/// Collects rows into shards of at most [`SHARD_BYTES`] and writes them.
struct ShardWriter {
    dir: PathBuf,
    row_bytes: usize,
    rows_per_shard: usize,
    shape: [usize; 3],
    buf: Vec<u8>,
    rows: usize,
    names: Vec<String>,
    index: BufWriter<File>,
    index_path: PathBuf,
}

impl ShardWriter {
    fn create(dir: PathBuf, size: u32) -> Result<Self, PreprocessError> {
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let s = size as usize;
        let row_bytes = 3 * s * s;
        let index_path = dir.join("index.jsonl");
        let index = BufWriter::new(File::create(&index_path).map_err(io_err(&index_path))?);
        Ok(Self {
            dir,
            row_bytes,
            rows_per_shard: (SHARD_BYTES / row_bytes).max(1),
            shape: [3, s, s],
            buf: Vec::new(),
            rows: 0,
            names: Vec::new(),
            index,
            index_path,
        })
    }

    fn push(&mut self, pixels: &[u8], row: &IndexRow) -> Result<(), PreprocessError> {
        serde_json::to_writer(&mut self.index, row).map_err(|e| format_err(&self.index_path, e))?;
        self.index
            .write_all(b"\n")
            .map_err(io_err(&self.index_path))?;
        self.buf.extend_from_slice(pixels);
        self.rows += 1;
        if self.buf.len() >= self.rows_per_shard * self.row_bytes {
            self.flush_shard()?;
        }
        Ok(())
    }

    fn flush_shard(&mut self) -> Result<(), PreprocessError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let n = self.buf.len() / self.row_bytes;
        let name = format!("shard-{:05}.safetensors", self.names.len());
        let path = self.dir.join(&name);
        let shape = vec![n, self.shape[0], self.shape[1], self.shape[2]];
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::U8, shape, &self.buf)
            .map_err(|e| format_err(&path, e))?;
        safetensors::serialize_to_file([("images", view)], None, &path)
            .map_err(|e| format_err(&path, e))?;
        self.buf.clear();
        self.names.push(name);
        Ok(())
    }

    fn finish(mut self) -> Result<(usize, Vec<String>), PreprocessError> {
        self.flush_shard()?;
        self.index.flush().map_err(io_err(&self.index_path))?;
        Ok((self.rows, self.names))
    }
}

/// The tokenizer `params` asks for.
fn build_tokenizer(
    data_dir: &Path,
    params: &PreprocessParams,
) -> Result<CaptionTokenizer, PreprocessError> {
    if let Some(path) = &params.tokenizer.path {
        return Ok(CaptionTokenizer::load(path)?);
    }
    let mut captions = muge::caption_texts(data_dir, "IC_train", params.max_line_bytes)?;
    captions.extend(muge::caption_texts(
        data_dir,
        "ALIGN_train",
        params.max_line_bytes,
    )?);
    Ok(CaptionTokenizer::train(
        &captions,
        params.tokenizer.min_freq,
    )?)
}

fn preprocess_split(
    data_dir: &Path,
    out_dir: &Path,
    (name, prefix): (&str, &str),
    params: &PreprocessParams,
    seed: u64,
    tok: &CaptionTokenizer,
) -> Result<SplitSummary, PreprocessError> {
    let p = &params.policy;
    let (policy, require_refs) = match name {
        "train" => (p.train, true),
        "valid" => (p.valid, true),
        "test" => (p.test, p.test_requires_refs),
        _ => (p.align, true),
    };
    let opts = ReadOptions {
        policy,
        require_refs,
        max_line_bytes: params.max_line_bytes,
        ..ReadOptions::default()
    };
    let copies = if name == "train" {
        params.augment.copies
    } else {
        0
    };
    let size = params.image_size;
    let mut shards = ShardWriter::create(out_dir.join(name), size)?;
    let view = |id: &str, img: image::DynamicImage| -> Vec<Vec<u8>> {
        // No copy when the decoder already gave RGB8 (JPEG does).
        let rgb = img.into_rgb8();
        let mut views = vec![clean_view(&rgb, size)];
        for c in 1..=copies {
            views.push(augmented_view(
                &rgb,
                size,
                &params.augment,
                &mut copy_rng(seed, name, id, c),
            ));
        }
        views
    };
    let sink = |chunk: Vec<Record<Vec<Vec<u8>>>>| -> Result<(), PreprocessError> {
        let tokens: Vec<Vec<Vec<u32>>> = chunk
            .par_iter()
            .map(|r| {
                r.captions
                    .iter()
                    .map(|c| tok.encode(c))
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<_, _>>()?;
        for (r, toks) in chunk.into_iter().zip(tokens) {
            let mut row = IndexRow {
                image_id: r.image_id,
                copy: 0,
                captions: r.captions,
                tokens: toks,
            };
            for (c, pixels) in r.value.iter().enumerate() {
                row.copy = c as u32;
                shards.push(pixels, &row)?;
            }
        }
        Ok(())
    };
    let report = muge::read_split(data_dir, prefix, &opts, view, sink)?;
    let (rows, names) = shards.finish()?;
    Ok(SplitSummary {
        name: name.to_owned(),
        images: report.records,
        rows,
        skipped: report.skipped,
        bad: report
            .bad
            .iter()
            .take(100)
            .map(ToString::to_string)
            .collect(),
        shards: names,
    })
}

/// Preprocesses the MUGE data in `data_dir` into `out_dir` (see the module
/// doc for the layout). The IC splits are required; ALIGN splits are used
/// when present. Same inputs, parameters and seed give the same bytes.
pub fn run(
    data_dir: &Path,
    out_dir: &Path,
    params: &PreprocessParams,
    seed: u64,
) -> Result<PreprocessSummary, PreprocessError> {
    let problems = params.problems();
    if !problems.is_empty() {
        return Err(PreprocessError::Params(problems));
    }
    std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    let tok = build_tokenizer(data_dir, params)?;
    tok.save(&out_dir.join("tokenizer.json"))?;
    let mut splits = Vec::new();
    let todo: Vec<(&str, &str)> = if params.foundation {
        let prefix = if muge::split_paths(data_dir, FOUNDATION_PREFIX).0.exists() {
            FOUNDATION_PREFIX
        } else {
            "ALIGN_train"
        };
        vec![(FOUNDATION_SPLIT, prefix)]
    } else {
        SPLITS.to_vec()
    };
    for (name, prefix) in todo {
        if prefix.starts_with("ALIGN") && !muge::split_paths(data_dir, prefix).0.exists() {
            continue;
        }
        splits.push(preprocess_split(
            data_dir,
            out_dir,
            (name, prefix),
            params,
            seed,
            &tok,
        )?);
    }
    let meta = PreprocessMeta {
        format_version: FORMAT_VERSION,
        params: params.clone(),
        seed,
        vocab_size: tok.vocab_size(),
        splits,
    };
    let path = out_dir.join("preprocess.json");
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| format_err(&path, e))?;
    std::fs::write(&path, json).map_err(io_err(&path))?;
    Ok(meta)
}

/// A preprocessed split in memory, ready for training or evaluation.
#[derive(Debug, Clone)]
pub struct Split {
    pub name: String,
    /// Image id of each row (repeated for augmented copies).
    pub ids: Vec<String>,
    /// 0 for the clean view, 1.. for augmented copies.
    pub copies: Vec<u32>,
    /// Normalised images, (rows, 3, size, size), f32 on the CPU.
    pub images: candle_core::Tensor,
    /// Reference captions of each row.
    pub captions: Vec<Vec<String>>,
    /// Token ids of each caption (no BOS/EOS).
    pub tokens: Vec<Vec<Vec<u32>>>,
}

impl Split {
    /// Loads split `name` (`train`, `valid`, `test`, `align_train`,
    /// `align_valid`) of a [`run`] output.
    pub fn load(out_dir: &Path, name: &str) -> Result<Self, PreprocessError> {
        if !SPLITS.iter().any(|(n, _)| *n == name) && name != FOUNDATION_SPLIT {
            return Err(PreprocessError::UnknownSplit(name.to_owned()));
        }
        let meta = PreprocessMeta::load(out_dir)?;
        let summary = meta
            .split(name)
            .ok_or_else(|| PreprocessError::MissingSplit {
                split: name.to_owned(),
                dir: out_dir.to_owned(),
            })?;
        let dir = out_dir.join(name);
        let s = meta.params.image_size as usize;
        let plane = s * s;
        let (mean, std) = (meta.params.mean, meta.params.std);
        let mut data: Vec<f32> = Vec::with_capacity(summary.rows * 3 * plane);
        for shard in &summary.shards {
            let path = dir.join(shard);
            let bytes = std::fs::read(&path).map_err(io_err(&path))?;
            let st =
                safetensors::SafeTensors::deserialize(&bytes).map_err(|e| format_err(&path, e))?;
            let t = st.tensor("images").map_err(|e| format_err(&path, e))?;
            if t.dtype() != safetensors::Dtype::U8 || t.shape().get(1..) != Some(&[3, s, s][..]) {
                return Err(format_err(
                    &path,
                    format!(
                        "expected u8 (n, 3, {s}, {s}), got {:?} {:?}",
                        t.dtype(),
                        t.shape()
                    ),
                ));
            }
            for row in t.data().chunks_exact(3 * plane) {
                for (c, chan) in row.chunks_exact(plane).enumerate() {
                    let (m, sd) = (mean[c], std[c]);
                    data.extend(chan.iter().map(|&v| (f32::from(v) / 255.0 - m) / sd));
                }
            }
        }
        let rows = data.len() / (3 * plane);
        let index_path = dir.join("index.jsonl");
        let f = File::open(&index_path).map_err(io_err(&index_path))?;
        let (mut ids, mut copies, mut captions, mut tokens) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, line) in BufReader::new(f).lines().enumerate() {
            let line = line.map_err(io_err(&index_path))?;
            let row: IndexRow = serde_json::from_str(&line)
                .map_err(|e| format_err(&index_path, format!("line {}: {e}", i + 1)))?;
            ids.push(row.image_id);
            copies.push(row.copy);
            captions.push(row.captions);
            tokens.push(row.tokens);
        }
        if ids.len() != rows {
            return Err(format_err(
                &index_path,
                format!("{} index rows for {rows} image rows", ids.len()),
            ));
        }
        let images =
            candle_core::Tensor::from_vec(data, (rows, 3, s, s), &candle_core::Device::Cpu)?;
        Ok(Self {
            name: name.to_owned(),
            ids,
            copies,
            images,
            captions,
            tokens,
        })
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}
