//! Reports: the last step of the pipeline, reading only the store (and the
//! data set for gallery thumbnails). [`data`] builds one model of a sweep
//! from SQLite; [`terminal`] prints it as comfy-tables (`ecic sweep`,
//! `ecic status`, `ecic compare`); the HTML report (`ecic report`) adds
//! plotters charts whose text, Chinese included, is drawn with a bundled
//! CJK font, and a section for a search under successive halving
//! ([`search`]).

mod backend;
pub mod cmd;
pub mod data;
pub mod findings;
#[doc(hidden)]
pub mod fixture;
pub mod font;
pub mod gallery;
pub mod html;
pub mod plots;
pub mod search;
pub mod significance;
pub mod stats;
pub mod terminal;

use std::path::PathBuf;

/// Errors of building a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("plot {path}: {message}")]
    Plot { path: PathBuf, message: String },
    #[error("font {name}: {message}")]
    Font { name: String, message: String },
    #[error("cell `{cell}` is not in sweep `{sweep}`{hint}")]
    NoCell {
        cell: String,
        sweep: String,
        hint: String,
    },
    #[error("cell `{cell}` has no per-image scores on the {split} split (its evaluate stage did not record them)")]
    NoScores { cell: String, split: String },
    #[error("cell `{cell}`: bad per-image score record for image {image}: {message}")]
    BadScores {
        cell: String,
        image: String,
        message: String,
    },
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
}

/// Attach a path to an I/O error.
pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ReportError {
    let path = path.into();
    move |source| ReportError::Io { path, source }
}

/// `reports/<name>` with the name reduced to a safe single path component
/// (letters, digits, `-`, `_`, `.`; no leading dot), so a sweep named
/// `../../x` cannot write outside `reports/`.
pub fn default_dir(name: &str) -> PathBuf {
    PathBuf::from("reports").join(safe_name(name))
}

pub fn safe_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_start_matches('.').to_string();
    if s.is_empty() {
        "sweep".to_string()
    } else {
        s
    }
}

/// Write the report of a sweep into `dir` (created; earlier charts and
/// thumbnails there are replaced) and return the path of `index.html`.
pub fn write_report(
    store: &crate::store::Store,
    sweep_id: i64,
    dir: &std::path::Path,
    svg: bool,
) -> Result<PathBuf, ReportError> {
    let data = data::SweepData::load(store, sweep_id)?;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if plots::is_chart_file(&name)
                || (name.starts_with("sample-") && name.ends_with(".png"))
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let plots = plots::write_all(&data, dir, svg)?;
    let sig = significance::against_best(store, &data)?;
    let baseline_tests = significance::best_vs_baselines(store, &data)?;
    let findings = findings::findings(&data, &baseline_tests);
    let gallery = gallery::build(store, &data, dir)?;
    let mut search = search::SearchSection::load(store, sweep_id)?;
    if let Some(s) = search.as_mut() {
        s.write_plot(dir, svg)?;
    }
    let fonts = font::Fonts::shared();
    let font_note = match &fonts.fallback {
        Some(p) => format!(
            "bundled WenQuanYi Micro Hei subset, fallback {}",
            p.display()
        ),
        None => "bundled WenQuanYi Micro Hei subset (GB 2312)".to_string(),
    };
    let page = html::Page {
        data: &data,
        plots: &plots,
        significance: sig.as_ref(),
        findings: &findings,
        gallery: &gallery,
        search: search.as_ref(),
        generated_at: crate::store::now(),
        font_note,
    };
    let index = dir.join("index.html");
    let tmp = dir.join(".index.html.tmp");
    std::fs::write(&tmp, html::render(&page)).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &index).map_err(io(&index))?;
    Ok(index)
}
