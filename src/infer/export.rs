//! `ecic export`: a self-contained model directory, and loading one back.
//!
//! Layout (every ecic file is prefixed `ecic-`, so the directory can also carry the Hugging
//! Face LLaVA layout beside it, [`super::hf_llava`]):
//! - `ecic-model.json` ([`ExportManifest`]): format version, the model configuration, the
//!   PEFT configuration the merged tensors load into, how images are prepared, the
//!   decoding of the source cell's evaluate stage and its seed, what was exported from.
//! - `tokenizer.json`: the caption tokenizer (Hugging Face `tokenizers` format).
//! - `ecic-model.safetensors` (f32), or with `--quantize`, `ecic-model.gguf`: every tensor
//!   as decoding uses it, LoRA folded into its base ([`Captioner::merged_tensors`]).
//!
//! Quantized exports use candle's GGUF writer: every 2-D weight whose rows are a whole
//! number of 32-value blocks is stored as Q8_0 or Q4_0 (the GGML block formats: 32 values
//! and one f16 scale per block, 8.5 or 4.5 bits a value); norms, biases and anything else
//! stay f32. Loading dequantizes to f32 (the model's layers compute in f32), so a quantized
//! export costs disk and transfer size, not decoding speed, and its quality cost is what the
//! rounding of the weights does to the captions (docs/serving.md has the figures).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::decode::DecodeConfig;
use crate::model::{Captioner, ModelConfig, PeftConfig, Phase};

use super::images::ImageSpec;
use super::source::Resolved;
use super::{io_err, InferError};

pub const MANIFEST: &str = "ecic-model.json";
pub const WEIGHTS: &str = "ecic-model.safetensors";
pub const WEIGHTS_GGUF: &str = "ecic-model.gguf";
pub const TOKENIZER: &str = "tokenizer.json";
/// Bumped when the layout or the meaning of a field changes.
pub const FORMAT_VERSION: u32 = 1;

/// The weight formats of `--quantize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Quantize {
    #[value(name = "q8_0")]
    #[serde(rename = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    #[serde(rename = "q4_0")]
    Q4_0,
}

impl Quantize {
    fn dtype(self) -> GgmlDType {
        match self {
            Quantize::Q8_0 => GgmlDType::Q8_0,
            Quantize::Q4_0 => GgmlDType::Q4_0,
        }
    }
}

/// `ecic-model.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportManifest {
    pub format_version: u32,
    pub model: ModelConfig,
    /// What the exported tensors load into ([`PeftConfig::merged`] of the source's).
    pub peft: PeftConfig,
    pub image: ImageSpec,
    pub decoding: DecodeConfig,
    pub seed: u64,
    /// The weights file in this directory.
    pub weights: String,
    pub quantize: Option<Quantize>,
    /// What was exported, in words.
    pub source: String,
    pub ecic_version: String,
}

/// What an export wrote.
#[derive(Debug)]
pub struct ExportSummary {
    pub dir: PathBuf,
    /// (file name, bytes), sorted.
    pub files: Vec<(String, u64)>,
    pub tensors: usize,
    /// Tensors stored in the quantized format (the rest f32).
    pub quantized: usize,
}

/// Writes `r` as an export into `out`, which must not exist: everything is written into a
/// temporary directory beside it and renamed into place, so `out` never holds half an
/// export. `extra` may add files to the directory before it is published (another
/// tool's layout of the same model).
pub fn write(
    r: &Resolved,
    out: &Path,
    quantize: Option<Quantize>,
    extra: &dyn Fn(&Path, &BTreeTensors) -> Result<(), InferError>,
) -> Result<ExportSummary, InferError> {
    if out.exists() {
        return Err(InferError::Format {
            path: out.to_path_buf(),
            msg: "already exists; remove it or choose another --out".into(),
        });
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let tmp = tempfile::Builder::new()
        .prefix(".ecic-export-")
        .tempdir_in(&parent)
        .map_err(io_err(&parent))?;
    let dir = tmp.path();
    let tensors = r
        .model
        .merged_tensors()
        .map_err(|source| InferError::Model {
            path: PathBuf::from(&r.origin),
            source,
        })?;
    let (weights, quantized) = match quantize {
        None => {
            let p = dir.join(WEIGHTS);
            // Tensors share their storage: this map copies no weights.
            let map: HashMap<String, Tensor> = tensors
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            candle_core::safetensors::save(&map, &p).map_err(|e| InferError::Format {
                path: p.clone(),
                msg: e.to_string(),
            })?;
            (WEIGHTS, 0)
        }
        Some(q) => (
            WEIGHTS_GGUF,
            write_gguf(&dir.join(WEIGHTS_GGUF), &tensors, q)?,
        ),
    };
    std::fs::copy(&r.tokenizer, dir.join(TOKENIZER)).map_err(io_err(&r.tokenizer))?;
    let manifest = ExportManifest {
        format_version: FORMAT_VERSION,
        model: r.model.config().clone(),
        peft: r.model.peft().merged(),
        image: r.image.clone(),
        decoding: r.decoding.clone(),
        seed: r.seed,
        weights: weights.to_owned(),
        quantize,
        source: r.origin.clone(),
        ecic_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let mp = dir.join(MANIFEST);
    std::fs::write(
        &mp,
        serde_json::to_vec_pretty(&manifest).expect("a manifest serializes"),
    )
    .map_err(io_err(&mp))?;
    extra(dir, &tensors)?;
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let len = e.metadata().map_err(io_err(&e.path()))?.len();
        files.push((e.file_name().to_string_lossy().into_owned(), len));
    }
    files.sort();
    let kept = tmp.keep();
    std::fs::rename(&kept, out).map_err(|source| {
        let _ = std::fs::remove_dir_all(&kept);
        InferError::Io {
            path: out.to_path_buf(),
            source,
        }
    })?;
    Ok(ExportSummary {
        dir: out.to_path_buf(),
        files,
        tensors: tensors.len(),
        quantized,
    })
}

/// The merged tensors by name.
pub type BTreeTensors = std::collections::BTreeMap<String, Tensor>;

/// Whether a tensor is stored quantized: 2-D, rows a whole number of blocks.
fn quantizable(t: &Tensor, dtype: GgmlDType) -> bool {
    t.rank() == 2 && t.dim(1).is_ok_and(|d| d % dtype.block_size() == 0)
}

fn write_gguf(path: &Path, tensors: &BTreeTensors, q: Quantize) -> Result<usize, InferError> {
    let fmt = |e: candle_core::Error| InferError::Format {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let dtype = q.dtype();
    let mut qs = Vec::with_capacity(tensors.len());
    let mut quantized = 0;
    for (name, t) in tensors {
        let d = if quantizable(t, dtype) {
            quantized += 1;
            dtype
        } else {
            GgmlDType::F32
        };
        qs.push((name.as_str(), QTensor::quantize(t, d).map_err(fmt)?));
    }
    let arch = gguf_file::Value::String("ecic".into());
    let refs: Vec<(&str, &QTensor)> = qs.iter().map(|(n, t)| (*n, t)).collect();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io_err(path))?);
    gguf_file::write(&mut f, &[("general.architecture", &arch)], &refs).map_err(fmt)?;
    use std::io::Write;
    f.flush().map_err(io_err(path))?;
    Ok(quantized)
}

fn read_gguf(path: &Path) -> Result<HashMap<String, Tensor>, InferError> {
    let fmt = |e: candle_core::Error| InferError::Format {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let mut f = std::io::BufReader::new(std::fs::File::open(path).map_err(io_err(path))?);
    let content = gguf_file::Content::read(&mut f).map_err(fmt)?;
    let mut out = HashMap::with_capacity(content.tensor_infos.len());
    for name in content.tensor_infos.keys() {
        let q = content.tensor(&mut f, name, &Device::Cpu).map_err(fmt)?;
        out.insert(name.clone(), q.dequantize(&Device::Cpu).map_err(fmt)?);
    }
    Ok(out)
}

/// Reads an export's manifest.
pub fn manifest(dir: &Path) -> Result<ExportManifest, InferError> {
    let p = dir.join(MANIFEST);
    let bytes = std::fs::read(&p).map_err(io_err(&p))?;
    let m: ExportManifest = serde_json::from_slice(&bytes).map_err(|e| InferError::Format {
        path: p.clone(),
        msg: e.to_string(),
    })?;
    if m.format_version != FORMAT_VERSION {
        return Err(InferError::Format {
            path: p,
            msg: format!(
                "export format {} (this ecic reads {FORMAT_VERSION})",
                m.format_version
            ),
        });
    }
    Ok(m)
}

/// Loads an export written by [`write`].
pub fn load(dir: &Path) -> Result<Resolved, InferError> {
    let m = manifest(dir)?;
    let wp = dir.join(&m.weights);
    let tensors = if m.weights.ends_with(".gguf") {
        read_gguf(&wp)?
    } else {
        candle_core::safetensors::load(&wp, &Device::Cpu).map_err(|e| InferError::Format {
            path: wp.clone(),
            msg: e.to_string(),
        })?
    };
    let model_err = |source| InferError::Model {
        path: wp.clone(),
        source,
    };
    let mut model =
        Captioner::new(&m.model, &m.peft, Phase::Adapt, &Device::Cpu).map_err(model_err)?;
    model.load_all(&tensors, &wp).map_err(model_err)?;
    let quant = m
        .quantize
        .map(|q| format!(", {}", serde_json::to_value(q).expect("a name")))
        .unwrap_or_default()
        .replace('"', "");
    Ok(Resolved {
        model,
        tokenizer: dir.join(TOKENIZER),
        image: m.image,
        decoding: m.decoding,
        seed: m.seed,
        origin: format!("export {}{quant} (of {})", dir.display(), m.source),
    })
}
