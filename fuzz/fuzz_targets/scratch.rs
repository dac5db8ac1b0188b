//! A per-process scratch directory on a RAM disk where there is one: the
//! readers under test take paths, so each input is written there first.

use std::path::PathBuf;

pub fn dir(target: &str) -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let d = base.join(format!("ecic-fuzz-{target}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("scratch directory");
    d
}

/// `data` cut at its first NUL: (before, after); no NUL: (data, empty).
pub fn halves(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}
