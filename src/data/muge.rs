//! MUGE ECommerce-IC files in and out: the first step of the pipeline. Every
//! stage's data comes through [`read_split`], synthetic data goes out through
//! [`SplitWriter`].
//!
//! Layout (the MUGE data set's own, see the README): `PREFIX.tsv` holds `image_id<TAB>base64(JPEG)` per
//! line, `PREFIX.jsonl` holds `{"image_id": str, "text": [str, ...]}` per
//! line; PREFIX is `IC_train`, `IC_valid`, `IC_test` or, for the generic
//! domain, `ALIGN_train` / `ALIGN_valid`.
//!
//! Reading streams: the jsonl (captions only, small) is read whole, the tsv a
//! chunk of lines at a time; each chunk's base64 and image decoding runs on
//! rayon, and the caller's `map` turns each decoded image into what it keeps
//! (a resized tensor row, a size), so no more than one chunk of full images is
//! ever alive. Every bad record is collected with file, line and reason; the
//! policy decides whether any bad record fails the split.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::lines::{LineReader, RawLine};

/// What to do when a split has bad records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BadRecordPolicy {
    /// Any bad record fails the split (the error lists them all).
    Fail,
    /// Bad records are left out and counted.
    Skip,
}

impl std::fmt::Display for BadRecordPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Fail => "fail",
            Self::Skip => "skip",
        })
    }
}

/// Why a record is bad.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadReason {
    #[error("blank line")]
    Blank,
    #[error("line is {len} bytes, over the limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("line ends in CRLF (\\r\\n); MUGE files use LF")]
    Crlf,
    #[error("file starts with a UTF-8 byte order mark")]
    Bom,
    #[error("invalid UTF-8 at byte {at}")]
    InvalidUtf8 { at: usize },
    #[error("missing field {0}")]
    MissingField(&'static str),
    #[error("field {field} {why}")]
    BadField {
        field: &'static str,
        why: &'static str,
    },
    #[error("not valid JSON: {0}")]
    BadJson(String),
    #[error("bad base64: {0}")]
    BadBase64(String),
    #[error("not a decodable image: {0}")]
    BadImage(String),
    #[error("truncated JPEG: no end-of-image marker (FF D9) after its {0} bytes")]
    TruncatedJpeg(usize),
    #[error("duplicate image_id {id} (first on line {first})")]
    DuplicateId { id: String, first: usize },
    #[error("image_id {0} is not in the tsv")]
    NotInTsv(String),
    #[error("image_id {0} has no captions, but this split needs references")]
    NoCaptions(String),
}

/// A bad record: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    pub file: PathBuf,
    pub line: usize,
    pub reason: BadReason,
}

impl std::fmt::Display for BadRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.reason)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MugeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("missing data file {0}")]
    MissingFile(PathBuf),
    #[error("{split}: {} bad record(s), policy is fail:\n{}", bad.len(), list_bad(bad, 20))]
    BadRecords { split: String, bad: Vec<BadRecord> },
    #[error("{split}: no usable image in {} ({} bad record(s) left out){}", file.display(), bad.len(),
        if bad.is_empty() { String::new() } else { format!(":\n{}", list_bad(bad, 20)) })]
    Empty {
        split: String,
        file: PathBuf,
        bad: Vec<BadRecord>,
    },
}

/// The first `n` bad records, one a line, and a count of the rest.
pub fn list_bad(bad: &[BadRecord], n: usize) -> String {
    let mut s: Vec<String> = bad.iter().take(n).map(|b| format!("  {b}")).collect();
    if bad.len() > n {
        s.push(format!("  ... and {} more", bad.len() - n));
    }
    s.join("\n")
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> MugeError + '_ {
    move |source| MugeError::Io {
        path: path.to_owned(),
        source,
    }
}

/// How to read a split.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    pub policy: BadRecordPolicy,
    /// Whether every image needs at least one caption (train, valid, and
    /// test when it is scored).
    pub require_refs: bool,
    /// Longest accepted line in bytes.
    pub max_line_bytes: usize,
    /// Lines decoded together on rayon; bounds memory.
    pub chunk_lines: usize,
    /// Whether a split without a single good record is fine (`data inspect`
    /// reports it instead); otherwise it is [`MugeError::Empty`]: nothing can
    /// be trained or scored on it.
    pub allow_empty: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            policy: BadRecordPolicy::Fail,
            require_refs: true,
            max_line_bytes: 16 << 20,
            chunk_lines: 256,
            allow_empty: false,
        }
    }
}

/// A good record after the caller's `map`.
#[derive(Debug)]
pub struct Record<T> {
    pub image_id: String,
    /// Line in the tsv.
    pub line: usize,
    pub captions: Vec<String>,
    pub value: T,
}

/// What one pass over a split found.
#[derive(Debug, Clone, Default)]
pub struct ReadReport {
    /// Good records handed to the sink.
    pub records: usize,
    /// Bad records left out (all of `bad` under `skip`).
    pub skipped: usize,
    /// Every bad record, sorted by file and line.
    pub bad: Vec<BadRecord>,
}

/// The tsv and jsonl paths of `prefix` (e.g. `IC_train`) in `dir`.
pub fn split_paths(dir: &Path, prefix: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{prefix}.tsv")),
        dir.join(format!("{prefix}.jsonl")),
    )
}

/// Decodes base64 in either alphabet, padded or not.
pub fn decode_base64(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::engine::{
        general_purpose::GeneralPurpose, DecodePaddingMode, GeneralPurposeConfig,
    };
    const CFG: GeneralPurposeConfig =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    const STD: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, CFG);
    const URL: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::URL_SAFE, CFG);
    if s.bytes().any(|b| b == b'-' || b == b'_') {
        URL.decode(s)
    } else {
        STD.decode(s)
    }
}

/// Decode an image, refusing a JPEG cut short: decoders fill the missing
/// rows with grey rather than fail, which would silently train and score on
/// a different picture. A complete JPEG ends with the EOI marker (trailing
/// NUL or whitespace padding allowed).
pub fn decode_image(bytes: &[u8]) -> Result<image::DynamicImage, BadReason> {
    if bytes.starts_with(&[0xFF, 0xD8]) {
        let end = bytes
            .iter()
            .rposition(|&b| b != 0 && !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        if !bytes[..end].ends_with(&[0xFF, 0xD9]) {
            return Err(BadReason::TruncatedJpeg(bytes.len()));
        }
    }
    image::load_from_memory(bytes).map_err(|e| BadReason::BadImage(e.to_string()))
}

/// Checks shared by both files; returns the line as text.
fn check_line<'a>(raw: RawLine<'a>, line_no: usize, max: usize) -> Result<&'a str, BadReason> {
    let bytes = match raw {
        RawLine::TooLong { len, .. } => return Err(BadReason::TooLong { len, max }),
        RawLine::Line(b) => b,
    };
    if line_no == 1 && bytes.starts_with(&[0xEF, 0xBB, 0xBF]) {
        return Err(BadReason::Bom);
    }
    if bytes.last() == Some(&b'\r') {
        return Err(BadReason::Crlf);
    }
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(BadReason::Blank);
    }
    std::str::from_utf8(bytes).map_err(|e| BadReason::InvalidUtf8 {
        at: e.valid_up_to(),
    })
}

/// The id of a line that failed its checks, when one can still be read, so
/// that one broken line is reported once rather than again as a missing
/// partner in the other file.
fn salvage_id(raw: RawLine<'_>, tsv: bool) -> Option<String> {
    let bytes = match raw {
        RawLine::Line(b) => b,
        RawLine::TooLong { head, .. } if tsv => head,
        RawLine::TooLong { .. } => return None,
    };
    let bytes = bytes.strip_prefix(&[0xEF, 0xBB, 0xBF][..]).unwrap_or(bytes);
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    if tsv {
        let id = bytes.split(|&b| b == b'\t').next()?;
        let id = std::str::from_utf8(id).ok()?.trim();
        return (!id.is_empty()).then(|| id.to_owned());
    }
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    v.get("image_id")?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Captions per id, from the jsonl.
struct Refs {
    by_id: HashMap<String, (usize, Vec<String>)>,
    bad: Vec<BadRecord>,
}

fn parse_jsonl_line(text: &str) -> Result<(String, Vec<String>), BadReason> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| BadReason::BadJson(e.to_string()))?;
    let obj = v.as_object().ok_or(BadReason::BadField {
        field: "record",
        why: "is not a JSON object",
    })?;
    let id = match obj.get("image_id") {
        None | Some(serde_json::Value::Null) => return Err(BadReason::MissingField("image_id")),
        Some(serde_json::Value::String(s)) if s.is_empty() => {
            return Err(BadReason::MissingField("image_id"))
        }
        Some(serde_json::Value::String(s)) => s.clone(),
        // Some dumps write numeric ids; they name the same image.
        Some(serde_json::Value::Number(n)) => n.to_string(),
        Some(_) => {
            return Err(BadReason::BadField {
                field: "image_id",
                why: "is not a string",
            })
        }
    };
    let text = match obj.get("text") {
        // The test split may carry ids only.
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::Array(a)) => {
            let mut out = Vec::with_capacity(a.len());
            for c in a {
                match c.as_str() {
                    Some(s) if !s.trim().is_empty() => out.push(s.to_owned()),
                    Some(_) => {
                        return Err(BadReason::BadField {
                            field: "text",
                            why: "holds an empty caption",
                        })
                    }
                    None => {
                        return Err(BadReason::BadField {
                            field: "text",
                            why: "holds a non-string",
                        })
                    }
                }
            }
            out
        }
        Some(_) => {
            return Err(BadReason::BadField {
                field: "text",
                why: "is not a list of strings",
            })
        }
    };
    Ok((id, text))
}

fn read_refs(path: &Path, opts: &ReadOptions) -> Result<Refs, MugeError> {
    let mut refs = Refs {
        by_id: HashMap::new(),
        bad: Vec::new(),
    };
    if !path.exists() {
        return Ok(refs);
    }
    let f = File::open(path).map_err(io_err(path))?;
    let mut lines = LineReader::new(BufReader::with_capacity(1 << 16, f), opts.max_line_bytes);
    while let Some((n, raw)) = lines.next_line().map_err(io_err(path))? {
        let parsed = check_line(raw, n, opts.max_line_bytes).and_then(parse_jsonl_line);
        let bad = |reason| BadRecord {
            file: path.to_owned(),
            line: n,
            reason,
        };
        match parsed {
            Err(reason) => {
                if let Some(id) = salvage_id(raw, false) {
                    // Known but unusable: its image is left out silently.
                    refs.by_id.entry(id).or_insert((n, Vec::new()));
                }
                refs.bad.push(bad(reason));
            }
            Ok((id, text)) => {
                if let Some((first, _)) = refs.by_id.get(&id) {
                    refs.bad
                        .push(bad(BadReason::DuplicateId { id, first: *first }));
                } else if text.is_empty() && opts.require_refs {
                    refs.bad.push(bad(BadReason::NoCaptions(id.clone())));
                    // Known but unusable: the tsv side must not report it again.
                    refs.by_id.insert(id, (n, Vec::new()));
                } else {
                    refs.by_id.insert(id, (n, text));
                }
            }
        }
    }
    Ok(refs)
}

/// A tsv line that passed the cheap checks, waiting for decoding.
struct Pending {
    line: usize,
    id: String,
    b64: String,
    captions: Vec<String>,
}

/// Reads split `prefix` of `dir`, handing good records to `sink` in file
/// order, a chunk at a time. `map` runs on rayon for each decoded image.
///
/// Under [`BadRecordPolicy::Fail`] the whole split is still read so that the
/// error lists every bad record; the sink may have seen good records by then,
/// so callers write into a temporary place (the cache publishes by rename).
pub fn read_split<T, E, M, S>(
    dir: &Path,
    prefix: &str,
    opts: &ReadOptions,
    map: M,
    mut sink: S,
) -> Result<ReadReport, E>
where
    T: Send,
    E: From<MugeError>,
    M: Fn(&str, image::DynamicImage) -> T + Sync,
    S: FnMut(Vec<Record<T>>) -> Result<(), E>,
{
    let (tsv, jsonl) = split_paths(dir, prefix);
    if !tsv.exists() {
        return Err(MugeError::MissingFile(tsv).into());
    }
    if opts.require_refs && !jsonl.exists() {
        return Err(MugeError::MissingFile(jsonl).into());
    }
    let mut refs = read_refs(&jsonl, opts)?;
    let mut bad = std::mem::take(&mut refs.bad);
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut report = ReadReport::default();

    let f = File::open(&tsv).map_err(io_err(&tsv))?;
    let mut lines = LineReader::new(BufReader::with_capacity(1 << 20, f), opts.max_line_bytes);
    let mut pending: Vec<Pending> = Vec::with_capacity(opts.chunk_lines);
    let mut eof = false;
    while !eof {
        match lines.next_line().map_err(io_err(&tsv))? {
            None => eof = true,
            Some((n, raw)) => {
                let checked = check_line(raw, n, opts.max_line_bytes).and_then(|text| {
                    let (id, b64) = text
                        .split_once('\t')
                        .ok_or(BadReason::MissingField("base64 image"))?;
                    let id = id.trim();
                    let b64 = b64.trim();
                    if id.is_empty() {
                        return Err(BadReason::MissingField("image_id"));
                    }
                    if b64.is_empty() {
                        return Err(BadReason::MissingField("base64 image"));
                    }
                    if let Some(first) = seen.get(id) {
                        return Err(BadReason::DuplicateId {
                            id: id.to_owned(),
                            first: *first,
                        });
                    }
                    seen.insert(id.to_owned(), n);
                    let captions = match refs.by_id.get_mut(id) {
                        Some((_, caps)) if caps.is_empty() && opts.require_refs => {
                            // Already reported on its jsonl line.
                            return Err(BadReason::NoCaptions(id.to_owned()));
                        }
                        Some((_, caps)) => std::mem::take(caps),
                        None if opts.require_refs => {
                            return Err(BadReason::NoCaptions(id.to_owned()))
                        }
                        None => Vec::new(),
                    };
                    Ok(Pending {
                        line: n,
                        id: id.to_owned(),
                        b64: b64.to_owned(),
                        captions,
                    })
                });
                match checked {
                    Ok(p) => pending.push(p),
                    // Reported on its jsonl line already; the image is left out.
                    Err(BadReason::NoCaptions(id)) if refs.by_id.contains_key(&id) => {}
                    Err(reason) => {
                        if let Some(id) = salvage_id(raw, true) {
                            seen.entry(id).or_insert(n);
                        }
                        bad.push(BadRecord {
                            file: tsv.clone(),
                            line: n,
                            reason,
                        });
                    }
                }
            }
        }
        if pending.len() >= opts.chunk_lines || (eof && !pending.is_empty()) {
            let chunk = std::mem::take(&mut pending);
            let decoded: Vec<(Pending, Result<T, BadReason>)> = chunk
                .into_par_iter()
                .map(|p| {
                    let v = decode_base64(&p.b64)
                        .map_err(|e| BadReason::BadBase64(e.to_string()))
                        .and_then(|bytes| decode_image(&bytes))
                        .map(|img| map(&p.id, img));
                    (p, v)
                })
                .collect();
            let mut good = Vec::with_capacity(decoded.len());
            for (p, v) in decoded {
                match v {
                    Ok(value) => good.push(Record {
                        image_id: p.id,
                        line: p.line,
                        captions: p.captions,
                        value,
                    }),
                    Err(reason) => bad.push(BadRecord {
                        file: tsv.clone(),
                        line: p.line,
                        reason,
                    }),
                }
            }
            report.records += good.len();
            if !good.is_empty() {
                sink(good)?;
            }
        }
    }
    let mut missing: Vec<(&String, usize)> = refs
        .by_id
        .iter()
        .filter(|(id, _)| !seen.contains_key(*id))
        .map(|(id, (line, _))| (id, *line))
        .collect();
    missing.sort_by_key(|m| m.1);
    for (id, line) in missing {
        bad.push(BadRecord {
            file: jsonl.clone(),
            line,
            reason: BadReason::NotInTsv(id.clone()),
        });
    }
    bad.sort_by(|a, b| a.file.cmp(&b.file).then(a.line.cmp(&b.line)));
    report.skipped += bad.len();
    report.bad = bad;
    if report.records == 0 && !opts.allow_empty {
        return Err(MugeError::Empty {
            split: prefix.to_owned(),
            file: tsv,
            bad: report.bad,
        }
        .into());
    }
    if opts.policy == BadRecordPolicy::Fail && !report.bad.is_empty() {
        return Err(MugeError::BadRecords {
            split: prefix.to_owned(),
            bad: report.bad,
        }
        .into());
    }
    Ok(report)
}

/// Writes one split in MUGE layout, streaming.
pub struct SplitWriter {
    tsv: BufWriter<File>,
    jsonl: BufWriter<File>,
    tsv_path: PathBuf,
    jsonl_path: PathBuf,
}

impl SplitWriter {
    pub fn create(dir: &Path, prefix: &str) -> Result<Self, MugeError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let (tsv_path, jsonl_path) = split_paths(dir, prefix);
        let tsv = BufWriter::new(File::create(&tsv_path).map_err(io_err(&tsv_path))?);
        let jsonl = BufWriter::new(File::create(&jsonl_path).map_err(io_err(&jsonl_path))?);
        Ok(Self {
            tsv,
            jsonl,
            tsv_path,
            jsonl_path,
        })
    }

    /// One image: its JPEG bytes (standard base64 in the file) and captions.
    pub fn write(
        &mut self,
        image_id: &str,
        jpeg: &[u8],
        captions: &[String],
    ) -> Result<(), MugeError> {
        let b64 = base64::engine::general_purpose::STANDARD.encode(jpeg);
        writeln!(self.tsv, "{image_id}\t{b64}").map_err(io_err(&self.tsv_path))?;
        let rec = serde_json::json!({ "image_id": image_id, "text": captions });
        writeln!(self.jsonl, "{rec}").map_err(io_err(&self.jsonl_path))?;
        Ok(())
    }

    pub fn finish(mut self) -> Result<(), MugeError> {
        self.tsv.flush().map_err(io_err(&self.tsv_path))?;
        self.jsonl.flush().map_err(io_err(&self.jsonl_path))?;
        Ok(())
    }
}

/// Writes a prediction (submission) file: `{"image_id": str, "text": str}`
/// per line, the format `ecic eval --pred` reads.
pub fn write_predictions<'a, I>(path: &Path, preds: I) -> Result<(), MugeError>
where
    I: IntoIterator<Item = (&'a str, &'a str)>,
{
    let mut w = BufWriter::new(File::create(path).map_err(io_err(path))?);
    for (id, text) in preds {
        let rec = serde_json::json!({ "image_id": id, "text": text });
        writeln!(w, "{rec}").map_err(io_err(path))?;
    }
    w.flush().map_err(io_err(path))
}

/// Every caption of the good lines of `PREFIX.jsonl`, in file order (for
/// training a tokenizer before the validating pass; bad lines are left to
/// [`read_split`] to report). A missing file gives no captions.
pub fn caption_texts(
    dir: &Path,
    prefix: &str,
    max_line_bytes: usize,
) -> Result<Vec<String>, MugeError> {
    let (_, path) = split_paths(dir, prefix);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let f = File::open(&path).map_err(io_err(&path))?;
    let mut lines = LineReader::new(BufReader::with_capacity(1 << 16, f), max_line_bytes);
    let mut out = Vec::new();
    while let Some((n, raw)) = lines.next_line().map_err(io_err(&path))? {
        if let Ok((_, text)) = check_line(raw, n, max_line_bytes).and_then(parse_jsonl_line) {
            out.extend(text);
        }
    }
    Ok(out)
}
