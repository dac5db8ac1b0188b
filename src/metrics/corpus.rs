//! A reference corpus prepared once (tokenized, interned, n-grams counted,
//! document frequencies fixed) and the scoring of prediction sets against it.
//! Preparing is most of the work; scoring a second prediction set (`--compare`)
//! reuses it.

use rayon::prelude::*;

use super::bleu::image_counts;
use super::cider::CiderD;
use super::ngram::{Caption, FastMap, Unknowns, Vocab};
use super::rouge::rouge_l;
use super::scores::{Evaluation, ImageScore, Scores};
use super::tokenize::{tokenize_into, Tokenize};
use super::MetricsError;

/// What BLEU and ROUGE-L keep of one image's references.
#[derive(Debug, Clone)]
struct RefImage {
    lens: Vec<u32>,
    rouge: Vec<Vec<u32>>,
}

/// The references of an evaluation split, ready to score predictions.
#[derive(Debug, Clone)]
pub struct References {
    mode: Tokenize,
    ids: Vec<String>,
    index: FastMap<String, usize>,
    images: Vec<RefImage>,
    cider: CiderD,
}

impl References {
    /// Prepare `refs` (image id, reference captions): ids must be unique and
    /// every list non-empty.
    pub fn new(refs: &[(String, Vec<String>)], mode: Tokenize) -> Result<Self, MetricsError> {
        let mut index = FastMap::default();
        for (i, (id, caps)) in refs.iter().enumerate() {
            if caps.is_empty() {
                return Err(MetricsError::EmptyReferences { id: id.clone() });
            }
            if index.insert(id.clone(), i).is_some() {
                return Err(MetricsError::DuplicateImage { id: id.clone() });
            }
        }
        let tokens: Vec<Vec<Vec<&str>>> = refs
            .par_iter()
            .map(|(_, caps)| {
                caps.iter()
                    .map(|c| {
                        let mut t = Vec::new();
                        tokenize_into(c, mode, &mut t);
                        t
                    })
                    .collect()
            })
            .collect();
        let mut vocab = Vocab::default();
        let captions: Vec<Vec<Caption>> = tokens
            .iter()
            .map(|caps| {
                caps.iter()
                    .map(|t| Caption::encode(t, mode, |s| vocab.intern(s)))
                    .collect()
            })
            .collect();
        drop(tokens);
        let images: Vec<RefImage> = captions
            .par_iter()
            .map(|caps| RefImage {
                lens: caps
                    .iter()
                    .map(|c| u32::try_from(c.words.len()).unwrap_or(u32::MAX))
                    .collect(),
                rouge: caps.iter().map(|c| c.rouge_tokens().to_vec()).collect(),
            })
            .collect();
        let cider = CiderD::from_captions(vocab, mode, &captions, false);
        let ids = refs.iter().map(|(id, _)| id.clone()).collect();
        Ok(References {
            mode,
            ids,
            index,
            images,
            cider,
        })
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
        let refs = self.images.get(image).ok_or(MetricsError::ImageIndex {
            index: image,
            images: self.images.len(),
        })?;
        let mut tokens = Vec::new();
        tokenize_into(pred, self.mode, &mut tokens);
        let vocab = self.cider.vocab();
        let mut unknown = Unknowns::new(vocab);
        let cap = Caption::encode(&tokens, self.mode, |t| unknown.id(vocab, t));
        let (cider, correct) = self.cider.score_words(image, &cap.words)?;
        let bleu_counts = image_counts(cap.words.len(), &refs.lens, correct);
        let mut row = Vec::new();
        let rouge = rouge_l(
            cap.rouge_tokens(),
            refs.rouge.iter().map(Vec::as_slice),
            &mut row,
        );
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
