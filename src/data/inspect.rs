//! `ecic data inspect`: one full validating pass over every split of a data
//! directory, reporting counts, caption statistics, image sizes and every bad
//! record. It decodes every image, so it finds exactly what preprocessing
//! would trip on.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;

use super::muge::{read_split, BadRecord, BadRecordPolicy, MugeError, ReadOptions};
use super::tokenizer::char_tokens;

/// Statistics of one split.
#[derive(Debug, Clone)]
pub struct SplitStats {
    pub prefix: String,
    pub images: usize,
    pub captions: usize,
    /// Caption lengths in characters (whitespace not counted): p5, p25, p50,
    /// p75, p95, max.
    pub length_percentiles: [usize; 6],
    pub mean_length: f64,
    /// Distinct tokens under the metrics' `char` rule.
    pub vocab_size: usize,
    /// Image sizes `WxH` and how many images have each.
    pub sizes: BTreeMap<(u32, u32), usize>,
    pub bad: Vec<BadRecord>,
}

#[derive(Debug, Clone, Default)]
pub struct InspectReport {
    pub splits: Vec<SplitStats>,
}

/// Prefixes present in `dir`, in pipeline order.
pub fn present_prefixes(dir: &Path) -> Vec<String> {
    [
        "IC_train",
        "IC_valid",
        "IC_test",
        "ALIGN_train",
        "ALIGN_valid",
    ]
    .iter()
    .filter(|p| dir.join(format!("{p}.tsv")).exists() || dir.join(format!("{p}.jsonl")).exists())
    .map(|p| (*p).to_owned())
    .collect()
}

fn percentile(sorted: &[usize], q: f64) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Inspects one split; bad records are collected, never fatal.
pub fn inspect_split(dir: &Path, prefix: &str) -> Result<SplitStats, MugeError> {
    let opts = ReadOptions {
        policy: BadRecordPolicy::Skip,
        // The test split may carry ids only.
        require_refs: prefix != "IC_test",
        // An empty split is reported below, with the rest.
        allow_empty: true,
        ..ReadOptions::default()
    };
    let mut lengths = Vec::new();
    let mut vocab: HashSet<String> = HashSet::new();
    let mut sizes = BTreeMap::new();
    let report = read_split::<_, MugeError, _, _>(
        dir,
        prefix,
        &opts,
        |_, img| (img.width(), img.height()),
        |chunk| {
            for r in chunk {
                *sizes.entry(r.value).or_insert(0) += 1;
                for c in &r.captions {
                    let toks = char_tokens(c);
                    lengths.push(c.chars().filter(|ch| !ch.is_whitespace()).count());
                    for t in toks {
                        if !vocab.contains(t) {
                            vocab.insert(t.to_owned());
                        }
                    }
                }
            }
            Ok(())
        },
    )?;
    lengths.sort_unstable();
    let mean = if lengths.is_empty() {
        0.0
    } else {
        lengths.iter().sum::<usize>() as f64 / lengths.len() as f64
    };
    let p = |q| percentile(&lengths, q);
    Ok(SplitStats {
        prefix: prefix.to_owned(),
        images: report.records,
        captions: lengths.len(),
        length_percentiles: [
            p(0.05),
            p(0.25),
            p(0.5),
            p(0.75),
            p(0.95),
            lengths.last().copied().unwrap_or(0),
        ],
        mean_length: mean,
        vocab_size: vocab.len(),
        sizes,
        bad: report.bad,
    })
}

/// Inspects every split present in `dir`.
pub fn inspect(dir: &Path) -> Result<InspectReport, MugeError> {
    let splits = present_prefixes(dir)
        .iter()
        .map(|p| inspect_split(dir, p))
        .collect::<Result<_, _>>()?;
    Ok(InspectReport { splits })
}

impl InspectReport {
    /// The human-readable report `ecic data inspect` prints.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<12} {:>7} {:>8} {:>6}  {:<28} {:>6}  {:>5}",
            "split",
            "images",
            "captions",
            "cap/im",
            "length p5/p25/p50/p75/p95/max",
            "mean",
            "vocab"
        );
        for t in &self.splits {
            let l = t.length_percentiles;
            let per = if t.images == 0 {
                0.0
            } else {
                t.captions as f64 / t.images as f64
            };
            let _ = writeln!(
                s,
                "{:<12} {:>7} {:>8} {:>6.1}  {:<28} {:>6.1}  {:>5}",
                t.prefix,
                t.images,
                t.captions,
                per,
                format!("{}/{}/{}/{}/{}/{}", l[0], l[1], l[2], l[3], l[4], l[5]),
                t.mean_length,
                t.vocab_size
            );
        }
        let _ = writeln!(s, "\nimage sizes:");
        for t in &self.splits {
            let sizes: Vec<String> = t
                .sizes
                .iter()
                .map(|((w, h), n)| format!("{w}x{h}: {n}"))
                .collect();
            let _ = writeln!(
                s,
                "  {:<12} {}",
                t.prefix,
                if sizes.is_empty() {
                    "-".to_owned()
                } else {
                    sizes.join(", ")
                }
            );
        }
        let total: usize = self.splits.iter().map(|t| t.bad.len()).sum();
        let _ = writeln!(s, "\nbad records: {total}");
        for t in &self.splits {
            for b in &t.bad {
                let _ = writeln!(s, "  {b}");
            }
        }
        let empty = self.empty_splits();
        if !empty.is_empty() {
            let _ = writeln!(s, "\nsplits without a usable image: {}", empty.len());
            for p in empty {
                let _ = writeln!(s, "  {p}: nothing can be trained or scored on it");
            }
        }
        s
    }

    /// Splits present in the directory that hold no good record.
    pub fn empty_splits(&self) -> Vec<&str> {
        self.splits
            .iter()
            .filter(|t| t.images == 0)
            .map(|t| t.prefix.as_str())
            .collect()
    }
}
