//! What a MODEL argument names, and loading it: a recorded cell of the store (`SWEEP/CELL`,
//! `SWEEP:best`), an `ecic export` directory, or a training stage's checkpoint directory (a
//! cache entry holding `lineage.json`, as `runs/objects-v1/KEY/`).
//!
//! A cell is rebuilt as its evaluate stage rebuilt it: the evaluate stage's recorded
//! parameters give the decoding, its inputs the model entry (whose lineage names every
//! weight file, base first) and the preprocess entry (tokenizer and image preparation). A
//! zero-shot cell on a whole checkpoint has no model entry: its evaluate entry holds the
//! lineage, which names the checkpoint directory.

use std::path::{Path, PathBuf};

use rusqlite::OptionalExtension;

use crate::data::preprocess::PreprocessMeta;
use crate::decode::DecodeConfig;
use crate::model::{Captioner, Phase};
use crate::stages::{Lineage, LINEAGE};
use crate::store::Store;

use super::{images::ImageSpec, InferError, Predictor};

/// MODEL as the command line gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// `SWEEP/CELL` (SWEEP may carry `@N` for revision N).
    Cell { sweep: String, cell: String },
    /// `SWEEP:best`: the cell with a model and the highest valid CIDEr-D.
    Best { sweep: String },
    /// An export or checkpoint directory.
    Dir(PathBuf),
}

impl ModelRef {
    /// An existing directory wins over the store forms, so a path is never misread.
    pub fn parse(s: &str) -> Option<ModelRef> {
        if Path::new(s).is_dir() {
            return Some(ModelRef::Dir(PathBuf::from(s)));
        }
        if let Some(sweep) = s.strip_suffix(":best") {
            return (!sweep.is_empty()).then(|| ModelRef::Best {
                sweep: sweep.to_owned(),
            });
        }
        let (sweep, cell) = s.split_once('/')?;
        (!sweep.is_empty() && !cell.is_empty() && !cell.contains('/')).then(|| ModelRef::Cell {
            sweep: sweep.to_owned(),
            cell: cell.to_owned(),
        })
    }
}

/// A loaded model with everything needed to caption with it or export it.
pub struct Resolved {
    /// Weights loaded; not yet built for decoding.
    pub model: Captioner,
    pub tokenizer: PathBuf,
    pub image: ImageSpec,
    pub decoding: DecodeConfig,
    pub seed: u64,
    pub origin: String,
}

impl Resolved {
    pub fn into_predictor(self) -> Result<Predictor, InferError> {
        let tok = crate::data::tokenizer::CaptionTokenizer::load(&self.tokenizer).map_err(|e| {
            InferError::Format {
                path: self.tokenizer.clone(),
                msg: e.to_string(),
            }
        })?;
        let model = self.model.inference().map_err(|source| InferError::Model {
            path: PathBuf::from(&self.origin),
            source,
        })?;
        Ok(Predictor {
            model,
            tok,
            image: self.image,
            decoding: self.decoding,
            seed: self.seed,
            origin: self.origin,
        })
    }
}

fn bad(model: &str, reason: impl Into<String>) -> InferError {
    InferError::BadModel {
        model: model.to_owned(),
        reason: reason.into(),
    }
}

/// Loads MODEL; `runs` holds the store and cache of recorded cells.
pub fn resolve(model: &str, runs: &Path) -> Result<Resolved, InferError> {
    let Some(r) = ModelRef::parse(model) else {
        return Err(bad(
            model,
            "not a directory, and neither SWEEP/CELL nor SWEEP:best",
        ));
    };
    match r {
        ModelRef::Dir(dir) => {
            if dir.join(super::export::MANIFEST).exists() {
                super::export::load(&dir)
            } else if dir.join(LINEAGE).exists() {
                checkpoint(model, &dir)
            } else {
                Err(bad(
                    model,
                    format!(
                        "this directory has neither {} (an ecic export) nor {LINEAGE} (a training stage's cache entry)",
                        super::export::MANIFEST
                    ),
                ))
            }
        }
        ModelRef::Cell { sweep, cell } => {
            let store = open_store(model, runs)?;
            let sweep_id = store.sweep_id(&sweep)?;
            cell_model(model, runs, &store, sweep_id, &cell)
        }
        ModelRef::Best { sweep } => {
            let store = open_store(model, runs)?;
            let sweep_id = store.sweep_id(&sweep)?;
            let cell = best_cell(model, &store, sweep_id)?;
            cell_model(model, runs, &store, sweep_id, &cell)
        }
    }
}

fn open_store(model: &str, runs: &Path) -> Result<Store, InferError> {
    Store::open_existing(runs)?.ok_or_else(|| {
        bad(
            model,
            format!(
                "no store at {} (pass --runs DIR, or a directory as MODEL)",
                runs.join(crate::store::FILE_NAME).display()
            ),
        )
    })
}

/// The cell of `sweep_id` with a model (not a baseline) and the highest valid CIDEr-D.
fn best_cell(model: &str, store: &Store, sweep_id: i64) -> Result<String, InferError> {
    let best: Option<String> = store
        .conn()
        .query_row(
            "SELECT c.name FROM cells c
             JOIN cell_stages cs ON cs.cell_id = c.id AND cs.kind = 'evaluate'
             JOIN stages s ON s.key = cs.key
             JOIN metrics m ON m.stage_key = cs.key AND m.split = 'valid' AND m.metric = 'cider_d'
             WHERE c.sweep_id = ?1 AND json_extract(s.params, '$.baseline') IS NULL
             ORDER BY m.value DESC, c.position LIMIT 1",
            [sweep_id],
            |r| r.get(0),
        )
        .optional()
        .map_err(|source| crate::store::StoreError::Sqlite {
            path: store.path().to_path_buf(),
            source,
        })?;
    best.ok_or_else(|| {
        bad(
            model,
            "no cell of this sweep has a model with a recorded valid CIDEr-D",
        )
    })
}

fn cell_model(
    model: &str,
    runs: &Path,
    store: &Store,
    sweep_id: i64,
    cell: &str,
) -> Result<Resolved, InferError> {
    let cells = store.cells_with_stages(sweep_id)?;
    let Some(c) = cells.iter().find(|c| c.name == cell) else {
        let names: Vec<&str> = cells.iter().map(|c| c.name.as_str()).collect();
        return Err(bad(
            model,
            format!(
                "no cell `{cell}` in this sweep; its cells: {}",
                names.join(", ")
            ),
        ));
    };
    let Some((_, eval_key)) = c.stages.iter().find(|(k, _)| k == "evaluate") else {
        return Err(bad(model, "this cell has no evaluate stage"));
    };
    let sql_err = |source| crate::store::StoreError::Sqlite {
        path: store.path().to_path_buf(),
        source,
    };
    let (params, inputs): (String, String) = store
        .conn()
        .query_row(
            "SELECT params, inputs FROM stages WHERE key = ?1",
            [eval_key],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(sql_err)?;
    let params: serde_json::Value = serde_json::from_str(&params)
        .map_err(|e| bad(model, format!("evaluate parameters in the store: {e}")))?;
    if let Some(b) = params.get("baseline").and_then(|b| b.as_str()) {
        return Err(bad(
            model,
            format!("this cell is the `{b}` baseline: it has no model to caption with"),
        ));
    }
    let decoding = crate::stages::decoding_of(&params)?;
    if decoding.rerank.is_some() {
        return Err(InferError::Unsupported(format!(
            "{model}: rerank decoding chooses among the training split's captions, which only a sweep has at hand"
        )));
    }
    let inputs: Vec<String> = serde_json::from_str(&inputs)
        .map_err(|e| bad(model, format!("evaluate inputs in the store: {e}")))?;
    let mut pre = None;
    let mut trained = None;
    for k in &inputs {
        let kind: Option<String> = store
            .conn()
            .query_row("SELECT kind FROM stages WHERE key = ?1", [k], |r| r.get(0))
            .optional()
            .map_err(sql_err)?;
        match kind.as_deref() {
            Some("preprocess") => pre = Some(k.clone()),
            Some(_) => trained = Some(k.clone()),
            None => {}
        }
    }
    // A zero-shot cell on a whole checkpoint has no trained input: its evaluate entry holds
    // the lineage that names the checkpoint.
    let trained = trained.or_else(|| pre.is_some().then(|| eval_key.clone()));
    let (Some(pre), Some(trained)) = (pre, trained) else {
        return Err(bad(
            model,
            "the evaluate stage's inputs are not in the store",
        ));
    };
    let cache = crate::cache::Cache::open_read(runs);
    for key in [&pre, &trained] {
        if !cache.is_complete(key) {
            return Err(bad(
                model,
                format!(
                    "cache entry {} is not complete (removed by `ecic gc`? run the sweep again)",
                    cache.entry(key).display()
                ),
            ));
        }
    }
    let seed = c.seed as u64;
    let mut r = from_lineage(model, &cache.objects(), &cache.entry(&trained))?;
    r.decoding = decoding.config;
    r.seed = seed;
    r.origin = format!("{model} (cell {cell}, model entry {})", &trained[..12]);
    Ok(r)
}

/// A training stage's entry: the model its lineage rebuilds, with greedy decoding up to the
/// model's longest caption.
fn checkpoint(model: &str, dir: &Path) -> Result<Resolved, InferError> {
    let dir = std::path::absolute(dir).map_err(super::io_err(dir))?;
    let objects = dir.parent().ok_or_else(|| {
        bad(
            model,
            "a checkpoint directory lives in the cache's object root",
        )
    })?;
    let mut r = from_lineage(model, objects, &dir)?;
    r.origin = format!("checkpoint {}", dir.display());
    Ok(r)
}

fn from_lineage(model: &str, objects: &Path, entry: &Path) -> Result<Resolved, InferError> {
    let lineage = Lineage::read(entry)?;
    if lineage.model.retrieved > 0 {
        return Err(InferError::Unsupported(format!(
            "{model}: a retrieval-augmented model (model.retrieve = {}) reads its training split's captions beside each image, which only a sweep has at hand",
            lineage.model.retrieved
        )));
    }
    let pre = objects.join(&lineage.preprocess);
    let meta = PreprocessMeta::load(&pre).map_err(|e| InferError::Format {
        path: pre.clone(),
        msg: e.to_string(),
    })?;
    let built = lineage.build_in(objects, Phase::Adapt)?;
    let decoding = DecodeConfig {
        strategy: crate::decode::Strategy::Greedy,
        beam_width: 1,
        max_len: built.max_new_tokens(),
        ..DecodeConfig::default()
    };
    Ok(Resolved {
        model: built,
        tokenizer: pre.join("tokenizer.json"),
        image: ImageSpec::of(&meta.params),
        decoding,
        seed: 0,
        origin: String::new(),
    })
}
