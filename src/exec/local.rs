//! The local executor: runs ready stages as `ecic run-stage` child processes,
//! at most `jobs` at a time, each with a thread budget.
//!
//! Child processes (rather than threads) give each stage its own thread pool
//! size (`RAYON_NUM_THREADS`), its own peak-RSS and CPU-time figures, and the
//! same isolation a cluster job has: a stage that crashes or is killed takes
//! nothing else with it. Children report progress as JSON lines on stdout; their
//! stderr is the stage's log file.

use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Event, ExecError, Executor, Outcome, StageJob, Worker};

pub struct LocalExecutor {
    pub worker: Worker,
    pub jobs: usize,
    /// Set by the interrupt handler: stop starting stages, kill running ones.
    pub interrupted: Arc<AtomicBool>,
}

enum Msg {
    Progress {
        key: String,
        step: u64,
        total: u64,
    },
    Exited {
        key: String,
        ok: bool,
        detail: String,
    },
}

impl Executor for LocalExecutor {
    fn execute(
        &mut self,
        jobs: &[StageJob],
        keep_going: bool,
        events: &mut dyn FnMut(Event),
    ) -> Result<(), ExecError> {
        let (tx, rx) = mpsc::channel::<Msg>();
        let mut pending: Vec<&StageJob> = jobs.iter().collect();
        let mut done: HashSet<String> = HashSet::new();
        let mut bad: HashMap<String, String> = HashMap::new(); // key -> root failure key
        let mut running: HashMap<String, (Arc<std::sync::Mutex<Child>>, Instant)> = HashMap::new();
        let mut stop_starting = false;
        loop {
            if self.interrupted.load(Ordering::SeqCst) {
                stop_starting = true;
                for (child, _) in running.values() {
                    if let Ok(mut c) = child.lock() {
                        let _ = c.kill();
                    }
                }
            }
            // Skip jobs whose dependencies failed.
            let mut i = 0;
            while i < pending.len() {
                let job = pending[i];
                if let Some(root) = job.deps.iter().find_map(|d| bad.get(d).cloned()) {
                    bad.insert(job.key.clone(), root.clone());
                    events(Event::Finished {
                        key: job.key.clone(),
                        outcome: Outcome::Skipped { because_of: root },
                        wall: Duration::ZERO,
                    });
                    pending.remove(i);
                } else {
                    i += 1;
                }
            }
            // Start ready jobs.
            if !stop_starting {
                let mut i = 0;
                while i < pending.len() && running.len() < self.jobs.max(1) {
                    let job = pending[i];
                    if job.deps.iter().all(|d| done.contains(d)) {
                        pending.remove(i);
                        let child = self.spawn(job, tx.clone())?;
                        running.insert(job.key.clone(), (child, Instant::now()));
                        events(Event::Started {
                            key: job.key.clone(),
                            host: None,
                            job_id: None,
                        });
                    } else {
                        i += 1;
                    }
                }
            }
            if running.is_empty() {
                break;
            }
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Msg::Progress { key, step, total }) => {
                    events(Event::Progress {
                        key,
                        step,
                        total,
                        note: None,
                    });
                }
                Ok(Msg::Exited { key, ok, detail }) => {
                    let started = running
                        .remove(&key)
                        .map(|(_, t)| t)
                        .unwrap_or_else(Instant::now);
                    let wall = started.elapsed();
                    let complete = self
                        .worker
                        .runs
                        .join(crate::cache::OBJECTS)
                        .join(&key)
                        .join("manifest.json")
                        .is_file();
                    let outcome = if self.interrupted.load(Ordering::SeqCst) && !complete {
                        Outcome::Interrupted("interrupted by the user".into())
                    } else if ok && complete {
                        Outcome::Done
                    } else if ok {
                        Outcome::Failed("the stage exited without publishing its output".into())
                    } else {
                        Outcome::Failed(detail)
                    };
                    match &outcome {
                        Outcome::Done => {
                            done.insert(key.clone());
                        }
                        _ => {
                            bad.insert(key.clone(), key.clone());
                            if !keep_going {
                                stop_starting = true;
                            }
                        }
                    }
                    events(Event::Finished { key, outcome, wall });
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        // Whatever was never started (stop after failure, or interrupt).
        for job in pending {
            let outcome = if self.interrupted.load(Ordering::SeqCst) {
                Outcome::Interrupted("not started: interrupted".into())
            } else {
                let root = job
                    .deps
                    .iter()
                    .find_map(|d| bad.get(d).cloned())
                    .unwrap_or_else(|| "an earlier failure".into());
                Outcome::Skipped { because_of: root }
            };
            events(Event::Finished {
                key: job.key.clone(),
                outcome,
                wall: Duration::ZERO,
            });
        }
        Ok(())
    }
}

impl LocalExecutor {
    fn spawn(
        &self,
        job: &StageJob,
        tx: mpsc::Sender<Msg>,
    ) -> Result<Arc<std::sync::Mutex<Child>>, ExecError> {
        let log = self
            .worker
            .runs
            .join("logs")
            .join(format!("{}.log", job.key));
        let io = |what: String| {
            move |e| ExecError::Io {
                what: what.clone(),
                source: e,
            }
        };
        // Append: a log keeps every attempt (a resumed stage shows where it resumed).
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io(format!("opening {}", log.display())))?;
        // On Linux, /proc/self/exe is this very binary even if the file was
        // replaced meanwhile (a rebuild during a long sweep).
        let self_exe = std::path::Path::new("/proc/self/exe");
        let program = if self_exe.exists()
            && self.worker.program == std::env::current_exe().unwrap_or_default()
        {
            self_exe.to_path_buf()
        } else {
            self.worker.program.clone()
        };
        let mut cmd = Command::new(&program);
        cmd.arg("run-stage")
            .arg("--runs")
            .arg(&self.worker.runs)
            .arg("--progress")
            .arg(&job.key)
            .env("RAYON_NUM_THREADS", job.threads.to_string())
            .env("ECIC_THREADS", job.threads.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file));
        // Children ignore the terminal's Ctrl-C; the dispatcher decides.
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let mut child = cmd
            .spawn()
            .map_err(io(format!("starting {}", self.worker.program.display())))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let child = Arc::new(std::sync::Mutex::new(child));
        let key = job.key.clone();
        let waiter = child.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Some((step, total)) = parse_progress(&line) {
                    let _ = tx.send(Msg::Progress {
                        key: key.clone(),
                        step,
                        total,
                    });
                }
            }
            // stdout closed: the child is exiting.
            let status = loop {
                let r = waiter.lock().map(|mut c| c.try_wait());
                match r {
                    Ok(Ok(Some(s))) => break Some(s),
                    Ok(Ok(None)) => std::thread::sleep(Duration::from_millis(5)),
                    _ => break None,
                }
            };
            let (ok, detail) = match status {
                Some(s) if s.success() => (true, String::new()),
                Some(s) => (false, describe_exit(s)),
                None => (false, "could not wait for the stage process".into()),
            };
            let _ = tx.send(Msg::Exited { key, ok, detail });
        });
        Ok(child)
    }
}

fn describe_exit(s: std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = s.signal() {
            return format!("the stage process was killed by signal {sig}");
        }
    }
    format!("the stage process exited with {s}")
}

/// `{"progress": [step, total]}`
fn parse_progress(line: &str) -> Option<(u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let p = v.get("progress")?.as_array()?;
    Some((p.first()?.as_u64()?, p.get(1)?.as_u64()?))
}
