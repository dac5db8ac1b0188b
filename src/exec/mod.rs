//! Executors: where planned stages run.
//!
//! A sweep ([`crate::sweep::run_plan`]) hands the stages that are not cached,
//! in topological order with their dependencies among themselves, to the one
//! scheduler ([`schedule`]), which drives an executor and passes the
//! [`Event`]s it reports on. Every executor runs a stage
//! the same way — the hidden `ecic run-stage --runs DIR KEY` command (or its
//! pooled form `run-stage --serve`, which takes stage descriptions on stdin,
//! one JSON line each), which reads the stage's description from
//! `runs/stages/KEY.json` (or its stdin line), computes, and publishes the
//! output into the cache — so a stage's result never depends on where it ran.
//! Workers never write the SQLite store; the orchestrator ingests each
//! finished stage's manifest. The scheduler owns run state (pending, running,
//! done, failed, skipped); an executor only starts, stops and reports (a new
//! one implements [`Executor`]'s `start`, `wait` and `stop`).

pub mod local;
pub mod schedule;
pub mod slurm;

pub use schedule::{Dependencies, Report, RunEnd, Stop, Stopping};

use std::path::PathBuf;
use std::time::Duration;

/// Stage kinds cheap enough (no training, no long-lived memory) for the local
/// executor to run in pooled worker processes with deferred durability; the
/// training kinds get a fresh process each (see [`local`]).
pub fn pooled_kind(kind: &str) -> bool {
    matches!(kind, "preprocess" | "evaluate")
}

/// One stage handed to an executor.
#[derive(Debug, Clone)]
pub struct StageJob {
    /// The stage's cache key (hex).
    pub key: String,
    /// Stage kind name (`preprocess`, `pretrain-align`, ...).
    pub kind: String,
    /// A short human label, e.g. `domain-adapt blip2/lora/early s0`.
    pub label: String,
    /// Keys of the jobs in the same batch that must finish first (cached inputs
    /// are not listed: they are already complete).
    pub deps: Vec<String>,
    /// Threads this stage may use (rayon / candle).
    pub threads: usize,
    /// Cluster resources for this stage's kind.
    pub resources: Resources,
    /// The stage's description as one line of JSON, for executors that hand
    /// it to a worker inline (the local executor's pooled workers) instead of
    /// through `runs/stages/KEY.json`, which the dispatcher then does not write.
    pub desc: Option<String>,
}

/// Resources a stage asks a cluster scheduler for (from the spec's
/// `[resources.<kind>]`); the local executor ignores them (its budget is
/// `--jobs` stages, each with the cores divided among them).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Resources {
    pub cpus: Option<u32>,
    /// Memory, Slurm syntax (`4G`).
    pub mem: Option<String>,
    /// Generic resources, Slurm syntax (`gpu:1`).
    pub gres: Option<String>,
    pub partition: Option<String>,
    /// Time limit, Slurm syntax (`01:00:00`).
    pub time: Option<String>,
    /// Extra `sbatch` flags, passed as they are.
    pub extra: Vec<String>,
}

/// How a stage ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Published into the cache (by this run, or found complete when started).
    Done,
    /// Failed; the message says why (last lines of its log, or the scheduler's reason).
    Failed(String),
    /// Not run because a dependency failed.
    Skipped { because_of: String },
    /// Stopped by the user (Ctrl-C) or cancelled by the scheduler.
    Interrupted(String),
}

/// What executors report while they work.
#[derive(Debug, Clone)]
pub enum Event {
    /// The stage started (on `host`, as `job_id` where a scheduler gave one).
    Started {
        key: String,
        host: Option<String>,
        job_id: Option<String>,
    },
    /// Progress inside a stage: `step` of `total` (training steps, images...).
    Progress {
        key: String,
        step: u64,
        total: u64,
        note: Option<String>,
    },
    /// The stage ended.
    Finished {
        key: String,
        outcome: Outcome,
        wall: Duration,
    },
}

/// The seam between the scheduler and the places stages run. An executor
/// starts jobs, stops them when told and reports what happened; which job
/// may start when is [`schedule`]'s, the same for every executor.
pub trait Executor {
    /// Who enforces the order of dependent jobs (default: the scheduler,
    /// which then hands out a job only once its dependencies are done).
    fn dependencies(&self) -> Dependencies {
        Dependencies::Scheduler
    }

    /// Start `job` now if there is room: `Ok(true)` it was taken (started,
    /// or queued where it starts without the scheduler), `Ok(false)` no room
    /// yet (asked again after the next [`wait`](Self::wait)). An error fails
    /// this job alone.
    fn start(&mut self, job: &StageJob) -> Result<bool, ExecError>;

    /// [`Dependencies::Backend`]: take every job at once, in topological
    /// order, each with its dependencies among them. An error ends the run.
    fn start_all(&mut self, jobs: &[&StageJob]) -> Result<(), ExecError> {
        for job in jobs {
            if !self.start(job)? {
                return Err(ExecError::Scheduler {
                    tool: "executor".into(),
                    message: format!("no room for {}", job.key),
                });
            }
        }
        Ok(())
    }

    /// [`Dependencies::Backend`]: take more jobs while the batch runs (a
    /// search's promotions), each with its dependencies among the jobs
    /// taken before. By default, [`start_all`](Self::start_all).
    fn extend(&mut self, jobs: &[&StageJob]) -> Result<(), ExecError> {
        self.start_all(jobs)
    }

    /// Block until something happened to the jobs taken (or a short while
    /// has passed, so that the scheduler sees an interrupt), and say what.
    fn wait(&mut self) -> Result<Vec<Report>, ExecError>;

    /// Stop what `how` names. Jobs stopped are still reported ended by later
    /// [`wait`](Self::wait)s, unless the answer is [`Stopping::Detach`].
    fn stop(&mut self, how: &Stop) -> Result<Stopping, ExecError>;

    /// Whether the user asked to stop (Ctrl-C, SIGTERM, SIGHUP).
    fn interrupted(&self) -> bool {
        false
    }

    /// Called once every job has ended, before the scheduler reports the
    /// jobs it never handed out (release idle workers).
    fn wind_down(&mut self) -> Result<(), ExecError> {
        Ok(())
    }

    /// Returns once every output published in this run is durable (an
    /// executor may finish that in the background after the run).
    fn durable(&mut self) -> Result<(), ExecError> {
        Ok(())
    }

    /// Run `jobs` (topologically ordered; `deps` name earlier jobs) through
    /// [`schedule::run`], sending an [`Event`] per start, progress and end to
    /// `events`. Returns when every job has finished, failed, been skipped,
    /// or the run was interrupted. `keep_going = false` stops starting new
    /// jobs after the first failure.
    fn execute(
        &mut self,
        jobs: &[StageJob],
        keep_going: bool,
        events: &mut dyn FnMut(Event),
    ) -> Result<(), ExecError> {
        schedule::run(self, jobs, keep_going, events).map(|_| ())
    }
}

/// Where a run-stage command finds things.
#[derive(Debug, Clone)]
pub struct Worker {
    /// The `ecic` binary to run (the current executable by default).
    pub program: PathBuf,
    /// The runs directory (absolute), shared with workers.
    pub runs: PathBuf,
}

impl Worker {
    pub fn current(runs: PathBuf) -> Result<Self, ExecError> {
        let program = std::env::current_exe().map_err(|e| ExecError::Io {
            what: "finding the ecic executable".into(),
            source: e,
        })?;
        let runs = std::path::absolute(&runs).map_err(|e| ExecError::Io {
            what: format!("resolving {}", runs.display()),
            source: e,
        })?;
        Ok(Worker { program, runs })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed: {message}")]
    Scheduler { tool: String, message: String },
}
