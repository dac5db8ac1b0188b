//! The HTML page: one self-contained file (inline CSS, no script) whose
//! images are the PNG/SVG charts and thumbnails beside it. Every string that
//! comes from a user (names, captions, spec text, errors) goes through
//! [`esc`].

use std::fmt::Write;

use super::data::{SweepData, HEADLINE};
use super::gallery::Gallery;
use super::plots::{PlotFile, Plots};
use super::significance::SigRow;
use super::terminal::{count, duration, stars, time_of_day, SCALE};

/// HTML-escape text for element content and double- or single-quoted attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const CSS: &str = r#"
body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans CJK SC","WenQuanYi Micro Hei","Microsoft YaHei",sans-serif;margin:0 auto;max-width:1200px;padding:1rem 2rem;color:#222;line-height:1.45}
h1{margin-bottom:.2rem}h2{border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
.sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem}
th,td{border:1px solid #ddd;padding:.25rem .55rem;text-align:right;vertical-align:top}
th{background:#f4f6f8}td{white-space:nowrap}td.l,th.l{text-align:left}
tr.best td{background:#fff7d6;font-weight:600}
.sig{color:#b00020;font-weight:600}.muted{color:#888}
figure{display:inline-block;margin:.4rem .8rem .8rem 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85rem;color:#555}
.gallery{table-layout:fixed;width:100%}.gallery td{text-align:left;white-space:normal;overflow-wrap:anywhere}
.gallery>tbody>tr>td:first-child{width:170px}.gallery>tbody>tr>td:nth-child(2){width:32%}
.gallery td table{width:100%}.gallery img{width:160px;height:auto}
.findings li{margin:.2rem 0}
pre{background:#f6f8fa;padding:.8rem;overflow:auto;font-size:.85rem;border:1px solid #eee}
dl{display:grid;grid-template-columns:max-content auto;gap:.2rem 1rem}dt{font-weight:600}dd{margin:0}
"#;

/// What the captions say, shown beside the scores where measured: the share of captions
/// naming the image's true category / colour / pattern (synthetic data only), distinct
/// captions, and the share of the most frequent one.
const CAPTION_CHECKS: [(&str, &str); 5] = [
    ("grounding_category", "category named"),
    ("grounding_colour", "colour named"),
    ("grounding_pattern", "pattern named"),
    ("distinct_ratio", "distinct captions"),
    ("top_caption_share", "top caption"),
];

/// What the page shows besides the sweep model.
pub struct Page<'a> {
    pub data: &'a SweepData,
    pub plots: &'a Plots,
    pub significance: Option<&'a (String, Vec<SigRow>)>,
    /// The answer in sentences ([`super::findings`]).
    pub findings: &'a [String],
    pub gallery: &'a Gallery,
    /// A search under successive halving.
    pub search: Option<&'a super::search::SearchSection>,
    pub generated_at: f64,
    pub font_note: String,
}

fn dash() -> String {
    "–".to_string()
}

fn figure(out: &mut String, p: &PlotFile) {
    let _ = write!(
        out,
        "<figure><img src=\"{}\" width=\"{}\" height=\"{}\" alt=\"{}\"><figcaption>{}</figcaption></figure>\n",
        esc(&p.file),
        p.width,
        p.height,
        esc(&p.title),
        esc(&p.title)
    );
}

pub fn render(page: &Page) -> String {
    let d = page.data;
    let m = &d.meta;
    let mut o = String::with_capacity(64 * 1024);
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>ecic report · {}</title><style>{CSS}</style></head><body>\n",
        esc(&m.name)
    );
    let split = if d.split.is_empty() {
        "no evaluation recorded".to_string()
    } else {
        format!("{} split", d.split)
    };
    let _ = write!(
        o,
        "<h1>{}</h1><p class=\"sub\">sweep {} · {} cells · {} · metrics ×100 (MUGE leaderboard scale)</p>\n",
        esc(&m.name),
        esc(&m.status),
        d.cells.len(),
        esc(&split)
    );

    // summary
    let seeds = d.groups.iter().any(|g| g.cells.len() > 1);
    o.push_str("<h2 id=\"summary\">Summary</h2>\n");
    if !page.findings.is_empty() {
        o.push_str("<ul class=\"findings\">");
        for f in page.findings {
            let _ = write!(o, "<li>{}</li>", esc(f));
        }
        o.push_str("</ul>\n");
    }
    if seeds {
        o.push_str("<p>Cells that differ only by seed are one row: mean ± 95% CI (Student t) over seeds.</p>\n");
    }
    o.push_str("<table><tr><th class=\"l\">configuration</th><th>seeds</th>");
    for (_, l) in HEADLINE {
        let _ = write!(o, "<th>{l}</th>");
    }
    let checks: Vec<(&str, &str)> = CAPTION_CHECKS
        .iter()
        .copied()
        .filter(|(k, _)| d.groups.iter().any(|g| g.metric(k).is_some()))
        .collect();
    for (_, l) in &checks {
        let _ = write!(o, "<th>{l}</th>");
    }
    o.push_str("<th>trainable params</th><th>training time</th><th>captions/s</th><th>stages run / reused</th><th class=\"l\">status</th></tr>\n");
    let best = d.best_group();
    for (i, g) in d.groups.iter().enumerate() {
        let _ = write!(
            o,
            "<tr{}><td class=\"l\">{}{}</td><td>{}</td>",
            if Some(i) == best {
                " class=\"best\""
            } else {
                ""
            },
            esc(&g.label()),
            if g.overrides.is_empty() {
                String::new()
            } else {
                format!(" <span class=\"muted\">{}</span>", esc(&g.overrides))
            },
            g.cells.len()
        );
        for (k, _) in HEADLINE {
            let _ = write!(
                o,
                "<td>{}</td>",
                g.metric(k).map(|s| s.show(SCALE, 2)).unwrap_or_else(dash)
            );
        }
        for (k, _) in &checks {
            let _ = write!(
                o,
                "<td>{}</td>",
                g.metric(k)
                    .map(|s| format!("{:.0}%", 100.0 * s.mean))
                    .unwrap_or_else(dash)
            );
        }
        let status = match g.collapsed() {
            Some(s) => format!(
                "{} · collapsed: one caption for {:.0}% of images, not ranked",
                g.status,
                100.0 * s
            ),
            None => g.status.clone(),
        };
        let _ = write!(
            o,
            "<td>{}</td><td>{}</td><td>{}</td><td>{} / {}</td><td class=\"l{}\">{}</td></tr>\n",
            g.trainable_params.map(count).unwrap_or_else(dash),
            g.train_s.map(|s| duration(s.mean)).unwrap_or_else(dash),
            g.captions_per_s
                .map(|s| s.show(1.0, 1))
                .unwrap_or_else(dash),
            g.stages_run,
            g.stages_reused,
            if g.collapsed().is_some() { " sig" } else { "" },
            esc(&status)
        );
    }
    o.push_str("</table>\n");

    // ablations
    o.push_str("<h2 id=\"ablations\">Ablations</h2>\n");
    match &page.plots.marginals {
        Some(p) => figure(&mut o, p),
        None => o.push_str("<p class=\"muted\">No evaluated cells yet.</p>\n"),
    }
    for p in &page.plots.heatmaps {
        figure(&mut o, p);
    }

    o.push_str("<h2 id=\"curves\">Learning curves</h2>\n");
    if page.plots.curves.is_empty() {
        o.push_str("<p class=\"muted\">No training curves recorded (baseline-only sweep, or no training stage finished).</p>\n");
    }
    for p in &page.plots.curves {
        figure(&mut o, p);
    }

    o.push_str("<h2 id=\"pareto\">Cost and quality</h2>\n");
    if page.plots.pareto.is_empty() {
        o.push_str("<p class=\"muted\">No cost figures recorded.</p>\n");
    }
    for p in &page.plots.pareto {
        figure(&mut o, p);
    }
    o.push_str("<p>Red points are Pareto-optimal: no other configuration is both cheaper and better.</p>\n");

    if let Some(s) = page.search {
        s.html(&mut o);
    }
    significance(&mut o, page.significance, d);
    scst(&mut o, d);
    compute(&mut o, page);
    gallery(&mut o, page.gallery);
    provenance(&mut o, page);
    o.push_str("</body></html>\n");
    o
}

fn significance(o: &mut String, sig: Option<&(String, Vec<SigRow>)>, d: &SweepData) {
    o.push_str("<h2 id=\"significance\">Significance against the best cell</h2>\n");
    let Some((best, rows)) = sig else {
        o.push_str("<p class=\"muted\">No per-image scores recorded: no paired test.</p>\n");
        return;
    };
    let _ = write!(
        o,
        "<p>Paired bootstrap over the {} images ({} resamples, seed {}): Δ = best − cell (×100); p tests \
         “the best is no better than this cell”. Best: <b>{}</b>. <span class=\"sig\">*</span> p&lt;0.05, \
         ** p&lt;0.01, *** p&lt;0.001.</p>\n",
        esc(&d.split),
        super::significance::RESAMPLES,
        super::significance::SEED,
        esc(best)
    );
    o.push_str("<table><tr><th class=\"l\">cell</th>");
    for (_, l) in HEADLINE {
        let _ = write!(o, "<th>Δ {l}</th><th>p</th>");
    }
    o.push_str("</tr>\n");
    for r in rows {
        let _ = write!(o, "<tr><td class=\"l\">{}</td>", esc(&r.cell));
        if let Some(note) = &r.note {
            let _ = write!(
                o,
                "<td class=\"l muted\" colspan=\"{}\">{}</td></tr>\n",
                2 * HEADLINE.len(),
                esc(note)
            );
            continue;
        }
        for (k, _) in HEADLINE {
            match r.tests.iter().find(|t| t.metric.key() == k) {
                Some(t) => {
                    let mark = stars(t.p_value);
                    let _ = write!(
                        o,
                        "<td>{:+.2}</td><td{}>{:.3}{}</td>",
                        t.delta * SCALE,
                        if mark.is_empty() {
                            ""
                        } else {
                            " class=\"sig\""
                        },
                        t.p_value,
                        mark
                    );
                }
                None => o.push_str("<td>–</td><td>–</td>"),
            }
        }
        o.push_str("</tr>\n");
    }
    o.push_str("</table>\n");
}

/// What SCST did to each cell: valid CIDEr-D of its domain-adapt input and of its output.
fn scst(o: &mut String, d: &SweepData) {
    let rows: Vec<_> = d
        .cells
        .iter()
        .filter_map(|c| {
            Some((
                c,
                *c.scst.get("cider_d_before")?,
                *c.scst.get("cider_d_after")?,
            ))
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    o.push_str("<h2 id=\"scst\">What SCST did</h2>\n<p>Valid CIDEr-D (greedy) of each cell's domain-adapt output and of its cider-optimize output; p is the paired bootstrap's (1,000 resamples over the valid images) for “SCST did not raise CIDEr-D”.</p>\n");
    o.push_str("<table><tr><th class=\"l\">cell</th><th>before</th><th>after</th><th>Δ</th><th>p</th></tr>\n");
    for (c, b, a) in rows {
        let p = c.scst.get("cider_d_gain_p").copied();
        let mark = p.map(stars).unwrap_or_default();
        let _ = write!(
            o,
            "<tr><td class=\"l\">{}</td><td>{:.2}</td><td>{:.2}</td><td>{:+.2}</td><td{}>{}{}</td></tr>\n",
            esc(&c.name),
            b * SCALE,
            a * SCALE,
            (a - b) * SCALE,
            if mark.is_empty() { "" } else { " class=\"sig\"" },
            p.map(|p| format!("{p:.3}")).unwrap_or_else(dash),
            mark
        );
    }
    o.push_str("</table>\n");
}

fn compute(o: &mut String, page: &Page) {
    let d = page.data;
    o.push_str("<h2 id=\"compute\">Compute</h2>\n");
    let naive: usize = d.cells.iter().map(|c| c.stages.len()).sum();
    let actual = d.stages.len();
    let reused = d.stages.iter().filter(|s| s.reused).count();
    let run_s: f64 = d
        .stages
        .iter()
        .filter(|s| !s.reused)
        .filter_map(|s| s.wall_s)
        .sum();
    let saved_s: f64 = d
        .stages
        .iter()
        .filter(|s| s.reused)
        .filter_map(|s| s.wall_s)
        .sum();
    let _ = write!(
        o,
        "<p>Naive (every cell runs its own chain): <b>{naive}</b> stages. Actual, shared across cells: \
         <b>{actual}</b> stages, of which <b>{}</b> ran in this sweep ({}) and <b>{reused}</b> were cache hits \
         (their recorded time: {}).</p>\n",
        actual - reused,
        duration(run_s),
        duration(saved_s)
    );
    o.push_str("<table><tr><th class=\"l\">stage kind</th><th>stages</th><th>run</th><th>cache hits</th><th>wall (run)</th><th>wall (reused)</th></tr>\n");
    let mut kinds: Vec<&str> = Vec::new();
    for s in &d.stages {
        if !kinds.contains(&s.kind.as_str()) {
            kinds.push(&s.kind);
        }
    }
    for k in kinds {
        let of: Vec<_> = d.stages.iter().filter(|s| s.kind == k).collect();
        let hits = of.iter().filter(|s| s.reused).count();
        let w = |r: bool| {
            of.iter()
                .filter(|s| s.reused == r)
                .filter_map(|s| s.wall_s)
                .sum::<f64>()
        };
        let _ = write!(
            o,
            "<tr><td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            esc(k),
            of.len(),
            of.len() - hits,
            hits,
            duration(w(false)),
            duration(w(true))
        );
    }
    o.push_str("</table>\n");
    if let Some(p) = &page.plots.compute {
        figure(o, p);
    }
    let failed: Vec<_> = d.stages.iter().filter(|s| s.status == "failed").collect();
    if !failed.is_empty() {
        o.push_str("<h3>Failed stages</h3><table><tr><th class=\"l\">stage</th><th class=\"l\">error</th></tr>\n");
        for s in failed {
            let _ = write!(
                o,
                "<tr><td class=\"l\">{}</td><td class=\"l\"><pre>{}</pre></td></tr>\n",
                esc(&s.label),
                esc(s.error.as_deref().unwrap_or(""))
            );
        }
        o.push_str("</table>\n");
    }
}

fn gallery(o: &mut String, g: &Gallery) {
    o.push_str("<h2 id=\"gallery\">Samples</h2>\n");
    if g.samples.is_empty() {
        o.push_str("<p class=\"muted\">No captions recorded.</p>\n");
        return;
    }
    if let Some(n) = &g.note {
        let _ = write!(o, "<p class=\"muted\">{}</p>\n", esc(n));
    }
    o.push_str("<table class=\"gallery\">\n");
    for s in &g.samples {
        let img = match &s.thumb {
            Some(f) => format!(
                "<img src=\"{}\" alt=\"image {}\">",
                esc(f),
                esc(&s.image_id)
            ),
            None => "<span class=\"muted\">(image unavailable)</span>".to_string(),
        };
        let refs: String = s
            .references
            .iter()
            .map(|r| format!("<li>{}</li>", esc(r)))
            .collect();
        let caps: String = s
            .captions
            .iter()
            .map(|(g, c)| {
                format!(
                    "<tr><td class=\"l muted\">{}</td><td class=\"l\">{}</td></tr>",
                    esc(g),
                    esc(c)
                )
            })
            .collect();
        let _ = write!(
            o,
            "<tr><td>{img}<br><small>{}</small></td><td><b>references</b><ul>{refs}</ul></td>\
             <td><table>{caps}</table></td></tr>\n",
            esc(&s.image_id)
        );
    }
    o.push_str("</table>\n");
}

fn provenance(o: &mut String, page: &Page) {
    let m = &page.data.meta;
    o.push_str("<h2 id=\"provenance\">Provenance</h2>\n<dl>\n");
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let rows: Vec<(&str, String)> = vec![
        ("spec", m.spec_path.clone()),
        ("--set", m.sets.clone()),
        ("grid axes", m.axes.clone()),
        ("ecic version (sweep)", m.ecic_version.clone()),
        (
            "ecic version (report)",
            env!("CARGO_PKG_VERSION").to_string(),
        ),
        (
            "git commit",
            m.git_commit.clone().unwrap_or_else(|| "unknown".into()),
        ),
        (
            "sweep host",
            m.host.clone().unwrap_or_else(|| "unknown".into()),
        ),
        ("executor", format!("{} ({} jobs)", m.executor, m.jobs)),
        ("data", format!("{} (digest {})", m.data_dir, m.data_digest)),
        (
            "started / finished",
            format!(
                "{} / {}",
                time_of_day(m.started_at),
                m.finished_at.map(time_of_day).unwrap_or_else(dash)
            ),
        ),
        (
            "report machine",
            format!(
                "{} {} · {} CPUs · generated {}",
                std::env::consts::OS,
                std::env::consts::ARCH,
                cpus,
                time_of_day(page.generated_at)
            ),
        ),
        ("plot font", page.font_note.clone()),
    ];
    for (k, v) in rows {
        let _ = write!(o, "<dt>{}</dt><dd>{}</dd>\n", esc(k), esc(&v));
    }
    let _ = write!(
        o,
        "</dl>\n<h3>Spec</h3>\n<pre>{}</pre>\n",
        esc(&m.spec_text)
    );
}

#[cfg(test)]
mod tests {
    use super::esc;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc("<script>alert(1)</script>"),
            "&lt;script&gt;alert(1)&lt;/script&gt;"
        );
        assert_eq!(esc(r#"a"b'c&d"#), "a&quot;b&#39;c&amp;d");
        assert_eq!(esc("白色连衣裙"), "白色连衣裙");
    }
}
