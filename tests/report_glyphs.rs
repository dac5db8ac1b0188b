//! Chinese text in plots renders as glyphs, not as empty boxes: the same
//! label is drawn with the bundled font and compared, pixel for pixel, with
//! the font's own missing-glyph box drawn the same number of times.

use ecic::report::font::Fonts;

/// Ink coverage of `text` at 24 px, and the set of covered pixels.
fn ink(fonts: &Fonts, text: &str) -> (f32, Vec<(i32, i32)>) {
    let mut total = 0.0;
    let mut px = Vec::new();
    fonts.draw(text, 24.0, |x, y, c| {
        total += c;
        if c > 0.5 {
            px.push((x, y));
        }
    });
    px.sort();
    (total, px)
}

#[test]
fn chinese_label_draws_distinct_glyphs_not_tofu() {
    let f = Fonts::bundled_only();
    let label = "白色连衣裙";
    assert!(label.chars().all(|c| f.covers(c)));
    let (ink_label, px_label) = ink(&f, label);
    // U+E000 (private use) is in no font: it draws as the missing-glyph box
    let tofu: String = std::iter::repeat('\u{E000}')
        .take(label.chars().count())
        .collect();
    assert!(!f.covers('\u{E000}'));
    let (ink_tofu, px_tofu) = ink(&f, &tofu);
    assert!(ink_label > 0.0, "the label drew nothing");
    assert_ne!(px_label, px_tofu, "the label drew as missing-glyph boxes");
    // each hanzi differs from the others (boxes would all be the same shape)
    let glyphs: Vec<Vec<(i32, i32)>> = label
        .chars()
        .map(|c| {
            let (_, mut p) = ink(&f, &c.to_string());
            p.sort();
            p
        })
        .collect();
    for i in 0..glyphs.len() {
        for j in i + 1..glyphs.len() {
            assert_ne!(glyphs[i], glyphs[j], "glyphs {i} and {j} are identical");
        }
    }
    // hanzi are dense: far more ink than a hollow box outline
    assert!(
        ink_label > 1.5 * ink_tofu,
        "label ink {ink_label} vs tofu ink {ink_tofu}"
    );
}

#[test]
fn chart_with_chinese_title_has_ink_in_the_title_band() {
    use ecic::report::plots::{write_chart, Compute};
    let dir = tempfile::tempdir().unwrap();
    let c = Compute {
        kinds: vec![("预处理".into(), 3.0, 1.0), ("评估".into(), 2.0, 0.0)],
    };
    let p = write_chart(&c, dir.path(), "compute", "t", (640, 360), false).unwrap();
    let img = image::open(dir.path().join(p.file)).unwrap().to_rgb8();
    // the caption sits in the top 30 rows: it must contain dark pixels
    let dark = (0..30)
        .flat_map(|y| (0..640).map(move |x| (x, y)))
        .filter(|&(x, y)| img.get_pixel(x, y).0[0] < 100)
        .count();
    assert!(dark > 200, "title band has {dark} dark pixels");
}
