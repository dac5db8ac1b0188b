//! `ecic report` and `ecic compare`: the command-line edge of the report
//! module (argument parsing, store lookup, exit codes).

use std::path::PathBuf;

use crate::error::{CliError, CliResult};
use crate::store::{Store, StoreError};

use super::data::SweepData;
use super::{significance, terminal, ReportError};

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// A spec file (`.toml`: its `name` is the sweep) or a sweep name in the store.
    pub target: String,
    /// Directory to write `index.html` and its images into
    /// (default: `reports/<experiment>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The runs directory (cache + SQLite store).
    #[arg(long, default_value = "runs")]
    pub runs: PathBuf,
    /// Write the charts as SVG instead of PNG.
    #[arg(long)]
    pub svg: bool,
}

#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// Cell A (its name, as `ecic status` and the report show it).
    pub cell_a: String,
    /// Cell B.
    pub cell_b: String,
    /// The sweep holding both cells (default: the latest sweep that has them).
    #[arg(long)]
    pub sweep: Option<String>,
    #[arg(long, default_value = "runs")]
    pub runs: PathBuf,
}

fn open(runs: &std::path::Path) -> CliResult<Store> {
    match Store::open_existing(runs) {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(CliError::usage(format!(
            "no store in {} (run `ecic sweep` first, or pass --runs)",
            runs.display()
        ))),
        Err(e) => Err(CliError::failed(e.to_string())),
    }
}

fn usage_or_failed(e: ReportError) -> CliError {
    match e {
        ReportError::Store(StoreError::NoSweep(_))
        | ReportError::NoCell { .. }
        | ReportError::NoScores { .. } => CliError::usage(e.to_string()),
        other => CliError::failed(other.to_string()),
    }
}

pub fn run_report(a: &ReportArgs) -> CliResult {
    let name = if a.target.ends_with(".toml") || std::path::Path::new(&a.target).is_file() {
        let spec = crate::spec::Spec::load(std::path::Path::new(&a.target), &[])
            .map_err(|e| CliError::usage(e.to_string()))?;
        spec.config.name.clone()
    } else {
        a.target.clone()
    };
    let store = open(&a.runs)?;
    let id = store
        .sweep_id(&name)
        .map_err(|e| usage_or_failed(e.into()))?;
    let out = a.out.clone().unwrap_or_else(|| super::default_dir(&name));
    let index = super::write_report(&store, id, &out, a.svg).map_err(usage_or_failed)?;
    println!("report: {}", index.display());
    Ok(())
}

pub fn run_compare(a: &CompareArgs) -> CliResult {
    let store = open(&a.runs)?;
    let sweep_id = match &a.sweep {
        Some(s) => store.sweep_id(s).map_err(|e| usage_or_failed(e.into()))?,
        None => latest_with(&store, &a.cell_a, &a.cell_b)?,
    };
    let data = SweepData::load(&store, sweep_id).map_err(usage_or_failed)?;
    let find = |name: &str| {
        data.cells.iter().find(|c| c.name == name).ok_or_else(|| {
            let names = data.cells.iter().map(|c| c.name.as_str());
            let hint = names
                .map(|n| (strsim::levenshtein(name, n), n))
                .min()
                .filter(|(d, _)| *d <= 3)
                .map(|(_, s)| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            usage_or_failed(ReportError::NoCell {
                cell: name.to_string(),
                sweep: data.meta.name.clone(),
                hint,
            })
        })
    };
    let (ca, cb) = (find(&a.cell_a)?, find(&a.cell_b)?);
    let sa = significance::image_scores(&store, ca, &data.split).map_err(usage_or_failed)?;
    let sb = significance::image_scores(&store, cb, &data.split).map_err(usage_or_failed)?;
    let rows =
        crate::metrics::bootstrap::paired(&sa, &sb, significance::RESAMPLES, significance::SEED)
            .map_err(|e| CliError::failed(format!("compare {} and {}: {e}", ca.name, cb.name)))?;
    print!(
        "{}",
        terminal::compare_table(&ca.name, &cb.name, &data.split, sa.len(), &rows)
    );
    Ok(())
}

/// The most recent sweep with cells named `a` and `b`.
fn latest_with(store: &Store, a: &str, b: &str) -> CliResult<i64> {
    let sweeps = store
        .sweeps()
        .map_err(|e| CliError::failed(e.to_string()))?;
    for s in sweeps.iter().rev() {
        let cells = store
            .cells_with_stages(s.id)
            .map_err(|e| CliError::failed(e.to_string()))?;
        if cells.iter().any(|c| c.name == a) && cells.iter().any(|c| c.name == b) {
            return Ok(s.id);
        }
    }
    Err(CliError::usage(format!(
        "no recorded sweep has both cells `{a}` and `{b}` (see `ecic status`; pass --sweep)"
    )))
}
