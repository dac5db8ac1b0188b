//! Causal language-model decoder in the LLaMA / Phi-3 style (Touvron et al. 2023; Abdin et
//! al., "Phi-3 Technical Report", 2024): RMSNorm, rotary positions, fused `qkv_proj`, SwiGLU
//! `gate_up_proj`/`down_proj`, untied `lm_head`, and a KV cache for decoding. RoPE may carry
//! Phi-3's LongRoPE rescaling ([`super::config::RopeScaling`], short factors only).
//!
//! The same layers in OPT's form ([`LmLayout::Opt`], BLIP-2's LM): LayerNorm with bias, learned
//! absolute positions added to the input (counted from the first position the decoder sees, so
//! a visual prefix takes the first ones, as BLIP-2 places its query tokens), a ReLU MLP in the
//! `gate_up_proj` / `down_proj` slots (so LoRA targets name it alike) and biases on every
//! linear. Its attention scales queries after their bias, which equals our scaling of scores.
//!
//! The token-embedding table is read by rows and converted to f32: a QLoRA base may hold it
//! in bf16 where that is exact (`Builder::base_lookup`).
//!
//! Fusion hooks: decoder layers listed by [`ModelConfig::xattn_layers`] carry a cross-attention
//! sublayer onto the visual tokens (connector component): tanh-gated with the gate initialised
//! to zero for `multilevel` (Flamingo-style), so training starts from the text-only decoder;
//! for `late` gated alike when the model is built on a checkpoint (`fusion_opts.late_gated`),
//! so that the layers the checkpoint lacks leave it as it is, and plain for the tiny presets. Bottleneck adapters sit after the attention and MLP sublayers when the
//! PEFT method asks for them.

use candle_core::{Result as CResult, Tensor};

use super::config::{Fusion, LmLayout, ModelConfig};
use super::kernels::{self, KvCache};
use super::linear::{Adapter, LayerNorm, Linear, RmsNorm};
use super::ops::{self, Fwd, Rope};
use super::params::{Builder, Component, Init};
use super::ModelError;

/// Multi-head attention from queries of width `dq` onto a memory of width `dkv`.
#[derive(Debug, Clone)]
pub(crate) struct CrossAttention {
    q_proj: Linear,
    kv_proj: Linear,
    o_proj: Linear,
    heads: usize,
    width: usize,
}

impl CrossAttention {
    pub(crate) fn new(
        b: &Builder<'_>,
        dq: usize,
        dkv: usize,
        heads: usize,
        bias: bool,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            q_proj: b.linear("q_proj", dq, dq, bias)?,
            kv_proj: b.linear("kv_proj", dkv, 2 * dq, bias)?,
            o_proj: b.linear("o_proj", dq, dq, bias)?,
            heads,
            width: dq,
        })
    }

    /// Keys and values of the memory, (B,H,S,d) each; computed once per image when decoding.
    pub fn memory(&self, mem: &Tensor, fwd: Fwd<'_>) -> CResult<(Tensor, Tensor)> {
        let kv = self.kv_proj.forward(mem, fwd)?;
        let k = ops::split_heads(&kv.narrow(2, 0, self.width)?, self.heads)?;
        let v = ops::split_heads(&kv.narrow(2, self.width, self.width)?, self.heads)?;
        Ok((k, v))
    }

    pub fn forward(&self, x: &Tensor, k: &Tensor, v: &Tensor, fwd: Fwd<'_>) -> CResult<Tensor> {
        let q = ops::split_heads(&self.q_proj.forward(x, fwd)?, self.heads)?;
        let a = ops::merge_heads(&ops::attention(&q, k, v, None)?)?;
        self.o_proj.forward(&a, fwd)
    }
}

/// The decoder's norms: RMSNorm (LLaMA family) or LayerNorm with bias (OPT, eps 1e-5 as
/// `nn.LayerNorm`'s default that OPT uses).
#[derive(Debug, Clone)]
enum Norm {
    Rms(RmsNorm),
    Layer(LayerNorm),
}

impl Norm {
    fn new(b: &Builder<'_>, name: &str, cfg: &ModelConfig) -> Result<Self, ModelError> {
        Ok(match cfg.lm.layout {
            LmLayout::Llama => Norm::Rms(b.rms_norm_eps(name, cfg.lm.width, cfg.lm.rms_eps)?),
            LmLayout::Opt { .. } => Norm::Layer(b.layer_norm(name, cfg.lm.width)?),
        })
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        match self {
            Norm::Rms(n) => n.forward(x),
            Norm::Layer(n) => n.forward(x),
        }
    }
}

#[derive(Debug, Clone)]
struct XAttn {
    norm: RmsNorm,
    attn: CrossAttention,
    /// `multilevel`, and `late` on a checkpoint: scalar gate, output scaled by tanh(gate),
    /// zero at init.
    gate: Option<Tensor>,
}

#[derive(Debug, Clone)]
struct Layer {
    ln1: Norm,
    qkv_proj: Linear,
    o_proj: Linear,
    ad_attn: Option<Adapter>,
    xattn: Option<XAttn>,
    ln2: Norm,
    gate_up_proj: Linear,
    down_proj: Linear,
    ad_mlp: Option<Adapter>,
    heads: usize,
    width: usize,
    /// OPT: ReLU MLP (ungated), no RoPE.
    opt: bool,
}

/// Per-layer self-attention cache plus the visual keys/values of cross-attention layers.
#[derive(Debug, Clone)]
pub struct LmState {
    /// Preallocated for the model's longest sequence on the first forward, written in place.
    kv: Vec<Option<KvCache>>,
    vis_kv: Vec<Option<(Tensor, Tensor)>>,
    /// Positions already in the cache.
    pub pos: usize,
}

impl LmState {
    /// Keeps rows `idx` (beam reordering / expansion to beams or samples): row `r` becomes old
    /// row `idx[r]`, in every layer's cache and cross-attention memory.
    pub fn select(&mut self, idx: &[u32]) -> CResult<()> {
        for c in self.kv.iter_mut().flatten() {
            c.select(idx)?;
        }
        let identity = idx.iter().enumerate().all(|(r, &i)| i as usize == r);
        let rows = self.vis_kv.iter().flatten().next().map(|(k, _)| k.dim(0));
        if let Some(rows) = rows {
            if !(identity && rows? == idx.len()) {
                let t = Tensor::from_vec(idx.to_vec(), idx.len(), &candle_core::Device::Cpu)?;
                for e in self.vis_kv.iter_mut().flatten() {
                    let t = t.to_device(e.0.device())?;
                    *e = (e.0.index_select(&t, 0)?, e.1.index_select(&t, 0)?);
                }
            }
        }
        Ok(())
    }
}

impl Layer {
    fn new(b: &Builder<'_>, cfg: &ModelConfig, xattn: bool) -> Result<Self, ModelError> {
        let (w, h) = (cfg.lm.width, cfg.lm.mlp_hidden);
        let xattn = if xattn {
            let c = b.with_component(Component::Connector).pp("xattn");
            let gated = match cfg.fusion {
                Fusion::Multilevel => true,
                Fusion::Late => cfg.fusion_opts.late_gated,
                Fusion::Early => false,
            };
            let gate = if gated {
                Some(c.base("gate", &[1], Init::Zeros, false)?)
            } else {
                None
            };
            Some(XAttn {
                norm: c.rms_norm("norm", w)?,
                attn: CrossAttention::new(&c, w, w, cfg.lm.heads, false)?,
                gate,
            })
        } else {
            None
        };
        let opt = matches!(cfg.lm.layout, LmLayout::Opt { .. });
        let gate = if opt { 1 } else { 2 };
        Ok(Self {
            ln1: Norm::new(b, "input_layernorm", cfg)?,
            qkv_proj: b.pp("self_attn").linear("qkv_proj", w, 3 * w, opt)?,
            o_proj: b.pp("self_attn").linear("o_proj", w, w, opt)?,
            ad_attn: b.adapter("adapter_attn", w)?,
            xattn,
            ln2: Norm::new(b, "post_attention_layernorm", cfg)?,
            gate_up_proj: b.pp("mlp").linear("gate_up_proj", w, gate * h, opt)?,
            down_proj: b.pp("mlp").linear("down_proj", h, w, opt)?,
            ad_mlp: b.adapter("adapter_mlp", w)?,
            heads: cfg.lm.heads,
            width: w,
            opt,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        causal: bool,
        cache: Option<&mut Option<KvCache>>,
        vis: Option<&(Tensor, Tensor)>,
        fwd: Fwd<'_>,
    ) -> CResult<Tensor> {
        let qkv = self.qkv_proj.forward(&self.ln1.forward(x)?, fwd)?;
        let a = match cache {
            // Decoding: new keys/values go into the preallocated cache, in place.
            Some(c) => {
                let c = c.get_or_insert_with(|| {
                    KvCache::new(
                        x.dim(0).unwrap_or(0),
                        self.heads,
                        self.width / self.heads,
                        rope.max_pos(),
                    )
                });
                let (cos, sin) = rope.tables();
                kernels::cached_attention(&qkv, self.heads, (&cos[..], &sin[..]), c)?
            }
            // Training / full recompute: one fused op from qkv to the merged heads.
            None => {
                let rope = (!self.opt).then(|| rope.tables());
                kernels::self_attention(&qkv, self.heads, causal, rope)?
            }
        };
        let mut a = self.o_proj.forward(&a, fwd)?;
        if let Some(ad) = &self.ad_attn {
            a = ad.forward(&a, fwd)?;
        }
        let mut x = (x + a)?;
        if let (Some(xa), Some((vk, vv))) = (&self.xattn, vis) {
            let mut c = xa.attn.forward(&xa.norm.forward(&x)?, vk, vv, fwd)?;
            if let Some(g) = &xa.gate {
                c = c.broadcast_mul(&g.tanh()?)?;
            }
            x = (x + c)?;
        }
        let gu = self.gate_up_proj.forward(&self.ln2.forward(&x)?, fwd)?;
        let m = if self.opt {
            gu.relu()?
        } else {
            ops::swiglu(&gu)?
        };
        let mut m = self.down_proj.forward(&m, fwd)?;
        if let Some(ad) = &self.ad_mlp {
            m = ad.forward(&m, fwd)?;
        }
        x + m
    }
}

#[derive(Debug, Clone)]
pub struct Lm {
    embed: Tensor,
    /// OPT's learned positions: row p + 2 for position p.
    embed_positions: Option<Tensor>,
    layers: Vec<Layer>,
    norm: Norm,
    lm_head: Linear,
    /// RoPE tables (the identity rotation for OPT: the cached decoding kernel takes tables).
    rope: Rope,
}

/// Rows before position 0 in OPT's learned position table (transformers' offset).
const OPT_POSITION_OFFSET: usize = 2;

impl Lm {
    /// `max_pos`: longest sequence (visual prefix + caption + BOS/EOS) the RoPE table covers.
    pub(crate) fn new(
        b: &Builder<'_>,
        cfg: &ModelConfig,
        max_pos: usize,
    ) -> Result<Self, ModelError> {
        if let Some(s) = &cfg.lm.rope_scaling {
            // Past this length LongRoPE switches to its long factors, which we do not keep.
            if max_pos > s.original_max_position_embeddings {
                return Err(ModelError::Config {
                    problems: vec![format!(
                        "sequences of up to {max_pos} positions exceed the {} that LongRoPE's \
                         short factors serve",
                        s.original_max_position_embeddings
                    )],
                });
            }
        }
        if let LmLayout::Opt { positions } = cfg.lm.layout {
            if max_pos + OPT_POSITION_OFFSET > positions {
                return Err(ModelError::Config {
                    problems: vec![format!(
                        "sequences of up to {max_pos} positions exceed the {} learned positions",
                        positions.saturating_sub(OPT_POSITION_OFFSET)
                    )],
                });
            }
        }
        let xl = cfg.xattn_layers();
        let w = cfg.lm.width;
        let layers = (0..cfg.lm.depth)
            .map(|i| Layer::new(&b.pp("layers").pp(i), cfg, xl.contains(&i)))
            .collect::<Result<_, _>>()?;
        let dev = b.device();
        Ok(Self {
            embed: b.pp("embed_tokens").base_lookup(
                "weight",
                &[cfg.vocab_size, w],
                Init::Normal(0.02),
            )?,
            embed_positions: match cfg.lm.layout {
                LmLayout::Opt { positions } => Some(b.pp("embed_positions").base(
                    "weight",
                    &[positions, w],
                    Init::Normal(0.02),
                    false,
                )?),
                LmLayout::Llama => None,
            },
            layers,
            norm: Norm::new(b, "norm", cfg)?,
            lm_head: b.linear("lm_head", w, cfg.vocab_size, false)?,
            rope: match cfg.lm.layout {
                LmLayout::Llama => Rope::scaled(
                    w / cfg.lm.heads,
                    max_pos,
                    cfg.lm.rope_theta,
                    cfg.lm.rope_scaling.as_ref(),
                    &dev,
                )?,
                LmLayout::Opt { .. } => Rope::identity(w / cfg.lm.heads, max_pos),
            },
        })
    }

    /// Token embeddings (B,T) u32 -> (B,T,D).
    pub fn embed(&self, ids: &Tensor) -> CResult<Tensor> {
        let (b, t) = ids.dims2()?;
        // A QLoRA base may hold the table in bf16 (exact values, see `Builder::base_lookup`).
        self.embed
            .index_select(&ids.flatten_all()?, 0)?
            .to_dtype(candle_core::DType::F32)?
            .reshape((b, t, ()))
    }

    /// Visual keys/values of each cross-attention layer.
    pub fn memory(&self, vis: &Tensor, fwd: Fwd<'_>) -> CResult<Vec<Option<(Tensor, Tensor)>>> {
        self.layers
            .iter()
            .map(|l| {
                l.xattn
                    .as_ref()
                    .map(|xa| xa.attn.memory(vis, fwd))
                    .transpose()
            })
            .collect()
    }

    pub fn new_state(&self, vis_kv: Vec<Option<(Tensor, Tensor)>>) -> LmState {
        LmState {
            kv: vec![None; self.layers.len()],
            vis_kv,
            pos: 0,
        }
    }

    /// Runs embeddings `x` (B,T,D) through the decoder; with `state`, appends to its cache.
    /// Without a state, `vis_kv` supplies the cross-attention memory.
    pub fn forward(
        &self,
        x: &Tensor,
        vis_kv: &[Option<(Tensor, Tensor)>],
        mut state: Option<&mut LmState>,
        fwd: Fwd<'_>,
    ) -> CResult<Tensor> {
        let t = x.dim(1)?;
        let offset = state.as_ref().map_or(0, |s| s.pos);
        if offset + t > self.rope.max_pos() {
            candle_core::bail!(
                "sequence of {} positions exceeds the model's {}",
                offset + t,
                self.rope.max_pos()
            );
        }
        let mut x = match &self.embed_positions {
            Some(p) => x.broadcast_add(&p.narrow(0, offset + OPT_POSITION_OFFSET, t)?)?,
            None => x.clone(),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let (cache, vis) = match state.as_deref_mut() {
                Some(s) => (Some(&mut s.kv[i]), s.vis_kv[i].clone()),
                None => (None, vis_kv.get(i).cloned().flatten()),
            };
            x = layer.forward(&x, &self.rope, t > 1, cache, vis.as_ref(), fwd)?;
        }
        if let Some(s) = state {
            s.pos += t;
        }
        Ok(x)
    }

    pub fn logits(&self, hidden: &Tensor, fwd: Fwd<'_>) -> CResult<Tensor> {
        self.lm_head.forward(&self.norm.forward(hidden)?, fwd)
    }
}
