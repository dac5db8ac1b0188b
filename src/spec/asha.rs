//! `[search.asha]`: asynchronous successive halving over the sampled trials.
//!
//! ```toml
//! [search.asha]
//! metric = "cider_d"        # a valid-split metric of the rung's evaluate ("loss": valid loss)
//! mode = "max"              # or "min" (default: "min" for loss, else "max")
//! stage = "domain_adapt"    # the budgeted training stage (or "cider_optimize")
//! min_steps = 20            # the first rung's budget
//! max_steps = 180           # the last rung's budget, and every rung's schedule horizon
//! reduction_factor = 3      # eta: rung budgets grow by eta, 1/eta of a rung is promoted
//! ```
//!
//! The rung budgets are `min_steps * eta^k` below `max_steps`, then
//! `max_steps` itself. docs/search.md describes the execution (how rungs are
//! keyed, promoted and replayed).

use serde_json::Value;

use super::error::Issues;

const KEYS: &[&str] = &[
    "metric",
    "mode",
    "stage",
    "min_steps",
    "max_steps",
    "reduction_factor",
];
/// The training stages a budget can be put on (their spec table names).
pub const BUDGETED: &[&str] = &["domain_adapt", "cider_optimize"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Max,
    Min,
}

/// A validated `[search.asha]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Asha {
    /// The valid-split metric promotions are decided on.
    pub metric: String,
    pub mode: Mode,
    /// The budgeted stage's spec table name (`domain_adapt`, `cider_optimize`).
    pub stage: String,
    pub min_steps: u64,
    pub max_steps: u64,
    pub eta: u64,
}

impl Asha {
    /// The step budget of every rung, lowest first; the last is `max_steps`.
    pub fn rungs(&self) -> Vec<u64> {
        let mut out = Vec::new();
        let mut b = self.min_steps;
        while b < self.max_steps {
            out.push(b);
            b = b.saturating_mul(self.eta);
        }
        out.push(self.max_steps);
        out
    }

    /// Whether `a` ranks above `b` under the mode.
    pub fn better(&self, a: f64, b: f64) -> bool {
        match self.mode {
            Mode::Max => a > b,
            Mode::Min => a < b,
        }
    }

    /// The `[search.asha]` table of a validated configuration's `search`
    /// tree (validation has reported any problem with it already).
    pub fn of(search: &Value) -> Option<Asha> {
        let mut issues = Issues::default();
        parse(search.get("asha")?, &mut issues)
    }
}

fn whole(table: &serde_json::Map<String, Value>, key: &str, issues: &mut Issues) -> Option<u64> {
    let v = table.get(key)?;
    match v.as_u64() {
        Some(n) if n >= 1 => Some(n),
        _ => {
            issues.at(
                format!("search.asha.{key}"),
                format!("must be a whole number of at least 1, got {v}"),
            );
            None
        }
    }
}

/// Read `[search.asha]`, reporting every problem with its key.
pub(super) fn parse(v: &Value, issues: &mut Issues) -> Option<Asha> {
    let Value::Object(table) = v else {
        issues.at("search.asha", "must be a table");
        return None;
    };
    let before = issues.list.len();
    for key in table.keys() {
        if !KEYS.contains(&key.as_str()) {
            issues.at(
                format!("search.asha.{key}"),
                format!("unknown key (expected one of {})", KEYS.join(", ")),
            );
        }
    }
    let metric = match table.get("metric") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(other) => {
            issues.at(
                "search.asha.metric",
                format!("expected a metric name such as \"cider_d\", got {other}"),
            );
            String::new()
        }
        None => {
            issues.at(
                "search.asha.metric",
                "missing: the valid-split metric to promote on (e.g. \"cider_d\" or \"loss\")",
            );
            String::new()
        }
    };
    let mode = match table.get("mode") {
        None if metric == "loss" || metric == "top_caption_share" => Mode::Min,
        None => Mode::Max,
        Some(Value::String(s)) if s == "max" => Mode::Max,
        Some(Value::String(s)) if s == "min" => Mode::Min,
        Some(other) => {
            issues.at(
                "search.asha.mode",
                format!("expected \"max\" or \"min\", got {other}"),
            );
            Mode::Max
        }
    };
    let stage = match table.get("stage") {
        None => "domain_adapt".to_string(),
        Some(Value::String(s)) => {
            // The pipeline's own spelling (`domain-adapt`) is accepted too.
            let s = s.replace('-', "_");
            if !BUDGETED.contains(&s.as_str()) {
                issues.at(
                    "search.asha.stage",
                    format!(
                        "cannot budget `{s}`: expected one of {}",
                        BUDGETED.join(", ")
                    ),
                );
            }
            s
        }
        Some(other) => {
            issues.at(
                "search.asha.stage",
                format!("expected a stage name such as \"domain_adapt\", got {other}"),
            );
            String::new()
        }
    };
    let min_steps = whole(table, "min_steps", issues);
    let max_steps = whole(table, "max_steps", issues);
    for (key, v) in [("min_steps", min_steps), ("max_steps", max_steps)] {
        if v.is_none() && !table.contains_key(key) {
            issues.at(
                format!("search.asha.{key}"),
                "missing: rungs need a step budget from min_steps to max_steps",
            );
        }
    }
    let eta = match table.get("reduction_factor") {
        None => 3,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 2 => n,
            _ => {
                issues.at(
                    "search.asha.reduction_factor",
                    format!("must be a whole number of at least 2, got {v}"),
                );
                3
            }
        },
    };
    if let (Some(lo), Some(hi)) = (min_steps, max_steps) {
        if lo > hi {
            issues.at(
                "search.asha.min_steps",
                format!("min_steps ({lo}) is above max_steps ({hi})"),
            );
        }
    }
    if issues.list.len() != before {
        return None;
    }
    Some(Asha {
        metric,
        mode,
        stage,
        min_steps: min_steps?,
        max_steps: max_steps?,
        eta,
    })
}

/// What the cells make of `[search.asha]`: a budgeted stage the trials do
/// not run (cider-optimize disabled) would silently train every trial to the
/// end, so it is an error.
pub(super) fn check_cells(base: &Value, cells: &[super::Cell], issues: &mut Issues) {
    let Some(asha) = base.get("search").and_then(Asha::of) else {
        return;
    };
    if asha.stage == "cider_optimize"
        && cells
            .iter()
            .any(|c| !c.is_baseline() && !c.config.stages.cider_optimize.enabled)
    {
        issues.at(
            "search.asha.stage",
            "cider_optimize is budgeted but stages.cider_optimize.enabled is false",
        );
    }
}
