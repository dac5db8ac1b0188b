//! Asynchronous successive halving (ASHA, Li et al. 2020) of a search's
//! trials, as the sweep runs them (docs/search.md).
//!
//! The decisions are [`Halving`]'s, a pure function of the rung results in
//! the order they arrived: after each result, the trials in the top
//! `1/eta` of that rung's results so far (`floor(n / eta)` of `n`) that were
//! not promoted yet are promoted to the next rung. A trial is never
//! un-promoted; one left at its highest rung when the search ends is
//! stopped there. Because nothing else enters a decision, the decisions of a
//! finished (or killed) search replay identically from the recorded results
//! in their recorded order.
//!
//! [`SearchRun`] binds that logic to a plan: it knows each trial's rungs
//! ([`crate::plan::rungs`]), reads a finished rung's metric from the cache,
//! replays the results the cache and store already hold, and names the
//! stages each promotion adds to the running batch. Trials are halved
//! within their bracket: the trials of one grid cell and seed.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::cache::Cache;
use crate::plan::{Plan, Sealed};
use crate::spec::asha::{Asha, Mode};
use crate::store::{Store, StoreOp};

use super::SweepError;

/// The event a rung result is recorded as (its order is the replay order).
pub const RESULT_EVENT: &str = "asha-result";
pub const PROMOTED_EVENT: &str = "asha-promoted";
pub const STOPPED_EVENT: &str = "asha-stopped";
/// The status of the stages of a rung a trial was stopped below.
pub const STOPPED_STATUS: &str = "stopped";

/// One rung result.
#[derive(Debug, Clone, PartialEq)]
pub struct Arrival {
    pub trial: usize,
    pub rung: usize,
    pub value: f64,
}

/// The successive-halving state of one bracket.
#[derive(Debug, Clone)]
pub struct Halving {
    eta: usize,
    rungs: usize,
    mode: Mode,
    /// Per rung: (trial, value), in arrival order.
    results: Vec<Vec<(usize, f64)>>,
    /// Per rung: the trials promoted out of it.
    promoted: Vec<BTreeSet<usize>>,
}

impl Halving {
    pub fn new(eta: usize, rungs: usize, mode: Mode) -> Halving {
        Halving {
            eta: eta.max(2),
            rungs,
            mode,
            results: vec![Vec::new(); rungs],
            promoted: vec![BTreeSet::new(); rungs],
        }
    }

    /// Take in one result; returns the trials it lets out of that rung into
    /// the next, best first. A trial's second result at a rung is ignored.
    pub fn arrive(&mut self, a: &Arrival) -> Vec<usize> {
        let Some(rung) = self.results.get_mut(a.rung) else {
            return Vec::new();
        };
        if rung.iter().any(|&(t, _)| t == a.trial) {
            return Vec::new();
        }
        rung.push((a.trial, a.value));
        if a.rung + 1 >= self.rungs {
            return Vec::new();
        }
        let k = rung.len() / self.eta;
        let mut out = Vec::new();
        for t in self.ranked(a.rung).into_iter().take(k) {
            if self.promoted[a.rung].insert(t) {
                out.push(t);
            }
        }
        out
    }

    /// The trials with a result at `rung`, best first (a NaN last; a tie to
    /// the earlier result).
    pub fn ranked(&self, rung: usize) -> Vec<usize> {
        let mut v: Vec<(usize, (usize, f64))> =
            self.results[rung].iter().copied().enumerate().collect();
        let key = |x: f64| match (x.is_nan(), self.mode) {
            (true, _) => f64::INFINITY,
            (false, Mode::Max) => -x,
            (false, Mode::Min) => x,
        };
        v.sort_by(|(i, (_, a)), (j, (_, b))| key(*a).total_cmp(&key(*b)).then(i.cmp(j)));
        v.into_iter().map(|(_, (t, _))| t).collect()
    }

    pub fn promoted(&self, rung: usize) -> &BTreeSet<usize> {
        &self.promoted[rung]
    }

    pub fn results(&self, rung: usize) -> &[(usize, f64)] {
        &self.results[rung]
    }

    /// Trials that have a result at a rung below the top and were not
    /// promoted out of it: (trial, that rung).
    pub fn stopped(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for r in 0..self.rungs.saturating_sub(1) {
            for &(t, _) in &self.results[r] {
                if !self.promoted[r].contains(&t) {
                    out.push((t, r));
                }
            }
        }
        out.sort();
        out
    }
}

/// The promotions `arrivals` lead to, in the order they are decided:
/// (trial, the rung it is promoted into).
pub fn decide(eta: usize, rungs: usize, mode: Mode, arrivals: &[Arrival]) -> Vec<(usize, usize)> {
    let mut h = Halving::new(eta, rungs, mode);
    let mut out = Vec::new();
    for a in arrivals {
        out.extend(h.arrive(a).into_iter().map(|t| (t, a.rung + 1)));
    }
    out
}

/// One trial of a bracket.
struct Trial {
    /// Index into the plan's cells.
    cell: usize,
}

struct Bracket {
    halving: Halving,
    trials: Vec<Trial>,
}

/// What a rung evaluate key stands for: (bracket, trial, rung).
type RungRef = (usize, usize, usize);

/// A search's successive halving while a sweep runs.
pub struct SearchRun<'a> {
    plan: &'a Plan<Sealed>,
    asha: Asha,
    brackets: Vec<Bracket>,
    by_evaluate: HashMap<String, Vec<RungRef>>,
    /// Rung evaluate keys whose result has been taken in.
    arrived: HashSet<String>,
}

impl<'a> SearchRun<'a> {
    /// The search of `plan`, if its cells are trials under `[search.asha]`.
    pub fn of(plan: &'a Plan<Sealed>) -> Option<SearchRun<'a>> {
        let first = plan.cells.iter().find(|c| !c.rungs.is_empty())?;
        let asha = Asha::of(&first.cell.config.search)?;
        let mut brackets: Vec<Bracket> = Vec::new();
        let mut names: Vec<String> = Vec::new();
        let mut by_evaluate: HashMap<String, Vec<RungRef>> = HashMap::new();
        for (ci, c) in plan.cells.iter().enumerate() {
            if c.rungs.is_empty() {
                continue;
            }
            let b = bracket_name(&c.cell);
            let bi = match names.iter().position(|n| *n == b) {
                Some(i) => i,
                None => {
                    names.push(b);
                    brackets.push(Bracket {
                        halving: Halving::new(asha.eta as usize, c.rungs.len(), asha.mode),
                        trials: Vec::new(),
                    });
                    brackets.len() - 1
                }
            };
            let ti = brackets[bi].trials.len();
            brackets[bi].trials.push(Trial { cell: ci });
            for (r, rung) in c.rungs.iter().enumerate() {
                by_evaluate
                    .entry(rung.evaluate().to_string())
                    .or_default()
                    .push((bi, ti, r));
            }
        }
        Some(SearchRun {
            plan,
            asha,
            brackets,
            by_evaluate,
            arrived: HashSet::new(),
        })
    }

    /// The stages of every rung above the first: run only once promoted into.
    pub fn deferred(&self) -> HashSet<String> {
        self.plan
            .cells
            .iter()
            .flat_map(|c| c.rungs.iter().skip(1))
            .flat_map(|r| r.stages.iter().map(|(_, k)| k.clone()))
            .collect()
    }

    /// The number of trials and the step budget of each rung.
    pub fn rung_budget(&self) -> (usize, Vec<u64>) {
        let trials = self.brackets.iter().map(|b| b.trials.len()).sum();
        let steps = self
            .plan
            .cells
            .iter()
            .find(|c| !c.rungs.is_empty())
            .map(|c| c.rungs.iter().map(|r| r.steps).collect())
            .unwrap_or_default();
        (trials, steps)
    }

    /// Take in the results the cache holds already, in their recorded order
    /// (the store's result events; then any it lacks, by when they finished),
    /// so that the decisions of earlier runs replay as they were made.
    /// Returns the stages the replayed promotions need that are not cached,
    /// and the events to record.
    pub fn replay(
        &mut self,
        store: &Store,
        cache: &Cache,
        cached: &HashSet<String>,
        sweep: i64,
    ) -> Result<(Vec<String>, Vec<StoreOp>), SweepError> {
        let mut order: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        let recorded = store_keys(store, RESULT_EVENT)?;
        for k in recorded {
            if cached.contains(&k) && self.by_evaluate.contains_key(&k) && seen.insert(k.clone()) {
                order.push(k);
            }
        }
        let mut rest: Vec<(f64, String)> = self
            .by_evaluate
            .keys()
            .filter(|k| cached.contains(*k) && !seen.contains(*k))
            .map(|k| {
                let at = crate::cache::verify::read_manifest(&cache.entry(k))
                    .map(|m| m.finished_at)
                    .unwrap_or(f64::INFINITY);
                (at, k.clone())
            })
            .collect();
        rest.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let unrecorded: HashSet<String> = rest.iter().map(|(_, k)| k.clone()).collect();
        order.extend(rest.into_iter().map(|(_, k)| k));
        let mut run = Vec::new();
        let mut ops = Vec::new();
        for key in order {
            let (more, mut evs) = self.arrive(&key, cache, sweep, unrecorded.contains(&key))?;
            run.extend(more);
            ops.append(&mut evs);
        }
        run.retain(|k| !cached.contains(k));
        Ok((run, ops))
    }

    /// A stage ended done: if it is a rung's evaluate, take in its result.
    /// Returns the stages of the rungs it promotes into (the caller drops the
    /// cached ones) and the events to record.
    pub fn on_done(
        &mut self,
        key: &str,
        cache: &Cache,
        sweep: i64,
    ) -> Result<(Vec<String>, Vec<StoreOp>), SweepError> {
        if !self.by_evaluate.contains_key(key) {
            return Ok((Vec::new(), Vec::new()));
        }
        self.arrive(key, cache, sweep, true)
    }

    fn arrive(
        &mut self,
        key: &str,
        cache: &Cache,
        sweep: i64,
        record: bool,
    ) -> Result<(Vec<String>, Vec<StoreOp>), SweepError> {
        if !self.arrived.insert(key.to_string()) {
            return Ok((Vec::new(), Vec::new()));
        }
        let refs = self.by_evaluate.get(key).cloned().unwrap_or_default();
        let mut run = Vec::new();
        let mut ops = Vec::new();
        for (bi, ti, r) in refs {
            let cell = &self.plan.cells[self.brackets[bi].trials[ti].cell];
            let value = self.metric(cache, &cell.rungs[r].stages)?;
            if record {
                ops.push(StoreOp::Event {
                    sweep,
                    key: Some(key.to_string()),
                    what: RESULT_EVENT.into(),
                    detail: Some(
                        serde_json::json!({
                            "cell": cell.cell.name,
                            "rung": r,
                            "steps": cell.rungs[r].steps,
                            "metric": self.asha.metric,
                            "mode": match self.asha.mode { Mode::Max => "max", Mode::Min => "min" },
                            "value": value,
                        })
                        .to_string(),
                    ),
                    at: crate::store::now(),
                });
            }
            let promoted = self.brackets[bi].halving.arrive(&Arrival {
                trial: ti,
                rung: r,
                value,
            });
            for t in promoted {
                let c = &self.plan.cells[self.brackets[bi].trials[t].cell];
                let next = &c.rungs[r + 1];
                run.extend(next.stages.iter().map(|(_, k)| k.clone()));
                // A recorded result's promotions were recorded with it.
                if !record {
                    continue;
                }
                ops.push(StoreOp::Event {
                    sweep,
                    key: Some(next.budgeted().to_string()),
                    what: PROMOTED_EVENT.into(),
                    detail: Some(
                        serde_json::json!({
                            "cell": c.cell.name, "rung": r + 1, "steps": next.steps,
                        })
                        .to_string(),
                    ),
                    at: crate::store::now(),
                });
            }
        }
        Ok((run, ops))
    }

    /// The rung's metric: the valid split's, from its evaluate or else the
    /// budgeted stage (the valid `loss`). A metric none of them records is
    /// an error naming the spec key.
    fn metric(
        &self,
        cache: &Cache,
        stages: &[(crate::plan::StageKind, String)],
    ) -> Result<f64, SweepError> {
        for (_, key) in stages.iter().rev() {
            let out = cache.outputs(key)?;
            if let Some((_, _, v)) = out
                .metrics
                .iter()
                .find(|(s, m, _)| s == "valid" && *m == self.asha.metric)
            {
                return Ok(*v);
            }
        }
        Err(SweepError::Usage(format!(
            "search.asha.metric: no rung stage records `{}` on the valid split \
             (evaluate records e.g. cider_d, bleu4, rouge_l; domain-adapt records loss)",
            self.asha.metric
        )))
    }

    /// The trials stopped below their top rung, as records: an event each,
    /// and the stages of the rungs above marked stopped (not failed). Called once
    /// the run ended with nothing pending.
    pub fn stopped(&self, store: &Store, sweep: i64) -> Result<Vec<StoreOp>, SweepError> {
        let said: HashSet<String> = store_keys(store, STOPPED_EVENT)?.into_iter().collect();
        let mut ops = Vec::new();
        let at = crate::store::now();
        for b in &self.brackets {
            for (t, r) in b.halving.stopped() {
                let c = &self.plan.cells[b.trials[t].cell];
                let why = format!("stopped at rung {r} ({} steps)", c.rungs[r].steps);
                // The event said once (a search run again stops the same
                // trials); the stages' status again, as a new run of the
                // sweep plans them afresh.
                if !said.contains(c.rungs[r].evaluate()) {
                    ops.push(StoreOp::Event {
                        sweep,
                        key: Some(c.rungs[r].evaluate().to_string()),
                        what: STOPPED_EVENT.into(),
                        detail: Some(
                            serde_json::json!({"cell": c.cell.name, "rung": r, "why": why})
                                .to_string(),
                        ),
                        at,
                    });
                }
                for (_, key) in c.rungs[r + 1..].iter().flat_map(|x| &x.stages) {
                    ops.push(StoreOp::Ended {
                        key: key.clone(),
                        status: STOPPED_STATUS.into(),
                        error: Some(why.clone()),
                        wall_s: None,
                        at,
                    });
                }
            }
        }
        Ok(ops)
    }

    /// Steps trained (rungs run or cached) against every trial run to
    /// `max_steps`: (trained, full).
    pub fn steps(&self) -> (u64, u64) {
        let mut trained = 0;
        let mut full = 0;
        for b in &self.brackets {
            for (t, trial) in b.trials.iter().enumerate() {
                let c = &self.plan.cells[trial.cell];
                full += c.rungs.last().map_or(0, |r| r.steps);
                let top = (0..c.rungs.len())
                    .rev()
                    .find(|&r| b.halving.results(r).iter().any(|&(x, _)| x == t));
                if let Some(top) = top {
                    trained += c.rungs[top].steps;
                }
            }
        }
        (trained, full)
    }
}

/// The keys of the store's events `what`, in the order they were recorded.
fn store_keys(store: &Store, what: &str) -> Result<Vec<String>, SweepError> {
    let mut stmt = store
        .conn()
        .prepare("SELECT key FROM events WHERE what = ?1 AND key IS NOT NULL ORDER BY id")
        .map_err(|e| SweepError::Usage(format!("reading the search's recorded results: {e}")))?;
    let rows = stmt
        .query_map([what], |r| r.get::<_, String>(0))
        .map_err(|e| SweepError::Usage(format!("reading the search's recorded results: {e}")))?;
    Ok(rows.flatten().collect())
}

/// The bracket a trial belongs to: its cell without the sampled values.
fn bracket_name(cell: &crate::spec::Cell) -> String {
    let trial = cell
        .overrides
        .iter()
        .position(|(a, _)| a == crate::spec::grid::TRIAL_AXIS)
        .unwrap_or(cell.overrides.len());
    let fixed: Vec<String> = cell.overrides[..trial]
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!(
        "{}/{}/{}/{}/s{}",
        cell.backbone,
        cell.peft,
        cell.fusion,
        fixed.join(","),
        cell.seed
    )
}
