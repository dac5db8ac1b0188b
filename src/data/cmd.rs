//! `ecic data synth|inspect` (being written).
use crate::error::{CliError, CliResult};
#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    #[arg(long)]
    pub out: std::path::PathBuf,
}
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    pub dir: std::path::PathBuf,
}
pub fn run_synth(_a: &SynthArgs) -> CliResult {
    Err(CliError::failed("data synth: being written"))
}
pub fn run_inspect(_a: &InspectArgs) -> CliResult {
    Err(CliError::failed("data inspect: being written"))
}
