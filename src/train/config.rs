//! Training hyperparameters as the spec gives them (`[train]`-like tables), with defaults that train the
//! tiny presets on CPU. Validation reports every problem at once.

use serde::{Deserialize, Serialize};

use super::{Result, TrainError};

/// The model component a trainable variable belongs to; each group has its own learning-rate multiplier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Group {
    Vision,
    Connector,
    Lm,
    Adapter,
}

impl Group {
    pub const ALL: [Group; 4] = [Group::Vision, Group::Connector, Group::Lm, Group::Adapter];

    pub fn as_str(self) -> &'static str {
        match self {
            Group::Vision => "vision",
            Group::Connector => "connector",
            Group::Lm => "lm",
            Group::Adapter => "adapter",
        }
    }
}

/// Learning-rate multipliers per component (the base rate times this).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupLr {
    pub vision: f64,
    pub connector: f64,
    pub lm: f64,
    pub adapter: f64,
}

impl Default for GroupLr {
    fn default() -> Self {
        GroupLr {
            vision: 1.0,
            connector: 1.0,
            lm: 1.0,
            adapter: 1.0,
        }
    }
}

impl GroupLr {
    pub fn get(&self, g: Group) -> f64 {
        match g {
            Group::Vision => self.vision,
            Group::Connector => self.connector,
            Group::Lm => self.lm,
            Group::Adapter => self.adapter,
        }
    }

    fn check(&self, prefix: &str, problems: &mut Vec<String>) {
        for g in Group::ALL {
            let m = self.get(g);
            if !(m.is_finite() && m >= 0.0) {
                problems.push(format!(
                    "{prefix}lr_mult.{}: must be finite and >= 0, got {m}",
                    g.as_str()
                ));
            }
        }
    }
}

/// Hyperparameters of one cross-entropy training stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps (each of `accum` micro-batches).
    pub steps: usize,
    /// Samples per micro-batch (the loss closure reads it; the loop does not batch by itself).
    pub batch_size: usize,
    /// Peak learning rate, reached at the end of warmup.
    pub lr: f64,
    /// Linear warmup steps.
    pub warmup: usize,
    /// Cosine decay ends at `lr * min_lr_ratio`.
    pub min_lr_ratio: f64,
    /// Decoupled (AdamW) weight decay, applied only to variables whose decay flag is set.
    pub weight_decay: f64,
    /// Also decay norms, biases and embeddings (normally only matrices decay).
    pub decay_all: bool,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip; 0 disables clipping.
    pub grad_clip: f64,
    /// Micro-batches per optimizer step (gradient accumulation).
    pub accum: usize,
    pub lr_mult: GroupLr,
    /// Label smoothing for the cross-entropy (read by the loss closure, see [`super::loss`]).
    pub label_smoothing: f64,
    /// Checkpoint every this many steps (0: never).
    pub ckpt_every: usize,
    /// Validate every this many steps (0: only at the end when a validation callback is given).
    pub val_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 200,
            batch_size: 16,
            lr: 1e-3,
            warmup: 20,
            min_lr_ratio: 0.1,
            weight_decay: 0.01,
            decay_all: false,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            grad_clip: 1.0,
            accum: 1,
            lr_mult: GroupLr::default(),
            label_smoothing: 0.0,
            ckpt_every: 0,
            val_every: 0,
        }
    }
}

impl TrainConfig {
    /// Checks every field and reports all problems together.
    pub fn validate(&self) -> Result<()> {
        let mut p = Vec::new();
        self.collect_problems("", &mut p);
        if p.is_empty() {
            Ok(())
        } else {
            Err(TrainError::InvalidConfig { problems: p })
        }
    }

    fn collect_problems(&self, prefix: &str, p: &mut Vec<String>) {
        if self.steps == 0 {
            p.push(format!("{prefix}steps: must be >= 1"));
        }
        if self.batch_size == 0 {
            p.push(format!("{prefix}batch_size: must be >= 1"));
        }
        if self.accum == 0 {
            p.push(format!("{prefix}accum: must be >= 1"));
        }
        let pos = |v: f64| v.is_finite() && v > 0.0;
        if !pos(self.lr) {
            p.push(format!(
                "{prefix}lr: must be finite and > 0, got {}",
                self.lr
            ));
        }
        if !(self.min_lr_ratio.is_finite() && (0.0..=1.0).contains(&self.min_lr_ratio)) {
            p.push(format!(
                "{prefix}min_lr_ratio: must be in [0, 1], got {}",
                self.min_lr_ratio
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            p.push(format!(
                "{prefix}weight_decay: must be finite and >= 0, got {}",
                self.weight_decay
            ));
        }
        for (k, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(v.is_finite() && (0.0..1.0).contains(&v)) {
                p.push(format!("{prefix}{k}: must be in [0, 1), got {v}"));
            }
        }
        if !pos(self.eps) {
            p.push(format!(
                "{prefix}eps: must be finite and > 0, got {}",
                self.eps
            ));
        }
        if !(self.grad_clip.is_finite() && self.grad_clip >= 0.0) {
            p.push(format!(
                "{prefix}grad_clip: must be finite and >= 0 (0 disables), got {}",
                self.grad_clip
            ));
        }
        if !(self.label_smoothing.is_finite() && (0.0..1.0).contains(&self.label_smoothing)) {
            p.push(format!(
                "{prefix}label_smoothing: must be in [0, 1), got {}",
                self.label_smoothing
            ));
        }
        self.lr_mult.check(prefix, p);
    }
}

/// Which baseline self-critical training subtracts from each sample's reward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Baseline {
    /// The reward of the policy's own greedy caption for the image (Rennie et al. 2017).
    Greedy,
    /// The mean reward of the *other* k-1 samples of the same image (leave-one-out, so unbiased).
    Mean,
}

/// Hyperparameters of the `cider-optimize` stage (self-critical sequence training).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScstConfig {
    /// Samples drawn per image.
    pub samples: usize,
    pub baseline: Baseline,
    /// Sampling temperature.
    pub temperature: f64,
    /// Longest sampled caption, in tokens.
    pub max_len: usize,
    /// Weight of the pairwise-overlap penalty among the k samples of an image (0: off); see [`super::scst`].
    pub diversity_weight: f64,
    pub steps: usize,
    /// Images per micro-batch.
    pub batch_size: usize,
    pub lr: f64,
    pub warmup: usize,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub accum: usize,
    pub lr_mult: GroupLr,
    pub ckpt_every: usize,
    pub val_every: usize,
}

impl Default for ScstConfig {
    fn default() -> Self {
        ScstConfig {
            samples: 5,
            baseline: Baseline::Greedy,
            temperature: 1.0,
            max_len: 32,
            diversity_weight: 0.0,
            steps: 100,
            batch_size: 8,
            lr: 5e-5,
            warmup: 0,
            min_lr_ratio: 1.0,
            weight_decay: 0.0,
            grad_clip: 1.0,
            accum: 1,
            lr_mult: GroupLr::default(),
            ckpt_every: 0,
            val_every: 0,
        }
    }
}

impl ScstConfig {
    /// The loop settings this stage runs under.
    pub fn train_config(&self) -> TrainConfig {
        TrainConfig {
            steps: self.steps,
            batch_size: self.batch_size,
            lr: self.lr,
            warmup: self.warmup,
            min_lr_ratio: self.min_lr_ratio,
            weight_decay: self.weight_decay,
            grad_clip: self.grad_clip,
            accum: self.accum,
            lr_mult: self.lr_mult,
            ckpt_every: self.ckpt_every,
            val_every: self.val_every,
            ..TrainConfig::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        let mut p = Vec::new();
        self.train_config().collect_problems("", &mut p);
        if self.samples == 0 {
            p.push("samples: must be >= 1".to_string());
        }
        if self.samples < 2 && self.baseline == Baseline::Mean {
            p.push("samples: the mean baseline needs >= 2 samples per image".to_string());
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            p.push(format!(
                "temperature: must be finite and > 0, got {}",
                self.temperature
            ));
        }
        if self.max_len == 0 {
            p.push("max_len: must be >= 1".to_string());
        }
        if !(self.diversity_weight.is_finite() && self.diversity_weight >= 0.0) {
            p.push(format!(
                "diversity_weight: must be finite and >= 0, got {}",
                self.diversity_weight
            ));
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(TrainError::InvalidConfig { problems: p })
        }
    }
}
