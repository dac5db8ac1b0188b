//! Helpers shared by the integration tests (each test file includes this with `mod common;`).
#![allow(dead_code, reason = "each test file uses some of these helpers")]

use candle_core::Tensor;

/// Largest absolute element-wise difference of two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "tensors of different shapes");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Every reference caption of a MUGE `.jsonl` file (`{"image_id": .., "text": [..]}` per line).
pub fn jsonl_captions(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .flat_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["text"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// SIGKILL every `ecic run-stage` process working in `runs` (they run in their own process
/// groups, so killing a sweep's group leaves them): what a kill -9 of a whole sweep does.
pub fn kill_stages_of(runs: &std::path::Path) {
    let needle = runs.display().to_string();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("run-stage") && cmd.contains(&needle) {
            // SAFETY: a stage process of the calling test.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The first file named `name` under `dir`, depth first (e.g. the synthetic data's
/// `IC_valid.tsv` under a runs directory's `data/`).
pub fn find_file(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}
