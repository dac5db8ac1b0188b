//! The loop: micro-batches -> accumulated gradients -> clipped AdamW step under the schedule, with curves,
//! validation, progress and checkpoints; resumable bitwise.
//!
//! The caller owns the data and the model. It gives the trainer the trainable variables and a closure that
//! computes one micro-batch's loss from a [`StepCtx`] (step index, micro-batch index and the loop's seeded
//! rng: draw batches from that rng and they are the same after a resume, because the rng state is part of
//! every checkpoint). Validation gets no rng, so validating never shifts the training batches.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::config::TrainConfig;
use super::optim::{AdamW, ParamSpec};
use super::schedule::lr_at;
use super::{checkpoint, BoxError, Result, TrainError};

/// What the loss closure returns for one micro-batch.
#[derive(Debug, Clone)]
pub struct Micro {
    /// Scalar loss with its autograd graph (mean over the micro-batch).
    pub loss: Tensor,
    /// Samples in the micro-batch, for samples/s.
    pub samples: usize,
    /// Mean reward (SCST); reported in the curves.
    pub reward: Option<f64>,
}

impl Micro {
    pub fn new(loss: Tensor, samples: usize) -> Self {
        Micro {
            loss,
            samples,
            reward: None,
        }
    }

    pub fn with_reward(mut self, reward: f64) -> Self {
        self.reward = Some(reward);
        self
    }
}

/// What the loss closure gets: which micro-batch to produce, and the rng to draw it with.
#[derive(Debug)]
pub struct StepCtx<'a> {
    /// Optimizer step, 0-based.
    pub step: usize,
    /// Micro-batch within the step, `0..accum`.
    pub micro: usize,
    pub rng: &'a mut ChaCha8Rng,
}

/// One point of the training curves (one optimizer step).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CurveRecord {
    /// Optimizer steps completed (1-based).
    pub step: usize,
    /// Mean loss over the step's micro-batches.
    pub loss: f64,
    /// Base learning rate used (before group multipliers).
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub samples_per_s: f64,
    pub reward: Option<f64>,
    pub val_loss: Option<f64>,
}

type ValidateFn<'a> = dyn FnMut(usize) -> std::result::Result<f64, BoxError> + 'a;
type RecordFn<'a> = dyn FnMut(&CurveRecord) + 'a;
type ProgressFn<'a> = dyn FnMut(usize, usize) + 'a;
type CheckpointFn<'a> = dyn FnMut(usize, &Path) + 'a;

/// Optional callbacks: validation loss, a curve sink, progress, checkpoint notices.
#[derive(Default)]
pub struct Hooks<'a> {
    validate: Option<Box<ValidateFn<'a>>>,
    record: Option<Box<RecordFn<'a>>>,
    progress: Option<Box<ProgressFn<'a>>>,
    checkpoint: Option<Box<CheckpointFn<'a>>>,
}

impl<'a> Hooks<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Validation loss after `step` completed steps; called every `val_every` steps and after the last.
    pub fn validate(
        mut self,
        f: impl FnMut(usize) -> std::result::Result<f64, BoxError> + 'a,
    ) -> Self {
        self.validate = Some(Box::new(f));
        self
    }

    /// Receives one record per optimizer step.
    pub fn record(mut self, f: impl FnMut(&CurveRecord) + 'a) -> Self {
        self.record = Some(Box::new(f));
        self
    }

    /// `(completed, total)` after each step, for progress bars.
    pub fn progress(mut self, f: impl FnMut(usize, usize) + 'a) -> Self {
        self.progress = Some(Box::new(f));
        self
    }

    /// `(step, path)` after each checkpoint is published.
    pub fn checkpoint(mut self, f: impl FnMut(usize, &Path) + 'a) -> Self {
        self.checkpoint = Some(Box::new(f));
        self
    }
}

/// What a `fit` call did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FitSummary {
    pub start_step: usize,
    pub end_step: usize,
    pub last_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
    pub last_reward: Option<f64>,
    /// Mean over the steps run in this call.
    pub mean_samples_per_s: f64,
    /// Variables that got no gradient in the first step run: usually a frozen part listed by mistake or
    /// an op without backward cutting the graph.
    pub missing_grads: Vec<String>,
    pub resumed_from: Option<usize>,
}

/// Sums over the micro-batches of one step.
struct StepGradients {
    loss_sum: f64,
    samples: usize,
    reward_sum: f64,
    rewards: usize,
    norm: f64,
}

/// The training loop's state: optimizer, rng, step, checkpoint directory.
#[derive(Debug)]
pub struct Trainer {
    optim: AdamW,
    cfg: TrainConfig,
    rng: ChaCha8Rng,
    step: usize,
    ckpt_dir: Option<PathBuf>,
    resumed_from: Option<usize>,
}

impl Trainer {
    pub fn new(params: Vec<ParamSpec>, cfg: &TrainConfig, seed: u64) -> Result<Self> {
        Ok(Trainer {
            optim: AdamW::new(params, cfg)?,
            cfg: cfg.clone(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            step: 0,
            ckpt_dir: None,
            resumed_from: None,
        })
    }

    /// Checkpoints go to (and [`Trainer::resume`] reads from) `dir`, every `ckpt_every` steps.
    pub fn with_checkpoints(mut self, dir: impl Into<PathBuf>) -> Self {
        self.ckpt_dir = Some(dir.into());
        self
    }

    /// Loads the newest good checkpoint of the checkpoint directory, if there is one; returns its
    /// step. A corrupt checkpoint (it fails its digest, or does not parse) is discarded, with a line
    /// on stderr (the stage's log), and the one before it tried, down to starting from zero. One of
    /// another configuration is an error: it is intact, only not this run's.
    pub fn resume(&mut self) -> Result<Option<usize>> {
        let Some(dir) = &self.ckpt_dir else {
            return Ok(None);
        };
        for (_, path) in checkpoint::list(dir)?.into_iter().rev() {
            match checkpoint::load(&path, &mut self.optim, &self.cfg) {
                Ok(r) => {
                    self.step = r.step;
                    self.rng = r.rng;
                    self.resumed_from = Some(r.step);
                    return Ok(Some(r.step));
                }
                Err(e @ TrainError::CorruptCheckpoint { .. }) => {
                    eprintln!("discarding checkpoint: {e}");
                    checkpoint::discard(&path)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Writes a checkpoint of the current state now (needs a checkpoint directory).
    pub fn save_checkpoint(&self) -> Result<Option<PathBuf>> {
        match &self.ckpt_dir {
            Some(dir) => {
                checkpoint::save(dir, self.step, &self.optim, &self.rng, &self.cfg).map(Some)
            }
            None => Ok(None),
        }
    }

    /// Optimizer steps completed.
    pub fn step(&self) -> usize {
        self.step
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    pub fn optimizer(&self) -> &AdamW {
        &self.optim
    }

    /// Runs the `accum` micro-batches of step `s` and accumulates their gradients; checks the loss and
    /// the gradient norm for NaN/inf.
    fn gradients<F>(&mut self, s: usize, loss_fn: &mut F) -> Result<StepGradients>
    where
        F: FnMut(&mut StepCtx<'_>) -> std::result::Result<Micro, BoxError>,
    {
        let accum = self.cfg.accum;
        let scale = 1.0 / accum as f32;
        let (mut loss_sum, mut samples, mut reward_sum, mut rewards) = (0.0, 0usize, 0.0, 0usize);
        for micro in 0..accum {
            let mut ctx = StepCtx {
                step: s,
                micro,
                rng: &mut self.rng,
            };
            let m = loss_fn(&mut ctx).map_err(|source| TrainError::Closure { step: s, source })?;
            let value = m.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !value.is_finite() {
                return Err(TrainError::NonFiniteLoss {
                    step: s,
                    micro,
                    value,
                });
            }
            let grads = m.loss.backward()?;
            self.optim.accumulate(&grads, scale)?;
            loss_sum += value;
            samples += m.samples;
            if let Some(r) = m.reward {
                reward_sum += r;
                rewards += 1;
            }
        }
        let norm = self.optim.grad_norm();
        if !norm.is_finite() {
            return Err(TrainError::NonFiniteGrad { step: s, norm });
        }
        Ok(StepGradients {
            loss_sum,
            samples,
            reward_sum,
            rewards,
            norm,
        })
    }

    /// Trains to `cfg.steps`.
    pub fn fit<F>(&mut self, loss_fn: F, hooks: &mut Hooks<'_>) -> Result<FitSummary>
    where
        F: FnMut(&mut StepCtx<'_>) -> std::result::Result<Micro, BoxError>,
    {
        self.fit_until(self.cfg.steps, loss_fn, hooks)
    }

    /// Trains until `until` steps are completed (at most `cfg.steps`); the schedule still spans
    /// `cfg.steps`. Lets a stage stop early and resume later, and lets tests simulate a kill.
    pub fn fit_until<F>(
        &mut self,
        until: usize,
        mut loss_fn: F,
        hooks: &mut Hooks<'_>,
    ) -> Result<FitSummary>
    where
        F: FnMut(&mut StepCtx<'_>) -> std::result::Result<Micro, BoxError>,
    {
        let total = self.cfg.steps;
        let until = until.min(total);
        let accum = self.cfg.accum;
        let mut summary = FitSummary {
            start_step: self.step,
            end_step: self.step,
            last_loss: None,
            last_val_loss: None,
            last_reward: None,
            mean_samples_per_s: 0.0,
            missing_grads: Vec::new(),
            resumed_from: self.resumed_from,
        };
        let mut rate_sum = 0.0;
        while self.step < until {
            let s = self.step;
            let t0 = Instant::now();
            let lr = lr_at(
                s,
                total,
                self.cfg.warmup,
                self.cfg.lr,
                self.cfg.min_lr_ratio,
            );
            let g = match self.gradients(s, &mut loss_fn) {
                Ok(g) => g,
                Err(e) => {
                    // leave no half-accumulated gradient behind for a caller that carries on
                    self.optim.zero_grad();
                    return Err(e);
                }
            };
            let (loss_sum, samples, reward_sum, rewards, norm) =
                (g.loss_sum, g.samples, g.reward_sum, g.rewards, g.norm);
            if s == summary.start_step {
                summary.missing_grads = self.optim.missing_grads();
            }
            self.optim.step(lr, norm)?;
            self.step = s + 1;
            let secs = t0.elapsed().as_secs_f64();
            let rate = if secs > 0.0 {
                samples as f64 / secs
            } else {
                0.0
            };
            rate_sum += rate;

            if self.cfg.ckpt_every > 0 && self.step.is_multiple_of(self.cfg.ckpt_every) {
                if let Some(path) = self.save_checkpoint()? {
                    if let Some(f) = hooks.checkpoint.as_mut() {
                        f(self.step, &path);
                    }
                }
            }
            let due = (self.cfg.val_every > 0 && self.step.is_multiple_of(self.cfg.val_every))
                || self.step == total;
            let val_loss = match hooks.validate.as_mut() {
                Some(f) if due => Some(
                    f(self.step).map_err(|source| TrainError::Validation { step: s, source })?,
                ),
                _ => None,
            };
            let rec = CurveRecord {
                step: self.step,
                loss: loss_sum / accum as f64,
                lr,
                grad_norm: norm,
                samples_per_s: rate,
                reward: (rewards > 0).then(|| reward_sum / rewards as f64),
                val_loss,
            };
            summary.last_loss = Some(rec.loss);
            summary.last_val_loss = rec.val_loss.or(summary.last_val_loss);
            summary.last_reward = rec.reward.or(summary.last_reward);
            if let Some(f) = hooks.record.as_mut() {
                f(&rec);
            }
            if let Some(f) = hooks.progress.as_mut() {
                f(self.step, total);
            }
        }
        summary.end_step = self.step;
        let ran = summary.end_step - summary.start_step;
        if ran > 0 {
            summary.mean_samples_per_s = rate_sum / ran as f64;
        }
        Ok(summary)
    }
}

/// One call for a stage: build the trainer, resume from `ckpt_dir` if it holds a checkpoint, train to the
/// end.
pub fn fit<F>(
    params: Vec<ParamSpec>,
    cfg: &TrainConfig,
    seed: u64,
    ckpt_dir: Option<&Path>,
    loss_fn: F,
    hooks: &mut Hooks<'_>,
) -> Result<FitSummary>
where
    F: FnMut(&mut StepCtx<'_>) -> std::result::Result<Micro, BoxError>,
{
    let mut t = Trainer::new(params, cfg, seed)?;
    if let Some(dir) = ckpt_dir {
        t = t.with_checkpoints(dir);
        t.resume()?;
    }
    t.fit(loss_fn, hooks)
}
