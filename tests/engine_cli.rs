//! The engine through the `ecic` binary: bad specs, caching, re-runs, a kill -9
//! in the middle of a training stage, determinism, and two concurrent sweeps.

use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;
use std::time::{Duration, Instant};

use assert_cmd::Command;

mod common;

fn ecic() -> Command {
    let mut c = Command::cargo_bin("ecic").unwrap();
    c.env("NO_COLOR", "1");
    c
}

const TINY: &str = r#"
name = "tiny"
seeds = [0]
[data]
synth = { train = 24, valid = 8, test = 4, align = 24, foundation = 24 }
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
[stages.domain_adapt]
steps = 40
batch_size = 4
ckpt_every = 4
[stages.cider_optimize]
steps = 2
batch_size = 2
samples = 2
[stages.evaluate]
predict_test = false
"#;

fn spec(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("spec.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// (cell, metric, value) rows of the evaluate stage, from the results view.
fn results(runs: &Path) -> Vec<(String, String, f64)> {
    let conn = rusqlite::Connection::open(runs.join("ecic.sqlite")).unwrap();
    let mut st = conn
        .prepare("SELECT cell, metric, value FROM results WHERE stage = 'evaluate' AND split = 'valid' ORDER BY cell, metric")
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn bad_specs_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("name = \"x\"\n[grid\n", "spec.toml:2", "TOML syntax error"),
        (
            "name = \"x\"\n[model]\npresett = \"tiny\"\n",
            "model.presett",
            "did you mean `preset`",
        ),
        (
            "name = \"x\"\n[stages.domain_adapt]\nsteps = \"ten\"\n",
            "stages.domain_adapt.steps",
            "invalid type",
        ),
        (
            "name = \"x\"\n[grid]\npeft = []\n",
            "grid.peft",
            "empty axis",
        ),
        (
            "name = \"x\"\n[grid]\nbackbone = [\"blip3\"]\n",
            "grid.backbone",
            "unknown backbone `blip3`",
        ),
        (
            "name = \"x\"\n[stages.domain_adapt]\nlr = -1e-3\n",
            "stages.domain_adapt.lr",
            "positive",
        ),
        (
            "name = \"x\"\n[model]\nstem = \"convv\"\n",
            "model.stem",
            "did you mean `conv`",
        ),
    ];
    for (text, key, msg) in cases {
        let p = spec(dir.path(), text);
        let out = ecic()
            .args(["plan"])
            .arg(&p)
            .arg("--runs")
            .arg(dir.path().join("runs"))
            .output()
            .unwrap();
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert!(
            err.contains(key) && err.contains(msg),
            "{text}: expected {key} / {msg} in: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    // Several problems are reported at once.
    let p = spec(
        dir.path(),
        "name = \"x\"\n[grid]\npeft = []\n[stages.domain_adapt]\nlr = -1\n[stages.evaluat]\n",
    );
    let out = ecic()
        .arg("sweep")
        .arg(&p)
        .arg("--runs")
        .arg(dir.path().join("runs"))
        .output()
        .unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains("grid.peft") && err.contains("stages.evaluat"),
        "{err}"
    );
    // A bad --set is a usage error too.
    let p = spec(dir.path(), TINY);
    let out = ecic()
        .arg("plan")
        .arg(&p)
        .args(["--set", "stages.evaluate.method=\"bem\""])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr_of(&out).contains("did you mean `beam`"),
        "{}",
        stderr_of(&out)
    );
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

fn computed(runs: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(runs.join("logs")).unwrap().flatten() {
        n += std::fs::read_to_string(e.path())
            .unwrap_or_default()
            .matches("computing ")
            .count();
    }
    n
}

#[test]
fn cache_reruns_kill_and_determinism() {
    let dir = tempfile::tempdir().unwrap();
    let p = spec(dir.path(), TINY);
    // 1. An uninterrupted run.
    let a = dir.path().join("a");
    let out = sweep(&p, &a, &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let ra = results(&a);
    assert_eq!(ra.iter().filter(|r| r.1 == "cider_d").count(), 2, "{ra:?}");
    let first = computed(&a);
    assert_eq!(
        first, 9,
        "preprocess, foundation preprocess, pretrain-vision, pretrain-lm, align, adapt, cider, \
         2 x evaluate"
    );

    // 2. Again: nothing runs.
    let out = sweep(&p, &a, &[]);
    assert!(out.status.success());
    assert!(
        stderr_of(&out).contains("0 stages run, 9 reused"),
        "{}",
        stderr_of(&out)
    );
    assert_eq!(computed(&a), first);

    // 3. An evaluate-only change re-runs only the model cell's evaluate stage.
    let out = sweep(
        &p,
        &a,
        &[
            "--set",
            "stages.evaluate.method=\"beam\"",
            "--set",
            "stages.evaluate.beam_width=2",
        ],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("1 stages run, 8 reused"),
        "{}",
        stderr_of(&out)
    );

    // 4. A domain-adapt change re-runs adapt, cider and evaluate of the model cell, never a
    //    foundation stage.
    let out = sweep(&p, &a, &["--set", "stages.domain_adapt.lr=0.0005"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("3 stages run, 6 reused"),
        "{}",
        stderr_of(&out)
    );

    // 5. kill -9 the whole sweep in the middle of domain-adapt (after its first
    //    checkpoint), then the same command finishes with the same results.
    let b = dir.path().join("b");
    let mut child = {
        use std::os::unix::process::CommandExt;
        let mut c = StdCommand::new(assert_cmd::cargo::cargo_bin("ecic"));
        c.arg("sweep")
            .arg(&p)
            .arg("--runs")
            .arg(&b)
            .arg("--no-report")
            .arg("--jobs")
            .arg("1");
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c.process_group(0);
        c.spawn().unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let ckpt_seen = loop {
        let found = std::fs::read_dir(b.join("scratch"))
            .ok()
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                // A published checkpoint (not one being written, nor the
                // digest file written just before it).
                std::fs::read_dir(e.path().join("ckpt"))
                    .map(|d| {
                        d.flatten().any(|f| {
                            let n = f.file_name().to_string_lossy().to_string();
                            !n.starts_with('.') && n.ends_with(".safetensors")
                        })
                    })
                    .unwrap_or(false)
                    && std::fs::read_to_string(
                        b.join("logs")
                            .join(format!("{}.log", e.file_name().to_string_lossy())),
                    )
                    .map(|l| l.contains("domain-adapt"))
                    .unwrap_or(false)
            });
        if found {
            break true;
        }
        if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
            break false;
        }
        std::thread::yield_now();
    };
    assert!(
        ckpt_seen,
        "the sweep ended before domain-adapt wrote a checkpoint"
    );
    // kill -9 the sweep and its stage processes (they run in their own
    // process groups, so find them by their runs directory).
    // SAFETY: signalling processes this test started.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    common::kill_stages_of(&b);
    let _ = child.wait();
    // Nothing half-written looks complete.
    for e in std::fs::read_dir(b.join("objects-v1")).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name != ".tmp" {
            assert!(
                e.path().join("manifest.json").is_file(),
                "{name} is in the cache without a manifest"
            );
        }
    }
    let out = sweep(&p, &b, &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let logs: String = std::fs::read_dir(b.join("logs"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(
        logs.contains("resumed from the checkpoint at step"),
        "{logs}"
    );
    // 6. Identical metrics to the uninterrupted run (and so: same spec + seed ->
    //    same numbers after clearing the cache).
    let rb = results(&b);
    let ra_first: Vec<_> = ra.clone();
    assert_eq!(ra_first, rb);
}

#[test]
fn concurrent_sweeps_compute_each_stage_once() {
    let dir = tempfile::tempdir().unwrap();
    let text = TINY.replace(
        "backbone = [\"llava\", \"nn\"]",
        "backbone = [\"nn\", \"mfc\"]",
    );
    let p = spec(dir.path(), &text);
    let runs = dir.path().join("runs");
    // Materialise the data first so both start planning at once.
    assert!(ecic()
        .arg("plan")
        .arg(&p)
        .arg("--runs")
        .arg(&runs)
        .output()
        .unwrap()
        .status
        .success());
    let spawn = || {
        StdCommand::new(assert_cmd::cargo::cargo_bin("ecic"))
            .arg("sweep")
            .arg(&p)
            .arg("--runs")
            .arg(&runs)
            .arg("--no-report")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (x, y) = (spawn(), spawn());
    let (ox, oy) = (x.wait_with_output().unwrap(), y.wait_with_output().unwrap());
    assert!(ox.status.success(), "{}", stderr_of(&ox));
    assert!(oy.status.success(), "{}", stderr_of(&oy));
    assert_eq!(
        computed(&runs),
        3,
        "preprocess + 2 evaluate, each computed once"
    );
    let r = results(&runs);
    assert_eq!(r.iter().filter(|r| r.1 == "cider_d").count(), 2, "{r:?}");
    let conn = rusqlite::Connection::open(runs.join("ecic.sqlite")).unwrap();
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");

    // gc keeps what the recorded sweep references and removes the rest.
    let stray = runs.join("objects-v1").join("0123456789abcdef");
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::write(stray.join("manifest.json"), b"{}").unwrap();
    let out = ecic().arg("gc").arg("--runs").arg(&runs).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(!stray.exists());
    let kept = std::fs::read_dir(runs.join("objects-v1"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != ".tmp")
        .count();
    assert_eq!(kept, 3);
    let out = sweep(&p, &runs, &[]);
    assert!(
        stderr_of(&out).contains("0 stages run, 3 reused"),
        "{}",
        stderr_of(&out)
    );
}

#[test]
fn diverging_stage_fails_clearly_while_other_cells_go_on() {
    let dir = tempfile::tempdir().unwrap();
    // A learning rate that blows the weights up: the loss becomes non-finite.
    let text = TINY.replace(
        "[stages.pretrain_align]\nsteps = 4",
        "[stages.pretrain_align]\nlr = 1e30\nsteps = 4",
    );
    let p = spec(dir.path(), &text);
    let runs = dir.path().join("runs");
    let out = sweep(&p, &runs, &["--keep-going"]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("non-finite") || err.contains("NaN") || err.contains("nan"),
        "{err}"
    );
    assert!(err.contains("failed: pretrain-align"), "{err}");
    // The baseline cell finished and was recorded; the model cell's later stages were skipped.
    let r = results(&runs);
    assert!(
        r.iter()
            .any(|(cell, m, _)| cell.starts_with("nn") && m == "cider_d"),
        "{r:?}"
    );
    assert!(
        !r.iter().any(|(cell, _, _)| cell.starts_with("llava")),
        "{r:?}"
    );
    let conn = rusqlite::Connection::open(runs.join("ecic.sqlite")).unwrap();
    let skipped: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM stages WHERE status = 'skipped'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(skipped, 3, "domain-adapt, cider-optimize, evaluate");
    let why: Vec<String> = conn
        .prepare("SELECT error FROM stages WHERE status = 'skipped'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        why.iter()
            .all(|w| w.starts_with("skipped: upstream stage ") && w.ends_with(" failed")),
        "{why:?}"
    );
}

#[test]
fn training_loss_falls_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let text = TINY
        .replace("backbone = [\"llava\", \"nn\"]", "backbone = [\"blip2\"]")
        .replace(
            "[stages.pretrain_align]\nsteps = 4\nbatch_size = 4",
            // The 3-step foundations are barely trained: train them on here too.
            "[stages.pretrain_align]\nsteps = 30\nbatch_size = 8\nlr = 3e-3\nunfreeze = [\"vision\", \"lm\"]",
        )
        .replace(
            "[stages.domain_adapt]\nsteps = 40",
            "[stages.domain_adapt]\nsteps = 2",
        );
    let p = spec(dir.path(), &text);
    let runs = dir.path().join("runs");
    let out = sweep(&p, &runs, &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let conn = rusqlite::Connection::open(runs.join("ecic.sqlite")).unwrap();
    let losses: Vec<f64> = {
        let mut st = conn
            .prepare(
                "SELECT c.value FROM curves c JOIN stages s ON s.key = c.stage_key
                 WHERE s.kind = 'pretrain-align' AND c.name = 'loss' ORDER BY c.step",
            )
            .unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert_eq!(losses.len(), 30);
    let first: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = losses[25..].iter().sum::<f64>() / 5.0;
    assert!(last < 0.7 * first, "loss did not fall: {first} -> {last}");
    // cider-optimize records the valid CIDEr-D of its input and of its output; the output's equals
    // what evaluate (greedy, the default) measured for the cell.
    let scst: Vec<(String, f64)> = {
        let mut st = conn
            .prepare(
                "SELECT metric, value FROM results WHERE stage = 'cider-optimize' AND split = 'valid'
                 ORDER BY metric",
            )
            .unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let names: Vec<&str> = scst.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(
        names,
        ["cider_d_after", "cider_d_before", "cider_d_gain_p"],
        "{scst:?}"
    );
    assert!(
        scst.iter().all(|(_, v)| v.is_finite() && *v >= 0.0),
        "{scst:?}"
    );
    let eval = results(&runs)
        .into_iter()
        .find(|(_, m, _)| m == "cider_d")
        .map(|(_, _, v)| v)
        .expect("evaluate's cider_d");
    assert!(
        (scst[0].1 - eval).abs() < 1e-9,
        "cider_d_after {} vs evaluate {eval}",
        scst[0].1
    );
}

#[test]
fn failed_pooled_stage_leaves_its_description_for_a_rerun_by_hand() {
    // Pooled stages (preprocess, evaluate) get their description inline; a
    // failed one still leaves `runs/stages/KEY.json` behind, so that
    // `ecic run-stage KEY` retries it alone.
    let dir = tempfile::tempdir().unwrap();
    let p = spec(
        dir.path(),
        &TINY.replace(r#"backbone = ["llava", "nn"]"#, r#"backbone = ["mfc"]"#),
    );
    let runs = dir.path().join("runs");
    let out = ecic()
        .arg("plan")
        .arg(&p)
        .arg("--runs")
        .arg(&runs)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    // Corrupt one valid image: preprocess cannot decode it.
    let data = std::fs::read_dir(runs.join("data"))
        .unwrap()
        .flatten()
        .find(|e| e.path().is_dir())
        .unwrap()
        .path();
    let tsv = data.join("IC_valid.tsv");
    let text = std::fs::read_to_string(&tsv).unwrap();
    let (first, rest) = text.split_once('\n').unwrap();
    let id = first.split('\t').next().unwrap();
    std::fs::write(&tsv, format!("{id}\tbm90IGFuIGltYWdl\n{rest}")).unwrap();
    let out = sweep(&p, &runs, &[]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("failed: preprocess"), "{err}");
    let conn = rusqlite::Connection::open(runs.join("ecic.sqlite")).unwrap();
    let key: String = conn
        .query_row(
            "SELECT key FROM stages WHERE status = 'failed' AND kind = 'preprocess'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(runs.join("stages").join(format!("{key}.json")).is_file());
    let again = ecic()
        .arg("run-stage")
        .arg("--runs")
        .arg(&runs)
        .arg(&key)
        .output()
        .unwrap();
    let again_err = stderr_of(&again);
    assert!(!again.status.success(), "{again_err}");
    assert!(again_err.contains("IC_valid.tsv:1"), "{again_err}");
}

/// `model.retrieve` and `method = "rerank"` end to end: a retrieval-augmented cell trains,
/// cider-optimizes and evaluates; rerank picks every caption from its candidates (the cell's
/// greedy caption or a training caption), and with a consensus weight this large it makes the
/// `nn` baseline's choice.
#[test]
fn retrieval_and_rerank_run_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let text = TINY
        .replace(
            "fusion = [\"early\"]",
            "fusion = [\"late\"]\n\"stages.evaluate.method\" = [\"greedy\", \"rerank\"]",
        )
        .replace(
            "[stages.evaluate]",
            "[model]\nretrieve = 1\n[stages.evaluate]\nrerank_weight = 1000.0",
        )
        .replace(
            "[stages.domain_adapt]\nsteps = 40",
            "[stages.domain_adapt]\nsteps = 4",
        );
    let p = spec(dir.path(), &text);
    let runs = dir.path().join("runs");
    let out = sweep(&p, &runs, &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let conn = rusqlite::Connection::open(runs.join("ecic.sqlite")).unwrap();
    let captions = |clause: &str| -> std::collections::BTreeMap<String, String> {
        let q = format!(
            "SELECT c.image_id, c.caption FROM captions c JOIN stages s ON s.key = c.stage_key
             WHERE s.kind = 'evaluate' AND c.split = 'valid' AND {clause}"
        );
        let mut st = conn.prepare(&q).unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let greedy = captions("s.params LIKE '%\"method\":\"greedy\"%'");
    let rerank = captions("s.params LIKE '%\"method\":\"rerank\"%'");
    let nn = captions("s.params LIKE '%\"baseline\":\"nn\"%'");
    assert_eq!(greedy.len(), 8);
    assert_eq!(rerank.len(), 8);
    let train: std::collections::HashSet<String> = std::fs::read_dir(runs.join("data"))
        .unwrap()
        .map(|e| e.unwrap().path().join("IC_train.jsonl"))
        .filter(|p| p.is_file())
        .flat_map(|p| common::jsonl_captions(&p))
        .collect();
    assert!(!train.is_empty());
    for (id, c) in &rerank {
        assert!(
            train.contains(c) || greedy.get(id) == Some(c),
            "{id}: `{c}` is neither a training caption nor the greedy one"
        );
    }
    assert_eq!(
        rerank, nn,
        "a large consensus weight should make nn's choices"
    );
}
