//! The local executor: runs ready stages as child processes of the sweep, at
//! most `jobs` at a time, each with a thread budget.
//!
//! Child processes (rather than threads) give each stage its own thread pool
//! size (`RAYON_NUM_THREADS`), its own peak-RSS and CPU-time figures, and the
//! same isolation a cluster job has: a stage that crashes or is killed takes
//! nothing else with it. Children report progress as JSON lines on stdout;
//! their stderr is the stage's log file.
//!
//! Two kinds of child:
//! - training stages (`pretrain-align`, `domain-adapt`, `cider-optimize`) run
//!   one-shot `ecic run-stage KEY` processes: each gets a clean heap, its own
//!   peak RSS and its own thread pool;
//! - cheap stages (`preprocess`, `evaluate`; see [`super::pooled_kind`]) are
//!   handed, one description a line, to pooled `ecic run-stage --serve` workers (at
//!   most `jobs`, started on demand, reused while the sweep runs; a worker's
//!   stderr is pointed at each stage's log in turn), which saves a process
//!   start per stage.
//!
//! Both publish with deferred durability (no fsync on the stage's critical
//! path; see [`crate::cache::Durability`]): a background thread of `execute`
//! calls [`Cache::sync_deferred`] (one `syncfs`) every [`SYNC_EVERY`] while
//! stages publish, and once more after the last stage (running while the sweep
//! records and summarises; [`Executor::durable`] waits for it), so at most that
//! much finished work is exposed to a power loss (a killed process never
//! matters). Measured on trivial stages, a process start plus the per-file
//! fsyncs were ~40 ms of orchestration per stage.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::BufRead;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Event, ExecError, Executor, Outcome, StageJob, Worker};
use crate::cache::Cache;

/// How often published stage outputs are made durable while a sweep runs.
pub const SYNC_EVERY: Duration = Duration::from_secs(2);

pub struct LocalExecutor {
    worker: Worker,
    jobs: usize,
    /// Set by the interrupt handler: stop starting stages, kill running ones.
    interrupted: Arc<AtomicBool>,
    /// The last `syncfs` of a finished `execute`, still running (see [`Executor::durable`]).
    final_sync: Option<std::thread::JoinHandle<Result<(), String>>>,
}

/// Messages from the reader thread of each child process (`slot` names it).
enum Msg {
    Progress {
        slot: usize,
        step: u64,
        total: u64,
    },
    /// A pooled worker finished the stage it was given.
    Finished {
        slot: usize,
        ok: bool,
        detail: String,
    },
    /// The process exited (for a one-shot child, the end of its stage).
    Gone {
        slot: usize,
        ok: bool,
        detail: String,
    },
}

/// A live child process.
struct Proc {
    pid: u32,
    /// Pooled workers only, until retired: where keys are written (a socket,
    /// so that a write to a worker that just died fails with EPIPE instead of
    /// raising SIGPIPE, which ends `ecic`; see `main.rs`).
    stdin: Option<UnixStream>,
    /// A pooled worker (`stdin` is dropped to retire it).
    pooled: bool,
    /// Its thread budget (a pooled worker only takes stages of the same budget).
    threads: usize,
    /// The stage it runs (front, with when it started) and, for a pooled
    /// worker, at most one more queued behind it.
    queue: VecDeque<(String, Instant)>,
}

impl Proc {
    fn busy(&self) -> bool {
        !self.queue.is_empty()
    }

    fn kill(&self) {
        // Children run in their own process group: signal the whole group.
        // SAFETY: signalling a process group this executor started. It is
        // removed from `procs` as soon as its reader thread reports having
        // reaped it, so the pid can only have been reused in that short window.
        #[cfg(unix)]
        unsafe {
            libc::kill(-(self.pid as i32), libc::SIGKILL);
        }
    }
}

impl LocalExecutor {
    pub fn new(worker: Worker, jobs: usize, interrupted: Arc<AtomicBool>) -> Self {
        Self {
            worker,
            jobs,
            interrupted,
            final_sync: None,
        }
    }
}

impl Executor for LocalExecutor {
    /// Waits for the last `syncfs` that `execute` started on its way out.
    fn durable(&mut self) -> Result<(), ExecError> {
        let Some(h) = self.final_sync.take() else {
            return Ok(());
        };
        let res = h
            .join()
            .unwrap_or_else(|_| Err("the sync thread panicked".into()));
        res.map_err(|e| ExecError::Io {
            what: "syncing published stage outputs".into(),
            source: std::io::Error::other(e),
        })
    }

    fn execute(
        &mut self,
        jobs: &[StageJob],
        keep_going: bool,
        events: &mut dyn FnMut(Event),
    ) -> Result<(), ExecError> {
        let cache = Cache::open(&self.worker.runs).map_err(|e| ExecError::Io {
            what: "opening the cache".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let (tx, rx) = mpsc::channel::<Msg>();
        let stop_syncing = Arc::new(AtomicBool::new(false));
        let syncer = {
            let (cache, stop) = (cache.clone(), stop_syncing.clone());
            // Every SYNC_EVERY while stages run; once more when told to stop,
            // which is the thread's result.
            std::thread::spawn(move || loop {
                let t = Instant::now();
                while t.elapsed() < SYNC_EVERY && !stop.load(Ordering::SeqCst) {
                    std::thread::park_timeout(SYNC_EVERY.saturating_sub(t.elapsed()));
                }
                let last = stop.load(Ordering::SeqCst);
                let res = cache.sync_deferred().map_err(|e| e.to_string());
                if last {
                    let res = res.map(|_| ());
                    tracing::debug!("local executor: final sync done");
                    break res;
                }
                if let Err(e) = res {
                    tracing::warn!("syncing published stage outputs: {e}");
                }
            })
        };
        let mut pending: Vec<&StageJob> = jobs.iter().collect();
        let by_key: HashMap<&str, &StageJob> = jobs.iter().map(|j| (j.key.as_str(), j)).collect();
        let mut done: HashSet<String> = HashSet::new();
        let mut bad: HashMap<String, String> = HashMap::new(); // key -> root failure key
        let mut procs: HashMap<usize, Proc> = HashMap::new();
        let mut next_slot = 0usize;
        let mut stop_starting = false;
        let mut killed = false;
        let limit = self.jobs.max(1);
        let busy = |procs: &HashMap<usize, Proc>| procs.values().filter(|p| p.busy()).count();
        loop {
            if self.interrupted.load(Ordering::SeqCst) {
                stop_starting = true;
                if !killed {
                    for p in procs.values().filter(|p| p.busy()) {
                        p.kill();
                    }
                    killed = true;
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
            // Start ready jobs: on a free slot (at most `jobs` busy
            // processes); a cheap stage may also be queued behind the one a
            // pooled worker runs, so that the worker goes on without waiting
            // for this loop (it still runs one stage at a time).
            if !stop_starting {
                let mut i = 0;
                while i < pending.len() {
                    let job = pending[i];
                    if !job.deps.iter().all(|d| done.contains(d)) {
                        i += 1;
                        continue;
                    }
                    let free = busy(&procs) < limit;
                    let placed = if super::pooled_kind(&job.kind) {
                        self.dispatch_pooled(job, free, &mut procs, &mut next_slot, &tx)
                    } else if free {
                        self.spawn(job, false, next_slot, tx.clone()).map(|mut p| {
                            p.queue.push_back((job.key.clone(), Instant::now()));
                            procs.insert(next_slot, p);
                            next_slot += 1;
                            Some(true)
                        })
                    } else {
                        Ok(None)
                    };
                    match placed {
                        Ok(None) => i += 1,
                        Ok(Some(started)) => {
                            pending.remove(i);
                            if started {
                                events(Event::Started {
                                    key: job.key.clone(),
                                    host: None,
                                    job_id: None,
                                });
                            }
                        }
                        Err(e) => {
                            pending.remove(i);
                            bad.insert(job.key.clone(), job.key.clone());
                            if !keep_going {
                                stop_starting = true;
                            }
                            events(Event::Finished {
                                key: job.key.clone(),
                                outcome: Outcome::Failed(e.to_string()),
                                wall: Duration::ZERO,
                            });
                        }
                    }
                }
            }
            if busy(&procs) == 0 {
                break;
            }
            let msg = match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(m) => m,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            match msg {
                Msg::Progress { slot, step, total } => {
                    if let Some((key, _)) = procs.get(&slot).and_then(|p| p.queue.front()) {
                        events(Event::Progress {
                            key: key.clone(),
                            step,
                            total,
                            note: None,
                        });
                    }
                }
                Msg::Finished { slot, ok, detail } => {
                    let Some(p) = procs.get_mut(&slot) else {
                        continue;
                    };
                    let Some((key, t0)) = p.queue.pop_front() else {
                        continue;
                    };
                    // The worker has already gone on with the next queued stage.
                    if let Some((next, t)) = p.queue.front_mut() {
                        *t = Instant::now();
                        events(Event::Started {
                            key: next.clone(),
                            host: None,
                            job_id: None,
                        });
                    }
                    self.finish(
                        &cache,
                        key,
                        t0,
                        ok,
                        detail,
                        keep_going,
                        &mut done,
                        &mut bad,
                        &mut stop_starting,
                        events,
                    );
                }
                Msg::Gone { slot, ok, detail } => {
                    let Some(mut p) = procs.remove(&slot) else {
                        continue;
                    };
                    let pooled = p.stdin.is_some() || p.pooled;
                    // Queued behind the running stage, never started: back to pending.
                    while p.queue.len() > 1 {
                        let (k, _) = p.queue.pop_back().expect("len > 1");
                        if let Some(j) = by_key.get(k.as_str()) {
                            pending.insert(0, j);
                        }
                    }
                    // A one-shot child's exit ends its stage; a pooled worker
                    // that dies mid-stage fails it.
                    if let Some((key, t0)) = p.queue.pop_front() {
                        let detail = if pooled && ok {
                            "the stage worker exited before finishing the stage".to_string()
                        } else {
                            detail
                        };
                        self.finish(
                            &cache,
                            key,
                            t0,
                            ok && !pooled,
                            detail,
                            keep_going,
                            &mut done,
                            &mut bad,
                            &mut stop_starting,
                            events,
                        );
                    }
                }
            }
        }
        tracing::debug!("local executor: every stage ended");
        // Idle pooled workers: end of input makes them exit; wait for that so
        // no process of this sweep outlives it.
        for p in procs.values_mut() {
            p.stdin.take();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !procs.is_empty() && Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Msg::Gone { slot, .. }) => {
                    procs.remove(&slot);
                }
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        // Whatever was never started (stop after failure, or interrupt).
        for job in pending {
            let outcome = if self.interrupted.load(Ordering::SeqCst) {
                Outcome::Interrupted("not started: interrupted".into())
            } else {
                // An upstream failure, else the failure that stopped the sweep (the caller
                // words the two differently).
                let root = job
                    .deps
                    .iter()
                    .find_map(|d| bad.get(d).cloned())
                    .or_else(|| {
                        bad.iter()
                            .filter(|(k, v)| k == v)
                            .map(|(k, _)| k)
                            .min()
                            .cloned()
                    })
                    .unwrap_or_default();
                Outcome::Skipped { because_of: root }
            };
            events(Event::Finished {
                key: job.key.clone(),
                outcome,
                wall: Duration::ZERO,
            });
        }
        tracing::debug!("local executor: workers gone");
        // A last syncfs makes every entry published here durable. It runs
        // while the caller records and summarises; `durable` waits for it.
        stop_syncing.store(true, Ordering::SeqCst);
        syncer.thread().unpark();
        self.final_sync = Some(syncer);
        Ok(())
    }
}

impl LocalExecutor {
    /// Report a stage's end, from whether its process said ok and whether its
    /// entry is complete in the cache.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        cache: &Cache,
        key: String,
        t0: Instant,
        ok: bool,
        detail: String,
        keep_going: bool,
        done: &mut HashSet<String>,
        bad: &mut HashMap<String, String>,
        stop_starting: &mut bool,
        events: &mut dyn FnMut(Event),
    ) {
        let wall = t0.elapsed();
        let complete = cache.is_complete(&key);
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
                    *stop_starting = true;
                }
            }
        }
        events(Event::Finished { key, outcome, wall });
    }

    /// Place a cheap stage on a pooled worker of its thread budget: an idle
    /// one; else, where `free`, a new one; else queued behind the single
    /// stage a busy worker runs. Returns `Some(started now)`, or `None` where
    /// there is no room.
    fn dispatch_pooled(
        &self,
        job: &StageJob,
        free: bool,
        procs: &mut HashMap<usize, Proc>,
        next_slot: &mut usize,
        tx: &mpsc::Sender<Msg>,
    ) -> Result<Option<bool>, ExecError> {
        let line = format!("{}\n", job.desc.as_deref().unwrap_or(&job.key));
        let fits = |p: &Proc, depth: usize| {
            p.stdin.is_some() && p.queue.len() == depth && p.threads == job.threads
        };
        let mut candidates: Vec<(usize, usize)> = Vec::new(); // (depth, slot)
        if free {
            candidates.extend(
                procs
                    .iter()
                    .filter(|(_, p)| fits(p, 0))
                    .map(|(&s, _)| (0, s)),
            );
        }
        candidates.extend(
            procs
                .iter()
                .filter(|(_, p)| fits(p, 1))
                .map(|(&s, _)| (1, s)),
        );
        for (depth, slot) in candidates {
            let p = procs.get_mut(&slot).expect("listed");
            let sent = p
                .stdin
                .as_ref()
                .map(|w| send_all(w, line.as_bytes()).is_ok())
                .unwrap_or(false);
            if sent {
                p.queue.push_back((job.key.clone(), Instant::now()));
                return Ok(Some(depth == 0));
            }
            // A worker that cannot take input is gone or going: drop its
            // socket (its reader thread reports the exit).
            p.stdin.take();
        }
        if !free {
            return Ok(None);
        }
        // Keep the pool within `jobs` processes: retire an idle worker of
        // another budget if need be.
        let pooled = procs.values().filter(|p| p.stdin.is_some()).count();
        if pooled >= self.jobs.max(1) {
            if let Some(p) = procs
                .values_mut()
                .find(|p| p.queue.is_empty() && p.stdin.is_some())
            {
                p.stdin.take();
            }
        }
        let slot = *next_slot;
        *next_slot += 1;
        let mut p = self.spawn(job, true, slot, tx.clone())?;
        let w = p.stdin.as_ref().expect("pooled worker has stdin");
        send_all(w, line.as_bytes()).map_err(|e| ExecError::Io {
            what: "handing a stage to a new worker".into(),
            source: e,
        })?;
        p.queue.push_back((job.key.clone(), Instant::now()));
        procs.insert(slot, p);
        Ok(Some(true))
    }

    /// Start a child: a one-shot `run-stage KEY` (`serve` = false) or a pooled
    /// `run-stage --serve` worker.
    fn spawn(
        &self,
        job: &StageJob,
        serve: bool,
        slot: usize,
        tx: mpsc::Sender<Msg>,
    ) -> Result<Proc, ExecError> {
        let io = |what: String| {
            move |e| ExecError::Io {
                what: what.clone(),
                source: e,
            }
        };
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
            .env("RAYON_NUM_THREADS", job.threads.to_string())
            .env("ECIC_THREADS", job.threads.to_string())
            .stdout(Stdio::piped());
        let mut keys = None;
        if serve {
            let (ours, theirs) = UnixStream::pair().map_err(io("creating a socket pair".into()))?;
            keys = Some(ours);
            // The worker points its stderr at each stage's log itself.
            cmd.arg("--serve")
                .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
                .stderr(Stdio::null());
        } else {
            let log = self
                .worker
                .runs
                .join("logs")
                .join(format!("{}.log", job.key));
            // Append: a log keeps every attempt (a resumed stage shows where it resumed).
            let log_file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .map_err(io(format!("opening {}", log.display())))?;
            cmd.arg("--deferred")
                .arg(&job.key)
                .stdin(Stdio::null())
                .stderr(Stdio::from(log_file));
        }
        // Children ignore the terminal's Ctrl-C; the dispatcher decides.
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let mut child = cmd
            .spawn()
            .map_err(io(format!("starting {}", self.worker.program.display())))?;
        // Close our copy of the worker's end now that the child has it (the
        // worker then sees end of input when `keys` is dropped).
        drop(cmd);
        let stdout = child.stdout.take().expect("stdout is piped");
        let stdin = keys;
        let pid = child.id();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                match parse_line(&line) {
                    Some(Line::Progress(step, total)) => {
                        let _ = tx.send(Msg::Progress { slot, step, total });
                    }
                    Some(Line::Finished(ok, detail)) => {
                        let _ = tx.send(Msg::Finished { slot, ok, detail });
                    }
                    None => {}
                }
            }
            // stdout closed: the child is exiting.
            let (ok, detail) = match child.wait() {
                Ok(s) if s.success() => (true, String::new()),
                Ok(s) => (false, describe_exit(s)),
                Err(_) => (false, "could not wait for the stage process".into()),
            };
            let _ = tx.send(Msg::Gone { slot, ok, detail });
        });
        Ok(Proc {
            pid,
            stdin,
            pooled: serve,
            threads: job.threads,
            queue: VecDeque::new(),
        })
    }
}

/// Write all of `bytes` to a worker's key socket without raising SIGPIPE.
fn send_all(w: &UnixStream, mut bytes: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    while !bytes.is_empty() {
        // SAFETY: send from a live buffer on a socket we own.
        let n = unsafe {
            libc::send(
                w.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        bytes = &bytes[n as usize..];
    }
    Ok(())
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

enum Line {
    Progress(u64, u64),
    Finished(bool, String),
}

/// `{"progress": [step, total]}` or `{"finished": KEY, "ok": bool, "error": ..}`.
fn parse_line(line: &str) -> Option<Line> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if let Some(p) = v.get("progress").and_then(|p| p.as_array()) {
        return Some(Line::Progress(p.first()?.as_u64()?, p.get(1)?.as_u64()?));
    }
    v.get("finished")?;
    let ok = v.get("ok")?.as_bool()?;
    let detail = v
        .get("error")
        .and_then(|e| e.as_str())
        .unwrap_or_default()
        .to_string();
    Some(Line::Finished(ok, detail))
}
