//! Caption generation from a trained [`Captioner`]: greedy, beam search (width, length
//! penalty), nucleus sampling (top-p, temperature), repetition penalty, maximum length; and k
//! sampled captions per image for SCST. The evaluate stage and SCST call into this module.
//!
//! Decoding always runs on an inference copy ([`Captioner::inference`]): detached weights,
//! LoRA merged, so no autograd graph is recorded. Rows are batched (images x beams / samples)
//! over one KV cache; `kv_cache = false` recomputes the whole prefix each step instead (for
//! checking the cache, and as a reference in benchmarks).

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::model::{Captioner, Inputs, LmState, ModelError};

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid decoding configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    Greedy,
    Beam,
    Nucleus,
}

/// Evaluate-stage decoding parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeConfig {
    pub strategy: Strategy,
    pub beam_width: usize,
    /// Finished beams are ranked by `sum_logprob / len^length_penalty`.
    pub length_penalty: f64,
    pub top_p: f64,
    pub temperature: f64,
    /// CTRL-style: logits of already generated tokens are divided (if > 0) or multiplied by it.
    pub repetition_penalty: f64,
    /// Most generated tokens, EOS included (capped by the model's `max_caption_len + 1`).
    pub max_len: usize,
    pub kv_cache: bool,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        Self {
            strategy: Strategy::Greedy,
            beam_width: 3,
            length_penalty: 1.0,
            top_p: 0.9,
            temperature: 1.0,
            repetition_penalty: 1.0,
            max_len: 33,
            kv_cache: true,
        }
    }
}

impl DecodeConfig {
    pub fn validate(&self) -> Result<(), DecodeError> {
        let mut errs = Vec::new();
        if self.beam_width == 0 {
            errs.push("beam_width must be at least 1".to_string());
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            errs.push(format!("top_p {} is outside (0, 1]", self.top_p));
        }
        if self.temperature <= 0.0 || !self.temperature.is_finite() {
            errs.push(format!("temperature {} must be positive", self.temperature));
        }
        if self.repetition_penalty <= 0.0 || !self.repetition_penalty.is_finite() {
            errs.push(format!(
                "repetition_penalty {} must be positive",
                self.repetition_penalty
            ));
        }
        if self.max_len == 0 {
            errs.push("max_len must be at least 1".to_string());
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Config(errs.join("; ")))
        }
    }
}

/// Rows being decoded: with the KV cache, or by full recomputation.
struct Session<'a> {
    model: &'a Captioner,
    state: Option<LmState>,
    /// Full-recompute mode: the image (and prompt) of each decoding row (with the cache: unused).
    inputs: Inputs,
    hist: Vec<Vec<u32>>,
}

impl<'a> Session<'a> {
    fn begin(
        model: &'a Captioner,
        inputs: &Inputs,
        repeat: usize,
        cache: bool,
    ) -> Result<(Self, Vec<Vec<f32>>), DecodeError> {
        let n = inputs.images.dim(0)? * repeat;
        let hist = vec![Vec::new(); n];
        if cache {
            // The image and its prefix are encoded once; the cache rows are then repeated
            // (beams / samples of an image start from the same state).
            let (logits, mut state) = model.begin(inputs, 1)?;
            let mut logits: Vec<Vec<f32>> = logits.to_vec2()?;
            if repeat > 1 {
                let idx: Vec<u32> = (0..logits.len() as u32)
                    .flat_map(|i| std::iter::repeat_n(i, repeat))
                    .collect();
                state.select(&idx)?;
                logits = idx.iter().map(|&i| logits[i as usize].clone()).collect();
            }
            Ok((
                Self {
                    model,
                    state: Some(state),
                    inputs: inputs.clone(),
                    hist,
                },
                logits,
            ))
        } else {
            let s = Self {
                model,
                state: None,
                inputs: inputs.repeat(repeat)?,
                hist,
            };
            let l = s.recompute()?;
            Ok((s, l))
        }
    }

    fn recompute(&self) -> Result<Vec<Vec<f32>>, DecodeError> {
        let m = self.model.config();
        let t = self.hist[0].len() + 1;
        let ids: Vec<u32> = self
            .hist
            .iter()
            .flat_map(|h| std::iter::once(m.bos_id).chain(h.iter().copied()))
            .collect();
        let ids = Tensor::from_vec(ids, (self.hist.len(), t), self.model.device())?;
        let l = self.model.logits(&self.inputs, &ids)?;
        Ok(l.narrow(1, t - 1, 1)?.squeeze(1)?.to_vec2()?)
    }

    /// Appends one token per row and returns the next logits.
    fn push(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, DecodeError> {
        for (h, &t) in self.hist.iter_mut().zip(tokens) {
            h.push(t);
        }
        match &mut self.state {
            Some(st) => Ok(self.model.step(tokens, st)?.to_vec2()?),
            None => self.recompute(),
        }
    }

    /// Keeps rows `idx` (beam reordering).
    fn select(&mut self, idx: &[u32]) -> Result<(), DecodeError> {
        if let Some(st) = &mut self.state {
            st.select(idx)?;
        } else {
            let t = Tensor::from_vec(idx.to_vec(), idx.len(), self.model.device())?;
            self.inputs = self.inputs.select(&t)?;
        }
        self.hist = idx.iter().map(|&i| self.hist[i as usize].clone()).collect();
        Ok(())
    }
}

fn penalize(logits: &mut [f32], hist: &[u32], p: f64) {
    if p == 1.0 {
        return;
    }
    let p = p as f32;
    let mut seen = std::collections::BTreeSet::new();
    for &t in hist {
        if seen.insert(t) {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 { *l / p } else { *l * p };
            }
        }
    }
}

fn log_sum_exp(x: &[f32]) -> f32 {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    m + x.iter().map(|v| (v - m).exp()).sum::<f32>().ln()
}

fn log_softmax(x: &mut [f32]) {
    let lse = log_sum_exp(x);
    x.iter_mut().for_each(|v| *v -= lse);
}

/// First index of the maximum (ties go to the lower token id, as in beam search).
fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

fn inference(model: &Captioner) -> Result<Option<Captioner>, DecodeError> {
    Ok(if model.is_inference() {
        None
    } else {
        Some(model.inference()?)
    })
}

/// Generates one caption per image (token ids without BOS/EOS). `inputs`: the images (a
/// `&Tensor`), or [`Inputs`] with retrieved captions for a retrieval-augmented model.
pub fn generate(
    model: &Captioner,
    inputs: impl Into<Inputs>,
    cfg: &DecodeConfig,
    seed: u64,
) -> Result<Vec<Vec<u32>>, DecodeError> {
    cfg.validate()?;
    let images = &inputs.into();
    let owned = inference(model)?;
    let m = owned.as_ref().unwrap_or(model);
    match cfg.strategy {
        Strategy::Greedy => greedy(m, images, cfg),
        Strategy::Beam => beam(m, images, cfg),
        Strategy::Nucleus => Ok(sample_rows(m, images, 1, cfg, seed)?),
    }
}

/// `k` nucleus/temperature samples per image (image-major), for SCST.
pub fn sample(
    model: &Captioner,
    inputs: impl Into<Inputs>,
    k: usize,
    cfg: &DecodeConfig,
    seed: u64,
) -> Result<Vec<Vec<Vec<u32>>>, DecodeError> {
    cfg.validate()?;
    let images = &inputs.into();
    if k == 0 {
        return Err(DecodeError::Config(
            "k samples per image must be at least 1".into(),
        ));
    }
    let owned = inference(model)?;
    let m = owned.as_ref().unwrap_or(model);
    let rows = sample_rows(m, images, k, cfg, seed)?;
    Ok(rows.chunks(k).map(|c| c.to_vec()).collect())
}

fn max_len(m: &Captioner, cfg: &DecodeConfig) -> usize {
    cfg.max_len.min(m.max_new_tokens())
}

fn greedy(
    m: &Captioner,
    images: &Inputs,
    cfg: &DecodeConfig,
) -> Result<Vec<Vec<u32>>, DecodeError> {
    let eos = m.config().eos_id;
    let (mut s, mut logits) = Session::begin(m, images, 1, cfg.kv_cache)?;
    let n = logits.len();
    let mut out = vec![Vec::new(); n];
    let mut done = vec![false; n];
    for step in 0..max_len(m, cfg) {
        let mut next = Vec::with_capacity(n);
        for (i, l) in logits.iter_mut().enumerate() {
            penalize(l, &out[i], cfg.repetition_penalty);
            log_softmax(l);
            let t = argmax(l);
            if !done[i] {
                if t == eos {
                    done[i] = true
                } else {
                    out[i].push(t)
                }
            }
            next.push(if done[i] { eos } else { t });
        }
        if done.iter().all(|&d| d) || step + 1 == max_len(m, cfg) {
            break;
        }
        logits = s.push(&next)?;
    }
    Ok(out)
}

fn sample_rows(
    m: &Captioner,
    images: &Inputs,
    k: usize,
    cfg: &DecodeConfig,
    seed: u64,
) -> Result<Vec<Vec<u32>>, DecodeError> {
    let eos = m.config().eos_id;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut s, mut logits) = Session::begin(m, images, k, cfg.kv_cache)?;
    let n = logits.len();
    let mut out = vec![Vec::new(); n];
    let mut done = vec![false; n];
    let ml = max_len(m, cfg);
    for step in 0..ml {
        let mut next = Vec::with_capacity(n);
        for (i, l) in logits.iter_mut().enumerate() {
            if done[i] {
                next.push(eos);
                continue;
            }
            penalize(l, &out[i], cfg.repetition_penalty);
            let t = nucleus(l, cfg.top_p, cfg.temperature, &mut rng);
            if t == eos {
                done[i] = true
            } else {
                out[i].push(t)
            }
            next.push(t);
        }
        if done.iter().all(|&d| d) || step + 1 == ml {
            break;
        }
        logits = s.push(&next)?;
    }
    Ok(out)
}

/// Samples from the smallest set of top tokens whose probability reaches `top_p`.
fn nucleus(logits: &[f32], top_p: f64, temperature: f64, rng: &mut ChaCha8Rng) -> u32 {
    let t = temperature as f32;
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, (((l - m) / t) as f64).exp()))
        .collect();
    let z: f64 = p.iter().map(|x| x.1).sum();
    p.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut cum = 0.0;
    let mut keep = p.len();
    for (j, x) in p.iter().enumerate() {
        cum += x.1 / z;
        if cum >= top_p {
            keep = j + 1;
            break;
        }
    }
    let kept = &p[..keep];
    let mass: f64 = kept.iter().map(|x| x.1).sum();
    let mut u = rng.gen::<f64>() * mass;
    for x in kept {
        u -= x.1;
        if u <= 0.0 {
            return x.0;
        }
    }
    kept[kept.len() - 1].0
}

struct Hyp {
    tokens: Vec<u32>,
    score: f64,
}

fn beam(m: &Captioner, images: &Inputs, cfg: &DecodeConfig) -> Result<Vec<Vec<u32>>, DecodeError> {
    let eos = m.config().eos_id;
    let w = cfg.beam_width;
    let (mut s, mut logits) = Session::begin(m, images, w, cfg.kv_cache)?;
    let b = logits.len() / w;
    // Only the first beam of each image is live at the start (all beams are identical).
    let mut scores: Vec<f64> = (0..b * w)
        .map(|r| if r % w == 0 { 0.0 } else { f64::NEG_INFINITY })
        .collect();
    let mut finished: Vec<Vec<Hyp>> = (0..b).map(|_| Vec::new()).collect();
    let mut done = vec![false; b];
    let ml = max_len(m, cfg);
    let norm = |len: usize, sc: f64| sc / (len.max(1) as f64).powf(cfg.length_penalty);
    for step in 0..ml {
        let mut rows = Vec::with_capacity(b * w);
        let mut next = Vec::with_capacity(b * w);
        let mut new_scores = Vec::with_capacity(b * w);
        for img in 0..b {
            if done[img] {
                for j in 0..w {
                    rows.push((img * w + j) as u32);
                    next.push(eos);
                    new_scores.push(f64::NEG_INFINITY);
                }
                continue;
            }
            // Only the best 2w candidates of the image are ever read, and each of them is among
            // the best 2w of its own row: keep those per row (a bounded insertion while scanning
            // the vocabulary), then order the at most w x 2w kept ones. The comparator is a total
            // order, so this equals sorting every (row, token) candidate.
            let order = |a: &(f64, usize, u32), c: &(f64, usize, u32)| -> std::cmp::Ordering {
                c.0.total_cmp(&a.0).then(a.1.cmp(&c.1)).then(a.2.cmp(&c.2))
            };
            let mut cand: Vec<(f64, usize, u32)> = Vec::with_capacity(2 * w * w);
            for j in 0..w {
                let r = img * w + j;
                if scores[r] == f64::NEG_INFINITY {
                    continue;
                }
                let l = &mut logits[r];
                penalize(l, &s.hist[r], cfg.repetition_penalty);
                // log_softmax, applied only to the tokens looked at (same arithmetic).
                let lse = log_sum_exp(l);
                let row_start = cand.len();
                for (v, &x) in l.iter().enumerate() {
                    let c = (scores[r] + (x - lse) as f64, r, v as u32);
                    let best = &cand[row_start..];
                    if best.len() == 2 * w {
                        if order(&c, &best[2 * w - 1]) != std::cmp::Ordering::Less {
                            continue;
                        }
                        cand.pop();
                    }
                    let best = &cand[row_start..];
                    let at = row_start + best.partition_point(|b| order(b, &c).is_lt());
                    cand.insert(at, c);
                }
            }
            if cand.len() > 2 * w {
                cand.select_nth_unstable_by(2 * w, order);
                cand.truncate(2 * w);
            }
            cand.sort_by(order);
            let mut kept = 0;
            for (rank, &(sc, r, v)) in cand.iter().take(2 * w).enumerate() {
                if v == eos {
                    if rank < w {
                        finished[img].push(Hyp {
                            tokens: s.hist[r].clone(),
                            score: norm(s.hist[r].len() + 1, sc),
                        });
                    }
                } else if kept < w {
                    rows.push(r as u32);
                    next.push(v);
                    new_scores.push(sc);
                    kept += 1;
                }
            }
            while kept < w {
                rows.push((img * w) as u32);
                next.push(eos);
                new_scores.push(f64::NEG_INFINITY);
                kept += 1;
            }
            if finished[img].len() >= w {
                done[img] = true;
            }
        }
        scores = new_scores;
        if done.iter().all(|&d| d) {
            break;
        }
        s.select(&rows)?;
        if step + 1 == ml {
            for (r, h) in s.hist.iter().enumerate() {
                if scores[r] > f64::NEG_INFINITY && !done[r / w] {
                    let mut t = h.clone();
                    t.push(next[r]);
                    finished[r / w].push(Hyp {
                        score: norm(t.len(), scores[r]),
                        tokens: t,
                    });
                }
            }
            break;
        }
        logits = s.push(&next)?;
    }
    Ok(finished
        .into_iter()
        .map(|f| {
            f.into_iter()
                .reduce(|a, c| if c.score > a.score { c } else { a })
                .map(|h| h.tokens)
                .unwrap_or_default()
        })
        .collect())
}
