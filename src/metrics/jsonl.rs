//! Reading the files `ecic eval` scores: references in the MUGE jsonl form
//! (`{"image_id": str, "text": [str, ...]}`) and predictions in the
//! submission form (`{"image_id": str, "text": str}`), one object per line.
//! Every bad record is reported with file, line and image id, all at once.

use std::fmt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::Value;

use super::ngram::FastMap;

/// Most problems listed in one error message.
const SHOWN: usize = 20;

/// Why one line is rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    InvalidUtf8,
    Json(String),
    NotObject,
    MissingField(&'static str),
    IdNotString,
    TextNotString,
    TextNotList,
    ReferenceNotString {
        index: usize,
    },
    EmptyReferences,
    Duplicate {
        first_line: usize,
    },
    /// A prediction whose image the references file lacks.
    UnknownImage {
        refs: PathBuf,
    },
    /// A reference image the predictions file lacks.
    MissingPrediction {
        pred: PathBuf,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::InvalidUtf8 => write!(f, "invalid UTF-8"),
            Reason::Json(e) => write!(f, "malformed JSON: {e}"),
            Reason::NotObject => write!(f, "not a JSON object"),
            Reason::MissingField(k) => write!(f, "missing field `{k}`"),
            Reason::IdNotString => write!(f, "`image_id` is not a string"),
            Reason::TextNotString => write!(f, "`text` is not a string"),
            Reason::TextNotList => write!(f, "`text` is not a list of strings"),
            Reason::ReferenceNotString { index } => write!(f, "`text[{index}]` is not a string"),
            Reason::EmptyReferences => write!(f, "empty reference list"),
            Reason::Duplicate { first_line } => {
                write!(f, "duplicate image id (first on line {first_line})")
            }
            Reason::UnknownImage { refs } => {
                write!(f, "prediction for an image not in {}", refs.display())
            }
            Reason::MissingPrediction { pred } => {
                write!(
                    f,
                    "no prediction in {} (use --allow-missing to score it as empty)",
                    pred.display()
                )
            }
        }
    }
}

/// One rejected line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct LineError {
    pub path: PathBuf,
    pub line: usize,
    pub id: Option<String>,
    pub reason: Reason,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.path.display(), self.line)?;
        if let Some(id) = &self.id {
            write!(f, "image {id}: ")?;
        }
        write!(f, "{}", self.reason)
    }
}

/// Errors of reading and matching the input files.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: no records", path.display())]
    Empty { path: PathBuf },
    #[error("{}", list(.0))]
    Lines(Vec<LineError>),
}

fn list(errors: &[LineError]) -> String {
    let mut out: Vec<String> = errors.iter().take(SHOWN).map(ToString::to_string).collect();
    if errors.len() > SHOWN {
        out.push(format!("... and {} more bad records", errors.len() - SHOWN));
    }
    out.join("\n")
}

/// One reference image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefRecord {
    pub line: usize,
    pub image_id: String,
    pub text: Vec<String>,
}

/// One predicted caption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PredRecord {
    pub line: usize,
    pub image_id: String,
    pub text: String,
}

/// A well-formed reference line, parsed straight into its record.
#[derive(serde::Deserialize)]
struct RefLine {
    image_id: String,
    text: Vec<String>,
}

/// A well-formed prediction line.
#[derive(serde::Deserialize)]
struct PredLine {
    image_id: String,
    text: String,
}

/// Read a references file; ids unique, lists non-empty.
pub fn read_references(path: &Path) -> Result<Vec<RefRecord>, InputError> {
    let fast = |line, text: &str| {
        let r: RefLine = serde_json::from_str(text).ok()?;
        (!r.text.is_empty()).then_some(RefRecord {
            line,
            image_id: r.image_id,
            text: r.text,
        })
    };
    read(path, fast, |line, id, obj| {
        let text = match obj.get("text") {
            None => return Err(Reason::MissingField("text")),
            Some(Value::Array(items)) => items,
            Some(_) => return Err(Reason::TextNotList),
        };
        if text.is_empty() {
            return Err(Reason::EmptyReferences);
        }
        let text = text
            .iter()
            .enumerate()
            .map(|(index, v)| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or(Reason::ReferenceNotString { index })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RefRecord {
            line,
            image_id: id,
            text,
        })
    })
}

/// Read a predictions file; ids unique.
pub fn read_predictions(path: &Path) -> Result<Vec<PredRecord>, InputError> {
    let fast = |line, text: &str| {
        let p: PredLine = serde_json::from_str(text).ok()?;
        Some(PredRecord {
            line,
            image_id: p.image_id,
            text: p.text,
        })
    };
    read(path, fast, |line, id, obj| match obj.get("text") {
        None => Err(Reason::MissingField("text")),
        Some(Value::String(s)) => Ok(PredRecord {
            line,
            image_id: id,
            text: s.clone(),
        }),
        Some(_) => Err(Reason::TextNotString),
    })
}

trait Record {
    fn line(&self) -> usize;
    fn id(&self) -> &str;
}

impl Record for RefRecord {
    fn line(&self) -> usize {
        self.line
    }
    fn id(&self) -> &str {
        &self.image_id
    }
}

impl Record for PredRecord {
    fn line(&self) -> usize {
        self.line
    }
    fn id(&self) -> &str {
        &self.image_id
    }
}

/// Every line goes through `fast` (a typed parse of a well-formed record) and,
/// where that fails, through the `Value` walk that names what is wrong.
fn read<T: Record + Send>(
    path: &Path,
    fast: impl Fn(usize, &str) -> Option<T> + Sync,
    record: impl Fn(usize, String, &serde_json::Map<String, Value>) -> Result<T, Reason> + Sync,
) -> Result<Vec<T>, InputError> {
    let bytes = std::fs::read(path).map_err(|source| InputError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    let lines: Vec<(usize, &[u8])> = bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l.strip_suffix(b"\r").unwrap_or(l)))
        .filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace))
        .collect();
    let bad = |line, id, reason| LineError {
        path: path.to_path_buf(),
        line,
        id,
        reason,
    };
    let parsed: Vec<Result<T, LineError>> = lines
        .par_iter()
        .map(|&(line, raw)| {
            let text = std::str::from_utf8(raw).map_err(|_| {
                let lossy = String::from_utf8_lossy(raw);
                let id = serde_json::from_str::<Value>(&lossy).ok().and_then(|v| {
                    v.get("image_id")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                });
                bad(line, id, Reason::InvalidUtf8)
            })?;
            // a struct would also parse from a JSON array: objects only
            if text.trim_start().starts_with('{') {
                if let Some(rec) = fast(line, text) {
                    return Ok(rec);
                }
            }
            let value: Value = serde_json::from_str(text)
                .map_err(|e| bad(line, None, Reason::Json(e.to_string())))?;
            let obj = value
                .as_object()
                .ok_or_else(|| bad(line, None, Reason::NotObject))?;
            let id = match obj.get("image_id") {
                None => return Err(bad(line, None, Reason::MissingField("image_id"))),
                Some(Value::String(s)) => s.clone(),
                Some(other) => return Err(bad(line, Some(other.to_string()), Reason::IdNotString)),
            };
            record(line, id.clone(), obj).map_err(|r| bad(line, Some(id), r))
        })
        .collect();
    let mut errors = Vec::new();
    let mut records = Vec::with_capacity(parsed.len());
    let mut first: FastMap<String, usize> = FastMap::default();
    for r in parsed {
        match r {
            Ok(rec) => match first.get(rec.id()) {
                Some(&first_line) => errors.push(bad(
                    rec.line(),
                    Some(rec.id().to_string()),
                    Reason::Duplicate { first_line },
                )),
                None => {
                    first.insert(rec.id().to_string(), rec.line());
                    records.push(rec);
                }
            },
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(InputError::Lines(errors));
    }
    if records.is_empty() {
        return Err(InputError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(records)
}

/// Predictions put in reference order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aligned<'a> {
    /// `texts[i]` is the prediction for `refs[i]`.
    pub texts: Vec<&'a str>,
    /// Reference images without a prediction, scored as empty captions.
    pub missing: usize,
}

/// Match predictions to references by id. A prediction for an unknown image
/// is an error; a reference image without prediction is one too unless
/// `allow_missing`, which scores it as the empty caption.
pub fn align<'a>(
    refs: &[RefRecord],
    refs_path: &Path,
    preds: &'a [PredRecord],
    pred_path: &Path,
    allow_missing: bool,
) -> Result<Aligned<'a>, InputError> {
    let pos: FastMap<&str, usize> = refs
        .iter()
        .enumerate()
        .map(|(i, r)| (r.image_id.as_str(), i))
        .collect();
    let mut texts: Vec<Option<&str>> = vec![None; refs.len()];
    let mut errors = Vec::new();
    for p in preds {
        match pos.get(p.image_id.as_str()) {
            Some(&i) => texts[i] = Some(&p.text),
            None => errors.push(LineError {
                path: pred_path.to_path_buf(),
                line: p.line,
                id: Some(p.image_id.clone()),
                reason: Reason::UnknownImage {
                    refs: refs_path.to_path_buf(),
                },
            }),
        }
    }
    let mut missing = 0;
    let texts = texts
        .into_iter()
        .zip(refs)
        .map(|(t, r)| {
            t.unwrap_or_else(|| {
                missing += 1;
                if !allow_missing {
                    errors.push(LineError {
                        path: refs_path.to_path_buf(),
                        line: r.line,
                        id: Some(r.image_id.clone()),
                        reason: Reason::MissingPrediction {
                            pred: pred_path.to_path_buf(),
                        },
                    });
                }
                ""
            })
        })
        .collect();
    if !errors.is_empty() {
        return Err(InputError::Lines(errors));
    }
    Ok(Aligned { texts, missing })
}
