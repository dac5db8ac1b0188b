//! `pretrain-align`: cross-entropy on the generic-domain corpus (`ALIGN_*`).
//! With real pretrained weights (`model.checkpoint`, loaded by `model::hf`) only
//! the connector trains and the whole base is published; the tiny presets have
//! none, so here the encoder and LM are trained from scratch as well. One
//! pretrain-align serves every PEFT variant of its backbone x fusion pair.

use serde::Deserialize;

use crate::model::{Backbone, Fusion, ModelConfig, PeftConfig, Phase, VitStem};
use crate::plan::StageKind;
use crate::spec::params::TrainSpec;

use super::training::{self, Lineage};
use super::{Outputs, StageCtx, StageError, StageReport};

#[derive(Debug, Deserialize)]
struct Params {
    backbone: Backbone,
    fusion: Fusion,
    preset: String,
    checkpoint: Option<std::path::PathBuf>,
    max_len: usize,
    train: TrainSpec,
    /// `conv`: the ViT's convolutional stem (absent: the patch embedding).
    #[serde(default)]
    stem: Option<String>,
    /// Retrieved captions per image (absent: none).
    #[serde(default)]
    retrieve: usize,
}

pub fn run(ctx: &StageCtx) -> Result<StageReport, StageError> {
    let p: Params = ctx.params()?;
    let pre = ctx.input(StageKind::Preprocess)?;
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
    }
    cfg.max_caption_len = p.max_len;
    if p.stem.as_deref() == Some("conv") {
        cfg.vision.stem = VitStem::Conv;
    }
    cfg.retrieved = p.retrieve;
    cfg.seed = ctx.desc.fingerprint.seed;
    let lineage = Lineage {
        model: cfg,
        peft: PeftConfig::default(),
        preprocess: ctx.desc.inputs[0].1.clone(),
        weights: vec![ctx.desc.key.clone()],
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
    let train = training::load_split(pre, "align_train")?;
    let valid = training::load_split(pre, "align_valid").ok();
    let mut out = Outputs::default();
    let report = training::train_ce(ctx, &model, &train, valid.as_ref(), &p.train, &mut out)?;
    if ck.is_some() {
        // The frozen encoder and LM are the checkpoint's, not the seed's: publish the whole
        // base so later stages rebuild the model from this entry alone.
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
