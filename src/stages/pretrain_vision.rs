//! `pretrain-vision`: the vision tower learned contrastively from generic-domain image-text
//! pairs ([`crate::model::clip`]), the stand-in for the CLIP-family tower a real VLM starts
//! from. Training images are mirrored at random (half of each batch). It reads the
//! foundation corpus (the preprocess node with `foundation` set), holds out
//! its last images to measure cross-modal retrieval, and publishes the tower alone
//! (`vision.*`), which pretrain-align of every backbone then loads. Keyed by the tower's
//! configuration and the foundation seed, not the cell's: one per sweep for the tiny presets.

use candle_core::{Device, Tensor};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::model::clip::{Clip, ClipConfig};
use crate::model::ops::Fwd;
use crate::model::VisionConfig;
use crate::plan::StageKind;
use crate::spec::params::TrainSpec;

use super::training::{self, CurveLog};
use super::{Outputs, StageCtx, StageError, StageReport};

/// What a foundation entry holds, beside `weights.safetensors`; pretrain-align checks it.
pub const FOUNDATION: &str = "foundation.json";

#[derive(Debug, Deserialize)]
struct Params {
    vision: VisionConfig,
    max_len: usize,
    embed_dim: usize,
    text_width: usize,
    train: TrainSpec,
}

/// `foundation.json` of a pretrain-vision entry.
#[derive(Debug, Serialize, Deserialize)]
pub struct VisionFoundation {
    pub vision: VisionConfig,
}

/// Images held out of training to measure retrieval: a tenth, at most 500.
fn held_out(n: usize) -> usize {
    (n / 10).min(500)
}

/// Token ids (B, T) and mask (B, T) of one caption per row, cut to `max_len`, padded.
fn texts(caps: &[&[u32]], max_len: usize, pad: u32) -> Result<(Tensor, Tensor), StageError> {
    let t = caps
        .iter()
        .map(|c| c.len().min(max_len))
        .max()
        .unwrap_or(1)
        .max(1);
    let mut ids = Vec::with_capacity(caps.len() * t);
    let mut mask = Vec::with_capacity(caps.len() * t);
    for c in caps {
        let c = &c[..c.len().min(max_len)];
        ids.extend_from_slice(c);
        mask.extend(std::iter::repeat_n(1f32, c.len()));
        ids.extend(std::iter::repeat_n(pad, t - c.len()));
        mask.extend(std::iter::repeat_n(0f32, t - c.len()));
    }
    let n = caps.len();
    Ok((
        Tensor::from_vec(ids, (n, t), &Device::Cpu).map_err(StageError::ctx("caption ids"))?,
        Tensor::from_vec(mask, (n, t), &Device::Cpu).map_err(StageError::ctx("caption mask"))?,
    ))
}

pub fn run(ctx: &StageCtx) -> Result<StageReport, StageError> {
    let p: Params = ctx.params()?;
    let pre = ctx.input(StageKind::Preprocess)?;
    let tok = training::load_tokenizer(pre)?;
    let data = training::load_split(pre, crate::data::preprocess::FOUNDATION_SPLIT)?;
    let hold = held_out(data.len());
    let n = data.len() - hold;
    if n == 0 {
        return Err(StageError::msg(format!(
            "the foundation corpus in {} has no images to pretrain on",
            pre.display()
        )));
    }
    let seed = ctx.desc.fingerprint.seed;
    let clip = Clip::new(
        &p.vision,
        &ClipConfig {
            embed_dim: p.embed_dim,
            text_width: p.text_width,
            ..ClipConfig::default()
        },
        tok.vocab_size(),
        seed,
    )
    .map_err(StageError::ctx("building the contrastive model"))?;
    let cfg = training::train_config(&p.train);
    let specs = clip
        .trainable_vars()
        .into_iter()
        .map(|t| {
            crate::train::ParamSpec::new(t.name, t.var, training::group(t.component))
                .with_decay(t.decay)
        })
        .collect();
    let mut trainer = crate::train::Trainer::new(specs, &cfg, seed)
        .map_err(StageError::ctx("setting up training"))?
        .with_checkpoints(ctx.scratch.join("ckpt"));
    if let Some(step) = trainer
        .resume()
        .map_err(StageError::ctx("resuming from a checkpoint"))?
    {
        eprintln!("resumed from the checkpoint at step {step}");
    }
    let bs = cfg.batch_size.min(n).max(2);
    let pad = tok.pad_id();
    let fwd = Fwd {
        train: true,
        rng: None,
    };
    let batch = |rows: &[usize], pick: &mut dyn FnMut(usize) -> usize| {
        let caps: Vec<&[u32]> = rows
            .iter()
            .map(|&r| {
                let toks = &data.tokens[r];
                toks.get(pick(toks.len().max(1)))
                    .map(Vec::as_slice)
                    .unwrap_or(&[])
            })
            .collect();
        let (ids, mask) = texts(&caps, p.max_len, pad)?;
        let idx = Tensor::new(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .map_err(StageError::ctx("index"))?;
        let images = data
            .images
            .index_select(&idx, 0)
            .map_err(StageError::ctx("selecting images"))?;
        Ok::<_, StageError>((images, ids, mask))
    };
    let val_rows: Vec<usize> = (n..data.len()).take(256).collect();
    let log = CurveLog::new(ctx.scratch);
    let summary = {
        let mut hooks = crate::train::Hooks::new()
            .record(|r: &crate::train::CurveRecord| log.append(r))
            .progress(|done, total| ctx.progress(done as u64, total as u64));
        if val_rows.len() >= 2 {
            hooks = hooks.validate(|_step| {
                let (images, ids, mask) = batch(&val_rows, &mut |_| 0)?;
                let l = clip.loss(&images, &ids, &mask, Fwd::EVAL)?;
                Ok(l.to_scalar::<f32>()? as f64)
            });
        }
        trainer
            .fit(
                |sc| {
                    let rows: Vec<usize> = (0..bs).map(|_| sc.rng.gen_range(0..n)).collect();
                    let picks: Vec<usize> = (0..bs).map(|_| sc.rng.gen_range(0..1000)).collect();
                    let mut it = picks.into_iter();
                    let (images, ids, mask) = batch(&rows, &mut |k| it.next().unwrap_or(0) % k)?;
                    let flips: Vec<bool> = (0..bs).map(|_| sc.rng.gen_bool(0.5)).collect();
                    let images = mirror(&images, &flips)?;
                    let loss = clip.loss(&images, &ids, &mask, fwd)?;
                    Ok(crate::train::Micro::new(loss, bs))
                },
                &mut hooks,
            )
            .map_err(StageError::ctx("training"))?
    };
    let mut out = Outputs::default();
    training::record_fit(&log, &summary, &mut out);
    out.metric(
        "",
        "logit_scale",
        clip.scale().map_err(StageError::ctx("reading the scale"))?,
    );
    // Cross-modal retrieval among the held-out pairs (first caption of each): how well the
    // tower tells images apart by what their captions say. Chance is 1 / held-out images.
    if hold >= 2 {
        let rows: Vec<usize> = (n..data.len()).collect();
        let (r_i2t, r_t2i) = retrieval(&clip, &rows, &mut |r: &[usize]| {
            let (images, ids, mask) = batch(r, &mut |_| 0)?;
            let img = clip
                .encode_images(&images, Fwd::EVAL)
                .map_err(StageError::ctx("encoding images"))?;
            let txt = clip
                .encode_texts(&ids, &mask, Fwd::EVAL)
                .map_err(StageError::ctx("encoding captions"))?;
            Ok((img, txt))
        })?;
        out.metric("foundation", "retrieval_r1_i2t", r_i2t);
        out.metric("foundation", "retrieval_r1_t2i", r_t2i);
        out.metric("foundation", "retrieval_pool", rows.len() as f64);
        eprintln!(
            "held-out retrieval among {} pairs: image->text R@1 {:.3}, text->image R@1 {:.3}",
            rows.len(),
            r_i2t,
            r_t2i
        );
    }
    if !summary.missing_grads.is_empty() {
        return Err(StageError::msg(format!(
            "{} trainable tensors received no gradient (e.g. {})",
            summary.missing_grads.len(),
            summary.missing_grads[0]
        )));
    }
    clip.save_vision(&ctx.out.join(training::WEIGHTS))
        .map_err(StageError::ctx("saving the vision tower"))?;
    let f = ctx.out.join(FOUNDATION);
    std::fs::write(
        &f,
        serde_json::to_vec_pretty(&VisionFoundation { vision: p.vision }).expect("json"),
    )
    .map_err(StageError::ctx(format!("writing {}", f.display())))?;
    out.write(ctx.out)?;
    let trainable: usize = clip
        .trainable_vars()
        .iter()
        .map(|t| t.var.elem_count())
        .sum();
    Ok(StageReport {
        trainable_params: Some(trainable as u64),
        total_params: Some(trainable as u64),
    })
}

/// `images` (B, 3, S, S) with the rows marked in `flips` mirrored left to right: CLIP-style
/// augmentation against memorising the corpus (no caption of the generic domain depends on
/// left and right).
fn mirror(images: &Tensor, flips: &[bool]) -> candle_core::Result<Tensor> {
    let (b, _, _, w) = images.dims4()?;
    let rev = Tensor::new((0..w as u32).rev().collect::<Vec<_>>(), images.device())?;
    let flipped = images.index_select(&rev, 3)?;
    let m: Vec<f32> = flips.iter().map(|&f| f32::from(u8::from(f))).collect();
    let m = Tensor::from_vec(m, (b, 1, 1, 1), images.device())?;
    flipped
        .broadcast_mul(&m)?
        .add(&images.broadcast_mul(&(1.0 - &m)?)?)
}

/// Recall@1 both ways among `rows` (pair i is image i with caption i), encoded in chunks.
fn retrieval(
    _clip: &Clip,
    rows: &[usize],
    encode: &mut dyn FnMut(&[usize]) -> Result<(Tensor, Tensor), StageError>,
) -> Result<(f64, f64), StageError> {
    let mut imgs = Vec::new();
    let mut txts = Vec::new();
    for chunk in rows.chunks(128) {
        let (i, t) = encode(chunk)?;
        imgs.push(i);
        txts.push(t);
    }
    let img = Tensor::cat(&imgs, 0).map_err(StageError::ctx("embeddings"))?;
    let txt = Tensor::cat(&txts, 0).map_err(StageError::ctx("embeddings"))?;
    let sim = img
        .matmul(&txt.t().map_err(StageError::ctx("similarity"))?)
        .map_err(StageError::ctx("similarity"))?;
    let sim: Vec<Vec<f32>> = sim.to_vec2().map_err(StageError::ctx("similarity"))?;
    let k = sim.len();
    let argmax = |it: &mut dyn Iterator<Item = f32>| {
        it.enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (j, v)| if v > b.1 { (j, v) } else { b },
            )
            .0
    };
    let i2t = (0..k)
        .filter(|&i| argmax(&mut sim[i].iter().copied()) == i)
        .count();
    let t2i = (0..k)
        .filter(|&j| argmax(&mut sim.iter().map(|r| r[j])) == j)
        .count();
    Ok((i2t as f64 / k as f64, t2i as f64 / k as f64))
}
