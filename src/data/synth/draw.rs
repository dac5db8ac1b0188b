//! Drawing a synthetic product photo (tiny-skia): each category is a
//! distinct silhouette in a unit box centred on the origin, filled through a
//! mask with its colour and pattern, outlined, placed with scale, rotation
//! and a soft shadow on a tinted gradient background.

use tiny_skia::{
    Color, FillRule, LinearGradient, Mask, Paint, Path, PathBuilder, Pixmap, PixmapPaint, Point,
    Rect, Shader, SpreadMode, Stroke, Transform,
};

use super::vocab::{BACKGROUNDS, COLOURS};

/// One product in a scene. Indices point into the tables of `vocab`.
#[derive(Debug, Clone)]
pub(crate) struct Item {
    pub cat: usize,
    pub colour: usize,
    pub pattern: usize,
    /// Centre in pixels.
    pub cx: f32,
    pub cy: f32,
    /// Side of the unit box in pixels.
    pub size: f32,
    pub angle: f32,
    /// Stripes run vertically in the item's own frame when true.
    pub stripes_vertical: bool,
    /// Seed for the print pattern's flower layout.
    pub print_seed: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct Scene {
    pub items: Vec<Item>,
    pub background: usize,
    /// Per-image tint of the background gradient, in [-1, 1].
    pub tint: f32,
}

/// A silhouette: filled regions, stroked regions (handles, loops) that also
/// belong to the item, and detail lines drawn in the outline colour.
struct Shape {
    fills: Vec<Path>,
    strokes: Vec<(Path, f32)>,
    details: Vec<(Path, f32)>,
}

fn poly(pts: &[(f32, f32)]) -> Option<Path> {
    let mut pb = PathBuilder::new();
    for (i, &(x, y)) in pts.iter().enumerate() {
        if i == 0 {
            pb.move_to(x, y);
        } else {
            pb.line_to(x, y);
        }
    }
    pb.close();
    pb.finish()
}

fn line(pts: &[(f32, f32)]) -> Option<Path> {
    let mut pb = PathBuilder::new();
    for (i, &(x, y)) in pts.iter().enumerate() {
        if i == 0 {
            pb.move_to(x, y);
        } else {
            pb.line_to(x, y);
        }
    }
    pb.finish()
}

fn oval(l: f32, t: f32, r: f32, b: f32) -> Option<Path> {
    Rect::from_ltrb(l, t, r, b).and_then(PathBuilder::from_oval)
}

fn rect(l: f32, t: f32, r: f32, b: f32) -> Option<Path> {
    Rect::from_ltrb(l, t, r, b).map(PathBuilder::from_rect)
}

fn built(f: impl FnOnce(&mut PathBuilder)) -> Option<Path> {
    let mut pb = PathBuilder::new();
    f(&mut pb);
    pb.finish()
}

/// The silhouette of category `cat` (order of `vocab::CATEGORIES`).
fn shape(cat: usize) -> Shape {
    type Parts = Vec<(Option<Path>, f32)>;
    let (fills, strokes, details): (Vec<Option<Path>>, Parts, Parts) = match cat {
        // T恤: short sleeves, round neck.
        0 => (
            vec![built(|pb| {
                pb.move_to(-0.12, -0.42);
                for (x, y) in [
                    (-0.3, -0.38),
                    (-0.5, -0.18),
                    (-0.38, -0.04),
                    (-0.27, -0.14),
                    (-0.27, 0.45),
                    (0.27, 0.45),
                    (0.27, -0.14),
                    (0.38, -0.04),
                    (0.5, -0.18),
                    (0.3, -0.38),
                    (0.12, -0.42),
                ] {
                    pb.line_to(x, y);
                }
                pb.quad_to(0.0, -0.28, -0.12, -0.42);
                pb.close();
            })],
            vec![],
            vec![],
        ),
        // 衬衫: long sleeves, collar, button placket.
        1 => (
            vec![poly(&[
                (-0.1, -0.45),
                (-0.3, -0.4),
                (-0.48, 0.3),
                (-0.37, 0.34),
                (-0.25, -0.08),
                (-0.25, 0.45),
                (0.25, 0.45),
                (0.25, -0.08),
                (0.37, 0.34),
                (0.48, 0.3),
                (0.3, -0.4),
                (0.1, -0.45),
                (0.0, -0.3),
            ])],
            vec![],
            vec![
                (line(&[(0.0, -0.3), (0.0, 0.45)]), 0.02),
                (
                    line(&[
                        (-0.1, -0.45),
                        (-0.05, -0.28),
                        (0.0, -0.3),
                        (0.05, -0.28),
                        (0.1, -0.45),
                    ]),
                    0.025,
                ),
            ],
        ),
        // 连衣裙: straps, fitted waist, flared skirt.
        2 => (
            vec![built(|pb| {
                pb.move_to(-0.15, -0.48);
                for (x, y) in [
                    (-0.1, -0.48),
                    (0.0, -0.36),
                    (0.1, -0.48),
                    (0.15, -0.48),
                    (0.17, -0.2),
                    (0.11, -0.06),
                    (0.42, 0.45),
                ] {
                    pb.line_to(x, y);
                }
                pb.quad_to(0.0, 0.52, -0.42, 0.45);
                pb.line_to(-0.11, -0.06);
                pb.line_to(-0.17, -0.2);
                pb.close();
            })],
            vec![],
            vec![(line(&[(-0.12, -0.06), (0.12, -0.06)]), 0.03)],
        ),
        // 裤子: two legs and a waistband.
        3 => (
            vec![poly(&[
                (-0.28, -0.45),
                (0.28, -0.45),
                (0.34, 0.47),
                (0.07, 0.47),
                (0.0, -0.1),
                (-0.07, 0.47),
                (-0.34, 0.47),
            ])],
            vec![],
            vec![(line(&[(-0.28, -0.37), (0.28, -0.37)]), 0.025)],
        ),
        // 运动鞋: low profile with a thick sole and laces.
        4 => (
            vec![built(|pb| {
                pb.move_to(-0.48, 0.2);
                pb.line_to(-0.47, -0.12);
                pb.line_to(-0.42, -0.22);
                pb.line_to(-0.22, -0.2);
                pb.line_to(0.02, -0.08);
                pb.quad_to(0.42, -0.04, 0.5, 0.12);
                pb.line_to(0.5, 0.2);
                pb.close();
            })],
            vec![],
            vec![
                (line(&[(-0.48, 0.1), (0.5, 0.1)]), 0.04),
                (
                    line(&[(-0.12, -0.15), (-0.05, -0.05), (0.02, -0.1), (0.08, 0.0)]),
                    0.02,
                ),
            ],
        ),
        // 高跟鞋: pointed toe, arch and a spike heel.
        5 => (
            vec![built(|pb| {
                pb.move_to(-0.45, -0.3);
                pb.line_to(-0.3, -0.3);
                pb.quad_to(-0.1, 0.0, 0.25, 0.08);
                pb.line_to(0.48, 0.15);
                pb.quad_to(0.52, 0.25, 0.4, 0.26);
                pb.line_to(0.05, 0.24);
                pb.quad_to(-0.2, 0.15, -0.33, 0.0);
                pb.line_to(-0.35, 0.45);
                pb.line_to(-0.42, 0.45);
                pb.line_to(-0.47, -0.05);
                pb.close();
            })],
            vec![],
            vec![],
        ),
        // 背包: rounded body, top loop, front pocket.
        6 => (
            vec![built(|pb| {
                pb.move_to(-0.35, 0.48);
                pb.line_to(-0.35, -0.1);
                pb.cubic_to(-0.35, -0.38, 0.35, -0.38, 0.35, -0.1);
                pb.line_to(0.35, 0.48);
                pb.close();
            })],
            vec![(
                built(|pb| {
                    pb.move_to(-0.12, -0.28);
                    pb.quad_to(0.0, -0.55, 0.12, -0.28);
                }),
                0.05,
            )],
            vec![(rect(-0.22, 0.12, 0.22, 0.4), 0.025)],
        ),
        // 手提包: trapezoid body, arched handle, clasp.
        7 => (
            vec![poly(&[
                (-0.32, -0.08),
                (0.32, -0.08),
                (0.46, 0.4),
                (-0.46, 0.4),
            ])],
            vec![(
                built(|pb| {
                    pb.move_to(-0.2, -0.08);
                    pb.cubic_to(-0.2, -0.5, 0.2, -0.5, 0.2, -0.08);
                }),
                0.06,
            )],
            vec![(rect(-0.05, 0.0, 0.05, 0.08), 0.02)],
        ),
        // 帽子: dome and a wide brim.
        8 => (
            vec![
                built(|pb| {
                    pb.move_to(-0.28, 0.12);
                    pb.cubic_to(-0.3, -0.38, 0.3, -0.38, 0.28, 0.12);
                    pb.close();
                }),
                oval(-0.5, 0.02, 0.5, 0.26),
            ],
            vec![],
            vec![(line(&[(-0.27, 0.02), (0.27, 0.02)]), 0.05)],
        ),
        // 水杯: mug body with a ring handle.
        9 => (
            vec![rect(-0.3, -0.38, 0.2, 0.42)],
            vec![(built(|pb| pb.push_circle(0.24, 0.02, 0.15)), 0.07)],
            vec![(line(&[(-0.3, -0.32), (0.2, -0.32)]), 0.02)],
        ),
        // 手表: strap, round face, crown, hands.
        10 => (
            vec![
                rect(-0.13, -0.5, 0.13, 0.5),
                built(|pb| pb.push_circle(0.0, 0.0, 0.27)),
                rect(0.26, -0.04, 0.33, 0.04),
            ],
            vec![],
            vec![
                (built(|pb| pb.push_circle(0.0, 0.0, 0.2)), 0.02),
                (line(&[(0.0, -0.15), (0.0, 0.0), (0.1, 0.05)]), 0.025),
            ],
        ),
        // 台灯: conical shade, thin stem, oval base.
        _ => (
            vec![
                poly(&[(-0.15, -0.45), (0.15, -0.45), (0.33, -0.1), (-0.33, -0.1)]),
                rect(-0.035, -0.12, 0.035, 0.4),
                oval(-0.26, 0.34, 0.26, 0.48),
            ],
            vec![],
            vec![],
        ),
    };
    // The paths are constants; a `None` would only drop one part of a shape.
    let keep = |v: Parts| {
        v.into_iter()
            .filter_map(|(p, w)| p.map(|p| (p, w)))
            .collect()
    };
    Shape {
        fills: fills.into_iter().flatten().collect(),
        strokes: keep(strokes),
        details: keep(details),
    }
}

fn rgb(c: [u8; 3], a: u8) -> Color {
    Color::from_rgba8(c[0], c[1], c[2], a)
}

/// The colour that pattern marks take on a base colour: light marks on dark
/// or saturated bases, dark marks on light ones.
fn mark_colour(base: [u8; 3]) -> [u8; 3] {
    let luma = 0.299 * f32::from(base[0]) + 0.587 * f32::from(base[1]) + 0.114 * f32::from(base[2]);
    if luma > 170.0 {
        [40, 40, 70]
    } else {
        [250, 250, 245]
    }
}

fn outline_colour(base: [u8; 3]) -> [u8; 3] {
    let luma = 0.299 * f32::from(base[0]) + 0.587 * f32::from(base[1]) + 0.114 * f32::from(base[2]);
    if luma < 60.0 {
        [90, 90, 90]
    } else {
        [base[0] / 2, base[1] / 2, base[2] / 2]
    }
}

/// Paints the pattern marks of `item` (in its own frame) onto `pm`.
fn paint_pattern(pm: &mut Pixmap, item: &Item, ts: Transform) {
    let base = COLOURS[item.colour].1;
    let mut paint = Paint {
        anti_alias: true,
        ..Paint::default()
    };
    paint.set_color(rgb(mark_colour(base), 255));
    match item.pattern {
        // 条纹
        1 => {
            for k in -5..=5 {
                let c = k as f32 * 0.16;
                let r = if item.stripes_vertical {
                    Rect::from_ltrb(c - 0.035, -0.7, c + 0.035, 0.7)
                } else {
                    Rect::from_ltrb(-0.7, c - 0.035, 0.7, c + 0.035)
                };
                if let Some(r) = r {
                    pm.fill_rect(r, &paint, ts, None);
                }
            }
        }
        // 格子: crossing translucent bands.
        2 => {
            paint.set_color(rgb(mark_colour(base), 150));
            for k in -4..=4 {
                let c = k as f32 * 0.2;
                for r in [
                    Rect::from_ltrb(c - 0.045, -0.7, c + 0.045, 0.7),
                    Rect::from_ltrb(-0.7, c - 0.045, 0.7, c + 0.045),
                ]
                .into_iter()
                .flatten()
                {
                    pm.fill_rect(r, &paint, ts, None);
                }
            }
        }
        // 波点
        3 => {
            let mut pb = PathBuilder::new();
            for j in -5..=5 {
                for i in -5..=5 {
                    let off = if j % 2 == 0 { 0.0 } else { 0.07 };
                    pb.push_circle(i as f32 * 0.14 + off, j as f32 * 0.14, 0.038);
                }
            }
            if let Some(p) = pb.finish() {
                pm.fill_path(&p, &paint, FillRule::Winding, ts, None);
            }
        }
        // 印花: small many-coloured flowers at seeded places.
        4 => {
            let mut s = item.print_seed | 1;
            let mut next = move || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 11) as f32 / (1u64 << 53) as f32
            };
            for _ in 0..14 {
                let (x, y) = (next() - 0.5, next() - 0.5);
                let r = 0.03 + 0.03 * next();
                let petal = COLOURS[(next() * COLOURS.len() as f32) as usize % COLOURS.len()].1;
                paint.set_color(rgb(petal, 255));
                let mut pb = PathBuilder::new();
                for k in 0..5 {
                    let a = k as f32 * std::f32::consts::TAU / 5.0;
                    pb.push_circle(x + r * a.cos(), y + r * a.sin(), r * 0.7);
                }
                if let Some(p) = pb.finish() {
                    pm.fill_path(&p, &paint, FillRule::Winding, ts, None);
                }
                paint.set_color(rgb([250, 220, 60], 255));
                if let Some(p) = PathBuilder::from_circle(x, y, r * 0.45) {
                    pm.fill_path(&p, &paint, FillRule::Winding, ts, None);
                }
            }
        }
        // 纯色: no marks.
        _ => {}
    }
}

fn item_transform(item: &Item) -> Transform {
    Transform::from_scale(item.size, item.size)
        .post_rotate(item.angle)
        .post_translate(item.cx, item.cy)
}

fn draw_item(canvas: &mut Pixmap, item: &Item) {
    let (w, h) = (canvas.width(), canvas.height());
    let ts = item_transform(item);
    let shape = shape(item.cat);
    let base = COLOURS[item.colour].1;

    let Some(mut mask) = Mask::new(w, h) else {
        return;
    };
    let mut region: Vec<Path> = shape.fills.clone();
    for (p, width) in &shape.strokes {
        let st = Stroke {
            width: *width,
            ..Stroke::default()
        };
        if let Some(sp) = p.stroke(&st, item.size) {
            region.push(sp);
        }
    }
    for p in &region {
        mask.fill_path(p, FillRule::Winding, true, ts);
    }

    // Soft shadow: the silhouette, offset down-right, translucent black.
    let mut shadow = Paint {
        anti_alias: true,
        ..Paint::default()
    };
    shadow.set_color(Color::from_rgba8(0, 0, 0, 45));
    let off = ts.post_translate(item.size * 0.04, item.size * 0.05);
    for p in &region {
        canvas.fill_path(p, &shadow, FillRule::Winding, off, None);
    }

    let Some(mut pattern) = Pixmap::new(w, h) else {
        return;
    };
    pattern.fill(rgb(base, 255));
    paint_pattern(&mut pattern, item, ts);
    canvas.draw_pixmap(
        0,
        0,
        pattern.as_ref(),
        &PixmapPaint::default(),
        Transform::identity(),
        Some(&mask),
    );

    let mut ink = Paint {
        anti_alias: true,
        ..Paint::default()
    };
    ink.set_color(rgb(outline_colour(base), 255));
    let edge = Stroke {
        width: 1.6 / item.size,
        ..Stroke::default()
    };
    for p in &shape.fills {
        canvas.stroke_path(p, &ink, &edge, ts, None);
    }
    for (p, width) in &shape.details {
        let st = Stroke {
            width: *width,
            ..Stroke::default()
        };
        canvas.stroke_path(p, &ink, &st, ts, None);
    }
}

/// Renders `scene` at `size`×`size` and returns packed RGB bytes.
pub(crate) fn render(scene: &Scene, size: u32) -> Vec<u8> {
    let Some(mut canvas) = Pixmap::new(size, size) else {
        return vec![0; (size * size * 3) as usize];
    };
    let bg = BACKGROUNDS[scene.background].1;
    let shade = |c: u8, d: f32| (f32::from(c) + d).clamp(0.0, 255.0) as u8;
    let top = [
        shade(bg[0], 12.0 * scene.tint),
        shade(bg[1], 8.0),
        shade(bg[2], -10.0 * scene.tint),
    ];
    let bottom = [
        shade(bg[0], -18.0),
        shade(bg[1], -18.0),
        shade(bg[2], -14.0),
    ];
    let grad = LinearGradient::new(
        Point::from_xy(0.0, 0.0),
        Point::from_xy(0.0, size as f32),
        vec![
            tiny_skia::GradientStop::new(0.0, rgb(top, 255)),
            tiny_skia::GradientStop::new(1.0, rgb(bottom, 255)),
        ],
        SpreadMode::Pad,
        Transform::identity(),
    );
    let mut paint = Paint::default();
    match grad {
        Some(g) => paint.shader = g,
        None => paint.shader = Shader::SolidColor(rgb(bg, 255)),
    }
    if let Some(r) = Rect::from_xywh(0.0, 0.0, size as f32, size as f32) {
        canvas.fill_rect(r, &paint, Transform::identity(), None);
    }
    for item in &scene.items {
        draw_item(&mut canvas, item);
    }
    // Opaque canvas: premultiplied RGBA equals straight RGBA.
    canvas
        .data()
        .chunks_exact(4)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect()
}
