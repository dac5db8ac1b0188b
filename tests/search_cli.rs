//! `[search]` through the `ecic` binary: bad distributions are refused before
//! anything runs (exit 2, naming the key and its line), the plan lists every
//! grid cell's sampled trials, and raising `trials` keeps the earlier trials'
//! stages (so a widened search runs only the new ones).

use std::path::{Path, PathBuf};

use assert_cmd::Command;

fn ecic() -> Command {
    let mut c = Command::cargo_bin("ecic").unwrap();
    c.env("NO_COLOR", "1");
    c
}

const BASE: &str = r#"name = "s"
[data]
synth = { train = 16, valid = 4, test = 2, align = 8, foundation = 8 }
[grid]
backbone = ["llava"]
peft = ["lora"]
fusion = ["early", "late"]
"#;

fn spec(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("spec.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn plan_json(dir: &Path, spec: &Path, sets: &[&str]) -> serde_json::Value {
    let mut cmd = ecic();
    cmd.arg("plan")
        .arg(spec)
        .arg("--runs")
        .arg(dir.join("runs"));
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.args(["--format", "json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn bad_distributions_exit_2_naming_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    // ([search] lines after BASE's 7, where the problem is said to be, what)
    let cases = [
        (
            "trials = 4\n\"stages.domain_adapt.lr\" = { uniform = [1e-2, 1e-4] }\n",
            "spec.toml:10",
            "`search.stages.domain_adapt.lr`: low (0.01) is above high (0.0001)",
        ),
        (
            "trials = 4\n\"stages.domain_adapt.lr\" = { loguniform = [0.0, 1e-2] }\n",
            "spec.toml:10",
            "`search.stages.domain_adapt.lr`: loguniform needs low > 0",
        ),
        (
            "trials = 4\nseed = 1\n\"stages.domain_adapt.lrr\" = { loguniform = [1e-4, 1e-2] }\n",
            "spec.toml:11",
            "`search.stages.domain_adapt.lrr`: no spec key `stages.domain_adapt.lrr` (did you mean `lr`?)",
        ),
        (
            "trials = 4\n\"peft.lora.r\" = { normal = [4, 16] }\n",
            "spec.toml:10",
            "`search.peft.lora.r`: unknown distribution `normal`",
        ),
        (
            "trials = 0\n\"peft.lora.r\" = { int = [4, 16] }\n",
            "spec.toml:9",
            "`search.trials`: must be a whole number of at least 1",
        ),
    ];
    for (search, at, msg) in cases {
        let text = format!("{BASE}[search]\n{search}");
        let p = spec(dir.path(), &text);
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
                "{text}: expected {at} / {msg} in: {err}"
            );
            assert!(!err.contains("panicked"), "{err}");
        }
    }
    // Nothing ran, nothing was recorded.
    assert!(!dir.path().join("runs/ecic.sqlite").exists());
}

#[test]
fn every_grid_cell_gets_the_sampled_trials_and_more_trials_keep_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{BASE}[search]\nmethod = \"sobol\"\ntrials = 3\n\
         \"stages.domain_adapt.lr\" = {{ loguniform = [1e-4, 1e-2] }}\n\
         \"peft.lora.r\" = {{ int = [2, 16] }}\n"
    );
    let p = spec(dir.path(), &text);
    let three = plan_json(dir.path(), &p, &[]);
    let cells = three["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 2 * 3, "2 fusions x 3 trials");
    let names: Vec<&str> = cells.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "llava-lora-early-t0-s0",
            "llava-lora-early-t1-s0",
            "llava-lora-early-t2-s0",
            "llava-lora-late-t0-s0",
            "llava-lora-late-t1-s0",
            "llava-lora-late-t2-s0"
        ]
    );
    // A trial samples the same values in every grid cell; trials differ.
    let sampled = |c: &serde_json::Value| -> Vec<(String, serde_json::Value)> {
        c["overrides"]
            .as_array()
            .unwrap()
            .iter()
            .map(|kv| (kv["key"].as_str().unwrap().to_string(), kv["value"].clone()))
            .collect()
    };
    assert_eq!(sampled(&cells[1]), sampled(&cells[4]));
    assert_ne!(sampled(&cells[0]), sampled(&cells[1]));
    let first = sampled(&cells[0]);
    assert_eq!(first[0].0, "trial");
    let lr = first
        .iter()
        .find(|(k, _)| k == "stages.domain_adapt.lr")
        .and_then(|(_, v)| v.as_f64())
        .unwrap();
    assert!((1e-4..=1e-2).contains(&lr), "{lr}");

    // Raising `trials`: the first three trials are the same stages, cached
    // or not; only the new trials' stages are new.
    let five = plan_json(dir.path(), &p, &["search.trials=5"]);
    let keys = |plan: &serde_json::Value, name: &str| -> Vec<String> {
        let cell = plan["cells"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in the plan"));
        cell["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    assert_eq!(five["cells"].as_array().unwrap().len(), 2 * 5);
    for name in names {
        assert_eq!(keys(&three, name), keys(&five, name), "{name}");
    }
    assert_ne!(
        keys(&five, "llava-lora-early-t3-s0"),
        keys(&five, "llava-lora-early-t2-s0")
    );

    // The table shows what each trial sampled.
    let out = ecic()
        .arg("plan")
        .arg(&p)
        .arg("--runs")
        .arg(dir.path().join("runs"))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("sampled") && table.contains("r="), "{table}");
}
