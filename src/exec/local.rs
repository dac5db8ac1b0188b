//! The local executor: runs the stages the scheduler ([`super::schedule`])
//! hands it as child processes of the sweep, at most `jobs` at a time, each
//! with a thread budget, and reports their starts, progress and ends.
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
//! path; see [`crate::cache::Durability`]): a background thread of the run
//! calls [`Cache::sync_deferred`] (one `syncfs`) every [`SYNC_EVERY`] while
//! stages publish, and once more after the last stage (started by
//! [`Executor::wind_down`], running while the sweep records and summarises;
//! [`Executor::durable`] waits for it), so at most that
//! much finished work is exposed to a power loss (a killed process never
//! matters). Measured on trivial stages, a process start plus the per-file
//! fsyncs were ~40 ms of orchestration per stage.

use std::collections::{HashMap, VecDeque};
use std::io::BufRead;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Event, ExecError, Executor, Outcome, Report, StageJob, Stop, Stopping, Worker};
use crate::cache::Cache;

/// How often published stage outputs are made durable while a sweep runs.
pub const SYNC_EVERY: Duration = Duration::from_secs(2);

pub struct LocalExecutor {
    worker: Worker,
    jobs: usize,
    /// Set by the interrupt handler: stop starting stages, kill running ones.
    interrupted: Arc<AtomicBool>,
    /// The last `syncfs` of a finished run, still running (see [`Executor::durable`]).
    final_sync: Option<std::thread::JoinHandle<Result<(), String>>>,
    /// The run in progress.
    session: Option<Session>,
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
            session: None,
        }
    }

    /// The state of the run in progress, begun on first use: the cache, the
    /// children's message channel and the periodic `syncfs` thread.
    fn session(&mut self) -> Result<&mut Session, ExecError> {
        if self.session.is_none() {
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
            self.session = Some(Session {
                cache,
                tx,
                rx,
                stop_syncing,
                syncer,
                procs: HashMap::new(),
                next_slot: 0,
                reports: Vec::new(),
            });
        }
        Ok(self.session.as_mut().expect("just set"))
    }
}

/// One run of the local executor (from the first job to `wind_down`).
struct Session {
    cache: Cache,
    tx: mpsc::Sender<Msg>,
    rx: mpsc::Receiver<Msg>,
    stop_syncing: Arc<AtomicBool>,
    syncer: std::thread::JoinHandle<Result<(), String>>,
    procs: HashMap<usize, Proc>,
    next_slot: usize,
    /// Reports made while starting jobs, handed over by the next `wait`.
    reports: Vec<Report>,
}

impl Session {
    fn busy(&self) -> usize {
        self.procs.values().filter(|p| p.busy()).count()
    }

    /// Report a stage's end, from whether its process said ok and whether its
    /// entry is complete in the cache.
    fn finish(&mut self, key: String, t0: Instant, ok: bool, detail: String, interrupted: bool) {
        let wall = t0.elapsed();
        let complete = self.cache.is_complete(&key);
        let outcome = if interrupted && !complete {
            Outcome::Interrupted("interrupted by the user".into())
        } else if ok && complete {
            Outcome::Done
        } else if ok {
            Outcome::Failed("the stage exited without publishing its output".into())
        } else {
            Outcome::Failed(detail)
        };
        self.reports
            .push(Report::Event(Event::Finished { key, outcome, wall }));
    }

    /// Turn one message of a child's reader thread into reports.
    fn take(&mut self, msg: Msg, interrupted: bool) {
        match msg {
            Msg::Progress { slot, step, total } => {
                if let Some((key, _)) = self.procs.get(&slot).and_then(|p| p.queue.front()) {
                    self.reports.push(Report::Event(Event::Progress {
                        key: key.clone(),
                        step,
                        total,
                        note: None,
                    }));
                }
            }
            Msg::Finished { slot, ok, detail } => {
                let Some(p) = self.procs.get_mut(&slot) else {
                    return;
                };
                let Some((key, t0)) = p.queue.pop_front() else {
                    return;
                };
                // The worker has already gone on with the next queued stage.
                if let Some((next, t)) = p.queue.front_mut() {
                    *t = Instant::now();
                    let started = started(next);
                    self.reports.push(started);
                }
                self.finish(key, t0, ok, detail, interrupted);
            }
            Msg::Gone { slot, ok, detail } => {
                let Some(mut p) = self.procs.remove(&slot) else {
                    return;
                };
                let pooled = p.stdin.is_some() || p.pooled;
                // Queued behind the running stage, never started: pending again.
                while p.queue.len() > 1 {
                    let (k, _) = p.queue.pop_back().expect("len > 1");
                    self.reports.push(Report::Returned(k));
                }
                // A one-shot child's exit ends its stage; a pooled worker
                // that dies mid-stage fails it.
                if let Some((key, t0)) = p.queue.pop_front() {
                    let detail = if pooled && ok {
                        "the stage worker exited before finishing the stage".to_string()
                    } else {
                        detail
                    };
                    self.finish(key, t0, ok && !pooled, detail, interrupted);
                }
            }
        }
    }
}

fn started(key: &str) -> Report {
    Report::Event(Event::Started {
        key: key.to_string(),
        host: None,
        job_id: None,
    })
}

impl Executor for LocalExecutor {
    /// Start a ready stage: on a free slot (at most `jobs` busy processes); a
    /// cheap stage may also be queued behind the one a pooled worker runs, so
    /// that the worker goes on without waiting for the scheduler (it still
    /// runs one stage at a time).
    fn start(&mut self, job: &StageJob) -> Result<bool, ExecError> {
        let limit = self.jobs.max(1);
        let worker = self.worker.clone();
        let s = self.session()?;
        let free = s.busy() < limit;
        let placed = if super::pooled_kind(&job.kind) {
            s.dispatch_pooled(&worker, limit, job, free)?
        } else if free {
            let slot = s.next_slot;
            let mut p = spawn(&worker, job, false, slot, s.tx.clone())?;
            p.queue.push_back((job.key.clone(), Instant::now()));
            s.procs.insert(slot, p);
            s.next_slot += 1;
            Some(true)
        } else {
            None
        };
        if placed == Some(true) {
            s.reports.push(started(&job.key));
        }
        Ok(placed.is_some())
    }

    fn wait(&mut self) -> Result<Vec<Report>, ExecError> {
        let interrupted = self.interrupted.load(Ordering::SeqCst);
        let s = self.session()?;
        if s.reports.is_empty() {
            match s.rx.recv_timeout(Duration::from_millis(200)) {
                Ok(m) => s.take(m, interrupted),
                Err(_) => return Ok(Vec::new()),
            }
        }
        while let Ok(m) = s.rx.try_recv() {
            s.take(m, interrupted);
        }
        Ok(std::mem::take(&mut s.reports))
    }

    /// Interrupt: kill the running children (their ends are reported
    /// interrupted). After a failure nothing is to be done: the scheduler
    /// just starts nothing more.
    fn stop(&mut self, how: &Stop) -> Result<Stopping, ExecError> {
        if *how == Stop::All {
            if let Some(s) = &self.session {
                for p in s.procs.values().filter(|p| p.busy()) {
                    p.kill();
                }
            }
        }
        Ok(Stopping::Follow)
    }

    fn interrupted(&self) -> bool {
        self.interrupted.load(Ordering::SeqCst)
    }

    /// Retire the pooled workers and start the last `syncfs`.
    fn wind_down(&mut self) -> Result<(), ExecError> {
        let Some(mut s) = self.session.take() else {
            return Ok(());
        };
        tracing::debug!("local executor: every stage ended");
        // Idle pooled workers: end of input makes them exit; wait for that so
        // no process of this sweep outlives it.
        for p in s.procs.values_mut() {
            p.stdin.take();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !s.procs.is_empty() && Instant::now() < deadline {
            match s.rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Msg::Gone { slot, .. }) => {
                    s.procs.remove(&slot);
                }
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        tracing::debug!("local executor: workers gone");
        // A last syncfs makes every entry published here durable. It runs
        // while the caller records and summarises; `durable` waits for it.
        s.stop_syncing.store(true, Ordering::SeqCst);
        s.syncer.thread().unpark();
        self.final_sync = Some(s.syncer);
        Ok(())
    }

    /// Waits for the last `syncfs` that `wind_down` started.
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
}

impl Session {
    /// Place a cheap stage on a pooled worker of its thread budget: an idle
    /// one; else, where `free`, a new one; else queued behind the single
    /// stage a busy worker runs. Returns `Some(started now)`, or `None` where
    /// there is no room.
    fn dispatch_pooled(
        &mut self,
        worker: &Worker,
        limit: usize,
        job: &StageJob,
        free: bool,
    ) -> Result<Option<bool>, ExecError> {
        let procs = &mut self.procs;
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
        if pooled >= limit {
            if let Some(p) = procs
                .values_mut()
                .find(|p| p.queue.is_empty() && p.stdin.is_some())
            {
                p.stdin.take();
            }
        }
        let slot = self.next_slot;
        self.next_slot += 1;
        let mut p = spawn(worker, job, true, slot, self.tx.clone())?;
        let w = p.stdin.as_ref().expect("pooled worker has stdin");
        send_all(w, line.as_bytes()).map_err(|e| ExecError::Io {
            what: "handing a stage to a new worker".into(),
            source: e,
        })?;
        p.queue.push_back((job.key.clone(), Instant::now()));
        self.procs.insert(slot, p);
        Ok(Some(true))
    }
}

/// Start a child: a one-shot `run-stage KEY` (`serve` = false) or a pooled
/// `run-stage --serve` worker.
fn spawn(
    worker: &Worker,
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
    let program =
        if self_exe.exists() && worker.program == std::env::current_exe().unwrap_or_default() {
            self_exe.to_path_buf()
        } else {
            worker.program.clone()
        };
    let mut cmd = Command::new(&program);
    cmd.arg("run-stage")
        .arg("--runs")
        .arg(&worker.runs)
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
        let log = worker.runs.join("logs").join(format!("{}.log", job.key));
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
        .map_err(io(format!("starting {}", worker.program.display())))?;
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
