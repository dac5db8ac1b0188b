//! The report's answer in sentences, before any table: the best configuration against the
//! baselines and the zero-shot rows (with the paired test of the significance section: how much
//! fine-tuning adds over the model as it was), which axes of the grid move
//! the score by more than seed noise, which cells collapsed, and what SCST did.
//!
//! Seed noise: for every configuration run with several seeds, the sample variance of its
//! CIDEr-D over seeds; pooled over configurations, that is the variance σ² of one run. An
//! axis level's mean over n runs then has standard error σ/√n, and two levels differ by more
//! than seed noise when their means are further apart than 2·σ·√(1/n_a + 1/n_b) (about a
//! 95% two-sided test; the other axes are averaged out alike in both levels of a full grid).

use std::collections::BTreeMap;

use super::data::{GroupResult, SweepData, COLLAPSED_SHARE};
use super::significance::BaselineTest;
use super::terminal::SCALE;

/// One sentence of the answer (plain text; the renderer escapes it).
pub fn findings(d: &SweepData, tests: &[BaselineTest]) -> Vec<String> {
    let mut out = Vec::new();
    let Some(best) = d.best_group().map(|i| &d.groups[i]) else {
        out.push("No configuration has an evaluation yet.".into());
        return out;
    };
    let cider = |g: &GroupResult| g.metric("cider_d").map(|s| s.mean * SCALE);
    out.push(format!(
        "Best configuration: {} with CIDEr-D {}{}.",
        best.name,
        best.metric("cider_d")
            .map(|s| s.show(SCALE, 2))
            .unwrap_or_default(),
        best.metric("grounding_category")
            .map(|s| format!(
                "; it names the true category in {:.0}% of its captions",
                100.0 * s.mean
            ))
            .unwrap_or_default()
    ));
    for g in d.groups.iter().filter(|g| g.reference_for(best)) {
        let (Some(b), Some(c)) = (cider(best), cider(g)) else {
            continue;
        };
        let per_seed: Vec<String> = tests
            .iter()
            .filter(|t| t.baseline == g.name)
            .map(|t| {
                format!(
                    "seed {}: {:+.2}, p = {:.3}{}",
                    t.seed,
                    (t.best - t.other) * SCALE,
                    t.p_value,
                    if t.p_value < 0.05 { " *" } else { "" }
                )
            })
            .collect();
        let detail = if per_seed.is_empty() {
            "no paired test".to_string()
        } else {
            format!("paired bootstrap per seed, {}", per_seed.join("; "))
        };
        let what = if g.zero_shot() {
            format!("the zero-shot {}", g.name)
        } else {
            format!("the {} baseline", g.name)
        };
        out.push(format!(
            "Against {what} ({c:.2}): {:+.2} CIDEr-D ({detail}).",
            b - c
        ));
    }
    if let Some(s) = fine_tuning_gains(d) {
        out.push(s);
    }
    out.extend(axis_effects(d));
    let collapsed: Vec<String> = d
        .groups
        .iter()
        .filter_map(|g| {
            g.collapsed()
                .map(|s| format!("{} ({:.0}%)", g.name, 100.0 * s))
        })
        .collect();
    if !collapsed.is_empty() {
        out.push(format!(
            "Collapsed (one caption for more than {:.0}% of the images; not ranked): {}.",
            100.0 * COLLAPSED_SHARE,
            collapsed.join(", ")
        ));
    }
    if let Some(s) = scst_summary(d) {
        out.push(s);
    }
    out
}

/// Pooled seed variance of CIDEr-D (×100 scale) over configurations with ≥ 2 seeds.
fn seed_variance(d: &SweepData) -> Option<f64> {
    let mut num = 0.0;
    let mut dof = 0usize;
    for g in d.groups.iter().filter(|g| g.trained() && g.cells.len() > 1) {
        let v: Vec<f64> = g
            .cells
            .iter()
            .filter_map(|&i| d.cells[i].metrics.get("cider_d").map(|x| x * SCALE))
            .collect();
        if v.len() < 2 {
            continue;
        }
        let m = v.iter().sum::<f64>() / v.len() as f64;
        num += v.iter().map(|x| (x - m).powi(2)).sum::<f64>();
        dof += v.len() - 1;
    }
    (dof > 0).then(|| num / dof as f64)
}

/// One sentence per grid axis with more than one level among fine-tuned cells.
fn axis_effects(d: &SweepData) -> Vec<String> {
    let var = seed_variance(d);
    let mut out = Vec::new();
    type Level<'a> = fn(&super::data::CellResult) -> &str;
    let axes: [(&str, Level); 3] = [
        ("backbone", |c| c.backbone.as_str()),
        ("peft", |c| c.peft.as_str()),
        ("fusion", |c| c.fusion.as_str()),
    ];
    for (axis, level) in axes {
        let mut by: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for c in &d.cells {
            // Baselines and zero-shot rows are what the axes are measured against, not
            // levels of them.
            if crate::spec::params::BASELINES.contains(&c.backbone.as_str())
                || c.peft == crate::spec::params::ZERO_SHOT
            {
                continue;
            }
            if let Some(v) = c.metrics.get("cider_d") {
                by.entry(level(c)).or_default().push(v * SCALE);
            }
        }
        if by.len() < 2 {
            continue;
        }
        let mut means: Vec<(&str, f64, usize)> = by
            .iter()
            .map(|(k, v)| (*k, v.iter().sum::<f64>() / v.len() as f64, v.len()))
            .collect();
        means.sort_by(|a, b| b.1.total_cmp(&a.1));
        let list = means
            .iter()
            .map(|(k, m, _)| format!("{k} {m:.1}"))
            .collect::<Vec<_>>()
            .join(", ");
        let (top, bottom) = (means[0], means[means.len() - 1]);
        let verdict = match var {
            Some(v) => {
                let bound = 2.0 * (v * (1.0 / top.2 as f64 + 1.0 / bottom.2 as f64)).sqrt();
                if top.1 - bottom.1 > bound {
                    format!(
                        "{} − {} = {:.1} exceeds seed noise (2 SE = {bound:.1})",
                        top.0,
                        bottom.0,
                        top.1 - bottom.1
                    )
                } else {
                    format!(
                        "the spread {:.1} is within seed noise (2 SE = {bound:.1})",
                        top.1 - bottom.1
                    )
                }
            }
            None => "one seed: run seeds = [0, 1, ...] to tell effects from seed noise".into(),
        };
        out.push(format!("By {axis} (mean CIDEr-D): {list}; {verdict}."));
    }
    out
}

/// What fine-tuning added over each zero-shot row: the best fine-tuned configuration of the
/// same backbone, fusion and other axes, minus the zero-shot row (mean CIDEr-D over seeds).
fn fine_tuning_gains(d: &SweepData) -> Option<String> {
    let cider = |g: &GroupResult| g.metric("cider_d").map(|s| s.mean * SCALE);
    let gains: Vec<String> = d
        .groups
        .iter()
        .filter(|z| z.zero_shot())
        .filter_map(|z| {
            let zero = cider(z)?;
            let (best, score) = d
                .groups
                .iter()
                .filter(|g| {
                    g.trained()
                        && g.backbone == z.backbone
                        && g.fusion == z.fusion
                        && g.overrides == z.overrides
                })
                .filter_map(|g| Some((g, cider(g)?)))
                .max_by(|a, b| a.1.total_cmp(&b.1))?;
            Some(format!(
                "{} {zero:.1} -> {score:.1} ({:+.1}, {})",
                z.name,
                score - zero,
                best.peft
            ))
        })
        .collect();
    (!gains.is_empty()).then(|| {
        format!(
            "Fine-tuning over the zero-shot rows (zero-shot -> best PEFT of the same backbone \
             and fusion, mean CIDEr-D): {}.",
            gains.join("; ")
        )
    })
}

/// How SCST moved valid CIDEr-D over its domain-adapt input, across the sweep's runs.
fn scst_summary(d: &SweepData) -> Option<String> {
    let runs: Vec<(f64, f64, Option<f64>)> = d
        .cells
        .iter()
        .filter_map(|c| {
            Some((
                *c.scst.get("cider_d_before")?,
                *c.scst.get("cider_d_after")?,
                c.scst.get("cider_d_gain_p").copied(),
            ))
        })
        .collect();
    if runs.is_empty() {
        return None;
    }
    let n = runs.len();
    let up = runs.iter().filter(|(b, a, _)| a > b).count();
    let sig = runs
        .iter()
        .filter(|(_, _, p)| p.is_some_and(|p| p < 0.05))
        .count();
    let mean = runs.iter().map(|(b, a, _)| a - b).sum::<f64>() / n as f64 * SCALE;
    Some(format!(
        "SCST (cider-optimize) raised valid CIDEr-D over its domain-adapt input in {up} of {n} \
         runs (mean {mean:+.2}), significantly (paired bootstrap p < 0.05) in {sig}."
    ))
}
