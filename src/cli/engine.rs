//! `sweep`, `plan`, `status`, `gc` and the hidden `run-stage`.

use std::path::PathBuf;

use clap::Args;

use crate::error::{CliError, CliResult};

#[derive(Debug, Args)]
pub struct SweepArgs {
    /// The experiment spec (TOML).
    pub spec: PathBuf,
    /// Override a spec value: `--set stages.domain_adapt.lr=1e-4` (TOML value syntax).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Stages to run at once (default: as many as the cores allow).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Where stages run.
    #[arg(long, default_value = "local")]
    pub executor: String,
    /// The runs directory (cache + SQLite store).
    #[arg(long, default_value = "runs")]
    pub runs: PathBuf,
    /// Go on with independent stages after a failure.
    #[arg(long)]
    pub keep_going: bool,
    /// Show what would run, run nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    pub spec: PathBuf,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    #[arg(long, default_value = "table")]
    pub format: String,
    #[arg(long, default_value = "runs")]
    pub runs: PathBuf,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[arg(long, default_value = "runs")]
    pub runs: PathBuf,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    #[arg(long, default_value = "runs")]
    pub runs: PathBuf,
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct RunStageArgs {
    #[arg(long, default_value = "runs")]
    pub runs: PathBuf,
    pub key: String,
}

pub fn sweep(_a: &SweepArgs) -> CliResult {
    Err(CliError::failed("sweep: being written"))
}
pub fn plan(_a: &PlanArgs) -> CliResult {
    Err(CliError::failed("plan: being written"))
}
pub fn status(_a: &StatusArgs) -> CliResult {
    Err(CliError::failed("status: being written"))
}
pub fn gc(_a: &GcArgs) -> CliResult {
    Err(CliError::failed("gc: being written"))
}
pub fn run_stage(_a: &RunStageArgs) -> CliResult {
    Err(CliError::failed("run-stage: being written"))
}
