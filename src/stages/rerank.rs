//! `method = "rerank"` in `evaluate`: retrieve-and-rerank decoding. Each image's candidates
//! are the model's own greedy caption and the captions of its 5 nearest training images (the
//! `nn` baseline's pool, [`super::baseline::Index`]); the model scores each candidate by its
//! mean token log-probability given the image (EOS included), and the caption with the best
//! `log-prob + weight x consensus` wins, where consensus is the candidate's mean CIDEr-D
//! against the neighbours' references (what the `nn` baseline ranks by alone). The trained
//! model thus judges what retrieval proposes: `weight = 0` trusts the model alone, a large
//! weight falls back to the `nn` baseline's choice.

use crate::data::preprocess::Split;
use crate::data::tokenizer::CaptionTokenizer;
use crate::model::Captioner;

use super::baseline::{Index, Pool};
use super::training;
use super::StageError;

/// Images scored per forward pass.
const CHUNK: usize = 16;

struct Scored {
    ids: Vec<u32>,
    text: String,
    consensus: f64,
}

/// Reranked captions for every row of `split`. `own`: the model's greedy token ids per row;
/// `prompts`: retrieved-caption prompts when the model reads them; `model`: an inference copy.
#[expect(
    clippy::too_many_arguments,
    reason = "the evaluate stage's parts, named"
)]
pub fn rerank(
    model: &Captioner,
    tok: &CaptionTokenizer,
    index: &Index,
    pools: &[Pool],
    split: &Split,
    prompts: Option<&[Vec<u32>]>,
    own: &[Vec<u32>],
    weight: f64,
) -> Result<Vec<String>, StageError> {
    let train = index.train();
    let mut out = Vec::with_capacity(split.len());
    let rows: Vec<usize> = (0..split.len()).collect();
    for chunk in rows.chunks(CHUNK) {
        let mut lists: Vec<Vec<Scored>> = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let pool = &pools[i];
            let text = tok.decode(&own[i]);
            let mut list = vec![Scored {
                ids: own[i].clone(),
                consensus: index.consensus(&pool.nbrs, &text)?,
                text,
            }];
            for c in &pool.cands {
                let text = &train.captions[c.row][c.caption];
                if list.iter().all(|s| &s.text != text) {
                    list.push(Scored {
                        ids: train.tokens[c.row][c.caption].clone(),
                        text: text.clone(),
                        consensus: c.consensus,
                    });
                }
            }
            lists.push(list);
        }
        // Equal counts per image for one batched pass: short lists repeat their last entry.
        let m = lists.iter().map(Vec::len).max().unwrap_or(1);
        let seqs: Vec<Vec<u32>> = lists
            .iter()
            .flat_map(|l| (0..m).map(move |k| l[k.min(l.len() - 1)].ids.clone()))
            .collect();
        let inputs = training::inputs(split, prompts, chunk, model.config())?;
        let lp: Vec<f32> = model
            .log_probs(inputs, &seqs, m)
            .and_then(|t| Ok(t.to_vec1::<f32>()?))
            .map_err(StageError::ctx("scoring rerank candidates"))?;
        let maxc = model.config().max_caption_len;
        for (b, list) in lists.iter().enumerate() {
            let mut best: Option<(f64, usize)> = None;
            for (k, s) in list.iter().enumerate() {
                let len = s.ids.len().min(maxc) + 1;
                let score = lp[b * m + k] as f64 / len as f64 + weight * s.consensus;
                if best.is_none_or(|(bs, _)| score > bs) {
                    best = Some((score, k));
                }
            }
            out.push(best.map(|(_, k)| list[k].text.clone()).unwrap_or_default());
        }
    }
    Ok(out)
}
