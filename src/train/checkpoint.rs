//! Resumable training checkpoints: every trainable variable, the AdamW moments and per-variable step
//! counts, the loop's rng state and the step, in one safetensors file per checkpoint.
//!
//! A checkpoint is written to a temporary file in the same directory, synced, then renamed to
//! `step-NNNNNNNN.safetensors`, so a kill never leaves a complete-looking partial file; the directory is
//! synced after the rename. The newest two are kept. Loading refuses a checkpoint written under another
//! training configuration or for other variables, because resuming it could not reproduce the
//! uninterrupted run.
//!
//! Tensors: `var/<name>` (the variable's dtype), `m/<name>`, `v/<name>` (f32). Metadata (strings):
//! `format` = `ecic-train-ckpt`, `version`, `step`, `config` (JSON), `t` (JSON map name -> updates),
//! `rng_seed` (hex), `rng_stream`, `rng_word_pos`.
//!
//! Beside each checkpoint, `step-NNNNNNNN.safetensors.b3` holds its size and blake3 digest (JSON,
//! written before the checkpoint is renamed into place). [`load`] hashes the bytes it reads and
//! refuses a checkpoint that does not match, or that has no digest: a flipped bit in a moment or a
//! weight would otherwise resume silently into a different model.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::config::TrainConfig;
use super::optim::AdamW;
use super::{Result, TrainError};

const FORMAT: &str = "ecic-train-ckpt";
const VERSION: &str = "1";
const KEEP: usize = 2;

/// What a checkpoint restores besides the optimizer and the variables.
#[derive(Debug, Clone)]
pub struct Restored {
    pub step: usize,
    pub rng: ChaCha8Rng,
    pub path: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::BadCheckpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::CorruptCheckpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn file_name(step: usize) -> String {
    format!("step-{step:08}.safetensors")
}

/// The digest file beside a checkpoint.
fn digest_path(ckpt: &Path) -> PathBuf {
    let mut name = ckpt.file_name().unwrap_or_default().to_os_string();
    name.push(".b3");
    ckpt.with_file_name(name)
}

fn parse_step(name: &str) -> Option<usize> {
    name.strip_prefix("step-")?
        .strip_suffix(".safetensors")?
        .parse()
        .ok()
}

fn to_bytes(t: &Tensor) -> candle_core::Result<(Dtype, Vec<u8>)> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => (
            Dtype::F32,
            t.to_vec1::<f32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::F64 => (
            Dtype::F64,
            t.to_vec1::<f64>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::F16 => (
            Dtype::F16,
            t.to_vec1::<half::f16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            Dtype::BF16,
            t.to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        other => {
            return Err(candle_core::Error::Msg(format!(
                "checkpoint: unsupported dtype {other:?}"
            )))
        }
    })
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_from(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn tensor_from(view: &TensorView<'_>, dtype: DType, like: &Tensor) -> candle_core::Result<Tensor> {
    let b = view.data();
    let dev = like.device();
    let shape = like.shape();
    match (view.dtype(), dtype) {
        (Dtype::F32, DType::F32) => Tensor::from_vec(f32_from(b), shape, dev),
        (Dtype::F64, DType::F64) => {
            let v: Vec<f64> = b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect();
            Tensor::from_vec(v, shape, dev)
        }
        (Dtype::F16, DType::F16) => {
            let v: Vec<half::f16> = b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                .collect();
            Tensor::from_vec(v, shape, dev)
        }
        (Dtype::BF16, DType::BF16) => {
            let v: Vec<half::bf16> = b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
                .collect();
            Tensor::from_vec(v, shape, dev)
        }
        (s, d) => Err(candle_core::Error::Msg(format!(
            "stored dtype {s:?} does not match variable dtype {d:?}"
        ))),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Writes the checkpoint of `step` into `dir` atomically and prunes older ones; returns its path.
pub fn save(
    dir: &Path,
    step: usize,
    optim: &AdamW,
    rng: &ChaCha8Rng,
    cfg: &TrainConfig,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let final_path = dir.join(file_name(step));
    let mut blobs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> =
        Vec::with_capacity(optim.slots.len() * 3);
    let mut t = BTreeMap::new();
    for s in &optim.slots {
        let shape = s.spec.var.dims().to_vec();
        let (dt, bytes) = to_bytes(s.spec.var.as_tensor())?;
        blobs.push((format!("var/{}", s.spec.name), dt, shape.clone(), bytes));
        blobs.push((
            format!("m/{}", s.spec.name),
            Dtype::F32,
            shape.clone(),
            f32_bytes(&s.m),
        ));
        blobs.push((
            format!("v/{}", s.spec.name),
            Dtype::F32,
            shape,
            f32_bytes(&s.v),
        ));
        t.insert(s.spec.name.clone(), s.t);
    }
    let views = blobs
        .iter()
        .map(|(n, dt, shape, b)| TensorView::new(*dt, shape.clone(), b).map(|v| (n.clone(), v)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(&final_path, e.to_string()))?;
    let meta: HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("version", VERSION.to_string()),
        ("step", step.to_string()),
        ("config", config_json(cfg)),
        ("t", serde_json::to_string(&t).unwrap_or_default()),
        ("rng_seed", hex(&rng.get_seed())),
        ("rng_stream", rng.get_stream().to_string()),
        ("rng_word_pos", rng.get_word_pos().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let bytes = safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| bad(&final_path, e.to_string()))?;

    let digest = crate::cache::FileDigest::of_bytes(&bytes);
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-step-")
        .tempfile_in(dir)
        .map_err(io(dir))?;
    tmp.write_all(&serde_json::to_vec(&digest).unwrap_or_default())
        .map_err(io(tmp.path()))?;
    tmp.as_file().sync_all().map_err(io(tmp.path()))?;
    let dpath = digest_path(&final_path);
    tmp.persist(&dpath).map_err(|e| TrainError::Io {
        path: dpath.clone(),
        source: e.error,
    })?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-step-")
        .tempfile_in(dir)
        .map_err(io(dir))?;
    tmp.write_all(&bytes).map_err(io(tmp.path()))?;
    tmp.as_file().sync_all().map_err(io(tmp.path()))?;
    tmp.persist(&final_path).map_err(|e| TrainError::Io {
        path: final_path.clone(),
        source: e.error,
    })?;
    if let Ok(d) = std::fs::File::open(dir) {
        // best effort: some filesystems refuse fsync on directories
        let _ = d.sync_all();
    }
    prune(dir)?;
    Ok(final_path)
}

/// Complete checkpoints in `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(TrainError::Io {
                path: dir.to_path_buf(),
                source: e,
            })
        }
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(io(dir))?;
        if let Some(step) = entry.file_name().to_str().and_then(parse_step) {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint in `dir`, if any.
pub fn latest(dir: &Path) -> Result<Option<(usize, PathBuf)>> {
    Ok(list(dir)?.pop())
}

fn prune(dir: &Path) -> Result<()> {
    let all = list(dir)?;
    for (_, p) in all.iter().take(all.len().saturating_sub(KEEP)) {
        std::fs::remove_file(p).map_err(io(p))?;
        let _ = std::fs::remove_file(digest_path(p));
    }
    Ok(())
}

/// Remove a checkpoint that cannot be resumed, with its digest file.
pub fn discard(path: &Path) -> Result<()> {
    std::fs::remove_file(path).map_err(io(path))?;
    let _ = std::fs::remove_file(digest_path(path));
    Ok(())
}

/// Every checkpoint of `dir` with what is wrong with it (`None`: it matches its digest), for
/// `ecic verify`.
pub fn verify_dir(dir: &Path) -> Result<Vec<(PathBuf, Option<String>)>> {
    let mut out = Vec::new();
    for (_, path) in list(dir)? {
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let bad = match check_digest(&path, &bytes) {
            Ok(()) => None,
            Err(TrainError::CorruptCheckpoint { reason, .. }) => Some(reason),
            Err(e) => Some(e.to_string()),
        };
        out.push((path, bad));
    }
    Ok(out)
}

/// Check a checkpoint's bytes against the digest written beside it.
fn check_digest(path: &Path, bytes: &[u8]) -> Result<()> {
    let dpath = digest_path(path);
    let recorded: crate::cache::FileDigest = match std::fs::read(&dpath) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| corrupt(path, format!("unreadable digest {}: {e}", dpath.display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(corrupt(path, format!("no digest file {}", dpath.display())))
        }
        Err(e) => return Err(io(&dpath)(e)),
    };
    let found = crate::cache::FileDigest::of_bytes(bytes);
    crate::cache::verify::check("checkpoint", &recorded, &found)
        .map_err(|d| corrupt(path, d.to_string()))
}

/// Restores variables and optimizer state from `path`; returns the step and rng to continue from.
pub fn load(path: &Path, optim: &mut AdamW, cfg: &TrainConfig) -> Result<Restored> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    check_digest(path, &bytes)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| corrupt(path, e.to_string()))?;
    let (_, header) =
        SafeTensors::read_metadata(&bytes).map_err(|e| corrupt(path, e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let get = |k: &str| {
        meta.get(k)
            .map(String::as_str)
            .ok_or_else(|| bad(path, format!("missing metadata `{k}`")))
    };
    if get("format")? != FORMAT || get("version")? != VERSION {
        return Err(bad(path, "not an ecic training checkpoint of this version"));
    }
    if get("config")? != config_json(cfg) {
        return Err(bad(
            path,
            "written under a different training configuration",
        ));
    }
    let step: usize = get("step")?.parse().map_err(|_| bad(path, "bad `step`"))?;
    let t: BTreeMap<String, u64> =
        serde_json::from_str(get("t")?).map_err(|e| bad(path, format!("bad `t`: {e}")))?;
    let seed = unhex(get("rng_seed")?).ok_or_else(|| bad(path, "bad `rng_seed`"))?;
    let stream: u64 = get("rng_stream")?
        .parse()
        .map_err(|_| bad(path, "bad `rng_stream`"))?;
    let word_pos: u128 = get("rng_word_pos")?
        .parse()
        .map_err(|_| bad(path, "bad `rng_word_pos`"))?;
    if t.len() != optim.slots.len() {
        return Err(bad(
            path,
            format!(
                "holds {} variables, the model has {}",
                t.len(),
                optim.slots.len()
            ),
        ));
    }
    // read everything before touching the model so a bad file leaves it as it was
    let mut staged = Vec::with_capacity(optim.slots.len());
    for s in &optim.slots {
        let name = &s.spec.name;
        let view = |prefix: &str| {
            st.tensor(&format!("{prefix}/{name}"))
                .map_err(|_| bad(path, format!("missing `{prefix}/{name}`")))
        };
        let (w, m, v) = (view("var")?, view("m")?, view("v")?);
        for x in [&w, &m, &v] {
            if x.shape() != s.spec.var.dims() {
                return Err(bad(
                    path,
                    format!(
                        "`{name}` has shape {:?}, the model {:?}",
                        x.shape(),
                        s.spec.var.dims()
                    ),
                ));
            }
        }
        if m.dtype() != Dtype::F32 || v.dtype() != Dtype::F32 {
            return Err(bad(path, format!("moments of `{name}` are not f32")));
        }
        let w = tensor_from(&w, s.spec.var.dtype(), s.spec.var.as_tensor())
            .map_err(|e| bad(path, format!("`{name}`: {e}")))?;
        let steps = *t
            .get(name)
            .ok_or_else(|| bad(path, format!("no step count for `{name}`")))?;
        staged.push((w, f32_from(m.data()), f32_from(v.data()), steps));
    }
    for (s, (w, m, v, steps)) in optim.slots.iter_mut().zip(staged) {
        s.spec.var.set(&w)?;
        s.m = m;
        s.v = v;
        s.t = steps;
    }
    let mut rng = ChaCha8Rng::from_seed(seed);
    rng.set_stream(stream);
    rng.set_word_pos(word_pos);
    Ok(Restored {
        step,
        rng,
        path: path.to_path_buf(),
    })
}

/// The configuration as stored in (and compared against) a checkpoint: the fields that shape the
/// weights; how often to checkpoint or validate may change between the killed and the resumed run.
fn config_json(cfg: &TrainConfig) -> String {
    let shaping = TrainConfig {
        ckpt_every: 0,
        val_every: 0,
        ..cfg.clone()
    };
    // a struct of numbers and bools always serialises
    serde_json::to_string(&shaping).unwrap_or_default()
}
