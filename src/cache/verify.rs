//! File digests of an entry and the checks that use them.
//!
//! [`Pending::publish_with`](super::Pending::publish_with) records the blake3
//! digest and size of every file of an entry in its `manifest.json`
//! (`digests`). An entry is checked against them whenever its content is
//! reused: by the sweep before a stage reads it as an input, when the store
//! imports its outputs, and by `ecic verify`. A damaged entry (a flipped byte,
//! a truncated or deleted file, a manifest that does not parse or has no
//! digests) is moved aside into `runs/quarantine/` by [`Cache::quarantine`],
//! which makes its key a cache miss again: the stage is computed anew rather
//! than a wrong number being reported.
//!
//! Not covered: `stage.log`, a hard link to `logs/<key>.log`, which grows
//! again when the key is computed again (it is a record, not a result).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{io, Cache, CacheError, Manifest};

/// The file of an entry that is not digested (see the module docs).
pub const LOG: &str = "stage.log";

/// Where damaged entries are moved (`runs/quarantine/<key>.<secs>/`).
pub const QUARANTINE: &str = "quarantine";

/// Size and blake3 digest (hex) of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub size: u64,
    pub blake3: String,
}

impl FileDigest {
    pub fn of_bytes(bytes: &[u8]) -> FileDigest {
        FileDigest {
            size: bytes.len() as u64,
            blake3: blake3::hash(bytes).to_hex().to_string(),
        }
    }

    /// Digest a file by mapping it (no copy through a buffer).
    pub fn of_file(path: &Path) -> std::io::Result<FileDigest> {
        let size = fs::metadata(path)?.len();
        let mut h = blake3::Hasher::new();
        h.update_mmap(path)?;
        Ok(FileDigest {
            size,
            blake3: h.finalize().to_hex().to_string(),
        })
    }
}

/// What is wrong with an entry (or a checkpoint): the first problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Damage {
    #[error("manifest.json: {0}")]
    Manifest(String),
    #[error("manifest.json records no file digests (written by an older ecic), so its content cannot be checked")]
    NoDigests,
    #[error("manifest.json is for key {found}")]
    WrongKey { found: String },
    #[error("{file}: missing")]
    Missing { file: String },
    #[error("{file}: {found} bytes where the manifest records {expected}")]
    Size {
        file: String,
        expected: u64,
        found: u64,
    },
    #[error("{file}: content differs from the digest the manifest records (blake3 {found}, recorded {expected})")]
    Digest {
        file: String,
        expected: String,
        found: String,
    },
    #[error("{file}: cannot be read: {message}")]
    Unreadable { file: String, message: String },
}

/// Compare what was read (or digested) of `file` with what was recorded.
pub fn check(file: &str, expected: &FileDigest, found: &FileDigest) -> Result<(), Damage> {
    if expected.size != found.size {
        return Err(Damage::Size {
            file: file.to_string(),
            expected: expected.size,
            found: found.size,
        });
    }
    if expected.blake3 != found.blake3 {
        return Err(Damage::Digest {
            file: file.to_string(),
            expected: expected.blake3.clone(),
            found: found.blake3.clone(),
        });
    }
    Ok(())
}

/// Digests of every file under `dir` (relative paths, `/`-separated), except
/// the stage log.
pub(crate) fn digest_tree(dir: &Path) -> Result<BTreeMap<String, FileDigest>, CacheError> {
    fn walk(
        root: &Path,
        dir: &Path,
        out: &mut BTreeMap<String, FileDigest>,
    ) -> Result<(), CacheError> {
        for e in fs::read_dir(dir).map_err(io(dir))? {
            let p = e.map_err(io(dir))?.path();
            if p.is_dir() {
                walk(root, &p, out)?;
                continue;
            }
            let rel = p
                .strip_prefix(root)
                .unwrap_or(&p)
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            if rel == LOG || rel == "manifest.json" {
                continue;
            }
            out.insert(rel, FileDigest::of_file(&p).map_err(io(&p))?);
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

/// Read an entry's manifest.
pub(crate) fn read_manifest(entry: &Path) -> Result<Manifest, Damage> {
    let mpath = entry.join("manifest.json");
    let bytes = fs::read(&mpath).map_err(|e| Damage::Unreadable {
        file: "manifest.json".into(),
        message: e.to_string(),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| Damage::Manifest(e.to_string()))
}

/// A damaged entry moved aside.
#[derive(Debug, Clone)]
pub struct Quarantined {
    pub key: String,
    pub damage: Damage,
    /// Where it now is (`runs/quarantine/...`); `None` if another process had
    /// already moved it or was recomputing the key.
    pub moved_to: Option<PathBuf>,
}

impl Cache {
    /// Check every recorded file of a complete entry against its digest;
    /// returns the manifest. Reads each file once (mapped).
    pub fn verify(&self, key: &str) -> Result<Manifest, Damage> {
        let dir = self.entry(key);
        let manifest = read_manifest(&dir)?;
        if manifest.key != key {
            return Err(Damage::WrongKey {
                found: manifest.key.clone(),
            });
        }
        if manifest.digests.is_empty() {
            return Err(Damage::NoDigests);
        }
        for (file, want) in &manifest.digests {
            let p = dir.join(file);
            let got = match FileDigest::of_file(&p) {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Damage::Missing { file: file.clone() })
                }
                Err(e) => {
                    return Err(Damage::Unreadable {
                        file: file.clone(),
                        message: e.to_string(),
                    })
                }
            };
            check(file, want, &got)?;
        }
        Ok(manifest)
    }

    /// Move a damaged entry aside into `runs/quarantine/<key>.<secs>/` (with a
    /// `damage.txt` saying why), so that its key is a cache miss and the stage
    /// is computed again. Skipped (`moved_to: None`) while another process
    /// holds the key's lock: that one is computing or moving it already.
    pub fn quarantine(&self, key: &str, damage: Damage) -> Result<Quarantined, CacheError> {
        let Some(_lock) = self.try_lock(key)? else {
            return Ok(Quarantined {
                key: key.to_string(),
                damage,
                moved_to: None,
            });
        };
        let root = self.runs.join(QUARANTINE);
        fs::create_dir_all(&root).map_err(io(&root))?;
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut to = root.join(format!("{key}.{secs}"));
        let mut n = 1;
        while to.exists() {
            to = root.join(format!("{key}.{secs}.{n}"));
            n += 1;
        }
        let from = self.entry(key);
        match fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Quarantined {
                    key: key.to_string(),
                    damage,
                    moved_to: None,
                })
            }
            Err(e) => {
                return Err(CacheError::Io {
                    path: from,
                    source: e,
                })
            }
        }
        let _ = fs::write(to.join("damage.txt"), format!("{damage}\n"));
        let _ = fs::remove_file(self.unsynced_marker(key));
        Ok(Quarantined {
            key: key.to_string(),
            damage,
            moved_to: Some(to),
        })
    }
}
