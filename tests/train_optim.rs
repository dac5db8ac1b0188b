//! AdamW over parameter groups and the schedule, checked against references: the pure-Python transcription
//! of torch's AdamW kept beside its fixture (tests/train_fixtures/adamw_reference.py), and candle-nn's
//! own AdamW for the plain case (every variable decays, no clipping, constant rate).

use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer;
use ecic::train::{CurveRecord, Group, GroupLr, Hooks, Micro, ParamSpec, TrainConfig, Trainer};

const PARAMS: [(&str, &[usize], Group, bool); 3] = [
    ("w", &[2, 3], Group::Lm, true),
    ("b", &[3], Group::Adapter, false),
    ("e", &[2, 2], Group::Vision, false),
];

fn init(pid: usize, i: usize) -> f32 {
    (0.1 * (i as f64 + 1.0) - 0.3 + 0.05 * pid as f64) as f32
}

fn grad(step: usize, micro: usize, pid: usize, i: usize) -> f32 {
    let scale = if step.is_multiple_of(2) { 8.0 } else { 0.1 };
    (scale * (1.0 + 7.0 * step as f64 + 3.0 * micro as f64 + 0.5 * i as f64 + pid as f64).sin())
        as f32
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1.0)
}

#[test]
fn adamw_matches_python_reference_with_groups_decay_clip_and_accumulation() {
    let text = std::fs::read_to_string("tests/train_fixtures/adamw_reference.json").unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cfg = TrainConfig {
        steps: 6,
        lr: 0.01,
        warmup: 2,
        min_lr_ratio: 0.1,
        weight_decay: 0.1,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        grad_clip: 1.0,
        accum: 2,
        lr_mult: GroupLr {
            vision: 0.5,
            connector: 1.0,
            lm: 1.0,
            adapter: 2.0,
        },
        ..TrainConfig::default()
    };
    let dev = Device::Cpu;
    let vars: Vec<Var> = PARAMS
        .iter()
        .enumerate()
        .map(|(pid, (_, shape, _, _))| {
            let n: usize = shape.iter().product();
            Var::from_vec(
                (0..n).map(|i| init(pid, i)).collect::<Vec<f32>>(),
                *shape,
                &dev,
            )
            .unwrap()
        })
        .collect();
    let specs = PARAMS
        .iter()
        .zip(&vars)
        .map(|((name, _, group, decay), v)| {
            ParamSpec::new(*name, v.clone(), *group).with_decay(*decay)
        })
        .collect();
    let mut trainer = Trainer::new(specs, &cfg, 0).unwrap();
    let mut records: Vec<CurveRecord> = Vec::new();
    let mut hooks = Hooks::new().record(|r| records.push(r.clone()));
    trainer
        .fit(
            |ctx| {
                let mut loss = Tensor::new(0f32, &dev)?;
                for (pid, ((name, shape, _, _), v)) in PARAMS.iter().zip(&vars).enumerate() {
                    if *name == "e" && ctx.step == 3 {
                        continue;
                    }
                    let n: usize = shape.iter().product();
                    let g: Vec<f32> = (0..n).map(|i| grad(ctx.step, ctx.micro, pid, i)).collect();
                    let g = Tensor::from_vec(g, *shape, &dev)?;
                    loss = (loss + (v.as_tensor() * g)?.sum_all()?)?;
                }
                Ok(Micro::new(loss, 1))
            },
            &mut hooks,
        )
        .unwrap();
    drop(hooks);

    assert_eq!(records.len(), 6);
    for (r, (lr, norm)) in records.iter().zip(
        reference["lr"]
            .as_array()
            .unwrap()
            .iter()
            .zip(reference["grad_norm"].as_array().unwrap()),
    ) {
        assert!(
            close(r.lr, lr.as_f64().unwrap(), 1e-12),
            "lr at {}: {} vs {}",
            r.step,
            r.lr,
            lr
        );
        assert!(
            close(r.grad_norm, norm.as_f64().unwrap(), 1e-6),
            "norm at {}: {} vs {}",
            r.step,
            r.grad_norm,
            norm
        );
    }
    // clipping was active on some steps and not on others, so both paths were exercised
    assert!(records.iter().any(|r| r.grad_norm > 1.0) && records.iter().any(|r| r.grad_norm < 1.0));
    for ((name, _, _, _), v) in PARAMS.iter().zip(&vars) {
        let got = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want: Vec<f64> = reference["final"][name]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(close(*g as f64, *w, 2e-6), "{name}[{i}]: {g} vs {w}");
        }
    }
}

#[test]
fn adamw_matches_candle_nn_adamw_when_everything_decays() {
    let dev = Device::Cpu;
    let init: Vec<f32> = (0..20)
        .map(|i| ((i * 37 % 11) as f32 - 5.0) / 10.0)
        .collect();
    let x = Tensor::from_vec(
        (0..12)
            .map(|i| (i as f32 * 0.7).sin())
            .collect::<Vec<f32>>(),
        (3, 4),
        &dev,
    )
    .unwrap();
    let y = Tensor::from_vec(
        (0..15)
            .map(|i| (i as f32 * 0.3).cos())
            .collect::<Vec<f32>>(),
        (3, 5),
        &dev,
    )
    .unwrap();
    let loss_of = |w: &Var| {
        (x.matmul(w.as_tensor()).unwrap() - &y)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };

    let ours_w = Var::from_vec(init.clone(), (4, 5), &dev).unwrap();
    let cfg = TrainConfig {
        steps: 15,
        lr: 0.05,
        warmup: 0,
        min_lr_ratio: 1.0,
        weight_decay: 0.2,
        grad_clip: 0.0,
        accum: 1,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(
        vec![ParamSpec::new("w", ours_w.clone(), Group::Lm).with_decay(true)],
        &cfg,
        0,
    )
    .unwrap();
    trainer
        .fit(|_| Ok(Micro::new(loss_of(&ours_w), 3)), &mut Hooks::new())
        .unwrap();

    let start = init.clone();
    let theirs_w = Var::from_vec(init, (4, 5), &dev).unwrap();
    let params = candle_nn::ParamsAdamW {
        lr: 0.05,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.2,
    };
    let mut opt = candle_nn::AdamW::new(vec![theirs_w.clone()], params).unwrap();
    for _ in 0..15 {
        opt.backward_step(&loss_of(&theirs_w)).unwrap();
    }
    let a = ours_w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = theirs_w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let max = a
        .iter()
        .zip(&b)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    // f32 rounding differs (candle-nn divides by the bias corrections first); a wrong formula would be
    // off by the order of lr = 5e-2
    assert!(max < 2e-5, "max abs difference {max}");
    let moved = a.iter().zip(&start).any(|(p, q)| (p - q).abs() > 0.1);
    assert!(moved, "the weights barely moved");
}

#[test]
fn default_decay_rule_spares_vectors_embeddings_and_norms() {
    use ecic::train::optim::default_decay;
    assert!(default_decay("lm.layers.0.mlp.up.weight", 2));
    assert!(!default_decay("lm.layers.0.mlp.up.bias", 1));
    assert!(!default_decay("lm.embed_tokens.weight", 2));
    assert!(!default_decay("vision.pos_embedding", 2));
    assert!(!default_decay("lm.layers.0.input_norm.weight", 1));
}
