//! `preprocess`: decode, resize, normalise and augment once into tensor shards,
//! and train (or load) the caption tokenizer. Shared by every cell whose
//! backbone has the same input resolution. A second preprocess node per sweep,
//! with `foundation` set, decodes the generic-domain pretraining corpus at the
//! vision tower's resolution for the foundation stages.

use serde::Deserialize;

use crate::data::muge::BadRecordPolicy;
use crate::data::preprocess::AugmentParams;
use crate::data::preprocess::{self, PreprocessParams, SplitPolicies, TokenizerParams};

use super::{Outputs, StageCtx, StageError, StageReport};

/// The parameters as planned (see `plan::kind::params`).
#[derive(Debug, Deserialize)]
struct Params {
    image_size: u32,
    mean: [f32; 3],
    std: [f32; 3],
    // Absent for the foundation corpus (no augmented copies): the defaults, unused.
    #[serde(default)]
    augment_copies: u32,
    #[serde(default)]
    flip: bool,
    #[serde(default = "full_crop")]
    crop_scale: [f32; 2],
    #[serde(default)]
    jitter: f32,
    tokenizer: Option<std::path::PathBuf>,
    min_freq: u32,
    policy: Policy,
    /// The foundation corpus alone (absent: the IC and ALIGN splits).
    #[serde(default)]
    foundation: bool,
}

fn full_crop() -> [f32; 2] {
    [1.0, 1.0]
}

#[derive(Debug, Deserialize)]
struct Policy {
    train: BadRecordPolicy,
    valid: BadRecordPolicy,
    test: BadRecordPolicy,
}

pub fn run(ctx: &StageCtx) -> Result<StageReport, StageError> {
    let p: Params = ctx.params()?;
    let params = PreprocessParams {
        image_size: p.image_size,
        mean: p.mean,
        std: p.std,
        augment: AugmentParams {
            copies: p.augment_copies,
            crop_scale: p.crop_scale,
            flip: p.flip,
            jitter: p.jitter,
            ..AugmentParams::default()
        },
        policy: SplitPolicies {
            train: p.policy.train,
            valid: p.policy.valid,
            test: p.policy.test,
            align: p.policy.train,
            ..SplitPolicies::default()
        },
        tokenizer: TokenizerParams {
            path: p.tokenizer,
            min_freq: p.min_freq,
        },
        foundation: p.foundation,
        ..PreprocessParams::default()
    };
    ctx.progress(0, 1);
    let summary = preprocess::run(
        &ctx.desc.data_dir,
        ctx.out,
        &params,
        ctx.desc.fingerprint.seed,
    )
    .map_err(StageError::ctx(format!(
        "preprocessing {}",
        ctx.desc.data_dir.display()
    )))?;
    ctx.progress(1, 1);
    let mut out = Outputs::default();
    out.metric("", "vocab_size", summary.vocab_size as f64);
    for s in &summary.splits {
        out.metric(&s.name, "images", s.images as f64);
        out.metric(&s.name, "rows", s.rows as f64);
        out.metric(&s.name, "skipped_records", s.skipped as f64);
        for bad in &s.bad {
            eprintln!("skipped bad record in {}: {bad}", s.name);
        }
    }
    out.write(ctx.out)?;
    Ok(StageReport::default())
}
