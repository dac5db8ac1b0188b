//! `ecic data synth|inspect`: the command-line face of the data module.

use std::path::PathBuf;

use crate::error::{CliError, CliResult};

use super::inspect;
use super::synth::{self, SynthConfig};

/// `ecic data synth`: write the embedded default data set.
#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// Directory to write the MUGE files into (created if needed).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the generator; the same seed gives the same bytes.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Images in IC_train.
    #[arg(long)]
    pub train: Option<usize>,
    /// Images in IC_valid.
    #[arg(long)]
    pub valid: Option<usize>,
    /// Images in IC_test.
    #[arg(long)]
    pub test: Option<usize>,
    /// Images in ALIGN_train (generic-domain captions).
    #[arg(long)]
    pub align: Option<usize>,
    /// Images in FOUNDATION_train (generic-domain pretraining pairs for the foundation
    /// stages). Default 0: none, and the foundation stages then pretrain on ALIGN_train; a
    /// sweep on the embedded default generates its own (`data.synth.foundation`, 20000).
    #[arg(long)]
    pub foundation: Option<usize>,
    /// Replace MUGE files (IC_*, ALIGN_*) already in the directory.
    #[arg(long)]
    pub force: bool,
}

/// `ecic data inspect`: statistics and bad records of a data directory.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// A directory in MUGE layout (IC_*.tsv/jsonl, optionally ALIGN_*).
    pub dir: PathBuf,
}

pub fn run_synth(a: &SynthArgs) -> CliResult {
    let d = SynthConfig::default();
    let cfg = SynthConfig {
        seed: a.seed.unwrap_or(d.seed),
        train: a.train.unwrap_or(d.train),
        valid: a.valid.unwrap_or(d.valid),
        test: a.test.unwrap_or(d.test),
        align: a.align.unwrap_or(d.align),
        foundation: a.foundation.unwrap_or(0),
        ..d
    };
    if !a.force {
        let existing = existing_data_files(&a.out);
        if !existing.is_empty() {
            return Err(CliError::usage(format!(
                "{} already holds a data set ({}); pass --force to replace it",
                a.out.display(),
                existing.join(", ")
            )));
        }
    }
    let t = std::time::Instant::now();
    let summary = synth::generate(&a.out, &cfg).map_err(|e| match e {
        synth::SynthError::Config(_) => CliError::usage(e.to_string()),
        _ => CliError::failed(e.to_string()),
    })?;
    for (prefix, n) in &summary.splits {
        println!("{prefix}: {n} images");
    }
    println!(
        "wrote {} in {:.1}s (seed {})",
        a.out.display(),
        t.elapsed().as_secs_f64(),
        cfg.seed
    );
    Ok(())
}

/// MUGE files (`IC_*` / `ALIGN_*` `.tsv` / `.jsonl`) in `dir`, sorted.
fn existing_data_files(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| {
            (n.starts_with("IC_") || n.starts_with("ALIGN_"))
                && (n.ends_with(".tsv") || n.ends_with(".jsonl"))
        })
        .collect();
    v.sort();
    v
}

pub fn run_inspect(a: &InspectArgs) -> CliResult {
    if !a.dir.is_dir() {
        return Err(CliError::usage(format!(
            "{}: not a directory",
            a.dir.display()
        )));
    }
    let report = inspect::inspect(&a.dir).map_err(|e| CliError::usage(e.to_string()))?;
    if report.splits.is_empty() {
        return Err(CliError::usage(format!(
            "{}: no IC_*.tsv or ALIGN_*.tsv files",
            a.dir.display()
        )));
    }
    print!("{}", report.render());
    let bad: usize = report.splits.iter().map(|s| s.bad.len()).sum();
    let empty = report.empty_splits();
    if bad > 0 || !empty.is_empty() {
        let mut problems = Vec::new();
        if bad > 0 {
            problems.push(format!("{bad} bad record(s)"));
        }
        if !empty.is_empty() {
            problems.push(format!("no usable image in {}", empty.join(", ")));
        }
        return Err(CliError::usage(format!(
            "{} in {}",
            problems.join(" and "),
            a.dir.display()
        )));
    }
    Ok(())
}
