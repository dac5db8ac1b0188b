//! Speed of one contrastive training step (forward + backward) of the tiny vision tower per
//! stem: the pairs per second that decide whether a stem fits the foundation stage's budget.
//! Usage: cargo run --release --example bench_stem -- [BATCH] [STEPS] [stems, e.g. patch,conv]
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ecic::model::clip::{Clip, ClipConfig};
use ecic::model::ops::Fwd;
use ecic::model::{Backbone, Fusion, ModelConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let bs: usize = args.get(1).map_or(Ok(128), |s| s.parse())?;
    let steps: usize = args.get(2).map_or(Ok(5), |s| s.parse())?;
    let stems = args.get(3).map_or("patch,conv", |s| s.as_str());
    let dev = Device::Cpu;
    for name in stems.split(',') {
        let mut cfg = ModelConfig::tiny(Backbone::Llava, Fusion::Late, 400, 0, 1, 2).vision;
        let (stem, size) = name.split_once('@').unwrap_or((name, "64"));
        cfg.stem = serde_json::from_value(serde_json::json!(stem))?;
        cfg.image_size = size.parse()?;
        cfg.patch_size = cfg.image_size / 4;
        let clip = Clip::new(&cfg, &ClipConfig::default(), 400, 0)?;
        let s = cfg.image_size;
        let images = Tensor::randn(0f32, 1.0, (bs, 3, s, s), &dev)?;
        let ids = Tensor::arange(0u32, (bs * 12) as u32, &dev)?
            .reshape((bs, 12))?
            .affine(1.0, 0.0)?;
        let ids = (ids.to_dtype(DType::F32)? / 400.0)?
            .floor()?
            .to_dtype(DType::U32)?;
        let mask = Tensor::ones((bs, 12), DType::F32, &dev)?;
        let fwd = Fwd {
            train: true,
            rng: None,
        };
        let t = Instant::now();
        let e = clip.encode_images(&images, fwd)?;
        let fwd_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _ = e.sum_all()?.backward()?;
        println!(
            "{name:>6}: image forward {:.1} ms, image backward {:.1} ms",
            fwd_s * 1e3,
            t.elapsed().as_secs_f64() * 1e3
        );
        let mut times = Vec::new();
        for _ in 0..steps {
            let t = Instant::now();
            let loss = clip.loss(&images, &ids, &mask, fwd)?;
            let _g = loss.backward()?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let med = times[times.len() / 2];
        println!(
            "{name:>6}: {:.1} ms/step, {:.0} pairs/s (median of {steps}, batch {bs})",
            med * 1e3,
            bs as f64 / med
        );
    }
    Ok(())
}
