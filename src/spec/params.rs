//! The validated form of a spec: what a researcher may write, with defaults.
//!
//! Every struct here rejects unknown keys, so a typo is an error with a
//! did-you-mean rather than a silently ignored setting. These are the
//! user-facing names (documented in `docs/spec.md`); stages translate them into
//! the internal configurations of `data`, `model`, `train` and `decode`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::exec::Resources;

/// One resolved cell configuration (the base spec with the cell's axis values
/// applied).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Experiment name: the sweep's name in the store and `reports/<name>/`.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Seeds to repeat every cell with.
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    #[serde(default)]
    pub data: DataSpec,
    #[serde(default)]
    pub model: ModelSpec,
    #[serde(default)]
    pub peft: PeftSpec,
    #[serde(default)]
    pub foundation: FoundationSpec,
    #[serde(default)]
    pub stages: StagesSpec,
    /// Cluster resources per stage kind (`preprocess`, `pretrain_align`, ...).
    #[serde(default)]
    pub resources: BTreeMap<String, Resources>,
    /// The grid (handled by `grid.rs`; kept here so unknown-key checks pass).
    #[serde(default)]
    pub grid: serde_json::Value,
    #[serde(default)]
    pub exclude: serde_json::Value,
    /// Sampled trials (handled by `search.rs`, likewise).
    #[serde(default)]
    pub search: serde_json::Value,
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}
pub const BACKBONES: &[&str] = &["blip2", "llava", "phi3v", "nn", "mfc"];
pub const BASELINES: &[&str] = &["nn", "mfc"];
/// `none` is the zero-shot row: the model as pretrain-align (or the checkpoint) left it, with no
/// domain-adapt and no cider-optimize (docs/models.md, "Zero-shot rows").
pub const PEFTS: &[&str] = &["full", "lora", "qlora", "adapter", ZERO_SHOT];
/// The `peft` value of a zero-shot cell.
pub const ZERO_SHOT: &str = "none";
pub const FUSIONS: &[&str] = &["early", "late", "multilevel"];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSpec {
    /// `synth` (the embedded default, generated under the runs dir) or a path
    /// to a MUGE ECommerce-IC directory (relative to the spec file).
    pub source: String,
    pub synth: SynthSpec,
    /// Bad-record policy per split: `fail` or `skip`.
    pub policy: PolicySpec,
}

impl Default for DataSpec {
    fn default() -> Self {
        DataSpec {
            source: "synth".into(),
            synth: SynthSpec::default(),
            policy: PolicySpec::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SynthSpec {
    pub seed: u64,
    pub train: usize,
    pub valid: usize,
    pub test: usize,
    pub align: usize,
    /// Generic-domain pretraining pairs for the foundation stages (`FOUNDATION_train`).
    pub foundation: usize,
}

impl Default for SynthSpec {
    fn default() -> Self {
        SynthSpec {
            seed: 0,
            train: 1000,
            valid: 200,
            test: 200,
            align: 1000,
            foundation: 20000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySpec {
    pub train: String,
    pub valid: String,
    pub test: String,
}

impl Default for PolicySpec {
    fn default() -> Self {
        PolicySpec {
            train: "skip".into(),
            valid: "fail".into(),
            test: "fail".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSpec {
    /// `tiny` (CPU, trained from scratch) or a real-size preset.
    pub preset: String,
    /// Longest caption in tokens (BOS/EOS included).
    pub max_len: usize,
    /// Optional local directory with real pretrained weights (Hugging Face layout, see
    /// `model::hf`); resolved to an absolute path when the plan is built.
    pub checkpoint: Option<PathBuf>,
    /// Vision encoder policy in PEFT stages: `frozen` or `lora`.
    pub vision: String,
    /// How the ViT turns pixels into tokens: `patch` (one linear per patch) or `conv` (a
    /// convolutional stem, for encoders trained from scratch).
    pub stem: String,
    /// Retrieval augmentation: how many captions of each image's nearest training images (the
    /// `nn` baseline's retrieval, leave-one-out in training) the decoder reads beside the
    /// visual tokens; 0 = none.
    pub retrieve: usize,
    /// Content digest of the checkpoint's files, set when the plan is built (never read from
    /// a spec); part of the pretrain-align key.
    #[serde(skip)]
    pub checkpoint_digest: Option<String>,
}

impl Default for ModelSpec {
    fn default() -> Self {
        ModelSpec {
            preset: "tiny".into(),
            max_len: 32,
            checkpoint: None,
            vision: "frozen".into(),
            stem: "patch".into(),
            retrieve: 0,
            checkpoint_digest: None,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeftSpec {
    pub lora: LoraSpec,
    pub qlora: LoraSpec,
    pub adapter: AdapterSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// LM linear layers to wrap, by module name: `qkv_proj`, `o_proj`,
    /// `gate_up_proj`, `down_proj`, `lm_head`.
    pub targets: Vec<String>,
    /// LM modules trained in full besides the PEFT parameters: `embed_tokens`,
    /// `lm_head` (see [`default_modules_to_save`]).
    pub modules_to_save: Vec<String>,
}

/// The tiny presets' LM learns its vocabulary from the generic captions of
/// pretrain-align only, so by default domain-adapt also trains the token
/// embeddings and the output head (as PEFT libraries' "modules to save");
/// set `modules_to_save = []` for a base whose vocabulary covers the domain.
pub fn default_modules_to_save() -> Vec<String> {
    vec!["embed_tokens".to_string(), "lm_head".to_string()]
}

impl Default for LoraSpec {
    fn default() -> Self {
        LoraSpec {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            modules_to_save: default_modules_to_save(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdapterSpec {
    pub bottleneck: usize,
    /// As [`LoraSpec::modules_to_save`].
    pub modules_to_save: Vec<String>,
}

impl Default for AdapterSpec {
    fn default() -> Self {
        AdapterSpec {
            bottleneck: 16,
            modules_to_save: default_modules_to_save(),
        }
    }
}

/// The foundation stages (`pretrain-vision`, `pretrain-lm`): what they share besides their
/// training settings. Their keys hold this seed instead of the cell's, so every seed of a
/// sweep fine-tunes from the same foundations, as research on a published checkpoint does.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FoundationSpec {
    pub seed: u64,
    /// Width of the contrastive joint embedding space (pretrain-vision).
    pub embed_dim: usize,
    /// Width of the contrastive text tower's token embeddings (pretrain-vision).
    pub text_width: usize,
}

impl Default for FoundationSpec {
    fn default() -> Self {
        FoundationSpec {
            seed: 0,
            embed_dim: 128,
            text_width: 128,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StagesSpec {
    pub preprocess: PreprocessSpec,
    pub pretrain_vision: TrainSpec,
    pub pretrain_lm: TrainSpec,
    pub pretrain_align: TrainSpec,
    pub domain_adapt: TrainSpec,
    pub cider_optimize: CiderSpec,
    pub evaluate: EvaluateSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreprocessSpec {
    /// Image side in pixels; 0 = the backbone preset's own resolution.
    pub image_size: u32,
    /// Augmented copies of each training image (0 = none, originals only).
    pub augment_copies: u32,
    pub flip: bool,
    /// Random-resized-crop area range.
    pub crop_scale: [f64; 2],
    /// Colour jitter strength (0 = off).
    pub jitter: f64,
    /// A real checkpoint's tokenizer.json; empty = train one on the captions (or, with
    /// `model.checkpoint`, the checkpoint directory's tokenizer.json).
    pub tokenizer: Option<PathBuf>,
    /// Content digest of the tokenizer taken from `model.checkpoint`, set when the plan is
    /// built (never read from a spec); part of the preprocess key.
    #[serde(skip)]
    pub tokenizer_digest: Option<String>,
    /// Minimum count for a character to enter the trained vocabulary.
    pub min_freq: u32,
}

impl Default for PreprocessSpec {
    fn default() -> Self {
        PreprocessSpec {
            image_size: 0,
            augment_copies: 1,
            flip: true,
            crop_scale: [0.8, 1.0],
            jitter: 0.1,
            tokenizer: None,
            tokenizer_digest: None,
            min_freq: 1,
        }
    }
}

/// Cross-entropy training settings (pretrain-align, domain-adapt).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSpec {
    pub steps: u64,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup: u64,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub accum: u32,
    pub label_smoothing: f64,
    pub ckpt_every: u64,
    pub val_every: u64,
    /// Learning-rate multipliers per component: `vision`, `connector`, `lm`, `adapter`.
    pub lr_mult: BTreeMap<String, f64>,
    /// pretrain-align only: pretrained components (`vision`, `lm`) trained beside the
    /// connector. Empty (the default) trains the connector alone, as LLaVA's first stage.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unfreeze: Vec<String>,
}

impl Default for TrainSpec {
    fn default() -> Self {
        TrainSpec {
            steps: 300,
            batch_size: 32,
            lr: 2e-3,
            warmup: 20,
            min_lr_ratio: 0.1,
            weight_decay: 0.01,
            grad_clip: 1.0,
            accum: 1,
            label_smoothing: 0.0,
            ckpt_every: 100,
            val_every: 100,
            lr_mult: BTreeMap::new(),
            unfreeze: Vec::new(),
        }
    }
}

impl Default for StagesSpec {
    fn default() -> Self {
        StagesSpec {
            preprocess: PreprocessSpec::default(),
            pretrain_vision: TrainSpec {
                steps: 1500,
                batch_size: 128,
                lr: 1e-3,
                warmup: 50,
                weight_decay: 0.05,
                ckpt_every: 250,
                val_every: 250,
                ..TrainSpec::default()
            },
            pretrain_lm: TrainSpec {
                steps: 600,
                batch_size: 64,
                lr: 3e-3,
                warmup: 30,
                ckpt_every: 200,
                val_every: 200,
                ..TrainSpec::default()
            },
            pretrain_align: TrainSpec::default(),
            domain_adapt: TrainSpec::default(),
            cider_optimize: CiderSpec::default(),
            evaluate: EvaluateSpec::default(),
        }
    }
}

/// Self-critical sequence training settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CiderSpec {
    /// false = skip the stage; evaluate then reads domain-adapt's output.
    pub enabled: bool,
    pub steps: u64,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup: u64,
    pub grad_clip: f64,
    /// Captions sampled per image.
    pub samples: usize,
    /// `greedy` (the greedy caption's reward) or `mean` (mean of the samples).
    pub baseline: String,
    pub temperature: f64,
    /// Weight of the diversity regulariser (0 = off).
    pub diversity: f64,
    pub ckpt_every: u64,
}

impl Default for CiderSpec {
    fn default() -> Self {
        CiderSpec {
            enabled: true,
            steps: 60,
            batch_size: 16,
            lr: 2e-4,
            warmup: 5,
            grad_clip: 1.0,
            samples: 4,
            baseline: "greedy".into(),
            temperature: 1.0,
            diversity: 0.0,
            ckpt_every: 50,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluateSpec {
    /// Split to score: `valid` (or `test` when it carries references).
    pub split: String,
    /// `greedy`, `beam`, `nucleus` or `rerank` (retrieve-and-rerank with the model as judge).
    pub method: String,
    pub beam_width: usize,
    pub length_penalty: f64,
    pub top_p: f64,
    pub temperature: f64,
    pub repetition_penalty: f64,
    /// `rerank`: weight of the candidates' consensus CIDEr-D beside the model's mean token
    /// log-probability.
    pub rerank_weight: f64,
    pub max_len: usize,
    /// Metric tokenization: `char`, `space`, `jieba`.
    pub tokenize: String,
    /// Write test-split predictions as `caption_gen.jsonl`.
    pub predict_test: bool,
    pub batch_size: usize,
}

impl Default for EvaluateSpec {
    fn default() -> Self {
        EvaluateSpec {
            split: "valid".into(),
            method: "greedy".into(),
            beam_width: 3,
            length_penalty: 1.0,
            top_p: 0.9,
            temperature: 1.0,
            repetition_penalty: 1.0,
            rerank_weight: 1.0,
            max_len: 32,
            tokenize: "char".into(),
            predict_test: true,
            batch_size: 64,
        }
    }
}
