//! The report's model of one sweep, built from the store alone: cells with
//! their headline numbers, cells grouped over seeds, stages and curves. The
//! terminal tables, the plots and the HTML all read this, never SQL (except
//! the section of a search under successive halving, whose rung results are
//! the store's events: [`super::search`] reads them). Zero-shot rows
//! (`peft = "none"`) are groups like any other, marked by
//! [`GroupResult::zero_shot`]: the report sets them beside the baselines.

use std::collections::{BTreeMap, HashMap};

use crate::store::report_queries::{CurvePoint, StageInfo, SweepMeta};
use crate::store::Store;

use super::stats::Stat;
use super::ReportError;

/// The headline metrics, in table order: (store key, label).
pub const HEADLINE: [(&str, &str); 3] = [
    ("cider_d", "CIDEr-D"),
    ("bleu4", "BLEU-4"),
    ("rouge_l", "ROUGE-L"),
];

/// Stage kinds that train (their wall time is "training time").
pub const TRAINING_KINDS: [&str; 5] = [
    "pretrain-vision",
    "pretrain-lm",
    "pretrain-align",
    "domain-adapt",
    "cider-optimize",
];

/// One cell of the grid with what the report shows of it.
#[derive(Debug, Clone)]
pub struct CellResult {
    pub name: String,
    /// The cell's name without its seed suffix: cells that differ only by
    /// seed share it.
    pub group: String,
    pub backbone: String,
    pub peft: String,
    pub fusion: String,
    pub seed: i64,
    /// Non-named axis values, `key=value` joined by spaces.
    pub overrides: String,
    /// Evaluate metrics on the report split (raw scale).
    pub metrics: BTreeMap<String, f64>,
    pub trainable_params: Option<f64>,
    /// Wall seconds of the training stages (shared stages count fully).
    pub train_s: f64,
    /// Wall seconds of all the cell's stages.
    pub wall_s: f64,
    pub captions_per_s: Option<f64>,
    pub stages_run: usize,
    pub stages_reused: usize,
    pub status: String,
    /// (kind, key) in pipeline order.
    pub stages: Vec<(String, String)>,
    /// cider-optimize's valid figures: `cider_d_before`, `cider_d_after`, `cider_d_gain_p`.
    pub scst: BTreeMap<String, f64>,
}

/// A cell whose most frequent caption is written for more than this share of the images has
/// collapsed: its score says little about what it sees, and it is not ranked.
pub const COLLAPSED_SHARE: f64 = 0.2;

impl CellResult {
    pub fn stage_key(&self, kind: &str) -> Option<&str> {
        self.stages
            .iter()
            .find(|(k, _)| k == kind)
            .map(|(_, key)| key.as_str())
    }
}

/// Cells that differ only by seed, summarised as mean ± 95% CI.
#[derive(Debug, Clone)]
pub struct GroupResult {
    pub name: String,
    pub backbone: String,
    pub peft: String,
    pub fusion: String,
    pub overrides: String,
    /// Indices into `SweepData::cells`.
    pub cells: Vec<usize>,
    pub metrics: BTreeMap<String, Stat>,
    pub trainable_params: Option<f64>,
    pub train_s: Option<Stat>,
    pub wall_s: Option<Stat>,
    pub captions_per_s: Option<Stat>,
    pub stages_run: usize,
    pub stages_reused: usize,
    pub status: String,
}

impl GroupResult {
    pub fn metric(&self, key: &str) -> Option<Stat> {
        self.metrics.get(key).copied()
    }

    /// The mean share of the most frequent caption, when it exceeds [`COLLAPSED_SHARE`].
    pub fn collapsed(&self) -> Option<f64> {
        self.metric("top_caption_share")
            .map(|s| s.mean)
            .filter(|&m| m > COLLAPSED_SHARE)
    }

    /// Fine-tuned: neither a baseline nor a zero-shot row.
    pub fn trained(&self) -> bool {
        !crate::spec::params::BASELINES.contains(&self.backbone.as_str()) && !self.zero_shot()
    }

    /// The zero-shot row of a backbone and fusion (`peft = "none"`): the model before domain
    /// adaptation, the baseline that fine-tuning is measured against.
    pub fn zero_shot(&self) -> bool {
        self.peft == crate::spec::params::ZERO_SHOT
    }

    /// Whether this row is a reference for `best` in the findings and their paired tests: a
    /// baseline (`nn`, `mfc`), or the zero-shot row of `best`'s own backbone and fusion (the
    /// other zero-shot rows are summarised, not tested one by one).
    pub fn reference_for(&self, best: &GroupResult) -> bool {
        if self.zero_shot() {
            self.backbone == best.backbone
                && self.fusion == best.fusion
                && self.overrides == best.overrides
                && self.name != best.name
        } else {
            !self.trained()
        }
    }

    /// The row's name in tables, with zero-shot rows marked as such.
    pub fn label(&self) -> String {
        if self.zero_shot() {
            format!("{} (zero-shot)", self.name)
        } else {
            self.name.clone()
        }
    }
}

/// A PEFT level as the report names it: `zero-shot` for `none`.
pub fn peft_label(peft: &str) -> &str {
    if peft == crate::spec::params::ZERO_SHOT {
        "zero-shot"
    } else {
        peft
    }
}

/// Everything a report of one sweep needs.
#[derive(Debug, Clone)]
pub struct SweepData {
    pub meta: SweepMeta,
    /// The evaluation split the headline metrics come from ('' if none).
    pub split: String,
    pub cells: Vec<CellResult>,
    pub groups: Vec<GroupResult>,
    pub stages: Vec<StageInfo>,
    /// Curves by stage key, then curve name: (step, value) in step order.
    pub curves: BTreeMap<String, BTreeMap<String, Vec<(i64, f64)>>>,
    pub events: Vec<(String, i64)>,
}

impl SweepData {
    pub fn load(store: &Store, sweep_id: i64) -> Result<SweepData, ReportError> {
        let meta = store.sweep_meta(sweep_id)?;
        let raw_cells = store.cells_with_stages(sweep_id)?;
        let stages = store.stage_infos(sweep_id)?;
        let metric_rows = store.sweep_metrics(sweep_id)?;
        let curve_rows = store.sweep_curves(sweep_id)?;
        let events = store.event_counts(sweep_id)?;

        let by_key: HashMap<&str, &StageInfo> =
            stages.iter().map(|s| (s.key.as_str(), s)).collect();
        let mut metrics: HashMap<&str, BTreeMap<&str, BTreeMap<&str, f64>>> = HashMap::new();
        for m in &metric_rows {
            metrics
                .entry(m.key.as_str())
                .or_default()
                .entry(m.split.as_str())
                .or_default()
                .insert(&m.metric, m.value);
        }
        let split = pick_split(&raw_cells, &metrics);

        let mut cells = Vec::with_capacity(raw_cells.len());
        for c in &raw_cells {
            let eval_key = c
                .stages
                .iter()
                .find(|(k, _)| k == "evaluate")
                .map(|(_, key)| key.as_str());
            let eval = eval_key.and_then(|k| metrics.get(k));
            let headline: BTreeMap<String, f64> = eval
                .and_then(|e| e.get(split.as_str()))
                .map(|m| m.iter().map(|(k, v)| (k.to_string(), *v)).collect())
                .unwrap_or_default();
            let captions_per_s = eval
                .and_then(|e| e.get(""))
                .and_then(|m| m.get("captions_per_s"))
                .copied();
            let scst: BTreeMap<String, f64> = c
                .stages
                .iter()
                .find(|(k, _)| k == "cider-optimize")
                .and_then(|(_, key)| metrics.get(key.as_str()))
                .and_then(|m| m.get("valid"))
                .map(|m| m.iter().map(|(k, v)| (k.to_string(), *v)).collect())
                .unwrap_or_default();
            let mut trainable: Option<f64> = None;
            let (mut train_s, mut wall_s, mut run, mut reused) = (0.0, 0.0, 0, 0);
            let mut statuses = Vec::new();
            for (kind, key) in &c.stages {
                let Some(s) = by_key.get(key.as_str()) else {
                    continue;
                };
                let w = s.wall_s.unwrap_or(0.0);
                wall_s += w;
                if TRAINING_KINDS.contains(&kind.as_str()) {
                    train_s += w;
                }
                if s.reused {
                    reused += 1;
                } else {
                    run += 1;
                }
                statuses.push(s.status.as_str());
                let stage_level = metrics
                    .get(key.as_str())
                    .and_then(|m| m.get(""))
                    .and_then(|m| m.get("trainable_params"));
                if let Some(t) = s
                    .trainable_params
                    .map(|t| t as f64)
                    .or(stage_level.copied())
                {
                    trainable = Some(trainable.map_or(t, |old: f64| old.max(t)));
                }
            }
            cells.push(CellResult {
                name: c.name.clone(),
                group: group_name(&c.name, c.seed),
                backbone: c.backbone.clone(),
                peft: c.peft.clone(),
                fusion: c.fusion.clone(),
                seed: c.seed,
                overrides: overrides_text(&c.overrides),
                metrics: headline,
                trainable_params: trainable,
                train_s,
                wall_s,
                captions_per_s,
                stages_run: run,
                stages_reused: reused,
                status: cell_status(&statuses).to_string(),
                stages: c.stages.clone(),
                scst,
            });
        }
        let groups = group_cells(&cells);

        let mut curves: BTreeMap<String, BTreeMap<String, Vec<(i64, f64)>>> = BTreeMap::new();
        for CurvePoint {
            key,
            name,
            step,
            value,
        } in curve_rows
        {
            curves
                .entry(key)
                .or_default()
                .entry(name)
                .or_default()
                .push((step, value));
        }
        Ok(SweepData {
            meta,
            split,
            cells,
            groups,
            stages,
            curves,
            events,
        })
    }

    /// The group with the highest mean CIDEr-D (ties: first in grid order).
    /// The group with the highest mean CIDEr-D among those that did not collapse.
    pub fn best_group(&self) -> Option<usize> {
        let mut best: Option<(usize, f64)> = None;
        for (i, g) in self.groups.iter().enumerate() {
            if g.collapsed().is_some() {
                continue;
            }
            if let Some(s) = g.metric("cider_d") {
                if best.is_none_or(|(_, b)| s.mean > b) {
                    best = Some((i, s.mean));
                }
            }
        }
        best.map(|(i, _)| i)
    }

    pub fn stage(&self, key: &str) -> Option<&StageInfo> {
        self.stages.iter().find(|s| s.key == key)
    }
}

/// `valid` when any evaluate stage scored it, else `test`, else the first split seen.
fn pick_split(
    cells: &[crate::store::report_queries::CellStages],
    metrics: &HashMap<&str, BTreeMap<&str, BTreeMap<&str, f64>>>,
) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for c in cells {
        for (kind, key) in &c.stages {
            if kind != "evaluate" {
                continue;
            }
            if let Some(m) = metrics.get(key.as_str()) {
                seen.extend(m.keys().filter(|s| !s.is_empty()));
            }
        }
    }
    for want in ["valid", "test"] {
        if seen.contains(&want) {
            return want.to_string();
        }
    }
    seen.first().map(|s| s.to_string()).unwrap_or_default()
}

/// A cell name without its `-s<seed>` suffix.
pub fn group_name(name: &str, seed: i64) -> String {
    name.strip_suffix(&format!("-s{seed}"))
        .unwrap_or(name)
        .to_string()
}

/// `{"a.b": 1, "c": "x"}` -> `a.b=1 c=x`.
fn overrides_text(json: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(json) {
        Ok(serde_json::Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn cell_status(statuses: &[&str]) -> &'static str {
    if statuses.is_empty() {
        "pending"
    } else if statuses.iter().all(|s| *s == "done") {
        "done"
    } else if statuses.contains(&"failed") {
        "failed"
    } else if statuses.contains(&"running") {
        "running"
    } else if statuses.contains(&"interrupted") {
        "interrupted"
    } else if statuses.contains(&"skipped") {
        "skipped"
    } else if statuses.contains(&"stopped") {
        // A search trial successive halving stopped early.
        "stopped"
    } else {
        "pending"
    }
}

fn group_cells(cells: &[CellResult]) -> Vec<GroupResult> {
    let mut order: Vec<String> = Vec::new();
    let mut members: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, c) in cells.iter().enumerate() {
        if !members.contains_key(c.group.as_str()) {
            order.push(c.group.clone());
        }
        members.entry(c.group.as_str()).or_default().push(i);
    }
    order
        .iter()
        .map(|name| {
            let idx = members[name.as_str()].clone();
            let first = &cells[idx[0]];
            let mut keys: Vec<&String> =
                idx.iter().flat_map(|&i| cells[i].metrics.keys()).collect();
            keys.sort();
            keys.dedup();
            let metrics = keys
                .into_iter()
                .filter_map(|k| {
                    let v: Vec<f64> = idx
                        .iter()
                        .filter_map(|&i| cells[i].metrics.get(k).copied())
                        .collect();
                    Stat::of(&v).map(|s| (k.clone(), s))
                })
                .collect();
            let stat = |f: &dyn Fn(&CellResult) -> Option<f64>| {
                Stat::of(&idx.iter().filter_map(|&i| f(&cells[i])).collect::<Vec<_>>())
            };
            let statuses: Vec<&str> = idx.iter().map(|&i| cells[i].status.as_str()).collect();
            GroupResult {
                name: name.clone(),
                backbone: first.backbone.clone(),
                peft: first.peft.clone(),
                fusion: first.fusion.clone(),
                overrides: first.overrides.clone(),
                metrics,
                trainable_params: first.trainable_params,
                train_s: stat(&|c| Some(c.train_s)),
                wall_s: stat(&|c| Some(c.wall_s)),
                captions_per_s: stat(&|c| c.captions_per_s),
                stages_run: idx.iter().map(|&i| cells[i].stages_run).sum(),
                stages_reused: idx.iter().map(|&i| cells[i].stages_reused).sum(),
                status: cell_status(&statuses).to_string(),
                cells: idx,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_strip_only_the_seed_suffix() {
        assert_eq!(group_name("blip2-lora-early-s0", 0), "blip2-lora-early");
        assert_eq!(group_name("blip2-lora-early-s12", 12), "blip2-lora-early");
        assert_eq!(group_name("nn", 0), "nn");
        assert_eq!(group_name("x-s1", 0), "x-s1");
        assert_eq!(
            overrides_text(r#"{"stages.domain_adapt.lr":0.0005}"#),
            "stages.domain_adapt.lr=0.0005"
        );
        assert_eq!(overrides_text(r#"{"m":"beam"}"#), "m=beam");
    }
}
