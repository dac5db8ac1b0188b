//! `ecic eval` (being written).
use crate::error::{CliError, CliResult};
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    #[arg(long)]
    pub pred: std::path::PathBuf,
    #[arg(long)]
    pub refs: std::path::PathBuf,
}
pub fn run(_a: &EvalArgs) -> CliResult {
    Err(CliError::failed("eval: being written"))
}
