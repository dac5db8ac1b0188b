//! The SQLite store: one file, `runs/ecic.sqlite`, in WAL mode.
//!
//! Only the orchestrator writes here (workers on a cluster never touch it:
//! SQLite over a network filesystem is not safe); it ingests each finished
//! stage's manifest and outputs from the cache. Reports read only from here and
//! the cache. The schema lives in [`schema`] as migrations applied in place;
//! `docs/store.md` documents it, with the `results` view users query.

pub mod read;
pub mod report_queries;
mod schema;
mod write;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;

pub use write::{CellRow, StageRow, StoreOp, SweepRow};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("store {path} has schema version {found}, newer than this ecic knows ({known}); upgrade ecic")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("no sweep named `{0}` in the store")]
    NoSweep(String),
    #[error("store {path} is read-only and has schema version {found}, older than this ecic's ({known}); open it once where it is writable to migrate it")]
    ReadOnlyOld {
        path: PathBuf,
        found: i64,
        known: i64,
    },
}

/// Whether this process may write `path` (a file or directory).
fn writable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access(2) reads a NUL-terminated path we own.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
}

pub const FILE_NAME: &str = "ecic.sqlite";

impl Store {
    /// Open (creating and migrating as needed) the store of a runs directory.
    pub fn open(runs: &Path) -> Result<Store, StoreError> {
        let path = runs.join(FILE_NAME);
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let conn = Connection::open(&path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(60)).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        // Off while migrating (the bundled SQLite turns them on by default): a
        // migration that rebuilds a table drops it, which would otherwise
        // cascade to the rows referencing it. The pragma is a no-op inside a
        // transaction, so it is set here, before `migrate` begins one.
        conn.pragma_update(None, "foreign_keys", "OFF")
            .map_err(err)?;
        let mut store = Store { conn, path };
        store.migrate()?;
        store
            .conn
            .pragma_update(None, "foreign_keys", "ON")
            .map_err(|source| StoreError::Sqlite {
                path: store.path.clone(),
                source,
            })?;
        Ok(store)
    }

    /// Open an existing store to read it (reports, status, compare): as
    /// [`Store::open`] where the runs directory is writable, else read-only
    /// (an archived or shared runs directory must stay inspectable).
    pub fn open_existing(runs: &Path) -> Result<Option<Store>, StoreError> {
        let path = runs.join(FILE_NAME);
        if !path.exists() {
            return Ok(None);
        }
        if writable(runs) && writable(&path) {
            return Store::open(runs).map(Some);
        }
        Store::open_read_only(&path).map(Some)
    }

    /// A store on a read-only filesystem or in a directory this user cannot
    /// write: SQLite's WAL mode needs to create `-shm`/`-wal` files beside
    /// the database to read it, so it is opened `immutable` (nothing may
    /// change it meanwhile, which is what read-only means here).
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        use rusqlite::OpenFlags;
        let err = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let abs = std::path::absolute(path).unwrap_or(path.to_path_buf());
        let mut uri = String::from("file:");
        for b in abs.to_string_lossy().bytes() {
            match b {
                b'%' | b'?' | b'#' => uri.push_str(&format!("%{b:02X}")),
                _ => uri.push(b as char),
            }
        }
        uri.push_str("?immutable=1");
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&uri, flags).map_err(err)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(err)?;
        let known = schema::MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::TooNew {
                path: path.to_path_buf(),
                found: version,
                known,
            });
        }
        if version < known {
            return Err(StoreError::ReadOnlyOld {
                path: path.to_path_buf(),
                found: version,
                known,
            });
        }
        Ok(Store {
            conn,
            path: path.to_path_buf(),
        })
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let known = schema::MIGRATIONS.len() as i64;
        // BEGIN IMMEDIATE so two processes opening a new store do not both migrate.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(err)?;
        if version > known {
            return Err(StoreError::TooNew {
                path: self.path.clone(),
                found: version,
                known,
            });
        }
        for (i, m) in schema::MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.execute_batch(m).map_err(err)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(())
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
