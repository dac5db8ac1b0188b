//! Data-set content digests, memoised by (path, size, mtime) so that a no-op
//! sweep does not re-read gigabytes of images.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{io, write_atomic, CacheError};

#[derive(Debug, Default, Serialize, Deserialize)]
struct Memo {
    files: BTreeMap<String, MemoEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct MemoEntry {
    size: u64,
    mtime_ns: u128,
    digest: String,
}

/// The data files of a MUGE directory: `IC_*` and `ALIGN_*` `.tsv`/`.jsonl`.
fn data_files(dir: &Path) -> Result<Vec<std::path::PathBuf>, CacheError> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .map_err(io(dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            (name.starts_with("IC_") || name.starts_with("ALIGN_"))
                && (name.ends_with(".tsv") || name.ends_with(".jsonl"))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// blake3 over (file name, file digest) of every data file, sorted by name.
pub fn data_digest(dir: &Path, memo_path: &Path) -> Result<String, CacheError> {
    let files = data_files(dir)?;
    if files.is_empty() {
        return Err(CacheError::Corrupt {
            path: dir.to_path_buf(),
            message: "no MUGE data files (IC_train.tsv, IC_train.jsonl, ...) in this directory"
                .into(),
        });
    }
    files_digest(b"ecic-data-v1\0", &files, memo_path)
}

/// blake3 over `tag` then (file name, file digest) of each of `files` in the order given;
/// file digests are memoised in `memo_path` by (absolute path, size, mtime). Data sets and
/// real checkpoints (`model::hf`) are digested through this.
pub fn files_digest(
    tag: &[u8],
    files: &[std::path::PathBuf],
    memo_path: &Path,
) -> Result<String, CacheError> {
    let mut memo: Memo = fs::read(memo_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut changed = false;
    let mut h = blake3::Hasher::new();
    h.update(tag);
    for p in files {
        let meta = fs::metadata(p).map_err(io(p))?;
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let abs = std::path::absolute(p)
            .unwrap_or(p.clone())
            .display()
            .to_string();
        let digest = match memo.files.get(&abs) {
            Some(e) if e.size == meta.len() && e.mtime_ns == mtime_ns => e.digest.clone(),
            _ => {
                let mut fh = blake3::Hasher::new();
                fh.update_mmap(p).map_err(io(p))?;
                let d = fh.finalize().to_hex().to_string();
                memo.files.insert(
                    abs,
                    MemoEntry {
                        size: meta.len(),
                        mtime_ns,
                        digest: d.clone(),
                    },
                );
                changed = true;
                d
            }
        };
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(digest.as_bytes());
    }
    if changed {
        write_atomic(memo_path, &serde_json::to_vec(&memo).expect("json"))?;
    }
    Ok(h.finalize().to_hex().to_string())
}
