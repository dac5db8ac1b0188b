//! AdamW over parameter groups, written for this loop because candle-nn's AdamW decays every variable and
//! has neither clipping nor per-group rates.
//!
//! Gradients of the micro-batches of one step are summed into a host `f32` buffer per variable (that is
//! gradient accumulation); the global norm is taken from those buffers; the update then runs once over
//! every variable, in place in the variable's own storage (a candle in-place op), folding the clip factor
//! into the gradient as it reads it. No tensors are allocated per step on CPU `f32` variables. Variables on
//! other devices or dtypes take a slower path (read, update, `Var::set`) with the same arithmetic.
//!
//! The arithmetic follows `torch.optim.AdamW` (single-tensor path) step for step, so that numbers can be
//! checked against it: decoupled decay `w *= 1 - lr*wd`, `m = b1 m + (1-b1) g`, `v = b2 v + (1-b2) g^2`,
//! `w -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)`. A variable that received no gradient in a step
//! is skipped entirely (no decay, no moment update), as torch does for `grad is None`.

use std::cell::RefCell;
use std::collections::BTreeSet;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Storage, Tensor, Var};
use rayon::prelude::*;

use super::config::{Group, TrainConfig};
use super::{Result, TrainError};

/// One trainable variable as the model hands it to the trainer.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    /// Unique, stable name (the checkpoint key), e.g. `lm.layers.0.attn.q.lora_a`.
    pub name: String,
    pub var: Var,
    pub group: Group,
    /// Whether weight decay applies. [`ParamSpec::new`] sets it for matrices that are not embeddings or
    /// norms, the usual rule; override with [`ParamSpec::with_decay`].
    pub decay: bool,
}

impl ParamSpec {
    pub fn new(name: impl Into<String>, var: Var, group: Group) -> Self {
        let name = name.into();
        let decay = default_decay(&name, var.rank());
        ParamSpec {
            name,
            var,
            group,
            decay,
        }
    }

    pub fn with_decay(mut self, decay: bool) -> Self {
        self.decay = decay;
        self
    }
}

/// The usual decay rule: matrices decay; vectors (biases, norm scales, gates), embeddings and norms do not.
pub fn default_decay(name: &str, rank: usize) -> bool {
    let lower = name.to_ascii_lowercase();
    rank >= 2 && !lower.contains("emb") && !lower.contains("norm") && !lower.contains("pos")
}

/// Per-variable optimizer state; `m` and `v` are the torch `exp_avg` and `exp_avg_sq`.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub(crate) spec: ParamSpec,
    pub(crate) m: Vec<f32>,
    pub(crate) v: Vec<f32>,
    /// Updates applied to this variable so far (torch's per-parameter `step`).
    pub(crate) t: u64,
    /// Gradient summed over this step's micro-batches (already scaled by 1/accum).
    grad: Vec<f32>,
    has_grad: bool,
    /// Sum of squares of `grad`, kept up to date by `accumulate` so the norm needs no extra pass.
    sq: f64,
}

/// AdamW with per-group learning-rate multipliers, selective weight decay and global-norm clipping.
#[derive(Debug)]
pub struct AdamW {
    pub(crate) slots: Vec<Slot>,
    cfg: TrainConfig,
}

/// Hyperparameters of one variable's update in one step.
#[derive(Debug, Clone, Copy)]
struct Hyper {
    lr: f32,
    decay: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    step_size: f32,
    bc2_sqrt: f32,
    clip: f32,
}

impl Hyper {
    /// The whole update of one variable; `w` is its storage, `g` the accumulated gradient.
    #[inline]
    fn apply(&self, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let wd = 1.0 - self.lr * self.decay;
        for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g = g * self.clip;
            *w *= wd;
            *m += (g - *m) * (1.0 - self.b1);
            *v = *v * self.b2 + (1.0 - self.b2) * g * g;
            let denom = v.sqrt() / self.bc2_sqrt + self.eps;
            *w -= self.step_size * *m / denom;
        }
    }
}

/// The in-place update of one CPU `f32` variable.
struct Kernel<'a> {
    h: Hyper,
    g: &'a [f32],
    mv: RefCell<(&'a mut [f32], &'a mut [f32])>,
}

impl InplaceOp1 for Kernel<'_> {
    fn name(&self) -> &'static str {
        "ecic-adamw"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (a, b) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("adamw: variable is not contiguous".into()))?;
        let CpuStorage::F32(data) = storage else {
            return Err(candle_core::Error::Msg("adamw: variable is not f32".into()));
        };
        let mut mv = self.mv.borrow_mut();
        let (m, v) = &mut *mv;
        self.h.apply(&mut data[a..b], self.g, m, v);
        Ok(())
    }
}

impl AdamW {
    pub fn new(params: Vec<ParamSpec>, cfg: &TrainConfig) -> Result<Self> {
        cfg.validate()?;
        let mut seen = BTreeSet::new();
        // the same variable under two names would be updated twice per step
        let mut ids = std::collections::HashSet::new();
        let mut slots = Vec::with_capacity(params.len());
        for mut spec in params {
            if !seen.insert(spec.name.clone()) || !ids.insert(spec.var.id()) {
                return Err(TrainError::DuplicateParam { name: spec.name });
            }
            if cfg.decay_all {
                spec.decay = true;
            }
            let n = spec.var.elem_count();
            slots.push(Slot {
                spec,
                m: vec![0.0; n],
                v: vec![0.0; n],
                t: 0,
                grad: vec![0.0; n],
                has_grad: false,
                sq: 0.0,
            });
        }
        Ok(AdamW {
            slots,
            cfg: cfg.clone(),
        })
    }

    pub fn params(&self) -> impl Iterator<Item = &ParamSpec> {
        self.slots.iter().map(|s| &s.spec)
    }

    /// Number of trainable scalars.
    pub fn num_elements(&self) -> usize {
        self.slots.iter().map(|s| s.m.len()).sum()
    }

    /// Adds `scale * grad` of every variable found in `grads` to its buffer (one micro-batch).
    pub fn accumulate(&mut self, grads: &GradStore, scale: f32) -> Result<()> {
        self.slots
            .par_iter_mut()
            .try_for_each(|slot| -> Result<()> {
                let Some(g) = grads.get(&slot.spec.var) else {
                    return Ok(());
                };
                let first = !slot.has_grad;
                slot.has_grad = true;
                let add = |dst: &mut [f32], src: &[f32]| -> f64 {
                    let mut lanes = [0f64; 8];
                    let mut dc = dst.chunks_exact_mut(8);
                    let mut sc = src.chunks_exact(8);
                    for (d, s) in (&mut dc).zip(&mut sc) {
                        for l in 0..8 {
                            let x = if first {
                                s[l] * scale
                            } else {
                                d[l] + s[l] * scale
                            };
                            d[l] = x;
                            lanes[l] += (x as f64) * (x as f64);
                        }
                    }
                    for (d, s) in dc.into_remainder().iter_mut().zip(sc.remainder()) {
                        let x = if first { s * scale } else { *d + s * scale };
                        *d = x;
                        lanes[0] += (x as f64) * (x as f64);
                    }
                    lanes.iter().sum()
                };
                let (st, layout) = g.storage_and_layout();
                if let (Storage::Cpu(CpuStorage::F32(data)), Some((a, b))) =
                    (&*st, layout.contiguous_offsets())
                {
                    if b - a == slot.grad.len() {
                        slot.sq = add(&mut slot.grad, &data[a..b]);
                        return Ok(());
                    }
                }
                drop(st);
                let host = g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                if host.len() != slot.grad.len() {
                    return Err(candle_core::Error::Msg(format!(
                        "gradient of `{}` has {} elements, the variable {}",
                        slot.spec.name,
                        host.len(),
                        slot.grad.len()
                    ))
                    .into());
                }
                slot.sq = add(&mut slot.grad, &host);
                Ok(())
            })
    }

    /// Global L2 norm of the accumulated gradient (before clipping), in f64.
    pub fn grad_norm(&self) -> f64 {
        // summed in variable order so the result does not depend on thread scheduling
        self.slots
            .iter()
            .filter(|s| s.has_grad)
            .map(|s| s.sq)
            .sum::<f64>()
            .sqrt()
    }

    /// Drops the gradients accumulated since the last step.
    pub fn zero_grad(&mut self) {
        for s in &mut self.slots {
            s.has_grad = false;
            s.sq = 0.0;
        }
    }

    /// Names of variables that received no gradient since the last step.
    pub fn missing_grads(&self) -> Vec<String> {
        self.slots
            .iter()
            .filter(|s| !s.has_grad)
            .map(|s| s.spec.name.clone())
            .collect()
    }

    /// Applies one update at base learning rate `lr` with the accumulated gradients, clipped to the
    /// configured global norm given the pre-clip `norm`, then clears the buffers.
    pub fn step(&mut self, lr: f64, norm: f64) -> Result<()> {
        let cfg = &self.cfg;
        let clip = if cfg.grad_clip > 0.0 {
            (cfg.grad_clip / (norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        self.slots
            .par_iter_mut()
            .try_for_each(|slot| -> Result<()> {
                if !slot.has_grad {
                    return Ok(());
                }
                slot.has_grad = false;
                slot.t += 1;
                let lr = lr * cfg.lr_mult.get(slot.spec.group);
                let t = slot.t as i32;
                let bc1 = 1.0 - cfg.beta1.powi(t);
                let bc2 = 1.0 - cfg.beta2.powi(t);
                let h = Hyper {
                    lr: lr as f32,
                    decay: if slot.spec.decay {
                        cfg.weight_decay as f32
                    } else {
                        0.0
                    },
                    b1: cfg.beta1 as f32,
                    b2: cfg.beta2 as f32,
                    eps: cfg.eps as f32,
                    step_size: (lr / bc1) as f32,
                    bc2_sqrt: bc2.sqrt() as f32,
                    clip: clip as f32,
                };
                let var = &slot.spec.var;
                let fast =
                    var.dtype() == DType::F32 && var.device().is_cpu() && var.is_contiguous();
                if fast {
                    let k = Kernel {
                        h,
                        g: &slot.grad,
                        mv: RefCell::new((&mut slot.m, &mut slot.v)),
                    };
                    var.inplace_op1(&k)?;
                } else {
                    let mut w = var.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                    h.apply(&mut w, &slot.grad, &mut slot.m, &mut slot.v);
                    let t =
                        Tensor::from_vec(w, var.shape(), var.device())?.to_dtype(var.dtype())?;
                    var.set(&t)?;
                }
                Ok(())
            })
    }
}
