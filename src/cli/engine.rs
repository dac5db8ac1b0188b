//! The arguments of `sweep`, `plan`, `status`, `gc` and the hidden
//! `run-stage`, and the calls they make: a sweep is
//! [`crate::sweep::prepare`] then [`crate::sweep::run_plan`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Args;

use crate::cache::Cache;
use crate::error::{CliError, CliResult};
use crate::store::Store;
use crate::sweep::{ExecutorKind, SweepOptions};

#[derive(Debug, Args)]
pub struct SweepArgs {
    /// The experiment spec (TOML).
    pub spec: PathBuf,
    /// Override a spec value: `--set stages.domain_adapt.lr=1e-4` (TOML value syntax; repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Stages to run at once (default: one per core, one thread each).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Where stages run.
    #[arg(long, value_enum, default_value_t = ExecutorKind::Local)]
    pub executor: ExecutorKind,
    /// The runs directory (cache + SQLite store).
    #[arg(long, default_value = "runs", env = "ECIC_RUNS")]
    pub runs: PathBuf,
    /// Go on with independent stages after a failure.
    #[arg(long)]
    pub keep_going: bool,
    /// Show what would run, run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not write the HTML report at the end.
    #[arg(long)]
    pub no_report: bool,
    /// Slurm: on Ctrl-C stop following but leave the submitted jobs running.
    #[arg(long)]
    pub detach: bool,
    /// Slurm: follow the jobs an earlier (detached or interrupted) run of this
    /// sweep submitted, instead of submitting again.
    #[arg(long)]
    pub attach: bool,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The experiment spec (TOML).
    pub spec: PathBuf,
    /// Override a spec value (TOML value syntax; repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// How to print the plan: a table, Graphviz (`dot`) or JSON.
    #[arg(long, value_enum, default_value_t = crate::plan::Format::Table)]
    pub format: crate::plan::Format,
    /// The runs directory whose cache decides hit or miss.
    #[arg(long, default_value = "runs", env = "ECIC_RUNS")]
    pub runs: PathBuf,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[arg(long, default_value = "runs", env = "ECIC_RUNS")]
    pub runs: PathBuf,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    #[arg(long, default_value = "runs", env = "ECIC_RUNS")]
    pub runs: PathBuf,
    /// List what would be removed, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Keep only what the latest N revisions of each sweep name reference
    /// (default: what any recorded revision references).
    #[arg(long, value_name = "N")]
    pub keep_last: Option<usize>,
}

#[derive(Debug, Args)]
pub struct RunStageArgs {
    #[arg(long, default_value = "runs")]
    pub runs: PathBuf,
    /// Report progress as JSON lines on stdout.
    #[arg(long)]
    pub progress: bool,
    /// Publish without fsync, leaving an unsynced marker for the executor's
    /// periodic `syncfs` (the local executor's one-shot stages).
    #[arg(long, hide = true)]
    pub deferred: bool,
    /// Pooled worker: read stage keys from stdin, one a line, run each (its
    /// stderr going to the stage's log), and answer each with a JSON line
    /// `{"finished": KEY, "ok": .., "error": ..}` on stdout; exit at end of input.
    #[arg(long, conflicts_with = "key")]
    pub serve: bool,
    /// The stage's cache key.
    #[arg(required_unless_present = "serve")]
    pub key: Option<String>,
}

fn other<E: Into<anyhow::Error>>(e: E) -> CliError {
    CliError::Other(e.into())
}

pub fn plan(a: &PlanArgs) -> CliResult {
    let prepared = crate::sweep::prepare(&a.spec, &a.set, &a.runs)?;
    let (cache, plan) = (&prepared.cache, &prepared.plan);
    let cached = |k: &str| cache.is_complete(k);
    if a.format == crate::plan::Format::Json {
        // Streamed: a 10,000-cell plan is tens of MB of JSON.
        let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
        plan.write_json(&mut out, &cached).map_err(other)?;
        std::io::Write::flush(&mut out).map_err(other)?;
        // The process ends here: freeing a 10,000-cell plan node by node
        // would cost ~5% of the command for nothing.
        std::mem::forget(prepared);
        return Ok(());
    }
    print!("{}", plan.render(a.format, &cached));
    Ok(())
}

pub fn sweep(a: &SweepArgs) -> CliResult {
    let opts = SweepOptions {
        runs: a.runs.clone(),
        jobs: a.jobs,
        executor: a.executor,
        keep_going: a.keep_going,
        dry_run: a.dry_run,
        no_report: a.no_report,
        detach: a.detach,
        attach: a.attach,
    };
    let prepared = crate::sweep::prepare(&a.spec, &a.set, &a.runs)?;
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        let _ = ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                eprintln!("\ninterrupted twice: exiting now");
                std::process::exit(130);
            }
            eprintln!(
                "\ninterrupt (Ctrl-C, SIGTERM or SIGHUP): stopping running stages \
                 (once more to exit at once)"
            );
        });
    }
    crate::sweep::run_plan(&prepared, &opts, interrupted)?.check()?;
    Ok(())
}

pub fn status(a: &StatusArgs) -> CliResult {
    if !a.runs.is_dir() {
        return Err(CliError::usage(format!(
            "{}: no such runs directory (pass --runs DIR)",
            a.runs.display()
        )));
    }
    let Some(store) = Store::open_existing(&a.runs).map_err(other)? else {
        println!("no sweeps recorded in {} yet", a.runs.display());
        return Ok(());
    };
    let text = crate::report::terminal::status(&store).map_err(other)?;
    println!("{text}");
    Ok(())
}

pub fn gc(a: &GcArgs) -> CliResult {
    if a.keep_last == Some(0) {
        return Err(CliError::usage(
            "--keep-last must be at least 1 (the latest revision of each sweep is always kept)",
        ));
    }
    let Some(store) = Store::open_existing(&a.runs).map_err(other)? else {
        println!("nothing to collect: no store in {}", a.runs.display());
        return Ok(());
    };
    let cache = Cache::open(&a.runs).map_err(other)?;
    // Exclusive: no sweep is between finding an entry complete and using it.
    let _root = cache
        .root_lock(true)
        .map_err(|e| CliError::failed(e.to_string()))?;
    let keep = store.referenced_keys(a.keep_last).map_err(other)?;
    let removed = cache.gc(&keep, a.dry_run).map_err(other)?;
    for p in &removed {
        println!(
            "{} {}",
            if a.dry_run { "would remove" } else { "removed" },
            p.display()
        );
    }
    println!(
        "{} entr{} {}",
        removed.len(),
        if removed.len() == 1 { "y" } else { "ies" },
        if a.dry_run { "to remove" } else { "removed" }
    );
    Ok(())
}

pub fn run_stage(a: &RunStageArgs) -> CliResult {
    if a.serve {
        return serve_stages(&a.runs);
    }
    let key = a.key.as_deref().unwrap_or_default();
    let progress = a.progress;
    let report = move |step: u64, total: u64| {
        if progress {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{{\"progress\":[{step},{total}]}}");
            let _ = out.flush();
        }
    };
    let durability = if a.deferred {
        crate::cache::Durability::Deferred
    } else {
        crate::cache::Durability::Now
    };
    match crate::stages::run_stage(&a.runs, key, &report, durability) {
        Ok(_) => Ok(()),
        Err(e) => Err(CliError::failed(crate::stages::error_chain(&e))),
    }
}

/// `run-stage --serve`: the pooled worker of the local executor. Saves a
/// process start per cheap stage; each stage still runs in a child process of
/// the sweep (a crash takes only this worker and its current stage with it),
/// with the thread budget the worker was started with, and its stderr
/// (messages, panics) in its own log file as with a one-shot `run-stage`.
/// Outputs are published with deferred durability; the executor syncs them.
fn serve_stages(runs: &Path) -> CliResult {
    use std::io::{BufRead, Write};
    let cache = Cache::open(runs).map_err(other)?;
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line.map_err(other)?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        // A stage description (one JSON line), or a key whose description
        // is in `runs/stages/KEY.json`.
        let desc: Option<crate::plan::StageDesc> =
            if line.starts_with('{') {
                Some(serde_json::from_str(line).map_err(|e| {
                    CliError::usage(format!("not a stage description: {e}: `{line}`"))
                })?)
            } else {
                None
            };
        let key = desc.as_ref().map_or(line, |d| d.key.as_str());
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(CliError::usage(format!("not a stage key: `{key}`")));
        }
        redirect_stderr(&cache.log_path(key)).map_err(other)?;
        let report = |step: u64, total: u64| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{{\"progress\":[{step},{total}]}}");
            let _ = out.flush();
        };
        let deferred = crate::cache::Durability::Deferred;
        let result = match &desc {
            Some(d) => crate::stages::run_stage_desc(&cache, d, &report, deferred),
            None => crate::stages::run_stage(runs, key, &report, deferred),
        };
        let reply = match result {
            Ok(_) => serde_json::json!({"finished": key, "ok": true}),
            Err(e) => {
                let msg = crate::stages::error_chain(&e);
                eprintln!("error: {msg}");
                // So that `ecic run-stage KEY` can retry it by hand.
                if let Some(d) = &desc {
                    if let Err(e) = cache.write_desc(d) {
                        eprintln!("could not write the stage description: {e}");
                    }
                }
                serde_json::json!({"finished": key, "ok": false, "error": msg})
            }
        };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{reply}").map_err(other)?;
        out.flush().map_err(other)?;
    }
    Ok(())
}

/// Point this process's stderr (fd 2) at `log`, appending.
fn redirect_stderr(log: &Path) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto fd 2 with a descriptor we own; `f` may close after.
        if unsafe { libc::dup2(f.as_raw_fd(), 2) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
