//! A reference corpus prepared once (tokenized, interned, n-grams counted,
//! document frequencies fixed) and the scoring of prediction sets against it.
//! Preparing is most of the work; scoring a second prediction set (`--compare`)
//! reuses it.

use rayon::prelude::*;

use super::bleu::image_counts;
use super::cider::CiderD;
use super::ngram::{encode_references, Caption, FastMap, Unknowns};
use super::rouge::rouge_l;
use super::scores::{Evaluation, ImageScore, Scores};
use super::tokenize::{tokenize_into, Tokenize};
use super::MetricsError;

/// ROUGE-L's token ids of one image's references (`str.split(" ")`), kept only where they
/// differ from the words CIDEr-D keeps (`space` mode with empty or whitespace tokens, an empty
/// caption); BLEU and ROUGE-L read the references from [`CiderD::ref_words`] otherwise.
type RougeRefs = Option<Vec<Vec<u32>>>;

/// The references of an evaluation split, ready to score predictions.
#[derive(Debug, Clone)]
pub struct References {
    mode: Tokenize,
    ids: Vec<String>,
    index: FastMap<String, usize>,
    rouge: Vec<RougeRefs>,
    cider: CiderD,
}

impl References {
    /// Prepare `refs` (image id, reference captions): ids must be unique and
    /// every list non-empty.
    pub fn new(refs: &[(String, Vec<String>)], mode: Tokenize) -> Result<Self, MetricsError> {
        let index = check_ids(refs)?;
        let (vocab, captions) = encode_references(refs, |(_, caps)| caps.as_slice(), mode);
        let ids = refs.iter().map(|(id, _)| id.clone()).collect();
        Ok(Self::build(ids, index, vocab, captions, mode))
    }

    /// [`References::new`] taking the texts, which are freed once tokenized, before the
    /// n-grams are counted (`ecic eval`'s peak memory).
    pub fn from_owned(
        refs: Vec<(String, Vec<String>)>,
        mode: Tokenize,
    ) -> Result<Self, MetricsError> {
        let index = check_ids(&refs)?;
        let (vocab, captions) = encode_references(&refs, |(_, caps)| caps.as_slice(), mode);
        let ids = refs.into_iter().map(|(id, _)| id).collect();
        Ok(Self::build(ids, index, vocab, captions, mode))
    }

    fn build(
        ids: Vec<String>,
        index: FastMap<String, usize>,
        vocab: super::ngram::Vocab,
        captions: Vec<Vec<Caption>>,
        mode: Tokenize,
    ) -> Self {
        let rouge: Vec<RougeRefs> = captions
            .par_iter()
            .map(|caps| {
                caps.iter()
                    .any(|c| c.rouge.is_some())
                    .then(|| caps.iter().map(|c| c.rouge_tokens().to_vec()).collect())
            })
            .collect();
        let cider = CiderD::from_captions(vocab, mode, captions, false);
        References {
            mode,
            ids,
            index,
            rouge,
            cider,
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// Position of an image id in reference order.
    pub fn position(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    pub fn tokenize_mode(&self) -> Tokenize {
        self.mode
    }

    /// The CIDEr-D scorer over these references.
    pub fn cider(&self) -> &CiderD {
        &self.cider
    }

    /// Every metric of one predicted caption for image `image`.
    pub fn score_image(&self, image: usize, pred: &str) -> Result<ImageScore, MetricsError> {
        let (words, rouge_refs) = match (self.cider.ref_words(image), self.rouge.get(image)) {
            (Some(w), Some(r)) => (w, r),
            _ => {
                return Err(MetricsError::ImageIndex {
                    index: image,
                    images: self.len(),
                })
            }
        };
        let mut tokens = Vec::new();
        tokenize_into(pred, self.mode, &mut tokens);
        let vocab = self.cider.vocab();
        let mut unknown = Unknowns::new(vocab);
        let cap = Caption::encode(&tokens, self.mode, |t| unknown.id(vocab, t));
        let (cider, correct) = self.cider.score_words(image, &cap.words)?;
        let lens: Vec<u32> = words
            .iter()
            .map(|w| u32::try_from(w.len()).unwrap_or(u32::MAX))
            .collect();
        let bleu_counts = image_counts(cap.words.len(), &lens, correct);
        let mut row = Vec::new();
        let rouge = match rouge_refs {
            Some(r) => rouge_l(cap.rouge_tokens(), r.iter().map(Vec::as_slice), &mut row),
            None => rouge_l(cap.rouge_tokens(), words.iter().copied(), &mut row),
        };
        Ok(ImageScore {
            image_id: self.ids[image].clone(),
            bleu: bleu_counts.bleu(),
            rouge_l: rouge,
            cider_d: cider,
            counts: bleu_counts,
        })
    }

    /// Score predictions given in reference order (`preds[i]` for image `i`).
    pub fn evaluate_in_order<S: AsRef<str> + Sync>(
        &self,
        preds: &[S],
    ) -> Result<Evaluation, MetricsError> {
        if preds.len() != self.len() {
            return Err(MetricsError::Count {
                predictions: preds.len(),
                images: self.len(),
            });
        }
        if preds.is_empty() {
            return Err(MetricsError::NoImages);
        }
        let images = preds
            .par_iter()
            .enumerate()
            .map(|(i, p)| self.score_image(i, p.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Evaluation {
            scores: Scores::from_images(&images),
            images,
        })
    }

    /// Score (image id, caption) predictions: exactly one per reference image.
    pub fn evaluate(&self, preds: &[(String, String)]) -> Result<Evaluation, MetricsError> {
        let mut ordered: Vec<Option<&str>> = vec![None; self.len()];
        for (id, text) in preds {
            let i = self
                .position(id)
                .ok_or_else(|| MetricsError::UnknownImage { id: id.clone() })?;
            if ordered[i].replace(text).is_some() {
                return Err(MetricsError::DuplicateImage { id: id.clone() });
            }
        }
        let ordered = ordered
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                p.ok_or_else(|| MetricsError::MissingPrediction {
                    id: self.ids[i].clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.evaluate_in_order(&ordered)
    }
}

/// Id -> position of every reference image; an error for a repeated id or an empty list.
fn check_ids(refs: &[(String, Vec<String>)]) -> Result<FastMap<String, usize>, MetricsError> {
    let mut index = FastMap::default();
    for (i, (id, caps)) in refs.iter().enumerate() {
        if caps.is_empty() {
            return Err(MetricsError::EmptyReferences { id: id.clone() });
        }
        if index.insert(id.clone(), i).is_some() {
            return Err(MetricsError::DuplicateImage { id: id.clone() });
        }
    }
    Ok(index)
}

/// Score predictions `(image id, caption)` against references
/// `(image id, captions)` with tokenization `mode`: pycocoevalcap 1.2's BLEU,
/// ROUGE-L and CIDEr-D (document frequencies from `refs`).
pub fn evaluate(
    preds: &[(String, String)],
    refs: &[(String, Vec<String>)],
    mode: Tokenize,
) -> Result<Evaluation, MetricsError> {
    References::new(refs, mode)?.evaluate(preds)
}
