//! Stage kinds and what each one's key depends on.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::spec::Cell;

/// The stage kinds, in pipeline order (docs/spec.md, "What each stage's key depends on"). `pretrain-vision` and
/// `pretrain-lm` are the foundation stages: the pretrained tower and LM a real VLM starts
/// from, trained once per sweep for the tiny presets and absent with `model.checkpoint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StageKind {
    Preprocess,
    PretrainVision,
    PretrainLm,
    PretrainAlign,
    DomainAdapt,
    CiderOptimize,
    Evaluate,
}

impl StageKind {
    pub const ALL: [StageKind; 7] = [
        StageKind::Preprocess,
        StageKind::PretrainVision,
        StageKind::PretrainLm,
        StageKind::PretrainAlign,
        StageKind::DomainAdapt,
        StageKind::CiderOptimize,
        StageKind::Evaluate,
    ];

    /// The kind's name in keys, the store and the command line.
    pub fn name(self) -> &'static str {
        match self {
            StageKind::Preprocess => "preprocess",
            StageKind::PretrainVision => "pretrain-vision",
            StageKind::PretrainLm => "pretrain-lm",
            StageKind::PretrainAlign => "pretrain-align",
            StageKind::DomainAdapt => "domain-adapt",
            StageKind::CiderOptimize => "cider-optimize",
            StageKind::Evaluate => "evaluate",
        }
    }

    /// The kind's table name in specs (`[stages.pretrain_align]`).
    pub fn spec_name(self) -> &'static str {
        match self {
            StageKind::Preprocess => "preprocess",
            StageKind::PretrainVision => "pretrain_vision",
            StageKind::PretrainLm => "pretrain_lm",
            StageKind::PretrainAlign => "pretrain_align",
            StageKind::DomainAdapt => "domain_adapt",
            StageKind::CiderOptimize => "cider_optimize",
            StageKind::Evaluate => "evaluate",
        }
    }

    /// Per-kind output format version: bump to invalidate every cached output
    /// of this kind (and, through the Merkle chain, everything downstream).
    pub fn version(self) -> u32 {
        match self {
            StageKind::Preprocess => 1,
            StageKind::PretrainVision => 1,
            StageKind::PretrainLm => 1,
            // 2: tiny preset with ViT patch 16 (fewer visual tokens).
            // 3: starts from the foundation stages (connector only unless unfrozen).
            StageKind::PretrainAlign => 3,
            StageKind::DomainAdapt => 1,
            // 2: records valid CIDEr-D of its input and output (cider_d_before/after).
            StageKind::CiderOptimize => 2,
            StageKind::Evaluate => 1,
        }
    }

    pub fn parse(s: &str) -> Option<StageKind> {
        StageKind::ALL
            .into_iter()
            .find(|k| k.name() == s || k.spec_name() == s)
    }
}

impl std::fmt::Display for StageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Image side for a backbone at a preset.
pub fn image_size(backbone: &str, preset: &str) -> u32 {
    match (preset, backbone) {
        ("tiny", "phi3v") => 128,
        ("tiny", _) => 64,
        (_, "blip2") => 224,
        (_, "llava") => 336,
        (_, "phi3v") => 336,
        _ => 224,
    }
}

/// CLIP's normalisation, used by all three backbone families.
pub const CLIP_MEAN: [f64; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f64; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// The parameters a stage of `kind` depends on, for `cell`: exactly what
/// enters its key. Anything not listed here cannot change the stage's output.
pub fn params(kind: StageKind, cell: &Cell) -> Value {
    let c = &cell.config;
    match kind {
        StageKind::Preprocess => {
            let p = &c.stages.preprocess;
            let size = if p.image_size != 0 {
                p.image_size
            } else {
                image_size(&cell.backbone, &c.model.preset)
            };
            let mut v = json!({
                "image_size": size,
                "mean": CLIP_MEAN,
                "std": CLIP_STD,
                "augment_copies": p.augment_copies,
                "flip": p.flip,
                "crop_scale": p.crop_scale,
                "jitter": p.jitter,
                "tokenizer": p.tokenizer,
                "min_freq": p.min_freq,
                "policy": c.data.policy,
            });
            // Only with a checkpoint's tokenizer (spec::checkpoint), so other keys are unchanged.
            if let Some(d) = &p.tokenizer_digest {
                v["tokenizer_digest"] = json!(d);
            }
            v
        }
        StageKind::PretrainVision => {
            let (vision, _) = towers(cell);
            json!({
                "vision": vision,
                "max_len": c.model.max_len,
                "embed_dim": c.foundation.embed_dim,
                "text_width": c.foundation.text_width,
                "train": c.stages.pretrain_vision,
            })
        }
        StageKind::PretrainLm => {
            let (_, lm) = towers(cell);
            json!({
                "lm": lm,
                "max_len": c.model.max_len,
                "train": c.stages.pretrain_lm,
            })
        }
        StageKind::PretrainAlign => {
            let mut v = model_params(cell);
            v["train"] = json!(c.stages.pretrain_align);
            if !c.stages.pretrain_align.unfreeze.is_empty() {
                v["unfreeze"] = json!(c.stages.pretrain_align.unfreeze);
            }
            v
        }
        StageKind::DomainAdapt => {
            let peft = match cell.peft.as_str() {
                "lora" => serde_json::to_value(&c.peft.lora).unwrap_or(Value::Null),
                "qlora" => serde_json::to_value(&c.peft.qlora).unwrap_or(Value::Null),
                "adapter" => serde_json::to_value(&c.peft.adapter).unwrap_or(Value::Null),
                _ => Value::Null,
            };
            json!({
                "peft": cell.peft,
                "peft_params": peft,
                "vision": c.model.vision,
                "train": c.stages.domain_adapt,
            })
        }
        StageKind::CiderOptimize => {
            let mut v = serde_json::to_value(&c.stages.cider_optimize).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut v {
                m.remove("enabled");
            }
            v
        }
        StageKind::Evaluate => {
            let e = &c.stages.evaluate;
            let mut v = json!({
                "split": e.split,
                "tokenize": e.tokenize,
                "predict_test": e.predict_test,
            });
            let m = v.as_object_mut().expect("object literal");
            if cell.is_baseline() {
                m.insert("baseline".into(), json!(cell.backbone));
            } else {
                // Only for zero-shot cells, so every other evaluate key is unchanged.
                if cell.is_zero_shot() {
                    m.insert("zero_shot".into(), json!(true));
                    // No training stage before it: the model is the checkpoint, named here.
                    if !chain(cell).contains(&StageKind::PretrainAlign) {
                        m.insert("model".into(), model_params(cell));
                    }
                }
                m.insert("method".into(), json!(e.method));
                m.insert("max_len".into(), json!(e.max_len));
                m.insert("repetition_penalty".into(), json!(e.repetition_penalty));
                match e.method.as_str() {
                    "beam" => {
                        m.insert("beam_width".into(), json!(e.beam_width));
                        m.insert("length_penalty".into(), json!(e.length_penalty));
                    }
                    "nucleus" => {
                        m.insert("top_p".into(), json!(e.top_p));
                        m.insert("temperature".into(), json!(e.temperature));
                    }
                    "rerank" => {
                        m.insert("rerank_weight".into(), json!(e.rerank_weight));
                    }
                    _ => {}
                }
            }
            v
        }
    }
}

/// Whether `cell` trains its vision tower and LM in the foundation stages (a trained cell
/// without `model.checkpoint`: a checkpoint brings its own).
pub fn has_foundations(cell: &Cell) -> bool {
    !cell.is_baseline() && cell.config.model.checkpoint.is_none()
}

/// The vision tower's and the LM's configuration of `cell`'s preset, as the foundation stages
/// key them: equal for every backbone of the tiny preset, so one pair of foundations serves a
/// whole sweep.
pub fn towers(cell: &Cell) -> (Value, Value) {
    use crate::model::{Backbone, Fusion, ModelConfig, VitStem};
    let c = &cell.config;
    let backbone: Backbone =
        serde_json::from_value(json!(cell.backbone)).unwrap_or(Backbone::Llava);
    let mut m = match c.model.preset.as_str() {
        "tiny" => ModelConfig::tiny(backbone, Fusion::Early, 0, 0, 0, 0),
        _ => ModelConfig::real(backbone, Fusion::Early, 0, 0, 0, 0),
    };
    // Validation has checked the name against the stems this build knows.
    if let Ok(stem) = serde_json::from_value::<VitStem>(json!(c.model.stem)) {
        m.vision.stem = stem;
    }
    (
        serde_json::to_value(m.vision).unwrap_or(Value::Null),
        serde_json::to_value(m.lm).unwrap_or(Value::Null),
    )
}

/// The parameters of the preprocess node that decodes the foundation corpus for `cell`: the
/// cell's preprocess settings at the vision tower's resolution, foundation split only, without
/// the augmentation settings (they apply to `IC_train` alone), so that changing them never
/// re-runs a foundation stage.
pub fn foundation_preprocess_params(cell: &Cell) -> Value {
    let mut v = params(StageKind::Preprocess, cell);
    let (vision, _) = towers(cell);
    v["image_size"] = vision["image_size"].clone();
    v["foundation"] = json!(true);
    if let Value::Object(m) = &mut v {
        for k in ["augment_copies", "flip", "crop_scale", "jitter"] {
            m.remove(k);
        }
    }
    v
}

/// What builds `cell`'s model before any training: backbone, fusion, preset, checkpoint (path and
/// content digest), max_len, and stem / retrieve when not their defaults. Pretrain-align's key
/// holds it (with its training settings); so does the evaluate key of a zero-shot cell that
/// evaluates a checkpoint as it is.
pub fn model_params(cell: &Cell) -> Value {
    let c = &cell.config;
    let mut v = json!({
        "backbone": cell.backbone,
        "fusion": cell.fusion,
        "preset": c.model.preset,
        "checkpoint": c.model.checkpoint,
        "max_len": c.model.max_len,
    });
    // Only when not the default, so the keys of existing specs are unchanged.
    if c.model.stem != "patch" {
        v["stem"] = json!(c.model.stem);
    }
    if c.model.retrieve > 0 {
        v["retrieve"] = json!(c.model.retrieve);
    }
    // The phi3v connector in Phi-3-Vision's published layout (separators in the merged feature
    // space before the projector, penultimate block, bicubic global view): earlier versions
    // trained another network, so phi3v cells alone get new keys.
    if cell.backbone == "phi3v" {
        v["phi3v_connector"] = json!(2);
    }
    // Content digest of the checkpoint's files (spec::checkpoint): new weights re-run.
    if let Some(d) = &c.model.checkpoint_digest {
        v["checkpoint_digest"] = json!(d);
    }
    // On a checkpoint, `late` cross-attention is zero-gated (model::lm): entries made before
    // the gate existed hold another model.
    if c.model.checkpoint.is_some() && cell.fusion == "late" {
        v["late_gated"] = json!(true);
    }
    v
}

/// Whether `cell`'s checkpoint supplies its connector too: LLaVA's projector comes with a LLaVA
/// checkpoint, BLIP-2's Q-Former and projection with a BLIP-2 checkpoint (which fits `blip2`
/// cells only), while a `blip2` or `phi3v` cell on a LLaVA checkpoint takes its tower and LM and
/// trains its connector from the seed in pretrain-align.
pub fn checkpoint_has_connector(cell: &Cell) -> bool {
    let Some(dir) = &cell.config.model.checkpoint else {
        return false;
    };
    cell.backbone == "llava"
        || crate::model::hf::Checkpoint::fixed_backbone(dir).is_some_and(|b| {
            serde_json::to_value(b)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                == Some(cell.backbone.clone())
        })
}

/// The kinds a cell runs, in order (baselines: preprocess then evaluate;
/// the foundation stages unless a checkpoint supplies them; cider-optimize
/// only when enabled). A zero-shot cell stops after pretrain-align, and runs
/// no training at all when its checkpoint supplies the whole model: it then
/// evaluates the checkpoint as it is.
pub fn chain(cell: &Cell) -> Vec<StageKind> {
    if cell.is_baseline() {
        return vec![StageKind::Preprocess, StageKind::Evaluate];
    }
    let mut v = vec![StageKind::Preprocess];
    if has_foundations(cell) {
        v.extend([StageKind::PretrainVision, StageKind::PretrainLm]);
    }
    if cell.is_zero_shot() {
        if !checkpoint_has_connector(cell) {
            v.push(StageKind::PretrainAlign);
        }
        v.push(StageKind::Evaluate);
        return v;
    }
    v.extend([StageKind::PretrainAlign, StageKind::DomainAdapt]);
    if cell.config.stages.cider_optimize.enabled {
        v.push(StageKind::CiderOptimize);
    }
    v.push(StageKind::Evaluate);
    v
}
