//! The report's charts (plotters): per-axis marginals, backbone × PEFT
//! heatmaps, learning curves, Pareto scatters and compute. Each is drawn
//! once against a generic backend, saved as PNG (text through the bundled
//! CJK font) or SVG. Titles are bilingual: the audience reads MUGE's Chinese.
//! Zero-shot rows appear as the PEFT level `zero-shot` (a heatmap column).

use std::collections::BTreeMap;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::backend::CjkText;
use super::data::{GroupResult, SweepData, TRAINING_KINDS};
use super::font::Fonts;
use super::stats::Stat;
use super::ReportError;

/// A chart file written beside `index.html`.
#[derive(Debug, Clone)]
pub struct PlotFile {
    /// File name, relative to the report directory.
    pub file: String,
    pub title: String,
    pub width: u32,
    pub height: u32,
}

type DrawResult = Result<(), String>;

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

fn font(px: u32) -> TextStyle<'static> {
    ("sans-serif", px).into_font().color(&BLACK)
}

fn e<T: std::fmt::Display>(x: T) -> String {
    x.to_string()
}

/// Something that can paint itself on any backend.
pub trait Chart {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult;
}

/// Write `chart` to `dir/stem.png` (or `.svg` when `svg`).
pub fn write_chart<C: Chart>(
    chart: &C,
    dir: &Path,
    stem: &str,
    title: &str,
    (w, h): (u32, u32),
    svg: bool,
) -> Result<PlotFile, ReportError> {
    let ext = if svg { "svg" } else { "png" };
    let file = format!("{stem}.{ext}");
    let path = dir.join(&file);
    let fail = |message: String| ReportError::Plot {
        path: path.clone(),
        message,
    };
    let fonts = Fonts::shared();
    // Drawn into a hidden temporary, renamed into place once whole: a full
    // disk leaves no truncated chart behind (the backend picks the format
    // from the extension, so the temporary keeps it).
    let tmp = dir.join(format!(".{stem}.partial.{ext}"));
    let drawn = (|| {
        if svg {
            let root = CjkText::vector(SVGBackend::new(&tmp, (w, h)), fonts).into_drawing_area();
            root.fill(&WHITE).map_err(|x| fail(e(x)))?;
            chart.draw(&root).map_err(fail)?;
            root.present().map_err(|x| fail(e(x)))?;
        } else {
            let root = CjkText::new(BitMapBackend::new(&tmp, (w, h)), fonts).into_drawing_area();
            root.fill(&WHITE).map_err(|x| fail(e(x)))?;
            chart.draw(&root).map_err(fail)?;
            root.present().map_err(|x| fail(e(x)))?;
        }
        std::fs::rename(&tmp, &path).map_err(|x| fail(x.to_string()))
    })();
    if drawn.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    drawn?;
    Ok(PlotFile {
        file,
        title: title.to_string(),
        width: w,
        height: h,
    })
}

/// Bars with 95% error bars: one panel per axis.
pub struct Marginals {
    /// (axis title, [(level, stat of group means ×100)]).
    pub panels: Vec<(String, Vec<(String, Stat)>)>,
}

impl Marginals {
    /// Mean CIDEr-D of the configurations at each level of each named axis
    /// (baselines, whose PEFT and fusion are `-`, only count for backbone; zero-shot rows
    /// only for PEFT, as its `zero-shot` level, so that they do not pull the other axes'
    /// means of fine-tuned models).
    pub fn new(data: &SweepData) -> Option<Marginals> {
        let axes: [(&str, &str, fn(&GroupResult) -> &str); 3] = [
            ("backbone", "骨干网络", |g| {
                if g.zero_shot() {
                    "-"
                } else {
                    &g.backbone
                }
            }),
            ("PEFT", "参数高效微调", |g| {
                super::data::peft_label(&g.peft)
            }),
            ("fusion", "融合方式", |g| {
                if g.zero_shot() {
                    "-"
                } else {
                    &g.fusion
                }
            }),
        ];
        let mut panels = Vec::new();
        for (name, zh, get) in axes {
            let mut levels: Vec<(String, Vec<f64>)> = Vec::new();
            for g in &data.groups {
                let (level, Some(s)) = (get(g), g.metric("cider_d")) else {
                    continue;
                };
                if level == "-" {
                    continue;
                }
                match levels.iter_mut().find(|(l, _)| l == level) {
                    Some((_, v)) => v.push(s.mean * 100.0),
                    None => levels.push((level.to_string(), vec![s.mean * 100.0])),
                }
            }
            let bars: Vec<(String, Stat)> = levels
                .into_iter()
                .filter_map(|(l, v)| Stat::of(&v).map(|s| (l, s)))
                .collect();
            if !bars.is_empty() {
                panels.push((format!("{name} · {zh}"), bars));
            }
        }
        (!panels.is_empty()).then_some(Marginals { panels })
    }
}

impl Chart for Marginals {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        let root = root
            .titled("CIDEr-D ×100 各轴边际均值 (mean ± 95% CI)", font(20))
            .map_err(e)?;
        let areas = root.split_evenly((1, self.panels.len()));
        let ymax = self
            .panels
            .iter()
            .flat_map(|(_, b)| b.iter().map(|(_, s)| s.mean + s.half.unwrap_or(0.0)))
            .fold(0.0f64, f64::max)
            .max(1e-6)
            * 1.15;
        for (area, (title, bars)) in areas.iter().zip(&self.panels) {
            let names: Vec<&str> = bars.iter().map(|(l, _)| l.as_str()).collect();
            let mut chart = ChartBuilder::on(area)
                .caption(title, font(16))
                .margin(8)
                .x_label_area_size(30)
                .y_label_area_size(45)
                .build_cartesian_2d((0..bars.len() - 1).into_segmented(), 0.0..ymax)
                .map_err(e)?;
            chart
                .configure_mesh()
                .light_line_style(RGBColor(242, 242, 242))
                .disable_x_mesh()
                .x_label_style(font(13))
                .y_label_style(font(12))
                .x_label_formatter(&|v| match v {
                    SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                        names.get(*i).unwrap_or(&"").to_string()
                    }
                    SegmentValue::Last => String::new(),
                })
                .draw()
                .map_err(e)?;
            chart
                .draw_series(bars.iter().enumerate().map(|(i, (_, s))| {
                    let mut r = Rectangle::new(
                        [
                            (SegmentValue::Exact(i), 0.0),
                            (SegmentValue::Exact(i + 1), s.mean),
                        ],
                        color(i).mix(0.75).filled(),
                    );
                    r.set_margin(0, 0, 12, 12);
                    r
                }))
                .map_err(e)?;
            chart
                .draw_series(bars.iter().enumerate().filter_map(|(i, (_, s))| {
                    s.half.map(|h| {
                        ErrorBar::new_vertical(
                            SegmentValue::CenterOf(i),
                            s.mean - h,
                            s.mean,
                            s.mean + h,
                            BLACK.stroke_width(2),
                            12,
                        )
                    })
                }))
                .map_err(e)?;
        }
        Ok(())
    }
}

/// Backbone × PEFT grid of mean CIDEr-D ×100 for one fusion.
pub struct Heatmap {
    pub fusion: String,
    pub backbones: Vec<String>,
    pub pefts: Vec<String>,
    /// [backbone][peft]
    pub values: Vec<Vec<Option<f64>>>,
}

impl Heatmap {
    pub fn all(data: &SweepData) -> Vec<Heatmap> {
        let mut fusions: Vec<&str> = Vec::new();
        for g in &data.groups {
            if g.fusion != "-" && !fusions.contains(&g.fusion.as_str()) {
                fusions.push(&g.fusion);
            }
        }
        fusions
            .into_iter()
            .map(|fusion| {
                let groups: Vec<&GroupResult> =
                    data.groups.iter().filter(|g| g.fusion == fusion).collect();
                let mut backbones: Vec<String> = Vec::new();
                let mut pefts: Vec<String> = Vec::new();
                for g in &groups {
                    if !backbones.contains(&g.backbone) {
                        backbones.push(g.backbone.clone());
                    }
                    let p = super::data::peft_label(&g.peft).to_string();
                    if !pefts.contains(&p) {
                        pefts.push(p);
                    }
                }
                let values = backbones
                    .iter()
                    .map(|b| {
                        pefts
                            .iter()
                            .map(|p| {
                                // several configurations may share a (backbone, PEFT)
                                // pair (other axes): average them
                                let v: Vec<f64> = groups
                                    .iter()
                                    .filter(|g| {
                                        &g.backbone == b && super::data::peft_label(&g.peft) == p
                                    })
                                    .filter_map(|g| g.metric("cider_d").map(|s| s.mean * 100.0))
                                    .collect();
                                Stat::of(&v).map(|s| s.mean)
                            })
                            .collect()
                    })
                    .collect();
                Heatmap {
                    fusion: fusion.to_string(),
                    backbones,
                    pefts,
                    values,
                }
            })
            .collect()
    }
}

impl Chart for Heatmap {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        let vals: Vec<f64> = self.values.iter().flatten().flatten().copied().collect();
        let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let title = format!("CIDEr-D ×100 · fusion = {} · 骨干 × 微调", self.fusion);
        let mut chart = ChartBuilder::on(root)
            .caption(title, font(18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(80)
            .build_cartesian_2d(
                (0..self.pefts.len() - 1).into_segmented(),
                (0..self.backbones.len() - 1).into_segmented(),
            )
            .map_err(e)?;
        let (pefts, backbones) = (&self.pefts, &self.backbones);
        chart
            .configure_mesh()
            .light_line_style(RGBColor(242, 242, 242))
            .disable_mesh()
            .x_label_style(font(14))
            .y_label_style(font(14))
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => pefts.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => backbones.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .draw()
            .map_err(e)?;
        for (b, row) in self.values.iter().enumerate() {
            for (p, v) in row.iter().enumerate() {
                let (fill, label, dark) = match v {
                    Some(v) => {
                        let t = if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
                        let c = RGBColor(
                            (222.0 - 190.0 * t) as u8,
                            (235.0 - 155.0 * t) as u8,
                            (247.0 - 90.0 * t) as u8,
                        );
                        (c, format!("{v:.2}"), t > 0.55)
                    }
                    None => (RGBColor(240, 240, 240), "–".to_string(), false),
                };
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [
                            (SegmentValue::Exact(p), SegmentValue::Exact(b)),
                            (SegmentValue::Exact(p + 1), SegmentValue::Exact(b + 1)),
                        ],
                        fill.filled(),
                    )))
                    .map_err(e)?;
                let style = font(16)
                    .color(if dark { &WHITE } else { &BLACK })
                    .pos(Pos::new(HPos::Center, VPos::Center));
                chart
                    .draw_series(std::iter::once(Text::new(
                        label,
                        (SegmentValue::CenterOf(p), SegmentValue::CenterOf(b)),
                        style,
                    )))
                    .map_err(e)?;
            }
        }
        Ok(())
    }
}

/// Learning curves of one stage kind: a panel per curve name, a line per stage.
pub struct Curves {
    pub kind: String,
    /// (curve name, [(stage label, points)]).
    pub panels: Vec<(String, Vec<(String, Vec<(i64, f64)>)>)>,
}

impl Curves {
    pub fn all(data: &SweepData) -> Vec<Curves> {
        let mut out = Vec::new();
        for kind in TRAINING_KINDS {
            let mut by_name: BTreeMap<&str, Vec<(String, Vec<(i64, f64)>)>> = BTreeMap::new();
            for s in data.stages.iter().filter(|s| s.kind == kind) {
                let Some(curves) = data.curves.get(&s.key) else {
                    continue;
                };
                for name in ["loss", "reward", "val_loss"] {
                    if let Some(points) = curves.get(name).filter(|p| !p.is_empty()) {
                        by_name
                            .entry(name)
                            .or_default()
                            .push((s.label.clone(), points.clone()));
                    }
                }
            }
            let mut panels: Vec<_> = by_name
                .into_iter()
                .map(|(n, v)| (n.to_string(), v))
                .collect();
            panels.sort_by_key(|(n, _)| ["loss", "val_loss", "reward"].iter().position(|x| x == n));
            if !panels.is_empty() {
                out.push(Curves {
                    kind: kind.to_string(),
                    panels,
                });
            }
        }
        out
    }
}

impl Chart for Curves {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        let root = root
            .titled(
                &format!("{} · 学习曲线 (learning curves)", self.kind),
                font(20),
            )
            .map_err(e)?;
        let areas = root.split_evenly((1, self.panels.len()));
        for (area, (name, lines)) in areas.iter().zip(&self.panels) {
            let pts = lines.iter().flat_map(|(_, p)| p.iter());
            let (mut x0, mut x1, mut y0, mut y1) =
                (i64::MAX, i64::MIN, f64::INFINITY, f64::NEG_INFINITY);
            for &(x, y) in pts {
                x0 = x0.min(x);
                x1 = x1.max(x);
                y0 = y0.min(y);
                y1 = y1.max(y);
            }
            if x1 <= x0 {
                x1 = x0 + 1;
            }
            let pad = ((y1 - y0) * 0.05).max(1e-6);
            let mut chart = ChartBuilder::on(area)
                .caption(name, font(16))
                .margin(8)
                .x_label_area_size(30)
                .y_label_area_size(55)
                .build_cartesian_2d(x0 as f64..x1 as f64, (y0 - pad)..(y1 + pad))
                .map_err(e)?;
            chart
                .configure_mesh()
                .light_line_style(RGBColor(242, 242, 242))
                .x_desc("step · 步数")
                .x_label_style(font(12))
                .y_label_style(font(12))
                .draw()
                .map_err(e)?;
            // Too many stages for a legend: every line in grey, the best few (by their last
            // value: lowest loss, highest reward) in colour and named.
            let shown = highlighted(name, lines);
            for (i, (_, points)) in lines.iter().enumerate() {
                if !shown.contains(&i) {
                    chart
                        .draw_series(LineSeries::new(
                            points.iter().map(|&(x, y)| (x as f64, y)),
                            RGBColor(205, 205, 205).stroke_width(1),
                        ))
                        .map_err(e)?;
                }
            }
            for (rank, &i) in shown.iter().enumerate() {
                let (label, points) = &lines[i];
                let c = color(rank);
                chart
                    .draw_series(LineSeries::new(
                        points.iter().map(|&(x, y)| (x as f64, y)),
                        c.stroke_width(2),
                    ))
                    .map_err(e)?
                    .label(label.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .label_font(font(11))
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK.mix(0.3))
                .draw()
                .map_err(e)?;
        }
        Ok(())
    }
}

/// Most lines a learning-curve panel names; with more stages only the best this many are in
/// colour (the rest grey).
const CURVE_LEGEND_MAX: usize = 6;

/// Indices of the lines of a curve panel drawn in colour, best first: all of them when they fit
/// in a legend, else the [`CURVE_LEGEND_MAX`] best by their last value (lowest for a loss,
/// highest for a reward).
fn highlighted(curve: &str, lines: &[(String, Vec<(i64, f64)>)]) -> Vec<usize> {
    if lines.len() <= 12 {
        return (0..lines.len()).collect();
    }
    let higher_is_better = curve == "reward";
    let mut ranked: Vec<(usize, f64)> = lines
        .iter()
        .enumerate()
        .filter_map(|(i, (_, p))| p.last().map(|&(_, v)| (i, v)))
        .filter(|(_, v)| v.is_finite())
        .collect();
    ranked.sort_by(|a, b| {
        let o = a.1.total_cmp(&b.1);
        if higher_is_better {
            o.reverse()
        } else {
            o
        }
    });
    ranked
        .into_iter()
        .take(CURVE_LEGEND_MAX)
        .map(|(i, _)| i)
        .collect()
}

/// CIDEr-D against a cost, Pareto-optimal points joined.
pub struct Pareto {
    pub title: String,
    pub x_desc: String,
    pub log_x: bool,
    /// (label, cost, CIDEr-D ×100)
    pub points: Vec<(String, f64, f64)>,
}

impl Pareto {
    pub fn all(data: &SweepData) -> Vec<Pareto> {
        let mut params = Vec::new();
        let mut latency = Vec::new();
        for g in &data.groups {
            let Some(c) = g.metric("cider_d") else {
                continue;
            };
            if let Some(p) = g.trainable_params {
                params.push((g.name.clone(), p.max(1.0), c.mean * 100.0));
            }
            if let Some(cps) = g.captions_per_s.filter(|s| s.mean > 0.0) {
                latency.push((g.name.clone(), 1000.0 / cps.mean, c.mean * 100.0));
            }
        }
        let mut out = Vec::new();
        if !params.is_empty() {
            out.push(Pareto {
                title: "CIDEr-D vs 可训练参数 (trainable parameters)".into(),
                x_desc: "trainable parameters (log)".into(),
                log_x: true,
                points: params,
            });
        }
        if !latency.is_empty() {
            out.push(Pareto {
                title: "CIDEr-D vs 推理延迟 (inference latency)".into(),
                x_desc: "ms per caption".into(),
                log_x: false,
                points: latency,
            });
        }
        out
    }

    /// Points no other point beats on both axes (lower cost, higher score).
    pub fn front(&self) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.points.len()).collect();
        idx.sort_by(|&a, &b| {
            self.points[a]
                .1
                .total_cmp(&self.points[b].1)
                .then(self.points[b].2.total_cmp(&self.points[a].2))
        });
        let mut best = f64::NEG_INFINITY;
        idx.into_iter()
            .filter(|&i| {
                let keep = self.points[i].2 > best;
                if keep {
                    best = self.points[i].2;
                }
                keep
            })
            .collect()
    }
}

impl Chart for Pareto {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        let xs = self.points.iter().map(|p| p.1);
        let ys = self.points.iter().map(|p| p.2);
        let (x0, x1) = (
            xs.clone().fold(f64::INFINITY, f64::min),
            xs.fold(f64::NEG_INFINITY, f64::max),
        );
        let (y0, y1) = (
            ys.clone().fold(f64::INFINITY, f64::min),
            ys.fold(f64::NEG_INFINITY, f64::max),
        );
        let ypad = ((y1 - y0) * 0.1).max(0.5);
        let front = self.front();
        let builder = |b: &mut ChartBuilder<DB>| {
            b.caption(&self.title, font(18))
                .margin(10)
                .x_label_area_size(40)
                .y_label_area_size(55);
        };
        let mut cb = ChartBuilder::on(root);
        builder(&mut cb);
        let label = |(l, x, y): &(String, f64, f64)| (l.clone(), *x, *y);
        macro_rules! body {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .light_line_style(RGBColor(242, 242, 242))
                    .x_labels(6)
                    .x_label_formatter(&|v: &f64| {
                        if self.log_x {
                            super::terminal::count(*v)
                        } else {
                            format!("{v:.1}")
                        }
                    })
                    .x_desc(self.x_desc.as_str())
                    .y_desc("CIDEr-D ×100")
                    .x_label_style(font(12))
                    .y_label_style(font(12))
                    .draw()
                    .map_err(e)?;
                chart
                    .draw_series(LineSeries::new(
                        front.iter().map(|&i| (self.points[i].1, self.points[i].2)),
                        RED.stroke_width(2),
                    ))
                    .map_err(e)?;
                chart
                    .draw_series(self.points.iter().enumerate().map(|(i, p)| {
                        let (l, x, y) = label(p);
                        let on_front = front.contains(&i);
                        EmptyElement::at((x, y))
                            + Circle::new(
                                (0, 0),
                                5,
                                if on_front {
                                    RED.filled()
                                } else {
                                    color(0).mix(0.7).filled()
                                },
                            )
                            + Text::new(
                                if on_front || self.points.len() <= 12 {
                                    l
                                } else {
                                    String::new()
                                },
                                (7, -6),
                                font(11),
                            )
                    }))
                    .map_err(e)?;
            }};
        }
        if self.log_x {
            let (a, b) = (x0 / 2.0, (x1 * 2.0).max(x0 * 4.0));
            body!(cb
                .build_cartesian_2d((a..b).log_scale(), (y0 - ypad)..(y1 + ypad))
                .map_err(e)?);
        } else {
            let pad = ((x1 - x0) * 0.1).max(x1.abs() * 0.05).max(1e-3);
            body!(cb
                .build_cartesian_2d((x0 - pad).max(0.0)..(x1 + pad), (y0 - ypad)..(y1 + ypad))
                .map_err(e)?);
        }
        Ok(())
    }
}

/// Wall time per stage kind: run in this sweep vs found in the cache.
pub struct Compute {
    /// (kind, seconds run, seconds saved by reuse)
    pub kinds: Vec<(String, f64, f64)>,
}

impl Compute {
    pub fn new(data: &SweepData) -> Option<Compute> {
        let mut kinds: Vec<(String, f64, f64)> = Vec::new();
        for s in &data.stages {
            let w = s.wall_s.unwrap_or(0.0);
            let slot = match kinds.iter_mut().position(|(k, _, _)| *k == s.kind) {
                Some(i) => &mut kinds[i],
                None => {
                    kinds.push((s.kind.clone(), 0.0, 0.0));
                    kinds.last_mut().expect("just pushed")
                }
            };
            if s.reused {
                slot.2 += w;
            } else {
                slot.1 += w;
            }
        }
        (!kinds.is_empty()).then_some(Compute { kinds })
    }
}

impl Chart for Compute {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        let ymax = self
            .kinds
            .iter()
            .map(|k| k.1.max(k.2))
            .fold(0.0, f64::max)
            .max(1e-3)
            * 1.15;
        let names: Vec<&str> = self.kinds.iter().map(|k| k.0.as_str()).collect();
        let mut chart = ChartBuilder::on(root)
            .caption(
                "各阶段耗时 · wall seconds per stage kind (run / reused)",
                font(18),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(55)
            .build_cartesian_2d((0..self.kinds.len() - 1).into_segmented(), 0.0..ymax)
            .map_err(e)?;
        chart
            .configure_mesh()
            .light_line_style(RGBColor(242, 242, 242))
            .disable_x_mesh()
            .x_label_style(font(13))
            .y_label_style(font(12))
            .y_desc("seconds")
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => names.get(*i).unwrap_or(&"").to_string(),
                _ => String::new(),
            })
            .draw()
            .map_err(e)?;
        for (series, (label, c)) in [("run", color(0)), ("reused (cached)", color(2))]
            .into_iter()
            .enumerate()
        {
            chart
                .draw_series(self.kinds.iter().enumerate().map(|(i, k)| {
                    let v = if series == 0 { k.1 } else { k.2 };
                    let mut r = Rectangle::new(
                        [
                            (SegmentValue::Exact(i), 0.0),
                            (SegmentValue::Exact(i + 1), v),
                        ],
                        c.mix(0.8).filled(),
                    );
                    if series == 0 {
                        r.set_margin(0, 0, 10, 50);
                    } else {
                        r.set_margin(0, 0, 50, 10);
                    }
                    r
                }))
                .map_err(e)?
                .label(label)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
        }
        chart
            .configure_series_labels()
            .label_font(font(12))
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(e)?;
        Ok(())
    }
}

/// Write every chart the sweep has data for; returns them by section.
pub fn write_all(data: &SweepData, dir: &Path, svg: bool) -> Result<Plots, ReportError> {
    let mut p = Plots::default();
    if let Some(m) = Marginals::new(data) {
        let w = 360 * m.panels.len() as u32;
        p.marginals = Some(write_chart(
            &m,
            dir,
            "marginals",
            "per-axis marginals",
            (w.max(600), 380),
            svg,
        )?);
    }
    for (i, h) in Heatmap::all(data).iter().enumerate() {
        let size = (
            160 + 130 * h.pefts.len() as u32,
            110 + 70 * h.backbones.len() as u32,
        );
        p.heatmaps.push(write_chart(
            h,
            dir,
            &format!("heatmap-{i}"),
            &format!("fusion = {}", h.fusion),
            size,
            svg,
        )?);
    }
    for c in Curves::all(data) {
        let w = (420 * c.panels.len() as u32).max(600);
        p.curves.push(write_chart(
            &c,
            dir,
            &format!("curves-{}", c.kind),
            &c.kind,
            (w, 360),
            svg,
        )?);
    }
    for (i, s) in Pareto::all(data).iter().enumerate() {
        p.pareto.push(write_chart(
            s,
            dir,
            &format!("pareto-{i}"),
            &s.title,
            (620, 420),
            svg,
        )?);
    }
    if let Some(c) = Compute::new(data) {
        p.compute = Some(write_chart(&c, dir, "compute", "compute", (640, 360), svg)?);
    }
    Ok(p)
}

#[derive(Debug, Clone, Default)]
pub struct Plots {
    pub marginals: Option<PlotFile>,
    pub heatmaps: Vec<PlotFile>,
    pub curves: Vec<PlotFile>,
    pub pareto: Vec<PlotFile>,
    pub compute: Option<PlotFile>,
}

impl Plots {
    pub fn files(&self) -> Vec<&PlotFile> {
        self.marginals
            .iter()
            .chain(&self.heatmaps)
            .chain(&self.curves)
            .chain(&self.pareto)
            .chain(&self.compute)
            .collect()
    }
}

/// Paths of the chart files (for cleaning a previous report's leftovers).
pub fn is_chart_file(name: &str) -> bool {
    let stem_ok = [
        "marginals",
        "heatmap-",
        "curves-",
        "pareto-",
        "compute",
        "search",
    ]
    .iter()
    .any(|p| name.starts_with(p));
    stem_ok && (name.ends_with(".png") || name.ends_with(".svg"))
}

#[cfg(test)]
mod tests {
    use super::highlighted;

    #[test]
    fn curve_panels_with_many_stages_colour_the_best_by_last_value() {
        let lines: Vec<(String, Vec<(i64, f64)>)> = (0..20)
            .map(|i| {
                (
                    format!("s{i}"),
                    vec![(0, 5.0), (10, (i as f64 - 7.3).abs())],
                )
            })
            .collect();
        // Loss: lowest last value first (7 at 0.3, 8 at 0.7, 6 at 1.3, ...).
        assert_eq!(highlighted("loss", &lines), vec![7, 8, 6, 9, 5, 10]);
        // Reward: highest first (19 at 11.7, 18 at 10.7, ..., 0 at 7.3).
        assert_eq!(highlighted("reward", &lines), vec![19, 18, 17, 16, 15, 0]);
        // Few enough for a legend: all of them, in order.
        assert_eq!(highlighted("loss", &lines[..3]), vec![0, 1, 2]);
    }
}
