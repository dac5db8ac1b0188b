//! Grid expansion: axes (plain and zipped), seeds and exclusions -> cells.
//!
//! `[grid]` holds one list per axis. The named axes are `backbone`, `peft` and
//! `fusion`; any other key is a dotted path into the spec
//! (`"stages.domain_adapt.lr" = [1e-4, 5e-4]`, or nested tables). `[[grid.zip]]`
//! tables hold axes of equal length that move together. `[[exclude]]` tables
//! drop the cells that match all of their keys. A `[search]` table adds its
//! sampled trials as one more zipped group (see [`search`]). Baseline backbones (`nn`,
//! `mfc`) have no PEFT or fusion: their cells carry `-` there and are
//! deduplicated. `peft = "none"` makes a zero-shot cell ([`Cell::is_zero_shot`]): a model
//! with no domain adaptation, whose cell keeps its fusion and shares every upstream stage.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{Map, Value};

use super::error::{did_you_mean, Issues};
use super::params::{Config, BACKBONES, BASELINES, FUSIONS, PEFTS, ZERO_SHOT};
use super::search;

/// The axis that numbers a `[search]`'s sampled trials (0, 1, ...).
pub const TRIAL_AXIS: &str = "trial";

/// Most cells one spec may expand into (axes x seeds, before exclusions).
pub const MAX_CELLS: usize = 20_000;
use super::validate;

/// One cell of the grid: a complete configuration.
#[derive(Debug, Clone)]
pub struct Cell {
    /// Stable human name, e.g. `blip2-lora-early-s0` or `llava-lora-late-lr=0.0005-s1`.
    pub name: String,
    pub backbone: String,
    pub peft: String,
    pub fusion: String,
    pub seed: u64,
    /// Values of the non-named axes, in axis order (key path, value).
    pub overrides: Vec<(String, Value)>,
    /// The cell's resolved configuration.
    pub config: Config,
}

impl Cell {
    pub fn is_baseline(&self) -> bool {
        BASELINES.contains(&self.backbone.as_str())
    }

    /// A zero-shot cell (`peft = "none"`): evaluated as pretrain-align or the checkpoint left
    /// the model, without domain-adapt or cider-optimize.
    pub fn is_zero_shot(&self) -> bool {
        !self.is_baseline() && self.peft == ZERO_SHOT
    }
}

struct Group {
    axes: Vec<String>,
    rows: Vec<Vec<Value>>,
    /// Where its axes were written: `grid` or `search`.
    section: &'static str,
}

pub(super) fn expand(
    base: &Value,
    spec_dir: &Path,
    issues: &mut Issues,
) -> Option<(Config, Vec<String>, Vec<Cell>)> {
    // Type errors do not stop the grid checks: report everything at once.
    let config = validate::sections(base, issues);
    if let Some(config) = &config {
        validate::semantics(config, spec_dir, "", issues);
    }
    let defaults = match &config {
        Some(c) => serde_json::to_value(c).expect("config serializes"),
        None => serde_json::to_value(
            serde_json::from_value::<Config>(serde_json::json!({"name": "-"}))
                .expect("defaults deserialize"),
        )
        .expect("config serializes"),
    };
    let defaults = with_omitted_keys(defaults);

    let mut groups: Vec<Group> = Vec::new();
    let grid = base
        .get("grid")
        .cloned()
        .unwrap_or(Value::Object(Map::new()));
    let Value::Object(grid) = grid else {
        issues.at("grid", "must be a table of axes");
        return None;
    };
    for (key, value) in &grid {
        if key == "zip" {
            let Value::Array(zips) = value else {
                issues.at("grid.zip", "must be an array of tables (`[[grid.zip]]`)");
                continue;
            };
            for (i, z) in zips.iter().enumerate() {
                let mut axes = Vec::new();
                flatten(&format!("grid.zip.{i}"), "", z, &mut axes, issues);
                if axes.is_empty() {
                    issues.at(format!("grid.zip.{i}"), "names no axes to zip");
                    continue;
                }
                let lens: BTreeSet<usize> = axes.iter().map(|(_, v)| v.len()).collect();
                if lens.len() > 1 {
                    issues.at(
                        format!("grid.zip.{i}"),
                        "zipped axes must all have the same length",
                    );
                    continue;
                }
                let n = lens.into_iter().next().unwrap_or(0);
                let rows = (0..n)
                    .map(|r| axes.iter().map(|(_, v)| v[r].clone()).collect())
                    .collect();
                groups.push(Group {
                    axes: axes.into_iter().map(|(k, _)| k).collect(),
                    rows,
                    section: "grid",
                });
            }
        } else {
            let mut axes = Vec::new();
            flatten("grid", key, value, &mut axes, issues);
            for (k, v) in axes {
                groups.push(Group {
                    axes: vec![k],
                    rows: v.into_iter().map(|x| vec![x]).collect(),
                    section: "grid",
                });
            }
        }
    }
    // The named axes first, in their fixed order; then the others as written.
    let rank = |g: &Group| match g.axes.first().map(String::as_str) {
        Some("backbone") => 0,
        Some("peft") => 1,
        Some("fusion") => 2,
        _ => 3,
    };
    groups.sort_by_key(rank);
    for (axis, default) in [("backbone", "blip2"), ("peft", "lora"), ("fusion", "early")] {
        if !groups.iter().any(|g| g.axes.iter().any(|a| a == axis)) {
            groups.push(Group {
                axes: vec![axis.into()],
                rows: vec![vec![Value::from(default)]],
                section: "grid",
            });
        }
    }
    groups.sort_by_key(rank);
    // Sampled trials: one zipped group, last, so that a grid cell's trials
    // are neighbours.
    if let Some(search) = search::parse(base.get("search"), issues) {
        let mut axes = vec![TRIAL_AXIS.to_string()];
        axes.extend(search.params.iter().map(|(k, _)| k.clone()));
        let rows = search
            .sample()
            .into_iter()
            .enumerate()
            .map(|(i, row)| std::iter::once(Value::from(i)).chain(row).collect())
            .collect();
        groups.push(Group {
            axes,
            rows,
            section: "search",
        });
    }

    let mut axis_names = Vec::new();
    for g in &groups {
        for (col, axis) in g.axes.iter().enumerate() {
            if axis_names.contains(axis) {
                issues.at(format!("{}.{axis}", g.section), "axis given twice");
            }
            axis_names.push(axis.clone());
            if axis != TRIAL_AXIS {
                let values = g.rows.iter().map(|r| &r[col]);
                check_axis(g.section, axis, values, &defaults, issues);
            }
        }
    }
    let excludes = parse_excludes(base.get("exclude"), &axis_names, issues);
    if !issues.is_empty() {
        return None;
    }
    let config = config?;
    // Counted before expanding: each cell holds its own resolved tree, and a
    // 100,000-cell grid would need gigabytes before anything could be said.
    let count = groups
        .iter()
        .fold(config.seeds.len() as u128, |n, g| n * g.rows.len() as u128);
    if count > MAX_CELLS as u128 {
        issues.at(
            "grid",
            format!(
                "{count} cells (axes x seeds, before exclusions) is over the limit of {MAX_CELLS}; \
                 split the sweep"
            ),
        );
        return None;
    }

    let mut cells = Vec::new();
    let mut seen = BTreeSet::new();
    let mut idx = vec![0usize; groups.len()];
    'outer: loop {
        let mut values: Vec<(String, Value)> = Vec::new();
        for (g, &i) in groups.iter().zip(&idx) {
            for (axis, v) in g.axes.iter().zip(&g.rows[i]) {
                values.push((axis.clone(), v.clone()));
            }
        }
        if !excludes.iter().any(|ex| matches(ex, &values)) {
            for &seed in &config.seeds {
                if let Some(cell) = make_cell(base, &values, seed, spec_dir, issues) {
                    let ident = (cell.name.clone(), cell.seed);
                    if seen.insert(ident) {
                        cells.push(cell);
                    }
                }
            }
        }
        // Odometer over the groups, last group fastest.
        for k in (0..groups.len()).rev() {
            idx[k] += 1;
            if idx[k] < groups[k].rows.len() {
                continue 'outer;
            }
            idx[k] = 0;
        }
        break;
    }
    if cells.is_empty() && issues.is_empty() {
        issues.at("exclude", "every cell of the grid is excluded");
    }
    Some((config, axis_names, cells))
}

/// Collect the leaf lists of a (possibly nested) grid table as axes.
fn flatten(
    at: &str,
    prefix: &str,
    value: &Value,
    out: &mut Vec<(String, Vec<Value>)>,
    issues: &mut Issues,
) {
    match value {
        Value::Array(values) => {
            if values.is_empty() {
                issues.at(
                    format!("{at}.{prefix}"),
                    "empty axis: give at least one value",
                );
            }
            out.push((prefix.to_string(), values.clone()));
        }
        Value::Object(map) => {
            for (k, v) in map {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(at, &p, v, out, issues);
            }
        }
        _ => {
            let key = if prefix.is_empty() {
                at.to_string()
            } else {
                format!("{at}.{prefix}")
            };
            issues.at(
                key,
                "a grid axis must be a list of values, e.g. `[1e-4, 5e-4]`",
            );
        }
    }
}

/// The serialized config leaves out keys that would otherwise change other stages' cache keys
/// when empty (`stages.pretrain_align.unfreeze`); put them back so that they can be grid axes.
fn with_omitted_keys(mut defaults: Value) -> Value {
    if let Some(Value::Object(m)) = defaults.pointer_mut("/stages/pretrain_align") {
        m.entry("unfreeze").or_insert(Value::Array(Vec::new()));
    }
    defaults
}

fn check_axis<'a>(
    section: &str,
    axis: &str,
    values: impl Iterator<Item = &'a Value>,
    defaults: &Value,
    issues: &mut Issues,
) {
    let named: Option<&[&str]> = match axis {
        "backbone" => Some(BACKBONES),
        "peft" => Some(PEFTS),
        "fusion" => Some(FUSIONS),
        _ => None,
    };
    if let Some(allowed) = named {
        for v in values {
            match v.as_str() {
                Some(s) if allowed.contains(&s) => {}
                Some(s) => {
                    let zero_shot = axis == "peft"
                        && s.to_ascii_lowercase().replace(['-', '_', ' '], "") == "zeroshot";
                    let hint = if zero_shot {
                        format!(" (a zero-shot row is peft `{ZERO_SHOT}`)")
                    } else {
                        did_you_mean(s, allowed.iter().copied()).unwrap_or_default()
                    };
                    issues.at(
                        format!("{section}.{axis}"),
                        format!(
                            "unknown {axis} `{s}`{hint}; expected one of {}",
                            allowed.join(", ")
                        ),
                    )
                }
                None => issues.at(
                    format!("{section}.{axis}"),
                    format!("{axis} values must be strings, got {v}"),
                ),
            }
        }
        return;
    }
    if axis == "seeds" || axis == "seed" {
        issues.at(
            format!("{section}.{axis}"),
            "seeds are set with the top-level `seeds = [...]`",
        );
        return;
    }
    // A parameter path must exist in the spec's schema.
    let mut node = defaults;
    let mut walked = String::new();
    for part in axis.split('.') {
        let next = match node {
            Value::Object(m) => m.get(part).or_else(|| {
                // Free-form maps (lr_mult, resources) accept new keys.
                (walked.ends_with("lr_mult") || walked == "resources").then_some(&Value::Null)
            }),
            _ => None,
        };
        match next {
            Some(n) => node = n,
            None => {
                let hint = match node {
                    Value::Object(m) => {
                        did_you_mean(part, m.keys().map(String::as_str)).unwrap_or_default()
                    }
                    _ => String::new(),
                };
                issues.at(
                    format!("{section}.{axis}"),
                    format!("no spec key `{axis}`{hint}"),
                );
                return;
            }
        }
        if !walked.is_empty() {
            walked.push('.');
        }
        walked.push_str(part);
    }
    if matches!(axis, "name" | "seeds" | "grid" | "exclude")
        || axis.starts_with("data.")
        || axis == "data"
    {
        issues.at(
            format!("{section}.{axis}"),
            "this key cannot be a grid axis (one data set and one name per sweep)",
        );
    }
}

type Exclude = Vec<(String, Vec<Value>)>;

fn parse_excludes(v: Option<&Value>, axes: &[String], issues: &mut Issues) -> Vec<Exclude> {
    let Some(v) = v else { return Vec::new() };
    if v.is_null() {
        return Vec::new();
    }
    let Value::Array(list) = v else {
        issues.at("exclude", "must be an array of tables (`[[exclude]]`)");
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in list.iter().enumerate() {
        let Value::Object(map) = item else {
            issues.at(format!("exclude.{i}"), "must be a table of axis = value(s)");
            continue;
        };
        let mut rule = Vec::new();
        for (k, val) in map {
            if !axes.contains(k) && k != "seed" {
                issues.at(
                    format!("exclude.{i}.{k}"),
                    format!(
                        "`{k}` is not a grid axis{}",
                        did_you_mean(k, axes.iter().map(String::as_str)).unwrap_or_default()
                    ),
                );
            }
            let vals = match val {
                Value::Array(a) => a.clone(),
                other => vec![other.clone()],
            };
            rule.push((k.clone(), vals));
        }
        out.push(rule);
    }
    out
}

fn matches(rule: &Exclude, values: &[(String, Value)]) -> bool {
    rule.iter().all(|(k, allowed)| {
        values
            .iter()
            .any(|(axis, v)| axis == k && allowed.iter().any(|a| value_eq(a, v)))
    })
}

fn value_eq(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

fn make_cell(
    base: &Value,
    values: &[(String, Value)],
    seed: u64,
    spec_dir: &Path,
    issues: &mut Issues,
) -> Option<Cell> {
    let get = |axis: &str| {
        values
            .iter()
            .find(|(a, _)| a == axis)
            .and_then(|(_, v)| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let backbone = get("backbone");
    let baseline = BASELINES.contains(&backbone.as_str());
    let (peft, fusion) = if baseline {
        ("-".to_string(), "-".to_string())
    } else {
        (get("peft"), get("fusion"))
    };
    let mut tree = base.clone();
    let mut overrides = Vec::new();
    for (axis, v) in values {
        if matches!(axis.as_str(), "backbone" | "peft" | "fusion") {
            continue;
        }
        if axis != TRIAL_AXIS {
            set_path(&mut tree, axis, v.clone());
        }
        overrides.push((axis.clone(), v.clone()));
    }
    let mut name = format!("{backbone}-{peft}-{fusion}");
    if baseline {
        name = backbone.clone();
    }
    // A trial is named by its number; its sampled values follow the axis in
    // `overrides` (and in `ecic plan`).
    let trial_at = overrides.iter().position(|(a, _)| a == TRIAL_AXIS);
    for (i, (axis, v)) in overrides.iter().enumerate() {
        if trial_at.is_some_and(|t| i > t) {
            break;
        }
        if axis == TRIAL_AXIS {
            name.push_str(&format!("-t{v}"));
            continue;
        }
        let short = axis.rsplit('.').next().unwrap_or(axis);
        let shown = match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        name.push_str(&format!("-{short}={shown}"));
    }
    name.push_str(&format!("-s{seed}"));
    let mut local = Issues::default();
    // Fast path: one typed pass; only a failing cell pays for the per-section
    // diagnosis.
    let config = match serde_json::from_value::<Config>(tree.clone()) {
        Ok(c) => Some(c),
        Err(_) => validate::sections(&tree, &mut local),
    };
    if let Some(config) = &config {
        validate::semantics(config, spec_dir, &backbone, &mut local);
    }
    let ok = local.is_empty();
    for i in local.list {
        let msg = if overrides.is_empty() {
            i.message
        } else {
            format!("{} (in cell {name})", i.message)
        };
        match i.key {
            Some(k) => issues.at(k, msg),
            None => issues.general(msg),
        }
    }
    if !ok {
        return None;
    }
    Some(Cell {
        name,
        backbone,
        peft,
        fusion,
        seed,
        overrides,
        config: config?,
    })
}

/// Set a dotted path in a JSON tree, creating tables on the way.
pub(super) fn set_path(tree: &mut Value, path: &str, value: Value) {
    let mut node = tree;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if !node.is_object() {
            *node = Value::Object(Map::new());
        }
        let map = node.as_object_mut().expect("just made an object");
        if i + 1 == parts.len() {
            map.insert(part.to_string(), value);
            return;
        }
        node = map
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}
