//! What a complete entry holds and how the store reads it back.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::verify::{check, read_manifest, Damage, FileDigest};
use super::CacheError;

/// `manifest.json`: written last; its presence marks the entry complete.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub key: String,
    pub kind: String,
    pub label: String,
    pub params: Value,
    pub inputs: Vec<String>,
    pub kind_version: u32,
    pub ecic_version: String,
    pub data_digest: String,
    pub seed: u64,
    pub started_at: f64,
    pub finished_at: f64,
    pub wall_s: f64,
    pub cpu_s: Option<f64>,
    pub peak_rss_kb: Option<u64>,
    pub git_commit: Option<String>,
    pub host: Option<String>,
    pub threads: usize,
    pub trainable_params: Option<u64>,
    pub total_params: Option<u64>,
    /// Files of the entry, relative to it.
    pub files: Vec<String>,
    /// Size and blake3 digest of every file but `stage.log`, filled in by
    /// [`Pending::publish_with`](super::Pending::publish_with) (see
    /// [`verify`](super::verify)). Empty in entries of older ecic versions,
    /// which therefore do not verify.
    #[serde(default)]
    pub digests: BTreeMap<String, FileDigest>,
}

/// One generated caption (`captions.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaptionRecord {
    pub split: String,
    pub image_id: String,
    pub caption: String,
    /// The per-image score record, where the split has references.
    #[serde(default)]
    pub scores: Option<Value>,
}

/// A complete entry, as the store ingests it.
#[derive(Debug, Clone)]
pub struct StageOutputs {
    pub manifest: Manifest,
    /// (split, metric, value) from `metrics.json` (`{split: {metric: value}}`).
    pub metrics: Vec<(String, String, f64)>,
    /// (step, name, value) from `curves.jsonl` (`{"step": n, "name": .., "value": ..}`).
    pub curves: Vec<(u64, String, f64)>,
    pub captions: Vec<CaptionRecord>,
    pub log_path: Option<PathBuf>,
}

impl StageOutputs {
    /// Read an entry's results, checking each file against the manifest's
    /// digest as it is read (one read per file: the same bytes are hashed and
    /// parsed). A missing or differing file is [`CacheError::Damaged`].
    pub fn read(dir: &Path, log_path: Option<PathBuf>) -> Result<StageOutputs, CacheError> {
        let damaged = |damage: Damage| CacheError::Damaged {
            entry: dir.to_path_buf(),
            damage,
        };
        let manifest = read_manifest(dir).map_err(damaged)?;
        if manifest.digests.is_empty() {
            return Err(damaged(Damage::NoDigests));
        }
        // A recorded file, verified; `None` if the stage did not write it.
        let read = |file: &str| -> Result<Option<Vec<u8>>, CacheError> {
            let Some(want) = manifest.digests.get(file) else {
                return Ok(None);
            };
            let bytes = fs::read(dir.join(file)).map_err(|e| {
                damaged(if e.kind() == std::io::ErrorKind::NotFound {
                    Damage::Missing { file: file.into() }
                } else {
                    Damage::Unreadable {
                        file: file.into(),
                        message: e.to_string(),
                    }
                })
            })?;
            check(file, want, &FileDigest::of_bytes(&bytes)).map_err(damaged)?;
            Ok(Some(bytes))
        };
        let corrupt = |file: &str, message: String| {
            damaged(Damage::Unreadable {
                file: file.into(),
                message,
            })
        };
        let mut metrics = Vec::new();
        if let Some(bytes) = read("metrics.json")? {
            let m: BTreeMap<String, BTreeMap<String, f64>> = serde_json::from_slice(&bytes)
                .map_err(|e| corrupt("metrics.json", e.to_string()))?;
            for (split, ms) in m {
                for (k, v) in ms {
                    metrics.push((split.clone(), k, v));
                }
            }
        }
        let mut curves = Vec::new();
        if let Some(bytes) = read("curves.jsonl")? {
            for (i, line) in lines(&bytes) {
                #[derive(Deserialize)]
                struct Point {
                    step: u64,
                    name: String,
                    value: f64,
                }
                let p: Point = serde_json::from_str(line)
                    .map_err(|e| corrupt("curves.jsonl", format!("line {}: {e}", i + 1)))?;
                curves.push((p.step, p.name, p.value));
            }
        }
        let mut captions = Vec::new();
        if let Some(bytes) = read("captions.jsonl")? {
            for (i, line) in lines(&bytes) {
                captions.push(
                    serde_json::from_str(line)
                        .map_err(|e| corrupt("captions.jsonl", format!("line {}: {e}", i + 1)))?,
                );
            }
        }
        let log_path = log_path.filter(|p| p.is_file());
        Ok(StageOutputs {
            manifest,
            metrics,
            curves,
            captions,
            log_path,
        })
    }
}

/// Non-blank lines with their 0-based numbers (invalid UTF-8 becomes U+FFFD,
/// which then fails to parse with the line's number).
fn lines(bytes: &[u8]) -> impl Iterator<Item = (usize, &str)> {
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, l)| (i, std::str::from_utf8(l).unwrap_or("\u{fffd}")))
        .filter(|(_, l)| !l.trim().is_empty())
}
