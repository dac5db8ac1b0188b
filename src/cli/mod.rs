//! The command line (the README's command table). Each subcommand's arguments live beside the
//! code that runs it; this module only parses, dispatches, and turns an
//! error into its message and exit code ([`CliError::exit_code`]).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::error::CliError;

mod engine;
mod verify;

pub use engine::{GcArgs, PlanArgs, RunStageArgs, StatusArgs, SweepArgs};
pub use verify::VerifyArgs;

/// ecic: compare vision-language captioners for e-commerce products.
///
/// Write one TOML spec naming the backbones, PEFT methods, fusion strategies and
/// hyperparameters to compare, then `ecic sweep SPEC.toml`: ecic expands the grid
/// into a DAG of shared, cached stages (preprocess -> pretrain-align ->
/// domain-adapt -> cider-optimize -> evaluate), trains the models, records every
/// metric in SQLite and writes an HTML report.
#[derive(Debug, Parser)]
#[command(name = "ecic", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Expand, plan, run what is not cached, record and report.
    Sweep(SweepArgs),
    /// Show the stage DAG with each stage's cache key and hit/miss; runs nothing.
    Plan(PlanArgs),
    /// Show recorded sweeps, cells and stages with their state and timings.
    Status(StatusArgs),
    /// Write the HTML + PNG report of a sweep from the store alone.
    Report(crate::report::cmd::ReportArgs),
    /// Compare two cells of a sweep: metric deltas with paired-bootstrap p-values.
    Compare(crate::report::cmd::CompareArgs),
    /// Score predicted captions against references (BLEU-1..4, ROUGE-L, CIDEr-D).
    Eval(crate::metrics::cmd::EvalArgs),
    /// Generate or check data sets in MUGE ECommerce-IC format.
    #[command(subcommand)]
    Data(DataCommand),
    /// Remove cached stage outputs that no recorded sweep references.
    Gc(GcArgs),
    /// Check every cache entry and checkpoint against its recorded digests.
    Verify(VerifyArgs),
    /// Caption a folder of images or a MUGE .tsv with a recorded cell, an export or a checkpoint.
    Predict(crate::infer::cmd::PredictArgs),
    /// Write a self-contained model directory (adapters merged; optionally quantized).
    Export(crate::infer::cmd::ExportArgs),
    /// Serve a model over HTTP (batched captioning, jobs, health, Prometheus metrics).
    Serve(crate::serve::ServeArgs),
    /// Run one planned stage by key (used by cluster executors).
    #[command(hide = true)]
    RunStage(RunStageArgs),
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Write the embedded default (synthetic) data set in MUGE format.
    Synth(crate::data::cmd::SynthArgs),
    /// Counts, caption-length statistics and every bad record of a data directory.
    Inspect(crate::data::cmd::InspectArgs),
}

/// Parse the command line, run it, and turn the outcome into an exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => 2,
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_tracing();
    let outcome = match &cli.command {
        Command::Sweep(a) => engine::sweep(a),
        Command::Plan(a) => engine::plan(a),
        Command::Status(a) => engine::status(a),
        Command::Gc(a) => engine::gc(a),
        Command::Verify(a) => verify::verify(a),
        Command::Predict(a) => crate::infer::cmd::run_predict(a),
        Command::Export(a) => crate::infer::cmd::run_export(a),
        Command::Serve(a) => crate::serve::run(a),
        Command::RunStage(a) => engine::run_stage(a),
        Command::Report(a) => crate::report::cmd::run_report(a),
        Command::Compare(a) => crate::report::cmd::run_compare(a),
        Command::Eval(a) => crate::metrics::cmd::run(a),
        Command::Data(DataCommand::Synth(a)) => crate::data::cmd::run_synth(a),
        Command::Data(DataCommand::Inspect(a)) => crate::data::cmd::run_inspect(a),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report_error(&e);
            ExitCode::from(e.exit_code())
        }
    }
}

fn report_error(e: &CliError) {
    for (i, text) in e.chain().iter().enumerate() {
        if i == 0 {
            eprintln!("error: {text}");
        } else {
            eprintln!("  caused by: {text}");
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    match EnvFilter::try_from_env("ECIC_LOG") {
        // Asked-for logging gets time since process start, to see where time goes.
        Ok(filter) => {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_timer(tracing_subscriber::fmt::time::uptime())
                .try_init();
        }
        Err(_) => {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(EnvFilter::new("warn"))
                .with_writer(std::io::stderr)
                .without_time()
                .try_init();
        }
    }
}
