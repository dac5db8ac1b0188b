//! `experiments/smoke.toml` through a real Slurm gives the same results as a
//! local run: every row of the `results` view agrees, except throughput
//! figures (`*_per_s`), which measure the machine, not the stage.
//!
//! Runs only with `ECIC_SLURM=1` (after `scripts/slurm-local.sh start`); then a
//! missing cluster is a failure. Takes about a minute on 2 cores (two sweeps).

use std::path::Path;
use std::process::Command;

type Row = (
    String,
    String,
    String,
    String,
    i64,
    String,
    String,
    String,
    f64,
);

fn slurm_wanted() -> bool {
    if std::env::var("ECIC_SLURM").map_or(true, |v| v != "1") {
        eprintln!(
            "slurm smoke test not run: set ECIC_SLURM=1 after `scripts/slurm-local.sh start`"
        );
        return false;
    }
    let ok = Command::new("sinfo")
        .arg("-h")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "ECIC_SLURM=1 but no Slurm cluster answers `sinfo`");
    true
}

fn sweep(runs: &Path, executor: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_ecic"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "sweep",
            "experiments/smoke.toml",
            "--no-report",
            "--executor",
            executor,
            "--runs",
        ])
        .arg(runs)
        .output()
        .expect("running ecic");
    assert!(
        out.status.success(),
        "ecic sweep --executor {executor} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn results(runs: &Path) -> Vec<Row> {
    let db = rusqlite::Connection::open(runs.join("ecic.sqlite")).expect("opening the store");
    let mut stmt = db
        .prepare(
            "SELECT cell, backbone, peft, fusion, seed, stage, split, metric, value FROM results
             WHERE metric NOT LIKE '%\\_per\\_s' ESCAPE '\\'
             ORDER BY cell, stage, split, metric",
        )
        .expect("querying results");
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
                r.get(8)?,
            ))
        })
        .expect("reading results");
    rows.collect::<Result<Vec<Row>, _>>()
        .expect("reading a row")
}

#[test]
fn smoke_sweep_on_slurm_equals_local() {
    if !slurm_wanted() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let (local, slurm) = (dir.path().join("local"), dir.path().join("slurm"));
    sweep(&local, "local");
    sweep(&slurm, "slurm");
    let (a, b) = (results(&local), results(&slurm));
    assert!(
        a.iter().any(|r| r.7 == "cider_d"),
        "no CIDEr-D rows in the local run: {a:?}"
    );
    assert_eq!(a.len(), b.len(), "row counts differ");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x, y, "local and slurm results differ");
    }
    // The Slurm run really went through Slurm: its batch is recorded.
    let batches = ecic::exec::slurm::SlurmExecutor::batches(&slurm).expect("batch records");
    assert_eq!(batches.len(), 1);
    assert!(!batches[0].jobs.is_empty());
}
