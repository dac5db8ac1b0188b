//! Validation: types section by section (so that every section's first problem
//! is reported, not only the first of the file), then value checks.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::{did_you_mean, Issues};
use super::params::*;

pub(super) const TOP_KEYS: &[&str] = &[
    "name",
    "description",
    "seeds",
    "data",
    "model",
    "peft",
    "foundation",
    "stages",
    "resources",
    "grid",
    "exclude",
    "search",
];
/// Most retrieved captions per image (`model.retrieve`).
const MAX_RETRIEVE: usize = 4;
/// Upper bounds on sizes, so that a typo (`r = 1e8`) is a spec error naming
/// its key rather than an allocation abort minutes later. Each is far above
/// what the models here or the real MUGE data need (docs/spec.md, "Bounds").
const MAX_RANK: usize = 1024;
const MAX_TOKENS: usize = 4096;
const MAX_SYNTH_IMAGES: usize = 1_000_000;
const MAX_BATCH: usize = 4096;
const MAX_STEPS: usize = 10_000_000;
const MAX_SAMPLES: usize = 64;
const STAGE_KINDS: &[&str] = &[
    "preprocess",
    "pretrain_vision",
    "pretrain_lm",
    "pretrain_align",
    "domain_adapt",
    "cider_optimize",
    "evaluate",
];

/// Every NaN or infinite float in a TOML tree, with its dotted key under
/// `at`. TOML has them (`lr = nan`), JSON does not: the spec's JSON tree
/// would turn them into `null` and the type error would not say why.
pub(super) fn non_finite(v: &toml::Value, at: &str) -> Vec<(String, f64)> {
    let join = |k: &str| {
        if at.is_empty() {
            k.to_string()
        } else {
            format!("{at}.{k}")
        }
    };
    match v {
        toml::Value::Float(f) if !f.is_finite() => vec![(at.to_string(), *f)],
        toml::Value::Table(t) => t
            .iter()
            .flat_map(|(k, v)| non_finite(v, &join(k)))
            .collect(),
        toml::Value::Array(a) => a.iter().flat_map(|v| non_finite(v, at)).collect(),
        _ => Vec::new(),
    }
}

/// Deserialize `value` as `T`, recording an error under `at` on failure.
fn typed<T: DeserializeOwned>(at: &str, value: &Value, issues: &mut Issues) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(t) => Some(t),
        Err(e) => {
            let inner = e.path().to_string();
            let mut key = at.to_string();
            if inner != "." && !inner.is_empty() {
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(&inner);
            }
            let msg = e.inner().to_string();
            let msg = explain_unknown_field(&msg, &mut key);
            if key.is_empty() {
                issues.general(msg);
            } else {
                issues.at(key, msg);
            }
            None
        }
    }
}

/// serde says "unknown field `lrr`, expected one of `lr`, ..."; turn it into a
/// did-you-mean and point the key at the unknown field.
fn explain_unknown_field(msg: &str, key: &mut String) -> String {
    let Some(rest) = msg.strip_prefix("unknown field `") else {
        return msg.to_string();
    };
    let Some((field, tail)) = rest.split_once('`') else {
        return msg.to_string();
    };
    let expected: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
    if !key.ends_with(field) {
        if !key.is_empty() {
            key.push('.');
        }
        key.push_str(field);
    }
    let hint = did_you_mean(field, expected.iter().copied()).unwrap_or_default();
    format!(
        "unknown key{hint}; known keys here: {}",
        expected.join(", ")
    )
}

/// Check types section by section, then the whole config.
pub(super) fn sections(tree: &Value, issues: &mut Issues) -> Option<Config> {
    let Value::Object(top) = tree else {
        issues.general("the spec must be a TOML table");
        return None;
    };
    let before = issues.list.len();
    for k in top.keys() {
        if !TOP_KEYS.contains(&k.as_str()) {
            let hint = did_you_mean(k, TOP_KEYS.iter().copied()).unwrap_or_default();
            issues.at(
                k.clone(),
                format!(
                    "unknown key{hint}; top-level keys are: {}",
                    TOP_KEYS.join(", ")
                ),
            );
        }
    }
    if !top.contains_key("name") {
        issues.general("missing `name`: every spec names its experiment (`name = \"ablation\"`)");
    }
    if let Some(v) = top.get("data") {
        typed::<DataSpec>("data", v, issues);
    }
    if let Some(v) = top.get("model") {
        typed::<ModelSpec>("model", v, issues);
    }
    if let Some(v) = top.get("peft") {
        typed::<PeftSpec>("peft", v, issues);
    }
    if let Some(v) = top.get("foundation") {
        typed::<FoundationSpec>("foundation", v, issues);
    }
    if let Some(Value::Object(stages)) = top.get("stages") {
        for (k, v) in stages {
            let at = format!("stages.{k}");
            match k.as_str() {
                "preprocess" => drop(typed::<PreprocessSpec>(&at, v, issues)),
                "pretrain_vision" | "pretrain_lm" | "pretrain_align" | "domain_adapt" => {
                    drop(typed::<TrainSpec>(&at, v, issues))
                }
                "cider_optimize" => drop(typed::<CiderSpec>(&at, v, issues)),
                "evaluate" => drop(typed::<EvaluateSpec>(&at, v, issues)),
                other => {
                    let hint = did_you_mean(other, STAGE_KINDS.iter().copied()).unwrap_or_default();
                    issues.at(
                        at,
                        format!(
                            "unknown stage{hint}; stages are: {}",
                            STAGE_KINDS.join(", ")
                        ),
                    );
                }
            }
        }
    }
    if let Some(Value::Object(res)) = top.get("resources") {
        for (k, v) in res {
            let at = format!("resources.{k}");
            if !STAGE_KINDS.contains(&k.as_str()) {
                let hint = did_you_mean(k, STAGE_KINDS.iter().copied()).unwrap_or_default();
                issues.at(
                    at.clone(),
                    format!(
                        "unknown stage kind{hint}; kinds are: {}",
                        STAGE_KINDS.join(", ")
                    ),
                );
            }
            typed::<crate::exec::Resources>(&at, v, issues);
        }
    }
    if issues.list.len() > before {
        return None;
    }
    typed::<Config>("", tree, issues)
}

fn positive(issues: &mut Issues, key: &str, v: f64) {
    if !(v > 0.0 && v.is_finite()) {
        issues.at(key, format!("must be a positive number (got {v})"));
    }
}

fn at_most<T: TryInto<u64>>(issues: &mut Issues, key: &str, v: T, max: usize) {
    let v = v.try_into().unwrap_or(u64::MAX);
    if v > max as u64 {
        issues.at(key, format!("{v} is over the limit of {max}"));
    }
}

fn one_of(issues: &mut Issues, key: &str, v: &str, allowed: &[&str]) {
    if !allowed.contains(&v) {
        let hint = did_you_mean(v, allowed.iter().copied()).unwrap_or_default();
        issues.at(
            key,
            format!(
                "`{v}` is not allowed{hint}; expected one of {}",
                allowed.join(", ")
            ),
        );
    }
}

fn train(issues: &mut Issues, at: &str, t: &TrainSpec) {
    positive(issues, &format!("{at}.lr"), t.lr);
    if t.steps == 0 {
        issues.at(format!("{at}.steps"), "must be at least 1");
    }
    at_most(issues, &format!("{at}.steps"), t.steps, MAX_STEPS);
    if t.batch_size == 0 {
        issues.at(format!("{at}.batch_size"), "must be at least 1");
    }
    at_most(issues, &format!("{at}.batch_size"), t.batch_size, MAX_BATCH);
    if t.accum == 0 {
        issues.at(format!("{at}.accum"), "must be at least 1");
    }
    at_most(issues, &format!("{at}.accum"), t.accum, MAX_BATCH);
    if !(0.0..=1.0).contains(&t.min_lr_ratio) {
        issues.at(
            format!("{at}.min_lr_ratio"),
            format!("must be in [0, 1] (got {})", t.min_lr_ratio),
        );
    }
    if t.weight_decay < 0.0 || !t.weight_decay.is_finite() {
        issues.at(
            format!("{at}.weight_decay"),
            format!("must be >= 0 (got {})", t.weight_decay),
        );
    }
    if t.grad_clip < 0.0 || !t.grad_clip.is_finite() {
        issues.at(
            format!("{at}.grad_clip"),
            format!("must be >= 0, 0 = no clipping (got {})", t.grad_clip),
        );
    }
    if !(0.0..1.0).contains(&t.label_smoothing) {
        issues.at(
            format!("{at}.label_smoothing"),
            format!("must be in [0, 1) (got {})", t.label_smoothing),
        );
    }
    for (k, v) in &t.lr_mult {
        one_of(
            issues,
            &format!("{at}.lr_mult.{k}"),
            k,
            &["vision", "connector", "lm", "adapter"],
        );
        if !(*v >= 0.0 && v.is_finite()) {
            issues.at(
                format!("{at}.lr_mult.{k}"),
                format!("must be >= 0 (got {v})"),
            );
        }
    }
}

fn lora(issues: &mut Issues, at: &str, l: &LoraSpec) {
    if l.r == 0 {
        issues.at(format!("{at}.r"), "the LoRA rank must be at least 1");
    }
    at_most(issues, &format!("{at}.r"), l.r, MAX_RANK);
    positive(issues, &format!("{at}.alpha"), l.alpha);
    if !(0.0..1.0).contains(&l.dropout) {
        issues.at(
            format!("{at}.dropout"),
            format!("must be in [0, 1) (got {})", l.dropout),
        );
    }
    if l.targets.is_empty() {
        issues.at(
            format!("{at}.targets"),
            "name at least one linear layer to wrap",
        );
    }
    for t in &l.targets {
        one_of(
            issues,
            &format!("{at}.targets"),
            t,
            &["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"],
        );
    }
    modules_to_save(issues, at, &l.modules_to_save);
}

fn modules_to_save(issues: &mut Issues, at: &str, mods: &[String]) {
    for m in mods {
        one_of(
            issues,
            &format!("{at}.modules_to_save"),
            m,
            &["embed_tokens", "lm_head"],
        );
    }
}

/// `model.checkpoint` names a directory: it must hold a supported vision-language checkpoint
/// (vision tower and LM: LLaVA, BLIP-2 or Phi-3-Vision) that serves the cell's backbone (BLIP-2
/// only `blip2`, Phi-3-Vision only `phi3v`), with a tokenizer, and a set
/// `stages.preprocess.image_size` must be its input.
fn checkpoint(c: &Config, dir: &Path, backbone: &str, issues: &mut Issues) {
    let ck = match crate::model::hf::Checkpoint::open(dir) {
        Ok(ck) => ck,
        Err(e) => {
            issues.at("model.checkpoint", e.to_string());
            return;
        }
    };
    if !(ck.has_lm() && ck.has_vision()) {
        issues.at(
            "model.checkpoint",
            format!(
                "{}: a {} checkpoint has no {}; a sweep needs a \
                 LlavaForConditionalGeneration, Blip2ForConditionalGeneration or \
                 Phi3VForCausalLM (vision tower and language model)",
                dir.display(),
                ck.arch(),
                if ck.has_lm() {
                    "vision tower"
                } else {
                    "language model"
                }
            ),
        );
        return;
    }
    // Baselines ("nn", "mfc") and the base spec ("") build no model.
    let b = serde_json::from_value::<crate::model::Backbone>(serde_json::json!(backbone));
    if let (Ok(b), Some(only)) = (b, ck.backbone()) {
        if b != only {
            let only = serde_json::to_value(only).unwrap_or_default();
            issues.at(
                "model.checkpoint",
                format!(
                    "{}: a {} checkpoint holds the connector of backbone {} only; backbone \
                     {backbone} cannot be built on it",
                    dir.display(),
                    ck.arch(),
                    only.as_str().unwrap_or("?"),
                ),
            );
            return;
        }
    }
    if c.stages.preprocess.tokenizer.is_none() && !dir.join("tokenizer.json").is_file() {
        issues.at(
            "model.checkpoint",
            format!(
                "{}: no tokenizer.json; captions must be tokenized with the checkpoint's own \
                 tokenizer (or set stages.preprocess.tokenizer)",
                dir.display()
            ),
        );
    }
    let size = c.stages.preprocess.image_size as usize;
    if let Some(want) = super::checkpoint::input_size(&ck, backbone, &c.model.preset) {
        if size != 0 && size != want {
            issues.at(
                "stages.preprocess.image_size",
                format!(
                    "{size} does not match model.checkpoint's {want} px input for {backbone} \
                     (leave it 0)"
                ),
            );
        }
    }
}

/// Value checks on a typed config. `backbone` is the cell's backbone ("" for
/// the base spec).
pub(super) fn semantics(c: &Config, spec_dir: &Path, backbone: &str, issues: &mut Issues) {
    if c.name.trim().is_empty() {
        issues.at("name", "must not be empty");
    }
    // The name is a directory under reports/ and a key in the store: a path
    // separator or a control character (NUL ends a C string) would make two
    // names one, or cut one short.
    if let Some(ch) = c
        .name
        .chars()
        .find(|ch| ch.is_control() || matches!(ch, '/' | '\\'))
    {
        issues.at(
            "name",
            format!(
                "must not contain {}: it names reports/<name>/ and the sweep in the store",
                match ch {
                    '/' | '\\' => format!("`{ch}`"),
                    _ => format!("control character U+{:04X}", ch as u32),
                }
            ),
        );
    }
    if c.name.contains('@') {
        issues.at(
            "name",
            "must not contain `@`: `NAME@N` names revision N of a sweep",
        );
    }
    if c.seeds.is_empty() {
        issues.at("seeds", "give at least one seed");
    }
    if c.data.source != "synth" {
        let dir = spec_dir.join(&c.data.source);
        if !dir.is_dir() {
            issues.at(
                "data.source",
                format!(
                    "`{}` is neither `synth` nor a directory ({} does not exist)",
                    c.data.source,
                    dir.display()
                ),
            );
        }
    }
    for (split, p) in [
        ("train", &c.data.policy.train),
        ("valid", &c.data.policy.valid),
        ("test", &c.data.policy.test),
    ] {
        one_of(
            issues,
            &format!("data.policy.{split}"),
            p,
            &["fail", "skip"],
        );
    }
    if c.data.synth.train == 0 || c.data.synth.valid == 0 {
        issues.at("data.synth", "train and valid need at least one image each");
    }
    for (k, v) in [
        ("train", c.data.synth.train),
        ("valid", c.data.synth.valid),
        ("test", c.data.synth.test),
        ("align", c.data.synth.align),
    ] {
        at_most(issues, &format!("data.synth.{k}"), v, MAX_SYNTH_IMAGES);
    }
    one_of(issues, "model.preset", &c.model.preset, &["tiny", "base"]);
    one_of(issues, "model.vision", &c.model.vision, &["frozen", "lora"]);
    one_of(
        issues,
        "model.stem",
        &c.model.stem,
        &["patch", "conv", "patch_conv"],
    );
    if c.model.stem != "patch" && c.model.checkpoint.is_some() {
        issues.at(
            "model.stem",
            "`conv` builds a new stem trained from scratch; a model.checkpoint brings its own \
             patch embedding (leave model.stem at \"patch\")",
        );
    }
    if c.model.retrieve > MAX_RETRIEVE {
        issues.at(
            "model.retrieve",
            format!(
                "{} retrieved captions per image is more than the {MAX_RETRIEVE} supported \
                 (each adds up to model.max_len tokens the decoder reads)",
                c.model.retrieve
            ),
        );
    }
    if c.model.max_len < 4 {
        issues.at("model.max_len", "must be at least 4 tokens");
    }
    at_most(issues, "model.max_len", c.model.max_len, MAX_TOKENS);
    if let Some(ck) = &c.model.checkpoint {
        if !spec_dir.join(ck).is_dir() {
            issues.at(
                "model.checkpoint",
                format!("{} is not a directory", spec_dir.join(ck).display()),
            );
        } else {
            checkpoint(c, &spec_dir.join(ck), backbone, issues);
        }
    }
    lora(issues, "peft.lora", &c.peft.lora);
    lora(issues, "peft.qlora", &c.peft.qlora);
    if c.peft.adapter.bottleneck == 0 {
        issues.at("peft.adapter.bottleneck", "must be at least 1");
    }
    at_most(
        issues,
        "peft.adapter.bottleneck",
        c.peft.adapter.bottleneck,
        MAX_RANK,
    );
    modules_to_save(issues, "peft.adapter", &c.peft.adapter.modules_to_save);
    let p = &c.stages.preprocess;
    if p.image_size != 0 && (p.image_size < 16 || p.image_size > 1024) {
        issues.at(
            "stages.preprocess.image_size",
            "must be 0 (the backbone's own) or in 16..=1024",
        );
    }
    if !(0.0 < p.crop_scale[0] && p.crop_scale[0] <= p.crop_scale[1] && p.crop_scale[1] <= 1.0) {
        issues.at(
            "stages.preprocess.crop_scale",
            "must be [lo, hi] with 0 < lo <= hi <= 1",
        );
    }
    if !(0.0..=1.0).contains(&p.jitter) {
        issues.at("stages.preprocess.jitter", "must be in [0, 1]");
    }
    train(issues, "stages.pretrain_vision", &c.stages.pretrain_vision);
    train(issues, "stages.pretrain_lm", &c.stages.pretrain_lm);
    train(issues, "stages.pretrain_align", &c.stages.pretrain_align);
    train(issues, "stages.domain_adapt", &c.stages.domain_adapt);
    for u in &c.stages.pretrain_align.unfreeze {
        one_of(
            issues,
            "stages.pretrain_align.unfreeze",
            u,
            &["vision", "lm"],
        );
    }
    for (at, t) in [
        ("stages.pretrain_vision", &c.stages.pretrain_vision),
        ("stages.pretrain_lm", &c.stages.pretrain_lm),
        ("stages.domain_adapt", &c.stages.domain_adapt),
    ] {
        if !t.unfreeze.is_empty() {
            issues.at(
                format!("{at}.unfreeze"),
                "only pretrain_align freezes pretrained components (in domain-adapt the PEFT \
                 method decides what trains)",
            );
        }
    }
    if c.foundation.embed_dim == 0 || c.foundation.text_width == 0 {
        issues.at("foundation", "embed_dim and text_width must be at least 1");
    }
    let s = &c.stages.cider_optimize;
    positive(issues, "stages.cider_optimize.lr", s.lr);
    if s.samples == 0 {
        issues.at(
            "stages.cider_optimize.samples",
            "sample at least one caption per image",
        );
    }
    at_most(
        issues,
        "stages.cider_optimize.samples",
        s.samples,
        MAX_SAMPLES,
    );
    if s.batch_size == 0 {
        issues.at("stages.cider_optimize.batch_size", "must be at least 1");
    }
    at_most(
        issues,
        "stages.cider_optimize.batch_size",
        s.batch_size,
        MAX_BATCH,
    );
    at_most(issues, "stages.cider_optimize.steps", s.steps, MAX_STEPS);
    one_of(
        issues,
        "stages.cider_optimize.baseline",
        &s.baseline,
        &["greedy", "mean"],
    );
    if s.baseline == "mean" && s.samples < 2 {
        issues.at(
            "stages.cider_optimize.samples",
            "the `mean` baseline needs at least 2 samples per image",
        );
    }
    positive(issues, "stages.cider_optimize.temperature", s.temperature);
    let e = &c.stages.evaluate;
    one_of(
        issues,
        "stages.evaluate.split",
        &e.split,
        &["valid", "test"],
    );
    one_of(
        issues,
        "stages.evaluate.method",
        &e.method,
        &["greedy", "beam", "nucleus", "rerank"],
    );
    one_of(
        issues,
        "stages.evaluate.tokenize",
        &e.tokenize,
        &["char", "space", "jieba"],
    );
    if e.beam_width == 0 {
        issues.at("stages.evaluate.beam_width", "must be at least 1");
    }
    at_most(
        issues,
        "stages.evaluate.beam_width",
        e.beam_width,
        MAX_SAMPLES,
    );
    at_most(issues, "stages.evaluate.max_len", e.max_len, MAX_TOKENS);
    at_most(
        issues,
        "stages.evaluate.batch_size",
        e.batch_size,
        MAX_BATCH,
    );
    if !(e.top_p > 0.0 && e.top_p <= 1.0) {
        issues.at(
            "stages.evaluate.top_p",
            format!("must be in (0, 1] (got {})", e.top_p),
        );
    }
    positive(issues, "stages.evaluate.temperature", e.temperature);
    if !(e.rerank_weight >= 0.0 && e.rerank_weight.is_finite()) {
        issues.at(
            "stages.evaluate.rerank_weight",
            format!("must be a finite number >= 0 (got {})", e.rerank_weight),
        );
    }
    positive(
        issues,
        "stages.evaluate.repetition_penalty",
        e.repetition_penalty,
    );
    if e.max_len == 0 || e.batch_size == 0 {
        issues.at(
            "stages.evaluate",
            "max_len and batch_size must be at least 1",
        );
    }
    let _ = backbone;
}
