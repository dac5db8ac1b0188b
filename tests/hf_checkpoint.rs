//! Real checkpoints in Hugging Face layout (`ecic::model::hf`) against transformers itself:
//! tests/fixtures/hf holds tiny random LLaMA (grouped-query attention), Phi-3 (sharded), Phi-3
//! with LongRoPE, OPT, CLIP vision, LLaVA and BLIP-2 (OPT) checkpoints with transformers'
//! outputs on fixed inputs (5.25; the script reproduces the 5.24 fixtures exactly), and a
//! Phi-3-Vision one with the outputs of its published model code, made by
//! scripts/make-hf-fixtures.sh. Tolerance: max abs error 1e-4 on outputs of magnitude ~1-5;
//! BLIP-2's greedy captions must be token-identical to transformers' `generate`.

mod common;
use common::max_abs_diff;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ecic::model::hf::{Checkpoint, VisionTower};
use ecic::model::{Backbone, Captioner, Component, Fusion, ModelConfig, PeftConfig, Phase};

const TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

fn expected(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("expected.safetensors"), &Device::Cpu)
        .expect("expected.safetensors")
}

fn ids(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

fn pretrained(dir: &Path, backbone: Backbone, fusion: Fusion) -> Captioner {
    let ck = Checkpoint::open(dir).unwrap();
    let cfg = ck.model_config(backbone, fusion).unwrap();
    let mut m = Captioner::new(&cfg, &PeftConfig::default(), Phase::Align, &Device::Cpu).unwrap();
    let n = m.load_pretrained(&ck).unwrap();
    assert!(n > 0);
    m
}

fn causal_lm_matches(name: &str) {
    let exp = expected(name);
    let m = pretrained(&fixture(name), Backbone::Llava, Fusion::Early);
    let logits = m.lm_logits(&ids(&exp["input_ids"])).unwrap();
    let err = max_abs_diff(&logits, &exp["logits"]);
    eprintln!("{name}: logits max abs err {err:e}");
    assert!(err < TOL, "{name}: logits max abs err {err}");
}

#[test]
fn llama_gqa_logits_match_transformers() {
    causal_lm_matches("llama");
}

#[test]
fn phi3_sharded_logits_match_transformers() {
    causal_lm_matches("phi3");
}

#[test]
fn clip_hidden_states_match_transformers() {
    let exp = expected("clip");
    let tower = VisionTower::load(&fixture("clip"), &Device::Cpu).unwrap();
    let hs = tower.hidden_states(&exp["pixel_values"]).unwrap();
    assert_eq!(hs.len(), 3, "embeddings + 2 layers");
    for (i, h) in hs.iter().enumerate() {
        let err = max_abs_diff(h, &exp[&format!("hidden_states.{i}")]);
        eprintln!("clip: hidden_states.{i} max abs err {err:e}");
        assert!(err < TOL, "hidden_states.{i}: max abs err {err}");
    }
}

#[test]
fn llava_logits_match_transformers() {
    let exp = expected("llava");
    let m = pretrained(&fixture("llava"), Backbone::Llava, Fusion::Early);
    assert_eq!(m.num_visual_tokens(), 16);
    let logits = m
        .logits(&exp["pixel_values"], &ids(&exp["input_ids"]))
        .unwrap();
    let err = max_abs_diff(&logits, &exp["logits"]);
    eprintln!("llava: text logits max abs err {err:e}");
    assert!(err < TOL, "llava: logits max abs err {err}");
    // Pretrained: pretrain-align trains the connector only.
    let trainable = m.trainable_vars();
    assert!(!trainable.is_empty());
    assert!(trainable
        .iter()
        .all(|t| t.component == Component::Connector));
}

/// The projector is only llava's; other backbones take the checkpoint's encoder and LM and
/// build their connector from the seed.
#[test]
fn other_backbones_load_encoder_and_lm() {
    let exp = expected("llava");
    for (b, f) in [
        (Backbone::Blip2, Fusion::Late),
        (Backbone::Llava, Fusion::Multilevel),
    ] {
        let m = pretrained(&fixture("llava"), b, f);
        // The text-only decoder is the checkpoint's (same LM as the LLaVA fixture's).
        let l = m.lm_logits(&ids(&exp["input_ids"])).unwrap();
        assert_eq!(l.dims(), &[2, 8, 64]);
    }
}

/// The tiny presets serialize exactly as before the checkpoint options existed (the options
/// are skipped at their defaults), so lineages and keys stay unchanged.
#[test]
fn tiny_config_serializes_without_the_new_options() {
    let c = ModelConfig::tiny(Backbone::Llava, Fusion::Early, 100, 0, 1, 2);
    let j = serde_json::to_value(&c).unwrap();
    assert!(j["vision"].get("layout").is_none());
    assert!(j["vision"].get("norm_eps").is_none() && j["vision"].get("mlp_hidden").is_none());
    let b = serde_json::to_value(ModelConfig::tiny(
        Backbone::Blip2,
        Fusion::Early,
        100,
        0,
        1,
        2,
    ))
    .unwrap();
    assert!(b["qformer"].get("layout").is_none(), "{}", b["qformer"]);
    assert!(j["lm"].get("rms_eps").is_none());
    assert!(j.get("projector_act").is_none());
    let back: ModelConfig = serde_json::from_value(j).unwrap();
    assert_eq!(back, c);
    let real = pretrained(&fixture("llava"), Backbone::Llava, Fusion::Early);
    let j = serde_json::to_value(real.config()).unwrap();
    assert_eq!(j["vision"]["layout"]["act"], "quick_gelu");
    // BLIP-2's tower options are absent from a CLIP layout.
    assert!(j["vision"]["layout"].get("post_norm").is_none());
    assert_eq!(j["lm"]["rms_eps"], 1e-6);
    assert_eq!(j["projector_act"], "gelu");
    let back: ModelConfig = serde_json::from_value(j).unwrap();
    assert_eq!(&back, real.config());
}

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    tmp
}

/// Rewrites `dir/model.safetensors` through `edit`.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let f = dir.join("model.safetensors");
    let mut m = candle_core::safetensors::load(&f, &Device::Cpu).unwrap();
    edit(&mut m);
    candle_core::safetensors::save(&m, &f).unwrap();
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let f = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&f, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Opens and loads into a llava/early model; the error's text.
fn load_error(dir: &Path) -> String {
    let ck = match Checkpoint::open(dir) {
        Ok(ck) => ck,
        Err(e) => return e.to_string(),
    };
    let cfg = ck.model_config(Backbone::Llava, Fusion::Early).unwrap();
    let mut m = Captioner::new(&cfg, &PeftConfig::default(), Phase::Align, &Device::Cpu).unwrap();
    match m.load_pretrained(&ck) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_tensor_names_the_key_and_the_directory() {
    let tmp = copy_fixture("llama");
    edit_weights(tmp.path(), |m| {
        m.remove("model.layers.1.mlp.up_proj.weight").unwrap();
    });
    let e = load_error(tmp.path());
    assert!(e.contains("model.layers.1.mlp.up_proj.weight"), "{e}");
    assert!(e.contains("is missing"), "{e}");
    assert!(e.contains(&tmp.path().display().to_string()), "{e}");
}

#[test]
fn wrong_shape_names_the_file_and_the_key() {
    let tmp = copy_fixture("llava");
    edit_weights(tmp.path(), |m| {
        let k = "language_model.model.layers.0.self_attn.k_proj.weight";
        m.insert(
            k.into(),
            Tensor::zeros((32, 32), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = load_error(tmp.path());
    assert!(
        e.contains("model.safetensors")
            && e.contains("language_model.model.layers.0.self_attn.k_proj.weight")
            && e.contains("[32, 32]")
            && e.contains("[16, 32]"),
        "{e}"
    );
}

#[test]
fn unsupported_configs_name_config_json_and_the_key() {
    type Case = (&'static str, fn(&mut serde_json::Value), &'static str);
    let cases: [Case; 8] = [
        (
            "llama",
            |v| v["architectures"] = serde_json::json!(["GPT2LMHeadModel"]),
            "architectures",
        ),
        (
            "llama",
            |v| v["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 2.0}),
            "rope_scaling",
        ),
        (
            "llama",
            |v| v["attention_bias"] = true.into(),
            "attention_bias",
        ),
        ("phi3", |v| v["hidden_act"] = "gelu".into(), "hidden_act"),
        (
            "llava",
            |v| v["vision_feature_select_strategy"] = "full".into(),
            "vision_feature_select_strategy",
        ),
        (
            "llava",
            |v| v["vision_config"]["layer_norm_eps"] = 1e-6.into(),
            "vision_config.layer_norm_eps",
        ),
        // Flan-T5 BLIP-2: an encoder-decoder LM.
        (
            "blip2",
            |v| v["text_config"] = serde_json::json!({"model_type": "t5"}),
            "text_config.model_type",
        ),
        (
            "blip2",
            |v| v["qformer_config"]["hidden_act"] = "gelu_new".into(),
            "qformer_config.hidden_act",
        ),
    ];
    for (name, edit, key) in cases {
        let tmp = copy_fixture(name);
        edit_config(tmp.path(), edit);
        let e = Checkpoint::open(tmp.path()).unwrap_err().to_string();
        assert!(
            e.contains("config.json") && e.contains(key),
            "{name}/{key}: {e}"
        );
    }
}

#[test]
fn directory_without_weights_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("llama").join("config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    let e = Checkpoint::open(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    let e = Checkpoint::open(&tmp.path().join("nope"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json"), "{e}");
}

// ---- `model.checkpoint` in a spec, through the `ecic` binary ----

fn ecic() -> assert_cmd::Command {
    let mut c = assert_cmd::Command::cargo_bin("ecic").unwrap();
    c.env("NO_COLOR", "1");
    c
}

fn spec_with_checkpoint(dir: &Path, ck: &Path) -> PathBuf {
    let text = format!(
        r#"
name = "hf"
seeds = [0]
[data]
synth = {{ train = 12, valid = 4, test = 2, align = 12 }}
[model]
checkpoint = "{}"
max_len = 16
[grid]
backbone = ["llava", "phi3v"]
peft = ["lora"]
fusion = ["early"]
[stages.preprocess]
augment_copies = 0
[stages.pretrain_align]
steps = 2
batch_size = 4
[stages.domain_adapt]
steps = 2
batch_size = 4
[stages.evaluate]
predict_test = false
"#,
        ck.display()
    );
    let p = dir.join("spec.toml");
    std::fs::write(&p, text).unwrap();
    p
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

/// Stages computed so far (from the sweep logs): "kind key" (e.g. "pretrain-align 6aee...").
fn computed(runs: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(runs.join("logs")).unwrap().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        for line in text.lines() {
            if let Some(rest) = line.split("computing ").nth(1) {
                let w: Vec<&str> = rest.split_whitespace().collect();
                let key = w.iter().find(|t| t.len() == 64).copied().unwrap_or("");
                v.push(format!("{} {key}", w.first().copied().unwrap_or("")));
            }
        }
    }
    v
}

#[test]
fn sweep_trains_from_a_checkpoint_and_reruns_when_its_weights_change() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_fixture("llava");
    let spec = spec_with_checkpoint(tmp.path(), ck.path());
    let runs = tmp.path().join("runs");
    let out = sweep(&spec, &runs);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(0), "{err}");
    let first = computed(&runs);
    // Two cells, each preprocess, align, adapt, cider-optimize, evaluate; preprocess at the
    // checkpoint's input size for each backbone (llava 32 px, phi3v 2x2 crops of 32 px).
    assert_eq!(first.len(), 10, "{first:?}");
    let logs = std::fs::read_dir(runs.join("logs"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect::<String>();
    assert!(
        logs.contains("preprocess 32px") && logs.contains("preprocess 64px"),
        "{logs}"
    );
    // The published align base holds the checkpoint's frozen LM and tower, and its lineage
    // the checkpoint's shapes with `pretrained`.
    let align = first
        .iter()
        .find_map(|s| s.strip_prefix("pretrain-align "))
        .unwrap();
    let entry = runs.join("objects-v1").join(align);
    let w =
        candle_core::safetensors::load(entry.join("weights.safetensors"), &Device::Cpu).unwrap();
    let src =
        candle_core::safetensors::load(ck.path().join("model.safetensors"), &Device::Cpu).unwrap();
    for (ours, theirs) in [
        ("lm.norm.weight", "language_model.model.norm.weight"),
        (
            "vision.blocks.0.mlp.fc1.weight",
            "vision_tower.encoder.layers.0.mlp.fc1.weight",
        ),
    ] {
        assert_eq!(max_abs_diff(&w[ours], &src[theirs]), 0.0, "{ours}");
    }
    let lineage: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(entry.join("lineage.json")).unwrap())
            .unwrap();
    assert_eq!(lineage["model"]["pretrained"], true);
    assert_eq!(lineage["model"]["vocab_size"], 64);
    assert_eq!(lineage["model"]["vision"]["layout"]["class_token"], true);
    // The checkpoint's file digests are memoised beside the data's, by absolute path.
    let memo = std::fs::read_to_string(runs.join("data/digests.json")).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        let abs = std::path::absolute(ck.path().join(f)).unwrap();
        assert!(memo.contains(&*abs.to_string_lossy()), "{f} not memoised");
    }
    // Nothing changed: nothing recomputed.
    let out = sweep(&spec, &runs);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        computed(&runs).len(),
        first.len(),
        "a no-op re-run computed stages"
    );
    // New weights (same shapes): pretrain-align and what follows re-run, preprocess does not.
    edit_weights(ck.path(), |m| {
        let k = "language_model.model.norm.weight";
        let w = (&m[k] * 1.5).unwrap();
        m.insert(k.into(), w);
    });
    let out = sweep(&spec, &runs);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let now = computed(&runs);
    let again: Vec<&String> = now.iter().filter(|s| !first.contains(s)).collect();
    assert_eq!(
        now.len(),
        first.len() + again.len(),
        "a stage recomputed under its old key"
    );
    assert!(again.iter().any(|k| k.contains("pretrain")), "{again:?}");
    assert!(again.iter().any(|k| k.starts_with("evaluate")), "{again:?}");
    assert!(!again.iter().any(|k| k.contains("preprocess")), "{again:?}");
}

#[test]
fn bad_checkpoints_exit_2_naming_model_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let no_tok = copy_fixture("llava");
    std::fs::remove_file(no_tok.path().join("tokenizer.json")).unwrap();
    let bad_arch = copy_fixture("llava");
    edit_config(bad_arch.path(), |v| {
        v["architectures"] = serde_json::json!(["LlavaNextForConditionalGeneration"])
    });
    let small_vocab = copy_fixture("llava");
    edit_config(small_vocab.path(), |v| {
        v["text_config"]["vocab_size"] = 32.into()
    });
    let cases: [(PathBuf, &str); 7] = [
        (tmp.path().join("nowhere"), "is not a directory"),
        // The spec's cells are llava and phi3v: BLIP-2's connector is only blip2's.
        (
            fixture("blip2"),
            "holds the connector of backbone blip2 only; backbone llava cannot be built on it",
        ),
        // The spec's llava cell on a Phi-3-Vision checkpoint.
        (
            fixture("phi3v"),
            "holds the connector of backbone phi3v only; backbone llava cannot be built on it",
        ),
        (fixture("llama"), "has no vision tower"),
        (no_tok.path().to_path_buf(), "no tokenizer.json"),
        (
            bad_arch.path().to_path_buf(),
            "LlavaNextForConditionalGeneration",
        ),
        (
            small_vocab.path().to_path_buf(),
            "has 63 ids but the checkpoint's vocabulary only 32",
        ),
    ];
    for (dir, msg) in cases {
        let spec = spec_with_checkpoint(tmp.path(), &dir);
        let out = ecic()
            .arg("plan")
            .arg(&spec)
            .arg("--runs")
            .arg(tmp.path().join("runs"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(2), "{msg}: {err}");
        assert!(
            err.contains("model.checkpoint") && err.contains(msg),
            "{msg}: {err}"
        );
    }
}

/// Tied embeddings: without `lm_head.weight`, the head is a copy of `embed_tokens`.
#[test]
fn tied_embeddings_give_the_head_a_copy_of_the_embeddings() {
    let tmp = copy_fixture("llama");
    edit_weights(tmp.path(), |m| {
        m.remove("lm_head.weight").unwrap();
    });
    // Untied, the missing head is an error naming it.
    let e = load_error(tmp.path());
    assert!(
        e.contains("lm_head.weight") && e.contains("is missing"),
        "{e}"
    );
    edit_config(tmp.path(), |v| v["tie_word_embeddings"] = true.into());
    let m = pretrained(tmp.path(), Backbone::Llava, Fusion::Early);
    let out = tmp.path().join("base.safetensors");
    m.save_base(&out).unwrap();
    let w = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert_eq!(
        max_abs_diff(&w["lm.lm_head.weight"], &w["lm.embed_tokens.weight"]),
        0.0
    );
}

/// Published checkpoints are f16/bf16: read as f32, the logits stay within the rounding of
/// the stored weights.
#[test]
fn half_precision_weights_load_as_f32() {
    let exp = expected("llama");
    for dt in [DType::F16, DType::BF16] {
        let tmp = copy_fixture("llama");
        edit_weights(tmp.path(), |m| {
            for t in m.values_mut() {
                *t = t.to_dtype(dt).unwrap();
            }
        });
        let m = pretrained(tmp.path(), Backbone::Llava, Fusion::Early);
        let logits = m.lm_logits(&ids(&exp["input_ids"])).unwrap();
        let err = max_abs_diff(&logits, &exp["logits"]);
        eprintln!("llama as {dt:?}: logits max abs err {err:e}");
        // bf16 keeps 8 bits of mantissa: ~0.4% per weight.
        assert!(err > 0.0 && err < 0.1, "{dt:?}: {err}");
    }
}

/// Gradients through the checkpoint-only parts (class token, pre-norm, quick GELU, exact GELU
/// projector): trained from the loaded weights, a directional finite difference of the loss
/// along the gradient of the CLIP tower's first MLP matches the autograd gradient.
#[test]
fn gradients_through_the_clip_tower_match_finite_differences() {
    let exp = expected("llava");
    let ck = Checkpoint::open(&fixture("llava")).unwrap();
    let mut cfg = ck.model_config(Backbone::Llava, Fusion::Early).unwrap();
    cfg.pretrained = false; // everything trainable
    let mut m = Captioner::new(&cfg, &PeftConfig::default(), Phase::Align, &Device::Cpu).unwrap();
    m.load_pretrained(&ck).unwrap();
    let img = &exp["pixel_values"];
    let ids = ids(&exp["input_ids"]);
    let (b, t) = ids.dims2().unwrap();
    let inp = ids.narrow(1, 0, t - 1).unwrap();
    let tgt = ids.narrow(1, 1, t - 1).unwrap();
    let mask = Tensor::ones((b, t - 1), DType::F32, &Device::Cpu).unwrap();
    let loss = |m: &Captioner| {
        m.loss(img, &inp, &tgt, &mask, 0.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let l = m.loss(img, &inp, &tgt, &mask, 0.0).unwrap();
    let grads = l.backward().unwrap();
    let vars = m.trainable_vars();
    for name in [
        "vision.blocks.0.mlp.fc1.weight",
        "vision.cls_token",
        "vision.pre_norm.weight",
        "connector.projector.fc1.weight",
    ] {
        let tv = vars.iter().find(|v| v.name == name).expect(name);
        let g = grads.get(tv.var.as_tensor()).expect(name).clone();
        let w0 = tv.var.as_tensor().copy().unwrap();
        let g2 = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!(g2 > 0.0 && g2.is_finite(), "{name}: |g|^2 = {g2}");
        let eps = 1e-2 / g2.sqrt();
        let at = |s: f64| {
            tv.var.set(&(&w0 + (&g * s).unwrap()).unwrap()).unwrap();
            loss(&m)
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        tv.var.set(&w0).unwrap();
        let rel = (fd - g2).abs() / g2;
        eprintln!("{name}: |g|^2 {g2:.4e}, finite difference {fd:.4e}, rel err {rel:.2e}");
        assert!(
            rel < 0.05,
            "{name}: autograd {g2} vs finite difference {fd}"
        );
    }
}

/// The same LLaVA weights under the key layouts transformers has written over time: llava-hf's
/// original one (`vision_tower.vision_model.`, `language_model.model.`,
/// `language_model.lm_head`) and the newer nested one (`model.vision_tower.`,
/// `model.language_model.`, `model.multi_modal_projector.`, `lm_head`). Same logits.
#[test]
fn llava_key_layouts_load_alike() {
    let exp = expected("llava");
    let renames: [fn(&str) -> String; 2] = [
        |k| match k.strip_prefix("vision_tower.") {
            Some(r) => format!("vision_tower.vision_model.{r}"),
            None => k.to_string(),
        },
        |k| {
            if let Some(r) = k.strip_prefix("language_model.model.") {
                format!("model.language_model.{r}")
            } else if k == "language_model.lm_head.weight" {
                "lm_head.weight".into()
            } else {
                format!("model.{k}")
            }
        },
    ];
    for rename in renames {
        let tmp = copy_fixture("llava");
        edit_weights(tmp.path(), |m| {
            *m = m.drain().map(|(k, v)| (rename(&k), v)).collect();
        });
        let m = pretrained(tmp.path(), Backbone::Llava, Fusion::Early);
        let logits = m
            .logits(&exp["pixel_values"], &ids(&exp["input_ids"]))
            .unwrap();
        let err = max_abs_diff(&logits, &exp["logits"]);
        assert!(err < TOL, "{}: {err}", rename("vision_tower.x"));
    }
}

/// LongRoPE as transformers 5 writes it (`rope_parameters`, `rope_type = "longrope"`).
#[test]
fn phi3_longrope_logits_match_transformers() {
    causal_lm_matches("phi3-longrope");
}

/// The same checkpoint with its config in the form Phi-3-vision's hub config has
/// (transformers 4.38: `rope_scaling` with `type = "su"`, the original length at the top
/// level) gives the same logits.
#[test]
fn phi3_longrope_in_the_older_su_form_matches_too() {
    let exp = expected("phi3-longrope");
    let tmp = copy_fixture("phi3-longrope");
    edit_config(tmp.path(), |v| {
        let rp = v["rope_parameters"].clone();
        v.as_object_mut().unwrap().remove("rope_parameters");
        v["rope_theta"] = rp["rope_theta"].clone();
        v["rope_scaling"] = serde_json::json!({
            "type": "su",
            "short_factor": rp["short_factor"],
            "long_factor": rp["long_factor"],
        });
    });
    let m = pretrained(tmp.path(), Backbone::Llava, Fusion::Early);
    let logits = m.lm_logits(&ids(&exp["input_ids"])).unwrap();
    let err = max_abs_diff(&logits, &exp["logits"]);
    assert!(err < TOL, "su form: logits max abs err {err}");
    // Without the scaling the logits differ: the test above is not passing by accident.
    let plain = copy_fixture("phi3-longrope");
    edit_config(plain.path(), |v| {
        v.as_object_mut().unwrap().remove("rope_parameters");
    });
    let m = pretrained(plain.path(), Backbone::Llava, Fusion::Early);
    let err = max_abs_diff(
        &m.lm_logits(&ids(&exp["input_ids"])).unwrap(),
        &exp["logits"],
    );
    assert!(err > 1e-2, "plain RoPE matched LongRoPE's logits ({err})");
}

/// Past `original_max_position_embeddings` LongRoPE would switch to its long factors, which the
/// decoder does not implement: a model whose sequences could get there is refused.
#[test]
fn longrope_refuses_sequences_past_the_original_length() {
    let ck = Checkpoint::open(&fixture("phi3-longrope")).unwrap();
    let mut cfg = ck.model_config(Backbone::Llava, Fusion::Early).unwrap();
    cfg.max_caption_len = 64;
    let e = Captioner::new(&cfg, &PeftConfig::default(), Phase::Align, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("LongRoPE") && e.contains("64"), "{e}");
}

/// OPT (BLIP-2's LM): LayerNorm, learned positions with transformers' offset of 2, ReLU,
/// biases, tied head.
#[test]
fn opt_logits_match_transformers() {
    causal_lm_matches("opt");
}

/// The OPT decoder's cached decoding (positions continue from the cache, no RoPE) gives the
/// logits of the full forward, with a visual prefix before BOS as BLIP-2 places its queries.
#[test]
fn opt_cached_decoding_matches_the_full_forward() {
    let m = pretrained(&fixture("opt"), Backbone::Llava, Fusion::Early);
    let exp = expected("opt");
    let mut ids = ids(&exp["input_ids"]).narrow(1, 0, 6).unwrap();
    let bos = Tensor::full(m.config().bos_id, (2, 1), &Device::Cpu).unwrap();
    ids = Tensor::cat(&[&bos, &ids.narrow(1, 1, 5).unwrap()], 1).unwrap();
    let s = m.config().input_size();
    let px = Tensor::randn(0f32, 1.0, (2, 3, s, s), &Device::Cpu).unwrap();
    let full = m.logits(&px, &ids).unwrap();
    let (first, mut state) = m.begin(&px, 1).unwrap();
    let mut steps = vec![first];
    let rows: Vec<Vec<u32>> = ids.to_vec2().unwrap();
    for p in 1..6 {
        steps.push(m.step(&[rows[0][p], rows[1][p]], &mut state).unwrap());
    }
    let cached = Tensor::stack(&steps, 1).unwrap();
    let err = max_abs_diff(&cached, &full);
    assert!(err < 1e-4, "cached vs full: {err}");
}

/// QLoRA and LoRA cells on a checkpoint run end to end; domain-adapt holds the QLoRA cell's frozen
/// base in 4 bits (loaded tensor by tensor from the align stage's weights and quantized as each
/// arrives) and the LoRA cell's in f32.
#[test]
fn sweep_with_qlora_on_a_checkpoint_holds_the_base_in_4_bits() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_fixture("llava");
    let spec = spec_with_checkpoint(tmp.path(), ck.path());
    let text = std::fs::read_to_string(&spec)
        .unwrap()
        .replace(
            r#"backbone = ["llava", "phi3v"]"#,
            r#"backbone = ["llava"]"#,
        )
        .replace(r#"peft = ["lora"]"#, r#"peft = ["lora", "qlora"]"#);
    std::fs::write(&spec, text).unwrap();
    let runs = tmp.path().join("runs");
    let out = sweep(&spec, &runs);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(0), "{err}");
    let conn = rusqlite::Connection::open(runs.join("ecic.sqlite")).unwrap();
    let frozen = |peft: &str| -> f64 {
        conn.query_row(
            "SELECT value FROM results WHERE stage = 'domain-adapt' AND metric = 'frozen_bytes' \
             AND peft = ?1",
            [peft],
            |r| r.get(0),
        )
        .unwrap()
    };
    let (q, f) = (frozen("qlora"), frozen("lora"));
    // Q4_0 holds 32 weights in 18 bytes against 128; norms and embeddings stay f32.
    assert!(q < 0.5 * f, "qlora frozen {q} bytes, lora {f}");
    let cells: i64 = conn
        .query_row(
            "SELECT count(DISTINCT cell) FROM results WHERE stage = 'evaluate' \
             AND split = 'valid' AND metric = 'cider_d'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(cells, 2, "valid CIDEr-D of both cells");
}

/// BLIP-2 with OPT: its tower (class token read, post-norm, eps 1e-6), the post-LN Q-Former
/// with cross-attention every second layer, the projection, and OPT reading the queries before
/// BOS as transformers places its image tokens.
#[test]
fn blip2_logits_match_transformers() {
    let exp = expected("blip2");
    let m = pretrained(&fixture("blip2"), Backbone::Blip2, Fusion::Early);
    assert_eq!(m.num_visual_tokens(), 32);
    let logits = m
        .logits(&exp["pixel_values"], &ids(&exp["input_ids"]))
        .unwrap();
    let err = max_abs_diff(&logits, &exp["logits"]);
    eprintln!("blip2: text logits max abs err {err:e}");
    assert!(err < TOL, "blip2: logits max abs err {err}");
    // Pretrained: pretrain-align trains the checkpoint's connector only.
    let trainable = m.trainable_vars();
    assert!(trainable
        .iter()
        .all(|t| t.component == Component::Connector));
    for name in [
        "connector.qformer.query_tokens",
        "connector.qformer.layers.2.cross_attn.kv_proj.weight",
        "connector.language_projection.weight",
    ] {
        assert!(trainable.iter().any(|t| t.name == name), "{name}");
    }
    // Layer 1 has no cross-attention (every second layer, from the first).
    assert!(!trainable
        .iter()
        .any(|t| t.name.starts_with("connector.qformer.layers.1.cross_attn")));
}

/// Greedy captions of 8 images, token for token those of transformers' `generate` (which
/// starts from the query placeholders and BOS and stops at the config's EOS, "\n").
#[test]
fn blip2_greedy_captions_match_transformers_generate() {
    let exp = expected("blip2");
    let m = pretrained(&fixture("blip2"), Backbone::Blip2, Fusion::Early);
    let eos = m.config().eos_id;
    assert_eq!(eos, 14);
    let want: Vec<Vec<u32>> = ids(&exp["gen_ids"])
        .to_vec2::<u32>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().take_while(|&t| t != eos).collect())
        .collect();
    let distinct: std::collections::BTreeSet<_> = want.iter().collect();
    assert!(
        distinct.len() > 2,
        "the captions do not depend on the image"
    );
    let cfg = ecic::decode::DecodeConfig {
        max_len: ids(&exp["gen_ids"]).dim(1).unwrap(),
        ..Default::default()
    };
    let got = ecic::decode::generate(&m, &exp["gen_pixel_values"], &cfg, 0).unwrap();
    assert_eq!(got, want);
}

/// The earliest BLIP-2 conversions stored the tower's query and value biases alone
/// (`q_bias`, `v_bias`); the key bias is zero then, and a bias on the keys never changes the
/// attention (it adds the same score to a whole row), so the logits are the fixture's.
#[test]
fn blip2_separate_q_and_v_biases_load_alike() {
    let exp = expected("blip2");
    let tmp = copy_fixture("blip2");
    edit_weights(tmp.path(), |m| {
        let keys: Vec<String> = m
            .keys()
            .filter(|k| k.ends_with("self_attn.qkv.bias"))
            .cloned()
            .collect();
        assert_eq!(keys.len(), 2);
        for k in keys {
            let b = m.remove(&k).unwrap();
            let at = k.trim_end_matches("qkv.bias");
            m.insert(format!("{at}q_bias"), b.narrow(0, 0, 32).unwrap());
            m.insert(format!("{at}v_bias"), b.narrow(0, 64, 32).unwrap());
        }
    });
    let m = pretrained(tmp.path(), Backbone::Blip2, Fusion::Early);
    let logits = m
        .logits(&exp["pixel_values"], &ids(&exp["input_ids"]))
        .unwrap();
    let err = max_abs_diff(&logits, &exp["logits"]);
    assert!(err < TOL, "q_bias/v_bias: {err}");
}

/// A checkpoint whose family holds the backbone's connector, in a sweep of every PEFT method and
/// the zero-shot row: one pretrain-align (the checkpoint's connector fine-tuned) serves the LoRA,
/// QLoRA and adapter cells; the zero-shot cell evaluates the checkpoint as it is (its evaluate
/// reads the preprocess entry alone); all four land in the store with a valid CIDEr-D. Returns
/// the fixture's copy, the runs directory and the stages computed.
fn sweep_every_peft(
    tmp: &Path,
    fixture: &str,
    backbone: &str,
) -> (tempfile::TempDir, PathBuf, Vec<String>) {
    let ck = copy_fixture(fixture);
    let spec = spec_with_checkpoint(tmp, ck.path());
    let text = std::fs::read_to_string(&spec)
        .unwrap()
        .replace(
            r#"backbone = ["llava", "phi3v"]"#,
            &format!(r#"backbone = ["{backbone}"]"#),
        )
        .replace(
            r#"peft = ["lora"]"#,
            r#"peft = ["none", "lora", "qlora", "adapter"]"#,
        );
    std::fs::write(&spec, text).unwrap();
    let runs = tmp.join("runs");
    let out = sweep(&spec, &runs);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(0), "{err}");
    let done = computed(&runs);
    let count = |kind: &str| done.iter().filter(|s| s.starts_with(kind)).count();
    assert_eq!(
        (
            count("preprocess"),
            count("pretrain-align"),
            count("domain-adapt"),
            count("evaluate")
        ),
        (1, 1, 3, 4),
        "{done:?}"
    );
    let conn = rusqlite::Connection::open(runs.join("ecic.sqlite")).unwrap();
    let pefts: Vec<String> = conn
        .prepare(
            "SELECT DISTINCT peft FROM results WHERE stage = 'evaluate' AND split = 'valid' \
             AND metric = 'cider_d' AND backbone = ?1 ORDER BY peft",
        )
        .unwrap()
        .query_map([backbone], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(pefts, ["adapter", "lora", "none", "qlora"]);
    let zero_shot_inputs: String = conn
        .query_row(
            "SELECT cs.key FROM cell_stages cs JOIN cells c ON c.id = cs.cell_id \
             WHERE c.name = ?1 AND cs.kind = 'evaluate'",
            [format!("{backbone}-none-early-s0")],
            |r| r.get(0),
        )
        .unwrap();
    let manifest = std::fs::read_to_string(
        runs.join("objects-v1")
            .join(&zero_shot_inputs)
            .join("manifest.json"),
    )
    .unwrap();
    let preprocess = done
        .iter()
        .find_map(|s| s.strip_prefix("preprocess "))
        .unwrap();
    assert!(manifest.contains(preprocess), "{manifest}");
    assert!(!done.iter().any(|s| s.starts_with("pretrain-align")
        && manifest.contains(s.trim_start_matches("pretrain-align "))));
    (ck, runs, done)
}

#[test]
fn sweep_on_a_blip2_checkpoint_runs_every_peft_and_the_zero_shot_row() {
    let tmp = tempfile::tempdir().unwrap();
    let (ck, runs, done) = sweep_every_peft(tmp.path(), "blip2", "blip2");
    let align = done
        .iter()
        .find_map(|s| s.strip_prefix("pretrain-align "))
        .unwrap();
    let entry = runs.join("objects-v1").join(align);
    let lineage: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(entry.join("lineage.json")).unwrap())
            .unwrap();
    assert_eq!(lineage["model"]["qformer"]["layout"]["kind"], "bert");
    assert_eq!(
        lineage["model"]["vision"]["layout"]["read_class_token"],
        true
    );
    // The frozen tower and LM in the published base are the checkpoint's.
    let w =
        candle_core::safetensors::load(entry.join("weights.safetensors"), &Device::Cpu).unwrap();
    let src =
        candle_core::safetensors::load(ck.path().join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(
        max_abs_diff(
            &w["vision.post_norm.weight"],
            &src["vision_model.post_layernorm.weight"]
        ),
        0.0
    );
}

// ---- Phi-3-Vision (`Phi3VForCausalLM`) ----
// Reference outputs from the published image_embedding_phi3_v.py (its 336-px constants made the
// tiny tower's) and transformers' Phi3ForCausalLM with LongRoPE: scripts/phi3v_fixture.py.

#[test]
fn phi3v_tower_hd_embeddings_and_logits_match_the_reference() {
    let exp = expected("phi3v");
    // The tower on the views the image processor stacks (global view, then the crops):
    // hidden_states[-2] without the class token.
    let tower = VisionTower::load(&fixture("phi3v"), &Device::Cpu).unwrap();
    let hs = tower.hidden_states(&exp["views"]).unwrap();
    assert_eq!(hs.len(), 4, "embeddings + 3 layers");
    let f = &hs[hs.len() - 2];
    let f = f.narrow(1, 1, f.dim(1).unwrap() - 1).unwrap();
    let err = max_abs_diff(&f, &exp["img_features"]);
    eprintln!("phi3v: tower features max abs err {err:e}");
    assert!(err < TOL, "phi3v: tower features max abs err {err}");
    // From the HD image: our global view, crops, merge, separators and projector against the
    // reference's hd_feature_transform.
    let m = pretrained(&fixture("phi3v"), Backbone::Phi3v, Fusion::Early);
    assert_eq!(m.num_visual_tokens(), 27);
    let hd = m.visual_tokens(&exp["pixel_values"], false).unwrap();
    let err = max_abs_diff(&hd, &exp["hd_embeds"]);
    eprintln!("phi3v: HD image embeddings max abs err {err:e}");
    assert!(err < TOL, "phi3v: HD image embeddings max abs err {err}");
    // The image's tokens first, then BOS and the caption: logits at the caption positions.
    let logits = m
        .logits(&exp["pixel_values"], &ids(&exp["input_ids"]))
        .unwrap();
    let err = max_abs_diff(&logits, &exp["logits"]);
    eprintln!("phi3v: text logits max abs err {err:e}");
    assert!(err < TOL, "phi3v: logits max abs err {err}");
    // The connector (separators included) is the checkpoint's; pretrain-align trains it alone.
    let trainable = m.trainable_vars();
    assert!(!trainable.is_empty());
    assert!(trainable
        .iter()
        .all(|t| t.component == Component::Connector));
}

/// The fixture's weights with one tensor changed through `edit` (both shards rewritten).
fn edit_phi3v_weights(dir: &Path, key: &str, edit: impl FnOnce(&Tensor) -> Option<Tensor>) {
    let mut edit = Some(edit);
    for name in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        let f = dir.join(name);
        let mut m = candle_core::safetensors::load(&f, &Device::Cpu).unwrap();
        if let Some(t) = m.get(key).cloned() {
            match (edit.take().unwrap())(&t) {
                Some(t) => m.insert(key.to_string(), t),
                None => m.remove(key),
            };
            candle_core::safetensors::save(&m, &f).unwrap();
        }
    }
    assert!(edit.is_none(), "{key} not in the fixture");
}

/// A Phi-3-Vision checkpoint holds the phi3v connector; the separators must be there, and the
/// published options we do not implement are refused naming config.json and the key.
#[test]
fn phi3v_checkpoints_refuse_what_they_do_not_support() {
    let no_sep = copy_fixture("phi3v");
    edit_phi3v_weights(no_sep.path(), "model.vision_embed_tokens.sub_GN", |_| None);
    let e = Checkpoint::open(no_sep.path()).unwrap_err().to_string();
    assert!(e.contains("model.vision_embed_tokens.sub_GN"), "{e}");
    let cases: [(&str, &str, serde_json::Value); 7] = [
        ("embd_layer", "hd_transform_order", "glb_sub".into()),
        ("embd_layer", "use_hd_transform", false.into()),
        ("embd_layer", "projection_cls", "linear".into()),
        ("img_processor", "layer_idx", (-1).into()),
        ("img_processor", "num_img_tokens", 16.into()),
        ("img_processor", "image_dim_out", 64.into()),
        ("img_processor", "name", "siglip".into()),
    ];
    for (obj, k, val) in cases {
        let tmp = copy_fixture("phi3v");
        edit_config(tmp.path(), |v| v[obj][k] = val);
        let e = Checkpoint::open(tmp.path()).unwrap_err().to_string();
        let key = format!("{obj}.{k}");
        assert!(e.contains("config.json") && e.contains(&key), "{key}: {e}");
    }
    // Without a tower description only the published code's tower is known.
    let other = copy_fixture("phi3v");
    edit_config(other.path(), |v| {
        let ip = v["img_processor"].as_object_mut().unwrap();
        ip.remove("vision_config");
        ip.insert("model_name".into(), "openai/clip-vit-base-patch16".into());
    });
    let e = Checkpoint::open(other.path()).unwrap_err().to_string();
    assert!(e.contains("img_processor.model_name"), "{e}");
    let ck = Checkpoint::open(&fixture("phi3v")).unwrap();
    assert_eq!(ck.backbone(), Some(Backbone::Phi3v));
    assert!(ck.has_lm() && ck.has_vision());
}

/// microsoft/Phi-3-vision-128k-instruct's `config.json` describes no tower: its code builds
/// CLIP ViT-L/14 at 336 px, and so do we; the LM is the top level, with LongRoPE ("su").
#[test]
fn the_published_phi3v_config_means_vit_l_336() {
    let tmp = copy_fixture("phi3v");
    edit_config(tmp.path(), |v| {
        v["img_processor"] = serde_json::json!({
            "image_dim_out": 1024, "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model", "num_img_tokens": 144});
    });
    let ck = Checkpoint::open(tmp.path()).unwrap();
    let v = ck.vision_config().unwrap();
    assert_eq!(
        (v.image_size, v.patch_size, v.width, v.depth, v.heads),
        (336, 14, 1024, 24, 16)
    );
    let c = ck.model_config(Backbone::Phi3v, Fusion::Early).unwrap();
    let rs = c.lm.rope_scaling.as_ref().expect("LongRoPE");
    assert_eq!(rs.original_max_position_embeddings, 128);
    assert!((rs.attention_factor - (1.0 + 4f64.ln() / 128f64.ln()).sqrt()).abs() < 1e-12);
    assert_eq!(c.input_size(), 336 * c.hd_grid);
}

#[test]
fn sweep_on_a_phi3v_checkpoint_runs_every_peft_and_the_zero_shot_row() {
    let tmp = tempfile::tempdir().unwrap();
    // One preprocess (2x2 crops of 32 px) and one pretrain-align serve the trained cells.
    let (ck, runs, done) = sweep_every_peft(tmp.path(), "phi3v", "phi3v");
    // The align base keeps the checkpoint's LM and tower; its connector started from the
    // checkpoint's and was trained.
    let align = done
        .iter()
        .find_map(|s| s.strip_prefix("pretrain-align "))
        .unwrap();
    let w = candle_core::safetensors::load(
        runs.join("objects-v1")
            .join(align)
            .join("weights.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let shard = |n: &str| candle_core::safetensors::load(ck.path().join(n), &Device::Cpu).unwrap();
    let (s1, s2) = (
        shard("model-00001-of-00002.safetensors"),
        shard("model-00002-of-00002.safetensors"),
    );
    assert_eq!(
        max_abs_diff(&w["lm.norm.weight"], &s2["model.norm.weight"]),
        0.0
    );
    let pos =
        "model.vision_embed_tokens.img_processor.vision_model.embeddings.position_embedding.weight";
    assert_eq!(max_abs_diff(&w["vision.pos_embed"], &s1[pos]), 0.0);
    let sep = s1["model.vision_embed_tokens.sub_GN"]
        .flatten_all()
        .unwrap();
    let moved = max_abs_diff(&w["connector.sub_sep"], &sep);
    assert!(moved > 0.0 && moved < 0.1, "sub_GN moved by {moved}");
}
