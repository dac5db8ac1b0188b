//! `pretrain-align`: cross-entropy on the generic-domain corpus (`ALIGN_*`), starting
//! from pretrained weights: a real checkpoint (`model.checkpoint`, loaded by
//! `model::hf`) or, for the tiny presets, the two foundation stages (the vision
//! tower of `pretrain-vision`, the LM of `pretrain-lm`). The connector trains,
//! and whatever `stages.pretrain_align.unfreeze` names; the whole base is
//! published, so later stages rebuild the model from this entry alone. One
//! pretrain-align serves every PEFT variant of its backbone x fusion pair, and is
//! what a zero-shot cell of the pair evaluates. [`model_config`] is also how a
//! zero-shot evaluate builds a whole checkpoint that no stage trained.

use serde::Deserialize;

use crate::model::{Backbone, Component, Fusion, ModelConfig, PeftConfig, Phase};
use crate::plan::StageKind;
use crate::spec::params::TrainSpec;

use super::training::{self, Lineage};
use super::{Outputs, StageCtx, StageError, StageReport};

/// What builds the model before training ([`crate::plan::kind::model_params`]): pretrain-align's
/// parameters without its training settings, and a zero-shot evaluate's on a whole checkpoint.
#[derive(Debug, Deserialize)]
pub(super) struct ModelParams {
    backbone: Backbone,
    fusion: Fusion,
    preset: String,
    checkpoint: Option<std::path::PathBuf>,
    max_len: usize,
    /// `conv`: the ViT's convolutional stem (absent: the patch embedding).
    #[serde(default)]
    stem: Option<String>,
    /// Retrieved captions per image (absent: none).
    #[serde(default)]
    retrieve: usize,
}

#[derive(Debug, Deserialize)]
struct Params {
    #[serde(flatten)]
    model: ModelParams,
    train: TrainSpec,
    /// Pretrained components trained beside the connector (absent: none).
    #[serde(default)]
    unfreeze: Vec<crate::model::Component>,
}

/// The model configuration `p` describes for the tokenizer of preprocess entry `pre`, and the
/// opened checkpoint if it names one (which then fixes the shapes and sets `pretrained`).
pub(super) fn model_config(
    p: &ModelParams,
    pre: &std::path::Path,
    seed: u64,
) -> Result<(ModelConfig, Option<crate::model::hf::Checkpoint>), StageError> {
    let tok = training::load_tokenizer(pre)?;
    let (v, pad, bos, eos) = (tok.vocab_size(), tok.pad_id(), tok.bos_id(), tok.eos_id());
    // A real checkpoint (model::hf) fixes the shapes and the vocabulary; the caption
    // tokenizer (the checkpoint's own, see spec::checkpoint) fixes the special ids.
    let ck = p
        .checkpoint
        .as_deref()
        .map(crate::model::hf::Checkpoint::open)
        .transpose()
        .map_err(StageError::ctx("opening model.checkpoint"))?;
    let mut cfg = match p.preset.as_str() {
        "tiny" => ModelConfig::tiny(p.backbone, p.fusion, v, pad, bos, eos),
        _ => ModelConfig::real(p.backbone, p.fusion, v, pad, bos, eos),
    };
    if let Some(ck) = &ck {
        ck.configure(&mut cfg)
            .map_err(StageError::ctx("model.checkpoint"))?;
        if v > cfg.vocab_size {
            return Err(StageError::msg(format!(
                "model.checkpoint {}: the caption tokenizer has {v} ids but the checkpoint's \
                 vocabulary only {}",
                ck.dir().display(),
                cfg.vocab_size
            )));
        }
        (cfg.pad_id, cfg.bos_id, cfg.eos_id) = (pad, bos, eos);
        cfg.pretrained = true;
    }
    cfg.max_caption_len = p.max_len;
    if let Some(stem) = &p.stem {
        cfg.vision.stem = serde_json::from_value(serde_json::json!(stem)).map_err(|_| {
            StageError::msg(format!(
                "unknown model.stem {stem:?} in the stage parameters"
            ))
        })?;
    }
    cfg.retrieved = p.retrieve;
    cfg.seed = seed;
    Ok((cfg, ck))
}

pub fn run(ctx: &StageCtx) -> Result<StageReport, StageError> {
    let p: Params = ctx.params()?;
    let pre = ctx.input(StageKind::Preprocess)?;
    let (mut cfg, ck) = model_config(&p.model, pre, ctx.desc.fingerprint.seed)?;
    let vision_f = ctx
        .inputs
        .iter()
        .find(|(k, _)| *k == StageKind::PretrainVision)
        .map(|(_, p)| p.clone());
    let lm_f = ctx
        .inputs
        .iter()
        .find(|(k, _)| *k == StageKind::PretrainLm)
        .map(|(_, p)| p.clone());
    if ck.is_some() || vision_f.is_some() || lm_f.is_some() {
        cfg.pretrained = true;
        cfg.align_unfreeze = p.unfreeze.clone();
    }
    if let Some(f) = &vision_f {
        check_vision_foundation(f, &cfg)?;
    }
    if let Some(f) = &lm_f {
        check_same_tokenizer(f, pre)?;
    }
    let lineage = Lineage {
        model: cfg,
        peft: PeftConfig::default(),
        preprocess: ctx.desc.inputs[0].1.clone(),
        weights: vec![ctx.desc.key.clone()],
        checkpoint: None,
    };
    let mut model = crate::model::Captioner::new(
        &lineage.model,
        &lineage.peft,
        Phase::Align,
        &candle_core::Device::Cpu,
    )
    .map_err(StageError::ctx("building the model"))?;
    if let Some(ck) = &ck {
        model
            .load_pretrained(ck)
            .map_err(StageError::ctx("loading model.checkpoint"))?;
    }
    for (f, component, what) in [
        (&vision_f, Component::Vision, "vision"),
        (&lm_f, Component::Lm, "language"),
    ] {
        if let Some(f) = f {
            model
                .load_foundation(&f.join(training::WEIGHTS), component)
                .map_err(StageError::ctx(format!("loading the {what} foundation")))?;
        }
    }
    let train = training::load_split(pre, "align_train")?;
    let valid = training::load_split(pre, "align_valid").ok();
    let mut out = Outputs::default();
    let report = training::train_ce(ctx, &model, &train, valid.as_ref(), &p.train, &mut out)?;
    if lineage.model.pretrained {
        // The frozen encoder and LM are the checkpoint's or the foundations', not the seed's:
        // publish the whole base so later stages rebuild the model from this entry alone.
        model
            .save_base(&ctx.out.join(training::WEIGHTS))
            .map_err(StageError::ctx("saving the base weights"))?;
        lineage.write(ctx.out)?;
    } else {
        training::publish_model(ctx, &model, &lineage)?;
    }
    out.write(ctx.out)?;
    Ok(report)
}

/// The tower pretrain-vision trained must be the one this model builds.
fn check_vision_foundation(entry: &std::path::Path, cfg: &ModelConfig) -> Result<(), StageError> {
    let path = entry.join(super::pretrain_vision::FOUNDATION);
    let bytes =
        std::fs::read(&path).map_err(StageError::ctx(format!("reading {}", path.display())))?;
    let f: super::pretrain_vision::VisionFoundation = serde_json::from_slice(&bytes)
        .map_err(StageError::ctx(format!("parsing {}", path.display())))?;
    if f.vision != cfg.vision {
        return Err(StageError::msg(format!(
            "the vision foundation in {} was trained for {:?}, but this model builds {:?}",
            entry.display(),
            f.vision,
            cfg.vision
        )));
    }
    Ok(())
}

/// The LM's token ids mean what this cell's tokenizer says they mean.
fn check_same_tokenizer(entry: &std::path::Path, pre: &std::path::Path) -> Result<(), StageError> {
    let a = entry.join(super::pretrain_lm::TOKENIZER);
    let b = pre.join(super::pretrain_lm::TOKENIZER);
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(StageError::ctx(format!("reading {}", p.display())))
    };
    if read(&a)? != read(&b)? {
        return Err(StageError::msg(format!(
            "the language foundation's tokenizer {} differs from this cell's {}: the LM's token \
             ids would mean other characters",
            a.display(),
            b.display()
        )));
    }
    Ok(())
}
