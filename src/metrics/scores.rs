//! What scoring produces: per-image records and the corpus scores they add up
//! to. A corpus score is a pure function of the per-image records, so a
//! stored set of records is enough to recompute it on any resample (reports
//! run their bootstrap from the store alone).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::bleu::{BleuCounts, BleuTotals};

/// One of the six reported metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Bleu1,
    Bleu2,
    Bleu3,
    Bleu4,
    RougeL,
    CiderD,
}

impl Metric {
    pub const ALL: [Metric; 6] = [
        Metric::Bleu1,
        Metric::Bleu2,
        Metric::Bleu3,
        Metric::Bleu4,
        Metric::RougeL,
        Metric::CiderD,
    ];

    /// The key used in JSON output and in the store (`bleu4`, `cider_d`, ...).
    pub fn key(self) -> &'static str {
        match self {
            Metric::Bleu1 => "bleu1",
            Metric::Bleu2 => "bleu2",
            Metric::Bleu3 => "bleu3",
            Metric::Bleu4 => "bleu4",
            Metric::RougeL => "rouge_l",
            Metric::CiderD => "cider_d",
        }
    }

    /// The name tables print.
    pub fn label(self) -> &'static str {
        match self {
            Metric::Bleu1 => "BLEU-1",
            Metric::Bleu2 => "BLEU-2",
            Metric::Bleu3 => "BLEU-3",
            Metric::Bleu4 => "BLEU-4",
            Metric::RougeL => "ROUGE-L",
            Metric::CiderD => "CIDEr-D",
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// Corpus scores on pycocoevalcap's raw scale (BLEU and ROUGE-L in [0,1],
/// CIDEr-D with its ×10). Field names are the `ecic eval --json` keys.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Scores {
    pub bleu1: f64,
    pub bleu2: f64,
    pub bleu3: f64,
    pub bleu4: f64,
    pub rouge_l: f64,
    pub cider_d: f64,
    pub images: usize,
}

impl Scores {
    pub fn get(&self, metric: Metric) -> f64 {
        match metric {
            Metric::Bleu1 => self.bleu1,
            Metric::Bleu2 => self.bleu2,
            Metric::Bleu3 => self.bleu3,
            Metric::Bleu4 => self.bleu4,
            Metric::RougeL => self.rouge_l,
            Metric::CiderD => self.cider_d,
        }
    }

    pub fn bleu(&self) -> [f64; 4] {
        [self.bleu1, self.bleu2, self.bleu3, self.bleu4]
    }

    /// Corpus scores of `images` (all zero for none).
    pub fn from_images(images: &[ImageScore]) -> Scores {
        Self::aggregate(images.iter())
    }

    /// Corpus scores of the multiset `images[i] for i in indices`: a bootstrap
    /// resample. BLEU sums counts; ROUGE-L and CIDEr-D average (CIDEr-D keeps
    /// the document frequencies of the full evaluation, see `bootstrap`).
    pub fn from_sample(images: &[ImageScore], indices: &[usize]) -> Scores {
        Self::aggregate(indices.iter().filter_map(|&i| images.get(i)))
    }

    pub fn aggregate<'a>(images: impl Iterator<Item = &'a ImageScore>) -> Scores {
        let mut totals = BleuTotals::default();
        let (mut rouge, mut cider, mut n) = (0.0, 0.0, 0usize);
        for im in images {
            totals.add(&im.counts);
            rouge += im.rouge_l;
            cider += im.cider_d;
            n += 1;
        }
        if n == 0 {
            return Scores::default();
        }
        let [bleu1, bleu2, bleu3, bleu4] = totals.bleu();
        Scores {
            bleu1,
            bleu2,
            bleu3,
            bleu4,
            rouge_l: rouge / n as f64,
            cider_d: cider / n as f64,
            images: n,
        }
    }
}

/// The scores of one image, and what a resample needs to recompute corpus
/// BLEU (`counts`). This is the record the store keeps per image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageScore {
    pub image_id: String,
    /// pycocoevalcap's per-image BLEU-1..4 (for display; corpus BLEU is
    /// computed from `counts`, never averaged from these).
    pub bleu: [f64; 4],
    pub rouge_l: f64,
    pub cider_d: f64,
    pub counts: BleuCounts,
}

impl ImageScore {
    /// The per-image value of a metric (BLEU: pycocoevalcap's per-image BLEU).
    pub fn get(&self, metric: Metric) -> f64 {
        match metric {
            Metric::Bleu1 => self.bleu[0],
            Metric::Bleu2 => self.bleu[1],
            Metric::Bleu3 => self.bleu[2],
            Metric::Bleu4 => self.bleu[3],
            Metric::RougeL => self.rouge_l,
            Metric::CiderD => self.cider_d,
        }
    }
}

/// A scored prediction set: corpus scores and one record per reference image,
/// in reference order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub scores: Scores,
    pub images: Vec<ImageScore>,
}
