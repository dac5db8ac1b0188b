//! The executor against a scripted Slurm: submission arguments, the batch
//! record, and the mapping of Slurm states plus marker files to outcomes.
//! (The same paths against a real cluster are in `tests/slurm.rs`.)

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::exec::Resources;

/// A fake Slurm: `sbatch` hands out ids from 100, `squeue` answers from a
/// table the test fills (job id -> `state|reason|node|elapsed`), every call is logged.
#[derive(Clone, Default)]
struct Fake {
    next: Arc<Mutex<u32>>,
    queue: Arc<Mutex<BTreeMap<String, String>>>,
    calls: Arc<Mutex<Vec<(String, Vec<String>, Option<String>)>>>,
}

impl SlurmCli for Fake {
    fn run(
        &mut self,
        program: &str,
        args: &[String],
        stdin: Option<&str>,
    ) -> Result<String, CliFailure> {
        self.calls
            .lock()
            .unwrap()
            .push((program.into(), args.to_vec(), stdin.map(str::to_string)));
        match program {
            "sbatch" => {
                let mut n = self.next.lock().unwrap();
                *n += 1;
                Ok(format!("{}\n", 99 + *n))
            }
            "squeue" => {
                let ids = args.last().unwrap();
                let q = self.queue.lock().unwrap();
                let rows: Vec<String> = ids
                    .split(',')
                    .filter_map(|id| q.get(id).map(|r| format!("{id}|{r}\n")))
                    .collect();
                if rows.is_empty() {
                    return Err(CliFailure::Exit {
                        status: Some(1),
                        stderr: "slurm_load_jobs error: Invalid job id specified".into(),
                    });
                }
                Ok(rows.concat())
            }
            "scontrol" => Err(CliFailure::Exit {
                status: Some(1),
                stderr: "not scripted".into(),
            }),
            _ => Ok(String::new()),
        }
    }
}

fn job(key: &str, deps: &[&str]) -> StageJob {
    StageJob {
        key: key.to_string(),
        kind: "evaluate".into(),
        label: format!("stage {key}"),
        deps: deps.iter().map(|d| d.to_string()).collect(),
        threads: 2,
        resources: Resources::default(),
        desc: None,
    }
}

fn worker(runs: &Path) -> Worker {
    Worker {
        program: PathBuf::from("/opt/ecic it's/ecic"),
        runs: runs.to_path_buf(),
    }
}

fn publish(runs: &Path, key: &str) {
    let p = track::manifest_path(runs, key);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, "{}").unwrap();
}

fn fail_marker(runs: &Path, key: &str, error: &str) {
    let p = track::failed_marker_path(runs, key);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, serde_json::json!({ "error": error }).to_string()).unwrap();
}

fn outcomes(events: &[Event]) -> BTreeMap<String, Outcome> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Finished { key, outcome, .. } => Some((key.clone(), outcome.clone())),
            _ => None,
        })
        .collect()
}

fn executor(runs: &Path, fake: &Fake) -> SlurmExecutor {
    SlurmExecutor::with_cli(worker(runs), Box::new(fake.clone()))
        .batch_name("b1")
        .unwrap()
        .poll_interval(Duration::ZERO)
}

#[test]
fn sbatch_arguments_and_script() {
    let w = worker(Path::new("/shared/runs"));
    let mut j = job("0123456789abcdef", &[]);
    j.resources = Resources {
        cpus: Some(4),
        mem: Some("8G".into()),
        gres: Some("gpu:1".into()),
        partition: Some("gpu".into()),
        time: Some("01:00:00".into()),
        extra: vec!["--qos=low".into()],
    };
    let (args, script) = sbatch_command(&w, &j, &["7", "9"]);
    assert_eq!(
        args,
        [
            "--parsable",
            "--kill-on-invalid-dep=yes",
            "--no-requeue",
            "--job-name=ecic-evaluate-0123456789ab",
            "--output=/shared/runs/logs/0123456789abcdef.log",
            "--dependency=afterok:7:9",
            "--cpus-per-task=4",
            "--mem=8G",
            "--gres=gpu:1",
            "--partition=gpu",
            "--time=01:00:00",
            "--qos=low",
        ]
    );
    assert!(script.starts_with("#!/bin/sh\n"));
    assert!(script.contains("export RAYON_NUM_THREADS=2\n"));
    assert!(script.contains(
        "exec '/opt/ecic it'\\''s/ecic' run-stage --runs '/shared/runs' '0123456789abcdef'\n"
    ));
}

#[test]
fn chain_with_a_failure_skips_the_rest_and_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path();
    let fake = Fake::default();
    let mut ex = executor(runs, &fake);
    let record = ex
        .submit(&[job("a", &[]), job("b", &["a"]), job("c", &["b"])])
        .unwrap();
    let ids: Vec<&str> = record.jobs.iter().map(|j| j.job_id.as_str()).collect();
    assert_eq!(ids, ["100", "101", "102"]);
    let sbatch_args: Vec<Vec<String>> = fake
        .calls
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.0 == "sbatch")
        .map(|c| c.1.clone())
        .collect();
    assert!(!sbatch_args[0].iter().any(|a| a.starts_with("--dependency")));
    assert!(sbatch_args[2].contains(&"--dependency=afterok:101".to_string()));
    assert_eq!(SlurmExecutor::batches(runs).unwrap(), vec![record]);

    publish(runs, "a");
    fail_marker(runs, "b", "loss is nan at step 3");
    {
        let mut q = fake.queue.lock().unwrap();
        q.insert("100".into(), "COMPLETED|None|n1|0:05".into());
        q.insert("101".into(), "FAILED|NonZeroExitCode|n2|0:01".into());
        q.insert(
            "102".into(),
            "CANCELLED|DependencyNeverSatisfied||0:00".into(),
        );
    }
    let mut events = Vec::new();
    assert_eq!(
        ex.follow(true, &mut |e| events.push(e)).unwrap(),
        FollowEnd::Finished
    );
    let out = outcomes(&events);
    assert_eq!(out["a"], Outcome::Done);
    assert!(matches!(&out["b"], Outcome::Failed(m) if m.starts_with("loss is nan at step 3")));
    assert_eq!(
        out["c"],
        Outcome::Skipped {
            because_of: "b".into()
        }
    );
    let started: Vec<(&str, Option<&str>)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Started { key, host, .. } => Some((key.as_str(), host.as_deref())),
            _ => None,
        })
        .collect();
    assert_eq!(started, [("a", Some("n1")), ("b", Some("n2"))]);
    let wall = events.iter().find_map(|e| match e {
        Event::Finished { key, wall, .. } if key == "a" => Some(*wall),
        _ => None,
    });
    assert_eq!(wall, Some(Duration::from_secs(5)));
}

#[test]
fn markers_win_over_slurm_state() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path();
    let fake = Fake::default();
    let mut ex = executor(runs, &fake);
    ex.submit(&[
        job("ok0", &[]),
        job("nomanifest", &[]),
        job("failedbutpublished", &[]),
    ])
    .unwrap();
    publish(runs, "failedbutpublished");
    {
        let mut q = fake.queue.lock().unwrap();
        q.insert("100".into(), "RUNNING|None|n1|0:01".into());
        q.insert("101".into(), "COMPLETED|None|n1|0:02".into());
        q.insert("102".into(), "FAILED|NonZeroExitCode|n1|0:03".into());
    }
    // First poll: only the running job is reported started; the job that
    // exited 0 without a manifest is given time for the file to show up.
    let mut events = Vec::new();
    let mut tracker = ex.tracker.take().unwrap();
    tracker
        .step(&mut fake.clone(), &mut |e| events.push(e))
        .unwrap();
    assert_eq!(outcomes(&events)["failedbutpublished"], Outcome::Done);
    assert!(!outcomes(&events).contains_key("nomanifest"));
    ex.tracker = Some(tracker);
    // The running job vanishes from Slurm (purged) after publishing.
    publish(runs, "ok0");
    fake.queue.lock().unwrap().remove("100");
    ex.follow(true, &mut |e| events.push(e)).unwrap();
    let out = outcomes(&events);
    assert_eq!(out["ok0"], Outcome::Done);
    assert!(
        matches!(&out["nomanifest"], Outcome::Failed(m) if m.contains("no manifest")),
        "{out:?}"
    );
}

#[test]
fn stop_after_first_failure_cancels_unstarted_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path();
    let fake = Fake::default();
    let mut ex = executor(runs, &fake);
    ex.submit(&[job("x", &[]), job("y", &[])]).unwrap();
    {
        let mut q = fake.queue.lock().unwrap();
        q.insert("100".into(), "FAILED|NonZeroExitCode|n1|0:01".into());
        q.insert("101".into(), "PENDING|Resources||0:00".into());
    }
    let mut events = Vec::new();
    let mut tracker = ex.tracker.take().unwrap();
    tracker
        .step(&mut fake.clone(), &mut |e| events.push(e))
        .unwrap();
    ex.tracker = Some(tracker);
    // What the scancel will have done by the next poll.
    let fake2 = fake.clone();
    let mut seen_cancel = false;
    let mut events2 = Vec::new();
    {
        fake2
            .queue
            .lock()
            .unwrap()
            .insert("101".into(), "CANCELLED|Resources||0:00".into());
    }
    ex.follow(false, &mut |e| events2.push(e)).unwrap();
    for c in fake.calls.lock().unwrap().iter() {
        if c.0 == "scancel" {
            assert_eq!(c.1, ["--state=PENDING", "101"]);
            seen_cancel = true;
        }
    }
    assert!(seen_cancel);
    assert!(
        matches!(&outcomes(&events)["x"], Outcome::Failed(m) if m.contains("exit") || m.contains("FAILED"))
    );
    assert_eq!(
        outcomes(&events2)["y"],
        Outcome::Skipped {
            because_of: "x".into()
        }
    );
}

#[test]
fn attach_follows_a_recorded_batch() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path();
    let fake = Fake::default();
    executor(runs, &fake)
        .submit(&[job("p", &[]), job("q", &["p"])])
        .unwrap();
    publish(runs, "p");
    publish(runs, "q");
    // Both purged from Slurm long ago: the manifests alone say they are done.
    let mut ex = SlurmExecutor::attach_with_cli(worker(runs), "b1", Box::new(fake.clone()))
        .unwrap()
        .poll_interval(Duration::ZERO);
    let mut events = Vec::new();
    ex.follow(true, &mut |e| events.push(e)).unwrap();
    let out = outcomes(&events);
    assert_eq!(
        (out["p"].clone(), out["q"].clone()),
        (Outcome::Done, Outcome::Done)
    );
    assert!(SlurmExecutor::attach(worker(runs), "nope").is_err());
    assert!(SlurmExecutor::attach(worker(runs), "../x").is_err());
}

#[test]
fn batch_names_become_safe_file_names() {
    let w = || worker(Path::new("/r"));
    let name = |n: &str| {
        SlurmExecutor::new(w())
            .batch_name(n)
            .map(|e| e.batch().to_string())
    };
    assert_eq!(name("ablation v2/β").unwrap(), "ablation_v2__");
    assert_eq!(name("../x").unwrap(), "_._x");
    assert_eq!(name("smoke").unwrap(), "smoke");
    assert!(name("").is_err());
}
