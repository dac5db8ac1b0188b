//! The report as a person sees it: headless chromium opens a report built
//! from a synthetic store, a screenshot is kept at
//! `target/report-screenshot.png`, and a check script (injected into a copy
//! of the page, never into the report itself) records every image's natural
//! size and every error event or console error into the DOM, which
//! `--dump-dom` prints.
//!
//! `ECIC_BROWSER=1` means chromium must be there (CI); unset, the test prints
//! "not run" and passes.

use std::path::{Path, PathBuf};
use std::process::Command;

use ecic::report::fixture::{build, Fixture};
use ecic::report::write_report;
use ecic::store::Store;

const CHECK: &str = r#"<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  var t = e.target && e.target.tagName ? e.target.tagName + ' ' + (e.target.src || '') : (e.message || 'error');
  window.__errors.push(t);
}, true);
var __ce = console.error;
console.error = function () { window.__errors.push('console.error: ' + Array.prototype.join.call(arguments, ' ')); __ce.apply(console, arguments); };
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; }).map(function (i) { return i.getAttribute('src'); });
  var out = document.createElement('pre');
  out.id = 'ecic-check';
  out.textContent = 'ECIC-CHECK images=' + imgs.length + ' broken=' + JSON.stringify(bad) + ' errors=' + JSON.stringify(window.__errors) + ' width=' + document.documentElement.scrollWidth + ' view=' + window.innerWidth + ' END';
  document.body.appendChild(out);
});
</script>"#;

fn chromium() -> Option<PathBuf> {
    for name in ["chromium", "chromium-browser", "google-chrome", "chrome"] {
        for dir in std::env::var("PATH").unwrap_or_default().split(':') {
            let p = Path::new(dir).join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

fn run(browser: &Path, profile: &Path, extra: &[String], page: &Path) -> std::process::Output {
    let url = format!("file://{}", page.display());
    Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
        ])
        .args([
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("chromium runs")
}

#[test]
fn report_renders_in_headless_chromium() {
    let required = std::env::var("ECIC_BROWSER").is_ok_and(|v| v == "1");
    let Some(browser) = chromium() else {
        assert!(!required, "ECIC_BROWSER=1 but no chromium on PATH");
        println!(
            "report_renders_in_headless_chromium: not run (no chromium; set ECIC_BROWSER=1 in CI)"
        );
        return;
    };
    if !required {
        println!("report_renders_in_headless_chromium: not run (ECIC_BROWSER unset)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let f = Fixture {
        name: "browser".into(),
        backbones: vec!["blip2".into(), "llava".into()],
        pefts: vec!["lora".into(), "qlora".into()],
        fusions: vec!["early".into(), "late".into()],
        seeds: 2,
        images: 30,
        planted_caption: Some("<script>console.error('xss')</script>".into()),
        ..Fixture::default()
    };
    let (runs, id) = build(tmp.path(), &f).unwrap();
    let store = Store::open(&runs).unwrap();
    let dir = tmp.path().join("report");
    let index = write_report(&store, id, &dir, false).unwrap();
    let html = std::fs::read_to_string(&index).unwrap();
    let check_page = dir.join("check.html");
    std::fs::write(
        &check_page,
        html.replacen("<head>", &format!("<head>{CHECK}"), 1),
    )
    .unwrap();

    let out = run(
        &browser,
        &tmp.path().join("profile-dom"),
        // A laptop-sized window: nothing (the samples' candidate column included) may
        // overflow it sideways.
        &["--dump-dom".into(), "--window-size=1400,3000".into()],
        &check_page,
    );
    let dom = String::from_utf8_lossy(&out.stdout);
    let line = dom
        .rsplit("ECIC-CHECK ")
        .next()
        .filter(|s| s.starts_with("images="))
        .and_then(|s| s.split(" END").next())
        .unwrap_or_else(|| {
            panic!(
                "no check output; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    println!("browser check: {line}");
    let n: usize = line
        .strip_prefix("images=")
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(n >= 10, "only {n} images on the page");
    assert!(line.contains("broken=[]"), "images failed to load: {line}");
    assert!(line.contains("errors=[]"), "errors on the page: {line}");
    let field = |name: &str| -> usize {
        line.split(&format!(" {name}="))
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    };
    assert!(
        field("width") <= field("view"),
        "the page is wider than a 1400-px window: {line}"
    );

    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/report-screenshot.png");
    let _ = std::fs::remove_file(&shot);
    // target/ may not exist when CARGO_TARGET_DIR points elsewhere.
    if let Some(dir) = shot.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    let out = run(
        &browser,
        &tmp.path().join("profile-shot"),
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,5200".into(),
        ],
        &index,
    );
    assert!(
        shot.is_file(),
        "no screenshot; stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = image::open(&shot).unwrap().to_rgb8();
    // a rendered page, not a blank one: many distinct non-white pixels
    let ink = img
        .pixels()
        .filter(|p| p.0.iter().any(|&c| c < 200))
        .count();
    assert!(ink > 50_000, "screenshot looks blank ({ink} dark pixels)");
}
