//! What the three training stages share: the model lineage (which entries'
//! weights rebuild a model), batches of (image, caption) pairs, the
//! translation of spec settings into `train` configurations, and curve
//! recording.
//!
//! A training stage publishes `weights.safetensors` with only what it trained
//! and `lineage.json`, naming the model configuration and, in order, the
//! entries whose weights rebuild it: the pretrain-align base first, then the
//! PEFT stages' deltas. A zero-shot evaluate of a whole checkpoint writes a
//! lineage naming the checkpoint directory and no entries.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::data::preprocess::Split;
use crate::data::tokenizer::CaptionTokenizer;
use crate::model::{Captioner, Component, Inputs, ModelConfig, PeftConfig, Phase};
use crate::spec::params::TrainSpec;
use crate::train::{CurveRecord, Group, GroupLr, ParamSpec, TrainConfig};

use super::baseline::Index;
use super::{Outputs, StageCtx, StageError, StageReport};

pub const WEIGHTS: &str = "weights.safetensors";
pub const LINEAGE: &str = "lineage.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lineage {
    pub model: ModelConfig,
    pub peft: PeftConfig,
    /// Key of the preprocess entry (data tensors and tokenizer).
    pub preprocess: String,
    /// Keys of the entries whose `weights.safetensors` rebuild the model, base first.
    pub weights: Vec<String>,
    /// A model with no training stage (a zero-shot cell on a whole checkpoint): the
    /// `model.checkpoint` directory its weights are read from, and `weights` is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<PathBuf>,
}

impl Lineage {
    pub fn read(entry: &Path) -> Result<Lineage, StageError> {
        let p = entry.join(LINEAGE);
        let bytes =
            std::fs::read(&p).map_err(StageError::ctx(format!("reading {}", p.display())))?;
        serde_json::from_slice(&bytes).map_err(StageError::ctx(format!("parsing {}", p.display())))
    }

    pub fn write(&self, dir: &Path) -> Result<(), StageError> {
        let p = dir.join(LINEAGE);
        std::fs::write(&p, serde_json::to_vec_pretty(self).expect("json"))
            .map_err(StageError::ctx(format!("writing {}", p.display())))
    }

    /// Build the model for `phase` and load every weight file of the lineage.
    pub fn build(&self, ctx: &StageCtx, phase: Phase) -> Result<Captioner, StageError> {
        self.build_in(&ctx.objects, phase)
    }

    /// [`Lineage::build`] outside a stage: the lineage's entries are looked up in `objects`
    /// (the cache's object root), as `ecic predict` of a recorded cell does.
    pub fn build_in(&self, objects: &Path, phase: Phase) -> Result<Captioner, StageError> {
        let mut model = Captioner::new(&self.model, &self.peft, phase, &Device::Cpu)
            .map_err(StageError::ctx("building the model"))?;
        if let Some(dir) = &self.checkpoint {
            let ck = crate::model::hf::Checkpoint::open(dir)
                .map_err(StageError::ctx("opening model.checkpoint"))?;
            model
                .load_pretrained(&ck)
                .map_err(StageError::ctx("loading model.checkpoint"))?;
        }
        for (i, key) in self.weights.iter().enumerate() {
            let path = objects.join(key).join(WEIGHTS);
            if i == 0 {
                model
                    .load_base(&path)
                    .map_err(StageError::ctx("loading the pretrain-align weights"))?;
            } else {
                model
                    .load_trained(&path)
                    .map_err(StageError::ctx("loading trained weights"))?;
            }
        }
        Ok(model)
    }
}

impl StageCtx<'_> {
    /// A complete entry by key (lineage references).
    pub fn entry(&self, key: &str) -> PathBuf {
        self.objects.join(key)
    }
}

pub fn load_tokenizer(preprocess: &Path) -> Result<CaptionTokenizer, StageError> {
    CaptionTokenizer::load(&preprocess.join("tokenizer.json"))
        .map_err(StageError::ctx("loading the tokenizer"))
}

pub fn load_split(preprocess: &Path, name: &str) -> Result<Split, StageError> {
    Split::load(preprocess, name).map_err(StageError::ctx(format!("loading the {name} split")))
}

pub fn group(c: Component) -> Group {
    match c {
        Component::Vision => Group::Vision,
        Component::Connector => Group::Connector,
        Component::Lm => Group::Lm,
        Component::Adapter => Group::Adapter,
    }
}

pub fn param_specs(model: &Captioner) -> Vec<ParamSpec> {
    model
        .trainable_vars()
        .into_iter()
        .map(|t| ParamSpec::new(t.name, t.var, group(t.component)).with_decay(t.decay))
        .collect()
}

pub fn lr_mult(m: &std::collections::BTreeMap<String, f64>) -> GroupLr {
    let mut g = GroupLr::default();
    for (k, v) in m {
        match k.as_str() {
            "vision" => g.vision = *v,
            "connector" => g.connector = *v,
            "lm" => g.lm = *v,
            "adapter" => g.adapter = *v,
            _ => {}
        }
    }
    g
}

pub fn train_config(t: &TrainSpec) -> TrainConfig {
    TrainConfig {
        steps: t.steps as usize,
        batch_size: t.batch_size,
        lr: t.lr,
        warmup: t.warmup as usize,
        min_lr_ratio: t.min_lr_ratio,
        weight_decay: t.weight_decay,
        grad_clip: t.grad_clip,
        accum: t.accum as usize,
        lr_mult: lr_mult(&t.lr_mult),
        label_smoothing: t.label_smoothing,
        ckpt_every: t.ckpt_every as usize,
        val_every: t.val_every as usize,
        ..TrainConfig::default()
    }
}

/// The retrieval index over `train` for a model that reads retrieved captions
/// (`model.retrieve`); `None` for one that does not.
pub fn retrieval_index<'a>(
    cfg: &ModelConfig,
    train: &'a Split,
) -> Result<Option<Index<'a>>, StageError> {
    (cfg.retrieved > 0).then(|| Index::new(train)).transpose()
}

/// Retrieval augmentation: for every row of `query`, the token ids of the `cfg.retrieved`
/// captions retrieved for it from `index` ([`super::baseline::retrieve`], leave-one-out), each
/// cut to `max_caption_len` and closed by EOS.
pub fn prompts(
    cfg: &ModelConfig,
    index: &Index,
    query: &Split,
) -> Result<Vec<Vec<u32>>, StageError> {
    let train = index.train();
    let picks = super::baseline::retrieve(index, query, cfg.retrieved, &|_, _| {})?;
    Ok(picks
        .iter()
        .map(|p| {
            p.iter()
                .flat_map(|&(r, j)| {
                    let t = &train.tokens[r][j];
                    t[..t.len().min(cfg.max_caption_len)]
                        .iter()
                        .copied()
                        .chain(std::iter::once(cfg.eos_id))
                })
                .collect()
        })
        .collect())
}

/// The model inputs for `rows`: their images and, with `prompts`, their retrieved captions.
pub fn inputs(
    split: &Split,
    prompts: Option<&[Vec<u32>]>,
    rows: &[usize],
    cfg: &ModelConfig,
) -> Result<Inputs, StageError> {
    let idx = Tensor::new(
        rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
        &Device::Cpu,
    )
    .map_err(StageError::ctx("index"))?;
    let images = split
        .images
        .index_select(&idx, 0)
        .map_err(StageError::ctx("selecting images"))?;
    let prompt = prompts
        .map(|p| {
            let sel: Vec<&[u32]> = rows.iter().map(|&r| p[r].as_slice()).collect();
            crate::model::prompt_tensor(&sel, cfg.pad_id, &Device::Cpu)
        })
        .transpose()
        .map_err(StageError::ctx("batching retrieved captions"))?;
    Ok(Inputs::new(images, prompt))
}

/// Teacher-forcing tensors for `rows` of a split, one caption each
/// (`pick(row)` chooses which): input `[BOS] + tokens`, target `tokens + [EOS]`.
pub struct Batch {
    pub inputs: Inputs,
    pub input: Tensor,
    pub target: Tensor,
    pub mask: Tensor,
}

pub fn batch(
    split: &Split,
    prompts: Option<&[Vec<u32>]>,
    rows: &[usize],
    pick: &mut dyn FnMut(usize) -> usize,
    cfg: &ModelConfig,
) -> Result<Batch, StageError> {
    let caps: Vec<&[u32]> = rows
        .iter()
        .map(|&r| {
            let toks = &split.tokens[r];
            let i = pick(toks.len().max(1)).min(toks.len().saturating_sub(1));
            toks.get(i).map(Vec::as_slice).unwrap_or(&[])
        })
        .collect();
    let crate::model::TeacherForcing {
        input: inp,
        target: tgt,
        mask: msk,
        len: t,
    } = crate::model::TeacherForcing::new(cfg, &caps);
    let n = rows.len();
    let inputs = inputs(split, prompts, rows, cfg)?;
    let (input, target, mask) = (
        Tensor::from_vec(inp, (n, t), &Device::Cpu),
        Tensor::from_vec(tgt, (n, t), &Device::Cpu),
        Tensor::from_vec(msk, (n, t), &Device::Cpu),
    );
    Ok(Batch {
        inputs,
        input: input.map_err(StageError::ctx("batch input"))?,
        target: target.map_err(StageError::ctx("batch target"))?,
        mask: mask.map_err(StageError::ctx("batch mask"))?,
    })
}

/// Cross-entropy training of `model`'s trainable variables on `train`, with
/// validation loss on (up to 64 rows of) `valid`. Curves go to `out`.
pub fn train_ce(
    ctx: &StageCtx,
    model: &Captioner,
    train: &Split,
    valid: Option<&Split>,
    spec: &TrainSpec,
    out: &mut Outputs,
) -> Result<StageReport, StageError> {
    let cfg = train_config(spec);
    let seed = ctx.desc.fingerprint.seed;
    model.set_dropout_seed(seed ^ 0x5eed);
    let mut trainer = crate::train::Trainer::new(param_specs(model), &cfg, seed)
        .map_err(StageError::ctx("setting up training"))?
        .with_checkpoints(ctx.scratch.join("ckpt"));
    if let Some(step) = trainer
        .resume()
        .map_err(StageError::ctx("resuming from a checkpoint"))?
    {
        eprintln!("resumed from the checkpoint at step {step}");
    }
    let mcfg = model.config().clone();
    let n = train.len();
    let bs = cfg.batch_size.min(n).max(1);
    let label_smoothing = cfg.label_smoothing;
    let val_rows: Vec<usize> = valid
        .map(|v| (0..v.len().min(64)).collect())
        .unwrap_or_default();
    let index = retrieval_index(&mcfg, train)?;
    let train_prompts = index
        .as_ref()
        .map(|i| prompts(&mcfg, i, train))
        .transpose()?;
    let valid_prompts = index
        .as_ref()
        .zip(valid)
        .map(|(i, v)| prompts(&mcfg, i, v))
        .transpose()?;
    let log = CurveLog::new(ctx.scratch);
    let summary = {
        let mut hooks = crate::train::Hooks::new()
            .record(|r: &CurveRecord| log.append(r))
            .progress(|done, total| ctx.progress(done as u64, total as u64));
        if let Some(v) = valid.filter(|_| !val_rows.is_empty()) {
            let mcfg = mcfg.clone();
            let rows = val_rows.clone();
            let vp = valid_prompts.as_deref();
            hooks = hooks.validate(move |_step| {
                let b = batch(v, vp, &rows, &mut |_| 0, &mcfg)?;
                let l = model.loss(&b.inputs, &b.input, &b.target, &b.mask, 0.0)?;
                Ok(l.to_scalar::<f32>()? as f64)
            });
        }
        trainer
            .fit(
                |sc| {
                    let rows: Vec<usize> = (0..bs).map(|_| sc.rng.gen_range(0..n)).collect();
                    let mut picks: Vec<usize> = Vec::with_capacity(bs);
                    for _ in 0..bs {
                        picks.push(sc.rng.gen_range(0..1000));
                    }
                    let mut it = picks.into_iter();
                    let b = batch(
                        train,
                        train_prompts.as_deref(),
                        &rows,
                        &mut |k| it.next().unwrap_or(0) % k,
                        &mcfg,
                    )?;
                    let loss =
                        model.loss(&b.inputs, &b.input, &b.target, &b.mask, label_smoothing)?;
                    Ok(crate::train::Micro::new(loss, bs))
                },
                &mut hooks,
            )
            .map_err(StageError::ctx("training"))?
    };
    record_fit(&log, &summary, out);
    if !summary.missing_grads.is_empty() {
        return Err(StageError::msg(format!(
            "{} trainable tensors received no gradient (e.g. {}): the model cuts its gradient somewhere",
            summary.missing_grads.len(),
            summary.missing_grads[0]
        )));
    }
    Ok(counts(model, out))
}

/// Curve records survive a kill: each is appended to the stage's scratch
/// directory as it arrives, and a resumed attempt reads the earlier ones back
/// (later records of the same step win, as a resume replays the steps after
/// its checkpoint).
pub struct CurveLog {
    path: PathBuf,
}

impl CurveLog {
    pub fn new(scratch: &Path) -> CurveLog {
        CurveLog {
            path: scratch.join("curves.jsonl"),
        }
    }

    pub fn append(&self, r: &CurveRecord) {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
        {
            let _ = writeln!(
                f,
                "{}",
                serde_json::to_string(&CurvePoint::from(r)).unwrap_or_default()
            );
        }
    }

    /// Every record so far, one per step.
    pub fn all(&self) -> Vec<CurveRecord> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let mut by_step = std::collections::BTreeMap::new();
        for line in text.lines() {
            if let Ok(p) = serde_json::from_str::<CurvePoint>(line) {
                by_step.insert(p.step, p.into());
            }
        }
        by_step.into_values().collect()
    }
}

#[derive(Serialize, Deserialize)]
struct CurvePoint {
    step: usize,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    samples_per_s: f64,
    reward: Option<f64>,
    val_loss: Option<f64>,
}

impl From<&CurveRecord> for CurvePoint {
    fn from(r: &CurveRecord) -> Self {
        CurvePoint {
            step: r.step,
            loss: r.loss,
            lr: r.lr,
            grad_norm: r.grad_norm,
            samples_per_s: r.samples_per_s,
            reward: r.reward,
            val_loss: r.val_loss,
        }
    }
}

impl From<CurvePoint> for CurveRecord {
    fn from(p: CurvePoint) -> Self {
        CurveRecord {
            step: p.step,
            loss: p.loss,
            lr: p.lr,
            grad_norm: p.grad_norm,
            samples_per_s: p.samples_per_s,
            reward: p.reward,
            val_loss: p.val_loss,
        }
    }
}

/// A training run's curves (from its log, resumed attempts included) and summary figures:
/// `final_loss`, `final_val_loss`, `samples_per_s`.
pub fn record_fit(log: &CurveLog, summary: &crate::train::FitSummary, out: &mut Outputs) {
    record_curves(&log.all(), out);
    if let Some(l) = summary.last_loss {
        out.metric("", "final_loss", l);
    }
    if let Some(l) = summary.last_val_loss {
        out.metric("", "final_val_loss", l);
    }
    out.metric("", "samples_per_s", summary.mean_samples_per_s);
}

pub fn record_curves(records: &[CurveRecord], out: &mut Outputs) {
    for r in records {
        let s = r.step as u64;
        out.curve(s, "loss", r.loss);
        out.curve(s, "lr", r.lr);
        out.curve(s, "grad_norm", r.grad_norm);
        out.curve(s, "samples_per_s", r.samples_per_s);
        if let Some(v) = r.reward {
            out.curve(s, "reward", v);
        }
        if let Some(v) = r.val_loss {
            out.curve(s, "val_loss", v);
        }
    }
}

pub fn counts(model: &Captioner, out: &mut Outputs) -> StageReport {
    let c = model.counts();
    out.metric("", "trainable_params", c.trainable as f64);
    out.metric("", "total_params", c.total as f64);
    out.metric("", "frozen_bytes", c.frozen_bytes as f64);
    StageReport {
        trainable_params: Some(c.trainable as u64),
        total_params: Some(c.total as u64),
    }
}

/// Save what the model trained, and the lineage that rebuilds it.
pub fn publish_model(
    ctx: &StageCtx,
    model: &Captioner,
    lineage: &Lineage,
) -> Result<(), StageError> {
    model
        .save_trained(&ctx.out.join(WEIGHTS))
        .map_err(StageError::ctx("saving the trained weights"))?;
    lineage.write(ctx.out)
}
