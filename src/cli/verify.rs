//! Trusting the cache: `ecic verify` checks every entry and checkpoint
//! against its recorded digests, like `git fsck`. (The check a sweep makes of
//! the entries it is about to reuse is [`crate::sweep::check_reused`].)

use std::path::PathBuf;

use clap::Args;

use crate::cache::{Cache, Damage};
use crate::error::{CliError, CliResult};

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The runs directory (cache + SQLite store).
    #[arg(long, default_value = "runs", env = "ECIC_RUNS")]
    pub runs: PathBuf,
    /// Move damaged entries into `runs/quarantine/` (their stages are then
    /// computed again by the next sweep that needs them) and discard damaged
    /// checkpoints.
    #[arg(long)]
    pub quarantine: bool,
}

/// What `ecic verify` found.
#[derive(Debug, Default)]
struct Findings {
    ok: usize,
    damaged: Vec<(String, Damage, Option<PathBuf>)>,
    checkpoints_ok: usize,
    bad_checkpoints: Vec<(PathBuf, String)>,
}

pub fn verify(a: &VerifyArgs) -> CliResult {
    if !a.runs.is_dir() {
        return Err(CliError::usage(format!(
            "{}: no such runs directory",
            a.runs.display()
        )));
    }
    let cache = Cache::open_read(&a.runs);
    let mut f = Findings::default();
    let objects = cache.objects();
    let mut keys: Vec<String> = match std::fs::read_dir(&objects) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| !n.starts_with('.'))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(CliError::failed(format!("{}: {e}", objects.display()))),
    };
    keys.sort();
    for key in keys {
        if !cache.is_complete(&key) {
            // A directory without a manifest (or a torn unsynced one) is not
            // an entry: nothing reuses it, and publishing the key replaces it.
            continue;
        }
        match cache.verify(&key) {
            Ok(_) => f.ok += 1,
            Err(damage) => {
                let moved = if a.quarantine {
                    cache
                        .quarantine(&key, damage.clone())
                        .map_err(|e| CliError::failed(e.to_string()))?
                        .moved_to
                } else {
                    None
                };
                println!(
                    "damaged  {}: {damage}{}",
                    cache.entry(&key).display(),
                    moved
                        .as_ref()
                        .map(|p| format!(" (moved to {})", p.display()))
                        .unwrap_or_default()
                );
                f.damaged.push((key, damage, moved));
            }
        }
    }
    let scratch = a.runs.join("scratch");
    if let Ok(rd) = std::fs::read_dir(&scratch) {
        let mut dirs: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        dirs.sort();
        for dir in dirs {
            for (path, bad) in crate::train::checkpoint::verify_dir(&dir)
                .map_err(|e| CliError::failed(e.to_string()))?
            {
                match bad {
                    None => f.checkpoints_ok += 1,
                    Some(why) => {
                        if a.quarantine {
                            crate::train::checkpoint::discard(&path)
                                .map_err(|e| CliError::failed(e.to_string()))?;
                        }
                        println!(
                            "damaged  {}: {why}{}",
                            path.display(),
                            if a.quarantine { " (discarded)" } else { "" }
                        );
                        f.bad_checkpoints.push((path, why));
                    }
                }
            }
        }
    }
    println!(
        "{} entr{} ok, {} damaged; {} checkpoint{} ok, {} damaged",
        f.ok,
        if f.ok == 1 { "y" } else { "ies" },
        f.damaged.len(),
        f.checkpoints_ok,
        if f.checkpoints_ok == 1 { "" } else { "s" },
        f.bad_checkpoints.len()
    );
    let bad = f.damaged.len() + f.bad_checkpoints.len();
    if bad == 0 {
        return Ok(());
    }
    if a.quarantine {
        println!(
            "damaged entries were moved aside: the next sweep that needs them computes them again"
        );
        Ok(())
    } else {
        Err(CliError::failed(format!(
            "{bad} damaged; `ecic verify --quarantine` moves them aside so that they are computed again"
        )))
    }
}
