//! The Slurm executor: each stage to run becomes one `sbatch` job.
//!
//! The whole batch is handed to Slurm at once, each job depending
//! (`afterok`) on the jobs of its inputs, so the orchestrator may go away and
//! Slurm still runs the DAG (the executor declares
//! [`Dependencies::Backend`] to the scheduler, which then hands it every job
//! at once and only decides when to stop); the job ids are recorded in
//! `<runs>/slurm/<batch>.json` so [`SlurmExecutor::attach`] can follow the
//! batch again later. A batch may grow while it is followed
//! ([`SlurmExecutor::submit_more`]: a search's promotions). Each job runs the same `ecic run-stage` as the local
//! executor; the orchestrator learns results from Slurm's state (`squeue`,
//! `scontrol`, no accounting needed) and from the marker files the worker
//! leaves, which win where the two disagree (see [`track`]).

pub mod parse;
#[cfg(test)]
mod tests;
mod track;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use self::track::{Tracked, Tracker};
use super::schedule::{self, Dependencies, Report, RunEnd, Stop, Stopping};
use super::{Event, ExecError, Executor, Outcome, StageJob, Worker};

/// Why a Slurm client command gave no usable output.
#[derive(Debug, Clone)]
pub enum CliFailure {
    /// It could not be started (not installed, not on `PATH`).
    Spawn(String),
    /// It exited non-zero.
    Exit { status: Option<i32>, stderr: String },
}

impl CliFailure {
    fn into_exec(self, tool: &str) -> ExecError {
        let message = match self {
            CliFailure::Spawn(e) => format!("could not run it: {e}"),
            CliFailure::Exit { status, stderr } => {
                let code = status.map_or("a signal".to_string(), |c| format!("status {c}"));
                format!("exited with {code}: {}", stderr.trim())
            }
        };
        ExecError::Scheduler {
            tool: tool.to_string(),
            message,
        }
    }
}

/// Runs Slurm's client tools. Behind a trait so the state mapping can be
/// tested on captured outputs without a cluster.
pub trait SlurmCli {
    /// Runs `program args` (feeding `stdin` if given) and returns its stdout.
    fn run(
        &mut self,
        program: &str,
        args: &[String],
        stdin: Option<&str>,
    ) -> Result<String, CliFailure>;
}

/// The real tools, found on `PATH`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemSlurm;

impl SlurmCli for SystemSlurm {
    fn run(
        &mut self,
        program: &str,
        args: &[String],
        stdin: Option<&str>,
    ) -> Result<String, CliFailure> {
        use std::io::Write;
        let mut child = Command::new(program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| CliFailure::Spawn(format!("{program}: {e}")))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes())
                .map_err(|e| CliFailure::Spawn(format!("{program}: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| CliFailure::Spawn(format!("{program}: {e}")))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(CliFailure::Exit {
                status: out.status.code(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        }
    }
}

/// What `<runs>/slurm/<batch>.json` holds: enough to follow a batch again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub version: u32,
    pub batch: String,
    /// Seconds since the Unix epoch at submission.
    pub submitted_unix: u64,
    /// In submission (topological) order.
    pub jobs: Vec<RecordedJob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedJob {
    pub key: String,
    pub kind: String,
    pub label: String,
    pub job_id: String,
    /// Keys of jobs in the same batch it depends on.
    pub deps: Vec<String>,
}

const RECORD_VERSION: u32 = 1;

/// How [`SlurmExecutor::follow`] ended: every job has an outcome
/// (`Finished`), or the run was interrupted in detach mode and the jobs go on
/// in Slurm, unreported (`Detached`).
pub type FollowEnd = RunEnd;

/// Cancels a batch's jobs from another thread (an interrupt handler) while
/// [`SlurmExecutor::follow`] is running.
#[derive(Debug, Clone, Default)]
pub struct CancelHandle {
    ids: Arc<Mutex<Vec<String>>>,
}

impl CancelHandle {
    /// `scancel` every job submitted so far (ended ones are ignored by Slurm).
    pub fn cancel_all(&self) -> Result<(), ExecError> {
        let ids = self.ids.lock().map(|v| v.clone()).unwrap_or_default();
        track::scancel(&mut SystemSlurm, &ids, false)
    }
}

/// Runs stages as Slurm jobs. See the module docs.
pub struct SlurmExecutor {
    worker: Worker,
    cli: Box<dyn SlurmCli + Send>,
    batch: String,
    poll: Duration,
    interrupt: Option<Arc<AtomicBool>>,
    detach_on_interrupt: bool,
    submitted: CancelHandle,
    tracker: Option<Tracker>,
    /// The jobs of the batch followed, as the scheduler sees them.
    batch_jobs: Vec<StageJob>,
    /// Whether Slurm was asked about the batch yet in this run (the first
    /// poll does not wait).
    polled: bool,
    /// Polls since our jobs were cancelled on an interrupt.
    polls_since_cancel: u32,
}

impl SlurmExecutor {
    /// An executor using the real Slurm tools, with a fresh batch name.
    pub fn new(worker: Worker) -> Self {
        Self::with_cli(worker, Box::new(SystemSlurm))
    }

    pub fn with_cli(worker: Worker, cli: Box<dyn SlurmCli + Send>) -> Self {
        let now = unix_now();
        SlurmExecutor {
            worker,
            cli,
            batch: format!("{now}-{}", std::process::id()),
            poll: Duration::from_secs(2),
            interrupt: None,
            detach_on_interrupt: false,
            submitted: CancelHandle::default(),
            tracker: None,
            batch_jobs: Vec::new(),
            polled: false,
            polls_since_cancel: 0,
        }
    }

    /// Names the batch (e.g. after the sweep); the record is
    /// `<runs>/slurm/<name>.json`, with characters other than ASCII letters,
    /// digits and `-_.` replaced by `_`. Only an empty name is refused.
    pub fn batch_name(mut self, name: &str) -> Result<Self, ExecError> {
        self.batch = batch_file_name(name)?;
        Ok(self)
    }

    /// How often Slurm is asked about the jobs (default 2 s).
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll = every;
        self
    }

    /// A flag an interrupt handler sets: following then cancels our jobs and
    /// reports them interrupted, or with `detach` just stops following.
    pub fn interrupt_flag(mut self, flag: Arc<AtomicBool>, detach: bool) -> Self {
        self.interrupt = Some(flag);
        self.detach_on_interrupt = detach;
        self
    }

    pub fn batch(&self) -> &str {
        &self.batch
    }

    pub fn cancel_handle(&self) -> CancelHandle {
        self.submitted.clone()
    }

    /// `scancel` every job of this batch.
    pub fn cancel_all(&mut self) -> Result<(), ExecError> {
        let ids = self
            .submitted
            .ids
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        track::scancel(self.cli.as_mut(), &ids, false)
    }

    /// Picks up a recorded batch so [`follow`](Self::follow) reports its jobs.
    pub fn attach(worker: Worker, batch: &str) -> Result<Self, ExecError> {
        Self::attach_with_cli(worker, batch, Box::new(SystemSlurm))
    }

    pub fn attach_with_cli(
        worker: Worker,
        batch: &str,
        cli: Box<dyn SlurmCli + Send>,
    ) -> Result<Self, ExecError> {
        let batch = batch_file_name(batch)?;
        let record = read_record(&record_path(&worker.runs, &batch))?;
        let mut ex = Self::with_cli(worker, cli);
        ex.batch = batch;
        ex.adopt(&record);
        Ok(ex)
    }

    /// The batches recorded under `runs`, oldest first.
    pub fn batches(runs: &Path) -> Result<Vec<BatchRecord>, ExecError> {
        let dir = runs.join("slurm");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(format!("listing {}", dir.display()), e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|e| io_err(format!("listing {}", dir.display()), e))?
                .path();
            if path.extension().is_some_and(|x| x == "json") {
                out.push(read_record(&path)?);
            }
        }
        out.sort_by(|a, b| (a.submitted_unix, &a.batch).cmp(&(b.submitted_unix, &b.batch)));
        Ok(out)
    }

    /// Submits `jobs` (topologically ordered) as one dependent batch and
    /// records it. On a failed `sbatch` the jobs already submitted are cancelled.
    pub fn submit(&mut self, jobs: &[StageJob]) -> Result<BatchRecord, ExecError> {
        let runs = self.worker.runs.clone();
        for dir in ["logs", "status", "slurm"] {
            let d = runs.join(dir);
            std::fs::create_dir_all(&d)
                .map_err(|e| io_err(format!("creating {}", d.display()), e))?;
        }
        let mut record = BatchRecord {
            version: RECORD_VERSION,
            batch: self.batch.clone(),
            submitted_unix: unix_now(),
            jobs: Vec::with_capacity(jobs.len()),
        };
        for job in jobs {
            // A failure marker from an earlier attempt must not speak for this one.
            let stale = track::failed_marker_path(&runs, &job.key);
            if let Err(e) = std::fs::remove_file(&stale) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(io_err(format!("removing {}", stale.display()), e));
                }
            }
            let dep_ids: Vec<&str> = job
                .deps
                .iter()
                .filter_map(|d| record.jobs.iter().find(|r| &r.key == d))
                .map(|r| r.job_id.as_str())
                .collect();
            let job_id = self.sbatch(job, &dep_ids)?;
            record.jobs.push(RecordedJob {
                key: job.key.clone(),
                kind: job.kind.clone(),
                label: job.label.clone(),
                job_id,
                deps: job.deps.clone(),
            });
        }
        write_record(&record_path(&runs, &self.batch), &record)?;
        self.adopt(&record);
        Ok(record)
    }

    /// Submits `jobs` into the batch being followed (a search's promotions):
    /// each depends on the jobs of the batch it names that have not ended
    /// (one that ended done is no dependency any more, and Slurm may have
    /// forgotten it). The batch's record gains them, so `--attach` follows
    /// them too.
    pub fn submit_more(&mut self, jobs: &[&StageJob]) -> Result<(), ExecError> {
        let Some(tracker) = self.tracker.as_ref() else {
            let owned: Vec<StageJob> = jobs.iter().map(|j| (*j).clone()).collect();
            return self.submit(&owned).map(|_| ());
        };
        let runs = self.worker.runs.clone();
        let path = record_path(&runs, &self.batch);
        let mut record = read_record(&path)?;
        let mut live: Vec<(String, String, usize)> = tracker
            .jobs
            .iter()
            .enumerate()
            .filter(|(_, t)| t.ended.is_none())
            .map(|(i, t)| (t.key.clone(), t.job_id.clone(), i))
            .collect();
        for job in jobs {
            // A failure marker from an earlier attempt must not speak for this one.
            let stale = track::failed_marker_path(&runs, &job.key);
            if let Err(e) = std::fs::remove_file(&stale) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(io_err(format!("removing {}", stale.display()), e));
                }
            }
            let deps: Vec<&(String, String, usize)> = live
                .iter()
                .filter(|(k, _, _)| job.deps.contains(k))
                .collect();
            let dep_ids: Vec<&str> = deps.iter().map(|(_, id, _)| id.as_str()).collect();
            let dep_idx: Vec<usize> = deps.iter().map(|(_, _, i)| *i).collect();
            let job_id = self.sbatch(job, &dep_ids)?;
            record.jobs.push(RecordedJob {
                key: job.key.clone(),
                kind: job.kind.clone(),
                label: job.label.clone(),
                job_id: job_id.clone(),
                deps: job.deps.clone(),
            });
            self.batch_jobs.push((*job).clone());
            let tracker = self.tracker.as_mut().expect("checked above");
            live.push((job.key.clone(), job_id.clone(), tracker.jobs.len()));
            tracker
                .jobs
                .push(Tracked::new(job.key.clone(), job_id, dep_idx));
        }
        write_record(&path, &record)
    }

    /// One `sbatch` of `job` after `dep_ids`; its id. On a failure every job
    /// of the batch submitted so far is cancelled.
    fn sbatch(&mut self, job: &StageJob, dep_ids: &[&str]) -> Result<String, ExecError> {
        let (args, script) = sbatch_command(&self.worker, job, dep_ids);
        let submitted = self
            .cli
            .run("sbatch", &args, Some(&script))
            .map_err(|e| e.into_exec("sbatch"))
            .and_then(|out| {
                parse::parse_sbatch(&out).map_err(|message| ExecError::Scheduler {
                    tool: "sbatch".into(),
                    message,
                })
            });
        let job_id = match submitted {
            Ok(id) => id,
            Err(e) => {
                let _ = self.cancel_all();
                return Err(e);
            }
        };
        if let Ok(mut ids) = self.submitted.ids.lock() {
            ids.push(job_id.clone());
        }
        Ok(job_id)
    }

    /// Polls Slurm until every submitted job has an outcome, sending events,
    /// through the one scheduler ([`schedule::run_from`]), which counts the
    /// outcomes already reported by earlier polls. With `keep_going` off, the
    /// first failure cancels the jobs not yet started.
    pub fn follow(
        &mut self,
        keep_going: bool,
        events: &mut dyn FnMut(Event),
    ) -> Result<FollowEnd, ExecError> {
        let Some(tracker) = &self.tracker else {
            return Ok(FollowEnd::Finished);
        };
        let ended: HashMap<String, Outcome> = tracker
            .jobs
            .iter()
            .filter_map(|j| Some((j.key.clone(), j.ended.clone()?)))
            .collect();
        let jobs = std::mem::take(&mut self.batch_jobs);
        let result = schedule::run_from(self, &jobs, &ended, keep_going, events);
        self.batch_jobs = jobs;
        result
    }

    fn adopt(&mut self, record: &BatchRecord) {
        let jobs = record
            .jobs
            .iter()
            .map(|j| {
                let deps = j
                    .deps
                    .iter()
                    .filter_map(|d| record.jobs.iter().position(|r| &r.key == d))
                    .collect();
                Tracked::new(j.key.clone(), j.job_id.clone(), deps)
            })
            .collect();
        if let Ok(mut ids) = self.submitted.ids.lock() {
            *ids = record.jobs.iter().map(|j| j.job_id.clone()).collect();
        }
        self.batch_jobs = record
            .jobs
            .iter()
            .map(|j| StageJob {
                key: j.key.clone(),
                kind: j.kind.clone(),
                label: j.label.clone(),
                deps: j.deps.clone(),
                threads: 1,
                resources: Default::default(),
                desc: None,
            })
            .collect();
        self.tracker = Some(Tracker::new(jobs, self.worker.runs.clone()));
        self.polled = false;
        self.polls_since_cancel = 0;
    }

    /// The jobs of the batch submitted or attached to (as the scheduler is
    /// to follow them: an attached sweep follows these, not its own plan's).
    pub fn batch_jobs(&self) -> &[StageJob] {
        &self.batch_jobs
    }
}

/// Slurm holds the dependencies (`afterok`): the scheduler hands over the
/// whole batch at once, and learns outcomes from polling.
impl Executor for SlurmExecutor {
    fn dependencies(&self) -> Dependencies {
        Dependencies::Backend
    }

    fn start(&mut self, job: &StageJob) -> Result<bool, ExecError> {
        self.start_all(&[job]).map(|_| true)
    }

    /// Submits the batch, unless this executor follows one that has not
    /// ended (attached, or submitted by hand).
    fn start_all(&mut self, jobs: &[&StageJob]) -> Result<(), ExecError> {
        if jobs.is_empty() || self.tracker.as_ref().is_some_and(|t| !t.all_ended()) {
            return Ok(());
        }
        let owned: Vec<StageJob> = jobs.iter().map(|j| (*j).clone()).collect();
        self.submit(&owned).map(|_| ())
    }

    fn extend(&mut self, jobs: &[&StageJob]) -> Result<(), ExecError> {
        self.submit_more(jobs)
    }

    /// One `squeue` (and `scontrol` for ended jobs), a poll interval after the last.
    fn wait(&mut self) -> Result<Vec<Report>, ExecError> {
        let Some(tracker) = self.tracker.as_mut() else {
            return Ok(Vec::new());
        };
        if self.polled {
            std::thread::sleep(self.poll);
        }
        self.polled = true;
        let mut reports = Vec::new();
        let mut report = |e: Event| reports.push(Report::Event(e));
        tracker.step(self.cli.as_mut(), &mut report)?;
        if tracker.interrupted && !tracker.all_ended() {
            self.polls_since_cancel += 1;
            // Polls allowed after cancelling before unconfirmed jobs are reported anyway.
            if self.polls_since_cancel > 10 {
                for i in 0..tracker.jobs.len() {
                    if tracker.jobs[i].ended.is_none() {
                        let o = Outcome::Interrupted("cancelled by the user (unconfirmed)".into());
                        tracker.finish(i, o, Duration::ZERO, &mut report);
                    }
                }
            }
        }
        Ok(reports)
    }

    /// After a failure: `scancel` the jobs not yet started (reported skipped
    /// because of it). On an interrupt: `scancel` every unfinished job, or in
    /// detach mode leave them running and stop following.
    fn stop(&mut self, how: &Stop) -> Result<Stopping, ExecError> {
        let Some(tracker) = self.tracker.as_mut() else {
            return Ok(Stopping::Follow);
        };
        match how {
            Stop::Unstarted { because_of } => {
                tracker.stop_cause = Some(because_of.clone());
                track::scancel(self.cli.as_mut(), &tracker.unstarted_ids(), true)?;
            }
            Stop::All if self.detach_on_interrupt => return Ok(Stopping::Detach),
            Stop::All => {
                tracker.interrupted = true;
                track::scancel(self.cli.as_mut(), &tracker.unfinished_ids(), false)?;
            }
        }
        Ok(Stopping::Follow)
    }

    fn interrupted(&self) -> bool {
        self.interrupt
            .as_ref()
            .is_some_and(|f| f.load(Ordering::SeqCst))
    }
}

/// The `sbatch` arguments and the batch script (fed on stdin) for one stage.
pub fn sbatch_command(worker: &Worker, job: &StageJob, dep_ids: &[&str]) -> (Vec<String>, String) {
    let short = job.key.get(..12).unwrap_or(&job.key);
    let mut args = vec![
        "--parsable".to_string(),
        "--kill-on-invalid-dep=yes".into(),
        "--no-requeue".into(),
        format!("--job-name=ecic-{}-{short}", job.kind),
        format!(
            "--output={}",
            track::log_path(&worker.runs, &job.key).display()
        ),
    ];
    if !dep_ids.is_empty() {
        args.push(format!("--dependency=afterok:{}", dep_ids.join(":")));
    }
    let r = &job.resources;
    if let Some(c) = r.cpus {
        args.push(format!("--cpus-per-task={c}"));
    }
    let flags = [
        ("--mem", &r.mem),
        ("--gres", &r.gres),
        ("--partition", &r.partition),
        ("--time", &r.time),
    ];
    for (flag, value) in flags {
        if let Some(v) = value {
            args.push(format!("{flag}={v}"));
        }
    }
    args.extend(r.extra.iter().cloned());
    let script = format!(
        "#!/bin/sh\n# ecic stage: {label}\nexport RAYON_NUM_THREADS={threads}\nexec {program} run-stage --runs {runs} {key}\n",
        label = job.label.replace('\n', " "),
        threads = job.threads.max(1),
        program = shell_quote(&worker.program.to_string_lossy()),
        runs = shell_quote(&worker.runs.to_string_lossy()),
        key = shell_quote(&job.key),
    );
    (args, script)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn record_path(runs: &Path, batch: &str) -> PathBuf {
    runs.join("slurm").join(format!("{batch}.json"))
}

/// The record's file stem for a batch name: safe as one path component.
fn batch_file_name(name: &str) -> Result<String, ExecError> {
    if name.is_empty() {
        return Err(ExecError::Scheduler {
            tool: "slurm executor".into(),
            message: "empty batch name".into(),
        });
    }
    let safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let mut out: String = name
        .chars()
        .map(|c| if safe(c) { c } else { '_' })
        .collect();
    if out.starts_with('.') {
        out.replace_range(..1, "_");
    }
    Ok(out)
}

fn read_record(path: &Path) -> Result<BatchRecord, ExecError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| io_err(format!("reading {}", path.display()), e))?;
    let record: BatchRecord = serde_json::from_str(&text).map_err(|e| {
        io_err(
            format!("reading {}", path.display()),
            std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        )
    })?;
    if record.version != RECORD_VERSION {
        let msg = format!("unsupported batch record version {}", record.version);
        return Err(io_err(
            format!("reading {}", path.display()),
            std::io::Error::other(msg),
        ));
    }
    Ok(record)
}

/// Writes by rename so an interrupted write never leaves half a record.
fn write_record(path: &Path, record: &BatchRecord) -> Result<(), ExecError> {
    let what = || format!("writing {}", path.display());
    let text = serde_json::to_string_pretty(record)
        .map_err(|e| io_err(what(), std::io::Error::other(e)))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(|e| io_err(what(), e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(what(), e))
}

fn io_err(what: String, source: std::io::Error) -> ExecError {
    ExecError::Io { what, source }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
