//! `domain-adapt`: the PEFT method on `IC_train` with cross-entropy, on top of
//! the frozen pretrain-align base (quantized to 4 bits for QLoRA).

use serde::Deserialize;
use serde_json::Value;

use crate::model::{PeftConfig, PeftMethod, Phase, VisionPolicy};
use crate::plan::StageKind;
use crate::spec::params::TrainSpec;

use super::training::{self, Lineage};
use super::{Outputs, StageCtx, StageError, StageReport};

#[derive(Debug, Deserialize)]
struct Params {
    peft: PeftMethod,
    peft_params: Value,
    vision: VisionPolicy,
    train: TrainSpec,
}

/// The spec's PEFT section as the model's configuration.
fn peft_config(p: &Params) -> PeftConfig {
    let get_f = |k: &str| p.peft_params.get(k).and_then(Value::as_f64);
    let get_u = |k: &str| {
        p.peft_params
            .get(k)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
    };
    let mut c = PeftConfig {
        method: p.peft,
        vision: p.vision,
        ..PeftConfig::default()
    };
    if let Some(r) = get_u("r") {
        c.rank = r;
    }
    if let Some(a) = get_f("alpha") {
        c.alpha = a;
    }
    if let Some(d) = get_f("dropout") {
        c.dropout = d;
    }
    if let Some(b) = get_u("bottleneck") {
        c.adapter_dim = b;
    }
    if let Some(Value::Array(m)) = p.peft_params.get("modules_to_save") {
        c.modules_to_save = m
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
    }
    if let Some(Value::Array(t)) = p.peft_params.get("targets") {
        c.targets = t
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
    }
    c
}

pub fn run(ctx: &StageCtx) -> Result<StageReport, StageError> {
    let p: Params = ctx.params()?;
    let align = ctx.input(StageKind::PretrainAlign)?;
    let base = Lineage::read(align)?;
    let lineage = Lineage {
        peft: peft_config(&p),
        weights: vec![base.weights[0].clone()],
        ..base
    };
    let model = lineage.build(ctx, Phase::Adapt)?;
    let pre = ctx.entry(&lineage.preprocess);
    let train = training::load_split(&pre, "train")?;
    let valid = training::load_split(&pre, "valid").ok();
    let mut out = Outputs::default();
    let report = training::train_ce(ctx, &model, &train, valid.as_ref(), &p.train, &mut out)?;
    let mut lineage = lineage;
    lineage.weights.push(ctx.desc.key.clone());
    training::publish_model(ctx, &model, &lineage)?;
    out.write(ctx.out)?;
    Ok(report)
}
