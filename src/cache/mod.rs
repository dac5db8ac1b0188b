//! Content-addressed stage outputs under `runs/objects-v1/<key>/`.
//!
//! An entry is complete exactly when its `manifest.json` exists (and it is not
//! an unsynced entry of an earlier boot, see below), and it only ever appears
//! by renaming a fully written temporary directory into place
//! ([`Pending::publish`]); a crashed or killed stage leaves at most a temporary
//! directory under `objects-v1/.tmp/`, which never looks complete and which
//! `ecic gc` removes. Per-key file locks (`runs/locks/`) make two processes on
//! one runs directory never compute the same stage twice.
//!
//! Durability (what survives a power loss or kernel crash, as opposed to a
//! killed process) comes in two forms, see [`Durability`]:
//! - `Now`: every file and both directories are fsynced before and after the
//!   rename. Used by `run-stage KEY` as cluster jobs run it: a cluster worker
//!   shares no kernel (and no page cache) with the orchestrator.
//! - `Deferred`: nothing is fsynced on the stage's critical path (on this
//!   machine the fsyncs were ~30 ms of a 45 ms trivial stage); used by the
//!   local executor's stages. Before the rename the publisher creates a marker
//!   `runs/unsynced/<key>` whose content is the kernel's boot id (a hard link
//!   to `runs/unsynced/.boot-<id>`); the local executor calls
//!   [`Cache::sync_deferred`] every few seconds while stages publish and once
//!   at the end: one `syncfs` of the runs directory's filesystem, then the
//!   markers listed before it are removed. Why this is safe: a killed process
//!   never matters (the rename comes after every write, and the page cache
//!   keeps what a dead process wrote); after a power loss or kernel crash an
//!   entry whose marker is still there reads another boot id, so it is not
//!   complete and its stage runs again. On a journaling filesystem metadata
//!   reaches the disk in order, so an entry whose rename survived has its
//!   marker too; the loss is bounded by what published since the last sync.
//!
//! Trust: every file of an entry has its blake3 digest and size in the
//! manifest, checked whenever the entry's content is reused; a damaged entry
//! is moved into `quarantine/` and its stage computed again ([`verify`]).
//!
//! Locks: a sweep holds the runs directory's root lock shared for as long as
//! it runs, `ecic gc` takes it exclusively ([`Cache::root_lock`]), so nothing
//! is collected while a sweep may be about to reuse it.
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
//! - `quarantine/<key>.<secs>/`: damaged entries moved aside, with `damage.txt`
//! - `locks/`: per-key locks and the root lock
//! - `ecic.sqlite`: the store

mod digest;
mod entry;
pub mod verify;

use std::fs;
use std::path::{Path, PathBuf};

pub use digest::{data_digest, files_digest};
pub use entry::{CaptionRecord, Manifest, StageOutputs};
pub use verify::{Damage, FileDigest, Quarantined};

/// Bump to start a fresh object root (old entries are then ignored, and `ecic
/// gc` removes older roots, see [`Cache::gc`]).
pub const OBJECTS: &str = "objects-v1";

/// Markers of entries published with [`Durability::Deferred`] and not yet synced.
const UNSYNCED: &str = "unsynced";

/// How [`Pending::publish`] makes an entry durable (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync every file and directory before returning.
    Now,
    /// No fsync; a boot-id marker until [`Cache::sync_deferred`] has run.
    Deferred,
}

/// The kernel's boot id (Linux), read once.
fn boot_id() -> Option<&'static str> {
    static BOOT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    })
    .as_deref()
}

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
    /// A complete entry whose content does not match its manifest.
    #[error("cache entry {entry}: {damage}")]
    Damaged { entry: PathBuf, damage: Damage },
    #[error("{path} is in use by a running sweep; try again when it has finished")]
    Busy { path: PathBuf },
}

pub(crate) fn io(path: &Path) -> impl Fn(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `runs/objects-v1/<key>/`: where an entry lives, for those that hold a runs
/// path but no [`Cache`] (which creates the layout when opened).
pub fn entry_path(runs: &Path, key: &str) -> PathBuf {
    runs.join(OBJECTS).join(key)
}

/// `runs/status/<key>.failed`: why the last attempt of a stage failed.
pub fn failed_marker_path(runs: &Path, key: &str) -> PathBuf {
    runs.join("status").join(format!("{key}.failed"))
}

/// `runs/logs/<key>.log`: the log of the current or last attempt.
pub fn log_path(runs: &Path, key: &str) -> PathBuf {
    runs.join("logs").join(format!("{key}.log"))
}

fn sweep_lock_path(runs: &Path, sweep_id: i64) -> PathBuf {
    runs.join("locks").join(format!("sweep-{sweep_id}.lock"))
}

/// Whether a process still runs the sweep recorded as `sweep_id` in `runs`
/// (it holds its [`Cache::sweep_lock`]). A sweep killed with SIGKILL, or on a
/// machine that rebooted, holds nothing. Works on a read-only runs directory.
pub fn sweep_alive(runs: &Path, sweep_id: i64) -> bool {
    let Ok(file) = fs::File::open(sweep_lock_path(runs, sweep_id)) else {
        return false;
    };
    match fs4::fs_std::FileExt::try_lock_exclusive(&file) {
        Ok(true) => {
            let _ = fs4::fs_std::FileExt::unlock(&file);
            false
        }
        Ok(false) => true,
        // Cannot tell (no locks on this filesystem): as recorded.
        Err(_) => true,
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
            UNSYNCED,
        ] {
            let p = runs.join(sub);
            fs::create_dir_all(&p).map_err(io(&p))?;
        }
        Ok(Cache {
            runs: runs.to_path_buf(),
        })
    }

    /// A cache to read only (`ecic verify`, status of an archived runs
    /// directory): creates nothing, so it works on a read-only filesystem.
    pub fn open_read(runs: &Path) -> Cache {
        Cache {
            runs: runs.to_path_buf(),
        }
    }

    pub fn runs(&self) -> &Path {
        &self.runs
    }

    /// The object root (`runs/objects-v1/`).
    pub fn objects(&self) -> PathBuf {
        self.runs.join(OBJECTS)
    }

    pub fn entry(&self, key: &str) -> PathBuf {
        entry_path(&self.runs, key)
    }

    /// Where materialised data sets live (`runs/data/`).
    pub fn data_root(&self) -> PathBuf {
        self.runs.join("data")
    }

    /// Complete = published with a manifest, and not an unsynced entry of an
    /// earlier boot (which a power loss may have torn).
    pub fn is_complete(&self, key: &str) -> bool {
        self.entry(key).join("manifest.json").is_file() && !self.stale_unsynced(key)
    }

    fn unsynced_marker(&self, key: &str) -> PathBuf {
        self.runs.join(UNSYNCED).join(key)
    }

    /// An unsynced marker exists and was not written in this boot.
    fn stale_unsynced(&self, key: &str) -> bool {
        match fs::read_to_string(self.unsynced_marker(key)) {
            Ok(b) => Some(b.trim()) != boot_id(),
            Err(_) => false,
        }
    }

    /// Make every entry published with [`Durability::Deferred`] in this boot
    /// durable: one `syncfs` of the runs directory's filesystem, then remove the
    /// markers listed before it. Returns how many entries it covered.
    pub fn sync_deferred(&self) -> Result<usize, CacheError> {
        let dir = self.runs.join(UNSYNCED);
        let Some(boot) = boot_id() else {
            return Ok(0);
        };
        let listed: Vec<PathBuf> = match fs::read_dir(&dir) {
            Ok(rd) => rd
                .flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .map(|e| e.path())
                .filter(|p| {
                    fs::read_to_string(p)
                        .map(|b| b.trim() == boot)
                        .unwrap_or(false)
                })
                .collect(),
            Err(_) => return Ok(0),
        };
        if listed.is_empty() {
            return Ok(0);
        }
        sync_filesystem(&self.runs)?;
        for p in &listed {
            let _ = fs::remove_file(p);
        }
        Ok(listed.len())
    }

    pub fn desc_path(&self, key: &str) -> PathBuf {
        self.runs.join("stages").join(format!("{key}.json"))
    }

    pub fn scratch(&self, key: &str) -> PathBuf {
        self.runs.join("scratch").join(key)
    }

    pub fn failed_marker(&self, key: &str) -> PathBuf {
        failed_marker_path(&self.runs, key)
    }

    pub fn log_path(&self, key: &str) -> PathBuf {
        log_path(&self.runs, key)
    }

    /// Write a stage's description for `run-stage` (atomically: temp file +
    /// rename, so a concurrent reader never sees half of it). Not fsynced: a
    /// sweep rewrites the descriptions of every stage it runs, so one lost to a
    /// power loss is simply written again.
    pub fn write_desc(&self, desc: &crate::plan::StageDesc) -> Result<(), CacheError> {
        use std::io::Write;
        let path = self.desc_path(&desc.key);
        let text = serde_json::to_vec_pretty(desc).expect("stage descriptions serialize");
        // Unchanged (a resumed sweep): keep it, rather than replace an inode.
        if fs::read(&path).is_ok_and(|old| old == text) {
            return Ok(());
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io(dir))?;
        tmp.write_all(&text).map_err(io(&path))?;
        tmp.persist(&path).map_err(|e| CacheError::Io {
            path: path.clone(),
            source: e.error,
        })?;
        Ok(())
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
        let file = lock_file(&path)?;
        fs4::fs_std::FileExt::lock_exclusive(&file).map_err(io(&path))?;
        Ok(StageLock { _file: file })
    }

    /// The key's lock if no other process holds it, else `None` (without
    /// waiting). Used where a held lock means "someone is on it already":
    /// gc's temporaries, quarantining.
    pub fn try_lock(&self, key: &str) -> Result<Option<StageLock>, CacheError> {
        let path = self.runs.join("locks").join(format!("{key}.lock"));
        let file = lock_file(&path)?;
        match fs4::fs_std::FileExt::try_lock_exclusive(&file) {
            Ok(true) => Ok(Some(StageLock { _file: file })),
            Ok(false) => Ok(None),
            Err(e) => Err(CacheError::Io { path, source: e }),
        }
    }

    /// The runs directory's root lock: shared by every sweep for as long as it
    /// runs (waiting for a running gc), exclusive for `ecic gc`, which fails
    /// with [`CacheError::Busy`] rather than wait for a sweep of hours.
    pub fn root_lock(&self, exclusive: bool) -> Result<StageLock, CacheError> {
        let path = self.runs.join("locks").join("root.lock");
        let file = lock_file(&path)?;
        let got = if exclusive {
            fs4::fs_std::FileExt::try_lock_exclusive(&file)
        } else {
            fs4::fs_std::FileExt::lock_shared(&file).map(|()| true)
        };
        match got {
            Ok(true) => Ok(StageLock { _file: file }),
            Ok(false) => Err(CacheError::Busy {
                path: self.runs.clone(),
            }),
            Err(e) => Err(CacheError::Io { path, source: e }),
        }
    }

    /// Held (shared) by a sweep process for as long as it runs: how `ecic
    /// status` tells a running sweep from one that was killed (see
    /// [`sweep_alive`]). Never waits for long: only a status check takes the
    /// lock exclusively, for an instant.
    pub fn sweep_lock(&self, sweep_id: i64) -> Result<StageLock, CacheError> {
        let path = sweep_lock_path(&self.runs, sweep_id);
        let file = lock_file(&path)?;
        fs4::fs_std::FileExt::lock_shared(&file).map_err(io(&path))?;
        Ok(StageLock { _file: file })
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
            marker: self.unsynced_marker(key),
            published: false,
        })
    }

    /// Read a complete entry's outputs for ingestion into the store, each file
    /// checked against its digest as it is read.
    pub fn outputs(&self, key: &str) -> Result<StageOutputs, CacheError> {
        StageOutputs::read(&self.entry(key), Some(self.entry(key).join("stage.log")))
    }

    /// Remove complete entries not in `keep`, leftover temporaries, object
    /// roots of older formats (`objects-v0`, ...) and quarantined entries.
    /// Returns the removed paths. Callers hold [`Cache::root_lock`] exclusively.
    pub fn gc(
        &self,
        keep: &std::collections::HashSet<String>,
        dry_run: bool,
    ) -> Result<Vec<PathBuf>, CacheError> {
        let root = self.objects();
        let mut removed = Vec::new();
        for e in fs::read_dir(&self.runs).map_err(io(&self.runs))?.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let version = |n: &str| {
                n.strip_prefix("objects-v")
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok())
            };
            // Only older roots: a newer ecic's root is not ours to judge.
            let older =
                matches!((version(&name), version(OBJECTS)), (Some(v), Some(ours)) if v < ours);
            if older && e.path().is_dir() {
                removed.push(e.path());
                if !dry_run {
                    fs::remove_dir_all(e.path()).map_err(io(&e.path()))?;
                }
            }
        }
        let quarantine = self.runs.join(verify::QUARANTINE);
        if let Ok(rd) = fs::read_dir(&quarantine) {
            for e in rd.flatten() {
                removed.push(e.path());
                if !dry_run {
                    fs::remove_dir_all(e.path()).map_err(io(&e.path()))?;
                }
            }
        }
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
                    let _ = fs::remove_file(self.unsynced_marker(&name));
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
    /// `runs/unsynced/<key>`.
    marker: PathBuf,
    published: bool,
}

impl Pending {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// [`Pending::publish_with`] [`Durability::Now`].
    pub fn publish(self, manifest: &Manifest) -> Result<PathBuf, CacheError> {
        self.publish_with(manifest, Durability::Now)
    }

    /// Write the manifest last and rename into place, made durable as
    /// `durability` says (see the module docs). If another process published
    /// the same key meanwhile, its entry wins and ours is discarded (same key,
    /// same content), unless that entry is a stale unsynced one of an earlier
    /// boot, which ours replaces. Callers hold the key's lock.
    pub fn publish_with(
        mut self,
        manifest: &Manifest,
        durability: Durability,
    ) -> Result<PathBuf, CacheError> {
        let durability = if boot_id().is_some() {
            durability
        } else {
            Durability::Now
        };
        // Decided before our own marker is written (it would hide an old one).
        let stale = self.target.exists() && !self.target_complete();
        // The files were just written: digesting them reads the page cache.
        let mut manifest = manifest.clone();
        manifest.digests = verify::digest_tree(&self.dir)?;
        let mpath = self.dir.join("manifest.json");
        let text = serde_json::to_vec_pretty(&manifest).expect("manifests serialize");
        fs::write(&mpath, text).map_err(io(&mpath))?;
        match durability {
            Durability::Now => sync_tree(&self.dir)?,
            Durability::Deferred => write_marker(&self.marker)?,
        }
        if stale {
            // A stale entry (an unsynced one of an earlier boot, or a directory
            // without a manifest): move it aside and drop it.
            let aside = self.dir.with_extension("stale");
            if fs::rename(&self.target, &aside).is_ok() {
                let _ = fs::remove_dir_all(&aside);
            }
        }
        match fs::rename(&self.dir, &self.target) {
            Ok(()) => {}
            Err(_) if self.target_complete() => {
                let _ = fs::remove_dir_all(&self.dir);
            }
            Err(e) => {
                return Err(CacheError::Io {
                    path: self.target.clone(),
                    source: e,
                })
            }
        }
        if durability == Durability::Now {
            if let Some(parent) = self.target.parent() {
                if let Ok(d) = fs::File::open(parent) {
                    let _ = d.sync_all();
                }
            }
            // An earlier deferred publication of this key is now durable too.
            let _ = fs::remove_file(&self.marker);
        }
        self.published = true;
        Ok(self.target.clone())
    }

    fn target_complete(&self) -> bool {
        if !self.target.join("manifest.json").is_file() {
            return false;
        }
        match fs::read_to_string(&self.marker) {
            Ok(b) => Some(b.trim()) == boot_id(),
            Err(_) => true,
        }
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

/// Mark an entry as published without fsync in this boot: a hard link to the
/// boot's `unsynced/.boot-<id>` file (whose content is the boot id), so that a
/// marker costs no inode of its own (creating inodes is slow on a busy ext4).
fn write_marker(marker: &Path) -> Result<(), CacheError> {
    let boot = boot_id().unwrap_or_default();
    let dir = marker.parent().unwrap_or(Path::new("."));
    let shared = dir.join(format!(".boot-{boot}"));
    if !shared.is_file() {
        let tmp = dir.join(format!(".boot-{boot}.{}", std::process::id()));
        fs::write(&tmp, boot.as_bytes()).map_err(io(&tmp))?;
        fs::rename(&tmp, &shared).map_err(io(&shared))?;
    }
    let link = || match fs::hard_link(&shared, marker) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    };
    match link() {
        Ok(true) => Ok(()),
        // A marker left by an earlier boot (of the stale entry being
        // replaced) gives way to this boot's.
        Ok(false) => {
            let _ = fs::remove_file(marker);
            match link() {
                Ok(_) => Ok(()),
                Err(_) => fs::write(marker, boot.as_bytes()).map_err(io(marker)),
            }
        }
        // No hard links here: a file of its own.
        Err(_) => fs::write(marker, boot.as_bytes()).map_err(io(marker)),
    }
}

/// Flush the whole filesystem holding `path` (Linux `syncfs`; elsewhere
/// `sync`).
fn sync_filesystem(path: &Path) -> Result<(), CacheError> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let d = fs::File::open(path).map_err(io(path))?;
        // SAFETY: syncfs on a descriptor we own.
        if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
            return Err(CacheError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        // SAFETY: sync(2) takes no arguments.
        unsafe { libc::sync() };
        Ok(())
    }
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

/// A lock file, created if missing (its content is never written: only its `flock` matters).
fn lock_file(path: &Path) -> Result<fs::File, CacheError> {
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io(path))
}
