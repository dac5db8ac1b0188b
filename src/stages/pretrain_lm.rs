//! `pretrain-lm`: the language model learned as a causal LM on the generic-domain captions of
//! the foundation corpus, the stand-in for the pretrained LM a real VLM starts from. Text only:
//! no image reaches it. Publishes the LM's tensors (`lm.*`) and the tokenizer its ids belong
//! to; pretrain-align of every backbone loads both (and refuses a cell whose tokenizer
//! differs). Keyed by the LM's configuration and the foundation seed, not the cell's.

use candle_core::{Device, Tensor};
use rand::Rng;
use serde::Deserialize;

use crate::model::{
    Backbone, Captioner, Component, Fusion, LmConfig, ModelConfig, PeftConfig, Phase,
    TeacherForcing,
};
use crate::plan::StageKind;
use crate::spec::params::TrainSpec;

use super::training::{self, CurveLog};
use super::{Outputs, StageCtx, StageError, StageReport};

/// The tokenizer a pretrain-lm entry's ids belong to.
pub const TOKENIZER: &str = "tokenizer.json";

#[derive(Debug, Deserialize)]
struct Params {
    lm: LmConfig,
    max_len: usize,
    train: TrainSpec,
}

/// Teacher-forcing tensors of one caption per row.
fn batch(cfg: &ModelConfig, caps: &[&[u32]]) -> Result<(Tensor, Tensor, Tensor), StageError> {
    let TeacherForcing {
        input,
        target,
        mask,
        len,
    } = TeacherForcing::new(cfg, caps);
    let n = caps.len();
    let shape = (n, len);
    let e = |what: &str| StageError::ctx(format!("batch {what}"));
    Ok((
        Tensor::from_vec(input, shape, &Device::Cpu).map_err(e("input"))?,
        Tensor::from_vec(target, shape, &Device::Cpu).map_err(e("target"))?,
        Tensor::from_vec(mask, shape, &Device::Cpu).map_err(e("mask"))?,
    ))
}

pub fn run(ctx: &StageCtx) -> Result<StageReport, StageError> {
    let p: Params = ctx.params()?;
    let pre = ctx.input(StageKind::Preprocess)?;
    let tok = training::load_tokenizer(pre)?;
    let data = training::load_split(pre, crate::data::preprocess::FOUNDATION_SPLIT)?;
    // Captions of the last tenth (at most 500 images) are held out for the validation loss.
    let hold = (data.len() / 10).min(500);
    let n = data.len() - hold;
    if n == 0 {
        return Err(StageError::msg(format!(
            "the foundation corpus in {} has no captions to pretrain on",
            pre.display()
        )));
    }
    let (v, pad, bos, eos) = (tok.vocab_size(), tok.pad_id(), tok.bos_id(), tok.eos_id());
    // Any backbone: only the LM is built into the optimiser, and only it is saved.
    let mut cfg = ModelConfig::tiny(Backbone::Llava, Fusion::Early, v, pad, bos, eos);
    cfg.lm = p.lm;
    cfg.max_caption_len = p.max_len;
    cfg.seed = ctx.desc.fingerprint.seed;
    let model = Captioner::new(&cfg, &PeftConfig::default(), Phase::Align, &Device::Cpu)
        .map_err(StageError::ctx("building the language model"))?;
    let tcfg = training::train_config(&p.train);
    let specs = model
        .trainable_vars()
        .into_iter()
        .filter(|t| t.component == Component::Lm)
        .map(|t| {
            crate::train::ParamSpec::new(t.name, t.var, training::group(t.component))
                .with_decay(t.decay)
        })
        .collect();
    let seed = ctx.desc.fingerprint.seed;
    model.set_dropout_seed(seed ^ 0x5eed);
    let mut trainer = crate::train::Trainer::new(specs, &tcfg, seed)
        .map_err(StageError::ctx("setting up training"))?
        .with_checkpoints(ctx.scratch.join("ckpt"));
    if let Some(step) = trainer
        .resume()
        .map_err(StageError::ctx("resuming from a checkpoint"))?
    {
        eprintln!("resumed from the checkpoint at step {step}");
    }
    let bs = tcfg.batch_size.min(n).max(1);
    let loss = |caps: &[&[u32]]| -> Result<Tensor, StageError> {
        let (input, target, mask) = batch(&cfg, caps)?;
        let logits = model
            .lm_logits(&input)
            .map_err(StageError::ctx("LM forward"))?;
        let (b, t, vv) = logits.dims3().map_err(StageError::ctx("logits"))?;
        let flat = |x: &Tensor| x.reshape(b * t).map_err(StageError::ctx("flatten"));
        crate::model::ops::cross_entropy(
            &logits
                .reshape((b * t, vv))
                .map_err(StageError::ctx("flatten"))?,
            &flat(&target)?,
            &flat(&mask)?,
            tcfg.label_smoothing,
        )
        .map_err(StageError::ctx("cross-entropy"))
    };
    let val: Vec<&[u32]> = (n..data.len())
        .take(256)
        .filter_map(|r| data.tokens[r].first().map(Vec::as_slice))
        .collect();
    let log = CurveLog::new(ctx.scratch);
    let summary = {
        let mut hooks = crate::train::Hooks::new()
            .record(|r: &crate::train::CurveRecord| log.append(r))
            .progress(|done, total| ctx.progress(done as u64, total as u64));
        if !val.is_empty() {
            hooks = hooks.validate(|_step| Ok(loss(&val)?.to_scalar::<f32>()? as f64));
        }
        trainer
            .fit(
                |sc| {
                    let caps: Vec<&[u32]> = (0..bs)
                        .map(|_| {
                            let toks = &data.tokens[sc.rng.gen_range(0..n)];
                            let k = sc.rng.gen_range(0..toks.len().max(1));
                            toks.get(k).map(Vec::as_slice).unwrap_or(&[])
                        })
                        .collect();
                    Ok(crate::train::Micro::new(loss(&caps)?, bs))
                },
                &mut hooks,
            )
            .map_err(StageError::ctx("training"))?
    };
    let mut out = Outputs::default();
    training::record_fit(&log, &summary, &mut out);
    if let Some(first) = summary
        .missing_grads
        .iter()
        .find(|name| name.starts_with("lm."))
    {
        return Err(StageError::msg(format!(
            "LM tensor {first} received no gradient"
        )));
    }
    model
        .save_component(&ctx.out.join(training::WEIGHTS), Component::Lm)
        .map_err(StageError::ctx("saving the language model"))?;
    let from = pre.join(TOKENIZER);
    std::fs::copy(&from, ctx.out.join(TOKENIZER))
        .map_err(StageError::ctx(format!("copying {}", from.display())))?;
    out.write(ctx.out)?;
    let c = model.counts();
    let lm = c
        .by_component
        .get(&Component::Lm)
        .copied()
        .unwrap_or((0, 0));
    Ok(StageReport {
        trainable_params: Some(lm.0 as u64),
        total_params: Some(lm.1 as u64),
    })
}
