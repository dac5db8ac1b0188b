//! The rungs of a search trial under `[search.asha]` (docs/search.md).
//!
//! A rung is the trial's budgeted stage trained to the rung's step budget,
//! followed by the stages after it in the chain (cider-optimize, evaluate),
//! so that the rung's model is evaluated on the valid split. The budgeted
//! stage of every rung keeps the trial's own parameters with the step count
//! replaced by `max_steps` — the horizon of the learning-rate schedule, the
//! same for every rung, which makes each rung a prefix of the one full run —
//! and adds `rung_steps`, the steps trained so far. A rung above the first
//! also reads the rung below it (an input of its own kind): it resumes from
//! that rung's published checkpoint instead of training from the start. So a
//! rung's key is a hash of the trial's parameters, its budget, and, through
//! the Merkle chain, every lower rung; the stages above the budgeted one are
//! the trial's, shared by all of its rungs.

use serde_json::{json, Value};

use super::StageKind;
use crate::spec::asha::Asha;
use crate::spec::Cell;

/// A cell's rung layout: which kind is budgeted and each rung's steps.
#[derive(Debug, Clone)]
pub struct Rungs {
    pub kind: StageKind,
    /// Steps of each rung, lowest first; the last is `max_steps`.
    pub budgets: Vec<u64>,
    pub max_steps: u64,
}

/// What the budgeted stage of one rung is told.
#[derive(Debug, Clone)]
pub struct Budget {
    /// 0 for the first rung.
    pub rung: usize,
    pub steps: u64,
    pub max_steps: u64,
    /// The key of the rung below (its checkpoint is where this one resumes).
    pub lower: Option<String>,
}

/// One rung's stages: the budgeted stage, then the rest of the chain.
#[derive(Debug, Clone)]
pub struct RungPlan {
    pub steps: u64,
    pub stages: Vec<(StageKind, String)>,
}

impl RungPlan {
    /// The budgeted stage's key (the rung's first stage).
    pub fn budgeted(&self) -> &str {
        &self.stages[0].1
    }

    /// The rung's evaluate key, whose valid-split result decides promotions.
    pub fn evaluate(&self) -> &str {
        &self.stages.last().expect("a rung ends in evaluate").1
    }
}

/// The rungs of `cell` (running `chain`), if it is a trial of a search under
/// `[search.asha]` whose budgeted stage it runs.
pub fn of(cell: &Cell, chain: &[StageKind]) -> Option<Rungs> {
    let asha = Asha::of(&cell.config.search)?;
    let kind = StageKind::parse(&asha.stage)?;
    chain.contains(&kind).then(|| Rungs {
        kind,
        budgets: asha.rungs(),
        max_steps: asha.max_steps,
    })
}

/// The budgeted stage's parameters for rung `b`: the schedule spans
/// `max_steps` and training stops after `rung_steps`.
pub fn budget_params(kind: StageKind, params: &mut Value, b: &Budget) {
    match kind {
        StageKind::DomainAdapt | StageKind::PretrainAlign => {
            params["train"]["steps"] = json!(b.max_steps);
        }
        _ => params["steps"] = json!(b.max_steps),
    }
    params["rung_steps"] = json!(b.steps);
}
