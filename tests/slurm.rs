//! The Slurm executor against a real Slurm (`scripts/slurm-local.sh start`).
//!
//! These tests run only with `ECIC_SLURM=1` (CI's `.ci/run` sets it after
//! starting the one-node cluster); then a missing cluster is a failure. Without
//! it they say they were not run and pass. The worker is a small shell script
//! standing in for `ecic run-stage`: it publishes a manifest for most keys and
//! fails, leaving the failure marker, for keys starting with `fail`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ecic::exec::slurm::{FollowEnd, SlurmExecutor};
use ecic::exec::{Event, Executor, Outcome, Resources, StageJob, Worker};

const FAKE_WORKER: &str = r#"#!/bin/sh
# Stands in for `ecic run-stage --runs DIR KEY`.
set -e
[ "$1" = run-stage ] && [ "$2" = --runs ] || { echo "bad arguments: $*" >&2; exit 2; }
runs=$3 key=$4
echo "stage $key on $(hostname -s) with RAYON_NUM_THREADS=$RAYON_NUM_THREADS"
case "$key" in
  fail*)
    mkdir -p "$runs/status"
    printf '{"error": "stage %s failed on purpose"}\n' "$key" > "$runs/status/$key.failed"
    echo "failing on purpose" >&2
    exit 1 ;;
  sleep*)
    sleep 120 ;;
  wait*)
    # Held until the test releases it (at most a minute).
    i=0; while [ ! -e "$runs/release" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done ;;
esac
mkdir -p "$runs/objects-v1/$key"
echo "{\"key\": \"$key\"}" > "$runs/objects-v1/$key/manifest.json"
"#;

/// `Some(fixture)` when the Slurm tests should run; panics when asked to run
/// (`ECIC_SLURM=1`) and there is no working cluster.
fn cluster() -> Option<Fixture> {
    if std::env::var("ECIC_SLURM").map_or(true, |v| v != "1") {
        eprintln!("slurm tests not run: set ECIC_SLURM=1 after `scripts/slurm-local.sh start`");
        return None;
    }
    let sinfo = std::process::Command::new("sinfo")
        .args(["-h", "-o", "%t"])
        .output();
    match sinfo {
        Ok(o) if o.status.success() && !String::from_utf8_lossy(&o.stdout).trim().is_empty() => {}
        other => panic!("ECIC_SLURM=1 but no Slurm cluster answers `sinfo`: {other:?}"),
    }
    Some(Fixture::new())
}

struct Fixture {
    dir: tempfile::TempDir,
    program: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let program = dir.path().join("fake-ecic");
        std::fs::write(&program, FAKE_WORKER).expect("writing the fake worker");
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Fixture { dir, program }
    }

    fn runs(&self) -> PathBuf {
        self.dir.path().join("runs")
    }

    fn worker(&self) -> Worker {
        Worker {
            program: self.program.clone(),
            runs: self.runs(),
        }
    }

    fn executor(&self) -> SlurmExecutor {
        SlurmExecutor::new(self.worker()).poll_interval(Duration::from_millis(200))
    }
}

fn job(key: &str, deps: &[&str]) -> StageJob {
    StageJob {
        key: key.to_string(),
        kind: "test".into(),
        label: format!("test stage {key}"),
        deps: deps.iter().map(|d| d.to_string()).collect(),
        threads: 3,
        resources: Resources {
            cpus: Some(1),
            time: Some("00:05:00".into()),
            ..Resources::default()
        },
        desc: None,
    }
}

fn outcomes(events: &[Event]) -> BTreeMap<String, Outcome> {
    let mut out = BTreeMap::new();
    for e in events {
        if let Event::Finished { key, outcome, .. } = e {
            assert!(
                out.insert(key.clone(), outcome.clone()).is_none(),
                "{key} finished twice"
            );
        }
    }
    out
}

/// Position of the first event matching `pred`.
fn position(events: &[Event], pred: impl Fn(&Event) -> bool) -> usize {
    events.iter().position(pred).expect("event not found")
}

fn started(key: &'static str) -> impl Fn(&Event) -> bool {
    move |e| matches!(e, Event::Started { key: k, .. } if k == key)
}

fn finished(key: &'static str) -> impl Fn(&Event) -> bool {
    move |e| matches!(e, Event::Finished { key: k, .. } if k == key)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

#[test]
fn chain_with_a_failing_middle_stage() {
    let Some(fx) = cluster() else { return };
    let mut ex = fx.executor();
    let jobs = [
        job("a1", &[]),
        job("fail-b1", &["a1"]),
        job("c1", &["fail-b1"]),
    ];
    let mut events = Vec::new();
    ex.execute(&jobs, true, &mut |e| events.push(e))
        .expect("execute");
    let out = outcomes(&events);
    assert_eq!(out.len(), 3, "{events:?}");
    assert_eq!(out["a1"], Outcome::Done);
    match &out["fail-b1"] {
        Outcome::Failed(m) => assert!(m.starts_with("stage fail-b1 failed on purpose"), "{m}"),
        other => panic!("fail-b1: {other:?}"),
    }
    assert_eq!(
        out["c1"],
        Outcome::Skipped {
            because_of: "fail-b1".into()
        }
    );
    // c1 never ran; a1 ran on this machine under a Slurm job id.
    assert!(!events.iter().any(started("c1")));
    let host = events.iter().find_map(|e| match e {
        Event::Started { key, host, job_id } if key == "a1" => Some((host.clone(), job_id.clone())),
        _ => None,
    });
    let (host, job_id) = host.expect("a1 started");
    assert!(host.is_some() && job_id.is_some_and(|j| j.parse::<u64>().is_ok()));
    let log = read(&fx.runs().join("logs/a1.log"));
    assert!(
        log.contains("stage a1 on") && log.contains("RAYON_NUM_THREADS=3"),
        "{log}"
    );
    assert!(read(&fx.runs().join("logs/fail-b1.log")).contains("failing on purpose"));
}

#[test]
fn diamond_all_succeed_in_dependency_order() {
    let Some(fx) = cluster() else { return };
    let mut ex = fx.executor();
    let jobs = [
        job("d1", &[]),
        job("d2", &["d1"]),
        job("d3", &["d1"]),
        job("d4", &["d2", "d3"]),
    ];
    let mut events = Vec::new();
    ex.execute(&jobs, false, &mut |e| events.push(e))
        .expect("execute");
    let out = outcomes(&events);
    assert!(
        out.values().all(|o| *o == Outcome::Done) && out.len() == 4,
        "{out:?}"
    );
    for k in ["d1", "d2", "d3", "d4"] {
        assert!(fx
            .runs()
            .join("objects-v1")
            .join(k)
            .join("manifest.json")
            .is_file());
    }
    assert!(position(&events, finished("d1")) < position(&events, started("d2")));
    assert!(position(&events, finished("d1")) < position(&events, started("d3")));
    assert!(position(&events, finished("d2")) < position(&events, started("d4")));
    assert!(position(&events, finished("d3")) < position(&events, started("d4")));
    // The batch is recorded with the job ids Slurm gave.
    let batches = SlurmExecutor::batches(&fx.runs()).expect("batches");
    assert_eq!(batches.len(), 1);
    let ids: Vec<&str> = batches[0].jobs.iter().map(|j| j.job_id.as_str()).collect();
    assert_eq!(ids.len(), 4);
    for e in &events {
        if let Event::Started {
            job_id: Some(id), ..
        } = e
        {
            assert!(ids.contains(&id.as_str()), "{id} not recorded");
        }
    }
}

#[test]
fn interrupt_cancels_our_jobs() {
    let Some(fx) = cluster() else { return };
    let flag = Arc::new(AtomicBool::new(false));
    let mut ex = fx.executor().interrupt_flag(flag.clone(), false);
    let jobs = [job("sleep-i1", &[]), job("i2", &["sleep-i1"])];
    let mut events = Vec::new();
    ex.execute(&jobs, true, &mut |e| {
        // The user presses Ctrl-C once the long stage is running.
        if matches!(&e, Event::Started { key, .. } if key == "sleep-i1") {
            flag.store(true, Ordering::SeqCst);
        }
        events.push(e);
    })
    .expect("execute");
    let out = outcomes(&events);
    assert!(
        matches!(out["sleep-i1"], Outcome::Interrupted(_)),
        "{out:?}"
    );
    assert!(
        matches!(out["i2"], Outcome::Interrupted(_) | Outcome::Skipped { .. }),
        "{out:?}"
    );
}

#[test]
fn detach_then_attach_picks_the_batch_up() {
    let Some(fx) = cluster() else { return };
    let mut first = fx.executor().batch_name("sweep-x").expect("batch name");
    first
        .submit(&[job("e1", &[]), job("fail-e2", &["e1"]), job("e3", &["e1"])])
        .expect("submit");
    drop(first); // the orchestrator goes away; Slurm runs the DAG on its own
    let mut again = SlurmExecutor::attach(fx.worker(), "sweep-x")
        .expect("attach")
        .poll_interval(Duration::from_millis(200));
    let mut events = Vec::new();
    assert_eq!(
        again.follow(true, &mut |e| events.push(e)).expect("follow"),
        FollowEnd::Finished
    );
    let out = outcomes(&events);
    assert_eq!(out["e1"], Outcome::Done);
    assert!(matches!(out["fail-e2"], Outcome::Failed(_)));
    assert_eq!(out["e3"], Outcome::Done);
}

#[test]
fn first_failure_cancels_unstarted_jobs_without_keep_going() {
    let Some(fx) = cluster() else { return };
    let runs = fx.runs();
    // Release the held stage only once Slurm shows its dependent cancelled, so
    // the dependent cannot have started before the executor cancelled it.
    let watcher = {
        let runs = runs.clone();
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let mut cancelled = false;
            while !cancelled && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
                let Ok(batches) = SlurmExecutor::batches(&runs) else {
                    continue;
                };
                let Some(id) = batches.iter().flat_map(|b| &b.jobs).find(|j| j.key == "k3") else {
                    continue;
                };
                let out = std::process::Command::new("squeue")
                    .args(["-h", "-t", "all", "-o", "%T", "-j", &id.job_id])
                    .output();
                cancelled =
                    out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("CANCELLED"));
            }
            std::fs::write(runs.join("release"), "").expect("writing the release file");
            cancelled
        })
    };
    let mut ex = fx.executor();
    let jobs = [
        job("fail-k1", &[]),
        job("wait-k2", &[]),
        job("k3", &["wait-k2"]),
    ];
    let mut events = Vec::new();
    ex.execute(&jobs, false, &mut |e| events.push(e))
        .expect("execute");
    assert!(watcher.join().expect("watcher"), "k3 was never cancelled");
    let out = outcomes(&events);
    assert!(matches!(out["fail-k1"], Outcome::Failed(_)), "{out:?}");
    // A stage already running is left to finish; one not yet started is not
    // run. wait-k2 may be either, depending on when the 2-core node had room.
    match &out["wait-k2"] {
        Outcome::Done => assert!(runs.join("objects-v1/wait-k2/manifest.json").is_file()),
        Outcome::Skipped { because_of } => assert_eq!(because_of, "fail-k1"),
        other => panic!("wait-k2: {other:?}"),
    }
    assert_eq!(
        out["k3"],
        Outcome::Skipped {
            because_of: "fail-k1".into()
        }
    );
    assert!(!runs.join("logs/k3.log").exists());
}

/// A batch that grows while it runs (a search's promotions): the job added
/// when `g1` ends waits, through Slurm, for `wait-g2`, still running then,
/// and the batch's record gains it (so `--attach` would follow it).
#[test]
fn a_batch_grows_while_it_runs() {
    let Some(fx) = cluster() else { return };
    let mut ex = fx.executor().batch_name("grow").expect("batch name");
    let jobs = [job("g1", &[]), job("wait-g2", &[])];
    let mut events = Vec::new();
    let release = fx.runs().join("release");
    let mut grown = false;
    ecic::exec::schedule::run_growing(
        &mut ex,
        &jobs,
        &std::collections::HashMap::new(),
        false,
        &mut |e| {
            // Let wait-g2 end only once g3 was submitted behind it.
            if matches!(&e, Event::Finished { key, .. } if key == "g1") {
                std::fs::write(&release, b"").expect("release");
            }
            events.push(e)
        },
        &mut |key| {
            if key == "g1" && !grown {
                grown = true;
                vec![job("g3", &["g1", "wait-g2"])]
            } else {
                Vec::new()
            }
        },
    )
    .expect("run");
    let out = outcomes(&events);
    assert_eq!(out.len(), 3, "{events:?}");
    assert!(out.values().all(|o| *o == Outcome::Done), "{out:?}");
    assert!(
        position(&events, finished("wait-g2")) < position(&events, started("g3")),
        "{events:?}"
    );
    let record = read(&fx.runs().join("slurm/grow.json"));
    assert!(record.contains("\"g3\""), "{record}");
}
