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
    let picks = retrieve(&Index::new(train)?, query, 1, progress)?;
    Ok(picks
        .iter()
        .map(|p| {
            p.first()
                .map(|&(r, j)| train.captions[r][j].clone())
                .unwrap_or_default()
        })
        .collect())
}

/// For every row of `query`, up to `k` distinct captions of its nearest clean training images,
/// best first, as (training row, caption index): the first `k` distinct texts of its
/// [`Pool`] in `index` (the `nn` baseline's choice is the first).
pub fn retrieve(
    index: &Index,
    query: &Split,
    k: usize,
    progress: &dyn Fn(u64, u64),
) -> Result<Vec<Vec<(usize, usize)>>, StageError> {
    let train = index.train();
    let pools = index.pools(query, progress)?;
    Ok(pools
        .iter()
        .map(|pool| {
            let mut picked: Vec<(usize, usize)> = Vec::with_capacity(k);
            for c in &pool.cands {
                if picked.len() == k {
                    break;
                }
                let text = &train.captions[c.row][c.caption];
                if picked.iter().all(|&(r, j)| &train.captions[r][j] != text) {
                    picked.push((c.row, c.caption));
                }
            }
            picked
        })
        .collect())
}

/// One candidate caption of a [`Pool`].
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// Mean CIDEr-D of the caption against each of the pool's neighbours' references.
    pub consensus: f64,
    /// Training row and caption index.
    pub row: usize,
    pub caption: usize,
}

/// What retrieval finds for one query image: its nearest clean training images and their
/// captions, ranked by consensus (best first; ties keep neighbour then caption order).
#[derive(Debug, Clone)]
pub struct Pool {
    /// Neighbours, most similar first, as positions in the index.
    pub nbrs: Vec<usize>,
    pub cands: Vec<Candidate>,
}

/// The clean training images as a retrieval index: mean-centred, L2-normalised 8x8 colour
/// thumbnails compared by cosine similarity, and the training references for consensus
/// scores (CIDEr-D, document frequencies from the training references).
pub struct Index<'a> {
    train: &'a Split,
    rows: Vec<usize>,
    embedded: Tensor,
    references: References,
}

impl<'a> Index<'a> {
    pub fn new(train: &'a Split) -> Result<Self, StageError> {
        let rows = clean_rows(train);
        let idx = Tensor::new(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            train.images.device(),
        )
        .map_err(tensor_err)?;
        let embedded = embed(&train.images.index_select(&idx, 0).map_err(tensor_err)?)?;
        let refs: Vec<(String, Vec<String>)> = rows
            .iter()
            .map(|&r| (train.ids[r].clone(), train.captions[r].clone()))
            .collect();
        let references = References::new(&refs, Tokenize::Char)
            .map_err(|e| StageError::msg(format!("nn retrieval references: {e}")))?;
        Ok(Index {
            train,
            rows,
            embedded,
            references,
        })
    }

    /// The split the index was built from.
    pub fn train(&self) -> &'a Split {
        self.train
    }

    /// Mean CIDEr-D of `text` against the references of each of `nbrs`.
    pub fn consensus(&self, nbrs: &[usize], text: &str) -> Result<f64, StageError> {
        let cider = self.references.cider();
        let mut s = 0.0;
        for &m in nbrs {
            s += cider
                .score_text(m, text)
                .map_err(|e| StageError::msg(e.to_string()))?;
        }
        Ok(s / nbrs.len().max(1) as f64)
    }

    /// The [`Pool`] of every row of `query`: its 5 most similar training images, never one
    /// with the query's own image id (leave-one-out, so that a training image queried
    /// against its own split sees what an unseen image sees).
    pub fn pools(
        &self,
        query: &Split,
        progress: &dyn Fn(u64, u64),
    ) -> Result<Vec<Pool>, StageError> {
        let qe = embed(&query.images)?;
        let sims: Vec<Vec<f32>> = qe
            .matmul(&self.embedded.t().map_err(tensor_err)?)
            .and_then(|s| s.to_dtype(DType::F32))
            .and_then(|s| s.to_vec2())
            .map_err(tensor_err)?;
        let ids = self.references.ids();
        let total = sims.len() as u64;
        let mut out = Vec::with_capacity(sims.len());
        for (qi, row) in sims.iter().enumerate() {
            let mut order: Vec<usize> = (0..row.len())
                .filter(|&n| ids[n] != query.ids[qi])
                .collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            order.truncate(NEIGHBOURS);
            let mut cands = Vec::new();
            for &n in &order {
                let r = self.rows[n];
                for (j, text) in self.train.captions[r].iter().enumerate() {
                    cands.push(Candidate {
                        consensus: self.consensus(&order, text)?,
                        row: r,
                        caption: j,
                    });
                }
            }
            cands.sort_by(|a, b| b.consensus.total_cmp(&a.consensus));
            out.push(Pool { nbrs: order, cands });
            if qi % 16 == 0 {
                progress(qi as u64, total);
            }
        }
        Ok(out)
    }
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

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// Rows of 8x8 images: row `i` shows pattern `pattern[i]` (a bright pixel at that position).
    fn split(ids: &[&str], pattern: &[usize], captions: &[&str]) -> Split {
        let n = ids.len();
        let mut data = vec![0f32; n * 3 * 64];
        for (i, &p) in pattern.iter().enumerate() {
            for c in 0..3 {
                data[i * 192 + c * 64 + p] = 1.0;
            }
        }
        Split {
            name: "train".into(),
            ids: ids.iter().map(|s| s.to_string()).collect(),
            copies: vec![0; n],
            images: Tensor::from_vec(data, (n, 3, 8, 8), &Device::Cpu).unwrap(),
            captions: captions.iter().map(|c| vec![c.to_string()]).collect(),
            tokens: vec![vec![vec![]]; n],
        }
    }

    /// Queried against its own split, an image never retrieves itself (leave-one-out), its
    /// twin (same pixels, other id) is its nearest neighbour, and the `nn` baseline's caption
    /// is the first retrieved one.
    #[test]
    fn retrieval_leaves_the_query_image_out() {
        let train = split(
            &["a", "a2", "b", "b2", "c", "d", "e"],
            &[0, 0, 9, 9, 20, 33, 47],
            &[
                "红色T恤",
                "红色短袖T恤",
                "蓝色长裙",
                "蓝色裙子",
                "白色帽子",
                "黑色手表",
                "绿色水杯",
            ],
        );
        let index = Index::new(&train).unwrap();
        let pools = index.pools(&train, &|_, _| {}).unwrap();
        for (i, pool) in pools.iter().enumerate() {
            assert_eq!(pool.nbrs.len(), NEIGHBOURS);
            assert!(
                pool.cands.iter().all(|c| c.row != i),
                "row {i} retrieved itself"
            );
            assert!(pool
                .cands
                .windows(2)
                .all(|w| w[0].consensus >= w[1].consensus));
        }
        assert_eq!(train.ids[pools[0].nbrs[0]], "a2");
        assert_eq!(train.ids[pools[3].nbrs[0]], "b");
        let picks = retrieve(&index, &train, 2, &|_, _| {}).unwrap();
        let nn = nearest_neighbour(&train, &train, &|_, _| {}).unwrap();
        for (i, p) in picks.iter().enumerate() {
            assert_eq!(p.len(), 2);
            assert_ne!(p[0], p[1]);
            assert_eq!(train.captions[p[0].0][p[0].1], nn[i]);
            assert!(p.iter().all(|&(r, _)| r != i));
        }
    }
}
