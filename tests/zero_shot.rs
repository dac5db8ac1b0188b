//! Zero-shot rows (`peft = "none"`): the model as pretrain-align or a checkpoint left it,
//! evaluated beside the fine-tuned cells. Their plan (no domain-adapt, no cider-optimize, every
//! upstream stage shared), bad values, a tiny sweep and a sweep on the LLaVA fixture checkpoint
//! with one, and what makes the checkpoint zero-shot row of `late` / `multilevel` fusion the
//! checkpoint itself: their cross-attention layers start gated shut.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ecic::model::hf::Checkpoint;
use ecic::model::{Backbone, Captioner, Fusion, ModelConfig, PeftConfig, Phase};
use ecic::plan::{Plan, StageKind};
use ecic::spec::Spec;

mod common;
use common::max_abs_diff;

fn ecic() -> assert_cmd::Command {
    let mut c = assert_cmd::Command::cargo_bin("ecic").unwrap();
    c.env("NO_COLOR", "1");
    c
}

fn llava_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llava")
}

const TINY: &str = r#"
name = "zs"
seeds = [0]
[data]
synth = { train = 24, valid = 8, test = 4, align = 24, foundation = 24 }
[grid]
backbone = ["llava", "nn"]
peft = ["lora", "none"]
fusion = ["late"]
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
steps = 4
batch_size = 4
[stages.cider_optimize]
steps = 2
batch_size = 2
samples = 2
[stages.evaluate]
predict_test = false
"#;

fn write_spec(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("spec.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn plan_of(text: &str) -> Plan<ecic::plan::Sealed> {
    let dir = tempfile::tempdir().unwrap();
    let p = write_spec(dir.path(), text);
    let spec = Spec::load(&p, &[]).unwrap_or_else(|e| panic!("{e}"));
    Plan::of_spec(&spec, PathBuf::from("/data"), "digest".into()).unwrap()
}

/// (kind, key) of each stage of the cell named `name`.
fn stages_of(plan: &Plan<ecic::plan::Sealed>, name: &str) -> Vec<(StageKind, String)> {
    plan.cells
        .iter()
        .find(|c| c.cell.name == name)
        .unwrap_or_else(|| panic!("no cell {name}"))
        .stages
        .clone()
}

fn kinds(stages: &[(StageKind, String)]) -> Vec<StageKind> {
    stages.iter().map(|(k, _)| *k).collect()
}

#[test]
fn a_zero_shot_cell_evaluates_the_shared_pretrain_align() {
    let plan = plan_of(TINY);
    let trained = stages_of(&plan, "llava-lora-late-s0");
    let zero = stages_of(&plan, "llava-none-late-s0");
    assert_eq!(
        kinds(&zero),
        [
            StageKind::Preprocess,
            StageKind::PretrainVision,
            StageKind::PretrainLm,
            StageKind::PretrainAlign,
            StageKind::Evaluate
        ]
    );
    // Everything up to pretrain-align is the trained cell's own stage.
    assert_eq!(zero[..4], trained[..4]);
    assert_eq!(
        plan.stages()
            .filter(|s| s.desc.kind == StageKind::PretrainAlign)
            .count(),
        1
    );
    let eval = plan.get(&zero[4].1).unwrap();
    assert_eq!(
        eval.desc.inputs,
        [zero[3].clone(), zero[0].clone()],
        "evaluate reads pretrain-align and preprocess"
    );
    assert_eq!(eval.desc.fingerprint.params["zero_shot"], true);
    assert!(eval.desc.label.contains("zero-shot"), "{}", eval.desc.label);
    // The trained cell's evaluate key does not carry the flag (its key is what it was).
    let trained_eval = plan.get(&trained.last().unwrap().1).unwrap();
    assert!(trained_eval
        .desc
        .fingerprint
        .params
        .get("zero_shot")
        .is_none());
    assert_ne!(trained_eval.desc.key, eval.desc.key);
    // Adding the zero-shot row to a spec changes no other stage's key.
    let without = plan_of(&TINY.replace("peft = [\"lora\", \"none\"]", "peft = [\"lora\"]"));
    assert_eq!(stages_of(&without, "llava-lora-late-s0"), trained);
    assert_eq!(plan.len(), without.len() + 1);
}

/// With a LLaVA checkpoint the llava zero-shot cell is the checkpoint as it is: no stage trains
/// it, and its evaluate names the checkpoint in its key. A phi3v zero-shot cell still needs its
/// connector trained, and shares that pretrain-align with the trained phi3v cell.
#[test]
fn with_a_checkpoint_the_llava_zero_shot_cell_trains_nothing() {
    let text = TINY
        .replace(
            "backbone = [\"llava\", \"nn\"]",
            "backbone = [\"llava\", \"phi3v\"]",
        )
        .replace(
            "[stages.preprocess]",
            &format!(
                "[model]\ncheckpoint = \"{}\"\nmax_len = 16\n[stages.preprocess]",
                llava_fixture().display()
            ),
        );
    let plan = plan_of(&text);
    let zero = stages_of(&plan, "llava-none-late-s0");
    let trained = stages_of(&plan, "llava-lora-late-s0");
    assert_eq!(kinds(&zero), [StageKind::Preprocess, StageKind::Evaluate]);
    assert_eq!(zero[0], trained[0]);
    let eval = plan.get(&zero[1].1).unwrap();
    assert_eq!(eval.desc.inputs, [zero[0].clone()]);
    let model = &eval.desc.fingerprint.params["model"];
    assert_eq!(model["backbone"], "llava");
    assert_eq!(model["fusion"], "late");
    // The checkpoint names the model (its content digest joins when a sweep plans it).
    assert!(
        model["checkpoint"].as_str().unwrap().ends_with("hf/llava"),
        "{model}"
    );
    assert!(model.get("train").is_none(), "{model}");
    // Zero-gated late fusion is another model than the plain one cached entries may hold.
    assert_eq!(model["late_gated"], true);

    let zero = stages_of(&plan, "phi3v-none-late-s0");
    let trained = stages_of(&plan, "phi3v-lora-late-s0");
    assert_eq!(
        kinds(&zero),
        [
            StageKind::Preprocess,
            StageKind::PretrainAlign,
            StageKind::Evaluate
        ]
    );
    assert_eq!(zero[..2], trained[..2]);
}

/// A BLIP-2 checkpoint brings its Q-Former and projection: the blip2 zero-shot cell on it
/// trains nothing either, while on a LLaVA checkpoint (tower and LM only, for blip2) it trains
/// its connector in pretrain-align first.
#[test]
fn a_blip2_checkpoint_supplies_the_zero_shot_cells_connector() {
    let on = |fixture: &str| {
        let ck = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/hf")
            .join(fixture);
        let text = TINY
            .replace("backbone = [\"llava\", \"nn\"]", "backbone = [\"blip2\"]")
            .replace("fusion = [\"late\"]", "fusion = [\"early\"]")
            .replace(
                "[stages.preprocess]",
                &format!(
                    "[model]\ncheckpoint = \"{}\"\nmax_len = 16\n[stages.preprocess]",
                    ck.display()
                ),
            );
        kinds(&stages_of(&plan_of(&text), "blip2-none-early-s0"))
    };
    assert_eq!(on("blip2"), [StageKind::Preprocess, StageKind::Evaluate]);
    assert_eq!(
        on("llava"),
        [
            StageKind::Preprocess,
            StageKind::PretrainAlign,
            StageKind::Evaluate
        ]
    );
}

#[test]
fn bad_peft_values_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (value, says) in [
        ("zero-shot", "(a zero-shot row is peft `none`)"),
        (
            "nothing",
            "expected one of full, lora, qlora, adapter, none",
        ),
    ] {
        let text = TINY.replace(
            "peft = [\"lora\", \"none\"]",
            &format!("peft = [\"lora\", \"{value}\"]"),
        );
        let p = write_spec(dir.path(), &text);
        let out = ecic().arg("plan").arg(&p).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("grid.peft"), "{err}");
        assert!(err.contains(&format!("unknown peft `{value}`")), "{err}");
        assert!(err.contains(says), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

fn sweep(spec: &Path, runs: &Path) -> std::process::Output {
    ecic()
        .arg("sweep")
        .arg(spec)
        .arg("--runs")
        .arg(runs)
        .arg("--no-report")
        .output()
        .unwrap()
}

/// (stage kind, metric) -> value of `cell`'s rows in the results view.
fn results(runs: &Path, cell: &str) -> (Vec<String>, BTreeMap<String, f64>) {
    let conn = rusqlite::Connection::open(runs.join("ecic.sqlite")).unwrap();
    let mut st = conn
        .prepare(
            "SELECT peft, stage, split, metric, value FROM results WHERE cell = ?1 \
             ORDER BY stage, split, metric",
        )
        .unwrap();
    let rows: Vec<(String, String, String, String, f64)> = st
        .query_map([cell], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut pefts: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    pefts.dedup();
    let metrics = rows
        .into_iter()
        .filter(|r| r.1 == "evaluate" && r.2 == "valid")
        .map(|r| (r.3, r.4))
        .collect();
    (pefts, metrics)
}

/// The kinds of `cell`'s stages as the store recorded them.
fn recorded_kinds(runs: &Path, cell: &str) -> Vec<String> {
    let conn = rusqlite::Connection::open(runs.join("ecic.sqlite")).unwrap();
    let mut st = conn
        .prepare(
            "SELECT cs.kind FROM cell_stages cs JOIN cells c ON c.id = cs.cell_id \
             WHERE c.name = ?1",
        )
        .unwrap();
    let mut v: Vec<String> = st
        .query_map([cell], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    v.sort();
    v
}

#[test]
fn a_tiny_sweep_records_and_reports_the_zero_shot_row() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), TINY);
    let runs = dir.path().join("runs");
    let out = sweep(&spec, &runs);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(0), "{err}");
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(table.contains("llava-none-late (zero-shot)"), "{table}");

    let (pefts, metrics) = results(&runs, "llava-none-late-s0");
    assert_eq!(pefts, ["none"]);
    for m in ["cider_d", "bleu4", "rouge_l", "distinct_ratio"] {
        assert!(metrics.contains_key(m), "{m} missing: {metrics:?}");
    }
    assert_eq!(
        recorded_kinds(&runs, "llava-none-late-s0"),
        [
            "evaluate",
            "preprocess",
            "pretrain-align",
            "pretrain-lm",
            "pretrain-vision"
        ]
    );
    // The zero-shot row's captions are not the fine-tuned cell's: another model wrote them.
    let (_, lora) = results(&runs, "llava-lora-late-s0");
    assert!(lora.contains_key("cider_d"));

    let report = dir.path().join("report");
    let out = ecic()
        .args(["report", "zs", "--runs"])
        .arg(&runs)
        .arg("--out")
        .arg(&report)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = std::fs::read_to_string(report.join("index.html")).unwrap();
    assert!(
        html.contains("llava-none-late (zero-shot)"),
        "no zero-shot row"
    );
    assert!(
        html.contains("Fine-tuning over the zero-shot rows (zero-shot -&gt; best PEFT")
            && html.contains("llava-none-late "),
        "no finding on the zero-shot row"
    );
    assert!(
        html.contains("Against the nn baseline"),
        "the nn baseline lost its finding"
    );
}

/// The sweep on the LLaVA fixture: the zero-shot cells of both fusions evaluate the checkpoint
/// with no training stage, and `ecic predict` of such a cell rebuilds the model it evaluated.
#[test]
fn a_checkpoint_sweep_evaluates_the_checkpoint_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let text = TINY
        .replace("backbone = [\"llava\", \"nn\"]", "backbone = [\"llava\"]")
        .replace("fusion = [\"late\"]", "fusion = [\"early\", \"late\"]")
        .replace(
            "[stages.preprocess]",
            &format!(
                "[model]\ncheckpoint = \"{}\"\nmax_len = 16\n[stages.preprocess]",
                llava_fixture().display()
            ),
        )
        .replace(
            "[stages.cider_optimize]",
            "[stages.cider_optimize]\nenabled = false",
        );
    let spec = write_spec(dir.path(), &text);
    let runs = dir.path().join("runs");
    let out = sweep(&spec, &runs);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(0), "{err}");
    for fusion in ["early", "late"] {
        let cell = format!("llava-none-{fusion}-s0");
        assert_eq!(recorded_kinds(&runs, &cell), ["evaluate", "preprocess"]);
        let (pefts, metrics) = results(&runs, &cell);
        assert_eq!(pefts, ["none"]);
        assert!(metrics.contains_key("cider_d"), "{cell}: {metrics:?}");
    }
    let conn = rusqlite::Connection::open(runs.join("ecic.sqlite")).unwrap();
    let aligns: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM stages WHERE kind = 'pretrain-align'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        aligns, 2,
        "one pretrain-align per fusion, for the lora cells"
    );

    // The evaluate entry holds the lineage naming the checkpoint, which `ecic predict` reads.
    let tsv = common::find_file(&runs.join("data"), "IC_valid.tsv").expect("the synthetic data");
    let cell = "llava-none-early-s0";
    let pred = dir.path().join("pred.jsonl");
    let out = ecic()
        .arg("predict")
        .arg(format!("zs/{cell}"))
        .arg("--images")
        .arg(&tsv)
        .arg("--out")
        .arg(&pred)
        .arg("--runs")
        .arg(&runs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let predicted: BTreeMap<String, String> = std::fs::read_to_string(&pred)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["image_id"].as_str().unwrap().to_owned(),
                v["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut st = conn
        .prepare(
            "SELECT cap.image_id, cap.caption FROM captions cap
             JOIN cell_stages cs ON cs.key = cap.stage_key AND cs.kind = 'evaluate'
             JOIN cells c ON c.id = cs.cell_id
             WHERE c.name = ?1 AND cap.split = 'valid'",
        )
        .unwrap();
    let evaluated: BTreeMap<String, String> = st
        .query_map([cell], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(evaluated.len(), 8);
    assert_eq!(predicted, evaluated);
}

// ---- fusion layers a checkpoint lacks start gated shut ----

fn expected_llava() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(llava_fixture().join("expected.safetensors"), &Device::Cpu)
        .unwrap()
}

fn on_checkpoint(fusion: Fusion) -> Captioner {
    let ck = Checkpoint::open(&llava_fixture()).unwrap();
    let cfg = ck.model_config(Backbone::Llava, fusion).unwrap();
    let mut m = Captioner::new(&cfg, &PeftConfig::default(), Phase::Align, &Device::Cpu).unwrap();
    m.load_pretrained(&ck).unwrap();
    m
}

/// Before any training, a `late` or `multilevel` model on the LLaVA checkpoint gives the
/// logits of the checkpoint's decoder (the text-only LM, which their cross-attention layers
/// are added to); opening a gate changes them, so the equality is the gates' doing.
#[test]
fn late_and_multilevel_start_equal_to_the_checkpoint() {
    let exp = expected_llava();
    let images = &exp["pixel_values"];
    let ids = exp["input_ids"].to_dtype(DType::U32).unwrap();
    let text_only = on_checkpoint(Fusion::Early).lm_logits(&ids).unwrap();
    for fusion in [Fusion::Late, Fusion::Multilevel] {
        let m = on_checkpoint(fusion);
        assert!(m.config().fusion_opts.late_gated);
        let logits = m.logits(images, &ids).unwrap();
        let err = max_abs_diff(&logits, &text_only);
        assert!(err <= 1e-6, "{fusion:?}: max abs diff {err}");
        let gates: Vec<_> = m
            .trainable_vars()
            .into_iter()
            .filter(|t| t.name.ends_with("xattn.gate"))
            .collect();
        assert!(!gates.is_empty(), "{fusion:?} has no gates");
        for g in &gates {
            g.var
                .set(&Tensor::ones(1, DType::F32, &Device::Cpu).unwrap())
                .unwrap();
        }
        let opened = m.logits(images, &ids).unwrap();
        assert!(
            max_abs_diff(&opened, &text_only) > 1e-4,
            "{fusion:?}: an open gate changed nothing"
        );
    }
}

/// The tiny presets keep the plain `late` sublayer their documented results used: no gate
/// tensor, and nothing new in their serialized configuration.
#[test]
fn tiny_late_fusion_stays_ungated() {
    let cfg = ModelConfig::tiny(Backbone::Llava, Fusion::Late, 50, 0, 1, 2);
    assert!(!cfg.fusion_opts.late_gated);
    let j = serde_json::to_value(&cfg).unwrap();
    assert!(j["fusion_opts"].get("late_gated").is_none(), "{j}");
    let m = Captioner::new(&cfg, &PeftConfig::default(), Phase::Align, &Device::Cpu).unwrap();
    assert!(m
        .trainable_vars()
        .iter()
        .all(|t| !t.name.ends_with("xattn.gate")));
}
