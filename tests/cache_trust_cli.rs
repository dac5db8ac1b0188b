//! Trusting the cache through the `ecic` binary, as a hostile disk would test
//! it: a flipped byte in trained weights or a preprocessed shard, a truncated
//! weights file, an edited metrics.json with the store deleted. Each is found,
//! moved aside and computed again, and the numbers are those of a clean run.
//! `ecic verify` reports and quarantines the same damage.

use std::path::{Path, PathBuf};

use assert_cmd::Command;

fn ecic() -> Command {
    let mut c = Command::cargo_bin("ecic").unwrap();
    c.env("NO_COLOR", "1");
    c
}

const TINY: &str = r#"
name = "tiny"
seeds = [0]
[data]
synth = { train = 24, valid = 8, test = 4, align = 24, foundation = 16 }
[grid]
backbone = ["llava", "nn"]
peft = ["lora"]
fusion = ["early"]
[stages.preprocess]
augment_copies = 0
[stages.pretrain_vision]
steps = 3
batch_size = 8
[stages.pretrain_lm]
steps = 3
batch_size = 8
[stages.pretrain_align]
steps = 4
batch_size = 4
unfreeze = ["vision", "lm"]
[stages.domain_adapt]
steps = 8
batch_size = 4
ckpt_every = 4
[stages.cider_optimize]
steps = 2
batch_size = 2
samples = 2
[stages.evaluate]
predict_test = false
"#;

const BEAM: [&str; 4] = [
    "--set",
    "stages.evaluate.method=\"beam\"",
    "--set",
    "stages.evaluate.beam_width=2",
];

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn stdout_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn sweep(spec: &Path, runs: &Path, extra: &[&str]) -> std::process::Output {
    ecic()
        .arg("sweep")
        .arg(spec)
        .arg("--runs")
        .arg(runs)
        .arg("--no-report")
        .args(extra)
        .output()
        .unwrap()
}

/// (cell, metric, value bits) of the evaluate stages on valid, latest revision.
fn results(runs: &Path) -> Vec<(String, String, u64)> {
    let conn = rusqlite::Connection::open(runs.join("ecic.sqlite")).unwrap();
    let mut st = conn
        .prepare(
            "SELECT cell, metric, value FROM results WHERE stage = 'evaluate' AND split = 'valid'
             ORDER BY cell, metric",
        )
        .unwrap();
    st.query_map([], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get::<_, f64>(2)?.to_bits()))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// The entry directory of the (first) stage of `kind` whose label contains `label`.
fn entry_of(runs: &Path, kind: &str, label: &str) -> PathBuf {
    for e in std::fs::read_dir(runs.join("objects-v1"))
        .unwrap()
        .flatten()
    {
        let Ok(text) = std::fs::read(e.path().join("manifest.json")) else {
            continue;
        };
        let m: serde_json::Value = serde_json::from_slice(&text).unwrap();
        if m["kind"] == kind && m["label"].as_str().unwrap().contains(label) {
            return e.path();
        }
    }
    panic!("no {kind} entry labelled {label} in {}", runs.display());
}

/// How many times each stage kind was computed, from the logs.
fn computed(runs: &Path, kind: &str) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(runs.join("logs")).unwrap().flatten() {
        n += std::fs::read_to_string(e.path())
            .unwrap_or_default()
            .matches(&format!("computing {kind} "))
            .count();
    }
    n
}

fn copy_dir(from: &Path, to: &Path) {
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

fn flip_bytes(path: &Path, at: usize, n: usize) {
    let mut b = std::fs::read(path).unwrap();
    assert!(b.len() >= at + n, "{} is {} bytes", path.display(), b.len());
    for x in &mut b[at..at + n] {
        *x ^= 0x5a;
    }
    std::fs::write(path, b).unwrap();
}

#[test]
fn damaged_entries_are_recomputed_and_give_the_clean_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("spec.toml");
    std::fs::write(&spec, TINY).unwrap();
    let base = dir.path().join("base");
    let out = sweep(&spec, &base, &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let clean = results(&base);

    // `ecic verify` on a sound runs directory.
    let out = ecic()
        .args(["verify", "--runs"])
        .arg(&base)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        stdout_of(&out).contains("9 entries ok, 0 damaged"),
        "{}",
        stdout_of(&out)
    );

    // The clean numbers of the beam re-run, from an untouched copy.
    let reference = dir.path().join("reference");
    copy_dir(&base, &reference);
    let out = sweep(&spec, &reference, &BEAM);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let clean_beam = results(&reference);
    assert_ne!(clean_beam, clean, "beam should score differently");

    // 1. One flipped byte in the trained weights the beam re-run loads.
    let runs = dir.path().join("weights");
    copy_dir(&base, &runs);
    let weights = entry_of(&runs, "cider-optimize", "llava").join("weights.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len() as usize;
    flip_bytes(&weights, len - 100, 1);
    let out = sweep(&spec, &runs, &BEAM);
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("is damaged (weights.safetensors: content differs"),
        "{err}"
    );
    assert!(err.contains("quarantine"), "{err}");
    assert_eq!(computed(&runs, "cider-optimize"), 2, "{err}");
    assert_eq!(results(&runs), clean_beam);
    // And the store keeps a record of it.
    let conn = rusqlite::Connection::open(runs.join("ecic.sqlite")).unwrap();
    let detail: String = conn
        .query_row(
            "SELECT detail FROM events WHERE what = 'quarantined'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(detail.contains("weights.safetensors"), "{detail}");

    // 2. 200 bytes of a preprocessed valid shard.
    let runs = dir.path().join("shard");
    copy_dir(&base, &runs);
    let shard = entry_of(&runs, "preprocess", "").join("valid/shard-00000.safetensors");
    flip_bytes(&shard, 4000, 200);
    let out = sweep(&spec, &runs, &BEAM);
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("valid/shard-00000.safetensors"), "{err}");
    // The IC preprocess again, beside the base's two (IC and foundation corpus).
    assert_eq!(computed(&runs, "preprocess"), 3, "{err}");
    assert_eq!(results(&runs), clean_beam);

    // 3. A truncated weights file is damage too (was: the same load error on every re-run).
    let runs = dir.path().join("truncated");
    copy_dir(&base, &runs);
    let weights = entry_of(&runs, "domain-adapt", "llava").join("weights.safetensors");
    std::fs::File::options()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(100)
        .unwrap();
    let out = sweep(&spec, &runs, &BEAM);
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("weights.safetensors: 100 bytes"), "{err}");
    assert_eq!(results(&runs), clean_beam);

    // 4. An edited metrics.json with the store deleted: never imported as a result.
    let runs = dir.path().join("metrics");
    copy_dir(&base, &runs);
    let metrics = entry_of(&runs, "evaluate", "llava").join("metrics.json");
    let text = std::fs::read_to_string(&metrics).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cider = v["valid"]["cider_d"].as_f64().unwrap();
    std::fs::write(
        &metrics,
        text.replace(&cider.to_string(), &(cider + 5.0).to_string()),
    )
    .unwrap();
    std::fs::remove_file(runs.join("ecic.sqlite")).unwrap();
    let out = sweep(&spec, &runs, &[]);
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("metrics.json: content differs"), "{err}");
    assert_eq!(results(&runs), clean);

    // 5. `ecic verify` finds damage, names entry and file, exits 1; --quarantine
    //    moves it aside, and the next sweep computes it again.
    let runs = dir.path().join("verify");
    copy_dir(&base, &runs);
    let entry = entry_of(&runs, "evaluate", "nn");
    std::fs::remove_file(entry.join("metrics.json")).unwrap();
    let out = ecic()
        .args(["verify", "--runs"])
        .arg(&runs)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stdout_of(&out));
    let text = stdout_of(&out);
    assert!(
        text.contains(&format!("{}: metrics.json: missing", entry.display())),
        "{text}"
    );
    assert!(text.contains("8 entries ok, 1 damaged"), "{text}");
    let out = ecic()
        .args(["verify", "--quarantine", "--runs"])
        .arg(&runs)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stdout_of(&out));
    assert!(stdout_of(&out).contains("moved to"), "{}", stdout_of(&out));
    assert!(!entry.exists());
    let out = sweep(&spec, &runs, &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("1 stages run, 8 reused"),
        "{}",
        stderr_of(&out)
    );
    assert_eq!(results(&runs), clean);
}
