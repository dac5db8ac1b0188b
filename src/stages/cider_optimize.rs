//! `cider-optimize`: self-critical sequence training (Rennie et al. 2017) of
//! the domain-adapt stage's trainable parameters. Reward: CIDEr-D of each
//! sampled caption against its image's references, with document frequencies
//! from the training references; baseline: the greedy caption's reward or the
//! mean of the other samples. As a search's budgeted stage it trains a rung
//! ([`training::RungBudget`]).

use candle_core::Tensor;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use crate::data::preprocess::Split;
use crate::decode::{self, DecodeConfig, Strategy};
use crate::metrics::{References, Tokenize};
use crate::model::{Captioner, Inputs, Phase};
use crate::plan::StageKind;
use crate::train::{Baseline, BoxError, Policy, SampleOpts, ScstConfig};

use super::baseline::clean_rows;
use super::training::{self, Lineage};
use super::{Outputs, StageCtx, StageError, StageReport};

#[derive(Debug, Deserialize)]
struct Params {
    steps: u64,
    batch_size: usize,
    lr: f64,
    warmup: u64,
    grad_clip: f64,
    samples: usize,
    baseline: Baseline,
    temperature: f64,
    diversity: f64,
    ckpt_every: u64,
}

/// The captioner over the clean training images, as SCST's policy.
struct CaptionPolicy<'a> {
    model: &'a Captioner,
    train: &'a Split,
    rows: &'a [usize],
    /// Retrieved captions of every training row (retrieval-augmented models).
    prompts: Option<&'a [Vec<u32>]>,
}

impl CaptionPolicy<'_> {
    fn images(&self, images: &[usize]) -> Result<Inputs, BoxError> {
        let rows: Vec<usize> = images.iter().map(|&i| self.rows[i]).collect();
        Ok(training::inputs(
            self.train,
            self.prompts,
            &rows,
            self.model.config(),
        )?)
    }
}

impl Policy for CaptionPolicy<'_> {
    fn sample(
        &mut self,
        images: &[usize],
        opts: &SampleOpts,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<Vec<Vec<u32>>>, BoxError> {
        let cfg = DecodeConfig {
            strategy: Strategy::Nucleus,
            top_p: 1.0,
            temperature: opts.temperature,
            max_len: opts.max_len,
            ..DecodeConfig::default()
        };
        let seed: u64 = rng.gen();
        Ok(decode::sample(
            self.model,
            &self.images(images)?,
            opts.k,
            &cfg,
            seed,
        )?)
    }

    fn greedy(&mut self, images: &[usize], max_len: usize) -> Result<Vec<Vec<u32>>, BoxError> {
        let cfg = DecodeConfig {
            strategy: Strategy::Greedy,
            max_len,
            ..DecodeConfig::default()
        };
        Ok(decode::generate(
            self.model,
            &self.images(images)?,
            &cfg,
            0,
        )?)
    }

    fn log_probs(&mut self, images: &[usize], seqs: &[Vec<u32>]) -> Result<Tensor, BoxError> {
        let per_image = seqs.len() / images.len().max(1);
        Ok(self
            .model
            .log_probs(&self.images(images)?, seqs, per_image)?)
    }
}

/// Resamples of the paired bootstrap of SCST's effect on valid CIDEr-D.
const SCST_RESAMPLES: usize = 1000;

/// Scores of `model`'s greedy captions on the clean rows of `valid` (character
/// tokens, as `evaluate` scores by default): taken before and after SCST so
/// that its effect on held-out data is visible per cell, with a paired test.
fn valid_cider(
    model: &Captioner,
    tok: &crate::data::tokenizer::CaptionTokenizer,
    valid: &Split,
    prompts: Option<&[Vec<u32>]>,
    max_len: usize,
) -> Result<crate::metrics::Evaluation, StageError> {
    let inference = model
        .inference()
        .map_err(StageError::ctx("preparing the model for decoding"))?;
    let cfg = DecodeConfig {
        strategy: Strategy::Greedy,
        max_len: max_len + 1,
        ..DecodeConfig::default()
    };
    let rows = clean_rows(valid);
    let mut preds = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(64) {
        let inputs = training::inputs(valid, prompts, chunk, model.config())?;
        let ids = decode::generate(&inference, inputs, &cfg, 0)
            .map_err(StageError::ctx("decoding the valid split"))?;
        preds.extend(ids.iter().map(|s| tok.decode(s)));
    }
    let refs: Vec<(String, Vec<String>)> = rows
        .iter()
        .map(|&r| (valid.ids[r].clone(), valid.captions[r].clone()))
        .collect();
    let eval = References::new(&refs, Tokenize::Char)
        .and_then(|r| r.evaluate_in_order(&preds))
        .map_err(|e| StageError::msg(format!("scoring the valid split: {e}")))?;
    Ok(eval)
}

pub fn run(ctx: &StageCtx) -> Result<StageReport, StageError> {
    let p: Params = ctx.params()?;
    let adapt = ctx.input(StageKind::DomainAdapt)?;
    let lineage = Lineage::read(adapt)?;
    let model = lineage.build(ctx, Phase::Adapt)?;
    let pre = ctx.entry(&lineage.preprocess);
    let tok = training::load_tokenizer(&pre)?;
    let train = training::load_split(&pre, "train")?;
    let rows = clean_rows(&train);
    let refs: Vec<(String, Vec<String>)> = rows
        .iter()
        .map(|&r| (train.ids[r].clone(), train.captions[r].clone()))
        .collect();
    let references = References::new(&refs, Tokenize::Char)
        .map_err(|e| StageError::msg(format!("training references: {e}")))?;
    let cider = references.cider();
    let valid = training::load_split(&pre, "valid").ok();
    let max_len = lineage.model.max_caption_len;
    let index = training::retrieval_index(&lineage.model, &train)?;
    let train_prompts = index
        .as_ref()
        .map(|i| training::prompts(&lineage.model, i, &train))
        .transpose()?;
    let valid_prompts = index
        .as_ref()
        .zip(valid.as_ref())
        .map(|(i, v)| training::prompts(&lineage.model, i, v))
        .transpose()?;
    let before = match &valid {
        Some(v) => Some(valid_cider(
            &model,
            &tok,
            v,
            valid_prompts.as_deref(),
            max_len,
        )?),
        None => None,
    };
    let cfg = ScstConfig {
        samples: p.samples,
        baseline: p.baseline,
        temperature: p.temperature,
        max_len: lineage.model.max_caption_len,
        diversity_weight: p.diversity,
        steps: p.steps as usize,
        batch_size: p.batch_size,
        lr: p.lr,
        warmup: p.warmup as usize,
        grad_clip: p.grad_clip,
        ckpt_every: p.ckpt_every as usize,
        ..ScstConfig::default()
    };
    let seed = ctx.desc.fingerprint.seed;
    model.set_dropout_seed(seed ^ 0x5c57);
    let rung = training::RungBudget::of(ctx);
    let ckpt = ctx.scratch.join("ckpt");
    if let Some(r) = &rung {
        r.seed(&ckpt)?;
    }
    let mut trainer =
        crate::train::Trainer::new(training::param_specs(&model), &cfg.train_config(), seed)
            .map_err(StageError::ctx("setting up SCST"))?
            .with_checkpoints(ckpt);
    trainer
        .resume()
        .map_err(StageError::ctx("resuming from a checkpoint"))?;
    let mut policy = CaptionPolicy {
        model: &model,
        train: &train,
        rows: &rows,
        prompts: train_prompts.as_deref(),
    };
    let reward = |i: usize, seq: &[u32]| cider.score_text(i, &tok.decode(seq)).unwrap_or(0.0);
    let log = training::CurveLog::new(ctx.scratch);
    let summary = {
        let mut hooks = crate::train::Hooks::new()
            .record(|r: &crate::train::CurveRecord| log.append(r))
            .progress(|d, t| ctx.progress(d as u64, t as u64));
        let closure = crate::train::scst_closure(&mut policy, rows.len(), &cfg, reward);
        let until = rung.as_ref().map_or(cfg.steps, |r| r.steps);
        trainer
            .fit_until(until, closure, &mut hooks)
            .map_err(StageError::ctx("self-critical training"))?
    };
    if let Some(r) = &rung {
        r.publish(&trainer, ctx.out)?;
    }
    let mut out = Outputs::default();
    let records = log.all();
    training::record_curves(&records, &mut out);
    if let Some(r) = summary.last_reward {
        out.metric("", "final_reward", r);
    }
    let first: Vec<f64> = records.iter().take(5).filter_map(|r| r.reward).collect();
    let last: Vec<f64> = records
        .iter()
        .rev()
        .take(5)
        .filter_map(|r| r.reward)
        .collect();
    if !first.is_empty() && !last.is_empty() {
        out.metric(
            "",
            "reward_first5",
            first.iter().sum::<f64>() / first.len() as f64,
        );
        out.metric(
            "",
            "reward_last5",
            last.iter().sum::<f64>() / last.len() as f64,
        );
    }
    out.metric("", "samples_per_s", summary.mean_samples_per_s);
    if let (Some(v), Some(b)) = (&valid, before) {
        let after = valid_cider(&model, &tok, v, valid_prompts.as_deref(), max_len)?;
        out.metric("valid", "cider_d_before", b.scores.cider_d);
        out.metric("valid", "cider_d_after", after.scores.cider_d);
        // Paired bootstrap over the valid images: p of "SCST did not raise CIDEr-D".
        let tests = crate::metrics::bootstrap::paired(
            &after.images,
            &b.images,
            SCST_RESAMPLES,
            ctx.desc.fingerprint.seed,
        )
        .map_err(|e| StageError::msg(format!("paired bootstrap of SCST's effect: {e}")))?;
        if let Some(t) = tests
            .iter()
            .find(|t| t.metric == crate::metrics::Metric::CiderD)
        {
            out.metric("valid", "cider_d_gain_p", t.p_value);
        }
    }
    let report = training::counts(&model, &mut out);
    let mut lineage = lineage;
    lineage.weights.push(ctx.desc.key.clone());
    training::publish_model(ctx, &model, &lineage)?;
    out.write(ctx.out)?;
    Ok(report)
}
