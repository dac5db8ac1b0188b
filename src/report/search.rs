//! The report's section for a search under successive halving
//! (docs/search.md): the best trial, every trial's metric by rung (the
//! ASHA picture, as a chart and a table), and the training steps saved
//! against running every trial to `max_steps`. Read from the store alone:
//! the rung results the sweep recorded as `asha-result` events, the
//! stopped trials' `asha-stopped` events, and the rung budgets from the
//! planned stages' `rung_steps`.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::html::esc;
use super::plots::{write_chart, Chart, PlotFile};
use super::ReportError;
use crate::store::Store;

/// One trial: its metric at each rung it reached.
#[derive(Debug, Clone)]
pub struct TrialRow {
    pub cell: String,
    /// Per rung (budget order): the metric, where the trial reached it.
    pub values: Vec<Option<f64>>,
    /// The rung it was stopped at, if the search stopped it.
    pub stopped_at: Option<usize>,
}

impl TrialRow {
    fn reached(&self) -> Option<usize> {
        self.values.iter().rposition(Option::is_some)
    }
}

#[derive(Debug, Clone)]
pub struct SearchSection {
    pub metric: String,
    pub maximise: bool,
    /// Steps of each rung, lowest first.
    pub budgets: Vec<u64>,
    pub trials: Vec<TrialRow>,
    pub plot: Option<PlotFile>,
}

fn sql(store: &Store) -> impl Fn(rusqlite::Error) -> ReportError + '_ {
    move |source| {
        ReportError::Store(crate::store::StoreError::Sqlite {
            path: store.path().to_path_buf(),
            source,
        })
    }
}

impl SearchSection {
    /// The search of sweep `sweep_id`, if its plan has rungs.
    pub fn load(store: &Store, sweep_id: i64) -> Result<Option<SearchSection>, ReportError> {
        let conn = store.conn();
        let err = sql(store);
        let budgets: Vec<u64> = {
            let mut st = conn
                .prepare(
                    "SELECT DISTINCT json_extract(s.params, '$.rung_steps') AS b FROM stages s
                     JOIN sweep_stages ss ON ss.key = s.key
                     WHERE ss.sweep_id = ?1 AND b IS NOT NULL ORDER BY b",
                )
                .map_err(&err)?;
            let rows = st
                .query_map([sweep_id], |r| r.get::<_, i64>(0))
                .map_err(&err)?;
            rows.flatten().map(|b| b as u64).collect()
        };
        if budgets.is_empty() {
            return Ok(None);
        }
        let keys: HashSet<String> = {
            let mut st = conn
                .prepare("SELECT key FROM sweep_stages WHERE sweep_id = ?1")
                .map_err(&err)?;
            let rows = st
                .query_map([sweep_id], |r| r.get::<_, String>(0))
                .map_err(&err)?;
            rows.flatten().collect()
        };
        let cells: Vec<String> = {
            let mut st = conn
                .prepare("SELECT name FROM cells WHERE sweep_id = ?1 ORDER BY position")
                .map_err(&err)?;
            let rows = st
                .query_map([sweep_id], |r| r.get::<_, String>(0))
                .map_err(&err)?;
            rows.flatten().collect()
        };
        let mut st = conn
            .prepare(
                "SELECT what, key, detail FROM events
                 WHERE what IN ('asha-result', 'asha-stopped') ORDER BY id",
            )
            .map_err(&err)?;
        let events: Vec<(String, String, String)> = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(&err)?
            .flatten()
            .collect();
        let mut rows: BTreeMap<String, TrialRow> = BTreeMap::new();
        let (mut metric, mut maximise) = (String::new(), true);
        for (what, key, detail) in events {
            // Results of this sweep's plan only (a key is content-addressed:
            // recorded by any run, it is this plan's result).
            if !keys.contains(&key) {
                continue;
            }
            let Ok(d) = serde_json::from_str::<serde_json::Value>(&detail) else {
                continue;
            };
            let (Some(cell), Some(rung)) = (d["cell"].as_str(), d["rung"].as_u64()) else {
                continue;
            };
            let rung = rung as usize;
            if rung >= budgets.len() || !cells.iter().any(|c| c == cell) {
                continue;
            }
            let row = rows.entry(cell.to_string()).or_insert_with(|| TrialRow {
                cell: cell.to_string(),
                values: vec![None; budgets.len()],
                stopped_at: None,
            });
            if what == "asha-stopped" {
                row.stopped_at = Some(rung);
                continue;
            }
            if let Some(m) = d["metric"].as_str() {
                metric = m.to_string();
            }
            if let Some(m) = d["mode"].as_str() {
                maximise = m != "min";
            }
            if row.values[rung].is_none() {
                row.values[rung] = d["value"].as_f64();
            }
        }
        // A trial promoted again later (a widened search) is not stopped.
        for r in rows.values_mut() {
            if r.stopped_at.is_some_and(|s| r.reached() > Some(s)) {
                r.stopped_at = None;
            }
        }
        let mut trials: Vec<TrialRow> = cells.iter().filter_map(|c| rows.remove(c)).collect();
        trials.retain(|t| t.reached().is_some());
        if trials.is_empty() {
            return Ok(None);
        }
        Ok(Some(SearchSection {
            metric,
            maximise,
            budgets,
            trials,
            plot: None,
        }))
    }

    /// The best trial at the top rung: (index, value).
    pub fn best(&self) -> Option<(usize, f64)> {
        let top = self.budgets.len() - 1;
        let mut best: Option<(usize, f64)> = None;
        for (i, t) in self.trials.iter().enumerate() {
            let Some(v) = t.values[top].filter(|v| !v.is_nan()) else {
                continue;
            };
            let better = match best {
                None => true,
                Some((_, b)) => (self.maximise && v > b) || (!self.maximise && v < b),
            };
            if better {
                best = Some((i, v));
            }
        }
        best
    }

    /// Budgeted steps trained (to each trial's highest rung) and the steps
    /// of every trial run to `max_steps`.
    pub fn steps(&self) -> (u64, u64) {
        let full = self.trials.len() as u64 * self.budgets.last().copied().unwrap_or(0);
        let trained = self
            .trials
            .iter()
            .filter_map(|t| t.reached().map(|r| self.budgets[r]))
            .sum();
        (trained, full)
    }

    /// Draw the chart into the report directory.
    pub fn write_plot(&mut self, dir: &Path, svg: bool) -> Result<(), ReportError> {
        let title = format!("{} by rung", self.metric);
        self.plot = Some(write_chart(self, dir, "search", &title, (700, 420), svg)?);
        Ok(())
    }

    /// The section's HTML.
    pub fn html(&self, o: &mut String) {
        o.push_str("<h2 id=\"search\">Search: successive halving</h2>\n");
        let (trained, full) = self.steps();
        let best = self.best();
        let _ = write!(
            o,
            "<p>{} trials over rungs of {} steps; promoted on valid {} ({}). ",
            self.trials.len(),
            self.budgets
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" → "),
            esc(&self.metric),
            if self.maximise { "max" } else { "min" },
        );
        match best {
            Some((i, v)) => {
                let _ = write!(
                    o,
                    "Best trial: <b>{}</b> ({} = {v:.4}). ",
                    esc(&self.trials[i].cell),
                    esc(&self.metric)
                );
            }
            None => o.push_str("No trial has reached the top rung yet. "),
        }
        let _ = write!(
            o,
            "Training steps of the budgeted stage: {trained} of the {full} that running every \
             trial to {} steps takes ({:.0}%; {} saved).</p>\n",
            self.budgets.last().copied().unwrap_or(0),
            100.0 * trained as f64 / full.max(1) as f64,
            full.saturating_sub(trained)
        );
        if let Some(p) = &self.plot {
            let _ = write!(
                o,
                "<figure><img src=\"{}\" width=\"{}\" height=\"{}\" alt=\"{}\"><figcaption>{}</figcaption></figure>\n",
                esc(&p.file),
                p.width,
                p.height,
                esc(&p.title),
                esc(&p.title)
            );
        }
        o.push_str("<table><tr><th class=\"l\">trial</th>");
        for b in &self.budgets {
            let _ = write!(o, "<th>{b} steps</th>");
        }
        o.push_str("<th class=\"l\">status</th></tr>\n");
        for (i, t) in self.trials.iter().enumerate() {
            let is_best = best.is_some_and(|(b, _)| b == i);
            let _ = write!(
                o,
                "<tr{}><td class=\"l\">{}</td>",
                if is_best { " class=\"best\"" } else { "" },
                esc(&t.cell)
            );
            for v in &t.values {
                match v {
                    Some(v) => {
                        let _ = write!(o, "<td>{v:.4}</td>");
                    }
                    None => o.push_str("<td>–</td>"),
                }
            }
            let status = match (t.stopped_at, t.reached()) {
                (Some(r), _) => format!("stopped at rung {r}"),
                (None, Some(r)) if r + 1 == self.budgets.len() => "full budget".to_string(),
                (None, Some(r)) => format!("at rung {r}"),
                (None, None) => String::new(),
            };
            let _ = write!(o, "<td class=\"l\">{}</td></tr>\n", esc(&status));
        }
        o.push_str("</table>\n");
    }
}

impl Chart for SearchSection {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let e = |x: &dyn std::fmt::Display| x.to_string();
        let vals: Vec<f64> = self
            .trials
            .iter()
            .flat_map(|t| t.values.iter().flatten().copied())
            .filter(|v| v.is_finite())
            .collect();
        let (lo, hi) = vals
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        let (lo, hi) = if lo.is_finite() && hi > lo {
            let pad = (hi - lo) * 0.08;
            (lo - pad, hi + pad)
        } else if lo.is_finite() {
            (lo - 0.5, lo + 0.5)
        } else {
            (0.0, 1.0)
        };
        let n = self.budgets.len();
        let budgets = self.budgets.clone();
        let font = |px: u32| ("sans-serif", px).into_font().color(&BLACK);
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!("逐级淘汰 · {} by rung (each line a trial)", self.metric),
                font(18),
            )
            .margin(12)
            .x_label_area_size(34)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.2f64..(n as f64 - 0.8), lo..hi)
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .light_line_style(RGBColor(242, 242, 242))
            .x_labels(n)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < budgets.len() {
                    format!("{} steps", budgets[i as usize])
                } else {
                    String::new()
                }
            })
            .x_label_style(font(13))
            .y_label_style(font(12))
            .y_desc(self.metric.clone())
            .draw()
            .map_err(|x| e(&x))?;
        let best = self.best().map(|(i, _)| i);
        let grey = RGBColor(150, 150, 150);
        let highlight = RGBColor(214, 39, 40);
        // The best trial last, drawn over the others.
        let mut order: Vec<usize> = (0..self.trials.len())
            .filter(|&i| Some(i) != best)
            .collect();
        order.extend(best);
        for i in order {
            let t = &self.trials[i];
            let pts: Vec<(f64, f64)> = t
                .values
                .iter()
                .enumerate()
                .filter_map(|(r, v)| v.filter(|v| v.is_finite()).map(|v| (r as f64, v)))
                .collect();
            let (c, w) = if Some(i) == best {
                (highlight, 3)
            } else {
                (grey, 1)
            };
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(w)))
                .map_err(|x| e(&x))?;
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))
                .map_err(|x| e(&x))?;
            // A stopped trial ends in a cross.
            if t.stopped_at.is_some() {
                if let Some(&last) = pts.last() {
                    chart
                        .draw_series(std::iter::once(Cross::new(last, 5, c.stroke_width(2))))
                        .map_err(|x| e(&x))?;
                }
            }
        }
        Ok(())
    }
}
