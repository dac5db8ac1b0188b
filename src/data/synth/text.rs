//! Captions of the synthetic set. The e-commerce (`IC_*`) style names the
//! visible attributes (colour, pattern, category, and the second item when
//! there is one) in varied order and wording, wrapped in selling points that
//! no image shows, as real MUGE captions are. The generic (`ALIGN_*`) style
//! describes the same kind of image plainly, background included.

use rand::seq::SliceRandom;
use rand::Rng;

use super::draw::{Item, Scene};
use super::vocab::{
    benefits, sentences, AUDIENCES, BACKGROUNDS, CATEGORIES, COLOURS, MARKETING, PATTERNS, SEASONS,
    TAILS,
};

fn pick<'a, R: Rng>(rng: &mut R, xs: &[&'a str]) -> &'a str {
    xs.choose(rng).copied().unwrap_or("")
}

/// The words of one item as an e-commerce caption says them.
struct Words {
    colour: String,
    pattern: String,
    cat: String,
}

fn ecommerce_words<R: Rng>(rng: &mut R, item: &Item) -> Words {
    let colour = COLOURS[item.colour].0.to_owned();
    // Plain items are often sold without saying so.
    let pattern = if item.pattern == 0 && rng.gen_bool(0.5) {
        String::new()
    } else {
        pick(rng, PATTERNS[item.pattern].1).to_owned()
    };
    let cat = pick(rng, CATEGORIES[item.cat].synonyms).to_owned();
    Words {
        colour,
        pattern,
        cat,
    }
}

/// A second, different selling point.
fn two_marketing<R: Rng>(rng: &mut R) -> (&'static str, &'static str) {
    let a = pick(rng, MARKETING);
    let mut b = pick(rng, MARKETING);
    while b == a {
        b = pick(rng, MARKETING);
    }
    (a, b)
}

/// One e-commerce caption of `scene`.
pub(crate) fn ecommerce<R: Rng>(rng: &mut R, scene: &Scene) -> String {
    let main = &scene.items[0];
    let group = CATEGORIES[main.cat].group;
    let Words {
        colour: c,
        pattern: p,
        cat: k,
    } = ecommerce_words(rng, main);
    let (g, g2) = two_marketing(rng);
    let b = pick(rng, benefits(group));
    let s = pick(rng, SEASONS);
    let a = pick(rng, AUDIENCES);
    let mut text = match rng.gen_range(0..9) {
        0 => format!("{s}{g}{c}{p}{k}，{b}{g2}"),
        1 => format!("{g}{p}{k}{c}，{b}"),
        2 => format!("{c}{p}{k}{a}{s}{g}"),
        3 => format!(
            "这款{c}{k}采用{}设计，{b}又{g}",
            if p.is_empty() { "纯色" } else { &p }
        ),
        4 => format!("{a}{p}{c}{k}，{g}{b}，{g2}"),
        5 => format!("{c}{p}{g}{k}{b}"),
        6 => format!("{g}{k}，{c}{p}款，{b}"),
        7 => format!("{s}{c}{k}{p}{b}"),
        _ => format!("{a}{g}{c}{p}{k}"),
    };
    if let Some(second) = scene.items.get(1) {
        let w = ecommerce_words(rng, second);
        let join = pick(rng, &["搭配", "送", "加", "+"]);
        text = format!("{text}，{join}{}{}", w.colour, w.cat);
    }
    // A long tail like the real set's 60-90 character outliers.
    if rng.gen_bool(0.08) {
        let t = pick(rng, TAILS);
        let t2 = pick(rng, TAILS);
        let sentence = pick(rng, sentences(group));
        text = format!("{text}，{sentence}，{t}，{t2}");
    }
    text
}

/// One plain descriptive caption of `scene` (generic domain).
pub(crate) fn plain<R: Rng>(rng: &mut R, scene: &Scene) -> String {
    let bg = BACKGROUNDS[scene.background].0;
    let describe = |rng: &mut R, item: &Item| {
        let cat = &CATEGORIES[item.cat];
        let colour = COLOURS[item.colour].0;
        let pattern = PATTERNS[item.pattern].0;
        match rng.gen_range(0..3) {
            0 => format!("一{}{colour}{pattern}的{}", cat.measure, cat.name),
            1 => format!("一{}{pattern}{colour}{}", cat.measure, cat.name),
            _ => format!("一{}{colour}的{}，带有{pattern}图案", cat.measure, cat.name),
        }
    };
    let first = describe(rng, &scene.items[0]);
    let things = match scene.items.get(1) {
        Some(second) => format!("{first}和{}", describe(rng, second)),
        None => first,
    };
    match rng.gen_range(0..4) {
        0 => format!("图中是{things}"),
        1 => format!("{bg}背景上放着{things}"),
        2 => format!("一张照片，{things}，背景是{bg}"),
        _ => format!("画面中有{things}"),
    }
}

/// `n` distinct captions from `gen` (fewer only if `gen` cannot vary enough).
pub(crate) fn distinct<R: Rng>(
    rng: &mut R,
    n: usize,
    mut gen: impl FnMut(&mut R) -> String,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(n);
    for _ in 0..n * 8 {
        if out.len() == n {
            break;
        }
        let c = gen(rng);
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out
}
