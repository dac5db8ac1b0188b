//! Real pretrained checkpoints from a local directory in Hugging Face layout: `config.json`
//! plus `model.safetensors` or the shards listed by `model.safetensors.index.json`. No network,
//! no model hub: the directory is read as it is.
//!
//! Supported architectures (`config.json` `architectures[0]`):
//! - `LlamaForCausalLM`, `Phi3ForCausalLM`: the causal LM (our [`super::lm`] decoder).
//!   LLaMA's separate `q/k/v_proj` and `gate/up_proj` are concatenated into our fused
//!   `qkv_proj` / `gate_up_proj` (Phi-3 stores them fused already). Grouped-query attention is
//!   loaded exactly by repeating each key/value head for the query heads of its group (what
//!   `repeat_kv` does at run time), so the decoder stays multi-head. Both store RoPE in the
//!   rotate-half layout our kernels use, so no permutation is needed. Tied embeddings give
//!   `lm_head` a copy of `embed_tokens`.
//! - `CLIPVisionModel`: the ViT with [`VitLayout::clip`] (class token, `pre_layrnorm`, quick
//!   GELU); CLIP's separate q/k/v become our fused `qkv`, the patch convolution our patch linear.
//! - `LlavaForConditionalGeneration` (LLaVA-1.5 layout, CLIP tower + LLaMA/Phi-3 LM): both of
//!   the above plus the projector `linear_1 -> act -> linear_2` into our `llava` connector, which
//!   reads the penultimate block's patch tokens (`vision_feature_layer = -2`,
//!   `vision_feature_select_strategy = "default"`).
//!
//! Rejected with an error naming the file and the key: other architectures, RoPE scaling,
//! attention/MLP biases in the LM, activations other than SiLU (LM) and quick/exact GELU (CLIP),
//! a `head_dim` other than `hidden_size / heads`, CLIP LayerNorm eps other than 1e-5, other
//! LLaVA feature layers or selection strategies. Weights of any float dtype are read as f32.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::config::{
    Activation, Backbone, Fusion, LmConfig, ModelConfig, PeftConfig, Phase, VisionConfig,
    VitLayout, VitStem,
};
use super::ops::Fwd;
use super::params::{Builder, Component, ParamStore, Policy, Slot};
use super::vit::Vit;
use super::ModelError;

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

/// Architectures this loader maps onto our model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Phi3,
    ClipVision,
    Llava,
}

impl Arch {
    pub const SUPPORTED: [&'static str; 4] = [
        "LlamaForCausalLM",
        "Phi3ForCausalLM",
        "CLIPVisionModel",
        "LlavaForConditionalGeneration",
    ];
}

/// Text model family inside a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TextKind {
    Llama,
    Phi3,
}

#[derive(Debug, Clone)]
struct TextCfg {
    kind: TextKind,
    lm: LmConfig,
    vocab: usize,
    kv_heads: usize,
    tied: bool,
    bos: u32,
    eos: u32,
    pad: u32,
}

/// A checkpoint directory: its parsed, validated config and where each tensor lives.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    dir: PathBuf,
    arch: Arch,
    text: Option<TextCfg>,
    vision: Option<VisionConfig>,
    projector_act: Option<Activation>,
    /// Tensor key -> index into `files`.
    keys: BTreeMap<String, usize>,
    /// Weight files, in the order listed.
    files: Vec<PathBuf>,
    lm_prefix: String,
    head_key: Option<String>,
    vision_prefix: String,
    projector_prefix: String,
}

/// Reads `config.json` fields with errors naming the file and the key path.
struct Cfg<'a> {
    path: &'a Path,
    v: &'a Value,
    at: String,
}

impl<'a> Cfg<'a> {
    fn err(&self, msg: impl std::fmt::Display) -> HfError {
        HfError::Config {
            path: self.path.to_path_buf(),
            msg: msg.to_string(),
        }
    }
    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.at)
    }
    fn child(&self, k: &str) -> Result<Cfg<'a>, HfError> {
        match self.v.get(k) {
            Some(v) if v.is_object() => Ok(Cfg {
                path: self.path,
                v,
                at: format!("{}.", self.key(k)),
            }),
            _ => Err(self.err(format!("{} is missing or not an object", self.key(k)))),
        }
    }
    fn get(&self, k: &str) -> Option<&'a Value> {
        self.v.get(k).filter(|v| !v.is_null())
    }
    fn usize(&self, k: &str) -> Result<usize, HfError> {
        self.get(k)
            .and_then(Value::as_u64)
            .map(|n| n as usize)
            .ok_or_else(|| self.err(format!("{} is missing or not a whole number", self.key(k))))
    }
    fn usize_or(&self, k: &str, default: usize) -> Result<usize, HfError> {
        match self.get(k) {
            None => Ok(default),
            Some(_) => self.usize(k),
        }
    }
    fn f64_or(&self, k: &str, default: f64) -> Result<f64, HfError> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(format!("{} is not a number", self.key(k)))),
        }
    }
    fn str_or(&self, k: &str, default: &'a str) -> Result<&'a str, HfError> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v
                .as_str()
                .ok_or_else(|| self.err(format!("{} is not a string", self.key(k)))),
        }
    }
    fn bool_or(&self, k: &str, default: bool) -> Result<bool, HfError> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(format!("{} is not true/false", self.key(k)))),
        }
    }
    /// A token id; a list (several EOS ids) gives its first.
    fn token(&self, k: &str) -> Result<Option<u32>, HfError> {
        let v = match self.get(k) {
            None => return Ok(None),
            Some(Value::Array(a)) => a.first(),
            Some(v) => Some(v),
        };
        v.map(|v| {
            v.as_u64()
                .map(|n| n as u32)
                .ok_or_else(|| self.err(format!("{} is not a token id", self.key(k))))
        })
        .transpose()
    }
    fn unsupported(&self, k: &str, found: impl std::fmt::Display, why: &str) -> HfError {
        self.err(format!("unsupported {} = {found}: {why}", self.key(k)))
    }
}

/// Values transformers assumes for keys a `config.json` leaves out (it writes only those that
/// differ from the class defaults, e.g. llava-1.5's `text_config` holds little more than
/// `model_type` and `vocab_size`).
struct TextDefaults {
    vocab: usize,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    rms_eps: f64,
    bos: u32,
    eos: u32,
}

/// `LlamaConfig()`'s defaults.
const LLAMA_DEFAULTS: TextDefaults = TextDefaults {
    vocab: 32000,
    hidden: 4096,
    inter: 11008,
    layers: 32,
    heads: 32,
    rms_eps: 1e-6,
    bos: 1,
    eos: 2,
};

/// `Phi3Config()`'s defaults.
const PHI3_DEFAULTS: TextDefaults = TextDefaults {
    vocab: 32064,
    hidden: 3072,
    inter: 8192,
    layers: 32,
    heads: 32,
    rms_eps: 1e-5,
    bos: 1,
    eos: 32000,
};

fn text_config(c: &Cfg<'_>, top: Option<&Cfg<'_>>) -> Result<TextCfg, HfError> {
    // LlavaConfig's text model defaults to LLaMA.
    let kind = match c.str_or("model_type", if top.is_some() { "llama" } else { "" })? {
        "llama" => TextKind::Llama,
        "phi3" => TextKind::Phi3,
        other => {
            return Err(c.unsupported(
                "model_type",
                format!("{other:?}"),
                "the LM must be \"llama\" or \"phi3\"",
            ))
        }
    };
    let d = match kind {
        TextKind::Llama => &LLAMA_DEFAULTS,
        TextKind::Phi3 => &PHI3_DEFAULTS,
    };
    let width = c.usize_or("hidden_size", d.hidden)?;
    let heads = c.usize_or("num_attention_heads", d.heads)?;
    let kv_heads = c.usize_or("num_key_value_heads", heads)?;
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(c.unsupported(
            "num_key_value_heads",
            kv_heads,
            &format!("must divide num_attention_heads = {heads}"),
        ));
    }
    if heads == 0 || !width.is_multiple_of(heads) {
        return Err(c.unsupported(
            "num_attention_heads",
            heads,
            &format!("must divide hidden_size = {width}"),
        ));
    }
    if let Some(hd) = c.get("head_dim") {
        if hd.as_u64() != Some((width / heads) as u64) {
            return Err(c.unsupported(
                "head_dim",
                hd,
                "our decoder needs head_dim = hidden_size / num_attention_heads",
            ));
        }
    }
    let act = c.str_or("hidden_act", "silu")?;
    if act != "silu" {
        return Err(c.unsupported(
            "hidden_act",
            format!("{act:?}"),
            "the LM MLP is SwiGLU (silu)",
        ));
    }
    for k in ["attention_bias", "mlp_bias"] {
        if c.bool_or(k, false)? {
            return Err(c.unsupported(k, true, "our decoder's linears have no bias"));
        }
    }
    if let Some(s) = c.get("rope_scaling") {
        return Err(c.unsupported("rope_scaling", s, "only plain RoPE is supported"));
    }
    let mut theta = c.f64_or("rope_theta", 10_000.0)?;
    if c.get("rope_parameters").is_some() {
        let rp = c.child("rope_parameters")?;
        let ty = rp.str_or("rope_type", "default")?;
        if ty != "default" {
            return Err(rp.unsupported("rope_type", format!("{ty:?}"), "only plain RoPE"));
        }
        theta = rp.f64_or("rope_theta", theta)?;
        let f = rp.f64_or("partial_rotary_factor", 1.0)?;
        if f != 1.0 {
            return Err(rp.unsupported("partial_rotary_factor", f, "RoPE must cover the head"));
        }
    }
    let f = c.f64_or("partial_rotary_factor", 1.0)?;
    if f != 1.0 {
        return Err(c.unsupported("partial_rotary_factor", f, "RoPE must cover the head"));
    }
    let vocab = c.usize_or("vocab_size", d.vocab)?;
    let tied = match top {
        Some(t) if c.get("tie_word_embeddings").is_none() => {
            t.bool_or("tie_word_embeddings", false)?
        }
        _ => c.bool_or("tie_word_embeddings", false)?,
    };
    let eos = c.token("eos_token_id")?.unwrap_or(d.eos);
    Ok(TextCfg {
        kind,
        lm: LmConfig {
            width,
            depth: c.usize_or("num_hidden_layers", d.layers)?,
            heads,
            mlp_hidden: c.usize_or("intermediate_size", d.inter)?,
            rope_theta: theta,
            rms_eps: c.f64_or("rms_norm_eps", d.rms_eps)?,
        },
        vocab,
        kv_heads,
        tied,
        bos: c.token("bos_token_id")?.unwrap_or(d.bos),
        eos,
        pad: c
            .token("pad_token_id")?
            .filter(|&p| (p as usize) < vocab)
            .unwrap_or(eos),
    })
}

fn vision_config(c: &Cfg<'_>) -> Result<VisionConfig, HfError> {
    let ty = c.str_or("model_type", "clip_vision_model")?;
    if ty != "clip_vision_model" {
        return Err(c.unsupported(
            "model_type",
            format!("{ty:?}"),
            "the vision tower must be \"clip_vision_model\"",
        ));
    }
    let act = match c.str_or("hidden_act", "quick_gelu")? {
        "quick_gelu" => Activation::QuickGelu,
        "gelu" => Activation::Gelu,
        other => {
            return Err(c.unsupported("hidden_act", format!("{other:?}"), "quick_gelu or gelu"))
        }
    };
    let eps = c.f64_or("layer_norm_eps", 1e-5)?;
    if eps != 1e-5 {
        return Err(c.unsupported("layer_norm_eps", eps, "our LayerNorm uses 1e-5"));
    }
    if c.usize_or("num_channels", 3)? != 3 {
        return Err(c.unsupported("num_channels", c.usize_or("num_channels", 3)?, "RGB only"));
    }
    // Omitted keys take `CLIPVisionConfig()`'s defaults (ViT-B/32), as in transformers.
    let (image, patch) = (
        c.usize_or("image_size", 224)?,
        c.usize_or("patch_size", 32)?,
    );
    let width = c.usize_or("hidden_size", 768)?;
    let heads = c.usize_or("num_attention_heads", 12)?;
    let inter = c.usize_or("intermediate_size", 3072)?;
    if patch == 0 || !image.is_multiple_of(patch) {
        return Err(c.unsupported("patch_size", patch, "must divide image_size"));
    }
    if width == 0 || !inter.is_multiple_of(width) {
        return Err(c.unsupported(
            "intermediate_size",
            inter,
            "our ViT needs a whole multiple of hidden_size",
        ));
    }
    Ok(VisionConfig {
        image_size: image,
        patch_size: patch,
        width,
        depth: c.usize_or("num_hidden_layers", 12)?,
        heads,
        mlp_ratio: inter / width,
        layout: VitLayout::clip(act),
        stem: VitStem::Patch,
    })
}

fn projector_act(c: &Cfg<'_>) -> Result<Activation, HfError> {
    match c.str_or("projector_hidden_act", "gelu")? {
        "gelu" => Ok(Activation::Gelu),
        "gelu_pytorch_tanh" | "gelu_new" => Ok(Activation::GeluTanh),
        "quick_gelu" => Ok(Activation::QuickGelu),
        other => Err(c.unsupported(
            "projector_hidden_act",
            format!("{other:?}"),
            "gelu, gelu_pytorch_tanh or quick_gelu",
        )),
    }
}

fn read_json(path: &Path) -> Result<Value, HfError> {
    let text = std::fs::read_to_string(path).map_err(|source| HfError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| HfError::Config {
        path: path.to_path_buf(),
        msg: format!("not valid JSON: {e}"),
    })
}

/// Weight files and the key -> file map (single file or sharded index).
fn weight_files(dir: &Path) -> Result<(Vec<PathBuf>, BTreeMap<String, usize>), HfError> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.is_file() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| HfError::Config {
                path: index.clone(),
                msg: "weight_map is missing or not an object".into(),
            })?;
        let mut names: Vec<&str> = map.values().filter_map(Value::as_str).collect();
        names.sort_unstable();
        names.dedup();
        names.into_iter().map(|n| dir.join(n)).collect()
    } else if single.is_file() {
        vec![single]
    } else {
        return Err(HfError::Config {
            path: dir.to_path_buf(),
            msg: "neither model.safetensors nor model.safetensors.index.json is here".into(),
        });
    };
    let mut keys = BTreeMap::new();
    for (i, f) in files.iter().enumerate() {
        for k in header_keys(f)? {
            keys.insert(k, i);
        }
    }
    Ok((files, keys))
}

/// Tensor names in a safetensors header (8-byte little-endian length, then JSON), without
/// reading the data.
fn header_keys(path: &Path) -> Result<Vec<String>, HfError> {
    use std::io::Read;
    let io = |source| HfError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bad = |msg: String| HfError::Safetensors {
        path: path.to_path_buf(),
        source: candle_core::Error::Msg(format!("not a safetensors file: {msg}")),
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io)?;
    let n = u64::from_le_bytes(len);
    let size = f.metadata().map_err(io)?.len();
    if n > size.saturating_sub(8) {
        return Err(bad(format!("header length {n} exceeds the file")));
    }
    let mut head = vec![0u8; n as usize];
    f.read_exact(&mut head).map_err(io)?;
    let v: serde_json::Map<String, Value> =
        serde_json::from_slice(&head).map_err(|e| bad(e.to_string()))?;
    Ok(v.into_iter()
        .map(|(k, _)| k)
        .filter(|k| k != "__metadata__")
        .collect())
}

impl Checkpoint {
    /// Reads and validates `config.json` and indexes the weight files (tensors are read later).
    pub fn open(dir: &Path) -> Result<Self, HfError> {
        let cpath = dir.join("config.json");
        let v = read_json(&cpath)?;
        let c = Cfg {
            path: &cpath,
            v: &v,
            at: String::new(),
        };
        let name = c
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .ok_or_else(|| c.err("architectures is missing (one class name expected)"))?;
        let arch = match name {
            "LlamaForCausalLM" => Arch::Llama,
            "Phi3ForCausalLM" => Arch::Phi3,
            "CLIPVisionModel" => Arch::ClipVision,
            "LlavaForConditionalGeneration" => Arch::Llava,
            other => {
                return Err(c.unsupported(
                    "architectures",
                    format!("{other:?}"),
                    &format!("supported: {}", Arch::SUPPORTED.join(", ")),
                ))
            }
        };
        let (mut text, mut vision, mut proj) = (None, None, None);
        match arch {
            Arch::Llama | Arch::Phi3 => {
                let t = text_config(&c, None)?;
                let want = if arch == Arch::Llama {
                    TextKind::Llama
                } else {
                    TextKind::Phi3
                };
                if t.kind != want {
                    return Err(c.unsupported("model_type", format!("{:?}", t.kind), name));
                }
                text = Some(t);
            }
            Arch::ClipVision => vision = Some(vision_config(&c)?),
            Arch::Llava => {
                let tc = c.child("text_config")?;
                text = Some(text_config(&tc, Some(&c))?);
                let vc = c.child("vision_config")?;
                let vcfg = vision_config(&vc)?;
                let layer = c
                    .get("vision_feature_layer")
                    .cloned()
                    .unwrap_or(Value::from(-2));
                let depth = vcfg.depth as i64;
                if layer.as_i64() != Some(-2) && layer.as_i64() != Some(depth - 1) {
                    return Err(c.unsupported(
                        "vision_feature_layer",
                        layer,
                        "our llava connector reads the penultimate block (-2)",
                    ));
                }
                let strat = c.str_or("vision_feature_select_strategy", "default")?;
                if strat != "default" {
                    return Err(c.unsupported(
                        "vision_feature_select_strategy",
                        format!("{strat:?}"),
                        "our connectors read the patch tokens without the class token (\"default\")",
                    ));
                }
                if !c.bool_or("multimodal_projector_bias", true)? {
                    return Err(c.unsupported(
                        "multimodal_projector_bias",
                        false,
                        "our projector linears have biases",
                    ));
                }
                vision = Some(vcfg);
                proj = Some(projector_act(&c)?);
            }
        }
        let (files, keys) = weight_files(dir)?;
        let mut ck = Self {
            dir: dir.to_path_buf(),
            arch,
            text,
            vision,
            projector_act: proj,
            keys,
            files,
            lm_prefix: String::new(),
            head_key: None,
            vision_prefix: String::new(),
            projector_prefix: String::new(),
        };
        ck.resolve_prefixes()?;
        Ok(ck)
    }

    /// Finds under which prefixes this file stores the LM, the tower and the projector
    /// (`model.`, `language_model.model.`, `model.language_model.`, `vision_tower.`, ...).
    fn resolve_prefixes(&mut self) -> Result<(), HfError> {
        let first = |cands: &[&str], probe: &str| -> Option<String> {
            cands
                .iter()
                .find(|p| self.keys.contains_key(&format!("{p}{probe}")))
                .map(|p| (*p).to_string())
        };
        if self.text.is_some() {
            let cands = [
                "model.",
                "language_model.model.",
                "model.language_model.",
                "language_model.",
                "",
            ];
            self.lm_prefix = first(&cands, "embed_tokens.weight")
                .ok_or_else(|| self.missing("model.embed_tokens.weight"))?;
            self.head_key = ["lm_head.weight", "language_model.lm_head.weight"]
                .iter()
                .find(|k| self.keys.contains_key(**k))
                .map(|k| (*k).to_string());
        }
        if self.vision.is_some() {
            let cands = [
                "",
                "vision_model.",
                "vision_tower.",
                "vision_tower.vision_model.",
                "model.vision_tower.",
                "model.vision_tower.vision_model.",
            ];
            self.vision_prefix = first(&cands, "embeddings.patch_embedding.weight")
                .ok_or_else(|| self.missing("vision_model.embeddings.patch_embedding.weight"))?;
        }
        if self.projector_act.is_some() {
            let cands = ["multi_modal_projector.", "model.multi_modal_projector."];
            self.projector_prefix = first(&cands, "linear_1.weight")
                .ok_or_else(|| self.missing("multi_modal_projector.linear_1.weight"))?;
        }
        Ok(())
    }

    fn missing(&self, key: &str) -> HfError {
        HfError::Missing {
            dir: self.dir.clone(),
            key: key.to_string(),
            files: self
                .files
                .iter()
                .filter_map(|f| f.file_name())
                .map(|f| f.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn arch(&self) -> Arch {
        self.arch
    }
    pub fn has_lm(&self) -> bool {
        self.text.is_some()
    }
    pub fn has_vision(&self) -> bool {
        self.vision.is_some()
    }
    pub fn vocab_size(&self) -> Option<usize> {
        self.text.as_ref().map(|t| t.vocab)
    }
    /// `config.json` then the weight files: what a digest of the checkpoint must cover.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut v = vec![self.dir.join("config.json")];
        let index = self.dir.join("model.safetensors.index.json");
        if index.is_file() {
            v.push(index);
        }
        v.extend(self.files.iter().cloned());
        v
    }

    /// The vision tower's shape, if the checkpoint has one.
    pub fn vision_config(&self) -> Option<&VisionConfig> {
        self.vision.as_ref()
    }

    /// Our model config for `backbone` x `fusion`: the tiny preset with this checkpoint laid
    /// over it ([`Checkpoint::configure`]).
    pub fn model_config(&self, backbone: Backbone, fusion: Fusion) -> Result<ModelConfig, HfError> {
        let mut c = ModelConfig::tiny(backbone, fusion, 0, 0, 0, 0);
        self.configure(&mut c)?;
        Ok(c)
    }

    /// Lays this checkpoint over a preset's config `c`: the LM shape, vocabulary and token ids,
    /// the encoder shape (if the checkpoint has a tower) and projector activation, and
    /// `pretrained = true`; what the checkpoint lacks (Q-Former, HD grid, fusion knobs) stays
    /// the preset's.
    pub fn configure(&self, c: &mut ModelConfig) -> Result<(), HfError> {
        let t = self.text.as_ref().ok_or_else(|| HfError::Config {
            path: self.dir.join("config.json"),
            msg: format!("{:?} has no language model", self.arch),
        })?;
        c.lm = t.lm.clone();
        c.vocab_size = t.vocab;
        (c.pad_id, c.bos_id, c.eos_id) = (t.pad, t.bos, t.eos);
        if let Some(v) = &self.vision {
            c.vision = v.clone();
        }
        if let Some(a) = self.projector_act {
            c.projector_act = a;
        }
        c.pretrained = true;
        Ok(())
    }

    fn raw(&self, key: &str, cache: &mut FileCache) -> Result<(Tensor, PathBuf), HfError> {
        let Some(&i) = self.keys.get(key) else {
            return Err(self.missing(key));
        };
        let path = &self.files[i];
        let t = cache
            .load(i, path, key)?
            .to_dtype(DType::F32)
            .map_err(|source| HfError::Safetensors {
                path: path.clone(),
                source,
            })?;
        Ok((t, path.clone()))
    }

    /// Tensor `key` checked against `shape`.
    fn take(&self, key: &str, shape: &[usize], cache: &mut FileCache) -> Result<Tensor, HfError> {
        let (t, path) = self.raw(key, cache)?;
        if t.dims() != shape {
            return Err(HfError::Shape {
                path,
                key: key.to_string(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t)
    }

    /// Our tensor `name` with shape `shape`, built from this checkpoint's tensors.
    fn fetch(&self, name: &str, shape: &[usize], cache: &mut FileCache) -> Result<Tensor, HfError> {
        let not_mapped = |what| HfError::NotMapped {
            dir: self.dir.clone(),
            name: name.to_string(),
            what,
        };
        let cat = |ts: Vec<Tensor>| -> Result<Tensor, HfError> {
            Tensor::cat(&ts, 0).map_err(|source| HfError::Safetensors {
                path: self.dir.clone(),
                source,
            })
        };
        if let Some(rest) = name.strip_prefix("lm.") {
            let t = self
                .text
                .as_ref()
                .ok_or_else(|| not_mapped("language-model"))?;
            let p = &self.lm_prefix;
            let w = t.lm.width;
            let hd = w / t.lm.heads;
            let kvw = t.kv_heads * hd;
            let h = t.lm.mlp_hidden;
            if rest == "lm_head.weight" {
                return match (&self.head_key, t.tied) {
                    (Some(k), _) => self.take(k, shape, cache),
                    (None, true) => self.take(&format!("{p}embed_tokens.weight"), shape, cache),
                    (None, false) => Err(self.missing("lm_head.weight")),
                };
            }
            let Some(layer) = rest.strip_prefix("layers.") else {
                return match rest {
                    "embed_tokens.weight" | "norm.weight" => {
                        self.take(&format!("{p}{rest}"), shape, cache)
                    }
                    _ => Err(not_mapped("language-model")),
                };
            };
            let (i, leaf) = layer
                .split_once('.')
                .ok_or_else(|| not_mapped("language-model"))?;
            let at = format!("{p}layers.{i}.");
            return match leaf {
                "input_layernorm.weight"
                | "post_attention_layernorm.weight"
                | "self_attn.o_proj.weight"
                | "mlp.down_proj.weight" => self.take(&format!("{at}{leaf}"), shape, cache),
                "self_attn.qkv_proj.weight" => {
                    let (q, k, v) = match t.kind {
                        TextKind::Llama => (
                            self.take(&format!("{at}self_attn.q_proj.weight"), &[w, w], cache)?,
                            self.take(&format!("{at}self_attn.k_proj.weight"), &[kvw, w], cache)?,
                            self.take(&format!("{at}self_attn.v_proj.weight"), &[kvw, w], cache)?,
                        ),
                        TextKind::Phi3 => {
                            let key = format!("{at}self_attn.qkv_proj.weight");
                            let f = self.take(&key, &[w + 2 * kvw, w], cache)?;
                            let part = |s, n| {
                                f.narrow(0, s, n).map_err(|source| HfError::Safetensors {
                                    path: self.dir.clone(),
                                    source,
                                })
                            };
                            (part(0, w)?, part(w, kvw)?, part(w + kvw, kvw)?)
                        }
                    };
                    let rep = t.lm.heads / t.kv_heads;
                    let k = repeat_heads(&k, t.kv_heads, rep, hd).map_err(|source| {
                        HfError::Safetensors {
                            path: self.dir.clone(),
                            source,
                        }
                    })?;
                    let v = repeat_heads(&v, t.kv_heads, rep, hd).map_err(|source| {
                        HfError::Safetensors {
                            path: self.dir.clone(),
                            source,
                        }
                    })?;
                    cat(vec![q, k, v])
                }
                "mlp.gate_up_proj.weight" => match t.kind {
                    TextKind::Llama => cat(vec![
                        self.take(&format!("{at}mlp.gate_proj.weight"), &[h, w], cache)?,
                        self.take(&format!("{at}mlp.up_proj.weight"), &[h, w], cache)?,
                    ]),
                    TextKind::Phi3 => self.take(&format!("{at}{leaf}"), shape, cache),
                },
                _ => Err(not_mapped("language-model")),
            };
        }
        if let Some(rest) = name.strip_prefix("vision.") {
            let v = self.vision.as_ref().ok_or_else(|| not_mapped("vision"))?;
            let p = &self.vision_prefix;
            let w = v.width;
            return match rest {
                "patch_embed.weight" => {
                    let ps = v.patch_size;
                    let key = format!("{p}embeddings.patch_embedding.weight");
                    self.take(&key, &[w, 3, ps, ps], cache)?
                        .reshape((w, 3 * ps * ps))
                        .map_err(|source| HfError::Safetensors {
                            path: self.dir.clone(),
                            source,
                        })
                }
                "cls_token" => self.take(&format!("{p}embeddings.class_embedding"), shape, cache),
                "pos_embed" => self.take(
                    &format!("{p}embeddings.position_embedding.weight"),
                    shape,
                    cache,
                ),
                "pre_norm.weight" | "pre_norm.bias" => {
                    let leaf = rest.trim_start_matches("pre_norm.");
                    self.take(&format!("{p}pre_layrnorm.{leaf}"), shape, cache)
                }
                _ => {
                    let layer = rest
                        .strip_prefix("blocks.")
                        .ok_or_else(|| not_mapped("vision"))?;
                    let (i, leaf) = layer.split_once('.').ok_or_else(|| not_mapped("vision"))?;
                    let at = format!("{p}encoder.layers.{i}.");
                    let (module, kind) =
                        leaf.rsplit_once('.').ok_or_else(|| not_mapped("vision"))?;
                    let hf = match module {
                        "norm1" => "layer_norm1",
                        "norm2" => "layer_norm2",
                        "attn.proj" => "self_attn.out_proj",
                        "mlp.fc1" => "mlp.fc1",
                        "mlp.fc2" => "mlp.fc2",
                        "attn.qkv" => {
                            let part_shape: Vec<usize> = if kind == "weight" {
                                vec![w, w]
                            } else {
                                vec![w]
                            };
                            let parts = ["q_proj", "k_proj", "v_proj"]
                                .iter()
                                .map(|q| {
                                    self.take(
                                        &format!("{at}self_attn.{q}.{kind}"),
                                        &part_shape,
                                        cache,
                                    )
                                })
                                .collect::<Result<Vec<_>, _>>()?;
                            return cat(parts);
                        }
                        _ => return Err(not_mapped("vision")),
                    };
                    self.take(&format!("{at}{hf}.{kind}"), shape, cache)
                }
            };
        }
        if let Some(rest) = name.strip_prefix("connector.projector.") {
            if self.projector_act.is_none() {
                return Err(not_mapped("connector"));
            }
            let p = &self.projector_prefix;
            let hf = match rest {
                "fc1.weight" => "linear_1.weight",
                "fc1.bias" => "linear_1.bias",
                "fc2.weight" => "linear_2.weight",
                "fc2.bias" => "linear_2.bias",
                _ => return Err(not_mapped("connector")),
            };
            return self.take(&format!("{p}{hf}"), shape, cache);
        }
        Err(not_mapped("model"))
    }

    /// Whether this checkpoint provides our tensor `name` of component `c` for `backbone`
    /// (the LM and encoder when it has them; the projector only for `llava`).
    fn provides(&self, name: &str, c: Component, backbone: Backbone) -> bool {
        match c {
            Component::Lm => self.has_lm(),
            Component::Vision => self.has_vision(),
            Component::Connector => {
                backbone == Backbone::Llava
                    && self.projector_act.is_some()
                    && name.starts_with("connector.projector.")
            }
            Component::Adapter => false,
        }
    }
}

/// Rows of `w` (kv_heads * hd, in) with each head repeated `rep` times consecutively: head j of
/// the result is key/value head j / rep, as Hugging Face's `repeat_kv` pairs them.
fn repeat_heads(w: &Tensor, kv_heads: usize, rep: usize, hd: usize) -> candle_core::Result<Tensor> {
    if rep == 1 {
        return Ok(w.clone());
    }
    let inp = w.dim(1)?;
    w.reshape((kv_heads, 1, hd, inp))?
        .broadcast_as((kv_heads, rep, hd, inp))?
        .reshape((kv_heads * rep * hd, inp))
}

/// Safetensors files memory-mapped on first use: a tensor is read (and converted to f32) only
/// when asked for, so loading holds the f32 model plus pages of the files, not whole shards.
struct FileCache {
    device: Device,
    mapped: HashMap<usize, candle_core::safetensors::MmapedSafetensors>,
}

impl FileCache {
    fn new(device: &Device) -> Self {
        Self {
            device: device.clone(),
            mapped: HashMap::new(),
        }
    }

    /// Tensor `key` of file `i` (at `path`), as stored.
    fn load(&mut self, i: usize, path: &Path, key: &str) -> Result<Tensor, HfError> {
        let err = |source| HfError::Safetensors {
            path: path.to_path_buf(),
            source,
        };
        if !self.mapped.contains_key(&i) {
            // SAFETY: the mapping is only read, and dropped when loading ends; as with every
            // safetensors loader, the file must not be truncated or rewritten meanwhile.
            let m =
                unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.map_err(err)?;
            self.mapped.insert(i, m);
        }
        self.mapped[&i].load(key, &self.device).map_err(err)
    }
}

/// Fills the base tensors of `store` that `ck` provides (see [`Checkpoint::provides`]); returns
/// how many were set. Every one of them must be in the checkpoint with the shape `config.json`
/// implies.
pub(crate) fn fill_store(
    store: &Mutex<ParamStore>,
    ck: &Checkpoint,
    backbone: Backbone,
) -> Result<usize, ModelError> {
    let mut store = store.lock().unwrap_or_else(|p| p.into_inner());
    let mut cache = FileCache::new(&store.device);
    let wanted: Vec<(String, Vec<usize>)> = store
        .entries
        .iter()
        .filter(|(k, e)| e.base && ck.provides(k, e.component, backbone))
        .map(|(k, e)| {
            let dims = match &e.slot {
                Slot::Var(v) => v.dims().to_vec(),
                Slot::Const(c) => c.dims().to_vec(),
                Slot::Quant(q) => q.shape().dims().to_vec(),
            };
            (k.clone(), dims)
        })
        .collect();
    for (name, dims) in &wanted {
        let t = ck.fetch(name, dims, &mut cache)?;
        if t.dims() != dims.as_slice() {
            return Err(ModelError::Shape {
                name: name.clone(),
                expected: dims.clone(),
                found: t.dims().to_vec(),
            });
        }
        let t = t.contiguous()?;
        if let Some(e) = store.entries.get_mut(name) {
            match &e.slot {
                Slot::Var(v) => v.set(&t)?,
                _ => e.slot = Slot::Const(t),
            }
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
        let cfg = ck.vision.clone().ok_or_else(|| {
            ModelError::from(HfError::Config {
                path: dir.join("config.json"),
                msg: format!("{:?} has no vision tower", ck.arch),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// llava-1.5-7b-hf's config.json as published: transformers writes only non-default keys,
    /// so the LM and tower shapes come from the class defaults.
    #[test]
    fn omitted_keys_take_the_transformers_defaults() {
        let v: Value = serde_json::from_str(
            r#"{
            "architectures": ["LlavaForConditionalGeneration"],
            "image_token_index": 32000, "model_type": "llava", "pad_token_id": 32001,
            "projector_hidden_act": "gelu",
            "text_config": {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096,
                            "model_type": "llama", "rms_norm_eps": 1e-05, "vocab_size": 32064},
            "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                              "model_type": "clip_vision_model", "num_attention_heads": 16,
                              "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768},
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
            "vocab_size": 32064}"#,
        )
        .unwrap();
        let path = Path::new("config.json");
        let top = Cfg {
            path,
            v: &v,
            at: String::new(),
        };
        let t = text_config(&top.child("text_config").unwrap(), Some(&top)).unwrap();
        assert_eq!(
            (
                t.lm.width,
                t.lm.depth,
                t.lm.heads,
                t.lm.mlp_hidden,
                t.kv_heads
            ),
            (4096, 32, 32, 11008, 32)
        );
        assert_eq!(
            (t.lm.rms_eps, t.lm.rope_theta, t.vocab),
            (1e-5, 10_000.0, 32064)
        );
        assert!(!t.tied);
        let vc = vision_config(&top.child("vision_config").unwrap()).unwrap();
        assert_eq!(
            (
                vc.image_size,
                vc.patch_size,
                vc.width,
                vc.depth,
                vc.heads,
                vc.mlp_ratio
            ),
            (336, 14, 1024, 24, 16, 4)
        );
        assert_eq!(vc.layout, VitLayout::clip(Activation::QuickGelu));
        assert_eq!(projector_act(&top).unwrap(), Activation::Gelu);
    }

    #[test]
    fn grouped_query_heads_repeat_in_transformers_order() {
        // 2 kv heads of 1 row each, 3 query heads per group: rows 0 0 0 1 1 1.
        let w = Tensor::new(&[[0f32, 0.5], [1.0, 1.5]], &Device::Cpu).unwrap();
        let r = repeat_heads(&w, 2, 3, 1).unwrap();
        let rows: Vec<Vec<f32>> = r.to_vec2().unwrap();
        let first: Vec<f32> = rows.iter().map(|r| r[0]).collect();
        assert_eq!(first, [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
    }
}
