//! Training: the loop shared by the `pretrain-align`, `domain-adapt` and `cider-optimize` stages.
//!
//! Place in the pipeline: `stages` build a model (`model`), hand its trainable variables to a
//! [`Trainer`] as [`ParamSpec`]s (name, component group, weight-decay flag) and give it a closure that
//! turns a step index and a seeded rng into the loss of one micro-batch. This module knows nothing of
//! images or captions; it owns the optimizer ([`optim`]: AdamW over parameter groups), the learning-rate
//! [`schedule`], gradient accumulation and clipping, NaN detection, curves, validation and progress
//! callbacks, and resumable [`checkpoint`]s. [`scst`] turns a captioning policy and a reward function
//! (CIDEr-D in the real stage) into such a micro-batch closure.
//!
//! Everything here is deterministic on CPU for a given seed: resuming from a checkpoint gives bitwise the
//! same weights as an uninterrupted run.

pub mod checkpoint;
pub mod config;
pub mod loss;
pub mod optim;
pub mod schedule;
pub mod scst;
pub mod trainer;

use std::path::PathBuf;

pub use config::Baseline;
pub use config::{Group, GroupLr, ScstConfig, TrainConfig};
pub use loss::smoothed_cross_entropy;
pub use optim::{AdamW, ParamSpec};
pub use schedule::lr_at;
pub use scst::{draw_images, scst_closure, scst_loss, Policy, SampleOpts, ScstStats};
pub use trainer::{fit, CurveRecord, FitSummary, Hooks, Micro, StepCtx, Trainer};

/// Error type for closures the caller hands to the loop (loss, validation, policy): any error converts.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Everything that can stop training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("invalid training configuration: {}", problems.join("; "))]
    InvalidConfig { problems: Vec<String> },
    #[error("duplicate trainable variable `{name}` (name or variable listed twice)")]
    DuplicateParam { name: String },
    #[error("non-finite loss {value} at step {step} (micro-batch {micro})")]
    NonFiniteLoss {
        step: usize,
        micro: usize,
        value: f64,
    },
    #[error("non-finite gradient (global norm {norm}) at step {step}")]
    NonFiniteGrad { step: usize, norm: f64 },
    #[error("loss closure failed at step {step}: {source}")]
    Closure { step: usize, source: BoxError },
    #[error("validation failed at step {step}: {source}")]
    Validation { step: usize, source: BoxError },
    #[error("scst policy failed: {source}")]
    Policy { source: BoxError },
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("checkpoint i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad checkpoint {path}: {reason}")]
    BadCheckpoint { path: PathBuf, reason: String },
    /// Damaged on disk (digest mismatch, unreadable): resuming discards it.
    #[error("corrupt checkpoint {path}: {reason}")]
    CorruptCheckpoint { path: PathBuf, reason: String },
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;
