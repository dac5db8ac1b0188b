//! Paired bootstrap over images, from the per-image score records the
//! evaluate stages stored (`captions.scores`): every cell against the best
//! one in the report, and any two cells in `ecic compare`.

use std::collections::HashMap;

use crate::metrics::bootstrap::{paired, Paired};
use crate::metrics::ImageScore;
use crate::store::Store;

use super::data::{CellResult, SweepData};
use super::ReportError;

/// Resamples of the paired bootstrap (p-values resolve to 1/1001).
pub const RESAMPLES: usize = 1000;
/// Fixed so that a report is reproducible.
pub const SEED: u64 = 20_240_601;

/// The per-image records of a cell's evaluate stage on `split`.
pub fn image_scores(
    store: &Store,
    cell: &CellResult,
    split: &str,
) -> Result<Vec<ImageScore>, ReportError> {
    let no_scores = || ReportError::NoScores {
        cell: cell.name.clone(),
        split: split.to_string(),
    };
    let key = cell.stage_key("evaluate").ok_or_else(no_scores)?;
    let rows = store.stage_captions(key, split)?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let Some(json) = r.scores else { continue };
        let s: ImageScore = serde_json::from_str(&json).map_err(|e| ReportError::BadScores {
            cell: cell.name.clone(),
            image: r.image_id.clone(),
            message: e.to_string(),
        })?;
        out.push(s);
    }
    if out.is_empty() {
        return Err(no_scores());
    }
    Ok(out)
}

/// One row of the significance table.
#[derive(Debug, Clone)]
pub struct SigRow {
    pub cell: String,
    /// Per metric: the best cell (A) against this one (B): `delta` is
    /// best − cell and `p_value` that of "the best is no better". Empty with
    /// `note` set when the test could not run.
    pub tests: Vec<Paired>,
    pub note: Option<String>,
}

/// The cell every other one is tested against: the highest CIDEr-D among cells that did not
/// collapse (one caption for most images).
pub fn best_cell(data: &SweepData) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, c) in data.cells.iter().enumerate() {
        if c.metrics
            .get("top_caption_share")
            .is_some_and(|&s| s > super::data::COLLAPSED_SHARE)
        {
            continue;
        }
        if let Some(&v) = c.metrics.get("cider_d") {
            if best.is_none_or(|(_, b)| v > b) {
                best = Some((i, v));
            }
        }
    }
    best.map(|(i, _)| i)
}

/// Every scored cell against the best: (best cell name, rows).
pub fn against_best(
    store: &Store,
    data: &SweepData,
) -> Result<Option<(String, Vec<SigRow>)>, ReportError> {
    let Some(b) = best_cell(data) else {
        return Ok(None);
    };
    let best = &data.cells[b];
    let best_scores = match image_scores(store, best, &data.split) {
        Ok(s) => s,
        Err(ReportError::NoScores { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    // cells sharing one evaluate stage (same key) share their records
    let mut cache: HashMap<String, Result<Vec<ImageScore>, String>> = HashMap::new();
    let mut rows = Vec::new();
    for (i, c) in data.cells.iter().enumerate() {
        if i == b || !c.metrics.contains_key("cider_d") {
            continue;
        }
        let key = c.stage_key("evaluate").unwrap_or_default().to_string();
        let scores = cache
            .entry(key)
            .or_insert_with(|| image_scores(store, c, &data.split).map_err(|e| e.to_string()))
            .clone();
        let row = match scores
            .and_then(|s| paired(&best_scores, &s, RESAMPLES, SEED).map_err(|e| e.to_string()))
        {
            Ok(tests) => SigRow {
                cell: c.name.clone(),
                tests,
                note: None,
            },
            Err(note) => SigRow {
                cell: c.name.clone(),
                tests: Vec::new(),
                note: Some(note),
            },
        };
        rows.push(row);
    }
    Ok(Some((best.name.clone(), rows)))
}

/// The best configuration's run of one seed against a baseline's run of the same seed.
#[derive(Debug, Clone)]
pub struct BaselineTest {
    pub seed: i64,
    pub baseline: String,
    /// CIDEr-D of the best run and of the baseline's (raw scale), and the paired test of
    /// "the best is no better than the baseline".
    pub best: f64,
    pub other: f64,
    pub p_value: f64,
}

/// For every seed, the best configuration ([`SweepData::best_group`]) against each baseline
/// and the zero-shot row of its backbone and fusion ([`GroupResult::reference_for`]),
/// paired over images on CIDEr-D: the claim a paper makes, tested per seed.
pub fn best_vs_baselines(
    store: &Store,
    data: &SweepData,
) -> Result<Vec<BaselineTest>, ReportError> {
    let Some(best) = data.best_group().map(|i| &data.groups[i]) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for &bi in &best.cells {
        let b = &data.cells[bi];
        let Ok(bs) = image_scores(store, b, &data.split) else {
            continue;
        };
        for g in data.groups.iter().filter(|g| g.reference_for(best)) {
            let Some(&oi) = g.cells.iter().find(|&&i| data.cells[i].seed == b.seed) else {
                continue;
            };
            let o = &data.cells[oi];
            let Ok(os) = image_scores(store, o, &data.split) else {
                continue;
            };
            let Ok(tests) = paired(&bs, &os, RESAMPLES, SEED) else {
                continue;
            };
            if let Some(t) = tests.iter().find(|t| t.metric.key() == "cider_d") {
                out.push(BaselineTest {
                    seed: b.seed,
                    baseline: g.name.clone(),
                    best: t.a,
                    other: t.b,
                    p_value: t.p_value,
                });
            }
        }
    }
    Ok(out)
}
