//! `evaluate`: caption the evaluated split (valid by default) with the cell's
//! model (or baseline), score it with pycocoevalcap-exact metrics, and write
//! the test split's predictions as a MUGE submission file
//! (`caption_gen.jsonl`). Decoding settings are this stage's parameters only,
//! so a decoding grid reuses every trained stage. A zero-shot cell's model is
//! its pretrain-align entry's or, on a whole checkpoint, the checkpoint itself
//! (named in this stage's parameters, with no training input).

use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::cache::CaptionRecord;
use crate::data::preprocess::Split;
use crate::decode::{self, DecodeConfig, Strategy};
use crate::metrics::{References, Tokenize};
use crate::model::Phase;
use crate::plan::StageKind;

use super::training::{self, Lineage};
use super::{baseline, Outputs, StageCtx, StageError, StageReport};

#[derive(Debug, Deserialize)]
struct Params {
    split: String,
    tokenize: Tokenize,
    predict_test: bool,
    baseline: Option<String>,
    /// `greedy`, `beam`, `nucleus` (a [`Strategy`]) or `rerank`.
    method: Option<String>,
    max_len: Option<usize>,
    repetition_penalty: Option<f64>,
    beam_width: Option<usize>,
    length_penalty: Option<f64>,
    top_p: Option<f64>,
    temperature: Option<f64>,
    /// `rerank`: weight of the consensus score beside the model's log-probability.
    rerank_weight: Option<f64>,
    /// A zero-shot cell: the model as pretrain-align (or the checkpoint) left it.
    #[serde(default)]
    zero_shot: bool,
    /// A zero-shot cell on a whole checkpoint: what builds the model, which no stage trained.
    model: Option<serde_json::Value>,
}

/// Something that captions a split.
enum Captioner<'a> {
    Nn(&'a Split),
    Mfc(String),
    Model {
        model: crate::model::Captioner,
        tok: crate::data::tokenizer::CaptionTokenizer,
        cfg: DecodeConfig,
        seed: u64,
        /// The training split, where a retrieval-augmented model retrieves its captions and
        /// rerank decoding its candidates.
        retrieval: Option<Split>,
        /// `rerank` decoding: the consensus weight (the model's greedy caption is one candidate).
        rerank: Option<f64>,
    },
}

impl Captioner<'_> {
    fn caption(
        &self,
        split: &Split,
        progress: &dyn Fn(u64, u64),
    ) -> Result<Vec<String>, StageError> {
        match self {
            Captioner::Nn(train) => baseline::nearest_neighbour(train, split, progress),
            Captioner::Mfc(c) => Ok(vec![c.clone(); split.len()]),
            Captioner::Model {
                model,
                tok,
                cfg,
                seed,
                retrieval,
                rerank,
            } => {
                let inference = model
                    .inference()
                    .map_err(StageError::ctx("preparing the model for decoding"))?;
                // One index serves the prompts and the rerank candidates.
                let index = retrieval.as_ref().map(baseline::Index::new).transpose()?;
                let prompts = match &index {
                    Some(i) if model.config().retrieved > 0 => {
                        Some(training::prompts(model.config(), i, split)?)
                    }
                    _ => None,
                };
                let n = split.len();
                let bs = BATCH;
                let mut ids_all: Vec<Vec<u32>> = Vec::with_capacity(n);
                for start in (0..n).step_by(bs) {
                    let len = bs.min(n - start);
                    let rows: Vec<usize> = (start..start + len).collect();
                    let inputs =
                        training::inputs(split, prompts.as_deref(), &rows, model.config())?;
                    let ids =
                        decode::generate(&inference, inputs, cfg, seed.wrapping_add(start as u64))
                            .map_err(StageError::ctx("decoding"))?;
                    ids_all.extend(ids);
                    progress((start + len) as u64, n as u64);
                }
                match (rerank, &index) {
                    (Some(weight), Some(index)) => {
                        let pools = index.pools(split, &|_, _| {})?;
                        super::rerank::rerank(
                            &inference,
                            tok,
                            index,
                            &pools,
                            split,
                            prompts.as_deref(),
                            &ids_all,
                            *weight,
                        )
                    }
                    _ => Ok(ids_all.iter().map(|s| tok.decode(s)).collect()),
                }
            }
        }
    }
}

/// The lineage of a zero-shot cell's checkpoint, evaluated as it is: no stage trained it, so
/// the model is built from the checkpoint directory alone. The lineage is written beside the
/// captions, so `ecic predict` of the cell rebuilds the same model.
fn checkpoint_lineage(ctx: &StageCtx, model: &serde_json::Value) -> Result<Lineage, StageError> {
    let m: super::pretrain_align::ModelParams = serde_json::from_value(model.clone())
        .map_err(|e| StageError::msg(format!("evaluate model parameters: {e}")))?;
    let pre = ctx.input(StageKind::Preprocess)?;
    let (cfg, ck) = super::pretrain_align::model_config(&m, pre, ctx.desc.fingerprint.seed)?;
    let ck = ck.ok_or_else(|| {
        StageError::msg("a zero-shot evaluate without a training input needs model.checkpoint")
    })?;
    let preprocess = ctx
        .desc
        .inputs
        .iter()
        .find(|(k, _)| *k == StageKind::Preprocess)
        .map(|(_, key)| key.clone())
        .ok_or_else(|| StageError::msg("evaluate has no preprocess input"))?;
    let lineage = Lineage {
        model: cfg,
        peft: crate::model::PeftConfig::default(),
        preprocess,
        weights: Vec::new(),
        checkpoint: Some(ck.dir().to_path_buf()),
    };
    lineage.write(ctx.out)?;
    Ok(lineage)
}

/// Keep one row per image (the clean view).
fn clean(split: Split) -> Result<Split, StageError> {
    if split.copies.iter().all(|&c| c == 0) {
        return Ok(split);
    }
    let rows = baseline::clean_rows(&split);
    let idx = Tensor::new(
        rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
        &Device::Cpu,
    )
    .map_err(StageError::ctx("index"))?;
    Ok(Split {
        name: split.name.clone(),
        ids: rows.iter().map(|&r| split.ids[r].clone()).collect(),
        copies: vec![0; rows.len()],
        images: split
            .images
            .index_select(&idx, 0)
            .map_err(StageError::ctx("selecting rows"))?,
        captions: rows.iter().map(|&r| split.captions[r].clone()).collect(),
        tokens: rows.iter().map(|&r| split.tokens[r].clone()).collect(),
    })
}

/// The decoding an evaluate stage's parameters ask for: what it captions with, and what
/// `ecic predict` of its cell repeats.
#[derive(Debug, Clone)]
pub struct Decoding {
    pub config: DecodeConfig,
    /// `rerank`: the consensus weight (the model's greedy caption is one candidate).
    pub rerank: Option<f64>,
}

/// [`Decoding`] from an evaluate stage's recorded parameters (`stages.params` in the store).
pub fn decoding_of(params: &serde_json::Value) -> Result<Decoding, StageError> {
    let p: Params = serde_json::from_value(params.clone())
        .map_err(|e| StageError::msg(format!("evaluate parameters: {e}")))?;
    decoding(&p)
}

fn decoding(p: &Params) -> Result<Decoding, StageError> {
    let rerank = match p.method.as_deref() {
        Some("rerank") => Some(p.rerank_weight.unwrap_or(1.0)),
        _ => None,
    };
    let strategy = match p.method.as_deref() {
        None | Some("rerank") => Strategy::Greedy,
        Some(m) => serde_json::from_value(serde_json::json!(m)).map_err(|_| {
            StageError::msg(format!(
                "unknown decoding method `{m}` (greedy, beam, nucleus, rerank)"
            ))
        })?,
    };
    let config = DecodeConfig {
        strategy,
        beam_width: p.beam_width.unwrap_or(1),
        length_penalty: p.length_penalty.unwrap_or(1.0),
        top_p: p.top_p.unwrap_or(1.0),
        temperature: p.temperature.unwrap_or(1.0),
        repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
        max_len: p.max_len.unwrap_or(32) + 1,
        kv_cache: true,
    };
    Ok(Decoding { config, rerank })
}

/// Images per decoding batch; `ecic predict` uses the same so that its batches (and a
/// sampling method's per-batch seeds, `seed + first row`) are the evaluate stage's.
pub const BATCH: usize = 64;

pub fn run(ctx: &StageCtx) -> Result<StageReport, StageError> {
    let p: Params = ctx.params()?;
    let pre = ctx.input(StageKind::Preprocess)?.to_path_buf();
    let mut report = StageReport::default();
    let mut out = Outputs::default();
    let train_split;
    let captioner = match p.baseline.as_deref() {
        Some("nn") => {
            train_split = training::load_split(&pre, "train")?;
            Captioner::Nn(&train_split)
        }
        Some("mfc") => {
            let train = training::load_split(&pre, "train")?;
            Captioner::Mfc(baseline::most_frequent_caption(&train))
        }
        Some(other) => return Err(StageError::msg(format!("unknown baseline `{other}`"))),
        None => {
            let lineage = match &p.model {
                Some(m) => checkpoint_lineage(ctx, m)?,
                None => {
                    let model_entry = ctx
                        .inputs
                        .iter()
                        .find(|(k, _)| *k != StageKind::Preprocess)
                        .map(|(_, p)| p.clone())
                        .ok_or_else(|| StageError::msg("evaluate has no trained input"))?;
                    Lineage::read(&model_entry)?
                }
            };
            // A zero-shot model is built as pretrain-align built it: no PEFT tensors, so its
            // parameter counts are the aligned model's.
            let phase = if p.zero_shot {
                Phase::Align
            } else {
                Phase::Adapt
            };
            let model = lineage.build(ctx, phase)?;
            report = training::counts(&model, &mut out);
            let tok = training::load_tokenizer(&pre)?;
            let Decoding {
                config: cfg,
                rerank,
            } = decoding(&p)?;
            let retrieval = if model.config().retrieved > 0 || rerank.is_some() {
                Some(training::load_split(&pre, "train")?)
            } else {
                None
            };
            Captioner::Model {
                model,
                tok,
                cfg,
                seed: ctx.desc.fingerprint.seed,
                retrieval,
                rerank,
            }
        }
    };
    let mut splits = vec![p.split.clone()];
    if p.predict_test && p.split != "test" {
        splits.push("test".into());
    }
    // On synthetic data the truth of every image is known: grounding metrics.
    let truths = crate::data::synth::SynthConfig::of_dir(&ctx.desc.data_dir).map(|cfg| {
        splits
            .iter()
            .map(|name| {
                let (prefix, n) = match name.as_str() {
                    "valid" => ("IC_valid", cfg.valid),
                    "test" => ("IC_test", cfg.test),
                    _ => ("IC_train", cfg.train),
                };
                (name.clone(), crate::data::synth::truths(&cfg, prefix, n))
            })
            .collect::<std::collections::HashMap<_, _>>()
    });
    let total_t0 = Instant::now();
    let mut captioned = 0usize;
    for name in &splits {
        let split = match training::load_split(&pre, name) {
            Ok(s) => clean(s)?,
            Err(e) if name != &p.split => {
                eprintln!("no {name} split to predict: {e}");
                continue;
            }
            Err(e) => return Err(e),
        };
        let preds = captioner.caption(&split, &|a, b| ctx.progress(a, b))?;
        captioned += preds.len();
        let d = crate::metrics::diversity::diversity(&preds, p.tokenize);
        out.metric(name, "distinct_ratio", d.distinct_ratio);
        out.metric(name, "top_caption_share", d.top_share);
        out.metric(name, "vocab_used", d.vocab as f64);
        if let Some(truths) = truths.as_ref().and_then(|t| t.get(name.as_str())) {
            let g = crate::data::synth::grounding(truths, &split.ids, &preds);
            for (m, v) in [
                ("grounding_category", g.category),
                ("grounding_colour", g.colour),
                ("grounding_pattern", g.pattern),
                ("grounding_second", g.second),
            ] {
                if let Some(v) = v {
                    out.metric(name, m, v);
                }
            }
        }
        let has_refs = split.captions.iter().all(|c| !c.is_empty()) && !split.captions.is_empty();
        let mut scores: Vec<Option<serde_json::Value>> = vec![None; preds.len()];
        if has_refs {
            let refs: Vec<(String, Vec<String>)> = split
                .ids
                .iter()
                .cloned()
                .zip(split.captions.iter().cloned())
                .collect();
            let references = References::new(&refs, p.tokenize)
                .map_err(|e| StageError::msg(format!("{name} references: {e}")))?;
            let eval = references
                .evaluate_in_order(&preds)
                .map_err(|e| StageError::msg(format!("scoring {name}: {e}")))?;
            let s = &eval.scores;
            for (m, v) in [
                ("bleu1", s.bleu1),
                ("bleu2", s.bleu2),
                ("bleu3", s.bleu3),
                ("bleu4", s.bleu4),
                ("rouge_l", s.rouge_l),
                ("cider_d", s.cider_d),
                ("images", s.images as f64),
            ] {
                out.metric(name, m, v);
            }
            for (slot, img) in scores.iter_mut().zip(&eval.images) {
                *slot = serde_json::to_value(img).ok();
            }
        } else if name == &p.split {
            return Err(StageError::msg(format!(
                "the {name} split has no references to score against"
            )));
        }
        for ((id, caption), scores) in split.ids.iter().zip(&preds).zip(scores) {
            out.captions.push(CaptionRecord {
                split: name.clone(),
                image_id: id.clone(),
                caption: caption.clone(),
                scores,
            });
        }
        if name == "test" {
            let path = ctx.out.join("caption_gen.jsonl");
            crate::data::muge::write_predictions(
                &path,
                split
                    .ids
                    .iter()
                    .map(String::as_str)
                    .zip(preds.iter().map(String::as_str)),
            )
            .map_err(StageError::ctx("writing caption_gen.jsonl"))?;
        }
    }
    let secs = total_t0.elapsed().as_secs_f64();
    out.metric("", "captions_per_s", captioned as f64 / secs.max(1e-9));
    out.write(ctx.out)?;
    Ok(report)
}
