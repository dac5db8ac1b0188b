//! The training loop on a toy model of our own (a linear softmax classifier on a seeded synthetic task):
//! the loss falls, a killed-and-resumed run ends bitwise where an uninterrupted one does, NaN/inf stop the
//! run with the step named, and variables without gradient are reported.

use std::cell::RefCell;

use candle_core::{DType, Device, Tensor, Var};
use ecic::train::{
    checkpoint, CurveRecord, Group, Hooks, Micro, ParamSpec, StepCtx, TrainConfig, TrainError,
    Trainer,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const D: usize = 6;
const C: usize = 3;

/// A linear classifier; `init_seed` picks its starting weights.
struct Toy {
    w: Var,
    b: Var,
}

impl Toy {
    fn new(init_seed: u64) -> Toy {
        let mut r = ChaCha8Rng::seed_from_u64(init_seed);
        let w: Vec<f32> = (0..D * C).map(|_| r.gen_range(-0.1..0.1)).collect();
        Toy {
            w: Var::from_vec(w, (D, C), &Device::Cpu).unwrap(),
            b: Var::zeros(C, DType::F32, &Device::Cpu).unwrap(),
        }
    }

    fn specs(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::new("toy.w", self.w.clone(), Group::Lm),
            ParamSpec::new("toy.b", self.b.clone(), Group::Connector),
        ]
    }

    fn loss(&self, x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
        let logits = x
            .matmul(self.w.as_tensor())?
            .broadcast_add(self.b.as_tensor())?;
        candle_nn::loss::cross_entropy(&logits, y)
    }

    fn values(&self) -> Vec<u32> {
        let mut v = self.w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.extend(self.b.to_vec1::<f32>().unwrap());
        v.into_iter().map(f32::to_bits).collect()
    }
}

/// A batch of the synthetic task drawn from the loop's rng: the label is the argmax of a fixed projection.
fn batch(rng: &mut ChaCha8Rng, n: usize) -> (Tensor, Tensor) {
    let mut xs = Vec::with_capacity(n * D);
    let mut ys = Vec::with_capacity(n);
    for _ in 0..n {
        let x: Vec<f32> = (0..D).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let score = |c: usize| {
            x.iter()
                .enumerate()
                .map(|(i, v)| v * (((i * 3 + c * 5) % 7) as f32 - 3.0))
                .sum::<f32>()
        };
        let y = (0..C)
            .max_by(|a, b| score(*a).total_cmp(&score(*b)))
            .unwrap_or(0);
        xs.extend(x);
        ys.push(y as u32);
    }
    (
        Tensor::from_vec(xs, (n, D), &Device::Cpu).unwrap(),
        Tensor::from_vec(ys, n, &Device::Cpu).unwrap(),
    )
}

fn cfg(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 16,
        lr: 0.05,
        warmup: 3,
        min_lr_ratio: 0.1,
        weight_decay: 0.01,
        grad_clip: 0.5,
        accum: 2,
        ckpt_every: 5,
        val_every: 4,
        ..TrainConfig::default()
    }
}

fn loss_fn(toy: &Toy) -> impl FnMut(&mut StepCtx<'_>) -> Result<Micro, ecic::train::BoxError> + '_ {
    move |ctx| {
        let (x, y) = batch(ctx.rng, 16);
        Ok(Micro::new(toy.loss(&x, &y)?, 16))
    }
}

fn val_loss(toy: &Toy) -> f64 {
    let (x, y) = batch(&mut ChaCha8Rng::seed_from_u64(999), 256);
    toy.loss(&x, &y).unwrap().to_scalar::<f32>().unwrap() as f64
}

#[test]
fn loss_falls_and_curves_are_complete() {
    let toy = Toy::new(1);
    let before = val_loss(&toy);
    let mut trainer = Trainer::new(toy.specs(), &cfg(60), 7).unwrap();
    let records = RefCell::new(Vec::<CurveRecord>::new());
    let progress = RefCell::new(Vec::new());
    let mut hooks = Hooks::new()
        .record(|r| records.borrow_mut().push(r.clone()))
        .progress(|s, t| progress.borrow_mut().push((s, t)))
        .validate(|_| Ok(val_loss(&toy)));
    let summary = trainer.fit(loss_fn(&toy), &mut hooks).unwrap();
    drop(hooks);
    let after = val_loss(&toy);
    assert!(after < 0.6 * before, "validation loss {before} -> {after}");
    let records = records.into_inner();
    assert_eq!(records.len(), 60);
    assert_eq!(progress.into_inner().last(), Some(&(60, 60)));
    let first: f64 = records[..5].iter().map(|r| r.loss).sum::<f64>() / 5.0;
    let last: f64 = records[55..].iter().map(|r| r.loss).sum::<f64>() / 5.0;
    assert!(last < 0.7 * first, "training loss {first} -> {last}");
    // validation every 4 steps and after the last one
    let validated: Vec<usize> = records
        .iter()
        .filter(|r| r.val_loss.is_some())
        .map(|r| r.step)
        .collect();
    assert_eq!(validated, (1..=15).map(|i| i * 4).collect::<Vec<_>>());
    assert!(records
        .iter()
        .all(|r| r.grad_norm.is_finite() && r.lr > 0.0 && r.samples_per_s > 0.0));
    assert_eq!(records[0].lr, 0.05 / 3.0);
    assert_eq!(summary.end_step, 60);
    assert!(summary.missing_grads.is_empty());
    assert_eq!(summary.last_val_loss, Some(after));
}

#[test]
fn resume_after_kill_is_bitwise_identical() {
    let dir = tempfile::tempdir().unwrap();
    // uninterrupted reference run
    let reference = Toy::new(1);
    let ref_records = RefCell::new(Vec::<CurveRecord>::new());
    {
        let mut t = Trainer::new(reference.specs(), &cfg(20), 7)
            .unwrap()
            .with_checkpoints(dir.path().join("a"));
        let mut hooks = Hooks::new().record(|r| ref_records.borrow_mut().push(r.clone()));
        t.fit(loss_fn(&reference), &mut hooks).unwrap();
    }
    // killed after step 13, past the checkpoint of step 10
    let ckpts = dir.path().join("b");
    {
        let first = Toy::new(1);
        let mut t = Trainer::new(first.specs(), &cfg(20), 7)
            .unwrap()
            .with_checkpoints(&ckpts);
        t.fit_until(13, loss_fn(&first), &mut Hooks::new()).unwrap();
        assert_eq!(t.step(), 13);
    }
    // a half-written checkpoint from the kill must be ignored
    std::fs::write(ckpts.join(".tmp-step-XXXX"), b"garbage").unwrap();
    let steps: Vec<usize> = checkpoint::list(&ckpts)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(steps, vec![5, 10]);
    // a fresh process: different initial weights, everything comes from the checkpoint
    let resumed = Toy::new(12345);
    assert_ne!(resumed.values(), reference.values());
    let records = RefCell::new(Vec::<CurveRecord>::new());
    let mut t = Trainer::new(resumed.specs(), &cfg(20), 7)
        .unwrap()
        .with_checkpoints(&ckpts);
    assert_eq!(t.resume().unwrap(), Some(10));
    let mut hooks = Hooks::new().record(|r| records.borrow_mut().push(r.clone()));
    let summary = t.fit(loss_fn(&resumed), &mut hooks).unwrap();
    drop(hooks);
    assert_eq!(
        (summary.start_step, summary.end_step, summary.resumed_from),
        (10, 20, Some(10))
    );
    assert_eq!(
        resumed.values(),
        reference.values(),
        "weights differ after resume"
    );
    // the resumed steps saw the same batches, losses and norms
    let strip = |r: &CurveRecord| {
        (
            r.step,
            r.loss.to_bits(),
            r.grad_norm.to_bits(),
            r.lr.to_bits(),
        )
    };
    let got: Vec<_> = records.into_inner().iter().map(strip).collect();
    let want: Vec<_> = ref_records.into_inner()[10..].iter().map(strip).collect();
    assert_eq!(got, want);
    // and the checkpoints were pruned to the newest two
    let steps: Vec<usize> = checkpoint::list(&ckpts)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(steps, vec![15, 20]);
}

#[test]
fn checkpoint_of_another_configuration_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let toy = Toy::new(1);
    let mut t = Trainer::new(toy.specs(), &cfg(10), 7)
        .unwrap()
        .with_checkpoints(dir.path());
    t.fit(loss_fn(&toy), &mut Hooks::new()).unwrap();
    let other = TrainConfig {
        lr: 0.01,
        ..cfg(10)
    };
    let mut t = Trainer::new(Toy::new(1).specs(), &other, 7)
        .unwrap()
        .with_checkpoints(dir.path());
    let err = t.resume().unwrap_err();
    assert!(matches!(err, TrainError::BadCheckpoint { .. }), "{err}");
    assert!(
        err.to_string().contains("step-00000010.safetensors"),
        "{err}"
    );
}

#[test]
fn nan_loss_fails_naming_the_step() {
    let toy = Toy::new(1);
    let seen = RefCell::new(0);
    let mut t = Trainer::new(toy.specs(), &cfg(20), 7).unwrap();
    let mut hooks = Hooks::new().record(|_| *seen.borrow_mut() += 1);
    let err = t
        .fit(
            |ctx| {
                let (x, y) = batch(ctx.rng, 16);
                let loss = toy.loss(&x, &y)?;
                let loss = if ctx.step == 6 && ctx.micro == 1 {
                    (loss * f64::NAN)?
                } else {
                    loss
                };
                Ok(Micro::new(loss, 16))
            },
            &mut hooks,
        )
        .unwrap_err();
    drop(hooks);
    assert!(
        matches!(
            err,
            TrainError::NonFiniteLoss {
                step: 6,
                micro: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("step 6"), "{err}");
    assert_eq!(seen.into_inner(), 6);
}

#[test]
fn nan_gradient_with_finite_loss_fails_naming_the_step() {
    let toy = Toy::new(1);
    let mut t = Trainer::new(toy.specs(), &cfg(20), 7).unwrap();
    let err = t
        .fit(
            |ctx| {
                let (x, y) = batch(ctx.rng, 16);
                let mut loss = toy.loss(&x, &y)?;
                if ctx.step == 3 {
                    // d sqrt(u)/du at u = 0 is infinite while the loss term is 0
                    let zero = (toy.w.as_tensor() - toy.w.as_tensor().detach())?;
                    loss = (loss + zero.sqrt()?.sum_all()?)?;
                }
                Ok(Micro::new(loss, 16))
            },
            &mut Hooks::new(),
        )
        .unwrap_err();
    assert!(
        matches!(err, TrainError::NonFiniteGrad { step: 3, .. }),
        "{err}"
    );
}

#[test]
fn variables_without_gradient_are_reported_and_left_alone() {
    let toy = Toy::new(1);
    let unused = Var::ones((2, 2), DType::F32, &Device::Cpu).unwrap();
    let mut specs = toy.specs();
    specs.push(ParamSpec::new("toy.unused", unused.clone(), Group::Vision));
    let mut t = Trainer::new(specs, &cfg(5), 7).unwrap();
    let summary = t.fit(loss_fn(&toy), &mut Hooks::new()).unwrap();
    assert_eq!(summary.missing_grads, vec!["toy.unused".to_string()]);
    // no gradient: no decay and no moment update either
    assert_eq!(
        unused.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![1.0; 4]
    );
}

#[test]
fn duplicate_names_and_bad_configs_are_rejected_with_every_problem() {
    let toy = Toy::new(1);
    let mut specs = toy.specs();
    specs.push(ParamSpec::new("toy.w", toy.b.clone(), Group::Lm));
    assert!(matches!(
        Trainer::new(specs, &cfg(5), 0),
        Err(TrainError::DuplicateParam { .. })
    ));
    let mut specs = toy.specs();
    specs.push(ParamSpec::new("toy.w_again", toy.w.clone(), Group::Lm));
    assert!(matches!(
        Trainer::new(specs, &cfg(5), 0),
        Err(TrainError::DuplicateParam { .. })
    ));

    let bad = TrainConfig {
        steps: 0,
        accum: 0,
        lr: f64::NAN,
        beta2: 1.0,
        ..TrainConfig::default()
    };
    match bad.validate() {
        Err(TrainError::InvalidConfig { problems }) => {
            assert_eq!(problems.len(), 4, "{problems:?}");
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn configs_parse_from_toml_with_defaults() {
    let c: TrainConfig = toml::from_str("steps = 7\nlr = 3e-4\n[lr_mult]\nvision = 0.1\n").unwrap();
    assert_eq!(c.steps, 7);
    assert_eq!(c.lr_mult.vision, 0.1);
    assert_eq!(c.lr_mult.lm, 1.0);
    assert_eq!(c.accum, TrainConfig::default().accum);
    assert!(toml::from_str::<TrainConfig>("stepz = 7").is_err());
    let s: ecic::train::ScstConfig = toml::from_str("samples = 3\nbaseline = \"mean\"").unwrap();
    assert_eq!(s.baseline, ecic::train::Baseline::Mean);
    s.validate().unwrap();
}

#[test]
fn a_corrupt_checkpoint_is_discarded_and_the_one_before_it_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let reference = Toy::new(1);
    {
        let mut t = Trainer::new(reference.specs(), &cfg(20), 7)
            .unwrap()
            .with_checkpoints(dir.path().join("a"));
        t.fit(loss_fn(&reference), &mut Hooks::new()).unwrap();
    }
    let ckpts = dir.path().join("b");
    {
        let first = Toy::new(1);
        let mut t = Trainer::new(first.specs(), &cfg(20), 7)
            .unwrap()
            .with_checkpoints(&ckpts);
        t.fit_until(13, loss_fn(&first), &mut Hooks::new()).unwrap();
    }
    // Three bytes of the newest checkpoint's tensor data: it still parses.
    let newest = ckpts.join("step-00000010.safetensors");
    let mut bytes = std::fs::read(&newest).unwrap();
    let n = bytes.len();
    for b in &mut bytes[n - 40..n - 37] {
        *b ^= 0x10;
    }
    std::fs::write(&newest, bytes).unwrap();
    let report = checkpoint::verify_dir(&ckpts).unwrap();
    assert_eq!(report.len(), 2);
    assert!(report[0].1.is_none(), "{report:?}");
    assert!(
        report[1]
            .1
            .as_deref()
            .unwrap_or("")
            .contains("content differs"),
        "{report:?}"
    );
    let resumed = Toy::new(12345);
    let mut t = Trainer::new(resumed.specs(), &cfg(20), 7)
        .unwrap()
        .with_checkpoints(&ckpts);
    assert_eq!(t.resume().unwrap(), Some(5), "resumed the corrupt step 10");
    assert!(!newest.exists(), "the corrupt checkpoint was kept");
    t.fit(loss_fn(&resumed), &mut Hooks::new()).unwrap();
    assert_eq!(
        resumed.values(),
        reference.values(),
        "weights differ after resuming from the last good checkpoint"
    );

    // Every checkpoint damaged (one without its digest file): start from zero.
    let steps: Vec<std::path::PathBuf> = checkpoint::list(&ckpts)
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(steps.len(), 2);
    let mut b = std::fs::read(&steps[0]).unwrap();
    let n = b.len();
    b[n - 1] ^= 1;
    std::fs::write(&steps[0], b).unwrap();
    let mut digest = steps[1].clone().into_os_string();
    digest.push(".b3");
    std::fs::remove_file(digest).unwrap();
    let mut t = Trainer::new(Toy::new(1).specs(), &cfg(20), 7)
        .unwrap()
        .with_checkpoints(&ckpts);
    assert_eq!(t.resume().unwrap(), None);
    assert!(checkpoint::list(&ckpts).unwrap().is_empty());
}
