//! `ecic predict` and `ecic export`: the command-line faces of [`super`].

use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};

use crate::decode::{DecodeConfig, Strategy};
use crate::error::{CliError, CliResult};

use super::export::{self, Quantize};
use super::images::ImageSource;
use super::{InferError, Predictor};

/// Decoding settings a command may override; unset ones keep the model's own (its cell's
/// evaluate stage's).
#[derive(Debug, Clone, Default, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeArgs {
    /// Decoding method: greedy, beam or nucleus.
    #[arg(long, value_parser = ["greedy", "beam", "nucleus"])]
    pub method: Option<String>,
    /// Beams (beam search).
    #[arg(long)]
    pub beam_width: Option<usize>,
    /// Longest caption in tokens (capped by the model's positions).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Nucleus sampling: smallest token set with this much probability.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Sampling temperature.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// CTRL-style penalty on tokens already generated (1 = none).
    #[arg(long)]
    pub repetition_penalty: Option<f64>,
    /// Beam ranking: sum of log-probabilities / length^this.
    #[arg(long)]
    pub length_penalty: Option<f64>,
    /// Seed of the sampling methods.
    #[arg(long)]
    pub seed: Option<u64>,
}

impl DecodeArgs {
    /// `base` with these overrides, checked; the error names the bad setting.
    pub fn apply(&self, base: &DecodeConfig) -> Result<DecodeConfig, String> {
        let mut c = base.clone();
        if let Some(m) = &self.method {
            c.strategy = match m.as_str() {
                "greedy" => Strategy::Greedy,
                "beam" => Strategy::Beam,
                "nucleus" => Strategy::Nucleus,
                other => {
                    return Err(format!(
                        "method `{other}` is not one of greedy, beam, nucleus"
                    ))
                }
            };
            if c.strategy == Strategy::Beam && self.beam_width.is_none() && c.beam_width < 2 {
                c.beam_width = 3;
            }
        }
        if let Some(v) = self.beam_width {
            c.beam_width = v;
        }
        if let Some(v) = self.max_len {
            // As the evaluate stage counts it: caption tokens, plus the EOS.
            c.max_len = v + 1;
        }
        if let Some(v) = self.top_p {
            c.top_p = v;
        }
        if let Some(v) = self.temperature {
            c.temperature = v;
        }
        if let Some(v) = self.repetition_penalty {
            c.repetition_penalty = v;
        }
        if let Some(v) = self.length_penalty {
            c.length_penalty = v;
        }
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }
}

/// `ecic predict`: captions for a folder of images or a MUGE `.tsv`.
#[derive(Debug, clap::Args)]
pub struct PredictArgs {
    /// SWEEP/CELL, SWEEP:best (best valid CIDEr-D), an `ecic export` directory, or a training
    /// stage's cache entry (runs/objects-v1/KEY).
    pub model: String,
    /// A folder of JPEG/PNG/WebP files (ids: file names without extension) or a MUGE .tsv.
    #[arg(long)]
    pub images: PathBuf,
    /// The prediction file to write (MUGE submission form: {"image_id", "text"} per line).
    #[arg(long)]
    pub out: PathBuf,
    /// The runs directory whose store and cache hold SWEEP/CELL.
    #[arg(long, default_value = "runs", env = "ECIC_RUNS")]
    pub runs: PathBuf,
    #[command(flatten)]
    pub decode: DecodeArgs,
}

/// `ecic export`: a self-contained model directory.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// SWEEP/CELL, SWEEP:best, an export directory or a training stage's cache entry.
    pub model: String,
    /// The directory to create (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Store the weights quantized (GGUF): q8_0 (8.5 bits a weight) or q4_0 (4.5).
    #[arg(long)]
    pub quantize: Option<Quantize>,
    /// The runs directory whose store and cache hold SWEEP/CELL.
    #[arg(long, default_value = "runs", env = "ECIC_RUNS")]
    pub runs: PathBuf,
}

/// Where a library error lands: a MODEL or input that is not usable is bad usage (exit 2).
pub(crate) fn cli_err(e: InferError) -> CliError {
    match e {
        InferError::BadModel { .. }
        | InferError::Unsupported(_)
        | InferError::Store(crate::store::StoreError::NoSweep(_)) => CliError::usage(e.to_string()),
        other => CliError::Other(anyhow::Error::new(other)),
    }
}

pub fn run_predict(a: &PredictArgs) -> CliResult {
    let source = ImageSource::open(&a.images).map_err(|e| CliError::usage(e.to_string()))?;
    let p = Predictor::load(&a.model, &a.runs).map_err(cli_err)?;
    let cfg = a.decode.apply(&p.decoding).map_err(CliError::usage)?;
    let seed = a.decode.seed.unwrap_or(p.seed);
    eprintln!("model: {}", p.origin);
    let total = source.count().map_err(cli_err)?;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} images, {per_sec}, eta {eta}")
            .expect("a valid template"),
    );
    let (mut lines, mut bad) = (Vec::new(), Vec::new());
    // Good images wait here until a full batch is there, so batches (and a sampling
    // method's per-batch seeds) do not depend on where bad images fall.
    let mut pending: Vec<(String, Vec<f32>)> = Vec::new();
    let mut done = 0usize;
    let mut flush = |pending: &mut Vec<(String, Vec<f32>)>,
                     lines: &mut Vec<(String, String)>|
     -> Result<(), InferError> {
        let px: Vec<&[f32]> = pending.iter().map(|(_, v)| v.as_slice()).collect();
        let caps = p.caption(&px, &cfg, seed.wrapping_add(done as u64))?;
        done += pending.len();
        for ((id, _), c) in pending.drain(..).zip(caps) {
            lines.push((id, c));
        }
        Ok(())
    };
    let batch = crate::stages::EVALUATE_BATCH;
    let t0 = std::time::Instant::now();
    source
        .for_each_chunk(&p.image, batch, &mut |chunk| {
            for img in chunk {
                bar.inc(1);
                match img.pixels {
                    Ok(px) => pending.push((img.id, px)),
                    Err(why) => {
                        bar.suspend(|| eprintln!("skipped {}: {why}", img.origin));
                        bad.push(img.origin);
                    }
                }
                if pending.len() == batch {
                    flush(&mut pending, &mut lines)?;
                }
            }
            Ok(())
        })
        .map_err(cli_err)?;
    if !pending.is_empty() {
        flush(&mut pending, &mut lines).map_err(cli_err)?;
    }
    bar.finish_and_clear();
    let mut text = String::new();
    for (id, caption) in &lines {
        text.push_str(&serde_json::json!({ "image_id": id, "text": caption }).to_string());
        text.push('\n');
    }
    crate::cache::write_atomic(&a.out, text.as_bytes())
        .map_err(|e| CliError::Other(anyhow::Error::new(e)))?;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "wrote {} captions to {} ({:.1} captions/s, image decoding included){}",
        lines.len(),
        a.out.display(),
        lines.len() as f64 / secs.max(1e-9),
        if bad.is_empty() {
            String::new()
        } else {
            format!("; {} unreadable images skipped", bad.len())
        }
    );
    if bad.is_empty() {
        Ok(())
    } else {
        Err(CliError::failed(format!(
            "{} of {} images could not be read (listed above)",
            bad.len(),
            bad.len() + lines.len()
        )))
    }
}

pub fn run_export(a: &ExportArgs) -> CliResult {
    let r = super::source::resolve(&a.model, &a.runs).map_err(cli_err)?;
    eprintln!("model: {}", r.origin);
    // Beside ecic's files, the Hugging Face LLaVA layout where the model has one (f32 only:
    // a quantized export is the small one).
    let hf_note = std::cell::RefCell::new(None);
    let s = export::write(&r, &a.out, a.quantize, &|dir, tensors| {
        let why = match a.quantize {
            Some(_) => Some("quantized exports are GGUF only".to_owned()),
            None => super::hf_llava::write_if_llava(
                r.model.config(),
                &r.model.peft().merged(),
                dir,
                tensors,
            )?,
        };
        *hf_note.borrow_mut() = why;
        Ok(())
    })
    .map_err(cli_err)?;
    println!("exported to {}", s.dir.display());
    for (name, bytes) in &s.files {
        println!("  {name:<28} {:>12} bytes", bytes);
    }
    match hf_note.into_inner() {
        None => println!("  (config.json + model.safetensors: the Hugging Face LLaVA layout)"),
        Some(why) => println!("  no Hugging Face LLaVA layout: {why}"),
    }
    if a.quantize.is_some() {
        println!(
            "  {} of {} tensors quantized, the rest f32",
            s.quantized, s.tensors
        );
    }
    Ok(())
}
