//! Experiment: how fast does a from-scratch ViT learn the product category of the synthetic
//! images, with the plain patchify stem vs a convolutional stem (Xiao et al., "Early
//! Convolutions Help Transformers See Better", 2021)? Trains each encoder + a linear head on
//! category labels of `align_train`, reports held-out accuracy on `valid` and `train`.
//! Usage: cargo run --release --example probe_stem -- PREPROCESS_DIR SYNTH_SEED STEPS [stems]
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{ops, Optimizer, VarBuilder, VarMap};
use ecic::data::preprocess::Split;
use ecic::data::synth::{attribute_names, labels, SynthConfig};
use std::collections::HashMap;

fn ln(x: &Tensor) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + 1e-5)?.sqrt()?)
}

struct Block {
    qkv: candle_nn::Linear,
    proj: candle_nn::Linear,
    fc1: candle_nn::Linear,
    fc2: candle_nn::Linear,
    heads: usize,
}

impl Block {
    fn new(vb: VarBuilder, w: usize, heads: usize) -> candle_core::Result<Self> {
        Ok(Self {
            qkv: candle_nn::linear(w, 3 * w, vb.pp("qkv"))?,
            proj: candle_nn::linear(w, w, vb.pp("proj"))?,
            fc1: candle_nn::linear(w, 4 * w, vb.pp("fc1"))?,
            fc2: candle_nn::linear(4 * w, w, vb.pp("fc2"))?,
            heads,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, w) = x.dims3()?;
        let h = self.heads;
        let d = w / h;
        let qkv = self.qkv.forward(&ln(x)?)?.reshape((b, n, 3, h, d))?;
        let q = qkv
            .narrow(2, 0, 1)?
            .squeeze(2)?
            .transpose(1, 2)?
            .contiguous()?;
        let k = qkv
            .narrow(2, 1, 1)?
            .squeeze(2)?
            .transpose(1, 2)?
            .contiguous()?;
        let v = qkv
            .narrow(2, 2, 1)?
            .squeeze(2)?
            .transpose(1, 2)?
            .contiguous()?;
        let att = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
        let att = ops::softmax(&att, D::Minus1)?;
        let a = att.matmul(&v)?.transpose(1, 2)?.reshape((b, n, w))?;
        let x = (x + self.proj.forward(&a)?)?;
        let m = self.fc2.forward(&self.fc1.forward(&ln(&x)?)?.gelu_erf()?)?;
        x + m
    }
}

enum Stem {
    Patch(candle_nn::Linear, usize),
    Conv(Vec<candle_nn::Conv2d>, candle_nn::Linear),
}

impl Stem {
    fn forward(&self, img: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Stem::Patch(l, p) => {
                let (b, c, h, w) = img.dims4()?;
                let x = img
                    .reshape((b, c, h / p, *p, w / p, *p))?
                    .permute((0, 2, 4, 1, 3, 5))?
                    .reshape((b, (h / p) * (w / p), c * p * p))?;
                l.forward(&x)
            }
            Stem::Conv(convs, l) => {
                let mut x = img.clone();
                for c in convs {
                    x = c.forward(&x)?.relu()?;
                }
                let (b, ch, h, w) = x.dims4()?;
                let x = x.reshape((b, ch, h * w))?.transpose(1, 2)?;
                l.forward(&x)
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let dir = std::path::Path::new(&a[1]);
    let seed: u64 = a[2].parse()?;
    let steps: usize = a[3].parse()?;
    let stems: Vec<String> = a
        .get(4)
        .map(|s| s.split(',').map(str::to_owned).collect())
        .unwrap_or_else(|| vec!["patch16".into(), "conv4".into()]);
    let cfg = SynthConfig {
        seed,
        ..SynthConfig::default()
    };
    let (cats, _, _) = attribute_names();
    let cat_index: HashMap<&str, usize> = cats.iter().enumerate().map(|(i, c)| (*c, i)).collect();
    let label_map = |prefix: &str, n: usize| -> HashMap<String, usize> {
        (0..n)
            .map(|i| {
                let (id, l) = labels(&cfg, prefix, i);
                (id, cat_index[l.category])
            })
            .collect()
    };
    let dev = Device::Cpu;
    let load = |split: &str, prefix: &str, n: usize| -> anyhow::Result<(Tensor, Tensor)> {
        let s = Split::load(dir, split)?;
        let m = label_map(prefix, n);
        let y: Vec<u32> = s.ids.iter().map(|id| m[id] as u32).collect();
        for i in 0..3 {
            println!(
                "{split} {}: {} | {}",
                s.ids[i], cats[y[i] as usize], s.captions[i][0]
            );
        }
        let yl = y.len();
        Ok((s.images, Tensor::from_vec(y, yl, &dev)?))
    };
    let (xtr, ytr) = load("align_train", "ALIGN_train", cfg.align)?;
    let (xva, yva) = load("valid", "IC_valid", cfg.valid)?;
    let (xic, yic) = load("train", "IC_train", cfg.train)?;
    println!(
        "align_train rows {}, valid {}, IC train rows {}",
        xtr.dim(0)?,
        xva.dim(0)?,
        xic.dim(0)?
    );
    let w = 96;
    for stem_name in &stems {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let stem = match stem_name.as_str() {
            "patch16" => Stem::Patch(candle_nn::linear(3 * 256, w, vb.pp("patch"))?, 16),
            "patch8" => Stem::Patch(candle_nn::linear(3 * 64, w, vb.pp("patch"))?, 8),
            "conv4" | "conv3" => {
                let chans: &[usize] = if stem_name == "conv4" {
                    &[3, 24, 48, 96, 96]
                } else {
                    &[3, 32, 64, 96]
                };
                let cc = candle_nn::Conv2dConfig {
                    padding: 1,
                    stride: 2,
                    ..Default::default()
                };
                let convs = chans
                    .windows(2)
                    .enumerate()
                    .map(|(i, p)| candle_nn::conv2d(p[0], p[1], 3, cc, vb.pp(format!("c{i}"))))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Stem::Conv(
                    convs,
                    candle_nn::linear(*chans.last().unwrap(), w, vb.pp("proj"))?,
                )
            }
            other => anyhow::bail!("unknown stem {other}"),
        };
        let ntok = if stem_name == "patch8" || stem_name == "conv3" {
            64
        } else {
            16
        };
        let pos = vb.get_with_hints(
            (ntok, w),
            "pos",
            candle_nn::Init::Randn {
                mean: 0.,
                stdev: 0.02,
            },
        )?;
        let blocks: Vec<Block> = (0..2)
            .map(|i| Block::new(vb.pp(format!("b{i}")), w, 4))
            .collect::<candle_core::Result<_>>()?;
        let head = candle_nn::linear(w, cats.len(), vb.pp("head"))?;
        let fwd = |x: &Tensor| -> candle_core::Result<Tensor> {
            let mut h = stem.forward(x)?.broadcast_add(&pos)?;
            for b in &blocks {
                h = b.forward(&h)?;
            }
            head.forward(&ln(&h)?.mean(1)?)
        };
        let mut opt = candle_nn::AdamW::new(
            vm.all_vars(),
            candle_nn::ParamsAdamW {
                lr: 3e-3,
                weight_decay: 0.01,
                ..Default::default()
            },
        )?;
        let n = xtr.dim(0)?;
        let bs = 32;
        let t0 = std::time::Instant::now();
        let mut rng = 12345u64;
        for step in 0..steps {
            let idx: Vec<u32> = (0..bs)
                .map(|_| {
                    rng = rng
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((rng >> 33) % n as u64) as u32
                })
                .collect();
            let it = Tensor::new(idx.as_slice(), &dev)?;
            let x = xtr.index_select(&it, 0)?;
            let y = ytr.index_select(&it, 0)?;
            let loss = candle_nn::loss::cross_entropy(&fwd(&x)?, &y)?;
            let lrf = 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / steps as f64).cos());
            opt.set_learning_rate(3e-3 * lrf);
            opt.backward_step(&loss)?;
            if (step + 1) % (steps / 4).max(1) == 0 {
                let acc = |x: &Tensor, y: &Tensor| -> candle_core::Result<f32> {
                    let mut ok = 0usize;
                    let n = x.dim(0)?;
                    for s in (0..n).step_by(100) {
                        let l = (n - s).min(100);
                        let p = fwd(&x.narrow(0, s, l)?)?.argmax(D::Minus1)?;
                        let eq = p.eq(&y.narrow(0, s, l)?)?.to_dtype(DType::F32)?.sum_all()?;
                        ok += eq.to_scalar::<f32>()? as usize;
                    }
                    Ok(ok as f32 / n as f32)
                };
                println!(
                    "{stem_name} step {} loss {:.3} valid acc {:.3} IC-train acc {:.3} ({:.1} s)",
                    step + 1,
                    loss.to_scalar::<f32>()?,
                    acc(&xva, &yva)?,
                    acc(&xic.narrow(0, 0, 1000)?, &yic.narrow(0, 0, 1000)?)?,
                    t0.elapsed().as_secs_f32()
                );
            }
        }
    }
    Ok(())
}
