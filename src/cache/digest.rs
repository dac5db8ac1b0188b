//! Data-set content digests, memoised so that a no-op sweep does not re-read
//! gigabytes of images.
//!
//! A memoised digest is reused only while the file's size, mtime, ctime,
//! inode and device are what they were when it was hashed, as git's index
//! does: `cp -p` and `rsync -a` keep size and mtime but not ctime (which no
//! user call can set) or the inode. And only for a file whose ctime was at
//! least [`RACY`] before the hash began: a write in the same clock tick as
//! the hash, after it, would leave every stamp as recorded (git's "racily
//! clean" case); such a file is hashed again next time.

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
    /// Absent in memos of older versions: such entries are never trusted.
    #[serde(default)]
    ctime_ns: Option<i128>,
    #[serde(default)]
    inode: Option<u64>,
    #[serde(default)]
    device: Option<u64>,
    /// When hashing began (ns since the epoch).
    #[serde(default)]
    hashed_at_ns: Option<i128>,
    digest: String,
}

/// How long before hashing a file's last change must be for its memoised
/// digest to be trusted later (see the module docs).
const RACY: i128 = 2_000_000_000;

/// The stamps a memo entry is checked against.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stamp {
    size: u64,
    mtime_ns: u128,
    ctime_ns: Option<i128>,
    inode: Option<u64>,
    device: Option<u64>,
}

fn stamp(meta: &fs::Metadata) -> Stamp {
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            size: meta.len(),
            mtime_ns,
            ctime_ns: Some(meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128),
            inode: Some(meta.ino()),
            device: Some(meta.dev()),
        }
    }
    #[cfg(not(unix))]
    Stamp {
        size: meta.len(),
        mtime_ns,
        ctime_ns: None,
        inode: None,
        device: None,
    }
}

fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

impl MemoEntry {
    /// Whether the memoised digest still describes a file with stamp `s`.
    fn trusted(&self, s: &Stamp) -> bool {
        let (Some(ctime), Some(hashed_at)) = (self.ctime_ns, self.hashed_at_ns) else {
            return false;
        };
        self.size == s.size
            && self.mtime_ns == s.mtime_ns
            && Some(ctime) == s.ctime_ns
            && self.inode == s.inode
            && self.device == s.device
            && ctime + RACY <= hashed_at
    }
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
        let st = stamp(&meta);
        let abs = std::path::absolute(p)
            .unwrap_or(p.clone())
            .display()
            .to_string();
        let digest = match memo.files.get(&abs) {
            Some(e) if e.trusted(&st) => e.digest.clone(),
            _ => {
                let hashed_at = now_ns();
                let mut fh = blake3::Hasher::new();
                fh.update_mmap(p).map_err(io(p))?;
                let d = fh.finalize().to_hex().to_string();
                // Stamped again after hashing: a write during the hash
                // changes ctime, and the entry is then not trusted.
                let after = fs::metadata(p).map(|m| stamp(&m)).map_err(io(p))?;
                memo.files.insert(
                    abs,
                    MemoEntry {
                        size: st.size,
                        mtime_ns: st.mtime_ns,
                        ctime_ns: if after == st { st.ctime_ns } else { None },
                        inode: st.inode,
                        device: st.device,
                        hashed_at_ns: Some(hashed_at),
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
