//! Sweep history: a name run again with another spec adds a revision; status,
//! report and the store show every revision; gc keeps what any revision
//! references unless told `--keep-last N`, and never runs beside a sweep.

use std::path::Path;

use assert_cmd::Command;

fn ecic() -> Command {
    let mut c = Command::cargo_bin("ecic").unwrap();
    c.env("NO_COLOR", "1");
    c
}

/// Baselines only: no training, seconds to run.
const BASELINES: &str = r#"
name = "hist"
seeds = [0]
[data]
synth = { train = 24, valid = 8, test = 4, align = 8 }
[grid]
backbone = ["nn", "mfc"]
[stages.preprocess]
augment_copies = 0
[stages.evaluate]
predict_test = false
"#;

fn run(args: &[&str], runs: &Path) -> std::process::Output {
    ecic().args(args).arg("--runs").arg(runs).output().unwrap()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn cells(runs: &Path, view: &str) -> Vec<String> {
    let conn = rusqlite::Connection::open(runs.join("ecic.sqlite")).unwrap();
    let sql = format!(
        "SELECT DISTINCT {} FROM {view} WHERE metric = 'cider_d' AND split = 'valid' ORDER BY 1",
        if view == "results_all" {
            "sweep || '@' || revision || ' ' || cell"
        } else {
            "sweep || ' ' || cell"
        }
    );
    let mut st = conn.prepare(&sql).unwrap();
    st.query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn a_rerun_with_another_spec_adds_a_revision_and_gc_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("hist.toml");
    std::fs::write(&spec, BASELINES).unwrap();
    let runs = dir.path().join("runs");
    let spec_s = spec.to_str().unwrap();

    let out = run(&["sweep", spec_s, "--no-report"], &runs);
    assert!(out.status.success(), "{}", text(&out));
    // The same spec again continues its revision (a resume or a repeat).
    let out = run(&["sweep", spec_s, "--no-report"], &runs);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(cells(&runs, "results"), ["hist mfc-s0", "hist nn-s0"]);

    // Another grid: revision 2. The mfc cell of revision 1 is still recorded.
    let out = run(
        &[
            "sweep",
            spec_s,
            "--no-report",
            "--set",
            "grid.backbone=[\"nn\"]",
        ],
        &runs,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(cells(&runs, "results"), ["hist nn-s0"]);
    assert_eq!(
        cells(&runs, "results_all"),
        ["hist@1 mfc-s0", "hist@1 nn-s0", "hist@2 nn-s0"]
    );
    let out = run(&["status"], &runs);
    let status = text(&out);
    assert!(out.status.success(), "{status}");
    assert!(
        status.contains("hist@1") && status.contains("hist@2"),
        "{status}"
    );

    // Each revision's report, from the store alone.
    for (target, has_mfc) in [("hist@1", true), ("hist", false)] {
        let out_dir = dir.path().join(format!("report-{target}"));
        let out = ecic()
            .args(["report", target, "--runs"])
            .arg(&runs)
            .arg("--out")
            .arg(&out_dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let html = std::fs::read_to_string(out_dir.join("index.html")).unwrap();
        assert_eq!(html.contains("mfc-s0"), has_mfc, "{target}");
    }
    let out = ecic()
        .args(["report", "hist@7", "--runs"])
        .arg(&runs)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    // gc keeps revision 1's entries; --keep-last 1 lets the mfc evaluate go.
    let out = run(&["gc", "--dry-run"], &runs);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("0 entries to remove"), "{}", text(&out));
    let out = run(&["gc", "--dry-run", "--keep-last", "1"], &runs);
    assert!(text(&out).contains("1 entry to remove"), "{}", text(&out));

    // Not while a sweep holds the runs directory.
    let cache = ecic::cache::Cache::open(&runs).unwrap();
    let held = cache.root_lock(false).unwrap();
    let out = run(&["gc"], &runs);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("in use by a running sweep"),
        "{}",
        text(&out)
    );
    drop(held);
    let out = run(&["gc", "--keep-last", "1"], &runs);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("1 entry removed"), "{}", text(&out));
}

#[test]
fn a_store_of_the_first_schema_migrates_in_place_keeping_its_sweeps() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    std::fs::create_dir_all(&runs).unwrap();
    // A store as the first schema left it, with one sweep and its cell.
    let conn = rusqlite::Connection::open(runs.join("ecic.sqlite")).unwrap();
    let first = include_str!("fixtures/store_v1.sql");
    conn.execute_batch(first).unwrap();
    drop(conn);
    let out = run(&["status"], &runs);
    assert!(out.status.success(), "{}", text(&out));
    let conn = rusqlite::Connection::open(runs.join("ecic.sqlite")).unwrap();
    let v: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, 2);
    let (name, rev, cells): (String, i64, i64) = conn
        .query_row(
            "SELECT name, revision, (SELECT COUNT(*) FROM cells) FROM sweeps",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((name.as_str(), rev, cells), ("old", 1, 1));
    let n: i64 = conn
        .query_row("SELECT COUNT(*) FROM results", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
}
