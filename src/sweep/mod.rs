//! A sweep as a library call: [`prepare`] a spec into a sealed plan, then
//! [`run_plan`] it — find what the cache holds (verifying what will be
//! reused), record the sweep, hand the stages to run to the scheduler and an
//! executor, record every event, summarise and report. The command line only
//! parses arguments and calls these two.
//!
//! A search under `[search.asha]` ([`asha`]) runs the first rung of every
//! trial and adds the rungs its promotions decide while the batch runs.
//!
//! Run state belongs to the scheduler ([`crate::exec::schedule`]); the sinks
//! here — the store's writer thread ([`record`]), progress bars or plain log
//! lines ([`progress`]) — only record what the events say.

pub mod asha;
mod error;
mod progress;
mod record;
mod reuse;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::cache::Cache;
use crate::exec::{Event, Executor, Outcome, StageJob};
use crate::plan::{Plan, Sealed};
use crate::spec::Spec;
use crate::store::{CellRow, StageRow, Store, StoreOp, SweepRow};

pub use error::SweepError;
pub use reuse::check_reused;

use progress::Progress;
use record::Recorder;

/// Where stages run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExecutorKind {
    /// Child processes on this machine.
    Local,
    /// One `sbatch` job per stage (see docs/cluster.md).
    Slurm,
}

impl ExecutorKind {
    pub fn name(self) -> &'static str {
        match self {
            ExecutorKind::Local => "local",
            ExecutorKind::Slurm => "slurm",
        }
    }
}

/// How to run a plan (the `ecic sweep` options).
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// The runs directory (cache + SQLite store).
    pub runs: PathBuf,
    /// Stages at once (default: one per core).
    pub jobs: Option<usize>,
    pub executor: ExecutorKind,
    /// Go on with independent stages after a failure.
    pub keep_going: bool,
    /// Print what would run, run nothing.
    pub dry_run: bool,
    /// Do not write the HTML report at the end.
    pub no_report: bool,
    /// Slurm: on an interrupt stop following, leave the jobs running.
    pub detach: bool,
    /// Slurm: follow the batch an earlier run of this sweep submitted.
    pub attach: bool,
}

impl SweepOptions {
    /// Options that contradict each other, said before anything is recorded.
    fn check(&self) -> Result<(), SweepError> {
        if self.jobs == Some(0) {
            return Err(SweepError::Usage("--jobs must be at least 1".into()));
        }
        if self.attach && self.executor != ExecutorKind::Slurm {
            return Err(SweepError::Usage("--attach needs --executor slurm".into()));
        }
        Ok(())
    }
}

/// A spec made ready to run: its cache and its sealed plan.
pub struct Prepared {
    pub spec: Spec,
    pub cache: Cache,
    pub plan: Plan<Sealed>,
}

/// What a run did.
#[derive(Debug, Default)]
pub struct RunSummary {
    pub sweep_id: i64,
    /// Stages handed to the executor.
    pub ran: usize,
    /// Of those, computed meanwhile by another process (ours waited for it).
    pub computed_elsewhere: usize,
    /// Stages found complete in the cache.
    pub reused: usize,
    /// Failed stages: (key, reason).
    pub failures: Vec<(String, String)>,
    /// Results that could not be recorded.
    pub record_errors: Vec<String>,
    pub interrupted: bool,
    /// A dry run: nothing was recorded or run.
    pub dry_run: bool,
}

impl RunSummary {
    /// Whether everything asked for was done.
    pub fn status(&self) -> &'static str {
        if self.interrupted {
            "interrupted"
        } else if self.failures.is_empty() && self.record_errors.is_empty() {
            "done"
        } else {
            "failed"
        }
    }

    /// The run as a result: an error if it was interrupted or something failed.
    pub fn check(self) -> Result<RunSummary, SweepError> {
        match self.status() {
            "interrupted" => Err(SweepError::Interrupted),
            "failed" => Err(SweepError::Failed {
                failed: self.failures.len().max(self.record_errors.len()),
            }),
            _ => Ok(self),
        }
    }
}

/// Load the spec, materialise its data, and build the sealed plan.
pub fn prepare(spec_path: &Path, sets: &[String], runs: &Path) -> Result<Prepared, SweepError> {
    let mut spec = Spec::load(spec_path, sets)?;
    let cache = Cache::open(runs)?;
    let data_dir = materialise_data(&spec, &cache)?;
    let memo = cache.data_root().join("digests.json");
    let digest =
        crate::cache::data_digest(&data_dir, &memo).map_err(|e| SweepError::Data(e.to_string()))?;
    crate::spec::checkpoint::resolve(&mut spec, &memo).map_err(SweepError::Data)?;
    let data_dir = std::path::absolute(&data_dir)
        .map_err(SweepError::io(format!("resolving {}", data_dir.display())))?;
    let plan = Plan::of_spec(&spec, data_dir, digest)?;
    // Said now, not by a stage minutes in: pretrain-align trains on ALIGN_train.
    if plan
        .stages()
        .any(|s| s.desc.kind == crate::plan::StageKind::PretrainAlign)
    {
        for file in ["ALIGN_train.tsv", "ALIGN_train.jsonl"] {
            let p = plan.data_dir().join(file);
            if !p.is_file() {
                return Err(SweepError::Data(format!(
                    "data.source: {} is missing: pretrain-align trains on the generic-domain \
                     ALIGN_train split (see docs/data.md)",
                    p.display()
                )));
            }
        }
    }
    Ok(Prepared { spec, cache, plan })
}

/// The data directory of a spec: a MUGE directory, or the synthetic default
/// generated once under `runs/data/synth-<hash>/`.
fn materialise_data(spec: &Spec, cache: &Cache) -> Result<PathBuf, SweepError> {
    let d = &spec.config.data;
    if d.source != "synth" {
        return Ok(spec.dir().join(&d.source));
    }
    let cfg = crate::data::synth::SynthConfig {
        seed: d.synth.seed,
        train: d.synth.train,
        valid: d.synth.valid,
        test: d.synth.test,
        align: d.synth.align,
        // The pretraining corpus only where a cell has foundation stages to feed: a
        // baseline-only or checkpoint sweep does not generate (or digest) it.
        foundation: if spec.cells.iter().any(crate::plan::kind::has_foundations) {
            d.synth.foundation
        } else {
            0
        },
        ..Default::default()
    };
    let id = crate::plan::hash_value(&serde_json::to_value(&cfg).expect("config serializes"));
    let root = cache.data_root();
    let dir = root.join(format!("synth-{}", &id[..16]));
    if dir.join(".complete").is_file() {
        return Ok(dir);
    }
    let _lock = cache.lock(&format!("data-{}", &id[..16]))?;
    if dir.join(".complete").is_file() {
        return Ok(dir);
    }
    // Under the lock, any temporary of this data set is a dead process's
    // (one interrupted before its handler was installed): remove it.
    let prefix = format!(".synth-{}.", &id[..16]);
    for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    eprintln!(
        "generating the synthetic data set into {} ...",
        dir.display()
    );
    let tmp = root.join(format!("{prefix}{}", std::process::id()));
    crate::data::synth::generate(&tmp, &cfg)?;
    let complete = tmp.join(".complete");
    std::fs::write(&complete, b"")
        .map_err(SweepError::io(format!("writing {}", complete.display())))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(SweepError::io(format!("publishing {}", dir.display())))?;
    Ok(dir)
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Run what of `prepared`'s plan is not cached, record it under a sweep
/// revision, print the summary and (unless told not to) write the report.
/// `interrupted` is the flag an interrupt handler sets: running stages are
/// then stopped and recorded as interrupted. Stage failures and interrupts
/// are in the summary ([`RunSummary::check`] makes them an error).
pub fn run_plan(
    prepared: &Prepared,
    opts: &SweepOptions,
    interrupted: Arc<AtomicBool>,
) -> Result<RunSummary, SweepError> {
    opts.check()?;
    let Prepared { spec, cache, plan } = prepared;
    tracing::debug!("sweep: spec, data digest and plan ready");
    // Held until the sweep returns: `ecic gc` removes nothing meanwhile.
    let _root = cache.root_lock(false)?;
    let mut cached: HashSet<String> = plan
        .stages()
        .filter(|s| cache.is_complete(&s.desc.key))
        .map(|s| s.desc.key.clone())
        .collect();
    if opts.dry_run {
        print!(
            "{}",
            plan.render(crate::plan::Format::Table, &|k| cached.contains(k))
        );
        return Ok(RunSummary {
            reused: cached.len(),
            dry_run: true,
            ..Default::default()
        });
    }
    let jobs_at_once = opts.jobs.unwrap_or_else(cores).max(1);
    let threads = (cores() / jobs_at_once).max(1);
    let worker = crate::exec::Worker::current(opts.runs.clone())?;
    let slurm_err = |e: crate::exec::ExecError| SweepError::Usage(e.to_string());
    // Before anything is recorded: a missing batch to attach to is bad usage.
    let (mut executor, attached): (Box<dyn Executor>, Option<Vec<StageJob>>) = match opts.executor {
        ExecutorKind::Local => (
            Box::new(crate::exec::local::LocalExecutor::new(
                worker,
                jobs_at_once,
                interrupted.clone(),
            )),
            None,
        ),
        ExecutorKind::Slurm if opts.attach => {
            let ex = crate::exec::slurm::SlurmExecutor::attach(worker, &spec.config.name)
                .map_err(slurm_err)?
                .interrupt_flag(interrupted.clone(), opts.detach);
            let batch = ex.batch_jobs().to_vec();
            (Box::new(ex), Some(batch))
        }
        ExecutorKind::Slurm => (
            Box::new(
                crate::exec::slurm::SlurmExecutor::new(worker)
                    .batch_name(&spec.config.name)
                    .map_err(slurm_err)?
                    .interrupt_flag(interrupted.clone(), opts.detach),
            ),
            None,
        ),
    };
    let mut store = Store::open(&opts.runs)?;
    let ingested = store.done_keys()?;
    let damaged = check_reused(cache, plan, &mut cached, &ingested)?;
    let executor_name = opts.executor.name();
    let sweep_id = record_sweep(&mut store, spec, plan, &cached, executor_name, jobs_at_once)?;
    for q in &damaged {
        let detail = match &q.moved_to {
            Some(to) => format!("{}; moved to {}", q.damage, to.display()),
            None => q.damage.to_string(),
        };
        store.log_event(sweep_id, Some(&q.key), "quarantined", Some(&detail))?;
    }
    // Held while this process runs the sweep: `status` tells it from a killed one.
    let _alive = cache.sweep_lock(sweep_id)?;
    ingest_missing(&mut store, cache, plan, &cached, &ingested)?;
    tracing::debug!("sweep: store opened and sweep recorded");

    let local = opts.executor == ExecutorKind::Local;
    // A search under successive halving runs the first rung of every trial;
    // the rungs above are added as trials are promoted into them (the
    // promotions the cache's results already decided are replayed first).
    let mut search = asha::SearchRun::of(plan);
    let (deferred, replayed) = match search.as_mut() {
        Some(sr) => {
            let (run, ops) = sr.replay(&store, cache, &cached, sweep_id)?;
            if let Some(e) = store.apply(&ops).into_iter().next() {
                return Err(e.into());
            }
            (sr.deferred(), run.into_iter().collect::<HashSet<String>>())
        }
        None => (HashSet::new(), HashSet::new()),
    };
    let job = |s: &crate::plan::StageNode| StageJob {
        key: s.desc.key.clone(),
        kind: s.desc.kind.name().to_string(),
        label: s.desc.label.clone(),
        deps: pending_ancestors(plan, &s.desc.key, &cached),
        threads,
        resources: s.resources.clone(),
        // The local executor hands cheap stages to its pooled workers
        // inline, which saves a file create and rename per stage.
        desc: (local && crate::exec::pooled_kind(s.desc.kind.name()))
            .then(|| serde_json::to_string(&s.desc).expect("stage descriptions serialize")),
    };
    let to_run: Vec<StageJob> = plan
        .stages()
        .filter(|s| !cached.contains(&s.desc.key))
        .filter(|s| !deferred.contains(&s.desc.key) || replayed.contains(&s.desc.key))
        .map(job)
        .collect();
    let mut written = 0;
    for job in to_run.iter().filter(|j| j.desc.is_none()) {
        let node = plan.get(&job.key).expect("job from plan");
        cache.write_desc(&node.desc)?;
        written += 1;
    }
    tracing::debug!("sweep: {written} stage description files written");
    // An attached sweep follows the batch it submitted before, not its plan's
    // stages to run.
    let followed = attached.unwrap_or(to_run);
    let upstream: HashMap<&str, &[String]> = followed
        .iter()
        .map(|j| (j.key.as_str(), j.deps.as_slice()))
        .collect();
    let mut sink = Progress::new(&followed, plan.len(), cached.len());
    let mut failures: Vec<(String, String)> = Vec::new();
    let recorder = Recorder::start(store, cache.clone());
    let t0 = std::time::Instant::now();
    // Which stages ended done: one whose entry says it began before this run
    // started executing was computed by another process while ours waited for
    // its lock, and is not counted as run here. The run's start, not each
    // stage's hand-out, is the bound: a stage's own process may record its
    // start before the executor's report of it reaches this loop (at once
    // under load, and always on Slurm, whose starts are seen by polling), which
    // made our own stages look computed elsewhere. A stage another process
    // began after this run started is counted as ours (an undercount only).
    // Only training kinds (the ones worth waiting for) are checked.
    let mut finished_done: Vec<String> = Vec::new();
    let running_since = crate::store::now();
    let mut on_event = |ev: Event| {
        if let Event::Started { key, .. } | Event::Finished { key, .. } = &ev {
            if let Some(node) = plan.get(key) {
                sink.learn(key, &node.desc.label);
            }
        }
        sink.event(&ev);
        let at = crate::store::now();
        let op = match &ev {
            Event::Started { key, host, job_id } => StoreOp::Started {
                key: key.clone(),
                host: host.clone(),
                job_id: job_id.clone(),
                at,
            },
            Event::Progress { .. } => return,
            Event::Finished { key, outcome, wall } => {
                let (status, error, wall_s) = match outcome {
                    Outcome::Done => {
                        finished_done.push(key.clone());
                        recorder.done(key);
                        return;
                    }
                    Outcome::Failed(msg) => {
                        let reason = failure_reason(cache, key, msg);
                        failures.push((key.clone(), reason.clone()));
                        ("failed", Some(reason), Some(wall.as_secs_f64()))
                    }
                    Outcome::Skipped { because_of } => (
                        "skipped",
                        Some(skip_reason(&upstream, key, because_of)),
                        None,
                    ),
                    // Our process only waited for this key while another
                    // computes it (it holds the key's lock): that one's stage
                    // is not interrupted, so leave its record alone.
                    Outcome::Interrupted(_) if matches!(cache.try_lock(key), Ok(None)) => return,
                    Outcome::Interrupted(why) => ("interrupted", Some(why.clone()), None),
                };
                StoreOp::Ended {
                    key: key.clone(),
                    status: status.into(),
                    error,
                    wall_s,
                    at,
                }
            }
        };
        recorder.record(op);
    };
    // Promotions, decided as the rungs' results arrive.
    let mut promoted_jobs = 0usize;
    let mut search_errors: Vec<(String, String)> = Vec::new();
    let mut grow = |key: &str| -> Vec<StageJob> {
        let Some(sr) = search.as_mut() else {
            return Vec::new();
        };
        if !search_errors.is_empty() {
            return Vec::new();
        }
        let (keys, ops) = match sr.on_done(key, cache, sweep_id) {
            Ok(x) => x,
            Err(e) => {
                search_errors.push((key.to_string(), e.to_string()));
                return Vec::new();
            }
        };
        for op in ops {
            recorder.record(op);
        }
        let mut jobs = Vec::new();
        for k in keys.iter().filter(|k| !cached.contains(*k)) {
            let node = plan.get(k).expect("rung stages are planned");
            let j = job(node);
            if j.desc.is_none() {
                if let Err(e) = cache.write_desc(&node.desc) {
                    search_errors.push((k.clone(), e.to_string()));
                    return Vec::new();
                }
            }
            jobs.push(j);
        }
        promoted_jobs += jobs.len();
        jobs
    };
    let executed = crate::exec::schedule::run_growing(
        executor.as_mut(),
        &followed,
        &HashMap::new(),
        opts.keep_going,
        &mut on_event,
        &mut grow,
    );
    tracing::debug!("sweep: executor returned");
    // Whatever the executor did, what finished is recorded before returning.
    let (store, record_errors) = recorder.finish();
    tracing::debug!("sweep: store writer finished");
    let mut store = store?;
    executed?;
    sink.finish();
    failures.extend(search_errors);
    let interrupted_now = interrupted.load(Ordering::SeqCst);
    if let Some(sr) = &search {
        // Stopped trials are said only of a search that ran to its end.
        if failures.is_empty() && !interrupted_now {
            let ops = sr.stopped(&store, sweep_id)?;
            if let Some(e) = store.apply(&ops).into_iter().next() {
                return Err(e.into());
            }
        }
        let (trained, full) = sr.steps();
        eprintln!(
            "search: {trained} of {full} training steps of the budgeted stage ({:.0}%) against \
             every trial run to max_steps",
            100.0 * trained as f64 / full.max(1) as f64
        );
    }
    let waited = finished_done
        .iter()
        .filter(|k| {
            plan.get(k)
                .is_some_and(|n| !crate::exec::pooled_kind(n.desc.kind.name()))
        })
        .filter(|k| {
            let began = crate::cache::verify::read_manifest(&cache.entry(k))
                .map(|m| m.started_at)
                .unwrap_or(f64::INFINITY);
            began < running_since
        })
        .count();
    let summary = RunSummary {
        sweep_id,
        ran: followed.len() + promoted_jobs,
        computed_elsewhere: waited,
        reused: cached.len(),
        failures,
        record_errors,
        interrupted: interrupted_now,
        dry_run: false,
    };
    store.finish_sweep(sweep_id, summary.status())?;
    print_summary(&store, sweep_id);
    tracing::debug!("sweep: summary printed");
    let elapsed = t0.elapsed().as_secs_f64();
    if waited > 0 {
        eprintln!(
            "{} stages run, {waited} computed meanwhile by another process, {} reused from the \
             cache, in {elapsed:.1} s",
            summary.ran - waited,
            summary.reused,
        );
    } else {
        eprintln!(
            "{} stages run, {} reused from the cache, in {elapsed:.1} s",
            summary.ran, summary.reused,
        );
    }
    if !damaged.is_empty() {
        eprintln!(
            "{} damaged cache entr{} moved to {} and computed again (see above)",
            damaged.len(),
            if damaged.len() == 1 {
                "y was"
            } else {
                "ies were"
            },
            opts.runs.join(crate::cache::verify::QUARANTINE).display()
        );
    }
    if !opts.no_report && !summary.interrupted {
        // This run's revision, even if a later one of the name has started.
        let target = match store.revision(sweep_id) {
            Ok((rev, n)) if n > 1 => format!("{}@{rev}", spec.config.name),
            _ => spec.config.name.clone(),
        };
        write_report(spec, &target, &opts.runs);
    }
    for (key, reason) in &summary.failures {
        let label = plan
            .get(key)
            .map(|n| n.desc.label.clone())
            .unwrap_or_default();
        eprintln!("failed: {label} [{}]: {reason}", &key[..12]);
        eprintln!("  log: {}", cache.log_path(key).display());
    }
    for e in &summary.record_errors {
        eprintln!("error recording results: {e}");
    }
    // The executor's last sync ran while the above was recorded and printed.
    executor.durable()?;
    tracing::debug!("sweep: outputs durable");
    Ok(summary)
}

/// The stages to run among every ancestor of `key`, not only its inputs: a
/// stage reads entries further up (a model lineage's weights, the
/// preprocessed data), and one of those may be a quarantined entry computed
/// again below a cached input.
fn pending_ancestors(plan: &Plan<Sealed>, key: &str, cached: &HashSet<String>) -> Vec<String> {
    let mut out: Vec<String> = plan
        .ancestors(key)
        .into_iter()
        .map(|n| &n.desc.key)
        .filter(|k| !cached.contains(*k))
        .cloned()
        .collect();
    out.sort();
    out
}

/// Why a stage was not run: a failed stage upstream of it, or (without `--keep-going`) a
/// failure elsewhere that stopped the sweep. `deps` maps each stage run now to its inputs.
fn skip_reason(deps: &HashMap<&str, &[String]>, key: &str, failed: &str) -> String {
    let short = &failed[..12.min(failed.len())];
    let mut seen = HashSet::new();
    let mut todo = vec![key];
    while let Some(k) = todo.pop() {
        for d in deps.get(k).copied().unwrap_or_default() {
            if d == failed {
                return format!("skipped: upstream stage {short} failed");
            }
            if seen.insert(d.as_str()) {
                todo.push(d);
            }
        }
    }
    if failed.is_empty() {
        "skipped: not started after a failure".into()
    } else {
        format!(
            "skipped: not started because stage {short} failed and the sweep stopped \
             (--keep-going runs independent stages)"
        )
    }
}

/// The failure marker's error if the stage wrote one, else the executor's
/// message, with the log's last lines.
fn failure_reason(cache: &Cache, key: &str, fallback: &str) -> String {
    let marker = std::fs::read(cache.failed_marker(key))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string));
    marker.unwrap_or_else(|| {
        let tail = std::fs::read_to_string(cache.log_path(key))
            .map(|s| {
                s.lines()
                    .rev()
                    .take(3)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join(" | ")
            })
            .unwrap_or_default();
        if tail.is_empty() {
            fallback.to_string()
        } else {
            format!("{fallback}: {tail}")
        }
    })
}

fn record_sweep(
    store: &mut Store,
    spec: &Spec,
    plan: &Plan<Sealed>,
    cached: &HashSet<String>,
    executor: &str,
    jobs: usize,
) -> Result<i64, SweepError> {
    let spec_hash = crate::plan::hash_value(&spec.base);
    let row = SweepRow {
        name: spec.config.name.clone(),
        spec_path: spec.path.display().to_string(),
        spec_text: spec.text.clone(),
        sets: spec.sets.clone(),
        spec_hash,
        axes: spec.axes.clone(),
        data_dir: plan.data_dir().display().to_string(),
        data_digest: plan.data_digest().to_string(),
        executor: executor.to_string(),
        jobs,
        git_commit: crate::stages::git_commit(),
        host: crate::stages::hostname(),
    };
    let cells: Vec<CellRow> = plan
        .cells
        .iter()
        .map(|c| CellRow {
            name: c.cell.name.clone(),
            backbone: c.cell.backbone.clone(),
            peft: c.cell.peft.clone(),
            fusion: c.cell.fusion.clone(),
            seed: c.cell.seed,
            overrides: serde_json::Value::Object(c.cell.overrides.iter().cloned().collect()),
            stages: c
                .stages
                .iter()
                .map(|(k, key)| (k.name().to_string(), key.clone()))
                .collect(),
        })
        .collect();
    let stages: Vec<StageRow> = plan
        .stages()
        .map(|s| StageRow {
            key: s.desc.key.clone(),
            kind: s.desc.kind.name().to_string(),
            label: s.desc.label.clone(),
            params: s.desc.fingerprint.params.clone(),
            inputs: s.desc.fingerprint.inputs.clone(),
            reused: cached.contains(&s.desc.key),
        })
        .collect();
    Ok(store.begin_sweep(&row, &cells, &stages)?)
}

/// Cached stages the store has no results for (a deleted or fresh store, or a
/// stage computed by another sweep process): ingest them from the cache (each
/// verified beforehand by `check_reused`).
fn ingest_missing(
    store: &mut Store,
    cache: &Cache,
    plan: &Plan<Sealed>,
    cached: &HashSet<String>,
    ingested: &HashSet<String>,
) -> Result<(), SweepError> {
    let mut ops = Vec::new();
    for s in plan.stages() {
        let key = &s.desc.key;
        if cached.contains(key) && !ingested.contains(key) {
            ops.push(StoreOp::Ingest(Box::new(cache.outputs(key)?)));
        }
    }
    // One transaction for all of them.
    match store.apply(&ops).into_iter().next() {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

fn print_summary(store: &Store, sweep_id: i64) {
    match crate::report::terminal::sweep_summary(store, sweep_id) {
        Ok(table) => println!("{table}"),
        Err(e) => eprintln!("could not print the summary: {e}"),
    }
}

fn write_report(spec: &Spec, target: &str, runs: &Path) {
    // Build the report command's own arguments, as a user would type them.
    #[derive(clap::Parser)]
    struct Wrap {
        #[command(flatten)]
        args: crate::report::cmd::ReportArgs,
    }
    let argv = [
        "report".to_string(),
        target.to_string(),
        "--runs".into(),
        runs.display().to_string(),
        "--out".into(),
        crate::report::default_dir(&spec.config.name)
            .display()
            .to_string(),
    ];
    match <Wrap as clap::Parser>::try_parse_from(argv) {
        Ok(w) => {
            if let Err(e) = crate::report::cmd::run_report(&w.args) {
                eprintln!("could not write the report: {e}");
            }
        }
        Err(e) => eprintln!("could not write the report: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_reasons_tell_an_upstream_failure_from_a_stopped_sweep() {
        let (a, b, c, x) = (
            "a".repeat(64),
            "b".repeat(64),
            "c".repeat(64),
            "x".repeat(64),
        );
        let (db, dc) = (vec![a.clone()], vec![b.clone()]);
        let deps: HashMap<&str, &[String]> = [
            (a.as_str(), &[][..]),
            (b.as_str(), db.as_slice()),
            (c.as_str(), dc.as_slice()),
        ]
        .into_iter()
        .collect();
        // c depends on a through b.
        assert_eq!(
            skip_reason(&deps, &c, &a),
            "skipped: upstream stage aaaaaaaaaaaa failed"
        );
        // x failed elsewhere: c was only left unstarted.
        let why = skip_reason(&deps, &c, &x);
        assert!(
            why.starts_with("skipped: not started because stage xxxxxxxxxxxx failed"),
            "{why}"
        );
        assert!(why.contains("--keep-going"), "{why}");
        assert_eq!(
            skip_reason(&deps, &c, ""),
            "skipped: not started after a failure"
        );
    }
}
