//! Content-addressed stage outputs under `runs/objects-v1/<key>/`.
//!
//! An entry is complete exactly when its `manifest.json` exists, and it only
//! ever appears by renaming a fully written, fsynced temporary directory into
//! place ([`Pending::publish`]); a crashed or killed stage leaves at most a
//! temporary directory under `objects-v1/.tmp/`, which never looks complete and
//! which `ecic gc` removes. Per-key file locks (`runs/locks/`) make two
//! processes on one runs directory never compute the same stage twice.
//!
//! Layout of a runs directory:
//! - `objects-v1/<key>/`: complete stage outputs (manifest.json, metrics.json,
//!   curves.jsonl, captions.jsonl, stage.log, and the stage's own files)
//! - `objects-v1/.tmp/`: outputs being written
//! - `stages/<key>.json`: the description `run-stage` computes from
//! - `scratch/<key>/`: a stage's resumable state (training checkpoints)
//! - `status/<key>.failed`: why the last attempt of a stage failed
//! - `logs/<key>.log`: the log of the current or last attempt
//! - `data/`: materialised data sets (the synthetic default)
//! - `ecic.sqlite`: the store

mod digest;
mod entry;

use std::fs;
use std::path::{Path, PathBuf};

pub use digest::data_digest;
pub use entry::{CaptionRecord, Manifest, StageOutputs};

/// Bump to start a fresh object root (old entries are then ignored and gc'able).
pub const OBJECTS: &str = "objects-v1";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Corrupt { path: PathBuf, message: String },
}

pub(crate) fn io(path: &Path) -> impl Fn(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A runs directory's cache.
#[derive(Debug, Clone)]
pub struct Cache {
    runs: PathBuf,
}

impl Cache {
    pub fn open(runs: &Path) -> Result<Cache, CacheError> {
        for sub in [
            OBJECTS,
            &format!("{OBJECTS}/.tmp"),
            "stages",
            "scratch",
            "status",
            "logs",
            "locks",
        ] {
            let p = runs.join(sub);
            fs::create_dir_all(&p).map_err(io(&p))?;
        }
        Ok(Cache {
            runs: runs.to_path_buf(),
        })
    }

    pub fn runs(&self) -> &Path {
        &self.runs
    }

    pub fn entry(&self, key: &str) -> PathBuf {
        self.runs.join(OBJECTS).join(key)
    }

    /// Complete = published with a manifest.
    pub fn is_complete(&self, key: &str) -> bool {
        self.entry(key).join("manifest.json").is_file()
    }

    pub fn desc_path(&self, key: &str) -> PathBuf {
        self.runs.join("stages").join(format!("{key}.json"))
    }

    pub fn scratch(&self, key: &str) -> PathBuf {
        self.runs.join("scratch").join(key)
    }

    pub fn failed_marker(&self, key: &str) -> PathBuf {
        self.runs.join("status").join(format!("{key}.failed"))
    }

    pub fn log_path(&self, key: &str) -> PathBuf {
        self.runs.join("logs").join(format!("{key}.log"))
    }

    /// Write a stage's description for `run-stage` (atomically).
    pub fn write_desc(&self, desc: &crate::plan::StageDesc) -> Result<(), CacheError> {
        let path = self.desc_path(&desc.key);
        let text = serde_json::to_vec_pretty(desc).expect("stage descriptions serialize");
        write_atomic(&path, &text)
    }

    pub fn read_desc(&self, key: &str) -> Result<crate::plan::StageDesc, CacheError> {
        let path = self.desc_path(key);
        let text = fs::read(&path).map_err(io(&path))?;
        serde_json::from_slice(&text).map_err(|e| CacheError::Corrupt {
            path,
            message: e.to_string(),
        })
    }

    /// Take the exclusive lock of a key (blocks while another process holds it).
    pub fn lock(&self, key: &str) -> Result<StageLock, CacheError> {
        let path = self.runs.join("locks").join(format!("{key}.lock"));
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        fs4::fs_std::FileExt::lock_exclusive(&file).map_err(io(&path))?;
        Ok(StageLock { _file: file })
    }

    /// A lock on the whole runs directory's orchestration (one sweep process
    /// ingests at a time per key; used around store ingest of shared stages).
    pub fn try_lock(&self, key: &str) -> Result<Option<StageLock>, CacheError> {
        let path = self.runs.join("locks").join(format!("{key}.lock"));
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        match fs4::fs_std::FileExt::try_lock_exclusive(&file) {
            Ok(true) => Ok(Some(StageLock { _file: file })),
            Ok(false) => Ok(None),
            Err(e) => Err(CacheError::Io { path, source: e }),
        }
    }

    /// Start writing a new entry.
    pub fn begin(&self, key: &str) -> Result<Pending, CacheError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = self
            .runs
            .join(OBJECTS)
            .join(".tmp")
            .join(format!("{key}.{}.{nanos}", std::process::id()));
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(Pending {
            dir,
            target: self.entry(key),
            published: false,
        })
    }

    /// Read a complete entry's outputs for ingestion into the store.
    pub fn outputs(&self, key: &str) -> Result<StageOutputs, CacheError> {
        StageOutputs::read(&self.entry(key), Some(self.entry(key).join("stage.log")))
    }

    /// Remove complete entries not in `keep`, and leftover temporaries.
    /// Returns the removed paths.
    pub fn gc(
        &self,
        keep: &std::collections::HashSet<String>,
        dry_run: bool,
    ) -> Result<Vec<PathBuf>, CacheError> {
        let root = self.runs.join(OBJECTS);
        let mut removed = Vec::new();
        for e in fs::read_dir(&root).map_err(io(&root))? {
            let e = e.map_err(io(&root))?;
            let name = e.file_name().to_string_lossy().to_string();
            if name == ".tmp" {
                for t in fs::read_dir(e.path()).map_err(io(&root))?.flatten() {
                    // Only temporaries no live process is writing: their key's lock is free.
                    let tname = t.file_name().to_string_lossy().to_string();
                    let key = tname.split('.').next().unwrap_or_default().to_string();
                    if let Some(_l) = self.try_lock(&key)? {
                        removed.push(t.path());
                        if !dry_run {
                            let _ = fs::remove_dir_all(t.path());
                        }
                    }
                }
                continue;
            }
            if !keep.contains(&name) {
                removed.push(e.path());
                if !dry_run {
                    fs::remove_dir_all(e.path()).map_err(io(&e.path()))?;
                    let _ = fs::remove_file(self.desc_path(&name));
                    let _ = fs::remove_dir_all(self.scratch(&name));
                }
            }
        }
        Ok(removed)
    }
}

/// Held while a stage is computed; released on drop.
pub struct StageLock {
    _file: fs::File,
}

/// An entry being written. Dropped without [`Pending::publish`], it is removed.
pub struct Pending {
    dir: PathBuf,
    target: PathBuf,
    published: bool,
}

impl Pending {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Write the manifest last, fsync every file and the directory, and rename
    /// into place. If another process published the same key meanwhile, its
    /// entry wins and ours is discarded (same key, same content).
    pub fn publish(mut self, manifest: &Manifest) -> Result<PathBuf, CacheError> {
        let mpath = self.dir.join("manifest.json");
        let text = serde_json::to_vec_pretty(manifest).expect("manifests serialize");
        fs::write(&mpath, text).map_err(io(&mpath))?;
        sync_tree(&self.dir)?;
        match fs::rename(&self.dir, &self.target) {
            Ok(()) => {}
            Err(_) if self.target.join("manifest.json").is_file() => {
                let _ = fs::remove_dir_all(&self.dir);
            }
            Err(e) => {
                return Err(CacheError::Io {
                    path: self.target.clone(),
                    source: e,
                })
            }
        }
        if let Some(parent) = self.target.parent() {
            if let Ok(d) = fs::File::open(parent) {
                let _ = d.sync_all();
            }
        }
        self.published = true;
        Ok(self.target.clone())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.published {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn sync_tree(dir: &Path) -> Result<(), CacheError> {
    for e in fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let p = e.path();
        if p.is_dir() {
            sync_tree(&p)?;
        } else {
            fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(io(&p))?;
        }
    }
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io(dir))
}

/// Write a file by temp + fsync + rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io(dir))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io(dir))?;
    tmp.write_all(bytes).map_err(io(path))?;
    tmp.as_file().sync_all().map_err(io(path))?;
    tmp.persist(path).map_err(|e| CacheError::Io {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}
