//! The store's writer while a sweep runs (see [`Recorder`]).

use crate::cache::Cache;
use crate::store::{Store, StoreOp};

use super::SweepError;

/// How long the recorder lets finished stages' records wait before one
/// transaction commits them all (and so the most a killed sweep leaves
/// unrecorded; the next sweep ingests it from the cache).
const RECORD_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// The store's writer while stages run: a thread that owns the store, reads
/// finished stages' outputs from the cache, and commits the sweep's events in
/// batches — one transaction at most every [`RECORD_EVERY`], and one at the
/// end — instead of one or two per stage on the dispatcher's thread.
///
/// Nothing computed can be lost this way: a stage's outputs are in the cache
/// before it is reported finished, an uncommitted batch is simply not in the
/// store yet, and a sweep ingests every cached stage its store lacks when it
/// starts (`ingest_missing` in [`super::run_plan`]). A batch is one transaction, so a killed sweep
/// leaves the store as it was after some earlier batch.
pub(super) struct Recorder {
    tx: std::sync::mpsc::Sender<Record>,
    thread: std::thread::JoinHandle<(Store, Vec<String>)>,
}

enum Record {
    Op(StoreOp),
    /// A stage completed in the cache: ingest its outputs.
    Done(String),
}

impl Recorder {
    pub(super) fn start(mut store: Store, cache: Cache) -> Recorder {
        let (tx, rx) = std::sync::mpsc::channel::<Record>();
        let thread = std::thread::spawn(move || {
            use std::sync::mpsc::RecvTimeoutError;
            let mut errors = Vec::new();
            let mut batch: Vec<StoreOp> = Vec::new();
            let mut due: Option<std::time::Instant> = None;
            loop {
                let got = match due {
                    Some(t) => {
                        rx.recv_timeout(t.saturating_duration_since(std::time::Instant::now()))
                    }
                    None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                };
                let end = match got {
                    Ok(Record::Op(op)) => {
                        batch.push(op);
                        false
                    }
                    Ok(Record::Done(key)) => {
                        match cache.outputs(&key) {
                            Ok(out) => batch.push(StoreOp::Ingest(Box::new(out))),
                            Err(e) => errors.push(format!("{key}: {e}")),
                        }
                        false
                    }
                    Err(RecvTimeoutError::Timeout) => false,
                    Err(RecvTimeoutError::Disconnected) => true,
                };
                let now = std::time::Instant::now();
                if !batch.is_empty() && due.is_none() {
                    due = Some(now + RECORD_EVERY);
                }
                if end || due.is_some_and(|t| now >= t) {
                    errors.extend(store.apply(&batch).into_iter().map(|e| e.to_string()));
                    batch.clear();
                    due = None;
                }
                if end {
                    return (store, errors);
                }
            }
        });
        Recorder { tx, thread }
    }

    pub(super) fn record(&self, op: StoreOp) {
        let _ = self.tx.send(Record::Op(op));
    }

    pub(super) fn done(&self, key: &str) {
        let _ = self.tx.send(Record::Done(key.to_string()));
    }

    /// Commit what is left and hand the store back, with the errors met.
    pub(super) fn finish(self) -> (Result<Store, SweepError>, Vec<String>) {
        drop(self.tx);
        match self.thread.join() {
            Ok((store, errors)) => (Ok(store), errors),
            Err(_) => (
                Err(SweepError::Io {
                    what: "recording results".into(),
                    source: std::io::Error::other("the store writer panicked"),
                }),
                Vec::new(),
            ),
        }
    }
}
