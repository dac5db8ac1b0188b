//! What the three training stages share: the model lineage (which entries'
//! weights rebuild a model), batches of (image, caption) pairs, the
//! translation of spec settings into `train` configurations, and curve
//! recording.
//!
//! A training stage that is a rung of a search (see [`RungBudget`]) trains
//! to its budget only and also publishes the checkpoint the next rung
//! resumes from.
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
    let rung = RungBudget::of(ctx);
    let ckpt = ctx.scratch.join("ckpt");
    if let Some(r) = &rung {
        r.seed(&ckpt)?;
    }
    let mut trainer = crate::train::Trainer::new(param_specs(model), &cfg, seed)
        .map_err(StageError::ctx("setting up training"))?
        .with_checkpoints(ckpt);
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
        let until = rung.as_ref().map_or(cfg.steps, |r| r.steps);
        trainer
            .fit_until(
                until,
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
    if let Some(r) = &rung {
        r.publish(&trainer, ctx.out)?;
        // The rung's valid loss, which a search may promote on (`loss`):
        // the loop validates on its own schedule, not at a rung's end.
        if let Some(v) = valid.filter(|_| !val_rows.is_empty()) {
            let b = batch(v, valid_prompts.as_deref(), &val_rows, &mut |_| 0, &mcfg)?;
            let l = model
                .loss(&b.inputs, &b.input, &b.target, &b.mask, 0.0)
                .and_then(|l| Ok(l.to_scalar::<f32>()?))
                .map_err(StageError::ctx("validating the rung"))?;
            out.metric("valid", "loss", l as f64);
        }
    }
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

/// A rung of a budgeted stage under `[search.asha]` (docs/search.md): the
/// stage's schedule spans its full `steps` (the search's `max_steps`), it
/// trains only to `rung_steps`, and a rung above the first starts from the
/// checkpoint the rung below it published, so that promoted training is
/// continued, never repeated.
#[derive(Debug, Clone)]
pub struct RungBudget {
    /// Steps completed when this rung ends.
    pub steps: usize,
    /// The entry of the rung below (an input of this stage's own kind).
    pub lower: Option<PathBuf>,
}

/// Where a rung publishes the checkpoint the next rung resumes from.
pub const RUNG_CKPT: &str = "ckpt";

impl RungBudget {
    /// The stage's rung budget, if it is a rung.
    pub fn of(ctx: &StageCtx) -> Option<RungBudget> {
        let steps = ctx.desc.fingerprint.params.get("rung_steps")?.as_u64()? as usize;
        let lower = ctx.input(ctx.desc.kind).ok().map(Path::to_path_buf);
        Some(RungBudget { steps, lower })
    }

    /// Copy the lower rung's checkpoint into `ckpt` (the trainer's
    /// checkpoint directory), unless an earlier attempt of this rung left one
    /// there already (it is at least as far on; the trainer resumes from the
    /// newest).
    pub fn seed(&self, ckpt: &Path) -> Result<(), StageError> {
        let Some(lower) = &self.lower else {
            return Ok(());
        };
        let have = crate::train::checkpoint::latest(ckpt)
            .map_err(StageError::ctx("listing this rung's checkpoints"))?;
        if have.is_some() {
            return Ok(());
        }
        let from = lower.join(RUNG_CKPT);
        std::fs::create_dir_all(ckpt)
            .map_err(StageError::ctx(format!("creating {}", ckpt.display())))?;
        let entries = std::fs::read_dir(&from).map_err(StageError::ctx(format!(
            "reading the lower rung's checkpoint {}",
            from.display()
        )))?;
        for e in entries.flatten() {
            let to = ckpt.join(e.file_name());
            std::fs::copy(e.path(), &to)
                .map_err(StageError::ctx(format!("copying {}", e.path().display())))?;
        }
        Ok(())
    }

    /// Publish the trainer's state at the end of the rung into the stage's
    /// output, for the next rung (the top rung, at the schedule's end, has
    /// no next rung and publishes none).
    pub fn publish(&self, trainer: &crate::train::Trainer, out: &Path) -> Result<(), StageError> {
        if trainer.step() >= trainer.config().steps {
            return Ok(());
        }
        let path = trainer
            .save_checkpoint()
            .map_err(StageError::ctx("checkpointing the rung"))?
            .ok_or_else(|| StageError::msg("a rung trains with a checkpoint directory"))?;
        let dir = out.join(RUNG_CKPT);
        std::fs::create_dir_all(&dir)
            .map_err(StageError::ctx(format!("creating {}", dir.display())))?;
        let mut digest = path.as_os_str().to_os_string();
        digest.push(".b3");
        for p in [path.clone(), PathBuf::from(digest)] {
            let to = dir.join(p.file_name().unwrap_or_default());
            std::fs::copy(&p, &to).map_err(StageError::ctx(format!("copying {}", p.display())))?;
        }
        Ok(())
    }
}
