//! Printing a sealed plan: a table, Graphviz DOT, or JSON.

use std::fmt::Write as _;

use comfy_table::{presets, Cell as TCell, Color, ContentArrangement, Table};
use serde_json::json;

use super::{Plan, Sealed};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Dot,
    Json,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "table" => Ok(Format::Table),
            "dot" => Ok(Format::Dot),
            "json" => Ok(Format::Json),
            other => Err(format!(
                "unknown plan format `{other}` (expected table, dot or json)"
            )),
        }
    }
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
            Format::Json => serde_json::to_string_pretty(&self.to_json(cached)).expect("json"),
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
        cells.set_header(vec!["cell", "backbone", "peft", "fusion", "seed", "stages"]);
        for c in &self.cells {
            let keys: Vec<String> = c.stages.iter().map(|(_, k)| k[..8].to_string()).collect();
            cells.add_row(vec![
                c.cell.name.clone(),
                c.cell.backbone.clone(),
                c.cell.peft.clone(),
                c.cell.fusion.clone(),
                c.cell.seed.to_string(),
                keys.join(" > "),
            ]);
        }
        format!("{cells}\n{t}\n{}\n", self.summary(cached))
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

    pub fn to_json(&self, cached: &dyn Fn(&str) -> bool) -> serde_json::Value {
        let stages: Vec<_> = self
            .stages()
            .map(|s| {
                json!({
                    "key": s.desc.key,
                    "kind": s.desc.kind.name(),
                    "label": s.desc.label,
                    "cached": cached(&s.desc.key),
                    "params": s.desc.fingerprint.params,
                    "inputs": s.desc.inputs.iter().map(|(_, k)| k).collect::<Vec<_>>(),
                    "cells": s.cells.iter().map(|&i| &self.cells[i].cell.name).collect::<Vec<_>>(),
                })
            })
            .collect();
        let cells: Vec<_> = self
            .cells
            .iter()
            .map(|c| {
                json!({
                    "name": c.cell.name,
                    "backbone": c.cell.backbone,
                    "peft": c.cell.peft,
                    "fusion": c.cell.fusion,
                    "seed": c.cell.seed,
                    "overrides": c.cell.overrides.iter().map(|(k, v)| json!({"key": k, "value": v})).collect::<Vec<_>>(),
                    "stages": c.stages.iter().map(|(k, key)| json!({"kind": k.name(), "key": key})).collect::<Vec<_>>(),
                })
            })
            .collect();
        let to_run = self.stages().filter(|s| !cached(&s.desc.key)).count();
        json!({
            "cells": cells,
            "stages": stages,
            "summary": {"cells": self.cells.len(), "stages": self.len(), "to_run": to_run, "naive": self.naive_len()},
            "data_digest": self.data_digest(),
        })
    }
}
