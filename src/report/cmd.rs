//! `ecic report` and `ecic compare` (being written).
use crate::error::{CliError, CliResult};
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    pub target: String,
}
#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    pub cell_a: String,
    pub cell_b: String,
}
pub fn run_report(_a: &ReportArgs) -> CliResult {
    Err(CliError::failed("report: being written"))
}
pub fn run_compare(_a: &CompareArgs) -> CliResult {
    Err(CliError::failed("compare: being written"))
}
