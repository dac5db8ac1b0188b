//! Model and PEFT configuration: the serde forms the spec resolves into, with named presets.
//!
//! `ModelConfig::tiny` is what the CPU sweeps train; `ModelConfig::real` documents the GPU-size
//! shapes of each family (not trained here, kept so the code paths are shaped for them).

use serde::{Deserialize, Serialize};

use super::ModelError;

/// Vision-language architecture family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backbone {
    /// ViT -> Q-Former (learned queries) -> linear -> LM.
    Blip2,
    /// ViT penultimate patch features -> 2-layer MLP projector -> LM.
    Llava,
    /// HD transform (global view + grid of local crops, separator tokens) -> projector -> LM.
    Phi3v,
}

/// Where the visual tokens enter the language model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fusion {
    /// Visual tokens are prepended to the text sequence.
    Early,
    /// Only the top decoder layers cross-attend to the visual tokens.
    Late,
    /// Several encoder depths, pooled by learned attention over levels, injected into several
    /// decoder layers through zero-initialised gated cross-attention.
    Multilevel,
}

/// ViT encoder shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionConfig {
    /// Side of the square image the encoder sees (one view).
    pub image_size: usize,
    pub patch_size: usize,
    pub width: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp_ratio: usize,
    /// Class token, embedding norm and activation of pretrained encoders (CLIP); the default
    /// (none of them, tanh GELU) is the tiny presets' encoder and is not serialized.
    #[serde(default, skip_serializing_if = "VitLayout::is_plain")]
    pub layout: VitLayout,
    /// How pixels become tokens; the default (a patchify linear) is not serialized.
    #[serde(default, skip_serializing_if = "VitStem::is_patch")]
    pub stem: VitStem,
    /// LayerNorm epsilon of the blocks (and of the pre/post norms): 1e-5 (CLIP, the tiny
    /// presets) is not serialized; BLIP-2's tower uses 1e-6.
    #[serde(default = "default_ln_eps", skip_serializing_if = "is_default_ln_eps")]
    pub norm_eps: f64,
    /// MLP width where it is not `mlp_ratio * width` (BLIP-2's EVA tower: 6144 for 1408);
    /// 0, not serialized, means the ratio.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mlp_hidden: usize,
}

impl VisionConfig {
    /// Width of the block MLPs.
    pub fn mlp_width(&self) -> usize {
        if self.mlp_hidden > 0 {
            self.mlp_hidden
        } else {
            self.width * self.mlp_ratio
        }
    }
}

/// LayerNorm epsilon of the tiny presets' ViT and of CLIP (`nn.LayerNorm`'s default).
pub const DEFAULT_LN_EPS: f64 = 1e-5;

fn default_ln_eps() -> f64 {
    DEFAULT_LN_EPS
}

fn is_default_ln_eps(e: &f64) -> bool {
    *e == DEFAULT_LN_EPS
}

/// How the ViT turns pixels into its `(image_size / patch_size)^2` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VitStem {
    /// One linear over each `patch_size`² patch (a stride-p convolution): pretrained ViTs.
    #[default]
    Patch,
    /// log2(`patch_size`) stages of 3x3 convolution, LayerNorm over channels, GELU and 2x2 max
    /// pooling (channels 16, 32, 64, ... up to the width), for encoders trained from scratch
    /// on few images (`model.stem = "conv"`; see docs/models.md for what it does and does not
    /// learn at the ablation's budget).
    Conv,
    /// A 2x2 patchify linear (LayerNorm, GELU) that halves the resolution, then
    /// log2(`patch_size`) - 1 of the `Conv` stages: the same token grid and pooling for about a
    /// fifth of the conv stem's time, since no 3x3 convolution runs at full resolution
    /// (`model.stem = "patch_conv"`; docs/models.md).
    PatchConv,
}

impl VitStem {
    pub fn is_patch(&self) -> bool {
        *self == VitStem::Patch
    }
}

/// MLP activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// GELU, tanh approximation (the tiny presets).
    #[default]
    GeluTanh,
    /// GELU with the exact erf (Hugging Face `gelu`).
    Gelu,
    /// `x * sigmoid(1.702 x)` (CLIP's `quick_gelu`).
    QuickGelu,
}

impl Activation {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// The parts of a ViT that pretrained encoders add to the tiny presets' plain one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VitLayout {
    /// A learned class token before the patch tokens (its position embedding first); the
    /// connectors read the patch tokens only (LLaVA's `default` feature selection).
    pub class_token: bool,
    /// LayerNorm on the embeddings before the first block (CLIP's `pre_layrnorm`).
    pub pre_norm: bool,
    /// No bias on the patch embedding (CLIP's convolution has none).
    pub patch_bias_free: bool,
    /// Activation of the block MLPs.
    pub act: Activation,
    /// LayerNorm on the last block's output (BLIP-2's `post_layernorm`), which the connector
    /// reads. Not serialized when off, so CLIP layouts read as they did before it existed.
    #[serde(skip_serializing_if = "is_false")]
    pub post_norm: bool,
    /// The connector reads the class token too (BLIP-2's Q-Former attends to every token of
    /// the tower's output); otherwise the patch tokens only. Not serialized when off.
    #[serde(skip_serializing_if = "is_false")]
    pub read_class_token: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl VitLayout {
    pub fn is_plain(&self) -> bool {
        *self == Self::default()
    }
    /// CLIP's vision tower.
    pub fn clip(act: Activation) -> Self {
        Self {
            class_token: true,
            pre_norm: true,
            patch_bias_free: true,
            act,
            post_norm: false,
            read_class_token: false,
        }
    }
    /// BLIP-2's vision tower (EVA ViT-g in the published checkpoints): a class token, a patch
    /// embedding with bias, no pre-norm, exact GELU, a post-norm, and the class token read.
    pub fn blip2() -> Self {
        Self {
            class_token: true,
            pre_norm: false,
            patch_bias_free: false,
            act: Activation::Gelu,
            post_norm: true,
            read_class_token: true,
        }
    }
}

/// RMSNorm epsilon of the tiny presets.
pub const DEFAULT_RMS_EPS: f64 = 1e-5;

fn default_rms_eps() -> f64 {
    DEFAULT_RMS_EPS
}

fn is_default_rms_eps(e: &f64) -> bool {
    *e == DEFAULT_RMS_EPS
}

/// Causal decoder shape (Phi-3 / LLaMA style).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmConfig {
    pub width: usize,
    pub depth: usize,
    pub heads: usize,
    /// SwiGLU hidden size.
    pub mlp_hidden: usize,
    pub rope_theta: f64,
    /// RMSNorm epsilon (checkpoints say theirs; 1e-5 is not serialized).
    #[serde(
        default = "default_rms_eps",
        skip_serializing_if = "is_default_rms_eps"
    )]
    pub rms_eps: f64,
    /// LongRoPE rescaling of the rotary frequencies (Phi-3 long-context checkpoints); absent
    /// (plain RoPE, the tiny presets) it is not serialized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// The decoder family; the default (LLaMA / Phi-3) is not serialized.
    #[serde(default, skip_serializing_if = "LmLayout::is_llama")]
    pub layout: LmLayout,
}

/// Which decoder family the LM's layers follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum LmLayout {
    /// RMSNorm, RoPE, SwiGLU, no biases: LLaMA, Phi-3 and the tiny presets.
    #[default]
    Llama,
    /// OPT (Zhang et al., "OPT: Open Pre-trained Transformer Language Models", 2022; the LM of
    /// BLIP-2's OPT checkpoints): pre-LN with LayerNorm (eps `rms_eps`, with bias), learned
    /// absolute positions (`positions` rows, position p at row p + 2 as transformers stores
    /// them), a ReLU MLP (in our `gate_up_proj` / `down_proj` slots, ungated), biases on every
    /// linear, no RoPE.
    Opt { positions: usize },
}

impl LmLayout {
    pub fn is_llama(&self) -> bool {
        *self == LmLayout::Llama
    }
}

/// LongRoPE ("su" in Phi-3 configs; Ding et al., "LongRoPE", 2024): rotary frequency `i` is
/// divided by `short_factor[i]`, and cos/sin are scaled by `attention_factor`. Checkpoints also
/// carry long factors for sequences beyond `original_max_position_embeddings`; ours are far
/// shorter, and a decoder whose sequences could reach that length is refused when built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeScaling {
    /// One factor per rotary frequency (head_dim / 2).
    pub short_factor: Vec<f64>,
    pub attention_factor: f64,
    /// Longest sequence the short factors serve.
    pub original_max_position_embeddings: usize,
}

/// Q-Former shape (used by `blip2` only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QFormerConfig {
    pub queries: usize,
    pub width: usize,
    pub depth: usize,
    pub heads: usize,
    /// Which Q-Former; the default (the tiny presets' own) is not serialized.
    #[serde(default, skip_serializing_if = "QFormerLayout::is_tiny")]
    pub layout: QFormerLayout,
}

/// The two Q-Former layouts.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum QFormerLayout {
    /// Pre-LN layers, each with self-attention, cross-attention onto the image features and a
    /// tanh-GELU MLP of 4x the width, then a final LayerNorm (the tiny presets,
    /// [`super::connector`]).
    #[default]
    Tiny,
    /// BLIP-2's checkpoints ([`super::qformer`]): a LayerNorm on the query embeddings, then
    /// post-LN BERT layers (LayerNorm eps `eps`) with cross-attention in every
    /// `cross_every`-th layer (the first included) and an exact-GELU MLP of width
    /// `mlp_hidden`.
    Bert {
        cross_every: usize,
        mlp_hidden: usize,
        eps: f64,
    },
}

impl QFormerLayout {
    pub fn is_tiny(&self) -> bool {
        *self == QFormerLayout::Tiny
    }
}

/// Fusion placement knobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FusionConfig {
    /// `late`: how many top decoder layers get cross-attention.
    pub late_layers: usize,
    /// `multilevel`: encoder depths (1-based block outputs) pooled; empty = every block.
    pub levels: Vec<usize>,
    /// `multilevel`: decoder layers (0-based) with gated cross-attention; empty = every layer.
    pub inject: Vec<usize>,
    /// `late`: scale the cross-attention by tanh(gate), the gate zero at init, as `multilevel`
    /// always does. Set for checkpoints ([`super::hf::Checkpoint::configure`]): the layers the
    /// checkpoint lacks then start as no-ops, so the model starts equal to the checkpoint.
    /// Absent (false) for the tiny presets, whose documented results use the plain sublayer.
    #[serde(default, skip_serializing_if = "is_false")]
    pub late_gated: bool,
}

/// Everything that fixes the network's shape and initialisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub backbone: Backbone,
    pub fusion: Fusion,
    pub vision: VisionConfig,
    pub lm: LmConfig,
    pub qformer: QFormerConfig,
    pub fusion_opts: FusionConfig,
    /// `phi3v`: local crops per side; the input image is `image_size * hd_grid` pixels.
    pub hd_grid: usize,
    pub vocab_size: usize,
    /// Longest caption in tokens, without BOS/EOS.
    pub max_caption_len: usize,
    pub pad_id: u32,
    pub bos_id: u32,
    pub eos_id: u32,
    /// True when encoder and LM start from pretrained weights: `align` then trains the
    /// connector only. The tiny presets have none, so `align` trains everything from scratch.
    pub pretrained: bool,
    /// Seed of the deterministic initialisation (each tensor draws from `(seed, name)`).
    pub seed: u64,
    /// Activation between the two projector linears (`llava`, `phi3v`); checkpoints say theirs.
    #[serde(default, skip_serializing_if = "Activation::is_default")]
    pub projector_act: Activation,
    /// Retrieval augmentation (`model.retrieve`): how many captions of each image's nearest
    /// training images the decoder reads beside the visual tokens (0: none, not serialized).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retrieved: usize,
    /// Components that `align` trains beside the connector when the encoder and LM are
    /// pretrained (`stages.pretrain_align.unfreeze`; empty: the connector only, as LLaVA's
    /// first stage).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub align_unfreeze: Vec<super::params::Component>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl ModelConfig {
    /// The CPU preset the sweeps train: ViT 64 px / patch 16 (a 4x4 grid: 16 tokens per view),
    /// width 96, depth 2; LM width 128, 2 layers, 4 heads. `phi3v` reads a 128 px image (global
    /// view = 64 px, 2x2 crops of 64 px); each view's 16 tokens (penultimate block, as
    /// Phi-3-Vision) are 2x2-merged to 4, so the HD sequence is 27 tokens. Patch 16 rather than 8: on 64 px synthetic images the 64-token
    /// grid cost 2-4x the training time without helping the model (measured in
    /// `scripts/bench-model.sh`); every backbone keeps its architecture.
    pub fn tiny(
        backbone: Backbone,
        fusion: Fusion,
        vocab_size: usize,
        pad: u32,
        bos: u32,
        eos: u32,
    ) -> Self {
        Self {
            backbone,
            fusion,
            vision: VisionConfig {
                image_size: 64,
                patch_size: 16,
                width: 96,
                depth: 2,
                heads: 4,
                mlp_ratio: 2,
                layout: VitLayout::default(),
                stem: VitStem::Patch,
                norm_eps: DEFAULT_LN_EPS,
                mlp_hidden: 0,
            },
            lm: LmConfig {
                width: 128,
                depth: 2,
                heads: 4,
                mlp_hidden: 256,
                rope_theta: 10_000.0,
                rms_eps: DEFAULT_RMS_EPS,
                rope_scaling: None,
                layout: LmLayout::Llama,
            },
            qformer: QFormerConfig {
                queries: 16,
                width: 96,
                depth: 1,
                heads: 4,
                layout: QFormerLayout::Tiny,
            },
            fusion_opts: FusionConfig {
                late_layers: 1,
                levels: Vec::new(),
                inject: Vec::new(),
                late_gated: false,
            },
            hd_grid: 2,
            vocab_size,
            max_caption_len: 32,
            pad_id: pad,
            bos_id: bos,
            eos_id: eos,
            pretrained: false,
            seed: 0,
            projector_act: Activation::default(),
            retrieved: 0,
            align_unfreeze: Vec::new(),
        }
    }

    /// Real-size shapes of each family (documentation and GPU use; not trained in CI):
    /// blip2 ~ ViT-g/14 224 + 32-query Q-Former + 2.7B-class LM; llava ~ CLIP ViT-L/14 336 +
    /// 7B-class LM; phi3v ~ CLIP ViT-L/14 336 with a 4x4 HD grid + Phi-3-mini (3072 wide, 32 layers).
    pub fn real(
        backbone: Backbone,
        fusion: Fusion,
        vocab_size: usize,
        pad: u32,
        bos: u32,
        eos: u32,
    ) -> Self {
        let mut c = Self::tiny(backbone, fusion, vocab_size, pad, bos, eos);
        c.pretrained = true;
        c.max_caption_len = 96;
        c.fusion_opts.late_layers = 8;
        match backbone {
            Backbone::Blip2 => {
                c.vision = VisionConfig {
                    image_size: 224,
                    patch_size: 14,
                    width: 1408,
                    depth: 39,
                    heads: 16,
                    mlp_ratio: 4,
                    layout: VitLayout::default(),
                    stem: VitStem::Patch,
                    norm_eps: DEFAULT_LN_EPS,
                    mlp_hidden: 0,
                };
                c.qformer = QFormerConfig {
                    queries: 32,
                    width: 768,
                    depth: 12,
                    heads: 12,
                    layout: QFormerLayout::Tiny,
                };
                c.lm = LmConfig {
                    width: 2560,
                    depth: 32,
                    heads: 32,
                    mlp_hidden: 6912,
                    rope_theta: 10_000.0,
                    rms_eps: DEFAULT_RMS_EPS,
                    rope_scaling: None,
                    layout: LmLayout::Llama,
                };
            }
            Backbone::Llava => {
                c.vision = VisionConfig {
                    image_size: 336,
                    patch_size: 14,
                    width: 1024,
                    depth: 24,
                    heads: 16,
                    mlp_ratio: 4,
                    layout: VitLayout::default(),
                    stem: VitStem::Patch,
                    norm_eps: DEFAULT_LN_EPS,
                    mlp_hidden: 0,
                };
                c.lm = LmConfig {
                    width: 4096,
                    depth: 32,
                    heads: 32,
                    mlp_hidden: 11008,
                    rope_theta: 10_000.0,
                    rms_eps: DEFAULT_RMS_EPS,
                    rope_scaling: None,
                    layout: LmLayout::Llama,
                };
            }
            Backbone::Phi3v => {
                c.vision = VisionConfig {
                    image_size: 336,
                    patch_size: 14,
                    width: 1024,
                    depth: 24,
                    heads: 16,
                    mlp_ratio: 4,
                    layout: VitLayout::default(),
                    stem: VitStem::Patch,
                    norm_eps: DEFAULT_LN_EPS,
                    mlp_hidden: 0,
                };
                c.lm = LmConfig {
                    width: 3072,
                    depth: 32,
                    heads: 32,
                    mlp_hidden: 8192,
                    rope_theta: 10_000.0,
                    rms_eps: DEFAULT_RMS_EPS,
                    rope_scaling: None,
                    layout: LmLayout::Llama,
                };
                c.hd_grid = 4;
            }
        }
        c
    }

    /// Side in pixels of the (square) image tensor the model expects.
    pub fn input_size(&self) -> usize {
        match self.backbone {
            Backbone::Phi3v => self.vision.image_size * self.hd_grid,
            _ => self.vision.image_size,
        }
    }

    /// Longest retrieved-caption prompt in tokens: `retrieved` captions of at most
    /// `max_caption_len` tokens, each closed by EOS.
    pub fn prompt_len(&self) -> usize {
        self.retrieved * (self.max_caption_len + 1)
    }

    /// Encoder block outputs (1-based) pooled by `multilevel`.
    pub fn levels(&self) -> Vec<usize> {
        if self.fusion_opts.levels.is_empty() {
            (1..=self.vision.depth).collect()
        } else {
            self.fusion_opts.levels.clone()
        }
    }

    /// Decoder layers (0-based) that cross-attend to visual tokens; empty for `early`.
    pub fn xattn_layers(&self) -> Vec<usize> {
        let d = self.lm.depth;
        match self.fusion {
            Fusion::Early => Vec::new(),
            Fusion::Late => (d.saturating_sub(self.fusion_opts.late_layers)..d).collect(),
            Fusion::Multilevel => {
                if self.fusion_opts.inject.is_empty() {
                    (0..d).collect()
                } else {
                    self.fusion_opts.inject.clone()
                }
            }
        }
    }

    /// Checks every constraint at once and reports all violations together.
    pub fn validate(&self) -> Result<(), ModelError> {
        let mut errs = Vec::new();
        let v = &self.vision;
        if v.patch_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            errs.push(format!(
                "vision.image_size {} is not a multiple of vision.patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        if v.heads == 0 || !v.width.is_multiple_of(v.heads) {
            errs.push(format!(
                "vision.width {} is not divisible by vision.heads {}",
                v.width, v.heads
            ));
        }
        if v.depth == 0 {
            errs.push("vision.depth must be at least 1".into());
        }
        if v.stem == VitStem::PatchConv && v.patch_size < 4 {
            errs.push(format!(
                "vision.stem patch_conv needs vision.patch_size of at least 4, got {}",
                v.patch_size
            ));
        }
        if v.stem != VitStem::Patch && (v.patch_size < 2 || !v.patch_size.is_power_of_two()) {
            errs.push(format!(
                "vision.stem conv pools by 2 per stage: vision.patch_size {} must be a power of \
                 two of at least 2",
                v.patch_size
            ));
        }
        let l = &self.lm;
        if l.heads == 0
            || !l.width.is_multiple_of(l.heads)
            || !(l.width / l.heads.max(1)).is_multiple_of(2)
        {
            errs.push(format!(
                "lm.width {} must split into lm.heads {} of even size",
                l.width, l.heads
            ));
        }
        if l.depth == 0 {
            errs.push("lm.depth must be at least 1".into());
        }
        let q = &self.qformer;
        if self.backbone == Backbone::Blip2
            && (q.heads == 0 || !q.width.is_multiple_of(q.heads) || q.queries == 0)
        {
            errs.push(format!(
                "qformer.width {} must split into qformer.heads {} and queries > 0",
                q.width, q.heads
            ));
        }
        if let QFormerLayout::Bert {
            cross_every,
            mlp_hidden,
            ..
        } = q.layout
        {
            if cross_every == 0 || mlp_hidden == 0 {
                errs.push(format!(
                    "qformer.layout: cross_every {cross_every} and mlp_hidden {mlp_hidden} must \
                     be at least 1"
                ));
            }
        }
        if self.backbone == Backbone::Phi3v
            && (!(v.image_size / v.patch_size.max(1)).is_multiple_of(2) || self.hd_grid == 0)
        {
            errs.push("phi3v needs an even patch grid (2x2 token merge) and hd_grid >= 1".into());
        }
        if self.backbone == Backbone::Llava && self.fusion != Fusion::Multilevel && v.depth < 2 {
            errs.push(
                "llava reads the penultimate encoder block: vision.depth must be at least 2".into(),
            );
        }
        for &lv in &self.fusion_opts.levels {
            if lv == 0 || lv > v.depth {
                errs.push(format!(
                    "fusion_opts.levels entry {lv} is outside 1..={}",
                    v.depth
                ));
            }
        }
        for &i in &self.fusion_opts.inject {
            if i >= l.depth {
                errs.push(format!(
                    "fusion_opts.inject entry {i} is outside 0..{}",
                    l.depth
                ));
            }
        }
        if self.fusion == Fusion::Late
            && (self.fusion_opts.late_layers == 0 || self.fusion_opts.late_layers > l.depth)
        {
            errs.push(format!(
                "fusion_opts.late_layers {} is outside 1..={}",
                self.fusion_opts.late_layers, l.depth
            ));
        }
        for (name, id) in [
            ("pad_id", self.pad_id),
            ("bos_id", self.bos_id),
            ("eos_id", self.eos_id),
        ] {
            if id as usize >= self.vocab_size {
                errs.push(format!(
                    "{name} {id} is not below vocab_size {}",
                    self.vocab_size
                ));
            }
        }
        if self.max_caption_len == 0 {
            errs.push("max_caption_len must be at least 1".into());
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ModelError::Config { problems: errs })
        }
    }
}

/// Parameter-efficient fine-tuning method of the `adapt` phase (and SCST after it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeftMethod {
    /// The LM is fully trained (the reference).
    Full,
    /// Low-rank deltas on the target linears of a frozen f32 base.
    Lora,
    /// LoRA on a frozen base stored 4-bit (Q4_0, blocks of 32).
    Qlora,
    /// Bottleneck adapters after each attention and MLP sublayer of the LM.
    Adapter,
}

/// What happens to the vision encoder in the `adapt` phase (whatever the PEFT method).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VisionPolicy {
    Frozen,
    /// LoRA (same rank/alpha) on the encoder's attention projections.
    Lora,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeftConfig {
    pub method: PeftMethod,
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// LM linear names that get LoRA: any of `qkv_proj o_proj gate_up_proj down_proj lm_head`.
    pub targets: Vec<String>,
    /// Bottleneck width of the adapters.
    pub adapter_dim: usize,
    pub vision: VisionPolicy,
    /// LM base modules trained in full during `adapt` whatever the method (PEFT libraries call
    /// them "modules to save"): any of `embed_tokens`, `lm_head`. Needed when the base LM never
    /// saw the target domain's vocabulary (the tiny presets learn theirs in pretrain-align on
    /// generic captions): with both frozen, rows of unseen tokens stay untrained and a low-rank
    /// update cannot make the model emit them.
    pub modules_to_save: Vec<String>,
}

impl Default for PeftConfig {
    fn default() -> Self {
        Self {
            method: PeftMethod::Lora,
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
                .map(String::from)
                .to_vec(),
            adapter_dim: 16,
            vision: VisionPolicy::Frozen,
            modules_to_save: Vec::new(),
        }
    }
}

impl PeftConfig {
    pub fn full() -> Self {
        Self {
            method: PeftMethod::Full,
            ..Self::default()
        }
    }

    /// The configuration a model of this one has once its LoRA pairs are folded into their
    /// bases ([`super::Captioner::merged_tensors`]): plain linears everywhere (`full`, the
    /// tower without LoRA), except that bottleneck adapters, which cannot fold, stay.
    pub fn merged(&self) -> Self {
        Self {
            method: match self.method {
                PeftMethod::Adapter => PeftMethod::Adapter,
                _ => PeftMethod::Full,
            },
            vision: VisionPolicy::Frozen,
            modules_to_save: Vec::new(),
            ..self.clone()
        }
    }
    pub fn lora(rank: usize, alpha: f64) -> Self {
        Self {
            method: PeftMethod::Lora,
            rank,
            alpha,
            ..Self::default()
        }
    }
    pub fn qlora(rank: usize, alpha: f64) -> Self {
        Self {
            method: PeftMethod::Qlora,
            rank,
            alpha,
            ..Self::default()
        }
    }
    pub fn adapter(dim: usize) -> Self {
        Self {
            method: PeftMethod::Adapter,
            adapter_dim: dim,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let mut errs = Vec::new();
        let lora = matches!(self.method, PeftMethod::Lora | PeftMethod::Qlora)
            || self.vision == VisionPolicy::Lora;
        if lora && self.rank == 0 {
            errs.push("peft.rank must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            errs.push(format!("peft.dropout {} is outside [0, 1)", self.dropout));
        }
        const KNOWN: [&str; 5] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"];
        for t in &self.targets {
            if !KNOWN.contains(&t.as_str()) {
                errs.push(format!("peft.targets entry {t:?} is not one of {KNOWN:?}"));
            }
        }
        if self.method == PeftMethod::Adapter && self.adapter_dim == 0 {
            errs.push("peft.adapter_dim must be at least 1".into());
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ModelError::Config { problems: errs })
        }
    }
}

/// Training phase the model is built for; decides which tensors are trainable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Connector only with pretrained weights; everything (from scratch) otherwise. No PEFT params.
    Align,
    /// Frozen align base + PEFT params + connector (also used by SCST).
    Adapt,
}
