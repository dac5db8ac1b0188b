//! Printing a sealed plan: a table, Graphviz DOT, or JSON. A search under
//! successive halving adds a line with its trials and rung budgets.

use std::fmt::Write as _;

use comfy_table::{presets, Cell as TCell, Color, ContentArrangement, Table};
use serde::{Serialize, Serializer};

use super::{Plan, Sealed};
use crate::spec::grid::TRIAL_AXIS;

/// How `ecic plan` prints (its `--format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Cells, then one row per stage.
    Table,
    /// Graphviz.
    Dot,
    /// Everything, machine-readable.
    Json,
}

impl Plan<Sealed> {
    /// "N stages to run of M in the plan (naive cells x stages: K)".
    pub fn summary(&self, cached: &dyn Fn(&str) -> bool) -> String {
        let to_run = self.stages().filter(|s| !cached(&s.desc.key)).count();
        format!(
            "{} cells; {} stages to run of {} in the plan (naive cells x stages: {})",
            self.cells.len(),
            to_run,
            self.len(),
            self.naive_len()
        )
    }

    pub fn render(&self, format: Format, cached: &dyn Fn(&str) -> bool) -> String {
        match format {
            Format::Table => self.render_table(cached),
            Format::Dot => self.render_dot(cached),
            Format::Json => {
                let mut out = Vec::new();
                self.write_json(&mut out, cached).expect("json into memory");
                String::from_utf8(out).expect("json is utf-8")
            }
        }
    }

    fn render_table(&self, cached: &dyn Fn(&str) -> bool) -> String {
        let mut t = Table::new();
        t.load_style(presets::UTF8_FULL_CONDENSED)
            .set_content_arrangement(ContentArrangement::Dynamic);
        t.set_header(vec!["#", "stage", "key", "cache", "cells", "inputs"]);
        for (i, s) in self.stages().enumerate() {
            let hit = cached(&s.desc.key);
            let inputs: Vec<String> = s
                .desc
                .inputs
                .iter()
                .map(|(_, k)| k[..12].to_string())
                .collect();
            t.add_row(vec![
                TCell::new(i + 1),
                TCell::new(&s.desc.label),
                TCell::new(&s.desc.key[..12]),
                if hit {
                    TCell::new("hit").fg(Color::Green)
                } else {
                    TCell::new("miss").fg(Color::Yellow)
                },
                TCell::new(s.cells.len()),
                TCell::new(inputs.join(" ")),
            ]);
        }
        let mut cells = Table::new();
        cells
            .load_style(presets::UTF8_FULL_CONDENSED)
            .set_content_arrangement(ContentArrangement::Dynamic);
        // A search's trials are named by number: show what each sampled.
        let sampled = |c: &crate::spec::Cell| -> Option<String> {
            let at = c.overrides.iter().position(|(a, _)| a == TRIAL_AXIS)?;
            let shown: Vec<String> = c.overrides[at + 1..]
                .iter()
                .map(|(k, v)| format!("{}={v}", k.rsplit('.').next().unwrap_or(k)))
                .collect();
            Some(shown.join(" "))
        };
        let search = self.cells.iter().any(|c| sampled(&c.cell).is_some());
        let mut header = vec!["cell", "backbone", "peft", "fusion", "seed"];
        if search {
            header.push("sampled");
        }
        header.push("stages");
        cells.set_header(header);
        for c in &self.cells {
            let keys: Vec<String> = c.stages.iter().map(|(_, k)| k[..8].to_string()).collect();
            let mut row = vec![
                c.cell.name.clone(),
                c.cell.backbone.clone(),
                c.cell.peft.clone(),
                c.cell.fusion.clone(),
                c.cell.seed.to_string(),
            ];
            if search {
                row.push(sampled(&c.cell).unwrap_or_default());
            }
            row.push(keys.join(" > "));
            cells.add_row(row);
        }
        let search = self
            .search_summary()
            .map(|l| format!("{l}\n"))
            .unwrap_or_default();
        format!("{cells}\n{t}\n{}\n{search}", self.summary(cached))
    }

    /// A search under `[search.asha]`: its trials, the rung budgets, and the
    /// steps synchronous halving would train (asynchronous halving promotes
    /// a little more) against every trial run to `max_steps`.
    pub fn search_summary(&self) -> Option<String> {
        let trials: Vec<&super::CellPlan> =
            self.cells.iter().filter(|c| !c.rungs.is_empty()).collect();
        let first = trials.first()?;
        let asha = crate::spec::asha::Asha::of(&first.cell.config.search)?;
        let budgets: Vec<u64> = first.rungs.iter().map(|r| r.steps).collect();
        let n = trials.len() as u64;
        let (mut sync, mut below, mut reach) = (0u64, 0u64, n);
        for &b in &budgets {
            sync += reach * (b - below);
            below = b;
            reach /= asha.eta;
        }
        let full = n * asha.max_steps;
        Some(format!(
            "successive halving: {n} trials, {} rungs of {} steps of {} (eta {}), promoting on \
             valid {} ({}); synchronous halving trains {sync} of the {full} steps of every \
             trial run to max_steps ({:.0}%). The plan lists every rung; a sweep runs the first \
             and those trials are promoted into",
            budgets.len(),
            budgets
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" > "),
            asha.stage.replace('_', "-"),
            asha.eta,
            asha.metric,
            match asha.mode {
                crate::spec::asha::Mode::Max => "max",
                crate::spec::asha::Mode::Min => "min",
            },
            100.0 * sync as f64 / full.max(1) as f64
        ))
    }

    fn render_dot(&self, cached: &dyn Fn(&str) -> bool) -> String {
        let mut out =
            String::from("digraph plan {\n  rankdir=LR;\n  node [shape=box, style=filled];\n");
        for s in self.stages() {
            let color = if cached(&s.desc.key) {
                "palegreen"
            } else {
                "lightgoldenrod1"
            };
            let _ = writeln!(
                out,
                "  \"{}\" [label=\"{}\\n{}\", fillcolor={color}];",
                &s.desc.key[..12],
                s.desc.label.replace('"', "'"),
                &s.desc.key[..12]
            );
        }
        for s in self.stages() {
            for (_, input) in &s.desc.inputs {
                let _ = writeln!(out, "  \"{}\" -> \"{}\";", &input[..12], &s.desc.key[..12]);
            }
        }
        out.push_str("}\n");
        out
    }

    /// The plan as pretty JSON, streamed to `w` (no intermediate `Value`
    /// tree: a 10,000-cell plan is tens of MB). Objects' keys are in
    /// alphabetical order, as `serde_json::Value` printed them before.
    pub fn write_json(
        &self,
        w: &mut dyn std::io::Write,
        cached: &dyn Fn(&str) -> bool,
    ) -> serde_json::Result<()> {
        let hits: Vec<bool> = self.stages().map(|s| cached(&s.desc.key)).collect();
        let to_run = hits.iter().filter(|h| !**h).count();
        let doc = JsonPlan {
            cells: JsonCells(self),
            data_digest: self.data_digest(),
            stages: JsonStages(self, &hits),
            summary: JsonSummary {
                cells: self.cells.len(),
                naive: self.naive_len(),
                stages: self.len(),
                to_run,
                search: self.search_summary(),
            },
        };
        serde_json::to_writer_pretty(w, &doc)
    }
}

// Borrowing views of a plan for `write_json`; fields in alphabetical order.

#[derive(Serialize)]
struct JsonPlan<'a> {
    cells: JsonCells<'a>,
    data_digest: &'a str,
    stages: JsonStages<'a>,
    summary: JsonSummary,
}

#[derive(Serialize)]
struct JsonSummary {
    cells: usize,
    naive: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    search: Option<String>,
    stages: usize,
    to_run: usize,
}

struct JsonCells<'a>(&'a Plan<Sealed>);

impl Serialize for JsonCells<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.cells.iter().map(|c| {
            JsonCell {
                backbone: &c.cell.backbone,
                fusion: &c.cell.fusion,
                name: &c.cell.name,
                overrides: Seq(c
                    .cell
                    .overrides
                    .iter()
                    .map(|(k, v)| KeyValue { key: k, value: v })),
                peft: &c.cell.peft,
                seed: c.cell.seed,
                stages: Seq(c.stages.iter().map(|(k, key)| KeyKind {
                    key,
                    kind: k.name(),
                })),
            }
        }))
    }
}

#[derive(Serialize)]
struct JsonCell<'a, O: Serialize, T: Serialize> {
    backbone: &'a str,
    fusion: &'a str,
    name: &'a str,
    overrides: O,
    peft: &'a str,
    seed: u64,
    stages: T,
}

#[derive(Serialize)]
struct KeyValue<'a> {
    key: &'a str,
    value: &'a serde_json::Value,
}

#[derive(Serialize)]
struct KeyKind<'a> {
    key: &'a str,
    kind: &'a str,
}

struct JsonStages<'a>(&'a Plan<Sealed>, &'a [bool]);

impl Serialize for JsonStages<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let plan = self.0;
        s.collect_seq(plan.stages().zip(self.1).map(|(st, &hit)| JsonStage {
            cached: hit,
            cells: Seq(st.cells.iter().map(|&i| plan.cells[i].cell.name.as_str())),
            inputs: Seq(st.desc.inputs.iter().map(|(_, k)| k.as_str())),
            key: &st.desc.key,
            kind: st.desc.kind.name(),
            label: &st.desc.label,
            params: &st.desc.fingerprint.params,
        }))
    }
}

#[derive(Serialize)]
struct JsonStage<'a, C: Serialize, I: Serialize> {
    cached: bool,
    cells: C,
    inputs: I,
    key: &'a str,
    kind: &'a str,
    label: &'a str,
    params: &'a serde_json::Value,
}

/// A sequence serialized straight from an iterator (cloned: serializing
/// takes `&self`).
struct Seq<I>(I);

impl<I> Serialize for Seq<I>
where
    I: Iterator + Clone,
    I::Item: Serialize,
{
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.clone())
    }
}
