//! Contrastive image-text pretraining of the vision tower (Radford et al., "Learning
//! Transferable Visual Models From Natural Language Supervision", 2021): the stand-in, for the
//! tiny presets, of the CLIP-family tower every real BLIP-2, LLaVA and Phi-3-Vision starts from.
//!
//! The image tower is the captioner's own ViT ([`super::vit`], tensors named `vision.*` as the
//! captioner names them, so its weights load into any backbone unchanged): every block, patch
//! tokens mean-pooled, LayerNorm, linear into the joint space. The text tower is a bag of token
//! embeddings (masked mean, LayerNorm, linear); it exists only to pull the images apart by what
//! their captions say and is thrown away after pretraining, as CLIP's text tower is by LLaVA.
//! The loss is CLIP's: cosine similarities scaled by a learned temperature, cross-entropy of each
//! image against the batch's captions and of each caption against the batch's images.
//!
//! The tower learns only from the pairs: nothing here reads the synthetic generator's attribute
//! labels.

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, D};

use super::config::{Phase, VisionConfig};
use super::linear::{LayerNorm, Linear};
use super::ops::Fwd;
use super::params::{Builder, Component, Init, ParamStore, Policy};
use super::vit::Vit;
use super::{ModelError, PeftConfig, TrainableVar};

/// Shapes of the two projection heads and the text tower.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClipConfig {
    /// Width of the joint embedding space.
    pub embed_dim: usize,
    /// Width of the text tower's token embeddings.
    pub text_width: usize,
    /// Initial temperature as CLIP initialises it (logit scale `1 / init_temperature`).
    pub init_temperature: f64,
}

impl Default for ClipConfig {
    fn default() -> Self {
        Self {
            embed_dim: 128,
            text_width: 128,
            init_temperature: 0.07,
        }
    }
}

/// The vision tower with its contrastive head, and the text tower.
pub struct Clip {
    store: Mutex<ParamStore>,
    vit: Vit,
    depth: usize,
    v_norm: LayerNorm,
    v_proj: Linear,
    t_embed: Tensor,
    t_norm: LayerNorm,
    t_proj: Linear,
    logit_scale: Tensor,
    vocab: usize,
}

impl Clip {
    /// A fresh model; `seed` initialises every tensor (deterministically per name).
    pub fn new(
        vision: &VisionConfig,
        clip: &ClipConfig,
        vocab: usize,
        seed: u64,
    ) -> Result<Self, ModelError> {
        let store = Mutex::new(ParamStore::new(&Device::Cpu, seed));
        // Everything trains: an align-phase policy of a model without pretrained weights.
        let policy = Policy {
            phase: Phase::Align,
            peft: PeftConfig::default(),
            pretrained: false,
            inference: false,
            unfrozen: Vec::new(),
        };
        let (vit, v_norm, v_proj, t_embed, t_norm, t_proj, logit_scale) = {
            let vb = Builder::root(&store, &policy, Component::Vision).pp("vision");
            let vit = Vit::new(&vb, vision, vision.depth)?;
            let hb = Builder::root(&store, &policy, Component::Connector).pp("clip");
            let v_norm = hb.layer_norm("visual_norm", vision.width)?;
            let v_proj = hb.linear("visual_projection", vision.width, clip.embed_dim, false)?;
            let t_embed = hb.pp("text_embed").base(
                "weight",
                &[vocab, clip.text_width],
                Init::Normal(0.02),
                false,
            )?;
            let t_norm = hb.layer_norm("text_norm", clip.text_width)?;
            let t_proj = hb.linear("text_projection", clip.text_width, clip.embed_dim, false)?;
            let scale = (1.0 / clip.init_temperature).ln() as f32;
            let logit_scale = hb.base("logit_scale", &[1], Init::Ones, false)?;
            // `Init` has no constant other than 0 and 1: scale the one in place.
            let v = store
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entries
                .get("clip.logit_scale")
                .and_then(|e| e.var().cloned());
            if let Some(v) = v {
                v.set(&Tensor::new(&[scale], &Device::Cpu)?)?;
            }
            (vit, v_norm, v_proj, t_embed, t_norm, t_proj, logit_scale)
        };
        Ok(Self {
            store,
            vit,
            depth: vision.depth,
            v_norm,
            v_proj,
            t_embed,
            t_norm,
            t_proj,
            logit_scale,
            vocab,
        })
    }

    /// All trainable tensors, in name order.
    pub fn trainable_vars(&self) -> Vec<TrainableVar> {
        self.store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
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

    /// L2-normalised image embeddings (B, E) of images (B, 3, S, S).
    pub fn encode_images(&self, images: &Tensor, fwd: Fwd<'_>) -> Result<Tensor, ModelError> {
        let outs = self.vit.forward(images, self.depth, fwd)?;
        let last = outs.last().ok_or_else(|| {
            ModelError::Input("the vision tower has no blocks to pretrain".into())
        })?;
        let pooled = self.v_norm.forward(&last.mean(1)?)?;
        Ok(normalize(&self.v_proj.forward(&pooled, fwd)?)?)
    }

    /// L2-normalised text embeddings (B, E) of token ids (B, T) u32 with mask (B, T) f32 (1 for
    /// a token, 0 for padding).
    pub fn encode_texts(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        fwd: Fwd<'_>,
    ) -> Result<Tensor, ModelError> {
        let (b, t) = ids.dims2()?;
        if let Some(bad) = ids
            .flatten_all()?
            .to_vec1::<u32>()?
            .into_iter()
            .find(|&i| i as usize >= self.vocab)
        {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the text tower's vocabulary of {}",
                self.vocab
            )));
        }
        let emb = self
            .t_embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, ()))?;
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let count = m.sum(1)?.maximum(1.0)?;
        let mean = emb.broadcast_mul(&m)?.sum(1)?.broadcast_div(&count)?;
        let pooled = self.t_norm.forward(&mean)?;
        Ok(normalize(&self.t_proj.forward(&pooled, fwd)?)?)
    }

    /// Similarity logits (B, B): image i against caption j, times the learned scale.
    pub fn logits(&self, img: &Tensor, txt: &Tensor) -> Result<Tensor, ModelError> {
        let sim = img.matmul(&txt.t()?)?;
        Ok(sim.broadcast_mul(&self.logit_scale.exp()?)?)
    }

    /// CLIP's symmetric contrastive loss over a batch of matching (image, caption) rows.
    pub fn loss(
        &self,
        images: &Tensor,
        ids: &Tensor,
        mask: &Tensor,
        fwd: Fwd<'_>,
    ) -> Result<Tensor, ModelError> {
        let img = self.encode_images(images, fwd)?;
        let txt = self.encode_texts(ids, mask, fwd)?;
        let logits = self.logits(&img, &txt)?;
        let n = logits.dim(0)?;
        let targets = Tensor::arange(0u32, n as u32, &Device::Cpu)?;
        let ones = Tensor::ones(n, DType::F32, &Device::Cpu)?;
        let i2t = super::ops::cross_entropy(&logits, &targets, &ones, 0.0)?;
        let t2i = super::ops::cross_entropy(&logits.t()?.contiguous()?, &targets, &ones, 0.0)?;
        Ok(((i2t + t2i)? * 0.5)?)
    }

    /// The temperature's current logit scale (exp of the learned log-scale).
    pub fn scale(&self) -> Result<f64, ModelError> {
        Ok(self.logit_scale.exp()?.to_vec1::<f32>()?[0] as f64)
    }

    /// Loads a tower written by [`Clip::save_vision`] (the heads keep their initial values).
    pub fn load_vision(&self, path: &std::path::Path) -> Result<usize, ModelError> {
        let err = |source| ModelError::Checkpoint {
            path: path.to_path_buf(),
            source,
        };
        let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(err)?;
        let store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        for (name, t) in &tensors {
            let v = store
                .entries
                .get(name)
                .and_then(|e| e.var())
                .ok_or_else(|| ModelError::UnknownTensor {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    what: "vision",
                })?;
            v.set(t).map_err(err)?;
        }
        Ok(tensors.len())
    }

    /// Mean-pooled patch tokens of every block, (B, W) each: what a probe of the tower reads.
    pub fn block_features(&self, images: &Tensor) -> Result<Vec<Tensor>, ModelError> {
        let outs = self.vit.forward(images, self.depth, Fwd::EVAL)?;
        Ok(outs
            .iter()
            .map(|x| x.mean(1))
            .collect::<candle_core::Result<_>>()?)
    }

    /// Writes the vision tower's tensors (`vision.*` only: the heads and the text tower are
    /// pretraining scaffolding) as safetensors.
    pub fn save_vision(&self, path: &std::path::Path) -> Result<(), ModelError> {
        let map: std::collections::HashMap<String, Tensor> = self
            .trainable_vars()
            .into_iter()
            .filter(|t| t.component == Component::Vision)
            .map(|t| (t.name, t.var.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&map, path).map_err(|source| ModelError::Checkpoint {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Rows scaled to unit L2 norm.
fn normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-6)?;
    x.broadcast_div(&norm)
}
