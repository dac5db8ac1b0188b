//! How much of the synthetic images' category a pretrained vision tower carries: 1-nearest-
//! neighbour category accuracy of valid images against the clean training images, on the
//! tower's mean-pooled features of each block (cosine), beside the same on raw pixels.
//!
//! `probe_tower RUNS PRETRAIN_VISION_KEY PREPROCESS_KEY SYNTH_SEED`
//! (the preprocess entry of the IC splits at the tower's resolution; the synthetic seed as the
//! spec's `data.synth.seed`).

use std::path::PathBuf;

use candle_core::{Tensor, D};
use ecic::data::preprocess::Split;
use ecic::data::synth::{truths, SynthConfig};
use ecic::model::clip::{Clip, ClipConfig};
use ecic::model::{Backbone, Fusion, ModelConfig};

fn unit(x: &Tensor) -> Tensor {
    let x = x.broadcast_sub(&x.mean_keepdim(0).unwrap()).unwrap();
    let n = x
        .sqr()
        .unwrap()
        .sum_keepdim(D::Minus1)
        .unwrap()
        .sqrt()
        .unwrap();
    x.broadcast_div(&n.maximum(1e-6).unwrap()).unwrap()
}

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let runs = PathBuf::from(&a[1]);
    let obj = runs.join("objects-v1");
    let seed: u64 = a[4].parse()?;
    let pre = obj.join(&a[3]);
    let train = Split::load(&pre, "train")?;
    let valid = Split::load(&pre, "valid")?;
    let cfg = SynthConfig {
        seed,
        ..SynthConfig::default()
    };
    let t_train = truths(&cfg, "IC_train", 5000);
    let t_valid = truths(&cfg, "IC_valid", 5000);
    let rows: Vec<usize> = (0..train.len()).filter(|&r| train.copies[r] == 0).collect();
    let idx = Tensor::new(
        rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
        &candle_core::Device::Cpu,
    )?;
    let timg = train.images.index_select(&idx, 0)?;
    let mut vision = ModelConfig::tiny(Backbone::Llava, Fusion::Early, 10, 0, 1, 2).vision;
    if let Some(stem) = a.get(5) {
        vision.stem = serde_json::from_value(serde_json::json!(stem))?;
    }
    let clip = Clip::new(&vision, &ClipConfig::default(), 10, 0)?;
    clip.load_vision(&obj.join(&a[2]).join("weights.safetensors"))?;
    let feats = |imgs: &Tensor| -> anyhow::Result<Vec<Tensor>> {
        let mut per_block: Vec<Vec<Tensor>> = Vec::new();
        for s in (0..imgs.dim(0)?).step_by(256) {
            let n = 256.min(imgs.dim(0)? - s);
            let f = clip.block_features(&imgs.narrow(0, s, n)?)?;
            if per_block.is_empty() {
                per_block = vec![Vec::new(); f.len()];
            }
            for (b, t) in f.into_iter().enumerate() {
                per_block[b].push(t);
            }
        }
        let mut out: Vec<Tensor> = per_block
            .iter()
            .map(|v| Tensor::cat(v, 0).unwrap())
            .collect();
        out.insert(0, imgs.flatten_from(1)?);
        Ok(out)
    };
    let ft = feats(&timg)?;
    let fv = feats(&valid.images)?;
    for (b, (a_, v_)) in ft.iter().zip(&fv).enumerate() {
        let (a_, v_) = (unit(a_), unit(v_));
        let sim: Vec<Vec<f32>> = v_.matmul(&a_.t()?)?.to_vec2()?;
        let mut right = 0;
        for (i, row) in sim.iter().enumerate() {
            let j = row
                .iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (j, &s)| if s > b.1 { (j, s) } else { b })
                .0;
            let tv = &t_valid[&valid.ids[i]];
            let tt = &t_train[&train.ids[rows[j]]];
            right += usize::from(tv.category == tt.category);
        }
        let what = if b == 0 {
            "pixels".to_string()
        } else {
            format!("block {b}")
        };
        println!(
            "{what}: 1-NN category accuracy {:.1}% ({} valid images)",
            100.0 * right as f64 / sim.len() as f64,
            sim.len()
        );
    }
    Ok(())
}
