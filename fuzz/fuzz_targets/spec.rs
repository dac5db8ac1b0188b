//! The spec loader: any text (and up to four `--set` arguments after NUL
//! bytes) must give a spec or a list of problems, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0);
    let text = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let sets: Vec<String> = parts
        .take(4)
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let path = std::path::Path::new("/nonexistent-ecic-fuzz/spec.toml");
    if let Err(e) = ecic::spec::Spec::from_text(path, text, &sets) {
        // Rendering the problems (positions, did-you-means) must not panic either.
        let _ = e.to_string();
    }
});
