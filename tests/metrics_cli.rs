//! `ecic eval` end to end: numbers equal to pycocoevalcap's (through the
//! fixture files), the output forms, and every kind of bad input as an exit-2
//! error naming the file, the line and the image id.

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use serde_json::Value;

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Dir {
        Dir(tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}")))
    }
    fn file(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let p = self.0.path().join(name);
        std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        p
    }
}

const REFS: &str = r#"{"image_id": "a1", "text": ["红色连衣裙", "红色的长裙"]}
{"image_id": "a2", "text": ["黑色皮鞋 男款", "男士皮鞋"]}
{"image_id": "a3", "text": ["白色衬衫"]}
"#;
const PRED: &str = r#"{"image_id": "a1", "text": "红色连衣裙"}
{"image_id": "a2", "text": "黑色男士皮鞋"}
{"image_id": "a3", "text": "白色T恤"}
"#;

fn eval(args: &[&dyn AsRef<std::ffi::OsStr>]) -> assert_cmd::assert::Assert {
    let mut cmd = Command::cargo_bin("ecic").unwrap_or_else(|e| panic!("ecic binary: {e}"));
    cmd.arg("eval");
    for a in args {
        cmd.arg(a);
    }
    cmd.assert()
}

fn stderr_of(a: &assert_cmd::assert::Assert) -> String {
    String::from_utf8_lossy(&a.get_output().stderr).into_owned()
}

fn stdout_json(a: &assert_cmd::assert::Assert) -> Value {
    serde_json::from_slice(&a.get_output().stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON: {e}"))
}

/// Runs with bad input: exit 2, and stderr holds every fragment.
fn rejects(pred: &Path, refs: &Path, fragments: &[&str]) {
    let a = eval(&[&"--pred", &pred, &"--refs", &refs]).code(2);
    let err = stderr_of(&a);
    for f in fragments {
        assert!(err.contains(f), "stderr lacks {f:?}:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn json_output_equals_pycocoevalcap_on_the_fixture() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/metrics/edge_char.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let fx: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
    let dir = Dir::new();
    let (mut refs, mut preds) = (String::new(), String::new());
    for im in fx["images"].as_array().into_iter().flatten() {
        refs += &format!(
            "{}\n",
            serde_json::json!({"image_id": im["image_id"], "text": im["refs"]})
        );
        preds += &format!(
            "{}\n",
            serde_json::json!({"image_id": im["image_id"], "text": im["pred"]})
        );
    }
    let (r, p) = (dir.file("refs.jsonl", refs), dir.file("pred.jsonl", preds));
    let a = eval(&[&"--pred", &p, &"--refs", &r, &"--json"]).success();
    let got = stdout_json(&a);
    for key in ["bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider_d"] {
        let (g, w) = (
            got[key].as_f64().unwrap_or(f64::NAN),
            fx["corpus"][key].as_f64().unwrap_or(f64::NAN),
        );
        assert!((g - w).abs() < 1e-9, "{key}: {g} vs pycocoevalcap {w}");
    }
    assert_eq!(got["images"], fx["corpus"]["images"]);
}

#[test]
fn table_shows_times_hundred_and_per_image_file_is_written() {
    let dir = Dir::new();
    let (r, p) = (dir.file("refs.jsonl", REFS), dir.file("pred.jsonl", PRED));
    let per = dir.0.path().join("per.jsonl");
    let a = eval(&[&"--pred", &p, &"--refs", &r, &"--per-image", &per]).success();
    let out = String::from_utf8_lossy(&a.get_output().stdout).into_owned();
    let json = stdout_json(&eval(&[&"--pred", &p, &"--refs", &r, &"--json"]).success());
    let cider = json["cider_d"].as_f64().unwrap_or(f64::NAN);
    assert!(
        out.contains("CIDEr-D") && out.contains(&format!("{:.2}", cider * 100.0)),
        "{out}"
    );
    let lines = std::fs::read_to_string(&per).unwrap_or_default();
    let records: Vec<Value> = lines
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(records.len(), 3);
    assert_eq!(records[2]["image_id"], "a3");
    assert!(records[0]["counts"]["correct"].is_array());
}

#[test]
fn compare_and_bootstrap_appear_in_json() {
    let dir = Dir::new();
    let (r, p) = (dir.file("refs.jsonl", REFS), dir.file("pred.jsonl", PRED));
    let b = dir.file("b.jsonl", "{\"image_id\":\"a3\",\"text\":\"蓝色\"}\n{\"image_id\":\"a1\",\"text\":\"裙子\"}\n{\"image_id\":\"a2\",\"text\":\"皮鞋\"}\n");
    let args: [&dyn AsRef<std::ffi::OsStr>; 10] = [
        &"--pred",
        &p,
        &"--refs",
        &r,
        &"--compare",
        &b,
        &"--bootstrap",
        &"200",
        &"--seed",
        &"3",
    ];
    let mut with_json: Vec<&dyn AsRef<std::ffi::OsStr>> = args.to_vec();
    with_json.push(&"--json");
    let first = stdout_json(&eval(&with_json).success());
    let again = stdout_json(&eval(&with_json).success());
    assert_eq!(first, again, "seeded bootstrap must repeat");
    let paired = &first["compare"]["paired"]["cider_d"];
    assert!(paired["delta"].as_f64().unwrap_or(0.0) > 0.0, "{first}");
    assert!(paired["p_value"].as_f64().is_some());
    assert!(first["intervals"]["bleu4"]["low"].as_f64().is_some());
    let table = eval(&args).success();
    assert!(String::from_utf8_lossy(&table.get_output().stdout).contains("A − B"));
}

#[test]
fn missing_prediction_is_exit_2_unless_allowed() {
    let dir = Dir::new();
    let r = dir.file("refs.jsonl", REFS);
    let p = dir.file(
        "pred.jsonl",
        PRED.lines().take(2).collect::<Vec<_>>().join("\n"),
    );
    rejects(&p, &r, &["refs.jsonl:3:", "image a3", "no prediction"]);
    let a = eval(&[&"--pred", &p, &"--refs", &r, &"--json", &"--allow-missing"]).success();
    let v = stdout_json(&a);
    assert_eq!(v["missing"], 1);
    assert_eq!(v["images"], 3);
}

#[test]
fn prediction_for_unknown_image_is_exit_2() {
    let dir = Dir::new();
    let r = dir.file("refs.jsonl", REFS);
    let p = dir.file(
        "pred.jsonl",
        format!("{PRED}{{\"image_id\": \"zz\", \"text\": \"x\"}}\n"),
    );
    rejects(&p, &r, &["pred.jsonl:4:", "image zz", "not in"]);
}

#[test]
fn duplicate_ids_are_exit_2_in_either_file() {
    let dir = Dir::new();
    let r = dir.file(
        "refs.jsonl",
        format!("{REFS}{{\"image_id\": \"a2\", \"text\": [\"x\"]}}\n"),
    );
    let p = dir.file("pred.jsonl", PRED);
    rejects(
        &p,
        &r,
        &["refs.jsonl:4:", "image a2", "duplicate", "line 2"],
    );
    let r = dir.file("refs.jsonl", REFS);
    let p = dir.file(
        "pred.jsonl",
        format!("{PRED}{{\"image_id\": \"a1\", \"text\": \"x\"}}\n"),
    );
    rejects(
        &p,
        &r,
        &["pred.jsonl:4:", "image a1", "duplicate", "line 1"],
    );
}

#[test]
fn malformed_json_line_is_exit_2() {
    let dir = Dir::new();
    let r = dir.file("refs.jsonl", REFS);
    let p = dir.file(
        "pred.jsonl",
        PRED.replace(
            r#"{"image_id": "a2", "text": "黑色男士皮鞋"}"#,
            r#"{"image_id": "a2", "text": "#,
        ),
    );
    rejects(&p, &r, &["pred.jsonl:2:", "malformed JSON"]);
}

#[test]
fn non_string_caption_is_exit_2() {
    let dir = Dir::new();
    let r = dir.file("refs.jsonl", REFS);
    let p = dir.file(
        "pred.jsonl",
        PRED.replace(r#""text": "白色T恤""#, r#""text": ["白色T恤"]"#),
    );
    rejects(&p, &r, &["pred.jsonl:3:", "image a3", "not a string"]);
    let r = dir.file(
        "refs.jsonl",
        REFS.replace(r#"["白色衬衫"]"#, r#"["白色衬衫", 7]"#),
    );
    let p = dir.file("pred.jsonl", PRED);
    rejects(&p, &r, &["refs.jsonl:3:", "image a3", "text[1]"]);
    let p = dir.file(
        "pred.jsonl",
        PRED.replace(r#""image_id": "a1""#, r#""image_id": 1"#),
    );
    // both files' problems in one report
    rejects(
        &p,
        &r,
        &["pred.jsonl:1:", "image 1", "image_id", "refs.jsonl:3:"],
    );
}

#[test]
fn empty_reference_list_is_exit_2() {
    let dir = Dir::new();
    let r = dir.file("refs.jsonl", REFS.replace(r#"["白色衬衫"]"#, "[]"));
    let p = dir.file("pred.jsonl", PRED);
    rejects(
        &p,
        &r,
        &["refs.jsonl:3:", "image a3", "empty reference list"],
    );
}

#[test]
fn invalid_utf8_is_exit_2_and_names_the_id() {
    let dir = Dir::new();
    let r = dir.file("refs.jsonl", REFS);
    let mut bytes = PRED.as_bytes().to_vec();
    // corrupt the caption of the second line: a lone continuation byte
    let at = PRED.find("黑色").unwrap_or(0);
    bytes[at] = 0x80;
    let p = dir.file("pred.jsonl", bytes);
    rejects(&p, &r, &["pred.jsonl:2:", "image a2", "invalid UTF-8"]);
}

#[test]
fn every_bad_line_is_reported_at_once() {
    let dir = Dir::new();
    let r = dir.file("refs.jsonl", REFS);
    let p = dir.file(
        "pred.jsonl",
        "{\"image_id\": \"a1\"}\nnot json\n{\"image_id\": \"a3\", \"text\": 3}\n",
    );
    rejects(
        &p,
        &r,
        &[
            "pred.jsonl:1:",
            "missing field `text`",
            "pred.jsonl:2:",
            "pred.jsonl:3:",
        ],
    );
}

#[test]
fn missing_file_and_bad_tokenize_are_exit_2() {
    let dir = Dir::new();
    let r = dir.file("refs.jsonl", REFS);
    let nowhere = dir.0.path().join("nowhere.jsonl");
    rejects(&nowhere, &r, &["nowhere.jsonl"]);
    let p = dir.file("pred.jsonl", PRED);
    eval(&[&"--pred", &p, &"--refs", &r, &"--tokenize", &"words"]).code(2);
}
