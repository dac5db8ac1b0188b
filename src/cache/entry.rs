//! What a complete entry holds and how the store reads it back.

use std::collections::BTreeMap;
use std::fs;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{io, CacheError};

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
    pub fn read(dir: &Path, log_path: Option<PathBuf>) -> Result<StageOutputs, CacheError> {
        let corrupt = |path: &Path, message: String| CacheError::Corrupt {
            path: path.to_path_buf(),
            message,
        };
        let mpath = dir.join("manifest.json");
        let manifest: Manifest = serde_json::from_slice(&fs::read(&mpath).map_err(io(&mpath))?)
            .map_err(|e| corrupt(&mpath, e.to_string()))?;
        let mut metrics = Vec::new();
        let path = dir.join("metrics.json");
        if path.is_file() {
            let m: BTreeMap<String, BTreeMap<String, f64>> =
                serde_json::from_slice(&fs::read(&path).map_err(io(&path))?)
                    .map_err(|e| corrupt(&path, e.to_string()))?;
            for (split, ms) in m {
                for (k, v) in ms {
                    metrics.push((split.clone(), k, v));
                }
            }
        }
        let mut curves = Vec::new();
        for (i, line) in read_lines(&dir.join("curves.jsonl"))?
            .into_iter()
            .enumerate()
        {
            #[derive(Deserialize)]
            struct Point {
                step: u64,
                name: String,
                value: f64,
            }
            let p: Point = serde_json::from_str(&line)
                .map_err(|e| corrupt(&dir.join("curves.jsonl"), format!("line {}: {e}", i + 1)))?;
            curves.push((p.step, p.name, p.value));
        }
        let mut captions = Vec::new();
        for (i, line) in read_lines(&dir.join("captions.jsonl"))?
            .into_iter()
            .enumerate()
        {
            captions.push(serde_json::from_str(&line).map_err(|e| {
                corrupt(&dir.join("captions.jsonl"), format!("line {}: {e}", i + 1))
            })?);
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

fn read_lines(path: &Path) -> Result<Vec<String>, CacheError> {
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let f = fs::File::open(path).map_err(io(path))?;
    let mut out = Vec::new();
    for line in std::io::BufReader::new(f).lines() {
        let line = line.map_err(io(path))?;
        if !line.trim().is_empty() {
            out.push(line);
        }
    }
    Ok(out)
}
