//! Terminal tables (comfy-table): the summary printed after every `ecic sweep`,
//! `ecic status`, and `ecic compare`. They read the same [`SweepData`] as the
//! HTML report, so the numbers agree.

use comfy_table::{presets, CellAlignment, ContentArrangement, Table};

use crate::metrics::bootstrap::Paired;
use crate::store::Store;

use super::data::{SweepData, HEADLINE};
use super::ReportError;

/// Metrics on the raw scale are shown ×100, as on the MUGE leaderboard.
pub const SCALE: f64 = 100.0;

fn new_table(header: Vec<&str>) -> Table {
    let mut t = Table::new();
    t.load_style(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header);
    t
}

fn right_align(t: &mut Table, from: usize) {
    let n = t.column_count();
    for i in from..n {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
}

/// Seconds as `12.3s`, `4m05s` or `1h02m`.
pub fn duration(s: f64) -> String {
    // an empty float sum is -0.0
    let s = s + 0.0;
    if !s.is_finite() {
        return "–".into();
    }
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0).floor(), (s % 60.0).floor())
    } else {
        format!(
            "{}h{:02}m",
            (s / 3600.0).floor(),
            ((s % 3600.0) / 60.0).floor()
        )
    }
}

/// Parameter counts as `1.2M`, `35.0k`, `812`.
pub fn count(n: f64) -> String {
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

/// Caption checks shown beside the scores: the share of captions naming the image's true
/// category, and of distinct captions (a collapsed cell writes one caption for most images).
pub const GROUNDING_COLUMNS: [(&str, &str); 2] = [
    ("grounding_category", "category"),
    ("distinct_ratio", "distinct"),
];

/// The table printed after `ecic sweep`: one row per cell configuration
/// (mean ± 95% CI when several seeds share it), CIDEr-D / BLEU-4 / ROUGE-L ×100,
/// wall time, stages run vs reused.
pub fn sweep_summary(store: &Store, sweep_id: i64) -> Result<String, ReportError> {
    let data = SweepData::load(store, sweep_id)?;
    Ok(summary_table(&data))
}

pub fn summary_table(data: &SweepData) -> String {
    let seeds = data.groups.iter().any(|g| g.cells.len() > 1);
    let mut header = vec!["cell"];
    if seeds {
        header.push("seeds");
    }
    header.extend(HEADLINE.iter().map(|(_, l)| *l));
    // What the captions say, where measured (grounding on synthetic data only).
    let extra: Vec<(&str, &str)> = GROUNDING_COLUMNS
        .iter()
        .copied()
        .filter(|(k, _)| data.groups.iter().any(|g| g.metric(k).is_some()))
        .collect();
    header.extend(extra.iter().map(|(_, l)| *l));
    header.extend(["wall", "run/reused", "status"]);
    let mut t = new_table(header);
    let best = data.best_group();
    for (i, g) in data.groups.iter().enumerate() {
        let mut name = g.label();
        if Some(i) == best {
            name.push_str(" *");
        }
        let mut row = vec![name];
        if seeds {
            row.push(g.cells.len().to_string());
        }
        for (k, _) in HEADLINE {
            row.push(
                g.metric(k)
                    .map(|s| s.show(SCALE, 2))
                    .unwrap_or_else(|| "–".into()),
            );
        }
        for (k, _) in &extra {
            row.push(
                g.metric(k)
                    .map(|s| format!("{:.0}%", 100.0 * s.mean))
                    .unwrap_or_else(|| "–".into()),
            );
        }
        row.push(
            g.wall_s
                .map(|s| duration(s.mean))
                .unwrap_or_else(|| "–".into()),
        );
        row.push(format!("{}/{}", g.stages_run, g.stages_reused));
        row.push(g.status.clone());
        t.add_row(row);
    }
    right_align(&mut t, 1);
    let split = if data.split.is_empty() {
        "no evaluation yet".to_string()
    } else {
        format!("{} split", data.split)
    };
    let mut out = format!(
        "sweep `{}` ({}, {}; metrics ×100",
        data.meta.name, data.meta.status, split
    );
    if seeds {
        out.push_str(", mean ± 95% CI over seeds");
    }
    out.push_str(")\n");
    out.push_str(&t.to_string());
    if best.is_some() {
        out.push_str("\n* best CIDEr-D");
    }
    out.push('\n');
    out
}

/// `ecic status`: every recorded sweep with its cells' and stages' state, and
/// the latest sweep's stages that are not done (with their first error line).
pub fn status(store: &Store) -> Result<String, ReportError> {
    let sweeps = store.sweeps()?;
    if sweeps.is_empty() {
        return Ok(format!(
            "no sweeps recorded in {}\n",
            store.path().display()
        ));
    }
    let mut t = new_table(vec![
        "sweep", "status", "cells", "done", "failed", "stages", "run", "reused", "wall", "started",
    ]);
    for s in &sweeps {
        let data = SweepData::load(store, s.id)?;
        let done = data.cells.iter().filter(|c| c.status == "done").count();
        let failed = data.cells.iter().filter(|c| c.status == "failed").count();
        let reused = data.stages.iter().filter(|st| st.reused).count();
        // A search's stopped rung stages were planned but never run (docs/search.md).
        let run = data
            .stages
            .iter()
            .filter(|st| !st.reused && st.status != "stopped")
            .count();
        let wall: f64 = data
            .stages
            .iter()
            .filter(|st| !st.reused)
            .filter_map(|st| st.wall_s)
            .sum();
        let wall = match s.finished_at {
            Some(f) if f >= s.started_at => duration(f - s.started_at),
            _ => duration(wall),
        };
        t.add_row(vec![
            s.label(),
            s.status.clone(),
            data.cells.len().to_string(),
            done.to_string(),
            failed.to_string(),
            data.stages.len().to_string(),
            run.to_string(),
            reused.to_string(),
            wall,
            time_of_day(s.started_at),
        ]);
    }
    right_align(&mut t, 2);
    let mut out = t.to_string();
    out.push('\n');
    // the stages of the latest sweep that are not done, with their errors
    if let Some(last) = sweeps.last() {
        let data = SweepData::load(store, last.id)?;
        let pending: Vec<_> = data.stages.iter().filter(|s| s.status != "done").collect();
        if !pending.is_empty() {
            let mut t = new_table(vec!["stage", "kind", "state", "wall", "error"]);
            for s in pending {
                let err = s
                    .error
                    .as_deref()
                    .unwrap_or("")
                    .lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(80)
                    .collect::<String>();
                t.add_row(vec![
                    s.label.clone(),
                    s.kind.clone(),
                    s.status.clone(),
                    s.wall_s.map(duration).unwrap_or_else(|| "–".into()),
                    err,
                ]);
            }
            out.push_str(&format!("stages of `{}` not done:\n{}\n", last.name, t));
        }
    }
    Ok(out)
}

/// Unix seconds as `YYYY-MM-DD HH:MM` UTC (no time-zone database needed).
pub fn time_of_day(unix: f64) -> String {
    if !unix.is_finite() || unix < 0.0 {
        return "–".into();
    }
    let secs = unix as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil-from-days (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// `ecic compare`: A vs B per metric (×100) with the paired-bootstrap p-value
/// of "A is no better than B" and the 95% interval of the delta.
pub fn compare_table(a: &str, b: &str, split: &str, images: usize, rows: &[Paired]) -> String {
    let mut t = new_table(vec!["metric", a, b, "Δ (A−B)", "95% CI of Δ", "p (A ≤ B)"]);
    for p in rows {
        t.add_row(vec![
            p.metric.label().to_string(),
            format!("{:.2}", p.a * SCALE),
            format!("{:.2}", p.b * SCALE),
            format!("{:+.2}", p.delta * SCALE),
            format!("[{:+.2}, {:+.2}]", p.low * SCALE, p.high * SCALE),
            format!("{:.4}{}", p.p_value, stars(p.p_value)),
        ]);
    }
    right_align(&mut t, 1);
    format!("A = {a}, B = {b}; {split} split, {images} images, metrics ×100\n{t}\n* p<0.05  ** p<0.01  *** p<0.001\n")
}

/// Significance marks.
pub fn stars(p: f64) -> &'static str {
    if p < 0.001 {
        " ***"
    } else if p < 0.01 {
        " **"
    } else if p < 0.05 {
        " *"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(duration(5.04), "5.0s");
        assert_eq!(duration(-0.0), "0.0s");
        assert_eq!(duration(125.0), "2m05s");
        assert_eq!(duration(3725.0), "1h02m");
        assert_eq!(count(1_234_567.0), "1.23M");
        assert_eq!(count(35_000.0), "35.0k");
        // date -u -d @1700000000 +'%F %R' -> 2023-11-14 22:13
        assert_eq!(time_of_day(1_700_000_000.0), "2023-11-14 22:13 UTC");
        assert_eq!(stars(0.0009), " ***");
        assert_eq!(stars(0.2), "");
    }
}
