//! The candle side of `scripts/bench-vs-torch.sh`: one timed run of one case, printed as one JSON
//! line on stdout. `scripts/bench_vs_torch.py` builds the same model in PyTorch and alternates
//! runs of both; see there for the cases. Threads: `RAYON_NUM_THREADS` (candle's matmul and our
//! ops both read it).
//!
//! ```text
//! cargo run --release --example bench_candle -- CASE [--patch 8] [--steps 10] [--warmup 2]
//!     [--export DIR]
//! CASE: full | full44 | lora | qlora | adapter | greedy | beam3 | matmul
//! ```
//!
//! `ECIC_ISA=baseline|avx2|avx512` runs our own kernels at that instruction-set level instead
//! of the best the CPU has (src/model/vmath.rs), to measure what the dispatch gives.
//!
//! Training cases time forward + backward + gradient clipping + AdamW step (the project's
//! optimizer, `ecic::train::AdamW`) per step and report samples/s with the split in ms.
//! Decoding cases time `decode::generate` (greedy or beam-3, KV cache) over 32 images, 24 new
//! tokens at most. `matmul` reports f32 GFLOP/s of (n,n)x(n,n) for n = 1024, 1536, 2048 and the
//! instruction set our own kernels run at (`ecic::model::vmath::isa`).
//! `--export DIR` (training cases) writes the initial weights, the batch and the losses of the
//! first steps so the PyTorch side can check that it computes the same function.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ecic::decode::{generate, DecodeConfig, Strategy};
use ecic::model::{Backbone, Captioner, Component, Fusion, ModelConfig, PeftConfig, Phase};
use ecic::train::{AdamW, Group, ParamSpec, TrainConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// The allocator the `ecic` binary trains with (src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const VOCAB: usize = 3000;
const T: usize = 24;

struct Case {
    name: String,
    patch: usize,
    depth: usize,
    batch: usize,
    peft: Option<PeftConfig>,
}

fn config(case: &Case) -> ModelConfig {
    let mut c = ModelConfig::tiny(Backbone::Llava, Fusion::Early, VOCAB, 0, 1, 2);
    c.max_caption_len = T;
    c.vision.patch_size = case.patch;
    // llava reads the penultimate block: a depth-d encoder runs d-1 blocks (the built ones).
    c.vision.depth = case.depth;
    c.lm.depth = case.depth;
    c
}

fn batch(c: &ModelConfig, n: usize) -> (Tensor, Tensor, Tensor, Tensor) {
    let mut r = ChaCha8Rng::seed_from_u64(1);
    let s = c.input_size();
    let img: Vec<f32> = (0..n * 3 * s * s).map(|_| r.gen_range(-1.0..1.0)).collect();
    let cap: Vec<Vec<u32>> = (0..n)
        .map(|_| (0..T - 1).map(|_| r.gen_range(3..VOCAB as u32)).collect())
        .collect();
    let inp: Vec<u32> = cap
        .iter()
        .flat_map(|c| std::iter::once(1).chain(c.iter().copied()))
        .collect();
    let tgt: Vec<u32> = cap
        .iter()
        .flat_map(|c| c.iter().copied().chain(std::iter::once(2)))
        .collect();
    let dev = Device::Cpu;
    (
        Tensor::from_vec(img, (n, 3, s, s), &dev).unwrap(),
        Tensor::from_vec(inp, (n, T), &dev).unwrap(),
        Tensor::from_vec(tgt, (n, T), &dev).unwrap(),
        Tensor::ones((n, T), DType::F32, &dev).unwrap(),
    )
}

fn group(c: Component) -> Group {
    match c {
        Component::Vision => Group::Vision,
        Component::Connector => Group::Connector,
        Component::Lm => Group::Lm,
        Component::Adapter => Group::Adapter,
    }
}

fn model(case: &Case) -> Captioner {
    let c = config(case);
    match &case.peft {
        None => Captioner::new(&c, &PeftConfig::full(), Phase::Align, &Device::Cpu).unwrap(),
        Some(p) => Captioner::new(&c, p, Phase::Adapt, &Device::Cpu).unwrap(),
    }
}

fn train(case: &Case, steps: usize, warmup: usize, export: Option<&str>) -> String {
    let m = model(case);
    let counts = m.counts();
    let (img, inp, tgt, mask) = batch(m.config(), case.batch);
    if let Some(dir) = export {
        std::fs::create_dir_all(dir).unwrap();
        let p = std::path::Path::new(dir);
        m.save_trained(&p.join("weights.safetensors")).unwrap();
        let data: HashMap<String, Tensor> = [
            ("images", img.clone()),
            ("input_ids", inp.clone()),
            ("target_ids", tgt.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        candle_core::safetensors::save(&data, p.join("batch.safetensors")).unwrap();
    }
    let specs = m
        .trainable_vars()
        .into_iter()
        .map(|t| ParamSpec::new(t.name, t.var, group(t.component)).with_decay(t.decay))
        .collect();
    let cfg = TrainConfig::default();
    let mut opt = AdamW::new(specs, &cfg).unwrap();
    let (mut fwd, mut bwd, mut upd) = (0f64, 0f64, 0f64);
    let mut losses = Vec::new();
    let t_all = Instant::now();
    let mut t_start = t_all;
    for s in 0..warmup + steps {
        if s == warmup {
            (fwd, bwd, upd) = (0.0, 0.0, 0.0);
            t_start = Instant::now();
        }
        let t0 = Instant::now();
        let loss = m.loss(&img, &inp, &tgt, &mask, 0.1).unwrap();
        let t1 = Instant::now();
        let grads = loss.backward().unwrap();
        let t2 = Instant::now();
        opt.accumulate(&grads, 1.0).unwrap();
        drop(grads);
        let norm = opt.grad_norm();
        opt.step(cfg.lr, norm).unwrap();
        let t3 = Instant::now();
        fwd += (t1 - t0).as_secs_f64();
        bwd += (t2 - t1).as_secs_f64();
        upd += (t3 - t2).as_secs_f64();
        if losses.len() < 4 {
            losses.push(loss.to_scalar::<f32>().unwrap());
        }
    }
    let secs = t_start.elapsed().as_secs_f64();
    let ms = |x: f64| 1e3 * x / steps as f64;
    format!(
        "{{\"case\":\"{}\",\"side\":\"candle\",\"samples_per_s\":{:.2},\"fwd_ms\":{:.2},\"bwd_ms\":{:.2},\"opt_ms\":{:.2},\"trainable\":{},\"total\":{},\"losses\":{:?}}}",
        case.name,
        (steps * case.batch) as f64 / secs,
        ms(fwd),
        ms(bwd),
        ms(upd),
        counts.trainable,
        counts.total,
        losses
    )
}

fn decode(case: &Case, beam: bool, runs: usize, warmup: usize) -> String {
    let m = model(case).inference().unwrap();
    let (img, ..) = batch(m.config(), case.batch);
    let dc = DecodeConfig {
        strategy: if beam {
            Strategy::Beam
        } else {
            Strategy::Greedy
        },
        beam_width: 3,
        max_len: T,
        ..DecodeConfig::default()
    };
    let mut tokens = 0;
    let mut secs = 0.0;
    for r in 0..warmup + runs {
        let t0 = Instant::now();
        let out = generate(&m, &img, &dc, 0).unwrap();
        if r >= warmup {
            secs += t0.elapsed().as_secs_f64();
            tokens += out.iter().map(|s| s.len()).sum::<usize>();
        }
    }
    format!(
        "{{\"case\":\"{}\",\"side\":\"candle\",\"captions_per_s\":{:.2},\"tokens\":{}}}",
        case.name,
        (runs * case.batch) as f64 / secs,
        tokens / runs.max(1)
    )
}

fn matmul() -> String {
    let mut out = Vec::new();
    for n in [1024usize, 1536, 2048] {
        let mut r = ChaCha8Rng::seed_from_u64(n as u64);
        let mut t = || {
            let v: Vec<f32> = (0..n * n).map(|_| r.gen_range(-1.0..1.0)).collect();
            Tensor::from_vec(v, (n, n), &Device::Cpu).unwrap()
        };
        let (a, b) = (t(), t());
        let _ = a.matmul(&b).unwrap();
        let reps = (4 * 2048 * 2048 * 2048 / (n * n * n)).max(2);
        let t0 = Instant::now();
        for _ in 0..reps {
            let _ = a.matmul(&b).unwrap();
        }
        let g = 2.0 * (n * n * n * reps) as f64 / t0.elapsed().as_secs_f64() / 1e9;
        out.push(format!("\"{n}\":{g:.1}"));
    }
    format!(
        "{{\"case\":\"matmul\",\"side\":\"candle\",\"isa\":\"{}\",\"gflops\":{{{}}}}}",
        ecic::model::vmath::isa().name(),
        out.join(",")
    )
}

/// `ECIC_ISA=baseline|avx2|avx512`: run our kernels at that level instead of the best one, to
/// measure what the dispatch gives.
fn force_isa_from_env() {
    use ecic::model::vmath::{force_isa, Isa};
    let Ok(level) = std::env::var("ECIC_ISA") else {
        return;
    };
    let isa = match level.as_str() {
        "baseline" => Isa::Baseline,
        "avx2" => Isa::Avx2,
        "avx512" => Isa::Avx512,
        other => {
            eprintln!("ECIC_ISA={other}: expected baseline, avx2 or avx512");
            std::process::exit(2);
        }
    };
    if !force_isa(isa) {
        eprintln!("ECIC_ISA={level}: this CPU lacks it");
        std::process::exit(2);
    }
}

fn main() {
    ecic::runtime::init();
    force_isa_from_env();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let num = |k: &str, d: usize| opt(k).map_or(d, |v| v.parse().expect("a number"));
    let name = args.first().cloned().unwrap_or_else(|| "full".into());
    let patch = num("--patch", 8);
    let steps = num("--steps", 10);
    let warmup = num("--warmup", 2);
    let export = opt("--export");
    let case = |depth, batch, peft| Case {
        name: name.clone(),
        patch,
        depth,
        batch,
        peft,
    };
    let line = match name.as_str() {
        "full" => train(&case(2, 16, None), steps, warmup, export.as_deref()),
        "full44" => train(&case(4, 32, None), steps, warmup, export.as_deref()),
        "lora" => train(
            &case(2, 16, Some(PeftConfig::lora(8, 16.0))),
            steps,
            warmup,
            export.as_deref(),
        ),
        "qlora" => train(
            &case(2, 16, Some(PeftConfig::qlora(8, 16.0))),
            steps,
            warmup,
            export.as_deref(),
        ),
        "adapter" => train(
            &case(2, 16, Some(PeftConfig::adapter(16))),
            steps,
            warmup,
            export.as_deref(),
        ),
        "greedy" => decode(&case(2, 32, None), false, steps, warmup),
        "beam3" => decode(&case(2, 32, None), true, steps, warmup),
        "matmul" => matmul(),
        other => {
            eprintln!("unknown case {other}");
            std::process::exit(2);
        }
    };
    println!("{line}");
}
