//! Baseline captioners that need no training stage, so that the whole path runs
//! and every table has a floor to beat:
//!
//! - `nn`: nearest-neighbour retrieval with consensus re-ranking (Devlin et al.
//!   2015, "Exploring Nearest Neighbor Approaches for Image Captioning"): embed
//!   each image as its mean-centred, L2-normalised 8x8 colour thumbnail; take
//!   the k most similar training images; among their captions return the one
//!   with the highest mean CIDEr-D against the k neighbours' captions
//!   (document frequencies from the training references).
//! - `mfc`: the most frequent training caption, for every image.

use std::collections::HashMap;

use candle_core::{DType, Tensor, D};

use crate::data::preprocess::Split;
use crate::metrics::{References, Tokenize};

use super::StageError;

const NEIGHBOURS: usize = 5;
const THUMB: usize = 8;

fn tensor_err(e: candle_core::Error) -> StageError {
    StageError::msg(format!("tensor error in the nn baseline: {e}"))
}

/// The clean (non-augmented) rows of a training split.
pub fn clean_rows(train: &Split) -> Vec<usize> {
    (0..train.len()).filter(|&i| train.copies[i] == 0).collect()
}

/// Mean-centred, L2-normalised thumbnails, (n, 3*8*8).
fn embed(images: &Tensor) -> Result<Tensor, StageError> {
    let (_, _, h, _) = images.dims4().map_err(tensor_err)?;
    let k = (h / THUMB).max(1);
    let t = images
        .avg_pool2d(k)
        .map_err(tensor_err)?
        .flatten_from(1)
        .map_err(tensor_err)?;
    let t = t
        .broadcast_sub(&t.mean_keepdim(D::Minus1).map_err(tensor_err)?)
        .map_err(tensor_err)?;
    let norm = t
        .sqr()
        .and_then(|x| x.sum_keepdim(D::Minus1))
        .and_then(|x| x.sqrt())
        .map_err(tensor_err)?;
    t.broadcast_div(&(norm + 1e-6).map_err(tensor_err)?)
        .map_err(tensor_err)
}

/// Nearest-neighbour captions for every row of `query`.
pub fn nearest_neighbour(
    train: &Split,
    query: &Split,
    progress: &dyn Fn(u64, u64),
) -> Result<Vec<String>, StageError> {
    let rows = clean_rows(train);
    let idx = Tensor::new(
        rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
        train.images.device(),
    )
    .map_err(tensor_err)?;
    let train_imgs = train.images.index_select(&idx, 0).map_err(tensor_err)?;
    let te = embed(&train_imgs)?;
    let qe = embed(&query.images)?;
    let sims = qe
        .matmul(&te.t().map_err(tensor_err)?)
        .map_err(tensor_err)?;
    let sims: Vec<Vec<f32>> = sims
        .to_dtype(DType::F32)
        .and_then(|s| s.to_vec2())
        .map_err(tensor_err)?;
    let refs: Vec<(String, Vec<String>)> = rows
        .iter()
        .map(|&r| (train.ids[r].clone(), train.captions[r].clone()))
        .collect();
    let references = References::new(&refs, Tokenize::Char)
        .map_err(|e| StageError::msg(format!("nn baseline references: {e}")))?;
    let cider = references.cider();
    let total = sims.len() as u64;
    let mut out = Vec::with_capacity(sims.len());
    for (qi, row) in sims.iter().enumerate() {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        let nbrs = &order[..NEIGHBOURS.min(order.len())];
        let mut best: Option<(f64, &str)> = None;
        for &n in nbrs {
            for cand in &refs[n].1 {
                let mut s = 0.0;
                for &m in nbrs {
                    s += cider
                        .score_text(m, cand)
                        .map_err(|e| StageError::msg(e.to_string()))?;
                }
                let s = s / nbrs.len() as f64;
                if best.is_none_or(|(b, _)| s > b) {
                    best = Some((s, cand));
                }
            }
        }
        out.push(best.map(|(_, c)| c.to_string()).unwrap_or_default());
        if qi % 16 == 0 {
            progress(qi as u64, total);
        }
    }
    Ok(out)
}

/// The most frequent training caption (ties: the shorter, then the smaller).
pub fn most_frequent_caption(train: &Split) -> String {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for r in clean_rows(train) {
        for c in &train.captions[r] {
            *counts.entry(c.as_str()).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by(|a, b| {
            a.1.cmp(&b.1)
                .then(b.0.chars().count().cmp(&a.0.chars().count()))
                .then(b.0.cmp(a.0))
        })
        .map(|(c, _)| c.to_string())
        .unwrap_or_default()
}
