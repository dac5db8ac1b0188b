//! `[search.asha]` through the `ecic` binary, on a tiny search (4 trials,
//! rungs of 2 and 4 domain-adapt steps, eta 2): bad settings are refused
//! before anything runs; the plan shows the rungs; a search promotes the top
//! half of its first rung, records the rest as stopped, and runs again fully
//! cached; a promoted trial's top rung (resumed from its first rung's
//! checkpoint) equals the same trial trained uninterrupted; a search whose
//! top rungs were lost resumes them and nothing else; a search killed (kill -9,
//! sweep and stage processes) once its first promotion ran finishes with the
//! uninterrupted search's promotions and numbers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use assert_cmd::Command;

mod common;

fn ecic() -> Command {
    let mut c = Command::cargo_bin("ecic").unwrap();
    c.env("NO_COLOR", "1");
    c
}

/// The shared part: tiny data and stages, 4 sampled trials.
const BASE: &str = r#"seeds = [0]
[data]
synth = { train = 16, valid = 4, test = 2, align = 8, foundation = 8 }
[grid]
backbone = ["llava"]
peft = ["lora"]
fusion = ["early"]
[stages.pretrain_vision]
steps = 2
batch_size = 4
[stages.pretrain_lm]
steps = 2
batch_size = 4
[stages.pretrain_align]
steps = 2
batch_size = 4
[stages.domain_adapt]
batch_size = 4
warmup = 1
[stages.cider_optimize]
enabled = false
[stages.evaluate]
method = "greedy"
predict_test = false
[search]
method = "sobol"
trials = 4
"stages.domain_adapt.lr" = { loguniform = [1e-3, 3e-2] }
"peft.lora.r" = { int = [2, 8] }
"#;

const ASHA: &str = r#"[search.asha]
metric = "cider_d"
min_steps = 2
max_steps = 4
reduction_factor = 2
"#;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn sweep(spec: &Path, runs: &Path) -> String {
    let out = ecic()
        .arg("sweep")
        .arg(spec)
        .arg("--runs")
        .arg(runs)
        .args(["--jobs", "2", "--no-report"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    err
}

fn db(runs: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(runs.join("ecic.sqlite")).unwrap()
}

/// (what, cell, rung) of the search's events, in order.
fn events(runs: &Path) -> Vec<(String, String, i64)> {
    let conn = db(runs);
    let mut st = conn
        .prepare(
            "SELECT what, json_extract(detail, '$.cell'), json_extract(detail, '$.rung')
             FROM events WHERE what LIKE 'asha-%' ORDER BY id",
        )
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// The valid-split evaluate metrics of `cell` in sweep `sweep`.
fn valid_metrics(runs: &Path, sweep: &str, cell: &str) -> BTreeMap<String, f64> {
    let conn = db(runs);
    let mut st = conn
        .prepare(
            "SELECT metric, value FROM results
             WHERE sweep = ?1 AND cell = ?2 AND stage = 'evaluate' AND split = 'valid'",
        )
        .unwrap();
    st.query_map([sweep, cell], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn stage_key(runs: &Path, sweep: &str, cell: &str, kind: &str) -> String {
    db(runs)
        .query_row(
            "SELECT cs.key FROM cell_stages cs JOIN cells c ON c.id = cs.cell_id
             JOIN sweeps s ON s.id = c.sweep_id
             WHERE s.name = ?1 AND c.name = ?2 AND cs.kind = ?3",
            [sweep, cell, kind],
            |r| r.get(0),
        )
        .unwrap()
}

#[test]
fn bad_asha_settings_exit_2_naming_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    // The name, BASE's 29 lines, then [search.asha] on line 31.
    let cases = [
        (
            "metric = \"cider_d\"\nmin_steps = 9\nmax_steps = 3\n",
            "spec.toml:33",
            "`search.asha.min_steps`: min_steps (9) is above max_steps (3)",
        ),
        (
            "metric = \"cider_d\"\nmin_steps = 1\nmax_steps = 3\neta = 3\n",
            "spec.toml:35",
            "`search.asha.eta`: unknown key",
        ),
        (
            "metric = \"cider_d\"\nmin_steps = 1\nmax_steps = 3\nreduction_factor = 1\n",
            "spec.toml:35",
            "`search.asha.reduction_factor`: must be a whole number of at least 2",
        ),
        (
            "metric = \"cider_d\"\nstage = \"evaluate\"\nmin_steps = 1\nmax_steps = 3\n",
            "spec.toml:33",
            "`search.asha.stage`: cannot budget `evaluate`",
        ),
        (
            "metric = \"cider_d\"\nstage = \"cider_optimize\"\nmin_steps = 1\nmax_steps = 3\n",
            "spec.toml:33",
            "`search.asha.stage`: cider_optimize is budgeted but stages.cider_optimize.enabled is false",
        ),
    ];
    for (asha, at, msg) in cases {
        let text = format!("name = \"bad\"\n{BASE}[search.asha]\n{asha}");
        let p = write(dir.path(), "spec.toml", &text);
        for cmd in ["plan", "sweep"] {
            let out = ecic()
                .arg(cmd)
                .arg(&p)
                .arg("--runs")
                .arg(dir.path().join("runs"))
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{text}: {err}");
            assert!(
                err.contains(&format!("{at}:")) && err.contains(msg),
                "expected {at} / {msg} in: {err}"
            );
        }
    }
    assert!(!dir.path().join("runs/ecic.sqlite").exists());
}

#[test]
fn a_search_halves_resumes_its_rungs_and_replays() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let spec = write(
        dir.path(),
        "asha.toml",
        &format!("name = \"asha\"\n{BASE}{ASHA}"),
    );

    // The plan lists both rungs of every trial and the budget.
    let out = ecic()
        .arg("plan")
        .arg(&spec)
        .arg("--runs")
        .arg(&runs)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("successive halving: 4 trials, 2 rungs of 2 > 4 steps of domain-adapt"),
        "{table}"
    );
    assert!(table.contains("r0@2") && table.contains("r1@4"), "{table}");

    let err = sweep(&spec, &runs);
    // 4 results at rung 0: the best 2 are promoted (the first after two
    // results, the second or a third after four: asynchronous halving may
    // promote one more than the top half).
    let ev = events(&runs);
    let count = |what: &str, rung: i64| {
        ev.iter()
            .filter(|(w, _, r)| w == what && *r == rung)
            .count()
    };
    assert_eq!(count("asha-result", 0), 4, "{ev:?}");
    let promoted = count("asha-promoted", 1);
    assert!((2..=3).contains(&promoted), "{ev:?}");
    assert_eq!(count("asha-result", 1), promoted, "{ev:?}");
    assert_eq!(count("asha-stopped", 0), 4 - promoted, "{ev:?}");
    // A stopped trial's next rung is recorded stopped, not failed.
    let stopped: Vec<String> = {
        let conn = db(&runs);
        let mut st = conn
            .prepare("SELECT error FROM stages WHERE status = 'stopped'")
            .unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert_eq!(stopped.len(), 2 * (4 - promoted), "{stopped:?}");
    assert!(
        stopped.iter().all(|e| e == "stopped at rung 0 (2 steps)"),
        "{stopped:?}"
    );
    let failed: i64 = db(&runs)
        .query_row(
            "SELECT COUNT(*) FROM stages WHERE status = 'failed'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(failed, 0);
    assert!(err.contains("search: "), "{err}");
    // `ecic status` counts as run what ran: the stopped rung stages were never started.
    let status = ecic()
        .args(["status", "--runs"])
        .arg(&runs)
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    let row: Vec<String> = status
        .lines()
        .find(|l| l.contains(" asha "))
        .unwrap_or_else(|| panic!("{status}"))
        .split(['│', '┆'])
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect();
    let (stages, run): (usize, usize) = (row[5].parse().unwrap(), row[6].parse().unwrap());
    assert_eq!(stages - run, 2 * (4 - promoted), "{status}");
    assert!(
        err.contains(&format!("{run} stages run")),
        "{status}\n{err}"
    );

    // Run again: fully cached, the same decisions.
    let again = sweep(&spec, &runs);
    assert!(again.contains("0 stages run"), "{again}");
    let promoted_cells = |ev: &[(String, String, i64)]| -> Vec<String> {
        let mut v: Vec<String> = ev
            .iter()
            .filter(|(w, _, _)| w == "asha-promoted")
            .map(|(_, c, _)| c.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let first = promoted_cells(&ev);
    assert_eq!(promoted_cells(&events(&runs)), first);

    // A promoted trial's top rung equals the trial trained to max_steps in
    // one go: the same search without halving, domain-adapt at 4 steps.
    let full = write(
        dir.path(),
        "full.toml",
        &format!("name = \"full\"\n{BASE}").replace(
            "[stages.domain_adapt]\n",
            "[stages.domain_adapt]\nsteps = 4\n",
        ),
    );
    sweep(&full, &runs);
    for cell in &first {
        let a = valid_metrics(&runs, "asha", cell);
        let b = valid_metrics(&runs, "full", cell);
        assert!(a.contains_key("cider_d"), "{cell}: {a:?}");
        assert_eq!(a, b, "{cell}");
        let weights = |sweep: &str| {
            let key = stage_key(&runs, sweep, cell, "domain-adapt");
            std::fs::read(
                runs.join("objects-v1")
                    .join(key)
                    .join("weights.safetensors"),
            )
            .unwrap()
        };
        assert!(weights("asha") == weights("full"), "{cell}: weights differ");
    }

    // A kill while the top rungs ran: their entries are gone. The search
    // runs them again (the same promotions, replayed) and nothing else.
    let mut removed = 0;
    for cell in &first {
        for kind in ["domain-adapt", "evaluate"] {
            let key = stage_key(&runs, "asha", cell, kind);
            std::fs::remove_dir_all(runs.join("objects-v1").join(key)).unwrap();
            removed += 1;
        }
    }
    let resumed = sweep(&spec, &runs);
    assert!(
        resumed.contains(&format!("{removed} stages run")),
        "{resumed}"
    );
    assert_eq!(promoted_cells(&events(&runs)), first);
    for cell in &first {
        assert_eq!(
            valid_metrics(&runs, "asha", cell),
            valid_metrics(&runs, "full", cell)
        );
    }
}

/// Which cells were promoted, sorted.
fn promoted(runs: &Path) -> Vec<String> {
    let mut v: Vec<String> = events(runs)
        .into_iter()
        .filter(|(w, _, _)| w == "asha-promoted")
        .map(|(_, c, _)| c)
        .collect();
    v.sort();
    v.dedup();
    v
}

#[test]
fn a_killed_search_resumes_with_the_same_promotions() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write(
        dir.path(),
        "asha.toml",
        &format!("name = \"asha\"\n{BASE}{ASHA}"),
    );
    // The uninterrupted search.
    let whole = dir.path().join("whole");
    sweep(&spec, &whole);
    let want = promoted(&whole);
    assert!(!want.is_empty());

    // The same search, killed with everything it started as soon as a rung-1 stage has begun
    // (its log names the rung), so some rung results are recorded and some are not.
    let runs = dir.path().join("runs");
    let mut child = {
        use std::os::unix::process::CommandExt;
        let mut c = std::process::Command::new(assert_cmd::cargo::cargo_bin("ecic"));
        c.arg("sweep")
            .arg(&spec)
            .arg("--runs")
            .arg(&runs)
            .args(["--jobs", "1", "--no-report"])
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0);
        c.spawn().unwrap()
    };
    let rung1_started = loop {
        let seen = std::fs::read_dir(runs.join("logs"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| std::fs::read_to_string(e.path()).is_ok_and(|l| l.contains(" r1@4")));
        if seen {
            break true;
        }
        if child.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::yield_now();
    };
    assert!(
        rung1_started,
        "the search ended before a rung-1 stage began"
    );
    // SAFETY: signalling the process group this test started.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    common::kill_stages_of(&runs);
    let _ = child.wait();

    let err = sweep(&spec, &runs);
    assert!(err.contains("search: "), "{err}");
    assert_eq!(promoted(&runs), want);
    for cell in &want {
        let a = valid_metrics(&runs, "asha", cell);
        assert!(a.contains_key("cider_d"), "{cell}: {a:?}");
        assert_eq!(a, valid_metrics(&whole, "asha", cell), "{cell}");
    }
    // Finished: run again, nothing to do.
    assert!(sweep(&spec, &runs).contains("0 stages run"));
}

/// The same search through the local one-node Slurm cluster (`ECIC_SLURM=1`
/// after `scripts/slurm-local.sh start`; otherwise not run): promotions are
/// submitted as new jobs while the batch runs, and the results are the local
/// executor's.
#[test]
fn a_search_on_slurm_promotes_as_locally() {
    if std::env::var("ECIC_SLURM").map_or(true, |v| v != "1") {
        eprintln!(
            "slurm search test not run: set ECIC_SLURM=1 after `scripts/slurm-local.sh start`"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = write(
        dir.path(),
        "asha.toml",
        &format!("name = \"asha\"\n{BASE}{ASHA}"),
    );
    let (local, slurm) = (dir.path().join("local"), dir.path().join("slurm"));
    sweep(&spec, &local);
    let out = ecic()
        .arg("sweep")
        .arg(&spec)
        .arg("--runs")
        .arg(&slurm)
        .args(["--executor", "slurm", "--no-report"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Which trials a rung promotes depends on the order results arrive in,
    // which differs between executors; the rung results do not.
    let results = |runs: &Path| -> BTreeMap<(String, i64), f64> {
        let conn = db(runs);
        let mut st = conn
            .prepare(
                "SELECT json_extract(detail, '$.cell'), json_extract(detail, '$.rung'),
                        json_extract(detail, '$.value')
                 FROM events WHERE what = 'asha-result'",
            )
            .unwrap();
        st.query_map([], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let (a, b) = (results(&local), results(&slurm));
    assert_eq!(a.keys().filter(|(_, r)| *r == 0).count(), 4);
    assert_eq!(b.keys().filter(|(_, r)| *r == 0).count(), 4);
    for (k, v) in &b {
        if let Some(w) = a.get(k) {
            assert_eq!(v, w, "{k:?}");
        }
    }
    assert!(
        b.keys().any(|(_, r)| *r == 1),
        "slurm promoted nobody: {b:?}"
    );
    let jobs = std::fs::read_to_string(slurm.join("slurm/asha.json")).unwrap();
    assert!(
        jobs.contains("r1@4"),
        "the promotions were submitted: {jobs}"
    );
}
