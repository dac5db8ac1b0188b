//! The embedded default data set (`ecic data synth`): procedurally drawn
//! product photos with e-commerce captions, written in MUGE layout so that
//! the same reader serves it and the real data.
//!
//! Captioning here is learnable and grounded: the category, colour and
//! pattern words of every caption are drawn in the image (12 silhouettes,
//! 10 colours, 5 patterns, varied position, scale, rotation and background;
//! some images hold a second product), while the selling points around them
//! are noise no model can see, as in MUGE. A second, generic domain
//! (`ALIGN_*`) describes the same kind of images plainly, for the
//! pretrain-align stage, and a larger corpus of it (`FOUNDATION_train`) for the
//! foundation stages that pretrain the vision tower and the LM.
//!
//! Every image is generated from its own ChaCha stream, keyed by seed, split
//! and index, so the bytes are the same whatever the thread count.

mod draw;
mod text;
mod vocab;

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::muge::{MugeError, SplitWriter};
use draw::{Item, Scene};

/// Sizes and knobs of the synthetic set. `Default` is the embedded default
/// (small enough that the 27-cell ablation trains in minutes on 2 cores).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SynthConfig {
    pub seed: u64,
    pub train: usize,
    pub valid: usize,
    pub test: usize,
    /// Images of the generic domain (`ALIGN_train`).
    pub align: usize,
    /// `ALIGN_valid` is written only when this is above 0.
    pub align_valid: usize,
    /// Images of the generic-domain pretraining corpus (`FOUNDATION_train`, written only
    /// when above 0): the image-text pairs and caption text the foundation stages learn the
    /// vision tower and the LM from, the stand-in for a real VLM's web-scale pretraining data.
    #[serde(default)]
    pub foundation: usize,
    /// Side of the square images in pixels.
    pub image_size: u32,
    pub jpeg_quality: u8,
    /// Share of images holding a second product.
    pub two_item_rate: f64,
    /// Captions per image, drawn uniformly from this range (inclusive).
    pub captions_min: usize,
    pub captions_max: usize,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            seed: 20240601,
            train: 1000,
            valid: 200,
            test: 200,
            align: 1000,
            align_valid: 0,
            foundation: 0,
            image_size: 128,
            jpeg_quality: 90,
            two_item_rate: 0.15,
            captions_min: 5,
            captions_max: 10,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error(transparent)]
    Write(#[from] MugeError),
    #[error("cannot encode JPEG for {id}: {msg}")]
    Jpeg { id: String, msg: String },
    #[error("bad synth config: {0}")]
    Config(String),
}

/// The file [`generate`] leaves beside the data: its [`SynthConfig`].
pub const SYNTH_JSON: &str = "synth.json";

impl SynthConfig {
    /// The settings a synthetic data directory was generated with; `None` for any other
    /// directory (or an unreadable file: grounding is then simply not measured).
    pub fn of_dir(dir: &Path) -> Option<SynthConfig> {
        let bytes = std::fs::read(dir.join(SYNTH_JSON)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct SynthSummary {
    pub dir: PathBuf,
    /// (file prefix, images) per split written.
    pub splits: Vec<(String, usize)>,
}

/// The split prefixes and sizes `cfg` asks for.
fn plan(cfg: &SynthConfig) -> Vec<(&'static str, usize)> {
    let mut v = vec![
        ("IC_train", cfg.train),
        ("IC_valid", cfg.valid),
        ("IC_test", cfg.test),
        ("ALIGN_train", cfg.align),
    ];
    if cfg.align_valid > 0 {
        v.push(("ALIGN_valid", cfg.align_valid));
    }
    if cfg.foundation > 0 {
        v.push(("FOUNDATION_train", cfg.foundation));
    }
    v
}

/// The 32-byte key of one image's random stream.
fn image_key(seed: u64, prefix: &str, index: usize) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"ecic-synth-v1");
    h.update(&seed.to_le_bytes());
    h.update(prefix.as_bytes());
    h.update(&(index as u64).to_le_bytes());
    *h.finalize().as_bytes()
}

fn sample_item<R: Rng>(
    rng: &mut R,
    size: f32,
    lo: (f32, f32),
    hi: (f32, f32),
    avoid_cat: Option<usize>,
) -> Item {
    let mut cat = rng.gen_range(0..vocab::CATEGORIES.len());
    while Some(cat) == avoid_cat {
        cat = rng.gen_range(0..vocab::CATEGORIES.len());
    }
    Item {
        cat,
        colour: rng.gen_range(0..vocab::COLOURS.len()),
        pattern: rng.gen_range(0..vocab::PATTERNS.len()),
        cx: rng.gen_range(lo.0..=hi.0),
        cy: rng.gen_range(lo.1..=hi.1),
        size,
        angle: rng.gen_range(-20.0..=20.0),
        stripes_vertical: rng.gen_bool(0.5),
        print_seed: rng.gen(),
    }
}

/// Picks a background far enough from every item's colour to keep the
/// silhouette visible.
fn pick_background<R: Rng>(rng: &mut R, items: &[Item]) -> usize {
    let dist = |a: [u8; 3], b: [u8; 3]| {
        a.iter()
            .zip(b)
            .map(|(&x, y)| (i32::from(x) - i32::from(y)).abs())
            .sum::<i32>()
    };
    let ok: Vec<usize> = (0..vocab::BACKGROUNDS.len())
        .filter(|&b| {
            items
                .iter()
                .all(|it| dist(vocab::BACKGROUNDS[b].1, vocab::COLOURS[it.colour].1) > 90)
        })
        .collect();
    if ok.is_empty() {
        rng.gen_range(0..vocab::BACKGROUNDS.len())
    } else {
        ok[rng.gen_range(0..ok.len())]
    }
}

fn sample_scene<R: Rng>(rng: &mut R, side: f32, two_item_rate: f64) -> Scene {
    let items = if rng.gen_bool(two_item_rate.clamp(0.0, 1.0)) {
        let s1 = side * rng.gen_range(0.50..0.60);
        let s2 = side * rng.gen_range(0.36..0.46);
        let horizontal = rng.gen_bool(0.5);
        // The main item takes one half, the second the far side of the other.
        let a = if horizontal {
            sample_item(
                rng,
                s1,
                (s1 * 0.5, s1 * 0.5),
                (side * 0.5, side - s1 * 0.5),
                None,
            )
        } else {
            sample_item(
                rng,
                s1,
                (s1 * 0.5, s1 * 0.5),
                (side - s1 * 0.5, side * 0.5),
                None,
            )
        };
        let second = if horizontal {
            sample_item(
                rng,
                s2,
                (side * 0.62, s2 * 0.5),
                (side - s2 * 0.5, side - s2 * 0.5),
                Some(a.cat),
            )
        } else {
            sample_item(
                rng,
                s2,
                (s2 * 0.5, side * 0.62),
                (side - s2 * 0.5, side - s2 * 0.5),
                Some(a.cat),
            )
        };
        vec![a, second]
    } else {
        let s = side * rng.gen_range(0.52..0.78);
        let m = s * 0.5;
        vec![sample_item(rng, s, (m, m), (side - m, side - m), None)]
    };
    let background = pick_background(rng, &items);
    Scene {
        items,
        background,
        tint: rng.gen_range(-1.0..=1.0),
    }
}

/// One image: id, JPEG bytes, captions.
fn make_image(
    cfg: &SynthConfig,
    prefix: &str,
    index: usize,
) -> Result<(String, Vec<u8>, Vec<String>), SynthError> {
    let key = image_key(cfg.seed, prefix, index);
    let id: String = key[..16].iter().map(|b| format!("{b:02x}")).collect();
    let mut rng = ChaCha8Rng::from_seed(key);
    let scene = sample_scene(&mut rng, cfg.image_size as f32, cfg.two_item_rate);
    let n = rng.gen_range(cfg.captions_min..=cfg.captions_max);
    let captions = if prefix.starts_with("ALIGN") || prefix.starts_with("FOUNDATION") {
        text::distinct(&mut rng, n, |r| text::plain(r, &scene))
    } else {
        text::distinct(&mut rng, n, |r| text::ecommerce(r, &scene))
    };
    let rgb = draw::render(&scene, cfg.image_size);
    let mut jpeg = Vec::with_capacity(8 << 10);
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, cfg.jpeg_quality.clamp(1, 100))
        .encode(
            &rgb,
            cfg.image_size,
            cfg.image_size,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| SynthError::Jpeg {
            id: id.clone(),
            msg: e.to_string(),
        })?;
    Ok((id, jpeg, captions))
}

/// Writes the synthetic set into `out_dir` (created if needed).
pub fn generate(out_dir: &Path, cfg: &SynthConfig) -> Result<SynthSummary, SynthError> {
    if cfg.captions_min == 0 || cfg.captions_min > cfg.captions_max {
        return Err(SynthError::Config(format!(
            "captions_min ({}) must be at least 1 and at most captions_max ({})",
            cfg.captions_min, cfg.captions_max
        )));
    }
    if !(16..=1024).contains(&cfg.image_size) {
        return Err(SynthError::Config(format!(
            "image_size {} is outside 16..=1024",
            cfg.image_size
        )));
    }
    const CHUNK: usize = 512;
    let mut splits = Vec::new();
    for (prefix, n) in plan(cfg) {
        let mut w = SplitWriter::create(out_dir, prefix)?;
        for start in (0..n).step_by(CHUNK) {
            let batch: Vec<_> = (start..(start + CHUNK).min(n))
                .into_par_iter()
                .map(|i| make_image(cfg, prefix, i))
                .collect();
            for r in batch {
                let (id, jpeg, caps) = r?;
                w.write(&id, &jpeg, &caps)?;
            }
        }
        w.finish()?;
        splits.push((prefix.to_owned(), n));
    }
    // The settings that regenerate the truth of every image (grounding metrics, see
    // [`truths`]); a data set without this file is not known to be synthetic.
    let path = out_dir.join(SYNTH_JSON);
    let json = serde_json::to_vec_pretty(cfg).expect("json");
    std::fs::write(&path, json)
        .map_err(|e| SynthError::Config(format!("{}: {e}", path.display())))?;
    Ok(SynthSummary {
        dir: out_dir.to_owned(),
        splits,
    })
}

/// The attribute labels of one synthetic image, for sanity checks (e.g. a
/// nearest-neighbour probe that images carry their captions' attributes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labels {
    pub category: &'static str,
    pub colour: &'static str,
    pub pattern: &'static str,
}

/// Recomputes the labels of image `index` of split `prefix` from the seed,
/// without drawing it.
pub fn labels(cfg: &SynthConfig, prefix: &str, index: usize) -> (String, Labels) {
    let key = image_key(cfg.seed, prefix, index);
    let id: String = key[..16].iter().map(|b| format!("{b:02x}")).collect();
    let mut rng = ChaCha8Rng::from_seed(key);
    let scene = sample_scene(&mut rng, cfg.image_size as f32, cfg.two_item_rate);
    let it = &scene.items[0];
    (
        id,
        Labels {
            category: vocab::CATEGORIES[it.cat].name,
            colour: vocab::COLOURS[it.colour].0,
            pattern: vocab::PATTERNS[it.pattern].0,
        },
    )
}

/// Names of the categories, colours and patterns the generator uses.
pub fn attribute_names() -> (Vec<&'static str>, Vec<&'static str>, Vec<&'static str>) {
    (
        vocab::CATEGORIES.iter().map(|c| c.name).collect(),
        vocab::COLOURS.iter().map(|c| c.0).collect(),
        vocab::PATTERNS.iter().map(|p| p.0).collect(),
    )
}

/// What one synthetic image shows, as the words a caption may use for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truth {
    /// Category index (into [`attribute_names`]'s categories) and every word that names it.
    pub category: usize,
    pub category_words: Vec<&'static str>,
    pub colour: &'static str,
    /// The pattern's words; a plain item may go unnamed, so `plain` says whether it is plain.
    pub pattern_words: Vec<&'static str>,
    pub plain: bool,
    /// The second item's category words, when the image holds two products.
    pub second_words: Option<Vec<&'static str>>,
}

/// Category words of `cat`: its name and its e-commerce synonyms.
fn category_words(cat: usize) -> Vec<&'static str> {
    let c = &vocab::CATEGORIES[cat];
    let mut w = vec![c.name];
    w.extend(c.synonyms.iter().copied().filter(|s| *s != c.name));
    w
}

/// The truth of every image of split `prefix` (`IC_valid`, ...) of a set generated with `cfg`,
/// by image id, recomputed from the seed without drawing. Only the `n` first indices are
/// visited; ids not among them are simply absent.
pub fn truths(
    cfg: &SynthConfig,
    prefix: &str,
    n: usize,
) -> std::collections::HashMap<String, Truth> {
    (0..n)
        .into_par_iter()
        .map(|index| {
            let key = image_key(cfg.seed, prefix, index);
            let id: String = key[..16].iter().map(|b| format!("{b:02x}")).collect();
            let mut rng = ChaCha8Rng::from_seed(key);
            let scene = sample_scene(&mut rng, cfg.image_size as f32, cfg.two_item_rate);
            let it = &scene.items[0];
            let pat = &vocab::PATTERNS[it.pattern];
            let mut pattern_words = vec![pat.0];
            pattern_words.extend(pat.1.iter().copied().filter(|s| *s != pat.0));
            (
                id,
                Truth {
                    category: it.cat,
                    category_words: category_words(it.cat),
                    colour: vocab::COLOURS[it.colour].0,
                    pattern_words,
                    plain: it.pattern == 0,
                    second_words: scene.items.get(1).map(|s| category_words(s.cat)),
                },
            )
        })
        .collect()
}

/// Share of captions that name what their image shows (see `docs/store.md`, grounding
/// metrics); each share is over the images it applies to, `None` where none does.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Grounding {
    pub category: Option<f64>,
    pub colour: Option<f64>,
    /// Over images whose main item is patterned (a plain item may go unnamed).
    pub pattern: Option<f64>,
    /// Over two-item images: the second item's category is named.
    pub second: Option<f64>,
}

/// Scores `captions` of images `ids` against `truths`; images without a truth are skipped.
pub fn grounding(
    truths: &std::collections::HashMap<String, Truth>,
    ids: &[String],
    captions: &[String],
) -> Grounding {
    let (mut n, mut cat, mut col) = (0usize, 0usize, 0usize);
    let (mut np, mut pat, mut ns, mut sec) = (0usize, 0usize, 0usize, 0usize);
    let names = |words: &[&str], c: &str| words.iter().any(|w| c.contains(w));
    for (id, c) in ids.iter().zip(captions) {
        let Some(t) = truths.get(id) else { continue };
        n += 1;
        cat += usize::from(names(&t.category_words, c));
        col += usize::from(c.contains(t.colour));
        if !t.plain {
            np += 1;
            pat += usize::from(names(&t.pattern_words, c));
        }
        if let Some(w) = &t.second_words {
            ns += 1;
            sec += usize::from(names(w, c));
        }
    }
    let share = |k: usize, of: usize| (of > 0).then(|| k as f64 / of as f64);
    Grounding {
        category: share(cat, n),
        colour: share(col, n),
        pattern: share(pat, np),
        second: share(sec, ns),
    }
}
