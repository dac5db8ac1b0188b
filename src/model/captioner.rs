//! [`Captioner`]: one built model (backbone x fusion x PEFT, for one phase) with its parameter
//! store: the training interface (loss, sequence log-probs, trainable variables, checkpoints)
//! and the decoding interface (`begin` / `step` over a KV cache).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var, D};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::config::{Fusion, ModelConfig, PeftConfig, Phase};
use super::connector::Visual;
use super::lm::{Lm, LmState};
use super::ops::{self, Fwd};
use super::params::{Builder, Component, ParamStore, Policy};
use super::ModelError;

/// A trainable tensor with what the optimiser needs to group it.
#[derive(Debug, Clone)]
pub struct TrainableVar {
    pub name: String,
    pub var: Var,
    pub component: Component,
    /// Weight decay applies (matrices of linears only; not norms, biases, embeddings, gates).
    pub decay: bool,
}

/// Parameter and memory accounting.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ParamCounts {
    pub trainable: usize,
    pub total: usize,
    /// Bytes of the frozen tensors as held (4-bit where QLoRA quantized them).
    pub frozen_bytes: usize,
    /// Bytes the same frozen tensors would take in f32.
    pub frozen_f32_bytes: usize,
    /// component -> (trainable, total).
    pub by_component: BTreeMap<Component, (usize, usize)>,
}

#[derive(Debug, Clone)]
struct Net {
    visual: Visual,
    lm: Lm,
    nv: usize,
}

/// What captions are conditioned on: images and, for a model built with `retrieved > 0`
/// (`model.retrieve`), the token ids of the captions retrieved for each image. A `&Tensor` of
/// images converts into one without a prompt.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// (B,3,H,W) f32.
    pub images: Tensor,
    /// (B,P) u32: each image's retrieved captions, each closed by EOS, padded with the pad id
    /// (see [`prompt_tensor`]).
    pub prompt: Option<Tensor>,
}

impl From<&Tensor> for Inputs {
    fn from(images: &Tensor) -> Self {
        Inputs {
            images: images.clone(),
            prompt: None,
        }
    }
}

impl From<&Inputs> for Inputs {
    fn from(x: &Inputs) -> Self {
        x.clone()
    }
}

impl Inputs {
    pub fn new(images: Tensor, prompt: Option<Tensor>) -> Self {
        Inputs { images, prompt }
    }

    /// Rows `idx` (u32 indices).
    pub fn select(&self, idx: &Tensor) -> candle_core::Result<Inputs> {
        Ok(Inputs {
            images: self.images.index_select(idx, 0)?,
            prompt: self
                .prompt
                .as_ref()
                .map(|p| p.index_select(idx, 0))
                .transpose()?,
        })
    }

    /// Each row `k` times consecutively.
    pub fn repeat(&self, k: usize) -> candle_core::Result<Inputs> {
        Ok(Inputs {
            images: repeat_rows(&self.images, k)?,
            prompt: self
                .prompt
                .as_ref()
                .map(|p| repeat_rows(p, k))
                .transpose()?,
        })
    }
}

/// The (B,P) prompt of retrieved captions: row `i` holds `prompts[i]` (already EOS-closed token
/// ids), left-padded with `pad` to the longest row (at least one column), so that every prompt
/// ends right before the caption's BOS.
pub fn prompt_tensor(prompts: &[&[u32]], pad: u32, device: &Device) -> candle_core::Result<Tensor> {
    let p = prompts.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(prompts.len() * p);
    for r in prompts {
        ids.extend(std::iter::repeat_n(pad, p - r.len()));
        ids.extend_from_slice(r);
    }
    Tensor::from_vec(ids, (prompts.len(), p), device)
}

pub struct Captioner {
    cfg: ModelConfig,
    policy: Policy,
    store: Mutex<ParamStore>,
    /// Always built, except while [`Captioner::refill`] replaces the store's tensors.
    net: Option<Net>,
    device: Device,
    dropout_rng: Mutex<ChaCha8Rng>,
}

impl std::fmt::Debug for Captioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Captioner")
            .field("cfg", &self.cfg)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

fn build(store: &Mutex<ParamStore>, policy: &Policy, cfg: &ModelConfig) -> Result<Net, ModelError> {
    let vision = Builder::root(store, policy, Component::Vision).pp("vision");
    let conn = Builder::root(store, policy, Component::Connector).pp("connector");
    let visual = Visual::new(&vision, &conn, cfg)?;
    let nv = visual.num_tokens(cfg);
    // Decoder positions before the caption: the visual prefix (early fusion), then the
    // retrieved captions.
    let prefix = if cfg.fusion == Fusion::Early { nv } else { 0 } + cfg.prompt_len();
    let lm = Lm::new(
        &Builder::root(store, policy, Component::Lm).pp("lm"),
        cfg,
        prefix + cfg.max_caption_len + 2,
    )?;
    Ok(Net { visual, lm, nv })
}

impl Captioner {
    pub fn new(
        cfg: &ModelConfig,
        peft: &PeftConfig,
        phase: Phase,
        device: &Device,
    ) -> Result<Self, ModelError> {
        cfg.validate()?;
        peft.validate()?;
        let policy = Policy {
            phase,
            peft: peft.clone(),
            pretrained: cfg.pretrained,
            inference: false,
            unfrozen: cfg.align_unfreeze.clone(),
        };
        let store = Mutex::new(ParamStore::new(device, cfg.seed));
        let net = build(&store, &policy, cfg)?;
        Ok(Self {
            cfg: cfg.clone(),
            policy,
            store,
            net: Some(net),
            device: device.clone(),
            dropout_rng: Mutex::new(ChaCha8Rng::seed_from_u64(cfg.seed)),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    pub fn peft(&self) -> &PeftConfig {
        &self.policy.peft
    }
    pub fn phase(&self) -> Phase {
        self.policy.phase
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn is_inference(&self) -> bool {
        self.policy.inference
    }
    /// Visual tokens per image.
    pub fn num_visual_tokens(&self) -> usize {
        self.net().nv
    }

    /// Reseeds the LoRA-dropout generator (the trainer calls this per stage for determinism).
    pub fn set_dropout_seed(&self, seed: u64) {
        *self.dropout_rng.lock().unwrap_or_else(|e| e.into_inner()) =
            ChaCha8Rng::seed_from_u64(seed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ParamStore> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn net(&self) -> &Net {
        self.net
            .as_ref()
            .expect("the model is rebuilt before refill returns")
    }

    /// Replaces tensors of the store through `fill`, then rebuilds the model on them. The
    /// built model holds the tensors it was built from, so it is dropped first: each replaced
    /// tensor is then freed as its successor arrives, instead of the whole model being held
    /// twice while loading (8.5 GB instead of 4.1 for a 1B model's f32 base). The model is
    /// rebuilt whether or not `fill` succeeded.
    fn refill(
        &mut self,
        fill: impl FnOnce(&Mutex<ParamStore>) -> Result<usize, ModelError>,
    ) -> Result<usize, ModelError> {
        self.net = None;
        let filled = fill(&self.store);
        self.net = Some(build(&self.store, &self.policy, &self.cfg)?);
        filled
    }

    /// A copy for decoding: every tensor a detached constant sharing storage with this model
    /// (so no autograd graph is recorded), LoRA merged into its base, QLoRA bases dequantized.
    pub fn inference(&self) -> Result<Captioner, ModelError> {
        let policy = Policy {
            inference: true,
            ..self.policy.clone()
        };
        let store = Mutex::new(self.lock().detached());
        let net = build(&store, &policy, &self.cfg)?;
        Ok(Captioner {
            cfg: self.cfg.clone(),
            policy,
            store,
            net: Some(net),
            device: self.device.clone(),
            dropout_rng: Mutex::new(ChaCha8Rng::seed_from_u64(self.cfg.seed)),
        })
    }

    /// All trainable tensors, in name order.
    pub fn trainable_vars(&self) -> Vec<TrainableVar> {
        self.lock()
            .entries
            .iter()
            .filter_map(|(name, e)| {
                e.var().map(|v| TrainableVar {
                    name: name.clone(),
                    var: v.clone(),
                    component: e.component,
                    decay: e.decay,
                })
            })
            .collect()
    }

    pub fn counts(&self) -> ParamCounts {
        let store = self.lock();
        let mut c = ParamCounts {
            trainable: 0,
            total: 0,
            frozen_bytes: 0,
            frozen_f32_bytes: 0,
            by_component: BTreeMap::new(),
        };
        for e in store.entries.values() {
            let n = e.elem_count();
            c.total += n;
            let slot = c.by_component.entry(e.component).or_insert((0, 0));
            slot.1 += n;
            if e.var().is_some() {
                c.trainable += n;
                slot.0 += n;
            } else {
                c.frozen_bytes += e.bytes();
                c.frozen_f32_bytes += 4 * n;
            }
        }
        c
    }

    /// Writes the trainable tensors (only) as safetensors.
    pub fn save_trained(&self, path: &Path) -> Result<(), ModelError> {
        let map: HashMap<String, Tensor> = self
            .trainable_vars()
            .into_iter()
            .map(|t| (t.name, t.var.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&map, path).map_err(|source| ModelError::Checkpoint {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Writes every base tensor (trained and frozen, dequantized): the align output when the
    /// frozen part came from a real checkpoint rather than from the seed, so later stages
    /// rebuild the model from this file alone.
    pub fn save_base(&self, path: &Path) -> Result<(), ModelError> {
        let map = {
            let store = self.lock();
            store
                .entries
                .iter()
                .filter(|(_, e)| e.base)
                .map(|(k, e)| Ok((k.clone(), e.tensor(&store.device)?)))
                .collect::<Result<HashMap<String, Tensor>, ModelError>>()?
        };
        candle_core::safetensors::save(&map, path).map_err(|source| ModelError::Checkpoint {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Every tensor as decoding uses it, for an export: each LoRA pair folded into its base
    /// weight with the very expression [`Captioner::inference`] folds it with (so the merged
    /// model decodes bit for bit as the unmerged one), 4-bit bases dequantized. Bottleneck
    /// adapters stay separate tensors: a GELU between their two linears keeps them from
    /// folding into anything. The result loads into a model built with
    /// [`PeftConfig::merged`] through [`Captioner::load_all`].
    pub fn merged_tensors(&self) -> Result<BTreeMap<String, Tensor>, ModelError> {
        let store = self.lock();
        let scale = self.policy.peft.alpha / self.policy.peft.rank as f64;
        let mut out = BTreeMap::new();
        for (name, e) in &store.entries {
            if name.ends_with(".lora_a") || name.ends_with(".lora_b") {
                continue;
            }
            let mut t = e.tensor(&store.device)?;
            if let Some(layer) = name.strip_suffix(".weight") {
                let a = store.entries.get(&format!("{layer}.lora_a"));
                let b = store.entries.get(&format!("{layer}.lora_b"));
                if let (Some(a), Some(b)) = (a, b) {
                    let (a, b) = (a.tensor(&store.device)?, b.tensor(&store.device)?);
                    t = (t + (b.matmul(&a)? * scale)?)?;
                }
            }
            out.insert(name.clone(), t.detach());
        }
        Ok(out)
    }

    /// Loads the frozen base written by an earlier stage; every base tensor must be present.
    pub fn load_base(&mut self, path: &Path) -> Result<usize, ModelError> {
        self.load(path, true)
    }

    /// Loads tensors trained by an earlier stage (PEFT and/or base tensors of this model).
    pub fn load_trained(&mut self, path: &Path) -> Result<usize, ModelError> {
        self.load(path, false)
    }

    /// Loads the tensors of `component` (the vision tower or the LM) from a foundation stage's
    /// weights: every base tensor of this model's component must be there with its shape
    /// (cross-attention layers inside the LM belong to the connector and keep their
    /// initialisation); tensors this model does not build (blocks past the one its connector
    /// reads) are skipped. Returns how many tensors were set.
    pub fn load_foundation(
        &mut self,
        path: &Path,
        component: Component,
    ) -> Result<usize, ModelError> {
        let err = |source| ModelError::Checkpoint {
            path: path.to_path_buf(),
            source,
        };
        let tensors = candle_core::safetensors::load(path, &self.device).map_err(err)?;
        self.refill(|store| {
            let mut store = store.lock().unwrap_or_else(|e| e.into_inner());
            let wanted: Vec<String> = store
                .entries
                .iter()
                .filter(|(_, e)| e.base && e.component == component)
                .map(|(k, _)| k.clone())
                .collect();
            if let Some(first) = wanted.iter().find(|k| !tensors.contains_key(*k)) {
                return Err(ModelError::MissingTensors {
                    path: path.to_path_buf(),
                    count: wanted.iter().filter(|k| !tensors.contains_key(*k)).count(),
                    example: first.clone(),
                });
            }
            for name in &wanted {
                let e = store.entries.get_mut(name).expect("listed above");
                assign(e, name, &tensors[name], path)?;
            }
            Ok(wanted.len())
        })
    }

    /// Writes the trainable tensors of one component (the LM alone, for `pretrain-lm`).
    pub fn save_component(&self, path: &Path, component: Component) -> Result<(), ModelError> {
        let map: HashMap<String, Tensor> = self
            .trainable_vars()
            .into_iter()
            .filter(|t| t.component == component)
            .map(|t| (t.name, t.var.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&map, path).map_err(|source| ModelError::Checkpoint {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Loads a real pretrained checkpoint ([`super::hf`]): the LM and the vision tower where
    /// the checkpoint has them, and the `llava` projector from a LLaVA checkpoint; every one of
    /// those tensors must be there with the shape its `config.json` implies. Returns how many
    /// of our tensors were set. Build the model from [`super::hf::Checkpoint::model_config`].
    pub fn load_pretrained(&mut self, ck: &super::hf::Checkpoint) -> Result<usize, ModelError> {
        let backbone = self.cfg.backbone;
        self.refill(|store| super::hf::fill_store(store, ck, backbone))
    }

    /// Logits (B,T,V) of the decoder on text alone (no visual tokens, no cross-attention):
    /// what a causal-LM checkpoint computes, for checking it against its reference.
    pub fn lm_logits(&self, input_ids: &Tensor) -> Result<Tensor, ModelError> {
        self.check_ids(input_ids)?;
        let fwd = self.fwd(false);
        let emb = self.net().lm.embed(input_ids)?;
        let h = self.net().lm.forward(&emb, &[], None, fwd)?;
        Ok(self.net().lm.logits(&h, fwd)?)
    }

    fn load(&mut self, path: &Path, base_only: bool) -> Result<usize, ModelError> {
        // Tensor by tensor from a memory map (see `hf::weights`): a QLoRA base is quantized as
        // each tensor arrives, so the f32 base file is never held whole.
        let file = super::hf::weights::Weights::file(path)?;
        let names: Vec<String> = file.names().map(str::to_string).collect();
        let device = self.device.clone();
        // The rebuild in `refill` makes constants (and 4-bit copies) pick up the loaded values.
        self.refill(|store| {
            let mut reader = file.reader(&device);
            let mut store = store.lock().unwrap_or_else(|e| e.into_inner());
            for name in &names {
                let Some(e) = store.entries.get_mut(name).filter(|e| e.base || !base_only) else {
                    let what = if base_only { "base" } else { "known" };
                    return Err(ModelError::UnknownTensor {
                        path: path.to_path_buf(),
                        name: name.clone(),
                        what,
                    });
                };
                assign(e, name, &reader.read(name)?, path)?;
            }
            if base_only {
                let missing: Vec<&String> = store
                    .entries
                    .iter()
                    .filter(|(k, e)| e.base && names.binary_search(k).is_err())
                    .map(|(k, _)| k)
                    .collect();
                if let Some(first) = missing.first() {
                    return Err(ModelError::MissingTensors {
                        path: path.to_path_buf(),
                        count: missing.len(),
                        example: (*first).clone(),
                    });
                }
            }
            Ok(names.len())
        })
    }

    /// Sets every tensor of the model from `tensors` (read from `path`, which errors name):
    /// the whole model, as an export holds it ([`Captioner::merged_tensors`] written out);
    /// a tensor missing or unknown to this model is an error.
    pub fn load_all(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        path: &Path,
    ) -> Result<usize, ModelError> {
        let missing: Vec<String> = self
            .lock()
            .entries
            .keys()
            .filter(|k| !tensors.contains_key(*k))
            .cloned()
            .collect();
        if let Some(first) = missing.first() {
            return Err(ModelError::MissingTensors {
                path: path.to_path_buf(),
                count: missing.len(),
                example: first.clone(),
            });
        }
        self.refill(|store| {
            let mut store = store.lock().unwrap_or_else(|e| e.into_inner());
            for (name, t) in tensors {
                let Some(e) = store.entries.get_mut(name) else {
                    return Err(ModelError::UnknownTensor {
                        path: path.to_path_buf(),
                        name: name.clone(),
                        what: "known",
                    });
                };
                assign(e, name, t, path)?;
            }
            Ok(tensors.len())
        })
    }

    fn fwd(&self, train: bool) -> Fwd<'_> {
        Fwd {
            train: train && !self.policy.inference,
            rng: Some(&self.dropout_rng),
        }
    }

    fn check_images(&self, images: &Tensor) -> Result<usize, ModelError> {
        let s = self.cfg.input_size();
        match images.dims() {
            [b, 3, h, w] if *h == s && *w == s => Ok(*b),
            d => Err(ModelError::Input(format!(
                "images must be (B,3,{s},{s}) f32, got {d:?}"
            ))),
        }
    }

    /// Visual tokens (B, Nv, D_lm).
    pub fn visual_tokens(&self, images: &Tensor, train: bool) -> Result<Tensor, ModelError> {
        self.check_images(images)?;
        Ok(self.net().visual.forward(images, self.fwd(train))?)
    }

    /// What the caption is conditioned on: the visual tokens (B,Nv,D_lm) and, for retrieval
    /// augmentation, the embedded retrieved-caption prompt (B,P,D_lm), which the decoder reads
    /// as text before BOS (in its self-attention, as SmallCap does), whatever the fusion.
    fn condition(&self, x: &Inputs, train: bool) -> Result<(Tensor, Option<Tensor>), ModelError> {
        let vis = self.visual_tokens(&x.images, train)?;
        let prompt = match (self.cfg.retrieved, &x.prompt) {
            (0, None) => None,
            (1.., Some(p)) => {
                let (b, n) = p.dims2().map_err(|_| {
                    ModelError::Input(format!("prompt ids must be (B,P), got {:?}", p.dims()))
                })?;
                let most = self.cfg.prompt_len();
                if b != vis.dim(0)? || n == 0 || n > most || p.dtype() != DType::U32 {
                    return Err(ModelError::Input(format!(
                        "prompt ids must be u32 (B={},P) with 1 <= P <= {most}, got {:?} {:?}",
                        vis.dim(0)?,
                        p.dtype(),
                        p.dims()
                    )));
                }
                Some(self.net().lm.embed(p)?)
            }
            (0, Some(_)) => {
                return Err(ModelError::Input(
                    "retrieved captions were given to a model built without model.retrieve".into(),
                ))
            }
            (r @ 1.., None) => {
                return Err(ModelError::Input(format!(
                    "this model reads {r} retrieved caption(s) per image (model.retrieve) and \
                     none were given"
                )))
            }
        };
        Ok((vis, prompt))
    }

    /// The decoder's self-attention input: [visual tokens (early fusion)] [prompt] `text`, with
    /// the cross-attention memory (late / multilevel); and how many positions precede `text`.
    #[expect(
        clippy::type_complexity,
        reason = "private helper returning three parts"
    )]
    fn sequence(
        &self,
        vis: &Tensor,
        prompt: Option<&Tensor>,
        text: &Tensor,
        fwd: Fwd<'_>,
    ) -> Result<(Tensor, Vec<Option<(Tensor, Tensor)>>, usize), ModelError> {
        let mut parts: Vec<&Tensor> = Vec::with_capacity(3);
        let mem = if self.cfg.fusion == Fusion::Early {
            parts.push(vis);
            Vec::new()
        } else {
            self.net().lm.memory(vis, fwd)?
        };
        parts.extend(prompt);
        let before = parts
            .iter()
            .map(|p| p.dim(1))
            .sum::<candle_core::Result<usize>>()?;
        parts.push(text);
        let x = if parts.len() == 1 {
            text.clone()
        } else {
            Tensor::cat(&parts, 1)?
        };
        Ok((x, mem, before))
    }

    /// Text-position logits (B,T,V) for teacher-forced `input_ids` (B,T) given the condition.
    fn text_logits(
        &self,
        vis: &Tensor,
        prompt: Option<&Tensor>,
        input_ids: &Tensor,
        train: bool,
    ) -> Result<Tensor, ModelError> {
        let fwd = self.fwd(train);
        let t = input_ids.dim(1)?;
        let emb = self.net().lm.embed(input_ids)?;
        let (x, mem, before) = self.sequence(vis, prompt, &emb, fwd)?;
        let hidden = self.net().lm.forward(&x, &mem, None, fwd)?;
        let hidden = if before > 0 {
            hidden.narrow(1, before, t)?
        } else {
            hidden
        };
        Ok(self.net().lm.logits(&hidden, fwd)?)
    }

    /// Full-recompute logits (B,T,V) (evaluation mode); decoding tests compare the KV cache to it.
    pub fn logits(&self, x: impl Into<Inputs>, input_ids: &Tensor) -> Result<Tensor, ModelError> {
        self.check_ids(input_ids)?;
        let (vis, prompt) = self.condition(&x.into(), false)?;
        self.text_logits(&vis, prompt.as_ref(), input_ids, false)
    }

    fn check_ids(&self, ids: &Tensor) -> Result<(), ModelError> {
        let (_, t) = ids.dims2().map_err(|_| {
            ModelError::Input(format!("token ids must be (B,T), got {:?}", ids.dims()))
        })?;
        if t > self.cfg.max_caption_len + 2 {
            return Err(ModelError::Input(format!(
                "{t} tokens exceed max_caption_len + 2 = {}",
                self.cfg.max_caption_len + 2
            )));
        }
        if ids.dtype() != DType::U32 {
            return Err(ModelError::Input(format!(
                "token ids must be u32, got {:?}",
                ids.dtype()
            )));
        }
        Ok(())
    }

    /// Teacher-forced cross-entropy: `input_ids`/`target_ids` (B,T) u32, `mask` (B,T) (1 = scored).
    pub fn loss(
        &self,
        x: impl Into<Inputs>,
        input_ids: &Tensor,
        target_ids: &Tensor,
        mask: &Tensor,
        label_smoothing: f64,
    ) -> Result<Tensor, ModelError> {
        self.check_ids(input_ids)?;
        if target_ids.dims() != input_ids.dims() || mask.dims() != input_ids.dims() {
            return Err(ModelError::Input(
                "input_ids, target_ids and mask must have one shape".into(),
            ));
        }
        let (vis, prompt) = self.condition(&x.into(), true)?;
        let logits = self.text_logits(&vis, prompt.as_ref(), input_ids, true)?;
        let v = logits.dim(D::Minus1)?;
        Ok(ops::cross_entropy(
            &logits.reshape(((), v))?,
            &target_ids.flatten_all()?,
            &mask.flatten_all()?,
            label_smoothing,
        )?)
    }

    /// Sum of token log-probs (with gradient) of each caption given its image, EOS included.
    /// `seqs` holds `per_image` captions per image, image-major; tokens exclude BOS/EOS.
    pub fn log_probs(
        &self,
        x: impl Into<Inputs>,
        seqs: &[Vec<u32>],
        per_image: usize,
    ) -> Result<Tensor, ModelError> {
        let x = x.into();
        let b = self.check_images(&x.images)?;
        if per_image == 0 || seqs.len() != b * per_image {
            return Err(ModelError::Input(format!(
                "{} sequences for {b} images x {per_image}",
                seqs.len()
            )));
        }
        let seqs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let TeacherForcing {
            input: inp,
            target: tgt,
            mask: msk,
            len: t,
        } = TeacherForcing::new(&self.cfg, &seqs);
        let n = seqs.len();
        let inp = Tensor::from_vec(inp, (n, t), &self.device)?;
        let tgt = Tensor::from_vec(tgt, (n * t, 1), &self.device)?;
        let msk = Tensor::from_vec(msk, (n, t), &self.device)?;
        let (vis, prompt) = self.condition(&x, true)?;
        let vis = repeat_rows(&vis, per_image)?;
        let prompt = prompt.map(|p| repeat_rows(&p, per_image)).transpose()?;
        let logits = self.text_logits(&vis, prompt.as_ref(), &inp, true)?;
        let v = logits.dim(D::Minus1)?;
        let lp = ops::log_softmax_last(&logits.reshape((n * t, v))?)?
            .gather(&tgt, 1)?
            .reshape((n, t))?;
        Ok((lp * msk)?.sum(1)?)
    }

    /// Starts decoding: encodes `images`, repeats each `repeat` times (image-major), feeds the
    /// visual prefix (early fusion) and BOS; returns next-token logits (N,V) and the cache.
    pub fn begin(
        &self,
        x: impl Into<Inputs>,
        repeat: usize,
    ) -> Result<(Tensor, LmState), ModelError> {
        let (vis, prompt) = self.condition(&x.into(), false)?;
        let vis = repeat_rows(&vis, repeat.max(1))?;
        let prompt = prompt.map(|p| repeat_rows(&p, repeat.max(1))).transpose()?;
        let n = vis.dim(0)?;
        let fwd = self.fwd(false);
        let bos = Tensor::full(self.cfg.bos_id, (n, 1), &self.device)?;
        let emb = self.net().lm.embed(&bos)?;
        let (x, mem, _) = self.sequence(&vis, prompt.as_ref(), &emb, fwd)?;
        let mut state = self.net().lm.new_state(if mem.is_empty() {
            vec![None; self.cfg.lm.depth]
        } else {
            mem
        });
        let h = self.net().lm.forward(&x, &[], Some(&mut state), fwd)?;
        let last = h.narrow(1, h.dim(1)? - 1, 1)?;
        Ok((self.net().lm.logits(&last, fwd)?.squeeze(1)?, state))
    }

    /// Feeds one token per row; returns next-token logits (N,V).
    pub fn step(&self, tokens: &[u32], state: &mut LmState) -> Result<Tensor, ModelError> {
        let fwd = self.fwd(false);
        let ids = Tensor::from_vec(tokens.to_vec(), (tokens.len(), 1), &self.device)?;
        let h = self
            .net()
            .lm
            .forward(&self.net().lm.embed(&ids)?, &[], Some(state), fwd)?;
        Ok(self.net().lm.logits(&h, fwd)?.squeeze(1)?)
    }

    /// Largest number of generated tokens the position table allows after BOS.
    pub fn max_new_tokens(&self) -> usize {
        self.cfg.max_caption_len + 1
    }
}

/// Sets store entry `name` to the loaded tensor `t` (as f32), which must have the entry's
/// shape (see [`super::params::Entry::set`]: a 4-bit entry is quantized at once).
fn assign(
    e: &mut super::params::Entry,
    name: &str,
    t: &Tensor,
    path: &Path,
) -> Result<(), ModelError> {
    let err = |source| ModelError::Checkpoint {
        path: path.to_path_buf(),
        source,
    };
    let t = t.to_dtype(DType::F32).map_err(err)?;
    let expected = e.dims();
    if t.dims() != expected.as_slice() {
        return Err(ModelError::Shape {
            name: name.to_string(),
            expected,
            found: t.dims().to_vec(),
        });
    }
    e.set(t).map_err(err)
}

/// Repeats each row `k` times consecutively (image-major expansion for k samples / beams).
pub fn repeat_rows(x: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    if k == 1 {
        return Ok(x.clone());
    }
    let n = x.dim(0)?;
    let idx: Vec<u32> = (0..n as u32)
        .flat_map(|i| std::iter::repeat_n(i, k))
        .collect();
    x.index_select(&Tensor::from_vec(idx, n * k, x.device())?, 0)
}

/// The teacher-forcing layout of captions (token ids without BOS/EOS), each cut to
/// `max_caption_len`: input `[BOS] + tokens`, target `tokens + [EOS]`, padded with the pad id to
/// the longest, and a mask of the scored positions; row-major `(seqs, len)`.
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherForcing {
    pub input: Vec<u32>,
    pub target: Vec<u32>,
    pub mask: Vec<f32>,
    /// Positions per row: the longest (cut) caption plus one.
    pub len: usize,
}

impl TeacherForcing {
    pub fn new(cfg: &ModelConfig, seqs: &[&[u32]]) -> Self {
        let maxc = cfg.max_caption_len;
        let seqs: Vec<&[u32]> = seqs.iter().map(|s| &s[..s.len().min(maxc)]).collect();
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0) + 1;
        let n = seqs.len() * t;
        let (mut input, mut target, mut mask) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for s in &seqs {
            for j in 0..t {
                input.push(if j == 0 {
                    cfg.bos_id
                } else {
                    s.get(j - 1).copied().unwrap_or(cfg.pad_id)
                });
                target.push(if j < s.len() {
                    s[j]
                } else if j == s.len() {
                    cfg.eos_id
                } else {
                    cfg.pad_id
                });
                mask.push(if j <= s.len() { 1.0 } else { 0.0 });
            }
        }
        TeacherForcing {
            input,
            target,
            mask,
            len: t,
        }
    }
}
