//! `sweep`, `plan`, `status`, `gc` and the hidden `run-stage`. The sweep is
//! the dispatcher: it decides what runs (the plan less the verified cache
//! hits), hands that to an executor and consumes the events it sends. Run
//! state (what is pending, running, done, failed) is the executor's; the
//! sinks here (the store's writer thread, progress bars, plain log lines) only
//! record what the events say.

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cache::Cache;
use crate::error::{CliError, CliResult};
use crate::exec::{Event, Executor, Outcome, StageJob};
use crate::plan::{Plan, Sealed};
use crate::spec::Spec;
use crate::store::{CellRow, StageRow, Store, StoreOp, SweepRow};

#[derive(Debug, Args)]
pub struct SweepArgs {
    /// The experiment spec (TOML).
    pub spec: PathBuf,
    /// Override a spec value: `--set stages.domain_adapt.lr=1e-4` (TOML value syntax; repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Stages to run at once (default: one per core, one thread each).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Where stages run: `local` or `slurm`.
    #[arg(long, default_value = "local")]
    pub executor: String,
    /// The runs directory (cache + SQLite store).
    #[arg(long, default_value = "runs", env = "ECIC_RUNS")]
    pub runs: PathBuf,
    /// Go on with independent stages after a failure.
    #[arg(long)]
    pub keep_going: bool,
    /// Show what would run, run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not write the HTML report at the end.
    #[arg(long)]
    pub no_report: bool,
    /// Slurm: on Ctrl-C stop following but leave the submitted jobs running.
    #[arg(long)]
    pub detach: bool,
    /// Slurm: follow the jobs an earlier (detached or interrupted) run of this
    /// sweep submitted, instead of submitting again.
    #[arg(long)]
    pub attach: bool,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The experiment spec (TOML).
    pub spec: PathBuf,
    /// Override a spec value (TOML value syntax; repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// `table`, `dot` (Graphviz) or `json`.
    #[arg(long, default_value = "table")]
    pub format: String,
    /// The runs directory whose cache decides hit or miss.
    #[arg(long, default_value = "runs", env = "ECIC_RUNS")]
    pub runs: PathBuf,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[arg(long, default_value = "runs", env = "ECIC_RUNS")]
    pub runs: PathBuf,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    #[arg(long, default_value = "runs", env = "ECIC_RUNS")]
    pub runs: PathBuf,
    /// List what would be removed, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Keep only what the latest N revisions of each sweep name reference
    /// (default: what any recorded revision references).
    #[arg(long, value_name = "N")]
    pub keep_last: Option<usize>,
}

#[derive(Debug, Args)]
pub struct RunStageArgs {
    #[arg(long, default_value = "runs")]
    pub runs: PathBuf,
    /// Report progress as JSON lines on stdout.
    #[arg(long)]
    pub progress: bool,
    /// Publish without fsync, leaving an unsynced marker for the executor's
    /// periodic `syncfs` (the local executor's one-shot stages).
    #[arg(long, hide = true)]
    pub deferred: bool,
    /// Pooled worker: read stage keys from stdin, one a line, run each (its
    /// stderr going to the stage's log), and answer each with a JSON line
    /// `{"finished": KEY, "ok": .., "error": ..}` on stdout; exit at end of input.
    #[arg(long, conflicts_with = "key")]
    pub serve: bool,
    /// The stage's cache key.
    #[arg(required_unless_present = "serve")]
    pub key: Option<String>,
}

fn usage<E: std::fmt::Display>(e: E) -> CliError {
    CliError::Usage(e.to_string())
}

fn other<E: Into<anyhow::Error>>(e: E) -> CliError {
    CliError::Other(e.into())
}

/// Load the spec, materialise its data, and build the sealed plan.
fn prepare(
    spec_path: &Path,
    sets: &[String],
    runs: &Path,
) -> CliResult<(Spec, Cache, Plan<Sealed>)> {
    let mut spec = Spec::load(spec_path, sets).map_err(usage)?;
    let cache = Cache::open(runs).map_err(other)?;
    let data_dir = materialise_data(&spec, runs)?;
    let memo = cache.data_root().join("digests.json");
    let digest = crate::cache::data_digest(&data_dir, &memo).map_err(usage)?;
    crate::spec::checkpoint::resolve(&mut spec, &memo).map_err(usage)?;
    let data_dir = std::path::absolute(&data_dir).map_err(other)?;
    let plan = Plan::of_spec(&spec, data_dir, digest).map_err(other)?;
    // Said now, not by a stage minutes in: pretrain-align trains on ALIGN_train.
    if plan
        .stages()
        .any(|s| s.desc.kind == crate::plan::StageKind::PretrainAlign)
    {
        for file in ["ALIGN_train.tsv", "ALIGN_train.jsonl"] {
            let p = plan.data_dir().join(file);
            if !p.is_file() {
                return Err(CliError::usage(format!(
                    "data.source: {} is missing: pretrain-align trains on the generic-domain \
                     ALIGN_train split (see docs/data.md)",
                    p.display()
                )));
            }
        }
    }
    Ok((spec, cache, plan))
}

/// The data directory of a spec: a MUGE directory, or the synthetic default
/// generated once under `runs/data/synth-<hash>/`.
fn materialise_data(spec: &Spec, runs: &Path) -> CliResult<PathBuf> {
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
    let id = crate::plan::hash_value(&serde_json::to_value(&cfg).map_err(other)?);
    let cache = Cache::open(runs).map_err(other)?;
    let root = cache.data_root();
    let dir = root.join(format!("synth-{}", &id[..16]));
    if dir.join(".complete").is_file() {
        return Ok(dir);
    }
    let _lock = cache.lock(&format!("data-{}", &id[..16])).map_err(other)?;
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
    crate::data::synth::generate(&tmp, &cfg).map_err(other)?;
    std::fs::write(tmp.join(".complete"), b"").map_err(other)?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(other)?;
    Ok(dir)
}

pub fn plan(a: &PlanArgs) -> CliResult {
    let format: crate::plan::Format = a.format.parse().map_err(CliError::Usage)?;
    let (_spec, cache, plan) = prepare(&a.spec, &a.set, &a.runs)?;
    let cached = |k: &str| cache.is_complete(k);
    if format == crate::plan::Format::Json {
        // Streamed: a 10,000-cell plan is tens of MB of JSON.
        let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
        plan.write_json(&mut out, &cached).map_err(other)?;
        std::io::Write::flush(&mut out).map_err(other)?;
        // The process ends here: freeing a 10,000-cell plan node by node
        // would cost ~5% of the command for nothing.
        std::mem::forget(plan);
        return Ok(());
    }
    print!("{}", plan.render(format, &cached));
    Ok(())
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

pub fn sweep(a: &SweepArgs) -> CliResult {
    if a.jobs == Some(0) {
        return Err(CliError::usage("--jobs must be at least 1"));
    }
    if !matches!(a.executor.as_str(), "local" | "slurm") {
        return Err(CliError::usage(format!(
            "unknown executor `{}` (expected `local` or `slurm`)",
            a.executor
        )));
    }
    let (spec, cache, plan) = prepare(&a.spec, &a.set, &a.runs)?;
    tracing::debug!("sweep: spec, data digest and plan ready");
    // Held until the sweep returns: `ecic gc` removes nothing meanwhile.
    let _root = cache.root_lock(false).map_err(other)?;
    let mut cached: HashSet<String> = plan
        .stages()
        .filter(|s| cache.is_complete(&s.desc.key))
        .map(|s| s.desc.key.clone())
        .collect();
    if a.dry_run {
        print!(
            "{}",
            plan.render(crate::plan::Format::Table, &|k| cached.contains(k))
        );
        return Ok(());
    }
    let jobs = a.jobs.unwrap_or_else(cores).max(1);
    let threads = (cores() / jobs).max(1);
    let mut store = Store::open(&a.runs).map_err(other)?;
    let ingested = ingested_keys(&store)?;
    let damaged = super::verify::check_reused(&cache, &plan, &mut cached, &ingested)?;
    let sweep_id = record_sweep(&mut store, &spec, &plan, &cached, &a.executor, jobs)?;
    for q in &damaged {
        let detail = match &q.moved_to {
            Some(to) => format!("{}; moved to {}", q.damage, to.display()),
            None => q.damage.to_string(),
        };
        store
            .log_event(sweep_id, Some(&q.key), "quarantined", Some(&detail))
            .map_err(other)?;
    }
    // Held while this process runs the sweep: `status` tells it from a killed one.
    let _alive = cache.sweep_lock(sweep_id).map_err(other)?;
    ingest_missing(&mut store, &cache, &plan, &cached, &ingested)?;
    tracing::debug!("sweep: store opened and sweep recorded");

    let to_run: Vec<StageJob> = plan
        .stages()
        .filter(|s| !cached.contains(&s.desc.key))
        .map(|s| StageJob {
            key: s.desc.key.clone(),
            kind: s.desc.kind.name().to_string(),
            label: s.desc.label.clone(),
            deps: pending_ancestors(&plan, &s.desc.key, &cached),
            threads,
            resources: s.resources.clone(),
            // The local executor hands cheap stages to its pooled workers
            // inline, which saves a file create and rename per stage.
            desc: (a.executor == "local" && crate::exec::pooled_kind(s.desc.kind.name()))
                .then(|| serde_json::to_string(&s.desc).expect("stage descriptions serialize")),
        })
        .collect();
    let mut written = 0;
    for job in to_run.iter().filter(|j| j.desc.is_none()) {
        let node = plan.get(&job.key).expect("job from plan");
        cache.write_desc(&node.desc).map_err(other)?;
        written += 1;
    }
    tracing::debug!("sweep: {written} stage description files written");
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        let _ = ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                eprintln!("\ninterrupted twice: exiting now");
                std::process::exit(130);
            }
            eprintln!(
                "\ninterrupt (Ctrl-C, SIGTERM or SIGHUP): stopping running stages \
                 (once more to exit at once)"
            );
        });
    }
    let worker = crate::exec::Worker::current(a.runs.clone()).map_err(other)?;
    if a.attach && a.executor != "slurm" {
        return Err(CliError::usage("--attach needs --executor slurm"));
    }
    let mut attached: Option<crate::exec::slurm::SlurmExecutor> = None;
    let mut executor: Box<dyn Executor> = match a.executor.as_str() {
        "local" => Box::new(crate::exec::local::LocalExecutor::new(
            worker,
            jobs,
            interrupted.clone(),
        )),
        _ if a.attach => {
            let ex = crate::exec::slurm::SlurmExecutor::attach(worker.clone(), &spec.config.name)
                .map_err(usage)?;
            attached = Some(ex.interrupt_flag(interrupted.clone(), a.detach));
            Box::new(crate::exec::local::LocalExecutor::new(
                worker,
                jobs,
                interrupted.clone(),
            ))
        }
        _ => Box::new(
            crate::exec::slurm::SlurmExecutor::new(worker)
                .batch_name(&spec.config.name)
                .map_err(usage)?
                .interrupt_flag(interrupted.clone(), a.detach),
        ),
    };
    let upstream: HashMap<&str, &[String]> = to_run
        .iter()
        .map(|j| (j.key.as_str(), j.deps.as_slice()))
        .collect();
    let mut sink = Sink::new(&to_run, plan.len(), cached.len());
    let mut failures: Vec<(String, String)> = Vec::new();
    let recorder = Recorder::start(store, cache.clone());
    let t0 = std::time::Instant::now();
    // When each stage was handed out, and which ended done: a stage whose
    // entry says it began before that was computed by another process while
    // ours waited for its lock, and is not counted as run here. Only for
    // stages started in a process of their own (training kinds: the ones
    // worth waiting for); a pooled worker may begin a queued stage before its
    // start is reported.
    let mut handed_out: HashMap<String, f64> = HashMap::new();
    let mut finished_done: Vec<String> = Vec::new();
    let mut on_event = |ev: Event| {
        sink.event(&ev);
        let at = crate::store::now();
        match &ev {
            Event::Started { key, .. } => {
                handed_out.entry(key.clone()).or_insert(at);
            }
            Event::Finished {
                key,
                outcome: Outcome::Done,
                ..
            } => finished_done.push(key.clone()),
            _ => {}
        }
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
                        recorder.done(key);
                        return;
                    }
                    Outcome::Failed(msg) => {
                        let reason = failure_reason(&cache, key, msg);
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
    let executed = match attached.as_mut() {
        Some(ex) => ex.follow(a.keep_going, &mut on_event).map(|_| ()),
        None => executor.execute(&to_run, a.keep_going, &mut on_event),
    };
    tracing::debug!("sweep: executor returned");
    // Whatever the executor did, what finished is recorded before returning.
    let (store, ingest_errors) = recorder.finish();
    tracing::debug!("sweep: store writer finished");
    let store = store.map_err(other)?;
    executed.map_err(other)?;
    sink.finish();
    let was_interrupted = interrupted.load(Ordering::SeqCst);
    let status = if was_interrupted {
        "interrupted"
    } else if failures.is_empty() && ingest_errors.is_empty() {
        "done"
    } else {
        "failed"
    };
    store.finish_sweep(sweep_id, status).map_err(other)?;
    print_summary(&store, sweep_id);
    tracing::debug!("sweep: summary printed");
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
            handed_out.get(*k).is_some_and(|&at| began < at)
        })
        .count();
    if waited > 0 {
        eprintln!(
            "{} stages run, {waited} computed meanwhile by another process, {} reused from the \
             cache, in {:.1} s",
            to_run.len() - waited,
            cached.len(),
            t0.elapsed().as_secs_f64()
        );
    } else {
        eprintln!(
            "{} stages run, {} reused from the cache, in {:.1} s",
            to_run.len(),
            cached.len(),
            t0.elapsed().as_secs_f64()
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
            a.runs.join(crate::cache::verify::QUARANTINE).display()
        );
    }
    if !a.no_report && !was_interrupted {
        // This run's revision, even if a later one of the name has started.
        let target = match store.revision(sweep_id) {
            Ok((rev, n)) if n > 1 => format!("{}@{rev}", spec.config.name),
            _ => spec.config.name.clone(),
        };
        write_report(&spec, &target, &a.runs);
    }
    for (key, reason) in &failures {
        let label = plan
            .get(key)
            .map(|n| n.desc.label.clone())
            .unwrap_or_default();
        eprintln!("failed: {label} [{}]: {reason}", &key[..12]);
        eprintln!("  log: {}", cache.log_path(key).display());
    }
    for e in &ingest_errors {
        eprintln!("error recording results: {e}");
    }
    // The executor's last sync ran while the above was recorded and printed.
    executor.durable().map_err(other)?;
    tracing::debug!("sweep: outputs durable");
    match status {
        "done" => Ok(()),
        "interrupted" => Err(CliError::Interrupted(
            "interrupted; run the same command again to resume".into(),
        )),
        _ => Err(CliError::failed(format!(
            "{} stage(s) failed",
            failures.len().max(ingest_errors.len())
        ))),
    }
}

/// The stages to run among every ancestor of `key`, not only its inputs: a
/// stage reads entries further up (a model lineage's weights, the
/// preprocessed data), and one of those may be a quarantined entry computed
/// again below a cached input.
fn pending_ancestors(plan: &Plan<Sealed>, key: &str, cached: &HashSet<String>) -> Vec<String> {
    let mut seen: HashSet<&str> = HashSet::new();
    let mut stack = vec![key];
    let mut out = Vec::new();
    while let Some(k) = stack.pop() {
        let Some(node) = plan.get(k) else { continue };
        for (_, input) in &node.desc.inputs {
            if seen.insert(input.as_str()) {
                if !cached.contains(input) {
                    out.push(input.clone());
                }
                stack.push(input.as_str());
            }
        }
    }
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
) -> CliResult<i64> {
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
    store.begin_sweep(&row, &cells, &stages).map_err(other)
}

/// Stages whose results the store has.
fn ingested_keys(store: &Store) -> CliResult<HashSet<String>> {
    let mut st = store
        .conn()
        .prepare("SELECT key FROM stages WHERE status = 'done' AND finished_at IS NOT NULL")
        .map_err(other)?;
    let rows = st.query_map([], |r| r.get::<_, String>(0)).map_err(other)?;
    rows.collect::<Result<_, _>>().map_err(other)
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
) -> CliResult {
    let mut ops = Vec::new();
    for s in plan.stages() {
        let key = &s.desc.key;
        if cached.contains(key) && !ingested.contains(key) {
            ops.push(StoreOp::Ingest(Box::new(
                cache.outputs(key).map_err(other)?,
            )));
        }
    }
    // One transaction for all of them.
    match store.apply(&ops).into_iter().next() {
        Some(e) => Err(other(e)),
        None => Ok(()),
    }
}

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
/// starts (`ingest_missing`). A batch is one transaction, so a killed sweep
/// leaves the store as it was after some earlier batch.
struct Recorder {
    tx: std::sync::mpsc::Sender<Record>,
    thread: std::thread::JoinHandle<(Store, Vec<String>)>,
}

enum Record {
    Op(StoreOp),
    /// A stage completed in the cache: ingest its outputs.
    Done(String),
}

impl Recorder {
    fn start(mut store: Store, cache: Cache) -> Recorder {
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

    fn record(&self, op: StoreOp) {
        let _ = self.tx.send(Record::Op(op));
    }

    fn done(&self, key: &str) {
        let _ = self.tx.send(Record::Done(key.to_string()));
    }

    /// Commit what is left and hand the store back, with the errors met.
    fn finish(self) -> (Result<Store, CliError>, Vec<String>) {
        drop(self.tx);
        match self.thread.join() {
            Ok((store, errors)) => (Ok(store), errors),
            Err(_) => (
                Err(CliError::Other(anyhow::anyhow!(
                    "the store writer panicked"
                ))),
                Vec::new(),
            ),
        }
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

/// Progress: bars on a terminal, one line per finished stage otherwise.
struct Sink {
    mp: MultiProgress,
    overall: ProgressBar,
    bars: HashMap<String, ProgressBar>,
    labels: HashMap<String, String>,
    tty: bool,
    finished: usize,
    total: usize,
}

impl Sink {
    fn new(jobs: &[StageJob], plan_len: usize, reused: usize) -> Sink {
        let tty = std::io::stderr().is_terminal();
        let mp = MultiProgress::with_draw_target(if tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        let overall = mp.add(ProgressBar::new(jobs.len() as u64));
        overall.set_style(
            ProgressStyle::with_template(
                "{prefix:>8} [{bar:30}] {pos}/{len} stages  {elapsed_precise}  {msg}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        overall.set_prefix("sweep");
        overall.set_message(format!("{reused} of {plan_len} reused from the cache"));
        let labels = jobs
            .iter()
            .map(|j| (j.key.clone(), j.label.clone()))
            .collect();
        Sink {
            mp,
            overall,
            bars: HashMap::new(),
            labels,
            tty,
            finished: 0,
            total: jobs.len(),
        }
    }

    fn event(&mut self, ev: &Event) {
        match ev {
            Event::Started { key, host, .. } => {
                let bar = self.mp.add(ProgressBar::new(0));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>8} {msg:40} [{bar:20}] {pos}/{len} {per_sec}",
                    )
                    .expect("template")
                    .progress_chars("=> "),
                );
                bar.set_prefix(key[..8].to_string());
                bar.set_message(self.labels.get(key).cloned().unwrap_or_default());
                self.bars.insert(key.clone(), bar);
                if !self.tty {
                    let on = host
                        .as_ref()
                        .map(|h| format!(" on {h}"))
                        .unwrap_or_default();
                    eprintln!(
                        "started  {}{on}",
                        self.labels.get(key).map(String::as_str).unwrap_or(key)
                    );
                }
            }
            Event::Progress {
                key, step, total, ..
            } => {
                if let Some(b) = self.bars.get(key) {
                    b.set_length(*total);
                    b.set_position(*step);
                }
            }
            Event::Finished { key, outcome, wall } => {
                if let Some(b) = self.bars.remove(key) {
                    b.finish_and_clear();
                    self.mp.remove(&b);
                }
                self.finished += 1;
                self.overall.inc(1);
                let label = self.labels.get(key).map(String::as_str).unwrap_or(key);
                let what = match outcome {
                    Outcome::Done => format!("done     {label} ({:.1} s)", wall.as_secs_f64()),
                    Outcome::Failed(m) => format!("FAILED   {label}: {m}"),
                    Outcome::Skipped { .. } => {
                        format!("skipped  {label} (not run after a failure)")
                    }
                    Outcome::Interrupted(_) => format!("stopped  {label}"),
                };
                let line = format!("[{}/{}] {what}", self.finished, self.total);
                if self.tty {
                    self.mp.suspend(|| eprintln!("{line}"));
                } else {
                    eprintln!("{line}");
                }
            }
        }
    }

    fn finish(&self) {
        self.overall.finish_and_clear();
    }
}

pub fn status(a: &StatusArgs) -> CliResult {
    if !a.runs.is_dir() {
        return Err(CliError::usage(format!(
            "{}: no such runs directory (pass --runs DIR)",
            a.runs.display()
        )));
    }
    let Some(store) = Store::open_existing(&a.runs).map_err(other)? else {
        println!("no sweeps recorded in {} yet", a.runs.display());
        return Ok(());
    };
    let text = crate::report::terminal::status(&store).map_err(other)?;
    println!("{text}");
    Ok(())
}

pub fn gc(a: &GcArgs) -> CliResult {
    if a.keep_last == Some(0) {
        return Err(CliError::usage(
            "--keep-last must be at least 1 (the latest revision of each sweep is always kept)",
        ));
    }
    let Some(store) = Store::open_existing(&a.runs).map_err(other)? else {
        println!("nothing to collect: no store in {}", a.runs.display());
        return Ok(());
    };
    let cache = Cache::open(&a.runs).map_err(other)?;
    // Exclusive: no sweep is between finding an entry complete and using it.
    let _root = cache
        .root_lock(true)
        .map_err(|e| CliError::failed(e.to_string()))?;
    let keep = store.referenced_keys(a.keep_last).map_err(other)?;
    let removed = cache.gc(&keep, a.dry_run).map_err(other)?;
    for p in &removed {
        println!(
            "{} {}",
            if a.dry_run { "would remove" } else { "removed" },
            p.display()
        );
    }
    println!(
        "{} entr{} {}",
        removed.len(),
        if removed.len() == 1 { "y" } else { "ies" },
        if a.dry_run { "to remove" } else { "removed" }
    );
    Ok(())
}

pub fn run_stage(a: &RunStageArgs) -> CliResult {
    if a.serve {
        return serve_stages(&a.runs);
    }
    let key = a.key.as_deref().unwrap_or_default();
    let progress = a.progress;
    let report = move |step: u64, total: u64| {
        if progress {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{{\"progress\":[{step},{total}]}}");
            let _ = out.flush();
        }
    };
    let durability = if a.deferred {
        crate::cache::Durability::Deferred
    } else {
        crate::cache::Durability::Now
    };
    match crate::stages::run_stage(&a.runs, key, &report, durability) {
        Ok(_) => Ok(()),
        Err(e) => Err(CliError::failed(crate::stages::error_chain(&e))),
    }
}

/// `run-stage --serve`: the pooled worker of the local executor. Saves a
/// process start per cheap stage; each stage still runs in a child process of
/// the sweep (a crash takes only this worker and its current stage with it),
/// with the thread budget the worker was started with, and its stderr
/// (messages, panics) in its own log file as with a one-shot `run-stage`.
/// Outputs are published with deferred durability; the executor syncs them.
fn serve_stages(runs: &Path) -> CliResult {
    use std::io::{BufRead, Write};
    let cache = Cache::open(runs).map_err(other)?;
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line.map_err(other)?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        // A stage description (one JSON line), or a key whose description
        // is in `runs/stages/KEY.json`.
        let desc: Option<crate::plan::StageDesc> =
            if line.starts_with('{') {
                Some(serde_json::from_str(line).map_err(|e| {
                    CliError::usage(format!("not a stage description: {e}: `{line}`"))
                })?)
            } else {
                None
            };
        let key = desc.as_ref().map_or(line, |d| d.key.as_str());
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(CliError::usage(format!("not a stage key: `{key}`")));
        }
        redirect_stderr(&cache.log_path(key)).map_err(other)?;
        let report = |step: u64, total: u64| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{{\"progress\":[{step},{total}]}}");
            let _ = out.flush();
        };
        let deferred = crate::cache::Durability::Deferred;
        let result = match &desc {
            Some(d) => crate::stages::run_stage_desc(&cache, d, &report, deferred),
            None => crate::stages::run_stage(runs, key, &report, deferred),
        };
        let reply = match result {
            Ok(_) => serde_json::json!({"finished": key, "ok": true}),
            Err(e) => {
                let msg = crate::stages::error_chain(&e);
                eprintln!("error: {msg}");
                // So that `ecic run-stage KEY` can retry it by hand.
                if let Some(d) = &desc {
                    if let Err(e) = cache.write_desc(d) {
                        eprintln!("could not write the stage description: {e}");
                    }
                }
                serde_json::json!({"finished": key, "ok": false, "error": msg})
            }
        };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{reply}").map_err(other)?;
        out.flush().map_err(other)?;
    }
    Ok(())
}

/// Point this process's stderr (fd 2) at `log`, appending.
fn redirect_stderr(log: &Path) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto fd 2 with a descriptor we own; `f` may close after.
        if unsafe { libc::dup2(f.as_raw_fd(), 2) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
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
