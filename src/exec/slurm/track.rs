//! Following submitted Slurm jobs until each has an [`Outcome`].
//!
//! One [`Tracker::step`] asks `squeue` about every unfinished job at once,
//! then walks the jobs in topological order and turns what it sees into
//! [`Event`]s. The marker files a worker leaves are trusted over Slurm's state
//! where they disagree: a manifest means done, whatever Slurm says; an exit 0
//! without a manifest is a failure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::parse::{self, JobDetail, JobState, QueueRow, SQUEUE_FORMAT};
use super::{CliFailure, SlurmCli};
use crate::exec::{Event, ExecError, Outcome};

/// Polls a job may stay unexplained (gone from Slurm, or exited 0 without a
/// manifest yet: shared filesystems show files late) before it counts as failed.
const GRACE_POLLS: u32 = 5;
/// Consecutive `squeue` failures tolerated (a controller restarting) before giving up.
const MAX_QUERY_FAILURES: u32 = 10;

/// One submitted job as the tracker sees it.
#[derive(Debug, Clone)]
pub(crate) struct Tracked {
    pub key: String,
    pub job_id: String,
    /// Indices of the jobs (in the same batch) this one waits for.
    pub deps: Vec<usize>,
    pub started: bool,
    pub ended: Option<Outcome>,
    /// Last place Slurm reported it running.
    pub node: Option<String>,
    unexplained_polls: u32,
}

impl Tracked {
    pub fn new(key: String, job_id: String, deps: Vec<usize>) -> Self {
        Tracked {
            key,
            job_id,
            deps,
            started: false,
            ended: None,
            node: None,
            unexplained_polls: 0,
        }
    }
}

/// Where a worker leaves its result for `key` (the run-stage protocol).
pub(crate) fn manifest_path(runs: &Path, key: &str) -> PathBuf {
    crate::cache::entry_path(runs, key).join("manifest.json")
}

/// The failure marker a worker may write: JSON with an `error` field.
pub(crate) fn failed_marker_path(runs: &Path, key: &str) -> PathBuf {
    crate::cache::failed_marker_path(runs, key)
}

pub(crate) fn log_path(runs: &Path, key: &str) -> PathBuf {
    crate::cache::log_path(runs, key)
}

pub(crate) struct Tracker {
    pub jobs: Vec<Tracked>,
    pub runs: PathBuf,
    /// Set when the scheduler stops after a failure (`keep_going` off): jobs
    /// cancelled before they started are then reported skipped because of this key.
    pub stop_cause: Option<String>,
    /// Set once the user interrupted and our jobs were cancelled.
    pub interrupted: bool,
    query_failures: u32,
}

impl Tracker {
    pub fn new(jobs: Vec<Tracked>, runs: PathBuf) -> Self {
        Tracker {
            jobs,
            runs,
            stop_cause: None,
            interrupted: false,
            query_failures: 0,
        }
    }

    pub fn all_ended(&self) -> bool {
        self.jobs.iter().all(|j| j.ended.is_some())
    }

    pub fn unfinished_ids(&self) -> Vec<String> {
        self.jobs
            .iter()
            .filter(|j| j.ended.is_none())
            .map(|j| j.job_id.clone())
            .collect()
    }

    /// Ids of unfinished jobs not yet seen running.
    pub fn unstarted_ids(&self) -> Vec<String> {
        self.jobs
            .iter()
            .filter(|j| j.ended.is_none() && !j.started)
            .map(|j| j.job_id.clone())
            .collect()
    }

    /// Asks Slurm once about every unfinished job and reports what changed.
    pub fn step(
        &mut self,
        cli: &mut dyn SlurmCli,
        events: &mut dyn FnMut(Event),
    ) -> Result<(), ExecError> {
        let ids = self.unfinished_ids();
        if ids.is_empty() {
            return Ok(());
        }
        let Some(rows) = self.query(cli, &ids)? else {
            return Ok(());
        };
        let mut never_satisfiable = Vec::new();
        for i in 0..self.jobs.len() {
            if self.jobs[i].ended.is_some() {
                continue;
            }
            let row = rows.get(&self.jobs[i].job_id);
            match row {
                None => self.judge_vanished(i, events),
                Some(r) if r.state.is_final() => {
                    let detail = show_job(cli, &r.job_id);
                    self.judge_ended(i, r, detail.as_ref(), events);
                }
                Some(r) if r.state == JobState::Pending => {
                    // Without --kill-on-invalid-dep such a job would wait forever; end it ourselves.
                    if r.reason == "DependencyNeverSatisfied" {
                        never_satisfiable.push(r.job_id.clone());
                        let because_of = self.failed_dependency(i);
                        self.finish(i, Outcome::Skipped { because_of }, Duration::ZERO, events);
                    }
                }
                Some(r) => {
                    if !self.jobs[i].started {
                        self.jobs[i].node = r.node.clone();
                        self.start(i, events);
                    }
                }
            }
        }
        if !never_satisfiable.is_empty() {
            // Best effort: the job is already reported; a failed scancel only leaves it queued.
            let _ = scancel(cli, &never_satisfiable, false);
        }
        Ok(())
    }

    /// `squeue` for `ids`; `Ok(None)` when the query failed but may work next time.
    fn query(
        &mut self,
        cli: &mut dyn SlurmCli,
        ids: &[String],
    ) -> Result<Option<BTreeMap<String, QueueRow>>, ExecError> {
        let args = vec![
            "-h".to_string(),
            "-t".into(),
            "all".into(),
            "-o".into(),
            SQUEUE_FORMAT.into(),
            "-j".into(),
            ids.join(","),
        ];
        let out = match cli.run("squeue", &args, None) {
            Ok(out) => out,
            // Every id has been purged (older than MinJobAge): nothing to list.
            Err(CliFailure::Exit { stderr, .. }) if stderr.contains("Invalid job id") => {
                String::new()
            }
            Err(e) => {
                self.query_failures += 1;
                if self.query_failures >= MAX_QUERY_FAILURES {
                    return Err(e.into_exec("squeue"));
                }
                return Ok(None);
            }
        };
        self.query_failures = 0;
        let rows = parse::parse_squeue(&out).map_err(|message| ExecError::Scheduler {
            tool: "squeue".into(),
            message,
        })?;
        Ok(Some(
            rows.into_iter().map(|r| (r.job_id.clone(), r)).collect(),
        ))
    }

    /// A job Slurm no longer knows: the marker files decide.
    fn judge_vanished(&mut self, i: usize, events: &mut dyn FnMut(Event)) {
        if let Some(outcome) = self.outcome_from_markers(i) {
            if outcome == Outcome::Done {
                self.start(i, events);
            }
            return self.finish(i, outcome, Duration::ZERO, events);
        }
        if self.jobs[i]
            .deps
            .iter()
            .any(|&d| is_bad(&self.jobs[d].ended))
        {
            let because_of = self.failed_dependency(i);
            return self.finish(i, Outcome::Skipped { because_of }, Duration::ZERO, events);
        }
        self.jobs[i].unexplained_polls += 1;
        if self.jobs[i].unexplained_polls > GRACE_POLLS {
            let msg = format!(
                "slurm job {} is no longer known to slurm and left no manifest",
                self.jobs[i].job_id
            );
            self.finish(i, Outcome::Failed(msg), Duration::ZERO, events);
        }
    }

    fn judge_ended(
        &mut self,
        i: usize,
        row: &QueueRow,
        detail: Option<&JobDetail>,
        events: &mut dyn FnMut(Event),
    ) {
        let wall = detail
            .and_then(JobDetail::run_time)
            .or(row.elapsed)
            .unwrap_or_default();
        let node = detail
            .and_then(|d| d.node().map(str::to_string))
            .or_else(|| row.node.clone());
        let ran = node.is_some();
        if self.jobs[i].node.is_none() {
            self.jobs[i].node = node;
        }
        let job = &self.jobs[i];
        let manifest = manifest_path(&self.runs, &job.key).is_file();
        let reason = detail
            .and_then(JobDetail::reason)
            .unwrap_or(&row.reason)
            .to_string();
        let outcome = if manifest {
            Outcome::Done
        } else {
            match &row.state {
                JobState::Cancelled if reason == "DependencyNeverSatisfied" => Outcome::Skipped {
                    because_of: self.failed_dependency(i),
                },
                JobState::Cancelled if !job.started && !ran && self.stop_cause.is_some() => {
                    Outcome::Skipped {
                        because_of: self.stop_cause.clone().unwrap_or_default(),
                    }
                }
                JobState::Cancelled if self.interrupted => {
                    Outcome::Interrupted("cancelled by the user".into())
                }
                JobState::Cancelled => {
                    Outcome::Interrupted(format!("slurm job {} was cancelled", job.job_id))
                }
                JobState::Preempted => {
                    Outcome::Interrupted(format!("slurm job {} was preempted", job.job_id))
                }
                JobState::Completed if job.unexplained_polls < GRACE_POLLS => {
                    // The manifest may not be visible here yet; look again next poll.
                    self.jobs[i].unexplained_polls += 1;
                    return;
                }
                state => Outcome::Failed(self.failure_message(i, state, &reason, detail)),
            }
        };
        if ran && !matches!(outcome, Outcome::Skipped { .. }) {
            self.start(i, events);
        }
        self.finish(i, outcome, wall, events);
    }

    /// Why job `i` failed: the worker's own error if it left one, else Slurm's
    /// view, with the end of the log either way.
    fn failure_message(
        &self,
        i: usize,
        state: &JobState,
        reason: &str,
        detail: Option<&JobDetail>,
    ) -> String {
        let job = &self.jobs[i];
        let mut msg = match read_failed_marker(&self.runs, &job.key) {
            Some(error) => error,
            None => {
                let mut m = format!("slurm job {} {}", job.job_id, state.name());
                if !reason.is_empty() && reason != "None" {
                    m.push_str(&format!(" ({reason})"));
                }
                match detail.and_then(JobDetail::exit_code) {
                    _ if *state == JobState::Completed => {
                        m.push_str(": exited 0 but published no manifest")
                    }
                    Some((code, 0)) => m.push_str(&format!(", exit code {code}")),
                    Some((_, sig)) => m.push_str(&format!(", killed by signal {sig}")),
                    None => {}
                }
                m
            }
        };
        let log = log_path(&self.runs, &job.key);
        if let Some(tail) = log_tail(&log, 3) {
            msg.push_str(&format!("; {}: {tail}", log.display()));
        }
        msg
    }

    fn outcome_from_markers(&self, i: usize) -> Option<Outcome> {
        let key = &self.jobs[i].key;
        if manifest_path(&self.runs, key).is_file() {
            return Some(Outcome::Done);
        }
        read_failed_marker(&self.runs, key).map(Outcome::Failed)
    }

    /// The root cause among job `i`'s dependencies: a failed or interrupted
    /// dependency's key, or what a skipped one was skipped because of.
    fn failed_dependency(&self, i: usize) -> String {
        for &d in &self.jobs[i].deps {
            match &self.jobs[d].ended {
                Some(Outcome::Skipped { because_of }) => return because_of.clone(),
                Some(Outcome::Failed(_) | Outcome::Interrupted(_)) => {
                    return self.jobs[d].key.clone()
                }
                _ => {}
            }
        }
        // Slurm decided before we saw the dependency end; name the first unfinished one.
        self.jobs[i]
            .deps
            .iter()
            .find(|&&d| self.jobs[d].ended != Some(Outcome::Done))
            .or(self.jobs[i].deps.first())
            .map(|&d| self.jobs[d].key.clone())
            .unwrap_or_default()
    }

    fn start(&mut self, i: usize, events: &mut dyn FnMut(Event)) {
        let job = &mut self.jobs[i];
        if !job.started {
            job.started = true;
            events(Event::Started {
                key: job.key.clone(),
                host: job.node.clone(),
                job_id: Some(job.job_id.clone()),
            });
        }
    }

    pub fn finish(
        &mut self,
        i: usize,
        outcome: Outcome,
        wall: Duration,
        events: &mut dyn FnMut(Event),
    ) {
        let job = &mut self.jobs[i];
        job.ended = Some(outcome.clone());
        events(Event::Finished {
            key: job.key.clone(),
            outcome,
            wall,
        });
    }
}

fn is_bad(outcome: &Option<Outcome>) -> bool {
    matches!(outcome, Some(o) if *o != Outcome::Done)
}

/// `scontrol show job -o ID`, or `None` if Slurm cannot say (purged, controller busy).
fn show_job(cli: &mut dyn SlurmCli, id: &str) -> Option<JobDetail> {
    let args = vec![
        "show".to_string(),
        "job".into(),
        "-o".into(),
        id.to_string(),
    ];
    let out = cli.run("scontrol", &args, None).ok()?;
    parse::parse_scontrol_job(&out).ok()
}

/// `scancel` the given jobs (only those still pending when `pending_only`).
pub(crate) fn scancel(
    cli: &mut dyn SlurmCli,
    ids: &[String],
    pending_only: bool,
) -> Result<(), ExecError> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut args = Vec::new();
    if pending_only {
        args.push("--state=PENDING".to_string());
    }
    args.extend(ids.iter().cloned());
    cli.run("scancel", &args, None)
        .map(|_| ())
        .map_err(|e| e.into_exec("scancel"))
}

/// The `error` field of a worker's failure marker, if it left one.
fn read_failed_marker(runs: &Path, key: &str) -> Option<String> {
    let path = failed_marker_path(runs, key);
    let text = std::fs::read_to_string(&path).ok()?;
    let error = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| format!("failed (unreadable marker {})", path.display()));
    Some(error)
}

/// The last `n` non-empty lines of a log, joined, at most ~400 characters.
fn log_tail(path: &Path, n: usize) -> Option<String> {
    let text = std::fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return None;
    }
    let tail = lines[lines.len().saturating_sub(n)..].join(" | ");
    let mut chars: Vec<char> = tail.chars().collect();
    if chars.len() > 400 {
        chars = chars.split_off(chars.len() - 400);
        return Some(format!("...{}", chars.into_iter().collect::<String>()));
    }
    Some(tail)
}
