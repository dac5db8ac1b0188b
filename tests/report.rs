//! `ecic report` end to end on synthetic stores: contents, escaping, path
//! safety, a baseline-only sweep, CJK glyphs in plots, and (with
//! `ECIC_BROWSER=1`) a headless-chromium check of the page.

use std::path::Path;

use ecic::report::fixture::{build, Fixture};
use ecic::report::{data::SweepData, safe_name, terminal, write_report};
use ecic::store::Store;

fn png_ok(path: &Path) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        img.width() > 100 && img.height() > 100,
        "{}",
        path.display()
    );
}

#[test]
fn full_grid_report_has_every_section_and_escapes_user_text() {
    let tmp = tempfile::tempdir().unwrap();
    let f = Fixture {
        name: "grid<b>".into(),
        backbones: vec!["blip2".into(), "llava".into()],
        pefts: vec!["lora".into(), "adapter".into()],
        fusions: vec!["early".into()],
        seeds: 2,
        images: 30,
        planted_caption: Some("<script>alert(1)</script>".into()),
        ..Fixture::default()
    };
    let (runs, id) = build(tmp.path(), &f).unwrap();
    let store = Store::open(&runs).unwrap();
    let out = tmp.path().join("reports").join(safe_name(&f.name));
    let index = write_report(&store, id, &out, false).unwrap();
    let html = std::fs::read_to_string(&index).unwrap();
    for section in [
        "id=\"summary\"",
        "id=\"ablations\"",
        "id=\"curves\"",
        "id=\"pareto\"",
        "id=\"significance\"",
        "id=\"compute\"",
        "id=\"gallery\"",
        "id=\"provenance\"",
    ] {
        assert!(html.contains(section), "missing {section}");
    }
    assert!(!html.contains("<script>"), "unescaped script tag");
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(html.contains("grid&lt;b&gt;"));
    // every referenced image exists and decodes
    let mut n = 0;
    for part in html.split("<img src=\"").skip(1) {
        let file = &part[..part.find('"').unwrap()];
        png_ok(&out.join(file));
        n += 1;
    }
    // marginals, 1 heatmap, 3 curve kinds, 2 Pareto, compute, 6 thumbnails
    assert_eq!(n, 1 + 1 + 3 + 2 + 1 + 6, "{n} images");

    // the summary agrees with the store: mean ± t-CI of the two seeds' CIDEr-D
    let data = SweepData::load(&store, id).unwrap();
    assert_eq!(data.groups.len(), 4);
    let g = &data.groups[0];
    let v: Vec<f64> = g
        .cells
        .iter()
        .map(|&i| data.cells[i].metrics["cider_d"] * 100.0)
        .collect();
    let mean = (v[0] + v[1]) / 2.0;
    let half = 12.706 * ((v[0] - v[1]).abs() / 2.0_f64.sqrt()) / 2.0_f64.sqrt();
    assert!(
        html.contains(&format!("{mean:.2} ± {half:.2}")),
        "expected {mean:.2} ± {half:.2}"
    );
    // 2 cells of 4 stages shared per (backbone, fusion, seed) + preprocess
    assert!(
        html.contains("Naive (every cell runs its own chain): <b>40</b>"),
        "naive count"
    );
    let table = terminal::summary_table(&data);
    assert!(table.contains("blip2-lora-early") && table.contains(" ± "));
}

#[test]
fn baseline_only_sweep_reports_without_curves() {
    let tmp = tempfile::tempdir().unwrap();
    let f = Fixture {
        name: "baselines".into(),
        baseline_only: true,
        images: 12,
        ..Fixture::default()
    };
    let (runs, id) = build(tmp.path(), &f).unwrap();
    let store = Store::open(&runs).unwrap();
    let index = write_report(&store, id, &tmp.path().join("r"), false).unwrap();
    let html = std::fs::read_to_string(index).unwrap();
    assert!(html.contains("No training curves recorded"));
    assert!(
        html.contains("<td class=\"l\">nn</td>") || html.contains(">nn<"),
        "nn row"
    );
    assert!(html.contains("mfc"));
    assert!(!html.contains("heatmap-"), "no heatmap without PEFT/fusion");
    let status = terminal::status(&store).unwrap();
    assert!(status.contains("baselines") && status.contains("done"));
}

#[test]
fn names_cannot_escape_the_reports_dir() {
    for bad in [
        "../../x",
        "..",
        "/etc/passwd",
        "a/../../b",
        ".hidden",
        "",
        "名字 with space",
    ] {
        let s = safe_name(bad);
        assert!(
            !s.is_empty() && !s.contains('/') && !s.contains('\\') && !s.starts_with('.'),
            "{bad:?} -> {s:?}"
        );
        let p = ecic::report::default_dir(bad);
        assert_eq!(p.parent(), Some(Path::new("reports")), "{bad:?}");
    }
    assert_eq!(safe_name("../../x"), "_.._x");
}

#[test]
fn cli_report_writes_under_reports_for_a_traversal_name() {
    let tmp = tempfile::tempdir().unwrap();
    let f = Fixture {
        name: "../../x".into(),
        baseline_only: true,
        images: 8,
        ..Fixture::default()
    };
    let (runs, _) = build(tmp.path(), &f).unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    assert_cmd::Command::cargo_bin("ecic")
        .unwrap()
        .current_dir(&work)
        .args(["report", "../../x", "--runs"])
        .arg(&runs)
        .assert()
        .success();
    assert!(work.join("reports/_.._x/index.html").is_file());
    assert!(!tmp.path().join("x").exists());
    // unknown sweep: usage error, exit 2
    assert_cmd::Command::cargo_bin("ecic")
        .unwrap()
        .args(["report", "nope", "--runs"])
        .arg(&runs)
        .assert()
        .code(2);
}
