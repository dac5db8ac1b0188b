//! The one scheduler: owns the run state of a batch of stages and drives an
//! [`Executor`] through it.
//!
//! Executors only start jobs, stop them and report what happened
//! ([`Report`]s); everything about *which* job may start when — the ready set,
//! skipping the dependents of a failed stage, stopping after the first
//! failure unless `keep_going`, reacting to an interrupt, and the outcome of
//! every job never handed out — is decided here, the same way for every
//! executor. An executor that hands dependencies to its backend (Slurm's
//! `afterok`) says so with [`Dependencies::Backend`]: it then gets every job
//! at once and reports the dependents it saw skipped itself; the scheduler
//! still decides when to stop and what an unreported job's outcome is.
//!
//! A batch may grow while it runs ([`run_growing`]): a search's promotions
//! are decided as results arrive and handed out as new jobs (to a backend
//! through [`Executor::extend`]).
//!
//! The scheduler forwards each event to the caller exactly once: a second
//! `Finished` for a job that already ended (a backend reporting a job the
//! scheduler already settled) is dropped.

use std::collections::HashMap;
use std::time::Duration;

use super::{Event, ExecError, Executor, Outcome, StageJob};

/// Who enforces "start a stage only after its inputs are done".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependencies {
    /// The scheduler: it hands out a job only when its dependencies are done.
    Scheduler,
    /// The executor's backend (a cluster scheduler): every job is handed out
    /// at once with its dependencies, in topological order.
    Backend,
}

/// What an executor tells the scheduler.
#[derive(Debug, Clone)]
pub enum Report {
    /// A start, progress or end of a job it was given.
    Event(Event),
    /// A job it accepted but never started (queued behind a worker that
    /// died): it is pending again.
    Returned(String),
}

/// What the scheduler asks an executor to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// Do not start what has not started (without `keep_going`, after the
    /// first failure, which is `because_of`); running jobs finish.
    Unstarted { because_of: String },
    /// Stop everything now (the user interrupted).
    All,
}

/// Whether the scheduler keeps following after a [`Stop::All`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopping {
    /// The executor stops its jobs and goes on reporting until they ended.
    Follow,
    /// The executor leaves its jobs running and stops reporting (Slurm's
    /// `--detach`): the run ends now.
    Detach,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// Every job has an outcome.
    Finished,
    /// Interrupted in detach mode: the jobs handed out go on, unreported.
    Detached,
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Pending,
    HandedOut,
    Ended(Outcome),
}

/// Run `jobs` (topologically ordered; `deps` name earlier jobs) on `ex`,
/// sending every event to `events`. Returns once every job has an outcome, or
/// the executor detached.
pub fn run<E: Executor + ?Sized>(
    ex: &mut E,
    jobs: &[StageJob],
    keep_going: bool,
    events: &mut dyn FnMut(Event),
) -> Result<RunEnd, ExecError> {
    run_from(ex, jobs, &HashMap::new(), keep_going, events)
}

/// [`run`], for jobs of which some already ended before (a batch followed
/// again): `ended` holds their outcomes, which count but are not reported
/// again. With [`Dependencies::Backend`], `jobs` are taken as already handed
/// out when the executor holds them (see [`Executor::start_all`]).
pub fn run_from<E: Executor + ?Sized>(
    ex: &mut E,
    jobs: &[StageJob],
    ended: &HashMap<String, Outcome>,
    keep_going: bool,
    events: &mut dyn FnMut(Event),
) -> Result<RunEnd, ExecError> {
    run_growing(ex, jobs, ended, keep_going, events, &mut |_| Vec::new())
}

/// [`run_from`], for a batch that grows while it runs: after each job that
/// ends done, `grow(key)` may return new jobs (a search's promotions), whose
/// `deps` name jobs given before. New jobs start before the older jobs still
/// waiting, so that a promoted trial goes on as soon as there is room.
pub fn run_growing<E: Executor + ?Sized>(
    ex: &mut E,
    jobs: &[StageJob],
    ended: &HashMap<String, Outcome>,
    keep_going: bool,
    events: &mut dyn FnMut(Event),
    grow: &mut dyn FnMut(&str) -> Vec<StageJob>,
) -> Result<RunEnd, ExecError> {
    let mut s = Schedule::new(jobs.to_vec(), keep_going);
    for (key, outcome) in ended {
        if let Some(&i) = s.index.get(key.as_str()) {
            s.settle(i, outcome.clone());
        }
    }
    let backend = ex.dependencies() == Dependencies::Backend;
    if backend {
        // The backend orders them; it holds them all from now on.
        let todo: Vec<&StageJob> = (0..jobs.len())
            .filter(|&i| s.state[i] == State::Pending)
            .map(|i| &jobs[i])
            .collect();
        ex.start_all(&todo)?;
        let keys: Vec<String> = todo.iter().map(|j| j.key.clone()).collect();
        for key in keys {
            let i = s.index[key.as_str()];
            s.state[i] = State::HandedOut;
        }
    }
    if let Some(cause) = s.stop_cause.clone() {
        ex.stop(&Stop::Unstarted { because_of: cause })?;
    }
    let mut stopped_all = false;
    loop {
        if !stopped_all && ex.interrupted() {
            stopped_all = true;
            s.stop_starting = true;
            if ex.stop(&Stop::All)? == Stopping::Detach {
                return Ok(RunEnd::Detached);
            }
        }
        // A pending job below a failed one will never run.
        for i in 0..s.jobs.len() {
            if s.state[i] == State::Pending {
                if let Some(root) = s.failed_dependency(i) {
                    s.end(i, Outcome::Skipped { because_of: root }, events);
                }
            }
        }
        if !s.stop_starting && !backend {
            for o in 0..s.order.len() {
                let i = s.order[o];
                if s.state[i] != State::Pending || !s.deps_done(i) {
                    continue;
                }
                match ex.start(&s.jobs[i]) {
                    Ok(true) => s.state[i] = State::HandedOut,
                    Ok(false) => {}
                    // Could not be started at all (no process): failed.
                    Err(e) => {
                        s.state[i] = State::HandedOut;
                        let failed = Event::Finished {
                            key: s.jobs[i].key.clone(),
                            outcome: Outcome::Failed(e.to_string()),
                            wall: Duration::ZERO,
                        };
                        s.observe(ex, failed, events, grow)?;
                    }
                }
            }
        }
        if !s.state.iter().any(|st| *st == State::HandedOut) {
            // Nothing running: pending jobs cannot start (stopped, or waiting
            // for nothing), unless starting is still allowed and some are ready.
            let startable = !s.stop_starting
                && (0..s.jobs.len()).any(|i| s.state[i] == State::Pending && s.deps_done(i));
            if !startable {
                break;
            }
        }
        for report in ex.wait()? {
            match report {
                Report::Event(ev) => s.observe(ex, ev, events, grow)?,
                Report::Returned(key) => {
                    if let Some(&i) = s.index.get(key.as_str()) {
                        if s.state[i] == State::HandedOut {
                            s.state[i] = State::Pending;
                        }
                    }
                }
            }
        }
    }
    ex.wind_down()?;
    // Whatever was never handed out (stop after a failure, or interrupt).
    let interrupted = stopped_all;
    for i in 0..s.jobs.len() {
        if s.state[i] != State::Pending {
            continue;
        }
        let outcome = if interrupted {
            Outcome::Interrupted("not started: interrupted".into())
        } else {
            // An upstream failure, else the failure that stopped the run (the
            // caller words the two differently).
            let root = s
                .failed_dependency(i)
                .or_else(|| s.stop_cause.clone())
                .unwrap_or_default();
            Outcome::Skipped { because_of: root }
        };
        s.end(i, outcome, events);
    }
    Ok(RunEnd::Finished)
}

/// Run state of one batch.
struct Schedule {
    jobs: Vec<StageJob>,
    index: HashMap<String, usize>,
    deps: Vec<Vec<usize>>,
    state: Vec<State>,
    /// The order ready jobs are started in: jobs added later first.
    order: Vec<usize>,
    keep_going: bool,
    stop_starting: bool,
    /// The failure that stopped starting (without `keep_going`).
    stop_cause: Option<String>,
}

impl Schedule {
    fn new(jobs: Vec<StageJob>, keep_going: bool) -> Self {
        let mut s = Schedule {
            jobs: Vec::new(),
            index: HashMap::new(),
            deps: Vec::new(),
            state: Vec::new(),
            order: Vec::new(),
            keep_going,
            stop_starting: false,
            stop_cause: None,
        };
        s.add(jobs);
        s
    }

    /// Take in more jobs (pending, started before the ones waiting); a job
    /// whose key is known already is not taken twice. Returns the indices
    /// of those taken.
    fn add(&mut self, jobs: Vec<StageJob>) -> Vec<usize> {
        let mut added = Vec::new();
        for j in jobs {
            if self.index.contains_key(&j.key) {
                continue;
            }
            let i = self.jobs.len();
            self.index.insert(j.key.clone(), i);
            self.deps.push(
                j.deps
                    .iter()
                    .filter_map(|d| self.index.get(d.as_str()).copied())
                    .collect(),
            );
            self.state.push(State::Pending);
            self.jobs.push(j);
            added.push(i);
        }
        let rest = std::mem::take(&mut self.order);
        self.order = added.iter().copied().chain(rest).collect();
        added
    }

    fn deps_done(&self, i: usize) -> bool {
        self.deps[i]
            .iter()
            .all(|&d| self.state[d] == State::Ended(Outcome::Done))
    }

    /// The root failure among job `i`'s dependencies, if one did not end done:
    /// a failed or interrupted dependency's key, or what a skipped one was
    /// skipped because of.
    fn failed_dependency(&self, i: usize) -> Option<String> {
        self.deps[i].iter().find_map(|&d| match &self.state[d] {
            State::Ended(Outcome::Skipped { because_of }) => Some(because_of.clone()),
            State::Ended(Outcome::Failed(_) | Outcome::Interrupted(_)) => {
                Some(self.jobs[d].key.clone())
            }
            _ => None,
        })
    }

    fn settle(&mut self, i: usize, outcome: Outcome) {
        if let Outcome::Failed(_) = outcome {
            if !self.keep_going && self.stop_cause.is_none() {
                self.stop_starting = true;
                self.stop_cause = Some(self.jobs[i].key.clone());
            }
        }
        self.state[i] = State::Ended(outcome);
    }

    /// End job `i` here (never handed out, or handed out but not reported).
    fn end(&mut self, i: usize, outcome: Outcome, events: &mut dyn FnMut(Event)) {
        self.settle(i, outcome.clone());
        events(Event::Finished {
            key: self.jobs[i].key.clone(),
            outcome,
            wall: Duration::ZERO,
        });
    }

    /// Take in one event from the executor: update the state, act on a first
    /// failure, forward it.
    fn observe<E: Executor + ?Sized>(
        &mut self,
        ex: &mut E,
        ev: Event,
        events: &mut dyn FnMut(Event),
        grow: &mut dyn FnMut(&str) -> Vec<StageJob>,
    ) -> Result<(), ExecError> {
        let key = match &ev {
            Event::Started { key, .. }
            | Event::Progress { key, .. }
            | Event::Finished { key, .. } => key,
        };
        let Some(&i) = self.index.get(key.as_str()) else {
            // Not ours to judge; pass it on.
            events(ev);
            return Ok(());
        };
        if matches!(self.state[i], State::Ended(_)) {
            return Ok(());
        }
        if let Event::Finished { outcome, .. } = &ev {
            let had_cause = self.stop_cause.is_some();
            self.settle(i, outcome.clone());
            if *outcome == Outcome::Done && !self.stop_starting {
                let key = self.jobs[i].key.clone();
                let added = self.add(grow(&key));
                if ex.dependencies() == Dependencies::Backend && !added.is_empty() {
                    let new: Vec<&StageJob> = added.iter().map(|&a| &self.jobs[a]).collect();
                    ex.extend(&new)?;
                    for a in added {
                        self.state[a] = State::HandedOut;
                    }
                }
            }
            if !had_cause {
                if let Some(cause) = self.stop_cause.clone() {
                    events(ev);
                    ex.stop(&Stop::Unstarted { because_of: cause })?;
                    return Ok(());
                }
            }
        }
        events(ev);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::Resources;
    use std::collections::VecDeque;

    fn job(key: &str, deps: &[&str]) -> StageJob {
        StageJob {
            key: key.into(),
            kind: "evaluate".into(),
            label: key.into(),
            deps: deps.iter().map(|d| d.to_string()).collect(),
            threads: 1,
            resources: Resources::default(),
            desc: None,
        }
    }

    /// A scripted executor: `slots` jobs at once; a job named `fail*` fails,
    /// every other one is done; each `wait` ends the oldest running job.
    struct Scripted {
        slots: usize,
        running: VecDeque<String>,
        started: Vec<String>,
        stops: Vec<Stop>,
        backend: bool,
    }

    impl Scripted {
        fn new(slots: usize) -> Self {
            Scripted {
                slots,
                running: VecDeque::new(),
                started: Vec::new(),
                stops: Vec::new(),
                backend: false,
            }
        }
    }

    impl Executor for Scripted {
        fn dependencies(&self) -> Dependencies {
            if self.backend {
                Dependencies::Backend
            } else {
                Dependencies::Scheduler
            }
        }
        fn start(&mut self, job: &StageJob) -> Result<bool, ExecError> {
            if self.running.len() >= self.slots {
                return Ok(false);
            }
            self.running.push_back(job.key.clone());
            self.started.push(job.key.clone());
            Ok(true)
        }
        fn wait(&mut self) -> Result<Vec<Report>, ExecError> {
            let Some(key) = self.running.pop_front() else {
                return Ok(Vec::new());
            };
            let outcome = if key.starts_with("fail") {
                Outcome::Failed("on purpose".into())
            } else {
                Outcome::Done
            };
            Ok(vec![
                Report::Event(Event::Started {
                    key: key.clone(),
                    host: None,
                    job_id: None,
                }),
                Report::Event(Event::Finished {
                    key,
                    outcome,
                    wall: Duration::ZERO,
                }),
            ])
        }
        fn stop(&mut self, how: &Stop) -> Result<Stopping, ExecError> {
            self.stops.push(how.clone());
            Ok(Stopping::Follow)
        }
    }

    fn outcomes(
        ex: &mut Scripted,
        jobs: &[StageJob],
        keep_going: bool,
    ) -> std::collections::BTreeMap<String, Outcome> {
        let mut out = std::collections::BTreeMap::new();
        let end = run(ex, jobs, keep_going, &mut |e| {
            if let Event::Finished { key, outcome, .. } = e {
                assert!(out.insert(key, outcome).is_none(), "one end per job");
            }
        })
        .unwrap();
        assert_eq!(end, RunEnd::Finished);
        assert_eq!(out.len(), jobs.len(), "every job ends");
        out
    }

    #[test]
    fn dependents_of_a_failure_are_skipped_and_independent_jobs_go_on() {
        let jobs = [
            job("a", &[]),
            job("fail-b", &["a"]),
            job("c", &["fail-b"]),
            job("d", &["c"]),
            job("e", &[]),
        ];
        let mut ex = Scripted::new(1);
        let out = outcomes(&mut ex, &jobs, true);
        let skipped = Outcome::Skipped {
            because_of: "fail-b".into(),
        };
        assert_eq!(out["c"], skipped);
        assert_eq!(out["d"], skipped);
        assert_eq!(out["e"], Outcome::Done);
        // Ready jobs start in the given (topological) order.
        assert_eq!(ex.started, ["a", "fail-b", "e"]);
        assert!(ex.stops.is_empty());
    }

    #[test]
    fn without_keep_going_the_first_failure_stops_starting() {
        let jobs = [job("fail-a", &[]), job("b", &[]), job("c", &["b"])];
        let mut ex = Scripted::new(1);
        let out = outcomes(&mut ex, &jobs, false);
        let stopped = Outcome::Skipped {
            because_of: "fail-a".into(),
        };
        assert_eq!(out["b"], stopped);
        assert_eq!(out["c"], stopped);
        assert_eq!(
            ex.stops,
            [Stop::Unstarted {
                because_of: "fail-a".into()
            }]
        );
    }

    #[test]
    fn jobs_added_while_running_start_before_the_waiting_ones() {
        // One slot; when `a` ends, a promotion `p` (after `a`) joins and
        // starts before `b` and `c`, which were waiting; a job given twice
        // is taken once.
        let jobs = [job("a", &[]), job("b", &[]), job("c", &[])];
        let mut ex = Scripted::new(1);
        let mut out = std::collections::BTreeMap::new();
        run_growing(
            &mut ex,
            &jobs,
            &HashMap::new(),
            true,
            &mut |e| {
                if let Event::Finished { key, outcome, .. } = e {
                    assert!(out.insert(key, outcome).is_none(), "one end per job");
                }
            },
            &mut |key| match key {
                "a" => vec![job("p", &["a"]), job("b", &[])],
                "p" => vec![job("fail-q", &["p"]), job("r", &["fail-q"])],
                _ => Vec::new(),
            },
        )
        .unwrap();
        assert_eq!(ex.started, ["a", "p", "fail-q", "b", "c"]);
        assert_eq!(out.len(), 6, "{out:?}");
        assert_eq!(
            out["r"],
            Outcome::Skipped {
                because_of: "fail-q".into()
            }
        );
    }

    #[test]
    fn a_backend_gets_every_job_at_once_and_each_end_is_reported_once() {
        let jobs = [job("a", &[]), job("b", &["a"])];
        let mut ex = Scripted::new(10);
        ex.backend = true;
        let out = outcomes(&mut ex, &jobs, true);
        assert_eq!(ex.started, ["a", "b"]);
        assert_eq!(out.len(), 2);
    }
}
