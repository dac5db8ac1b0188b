//! What a sweep shows while it runs: progress bars on a terminal, one line
//! per started and finished stage otherwise. Stages added while it runs (a
//! search's promotions) are learnt from their first event.

use std::collections::HashMap;
use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::exec::{Event, Outcome, StageJob};

/// Progress: bars on a terminal, one line per finished stage otherwise.
pub(super) struct Progress {
    mp: MultiProgress,
    overall: ProgressBar,
    bars: HashMap<String, ProgressBar>,
    labels: HashMap<String, String>,
    tty: bool,
    finished: usize,
    total: usize,
}

impl Progress {
    pub(super) fn new(jobs: &[StageJob], plan_len: usize, reused: usize) -> Progress {
        let tty = std::io::stderr().is_terminal();
        let mp = MultiProgress::with_draw_target(if tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        let overall = mp.add(ProgressBar::new(jobs.len() as u64));
        overall.set_style(
            ProgressStyle::with_template(
                "{prefix:>8} [{bar:30}] {pos}/{len} stages  {elapsed_precise}  {msg}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        overall.set_prefix("sweep");
        overall.set_message(format!("{reused} of {plan_len} reused from the cache"));
        let labels = jobs
            .iter()
            .map(|j| (j.key.clone(), j.label.clone()))
            .collect();
        Progress {
            mp,
            overall,
            bars: HashMap::new(),
            labels,
            tty,
            finished: 0,
            total: jobs.len(),
        }
    }

    /// A job added while the sweep runs (a search's promotion): counted
    /// and shown by its label like the others.
    pub(super) fn learn(&mut self, key: &str, label: &str) {
        if self.labels.contains_key(key) {
            return;
        }
        self.labels.insert(key.to_string(), label.to_string());
        self.total += 1;
        self.overall.inc_length(1);
    }

    pub(super) fn event(&mut self, ev: &Event) {
        match ev {
            Event::Started { key, host, .. } => {
                let bar = self.mp.add(ProgressBar::new(0));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>8} {msg:40} [{bar:20}] {pos}/{len} {per_sec}",
                    )
                    .expect("template")
                    .progress_chars("=> "),
                );
                bar.set_prefix(key[..8].to_string());
                bar.set_message(self.labels.get(key).cloned().unwrap_or_default());
                self.bars.insert(key.clone(), bar);
                if !self.tty {
                    let on = host
                        .as_ref()
                        .map(|h| format!(" on {h}"))
                        .unwrap_or_default();
                    eprintln!(
                        "started  {}{on}",
                        self.labels.get(key).map(String::as_str).unwrap_or(key)
                    );
                }
            }
            Event::Progress {
                key, step, total, ..
            } => {
                if let Some(b) = self.bars.get(key) {
                    b.set_length(*total);
                    b.set_position(*step);
                }
            }
            Event::Finished { key, outcome, wall } => {
                if let Some(b) = self.bars.remove(key) {
                    b.finish_and_clear();
                    self.mp.remove(&b);
                }
                self.finished += 1;
                self.overall.inc(1);
                let label = self.labels.get(key).map(String::as_str).unwrap_or(key);
                let what = match outcome {
                    Outcome::Done => format!("done     {label} ({:.1} s)", wall.as_secs_f64()),
                    Outcome::Failed(m) => format!("FAILED   {label}: {m}"),
                    Outcome::Skipped { .. } => {
                        format!("skipped  {label} (not run after a failure)")
                    }
                    Outcome::Interrupted(_) => format!("stopped  {label}"),
                };
                let line = format!("[{}/{}] {what}", self.finished, self.total);
                if self.tty {
                    self.mp.suspend(|| eprintln!("{line}"));
                } else {
                    eprintln!("{line}");
                }
            }
        }
    }

    pub(super) fn finish(&self) {
        self.overall.finish_and_clear();
    }
}
