//! Cache keys and run/skip decisions, checked against a simple model: a stage
//! must re-run exactly when a parameter it depends on (or one upstream of it)
//! changes. Runs in-process on the library: no training.

use std::path::PathBuf;

use ecic::cache::{Cache, Manifest};
use ecic::plan::{Fingerprint, Plan, StageKind};
use ecic::spec::Spec;
use proptest::prelude::*;

fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const BASE: &str = r#"
name = "keys"
seeds = [0, 1]
[grid]
backbone = ["blip2", "llava", "nn"]
peft = ["lora", "adapter"]
fusion = ["early", "late"]
"#;

fn plan_of(text: &str, sets: &[String]) -> Plan<ecic::plan::Sealed> {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "spec.toml", text);
    let spec = Spec::load(&p, sets).unwrap_or_else(|e| panic!("{e}"));
    Plan::of_spec(&spec, PathBuf::from("/data"), "digest".into()).unwrap()
}

#[test]
fn golden_key() {
    let fp = Fingerprint {
        kind: "evaluate".into(),
        version: 1,
        params: serde_json::json!({"b": 1, "a": [1.5, "x", true, null]}),
        inputs: vec!["ab".into(), "cd".into()],
        data_digest: "d".into(),
        seed: 7,
    };
    // Made independently by scripts/golden_key.py.
    assert_eq!(
        fp.key(),
        "5bdbf3e584f7dd3a3c4b2f12199bd4b918ae1835e63ce8b907d1290e92cea21f"
    );
    // Object key order does not matter; float bits do.
    let mut fp2 = fp.clone();
    fp2.params = serde_json::from_str(r#"{"a": [1.5, "x", true, null], "b": 1}"#).unwrap();
    assert_eq!(fp.key(), fp2.key());
    fp2.params = serde_json::json!({"b": 1, "a": [1.5000000000000002, "x", true, null]});
    assert_ne!(fp.key(), fp2.key());
    // Integer 1 and float 1.0 are different values.
    fp2.params = serde_json::json!({"b": 1.0, "a": [1.5, "x", true, null]});
    assert_ne!(fp.key(), fp2.key());
}

#[test]
fn keys_ignore_toml_order_comments_and_output_paths() {
    let reordered = r#"
# the same spec, written differently
[grid]
fusion = ["early", "late"]      # order of keys differs
peft = ["lora", "adapter"]
backbone = ["blip2", "llava", "nn"]

[stages.evaluate]
method = "greedy"               # the default, spelled out
[stages.domain_adapt]
lr = 1e-3
"#;
    let a = plan_of(&format!("{BASE}\n[stages.domain_adapt]\nlr = 0.001\n"), &[]);
    let b = plan_of(
        &format!("name = \"keys\"\nseeds = [0, 1]\n{reordered}"),
        &[],
    );
    let ka: Vec<String> = a.stages().map(|s| s.desc.key.clone()).collect();
    let kb: Vec<String> = b.stages().map(|s| s.desc.key.clone()).collect();
    let (mut sa, mut sb) = (ka.clone(), kb.clone());
    sa.sort();
    sb.sort();
    assert_eq!(sa, sb);
    // The data directory (an output-side path) is not in any key.
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "spec.toml", BASE);
    let spec = Spec::load(&p, &[]).unwrap();
    let x = Plan::of_spec(&spec, PathBuf::from("/one"), "digest".into()).unwrap();
    let y = Plan::of_spec(&spec, PathBuf::from("/two/other"), "digest".into()).unwrap();
    let kx: Vec<_> = x.stages().map(|s| s.desc.key.clone()).collect();
    let ky: Vec<_> = y.stages().map(|s| s.desc.key.clone()).collect();
    assert_eq!(kx, ky);
    // ... but the data digest is.
    let z = Plan::of_spec(&spec, PathBuf::from("/one"), "other-digest".into()).unwrap();
    assert!(z.stages().all(|s| x.get(&s.desc.key).is_none()));
}

#[test]
fn sharing_counts() {
    let p = plan_of(BASE, &[]);
    // Cells: (2 model backbones x 2 peft x 2 fusion + nn) x 2 seeds = 18.
    assert_eq!(p.cells.len(), 18);
    let count = |k: StageKind| p.stages().filter(|s| s.desc.kind == k).count();
    // One per seed (64 px for all three), plus the foundation corpus's, shared by all.
    assert_eq!(count(StageKind::Preprocess), 2 + 1);
    // One pair of foundations for the whole sweep: keyed by the tower's and the LM's
    // configuration and the foundation seed, not by backbone, fusion or cell seed.
    assert_eq!(count(StageKind::PretrainVision), 1);
    assert_eq!(count(StageKind::PretrainLm), 1);
    assert_eq!(count(StageKind::PretrainAlign), 2 * 2 * 2); // backbone x fusion x seed
    assert_eq!(count(StageKind::DomainAdapt), 8 * 2);
    assert_eq!(count(StageKind::Evaluate), 8 * 2 + 2);
    assert_eq!(p.naive_len(), 16 * 7 + 2 * 2);
    // Another fine-tuning seed reuses the same foundations.
    let foundations = |p: &Plan<ecic::plan::Sealed>| -> Vec<String> {
        p.stages()
            .filter(|s| {
                matches!(
                    s.desc.kind,
                    StageKind::PretrainVision | StageKind::PretrainLm
                )
            })
            .map(|s| s.desc.key.clone())
            .collect()
    };
    let other_seed = plan_of(BASE, &["seeds=[7]".to_string()]);
    assert_eq!(foundations(&p), foundations(&other_seed));
    for c in p.cells.iter().filter(|c| c.cell.backbone != "nn") {
        let kinds: Vec<StageKind> = c.stages.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            kinds,
            [
                StageKind::Preprocess,
                StageKind::PretrainVision,
                StageKind::PretrainLm,
                StageKind::PretrainAlign,
                StageKind::DomainAdapt,
                StageKind::CiderOptimize,
                StageKind::Evaluate
            ]
        );
    }
}

/// A checkpoint is the foundation: no foundation stage in the plan, the same chain after it.
#[test]
fn a_checkpoint_replaces_the_foundation_stages() {
    let ck = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llava");
    let text = format!("{BASE}\n[model]\ncheckpoint = \"{}\"\n", ck.display());
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "spec.toml", &text);
    let spec = Spec::load(&p, &[]).unwrap_or_else(|e| panic!("{e}"));
    let plan = Plan::of_spec(&spec, PathBuf::from("/data"), "digest".into()).unwrap();
    let count = |k: StageKind| plan.stages().filter(|s| s.desc.kind == k).count();
    assert_eq!(count(StageKind::PretrainVision), 0);
    assert_eq!(count(StageKind::PretrainLm), 0);
    for c in plan.cells.iter().filter(|c| c.cell.backbone != "nn") {
        let kinds: Vec<StageKind> = c.stages.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            kinds,
            [
                StageKind::Preprocess,
                StageKind::PretrainAlign,
                StageKind::DomainAdapt,
                StageKind::CiderOptimize,
                StageKind::Evaluate
            ]
        );
        let align = plan.get(&c.stages[1].1).unwrap();
        assert_eq!(
            align.desc.inputs.len(),
            1,
            "pretrain-align reads its preprocess only"
        );
    }
}

/// `stages.pretrain_align.unfreeze` is left out of the serialized defaults when empty (so other
/// stages' keys do not carry it), yet it is a spec key like any other: it can be a grid axis,
/// and its levels give different pretrain-align stages over the same foundations.
#[test]
fn unfreeze_can_be_a_grid_axis() {
    let text = BASE.replace(
        "fusion = [\"early\", \"late\"]",
        "fusion = [\"late\"]\n\"stages.pretrain_align.unfreeze\" = [[], [\"vision\"]]",
    );
    let plan = plan_of(&text, &[]);
    let count = |k: StageKind| plan.stages().filter(|s| s.desc.kind == k).count();
    // blip2, llava x (frozen, vision unfrozen) x 2 seeds.
    assert_eq!(count(StageKind::PretrainAlign), 8);
    assert_eq!(count(StageKind::PretrainVision), 1);
    assert_eq!(count(StageKind::PretrainLm), 1);
}

/// Whether a change of `path` must re-key a stage of `kind`: the kinds that read it, and
/// everything downstream of them. The foundation stages read only their own settings, the
/// tower's (`model.stem`), the caption length, the foundation seed and what shapes the
/// tokenizer; pretrain-align reads both foundations.
fn affected(path: &str, kind: StageKind) -> bool {
    use StageKind::*;
    let foundations = |vision: bool, lm: bool| match kind {
        PretrainVision => vision,
        PretrainLm => lm,
        Preprocess => false,
        _ => true,
    };
    match path {
        "stages.preprocess.jitter" | "stages.preprocess.augment_copies" => {
            kind == Preprocess || kind >= PretrainAlign
        }
        "stages.preprocess.min_freq" => true,
        "model.max_len" => foundations(true, true),
        "model.stem" => foundations(true, false),
        "foundation.seed" => foundations(true, true),
        "foundation.embed_dim" => foundations(true, false),
        _ if path.starts_with("stages.pretrain_vision.") => foundations(true, false),
        _ if path.starts_with("stages.pretrain_lm.") => foundations(false, true),
        _ => kind >= first_affected(path),
    }
}

/// The first kind a change of `path` re-keys (then everything after), for settings that do
/// not reach the foundation stages.
fn first_affected(path: &str) -> StageKind {
    let section = path.split('.').take(2).collect::<Vec<_>>().join(".");
    match section.as_str() {
        "stages.pretrain_align" | "model.retrieve" => StageKind::PretrainAlign,
        "stages.domain_adapt" | "peft.lora" | "peft.adapter" | "model.vision" => {
            StageKind::DomainAdapt
        }
        "stages.cider_optimize" => StageKind::CiderOptimize,
        "stages.evaluate" => StageKind::Evaluate,
        other => panic!("no model for {other}"),
    }
}

/// Does the change of `path` concern this cell at all?
fn relevant(path: &str, backbone: &str, peft: &str) -> bool {
    let baseline = backbone == "nn";
    if path.starts_with("peft.lora") {
        return peft == "lora" && !baseline;
    }
    if path.starts_with("peft.adapter") {
        return peft == "adapter" && !baseline;
    }
    if baseline {
        // Baselines have preprocess and evaluate; decoding settings don't apply.
        return path.starts_with("stages.preprocess")
            || path == "stages.evaluate.split"
            || path == "stages.evaluate.tokenize";
    }
    if path.starts_with("stages.evaluate.") {
        // Decoding parameters matter only for the method that uses them.
        return matches!(
            path,
            "stages.evaluate.method"
                | "stages.evaluate.max_len"
                | "stages.evaluate.split"
                | "stages.evaluate.tokenize"
        );
    }
    true
}

const MUTATIONS: &[(&str, &str)] = &[
    ("stages.preprocess.jitter", "0.3"),
    ("stages.preprocess.augment_copies", "2"),
    ("stages.preprocess.min_freq", "2"),
    ("stages.pretrain_vision.lr", "0.002"),
    ("stages.pretrain_vision.steps", "9"),
    ("stages.pretrain_lm.batch_size", "16"),
    ("foundation.seed", "3"),
    ("foundation.embed_dim", "64"),
    ("stages.pretrain_align.unfreeze", "[\"lm\"]"),
    ("stages.pretrain_align.lr", "0.004"),
    ("stages.pretrain_align.steps", "7"),
    ("model.max_len", "24"),
    ("model.stem", "\"conv\""),
    ("model.retrieve", "1"),
    ("stages.domain_adapt.lr", "0.0005"),
    ("stages.domain_adapt.label_smoothing", "0.1"),
    ("peft.lora.r", "4"),
    ("peft.adapter.bottleneck", "8"),
    ("model.vision", "\"lora\""),
    ("stages.cider_optimize.samples", "2"),
    ("stages.cider_optimize.baseline", "\"mean\""),
    ("stages.evaluate.method", "\"beam\""),
    ("stages.evaluate.max_len", "20"),
    ("stages.evaluate.beam_width", "5"),
    ("stages.evaluate.top_p", "0.5"),
    ("stages.evaluate.rerank_weight", "0.5"),
    ("stages.evaluate.tokenize", "\"space\""),
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// After a full run of the base spec, a one-parameter change re-runs exactly
    /// the stages the model says, and nothing else.
    #[test]
    fn reruns_match_the_model(i in 0..MUTATIONS.len(), j in 0..MUTATIONS.len()) {
        let mut changes = vec![MUTATIONS[i]];
        if i != j && MUTATIONS[i].0 != MUTATIONS[j].0 { changes.push(MUTATIONS[j]); }
        let base = plan_of(BASE, &[]);
        let sets: Vec<String> = changes.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let changed = plan_of(BASE, &sets);
        // "Run" the base plan: every base key is complete.
        let done: std::collections::HashSet<&str> = base.stages().map(|s| s.desc.key.as_str()).collect();
        for (cell_a, cell_b) in base.cells.iter().zip(&changed.cells) {
            prop_assert_eq!(&cell_a.cell.name, &cell_b.cell.name);
            for ((kind, key_a), (_, key_b)) in cell_a.stages.iter().zip(&cell_b.stages) {
                let expect_rerun = changes.iter().any(|(path, _)| {
                    relevant(path, &cell_a.cell.backbone, &cell_a.cell.peft)
                        && affected(path, *kind)
                });
                let reruns = !done.contains(key_b.as_str());
                prop_assert_eq!(reruns, expect_rerun, "{} {} after {:?}", cell_a.cell.name, kind, changes);
                prop_assert_eq!(key_a != key_b, expect_rerun);
            }
        }
    }
}

/// A published entry is complete; a pending one (crashed writer) never is.
#[test]
fn only_published_entries_are_complete() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let pending = cache.begin("abc").unwrap();
    std::fs::write(pending.dir().join("out.txt"), b"partial").unwrap();
    assert!(!cache.is_complete("abc"));
    let tmp = pending.dir().to_path_buf();
    drop(pending); // a failed stage: its temp dir is removed
    assert!(!tmp.exists());
    assert!(!cache.is_complete("abc"));
    let pending = cache.begin("abc").unwrap();
    std::fs::write(pending.dir().join("out.txt"), b"whole").unwrap();
    let m = Manifest {
        key: "abc".into(),
        kind: "evaluate".into(),
        label: "x".into(),
        params: serde_json::Value::Null,
        inputs: vec![],
        kind_version: 1,
        ecic_version: "0".into(),
        data_digest: "d".into(),
        seed: 0,
        started_at: 0.0,
        finished_at: 0.0,
        wall_s: 0.0,
        cpu_s: None,
        peak_rss_kb: None,
        git_commit: None,
        host: None,
        threads: 1,
        trainable_params: None,
        total_params: None,
        files: vec!["out.txt".into()],
        digests: Default::default(),
    };
    pending.publish(&m).unwrap();
    assert!(cache.is_complete("abc"));
    assert_eq!(
        std::fs::read(cache.entry("abc").join("out.txt")).unwrap(),
        b"whole"
    );
}
