//! `model.checkpoint`: what a real pretrained checkpoint fixes in each cell once the plan is
//! built. Validation (`validate::semantics`) has already checked the directory holds a
//! supported vision-language checkpoint that fits the cell's backbone (LLaVA; BLIP-2 for `blip2`
//! cells, Phi-3-Vision for `phi3v` cells); here every cell gets
//! - the directory as an absolute path (the stage reads it from its parameters),
//! - a content digest of its files (`config.json`, the index, the shards, `tokenizer.json`),
//!   memoised by (path, size, mtime) like data digests, so swapping the weights re-runs
//!   pretrain-align and everything after it,
//! - the checkpoint's `tokenizer.json` for preprocess (unless `stages.preprocess.tokenizer` is
//!   set), with its own digest in the preprocess key,
//! - the checkpoint's input resolution for preprocess (unless `stages.preprocess.image_size`
//!   is set; validation checks a set one agrees).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::model::hf::Checkpoint;
use crate::model::{Backbone, Fusion, ModelConfig};

use super::Spec;

/// An opened checkpoint, the digest of its files and its tokenizer with that file's digest.
type Resolved = (Checkpoint, String, Option<(PathBuf, String)>);

/// Resolves `model.checkpoint` in every cell of `spec` (see the module doc). `memo`: the
/// digest memo file (the data digests' one). Errors name `model.checkpoint`.
pub fn resolve(spec: &mut Spec, memo: &Path) -> Result<(), String> {
    let dir = spec.dir();
    let mut seen: HashMap<PathBuf, Resolved> = HashMap::new();
    for cell in &mut spec.cells {
        let Some(rel) = cell.config.model.checkpoint.clone() else {
            continue;
        };
        let abs = std::path::absolute(dir.join(&rel))
            .map_err(|e| format!("model.checkpoint: {}: {e}", rel.display()))?;
        if !seen.contains_key(&abs) {
            let ck = Checkpoint::open(&abs).map_err(|e| format!("model.checkpoint: {e}"))?;
            let mut files = ck.files();
            let tok = abs.join("tokenizer.json");
            let tok = tok.is_file().then_some(tok);
            files.extend(tok.iter().cloned());
            let digest = crate::cache::files_digest(b"ecic-checkpoint-v1\0", &files, memo)
                .map_err(|e| format!("model.checkpoint: digesting {}: {e}", abs.display()))?;
            let tok = match tok {
                Some(t) => {
                    tokenizer_fits(&ck, &t)?;
                    let d = crate::cache::files_digest(
                        b"ecic-tokenizer-v1\0",
                        std::slice::from_ref(&t),
                        memo,
                    )
                    .map_err(|e| format!("model.checkpoint: digesting {}: {e}", t.display()))?;
                    Some((t, d))
                }
                None => None,
            };
            seen.insert(abs.clone(), (ck, digest, tok));
        }
        let (ck, digest, tok) = &seen[&abs];
        let c = &mut cell.config;
        c.model.checkpoint = Some(abs.clone());
        c.model.checkpoint_digest = Some(digest.clone());
        let p = &mut c.stages.preprocess;
        if p.tokenizer.is_none() {
            if let Some((t, d)) = tok {
                p.tokenizer = Some(t.clone());
                p.tokenizer_digest = Some(d.clone());
            }
        }
        if p.image_size == 0 {
            if let Some(size) = input_size(ck, &cell.backbone, &c.model.preset) {
                p.image_size = size as u32;
            }
        }
    }
    Ok(())
}

/// The checkpoint's tokenizer must not produce ids beyond its vocabulary (LLaVA's pads the
/// embedding table past the tokenizer's ids, so fewer is fine).
fn tokenizer_fits(ck: &Checkpoint, path: &Path) -> Result<(), String> {
    let tok = crate::data::tokenizer::CaptionTokenizer::load(path)
        .map_err(|e| format!("model.checkpoint: {e}"))?;
    match ck.vocab_size() {
        Some(v) if tok.vocab_size() > v => Err(format!(
            "model.checkpoint: {} has {} ids but the checkpoint's vocabulary only {v}",
            path.display(),
            tok.vocab_size()
        )),
        _ => Ok(()),
    }
}

/// Side of the image tensor a `backbone` cell of `preset` built on `ck` reads (none for
/// baselines).
pub(super) fn input_size(ck: &Checkpoint, backbone: &str, preset: &str) -> Option<usize> {
    let b: Backbone = serde_json::from_value(serde_json::json!(backbone)).ok()?;
    let mut cfg = match preset {
        "tiny" => ModelConfig::tiny(b, Fusion::Early, 0, 0, 0, 0),
        _ => ModelConfig::real(b, Fusion::Early, 0, 0, 0, 0),
    };
    ck.configure(&mut cfg).ok()?;
    ck.has_vision().then(|| cfg.input_size())
}
