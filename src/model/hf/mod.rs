//! Real pretrained checkpoints from a local directory in Hugging Face layout: `config.json`
//! plus `model.safetensors` or the shards listed by `model.safetensors.index.json`. No network,
//! no model hub: the directory is read as it is.
//!
//! Each checkpoint family (one `architectures[0]` class) is a [`Family`] in its own file: it
//! detects its class, turns `config.json` into our configuration ([`Parts`]: the decoder, the
//! vision tower and the connector it has) and maps our tensor names onto its keys. Decoders and
//! towers that several families contain have their own files too:
//! - [`llama`]: LLaMA-family decoders (`LlamaForCausalLM`; the shared text config),
//! - [`phi3`]: Phi-3 decoders (`Phi3ForCausalLM`; fused projections, LongRoPE),
//! - [`opt`]: OPT decoders (`OPTForCausalLM`; BLIP-2's LM),
//! - [`clip`]: CLIP vision towers (`CLIPVisionModel`),
//! - [`llava`]: `LlavaForConditionalGeneration` (LLaVA-1.5 layout: CLIP tower + LLaMA/Phi-3 LM
//!   + MLP projector), for any backbone of a sweep (the projector only for `llava`),
//! - [`blip2`]: `Blip2ForConditionalGeneration` with an OPT LM (BLIP-2's tower, Q-Former,
//!   `query_tokens`, `language_projection`), for `blip2` models only ([`Checkpoint::backbone`]),
//! - [`phi3v`]: `Phi3VForCausalLM` (Phi-3-Vision: CLIP tower + Phi-3 LM + HD connector with its
//!   separators), for `phi3v` models only.
//!
//! A sweep accepts the families with both a tower and an LM (LLaVA, BLIP-2, Phi-3-Vision).
//!
//! [`weights`] indexes the files and reads tensors through memory maps, one at a time.
//! Adding a family means a file with a [`Family`] and a line in [`FAMILIES`].
//!
//! Rejected with an error naming the file and the key: other architectures, RoPE scaling other
//! than LongRoPE, attention/MLP biases in LLaMA-family LMs, activations other than SiLU
//! (LLaMA, Phi-3), ReLU (OPT), quick/exact GELU (CLIP) and exact GELU (BLIP-2's tower and
//! Q-Former), BLIP-2 with a language model other than OPT (Flan-T5), a `head_dim` other than
//! `hidden_size / heads`, CLIP LayerNorm eps other than 1e-5, post-LN OPT, other LLaVA feature
//! layers or selection strategies, Phi-3-Vision options other than its published HD layout
//! (see [`phi3v`]). Weights of any float dtype are read as f32; a QLoRA model
//! quantizes its frozen base as each tensor is read ([`fill_store`]).

mod blip2;
mod cfg;
mod clip;
mod llama;
mod llava;
mod opt;
mod phi3;
mod phi3v;
pub(crate) mod weights;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{Device, Tensor};
use serde_json::Value;

use super::config::{Backbone, Fusion, ModelConfig, PeftConfig, Phase, VisionConfig};
use super::ops::Fwd;
use super::params::{Builder, Component, ParamStore, Policy};
use super::vit::Vit;
use super::ModelError;
use cfg::{read_json, Cfg};
use weights::{Reader, Weights};

/// Problems with a checkpoint directory; every message names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{path}: {source}")]
    Safetensors {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("{dir}: tensor {key} is missing (looked in {files})")]
    Missing {
        dir: PathBuf,
        key: String,
        files: String,
    },
    #[error("{path}: tensor {key} has shape {found:?}, config.json implies {expected:?}")]
    Shape {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{dir}: this checkpoint has no weights for {name} (a {what} tensor of our model)")]
    NotMapped {
        dir: PathBuf,
        name: String,
        what: &'static str,
    },
}

/// What a checkpoint holds, located in its files: a decoder, a vision tower, a connector.
#[derive(Debug, Clone, Default)]
pub(crate) struct Parts {
    text: Option<llama::Text>,
    vision: Option<clip::Vision>,
    projector: Option<llava::Projector>,
    /// BLIP-2's Q-Former, queries and projection.
    qformer: Option<blip2::Connector>,
}

/// One checkpoint family: detect (its `architectures[0]` class), configure (`config.json` ->
/// [`Parts`]) and map keys (the decoder and tower map themselves; a family adds its connector).
pub(crate) trait Family: Sync {
    /// The `architectures[0]` class this family reads.
    fn architecture(&self) -> &'static str;

    /// Parses and validates `config.json` and locates each part in the weight files.
    fn configure(&self, c: &Cfg<'_>, w: &Weights) -> Result<Parts, HfError>;

    /// The one backbone a model built on this checkpoint may have, if the family's connector
    /// ties it to one (BLIP-2: its tower hands the class token to its own Q-Former; Phi-3-Vision:
    /// its HD projector); `None`: any (every backbone can take a tower and an LM).
    fn backbone(&self) -> Option<Backbone> {
        None
    }

    /// Whether the checkpoint's connector supplies our tensor `name` of a `backbone` model.
    fn provides_connector(&self, _name: &str, _backbone: Backbone) -> bool {
        false
    }

    /// Our connector tensor `name`, or `None` if this family has no such tensor.
    fn connector(
        &self,
        _parts: &Parts,
        _name: &str,
        _shape: &[usize],
        _r: &mut Reader<'_>,
    ) -> Option<Result<Tensor, HfError>> {
        None
    }
}

/// Every family this loader reads.
const FAMILIES: [&dyn Family; 7] = [
    &llama::FAMILY,
    &phi3::FAMILY,
    &opt::FAMILY,
    &clip::FAMILY,
    &llava::FAMILY,
    &blip2::FAMILY,
    &phi3v::FAMILY,
];

/// A checkpoint directory: its validated config and where each tensor lives.
#[derive(Clone)]
pub struct Checkpoint {
    dir: PathBuf,
    family: &'static dyn Family,
    parts: Parts,
    weights: Weights,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("architecture", &self.arch())
            .field("parts", &self.parts)
            .finish_non_exhaustive()
    }
}

impl Checkpoint {
    /// The `architectures[0]` classes this loader reads.
    pub fn supported() -> Vec<&'static str> {
        FAMILIES.iter().map(|f| f.architecture()).collect()
    }

    /// Reads and validates `config.json` and indexes the weight files (tensors are read later).
    pub fn open(dir: &Path) -> Result<Self, HfError> {
        let cpath = dir.join("config.json");
        let v = read_json(&cpath)?;
        let c = Cfg::top(&cpath, &v);
        let name = c
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .ok_or_else(|| c.err("architectures is missing (one class name expected)"))?;
        let family = FAMILIES
            .iter()
            .copied()
            .find(|f| f.architecture() == name)
            .ok_or_else(|| {
                c.unsupported(
                    "architectures",
                    format!("{name:?}"),
                    &format!("supported: {}", Self::supported().join(", ")),
                )
            })?;
        let weights = Weights::open(dir)?;
        let parts = family.configure(&c, &weights)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            family,
            parts,
            weights,
        })
    }

    /// The one backbone a checkpoint in `dir` fits, from `config.json`'s class alone (no weight
    /// file is opened): `None` for an unreadable config, an unknown class or a family that fits
    /// any backbone. The plan asks it to know whether a zero-shot cell needs pretrain-align.
    pub fn fixed_backbone(dir: &Path) -> Option<Backbone> {
        let v = read_json(&dir.join("config.json")).ok()?;
        let name = v.get("architectures")?.as_array()?.first()?.as_str()?;
        FAMILIES
            .iter()
            .find(|f| f.architecture() == name)
            .and_then(|f| f.backbone())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The `architectures[0]` class.
    pub fn arch(&self) -> &'static str {
        self.family.architecture()
    }
    /// The one backbone a model built on this checkpoint may have (`blip2` for BLIP-2, `phi3v`
    /// for Phi-3-Vision: the connector it holds), or `None` if any will do.
    pub fn backbone(&self) -> Option<Backbone> {
        self.family.backbone()
    }
    pub fn has_lm(&self) -> bool {
        self.parts.text.is_some()
    }
    pub fn has_vision(&self) -> bool {
        self.parts.vision.is_some()
    }
    pub fn vocab_size(&self) -> Option<usize> {
        self.parts.text.as_ref().map(|t| t.cfg.vocab)
    }
    /// `config.json` then the weight files: what a digest of the checkpoint must cover.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut v = vec![self.dir.join("config.json")];
        let index = self.dir.join("model.safetensors.index.json");
        if index.is_file() {
            v.push(index);
        }
        v.extend(self.weights.files().iter().cloned());
        v
    }

    /// The vision tower's shape, if the checkpoint has one.
    pub fn vision_config(&self) -> Option<&VisionConfig> {
        self.parts.vision.as_ref().map(|v| &v.cfg)
    }

    /// Our model config for `backbone` x `fusion`: the tiny preset with this checkpoint laid
    /// over it ([`Checkpoint::configure`]).
    pub fn model_config(&self, backbone: Backbone, fusion: Fusion) -> Result<ModelConfig, HfError> {
        let mut c = ModelConfig::tiny(backbone, fusion, 0, 0, 0, 0);
        self.configure(&mut c)?;
        Ok(c)
    }

    /// Lays this checkpoint over a preset's config `c`: the LM shape, vocabulary and token ids,
    /// the encoder shape (if the checkpoint has a tower), projector activation, the Q-Former of a
    /// BLIP-2 checkpoint, zero-gated `late` cross-attention, and `pretrained = true`; what the
    /// checkpoint lacks (a Q-Former, the HD grid, other fusion knobs) stays the preset's.
    pub fn configure(&self, c: &mut ModelConfig) -> Result<(), HfError> {
        let t = self.parts.text.as_ref().ok_or_else(|| HfError::Config {
            path: self.dir.join("config.json"),
            msg: format!("{} has no language model", self.arch()),
        })?;
        let t = &t.cfg;
        c.lm = t.lm.clone();
        c.vocab_size = t.vocab;
        (c.pad_id, c.bos_id, c.eos_id) = (t.pad, t.bos, t.eos);
        if let Some(v) = &self.parts.vision {
            c.vision = v.cfg.clone();
        }
        if let Some(p) = &self.parts.projector {
            c.projector_act = p.act;
        }
        if let Some(q) = &self.parts.qformer {
            c.qformer = q.cfg.clone();
        }
        // Cross-attention layers are not in any checkpoint: gated at zero, they leave it as it is.
        c.fusion_opts.late_gated = true;
        c.pretrained = true;
        Ok(())
    }

    /// Our tensor `name` with shape `shape`, built from this checkpoint's tensors.
    fn fetch(&self, name: &str, shape: &[usize], r: &mut Reader<'_>) -> Result<Tensor, HfError> {
        let not_mapped = |what| HfError::NotMapped {
            dir: self.dir.clone(),
            name: name.to_string(),
            what,
        };
        if let Some(rest) = name.strip_prefix("lm.") {
            let t = self.parts.text.as_ref();
            return t
                .and_then(|t| t.fetch(rest, shape, r))
                .unwrap_or_else(|| Err(not_mapped("language-model")));
        }
        if let Some(rest) = name.strip_prefix("vision.") {
            let v = self.parts.vision.as_ref();
            return v
                .and_then(|v| v.fetch(rest, shape, r))
                .unwrap_or_else(|| Err(not_mapped("vision")));
        }
        self.family
            .connector(&self.parts, name, shape, r)
            .unwrap_or_else(|| Err(not_mapped("connector")))
    }

    /// Whether this checkpoint provides our tensor `name` of component `c` for `backbone`
    /// (the LM and encoder when it has them; the connector where its family says so).
    fn provides(&self, name: &str, c: Component, backbone: Backbone) -> bool {
        match c {
            Component::Lm => self.has_lm(),
            Component::Vision => self.has_vision(),
            Component::Connector => self.family.provides_connector(name, backbone),
            Component::Adapter => false,
        }
    }
}

/// Fills the base tensors of `store` that `ck` provides (see [`Checkpoint::provides`]); returns
/// how many were set. Every one of them must be in the checkpoint with the shape `config.json`
/// implies. Tensors are read one at a time and stored as the entry holds them: a QLoRA base
/// (a model built for the adapt phase with `qlora`) is quantized to 4 bits as each tensor
/// arrives, so the f32 model never exists.
pub(crate) fn fill_store(
    store: &Mutex<ParamStore>,
    ck: &Checkpoint,
    backbone: Backbone,
) -> Result<usize, ModelError> {
    let mut store = store.lock().unwrap_or_else(|p| p.into_inner());
    let mut reader = ck.weights.reader(&store.device);
    let wanted: Vec<(String, Vec<usize>)> = store
        .entries
        .iter()
        .filter(|(k, e)| e.base && ck.provides(k, e.component, backbone))
        .map(|(k, e)| (k.clone(), e.dims()))
        .collect();
    for (name, dims) in &wanted {
        let t = ck.fetch(name, dims, &mut reader)?;
        if t.dims() != dims.as_slice() {
            return Err(ModelError::Shape {
                name: name.clone(),
                expected: dims.clone(),
                found: t.dims().to_vec(),
            });
        }
        if let Some(e) = store.entries.get_mut(name) {
            e.set(t.contiguous()?)?;
        }
    }
    Ok(wanted.len())
}

/// A CLIP vision tower on its own (a `CLIPVisionModel` or the tower of a LLaVA checkpoint), for
/// checking the encoder against the reference implementation.
pub struct VisionTower {
    vit: Vit,
    depth: usize,
    _store: Mutex<ParamStore>,
}

impl VisionTower {
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let ck = Checkpoint::open(dir)?;
        let cfg = ck.vision_config().cloned().ok_or_else(|| {
            ModelError::from(HfError::Config {
                path: dir.join("config.json"),
                msg: format!("{} has no vision tower", ck.arch()),
            })
        })?;
        let policy = Policy {
            phase: Phase::Align,
            peft: PeftConfig::default(),
            pretrained: true,
            inference: true,
            unfrozen: Vec::new(),
        };
        let store = Mutex::new(ParamStore::new(device, 0));
        let b = Builder::root(&store, &policy, Component::Vision).pp("vision");
        Vit::new(&b, &cfg, cfg.depth)?;
        fill_store(&store, &ck, Backbone::Llava)?;
        let vit = Vit::new(&b, &cfg, cfg.depth)?;
        Ok(Self {
            vit,
            depth: cfg.depth,
            _store: store,
        })
    }

    /// Hugging Face's `hidden_states` for images (B,3,S,S): the embeddings after
    /// `pre_layrnorm`, then each block's output, class token first.
    pub fn hidden_states(&self, images: &Tensor) -> Result<Vec<Tensor>, ModelError> {
        Ok(self.vit.hidden_states(images, self.depth, Fwd::EVAL)?)
    }
}
