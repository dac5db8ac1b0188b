//! Self-critical training on a toy categorical policy: each image has its own table of logits for each
//! of L positions; the reward is the fraction of the image's target tokens present in the caption. The
//! mean sample reward must rise under both baselines and with the diversity term on.

use std::cell::RefCell;

use candle_core::{Device, IndexOp, Tensor, Var, D};
use ecic::train::{
    scst_closure, scst_loss, Baseline, BoxError, CurveRecord, Group, Hooks, ParamSpec, Policy,
    SampleOpts, ScstConfig, Trainer,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const N: usize = 8; // images
const L: usize = 4; // caption length
const V: usize = 10; // vocabulary

struct Toy {
    logits: Var, // [N, L, V]
}

impl Toy {
    fn new() -> Toy {
        Toy {
            logits: Var::zeros((N, L, V), candle_core::DType::F32, &Device::Cpu).unwrap(),
        }
    }

    /// Host copy of the position-wise distributions of one image, without autograd.
    fn probs(&self, img: usize, temperature: f64) -> Result<Vec<Vec<f32>>, BoxError> {
        let l = (self.logits.as_detached_tensor().i(img)? / temperature)?;
        Ok(candle_nn::ops::softmax(&l, D::Minus1)?.to_vec2::<f32>()?)
    }
}

impl Policy for Toy {
    fn sample(
        &mut self,
        images: &[usize],
        opts: &SampleOpts,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<Vec<Vec<u32>>>, BoxError> {
        images
            .iter()
            .map(|&img| {
                let p = self.probs(img, opts.temperature)?;
                Ok((0..opts.k)
                    .map(|_| {
                        p.iter()
                            .take(opts.max_len)
                            .map(|row| {
                                let mut u: f32 = rng.gen();
                                let mut tok = row.len() - 1;
                                for (t, &q) in row.iter().enumerate() {
                                    if u < q {
                                        tok = t;
                                        break;
                                    }
                                    u -= q;
                                }
                                tok as u32
                            })
                            .collect()
                    })
                    .collect())
            })
            .collect()
    }

    fn greedy(&mut self, images: &[usize], max_len: usize) -> Result<Vec<Vec<u32>>, BoxError> {
        images
            .iter()
            .map(|&img| {
                let p = self.probs(img, 1.0)?;
                Ok(p.iter()
                    .take(max_len)
                    // first maximum, so ties resolve to the lowest token
                    .map(|row| {
                        (1..V).fold(0, |best, t| if row[t] > row[best] { t } else { best }) as u32
                    })
                    .collect())
            })
            .collect()
    }

    fn log_probs(&mut self, images: &[usize], seqs: &[Vec<u32>]) -> Result<Tensor, BoxError> {
        let dev = Device::Cpu;
        let idx = Tensor::from_vec(
            images.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            images.len(),
            &dev,
        )?;
        let lsm = candle_nn::ops::log_softmax(
            &self.logits.as_tensor().index_select(&idx, 0)?,
            D::Minus1,
        )?;
        let toks: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied()).collect();
        let toks = Tensor::from_vec(toks, (seqs.len(), L, 1), &dev)?;
        Ok(lsm.gather(&toks, 2)?.squeeze(2)?.sum(1)?)
    }
}

fn targets(img: usize) -> [u32; 3] {
    [
        (img % V) as u32,
        ((img + 3) % V) as u32,
        ((img + 7) % V) as u32,
    ]
}

fn reward(img: usize, seq: &[u32]) -> f64 {
    targets(img).iter().filter(|t| seq.contains(t)).count() as f64 / 3.0
}

fn train(cfg: &ScstConfig) -> Vec<CurveRecord> {
    let mut policy = Toy::new();
    let spec = ParamSpec::new("policy.logits", policy.logits.clone(), Group::Lm);
    let mut trainer = Trainer::new(vec![spec], &cfg.train_config(), 3).unwrap();
    let records = RefCell::new(Vec::new());
    let mut hooks = Hooks::new().record(|r| records.borrow_mut().push(r.clone()));
    trainer
        .fit(scst_closure(&mut policy, N, cfg, reward), &mut hooks)
        .unwrap();
    drop(hooks);
    records.into_inner()
}

fn cfg(baseline: Baseline, diversity_weight: f64) -> ScstConfig {
    ScstConfig {
        samples: 4,
        baseline,
        diversity_weight,
        max_len: L,
        steps: 60,
        batch_size: 4,
        lr: 0.3,
        grad_clip: 0.0,
        ..ScstConfig::default()
    }
}

fn assert_reward_rises(records: &[CurveRecord]) {
    let mean =
        |rs: &[CurveRecord]| rs.iter().map(|r| r.reward.unwrap()).sum::<f64>() / rs.len() as f64;
    let (first, last) = (mean(&records[..5]), mean(&records[records.len() - 5..]));
    eprintln!("mean reward {first} -> {last}");
    assert!(
        last > first + 0.25 && last > 0.8,
        "mean reward {first} -> {last}"
    );
}

#[test]
fn reward_rises_with_greedy_baseline() {
    assert_reward_rises(&train(&cfg(Baseline::Greedy, 0.0)));
}

#[test]
fn reward_rises_with_mean_baseline_and_diversity_term() {
    let plain = train(&cfg(Baseline::Mean, 0.0));
    assert_reward_rises(&plain);
    let diverse = train(&cfg(Baseline::Mean, 0.5));
    assert_reward_rises(&diverse);
    // the term changes the advantages, hence the trajectory
    assert_ne!(plain.last().unwrap().loss, diverse.last().unwrap().loss);
}

#[test]
fn same_seed_same_run() {
    let a = train(&cfg(Baseline::Greedy, 0.0));
    let b = train(&cfg(Baseline::Greedy, 0.0));
    let key = |r: &CurveRecord| (r.loss.to_bits(), r.reward.map(f64::to_bits));
    assert_eq!(
        a.iter().map(key).collect::<Vec<_>>(),
        b.iter().map(key).collect::<Vec<_>>()
    );
}

#[test]
fn loss_is_minus_advantage_weighted_log_prob() {
    // uniform policy: log p of every caption is L * ln(1/V); with the mean baseline the advantages of an
    // image sum to zero, so the loss is exactly 0 and the gradient pushes rewarded samples up
    let mut policy = Toy::new();
    let cfg = cfg(Baseline::Mean, 0.0);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (micro, stats) = scst_loss(&mut policy, &[0, 1, 2], &cfg, &reward, &mut rng).unwrap();
    let loss = micro.loss.to_scalar::<f32>().unwrap();
    assert!(loss.abs() < 1e-6, "{loss}");
    assert_eq!(micro.samples, 3);
    assert_eq!(micro.reward, Some(stats.mean_reward));
    assert!(stats.greedy_reward.is_none());
    assert!((0.0..=1.0).contains(&stats.overlap));
    // with the greedy baseline on a uniform policy the greedy caption is token 0 everywhere
    let cfg = ScstConfig {
        baseline: Baseline::Greedy,
        ..cfg
    };
    let (_, stats) = scst_loss(&mut policy, &[0], &cfg, &reward, &mut rng).unwrap();
    assert_eq!(stats.greedy_reward, Some(1.0 / 3.0));
}
