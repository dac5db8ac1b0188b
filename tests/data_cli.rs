//! `ecic data synth` then `ecic data inspect`, as a user runs them.

use assert_cmd::Command;

#[test]
fn synth_then_inspect() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    let out = Command::cargo_bin("ecic")
        .unwrap()
        .args(["data", "synth", "--out"])
        .arg(&d)
        .args([
            "--seed", "3", "--train", "12", "--valid", "4", "--test", "4", "--align", "6",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::cargo_bin("ecic")
        .unwrap()
        .args(["data", "inspect"])
        .arg(&d)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "IC_train",
        "IC_valid",
        "IC_test",
        "ALIGN_train",
        "128x128: 12",
        "bad records: 0",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in\n{stdout}");
    }
    let row = stdout.lines().find(|l| l.starts_with("IC_train")).unwrap();
    assert_eq!(row.split_whitespace().nth(1), Some("12"), "{row}");

    // A broken record: exit 2, and the report names file and line.
    let p = d.join("IC_test.jsonl");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(
        &p,
        format!("{text}{{\"image_id\": \"nope\", \"text\": [\"x\"]}}\n"),
    )
    .unwrap();
    let out = Command::cargo_bin("ecic")
        .unwrap()
        .args(["data", "inspect"])
        .arg(&d)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("IC_test.jsonl:5: image_id nope is not in the tsv"),
        "{stdout}"
    );

    let out = Command::cargo_bin("ecic")
        .unwrap()
        .args(["data", "inspect"])
        .arg(tmp.path().join("nowhere"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
