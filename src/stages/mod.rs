//! Stage kinds: one file each, a short composition of `data`, `model`,
//! `train`, `decode` and `metrics`; and [`run_stage`], the one visible function
//! per node: key -> complete? done : (lock -> run -> publish), used by every
//! executor through `ecic run-stage`.

mod baseline;
mod cider_optimize;
mod domain_adapt;
mod evaluate;
mod outputs;
mod preprocess;
mod pretrain_align;
mod pretrain_lm;
mod pretrain_vision;
mod rerank;
mod training;

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::cache::{Cache, CacheError, Durability, Manifest};
use crate::plan::{StageDesc, StageKind};

pub use evaluate::{decoding_of, Decoding, BATCH as EVALUATE_BATCH};
pub use outputs::Outputs;
pub use training::{Lineage, LINEAGE, WEIGHTS};

/// What a stage kind gets to work with.
pub struct StageCtx<'a> {
    pub desc: &'a StageDesc,
    /// Where to write outputs (a temporary directory published on success).
    pub out: &'a Path,
    /// Survives failed attempts of this key (training checkpoints).
    pub scratch: &'a Path,
    /// Complete input entries, in the description's input order.
    pub inputs: Vec<(StageKind, PathBuf)>,
    pub threads: usize,
    /// The cache's object root (to resolve lineage keys).
    pub objects: PathBuf,
    progress: &'a dyn Fn(u64, u64),
}

impl StageCtx<'_> {
    pub fn progress(&self, step: u64, total: u64) {
        (self.progress)(step, total)
    }

    /// The complete entry of the (first) input of `kind`.
    pub fn input(&self, kind: StageKind) -> Result<&Path, StageError> {
        self.inputs
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, p)| p.as_path())
            .ok_or_else(|| StageError::msg(format!("this stage has no {kind} input")))
    }

    pub fn params<T: serde::de::DeserializeOwned>(&self) -> Result<T, StageError> {
        serde_json::from_value(self.desc.fingerprint.params.clone())
            .map_err(|e| StageError::msg(format!("stage parameters: {e}")))
    }
}

/// Figures a stage reports about itself.
#[derive(Debug, Default, Clone)]
pub struct StageReport {
    pub trainable_params: Option<u64>,
    pub total_params: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("{0}")]
    Message(String),
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// Displayed as the context alone: [`error_chain`] appends the sources.
    #[error("{context}")]
    Other {
        context: String,
        #[source]
        source: anyhow::Error,
    },
}

impl StageError {
    pub fn msg(m: impl Into<String>) -> Self {
        StageError::Message(m.into())
    }
    pub fn ctx<E: Into<anyhow::Error>>(context: impl Into<String>) -> impl FnOnce(E) -> StageError {
        let context = context.into();
        move |e| StageError::Other {
            context,
            source: e.into(),
        }
    }
}

/// How `run_stage` ended.
#[derive(Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// Computed and published now.
    Computed,
    /// Found complete (another process computed it first).
    AlreadyComplete,
}

/// Run one stage by key: the body of `ecic run-stage` (one-shot, with
/// [`Durability::Now`]) and of its pooled form `run-stage --serve` (with
/// [`Durability::Deferred`], synced by the executor afterwards).
pub fn run_stage(
    runs: &Path,
    key: &str,
    progress: &dyn Fn(u64, u64),
    durability: Durability,
) -> Result<RunOutcome, StageError> {
    let cache = Cache::open(runs)?;
    let desc = cache.read_desc(key)?;
    run_stage_desc(&cache, &desc, progress, durability)
}

/// [`run_stage`] with the stage's description at hand (a pooled worker's
/// stdin line) rather than in `runs/stages/KEY.json`.
pub fn run_stage_desc(
    cache: &Cache,
    desc: &StageDesc,
    progress: &dyn Fn(u64, u64),
    durability: Durability,
) -> Result<RunOutcome, StageError> {
    let key = desc.key.as_str();
    if cache.is_complete(key) {
        return Ok(RunOutcome::AlreadyComplete);
    }
    let _lock = cache.lock(key)?;
    if cache.is_complete(key) {
        return Ok(RunOutcome::AlreadyComplete);
    }
    let _ = std::fs::remove_file(cache.failed_marker(key));
    eprintln!(
        "computing {} {} (pid {})",
        desc.label,
        key,
        std::process::id()
    );
    let result = compute(cache, desc, progress, durability);
    if let Err(e) = &result {
        let marker = serde_json::json!({
            "key": key,
            "error": error_chain(e),
            "host": hostname(),
            "at": crate::store::now(),
        });
        let _ =
            crate::cache::write_atomic(&cache.failed_marker(key), marker.to_string().as_bytes());
    }
    result
}

fn compute(
    cache: &Cache,
    desc: &StageDesc,
    progress: &dyn Fn(u64, u64),
    durability: Durability,
) -> Result<RunOutcome, StageError> {
    let started_at = crate::store::now();
    let t0 = Instant::now();
    // A pooled worker runs many stages: CPU time is counted from here, and the
    // peak-RSS mark is reset so it covers this stage only.
    let cpu0 = rusage().0;
    reset_peak_rss();
    let mut inputs = Vec::new();
    for (kind, k) in &desc.inputs {
        if !cache.is_complete(k) {
            return Err(StageError::msg(format!(
                "input {kind} {} is not complete in the cache",
                &k[..12]
            )));
        }
        inputs.push((*kind, cache.entry(k)));
    }
    let scratch = cache.scratch(&desc.key);
    // Only training stages keep resumable state.
    let uses_scratch = !matches!(desc.kind, StageKind::Preprocess | StageKind::Evaluate);
    if uses_scratch {
        std::fs::create_dir_all(&scratch).map_err(crate::cache::io(&scratch))?;
    }
    let pending = cache.begin(&desc.key)?;
    let threads = std::env::var("ECIC_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1usize);
    let objects = cache.objects();
    let ctx = StageCtx {
        desc,
        out: pending.dir(),
        scratch: &scratch,
        inputs,
        threads,
        objects,
        progress,
    };
    let report = match desc.kind {
        StageKind::Preprocess => preprocess::run(&ctx)?,
        StageKind::PretrainVision => pretrain_vision::run(&ctx)?,
        StageKind::PretrainLm => pretrain_lm::run(&ctx)?,
        StageKind::PretrainAlign => pretrain_align::run(&ctx)?,
        StageKind::DomainAdapt => domain_adapt::run(&ctx)?,
        StageKind::CiderOptimize => cider_optimize::run(&ctx)?,
        StageKind::Evaluate => evaluate::run(&ctx)?,
    };
    // Keep the log so far beside the outputs: a hard link where possible (no
    // copy, no new inode). The log file only grows again if this key is
    // computed again, which needs this entry to be gone or stale first.
    let log = cache.log_path(&desc.key);
    if log.is_file() {
        let to = pending.dir().join("stage.log");
        if std::fs::hard_link(&log, &to).is_err() {
            let _ = std::fs::copy(&log, &to);
        }
    }
    let (cpu1, maxrss) = rusage();
    let cpu_s = cpu1.map(|c| c - cpu0.unwrap_or(0.0));
    let peak_rss_kb = peak_rss_kb().or(maxrss);
    let mut files = Vec::new();
    list_files(pending.dir(), pending.dir(), &mut files);
    let manifest = Manifest {
        key: desc.key.clone(),
        kind: desc.kind.name().to_string(),
        label: desc.label.clone(),
        params: desc.fingerprint.params.clone(),
        inputs: desc.fingerprint.inputs.clone(),
        kind_version: desc.kind.version(),
        ecic_version: env!("CARGO_PKG_VERSION").to_string(),
        data_digest: desc.fingerprint.data_digest.clone(),
        seed: desc.fingerprint.seed,
        started_at,
        finished_at: crate::store::now(),
        wall_s: t0.elapsed().as_secs_f64(),
        cpu_s,
        peak_rss_kb,
        git_commit: git_commit(),
        host: hostname(),
        threads,
        trainable_params: report.trainable_params,
        total_params: report.total_params,
        files,
        digests: Default::default(),
    };
    pending.publish_with(&manifest, durability)?;
    if uses_scratch {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    Ok(RunOutcome::Computed)
}

fn list_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                list_files(root, &p, out);
            } else if let Ok(rel) = p.strip_prefix(root) {
                out.push(rel.display().to_string());
            }
        }
    }
    out.sort();
}

/// An error and its sources on one line. A source whose text the message
/// already ends with (`{path}: {source}` errors) is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let text = c.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        src = c.source();
    }
    s
}

pub fn hostname() -> Option<String> {
    hostname::get()
        .ok()
        .map(|h| h.to_string_lossy().to_string())
}

/// The commit ecic was built from, if known.
pub fn git_commit() -> Option<String> {
    option_env!("ECIC_GIT_COMMIT")
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Reset the kernel's peak-RSS mark of this process (Linux >= 4.0; ignored
/// where unavailable).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", b"5");
}

/// Peak RSS (KiB) since the last [`reset_peak_rss`] (`VmHWM`, Linux).
fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU seconds and peak RSS (KiB) of this process.
fn rusage() -> (Option<f64>, Option<u64>) {
    #[cfg(unix)]
    {
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage writes into the struct we own.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } == 0 {
            let cpu = u.ru_utime.tv_sec as f64
                + u.ru_utime.tv_usec as f64 / 1e6
                + u.ru_stime.tv_sec as f64
                + u.ru_stime.tv_usec as f64 / 1e6;
            return (Some(cpu), Some(u.ru_maxrss as u64));
        }
    }
    (None, None)
}
