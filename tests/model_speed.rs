//! Training / decoding throughput figures at the tiny preset (ignored by default; prints, never
//! asserts on time). Run: `scripts/bench-model.sh` (1 thread, as the sweep runs stages).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use ecic::decode::{generate, DecodeConfig, Strategy};
use ecic::model::{Backbone, Captioner, Fusion, ModelConfig, PeftConfig, Phase};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const V: usize = 400;
const B: usize = 16;
const T: usize = 24;

fn data(c: &ModelConfig) -> (Tensor, Tensor, Tensor, Tensor) {
    let mut r = ChaCha8Rng::seed_from_u64(1);
    let s = c.input_size();
    let img: Vec<f32> = (0..B * 3 * s * s).map(|_| r.gen_range(-1.0..1.0)).collect();
    let ids: Vec<u32> = (0..B * T).map(|_| r.gen_range(3..V as u32)).collect();
    let dev = Device::Cpu;
    (
        Tensor::from_vec(img, (B, 3, s, s), &dev).unwrap(),
        Tensor::from_vec(ids.clone(), (B, T), &dev).unwrap(),
        Tensor::from_vec(ids, (B, T), &dev).unwrap(),
        Tensor::ones((B, T), DType::F32, &dev).unwrap(),
    )
}

fn train_rate(m: &Captioner, steps: usize) -> f64 {
    let (img, inp, tgt, mask) = data(m.config());
    let vars = m.trainable_vars().into_iter().map(|t| t.var).collect();
    let mut opt = AdamW::new(vars, ParamsAdamW::default()).unwrap();
    let step = |opt: &mut AdamW| {
        opt.backward_step(&m.loss(&img, &inp, &tgt, &mask, 0.1).unwrap())
            .unwrap()
    };
    step(&mut opt);
    let t0 = Instant::now();
    for _ in 0..steps {
        step(&mut opt);
    }
    (steps * B) as f64 / t0.elapsed().as_secs_f64()
}

#[test]
#[ignore = "benchmark: prints figures"]
fn print_training_and_decoding_rates() {
    let dir = tempfile::tempdir().unwrap();
    for b in [Backbone::Blip2, Backbone::Llava, Backbone::Phi3v] {
        for f in [Fusion::Early, Fusion::Late, Fusion::Multilevel] {
            // ECIC_BENCH_ONLY=Phi3v/Early (substring of the line label) narrows the run for A/B.
            if std::env::var("ECIC_BENCH_ONLY").is_ok_and(|o| !format!("{b:?}/{f:?}").contains(&o))
            {
                continue;
            }
            let mut c = ModelConfig::tiny(b, f, V, 0, 1, 2);
            c.max_caption_len = T;
            let align =
                Captioner::new(&c, &PeftConfig::full(), Phase::Align, &Device::Cpu).unwrap();
            let a = train_rate(&align, 5);
            let base = dir.path().join("base.safetensors");
            align.save_trained(&base).unwrap();
            let mut line = format!("{b:?}/{f:?}: align {a:.0} samples/s");
            for peft in [
                PeftConfig::full(),
                PeftConfig::lora(8, 16.0),
                PeftConfig::qlora(8, 16.0),
                PeftConfig::adapter(16),
            ] {
                let mut m = Captioner::new(&c, &peft, Phase::Adapt, &Device::Cpu).unwrap();
                m.load_base(&base).unwrap();
                line += &format!(", {:?} {:.0}", peft.method, train_rate(&m, 5));
            }
            let (img, ..) = data(&c);
            let img = Tensor::cat(&[&img, &img], 0).unwrap();
            let inf = align.inference().unwrap();
            for (name, dc) in [
                (
                    "greedy",
                    DecodeConfig {
                        max_len: T,
                        ..DecodeConfig::default()
                    },
                ),
                (
                    "beam3",
                    DecodeConfig {
                        strategy: Strategy::Beam,
                        beam_width: 3,
                        max_len: T,
                        ..DecodeConfig::default()
                    },
                ),
            ] {
                let t0 = Instant::now();
                let out = generate(&inf, &img, &dc, 0).unwrap();
                let n: usize = out.iter().map(|s| s.len()).sum();
                line += &format!(
                    ", {name} {:.0} captions/s ({n} tokens)",
                    32.0 / t0.elapsed().as_secs_f64()
                );
            }
            eprintln!("{line}");
        }
    }
}
