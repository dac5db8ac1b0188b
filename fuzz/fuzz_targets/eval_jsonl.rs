//! `ecic eval`'s JSONL readers: predictions and references (the input cut at
//! its first NUL), matched by id and, where both read, scored: errors naming
//! lines, or metrics, never a panic.
#![no_main]

#[path = "scratch.rs"]
mod scratch;

use ecic::metrics::{jsonl, Tokenize};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = scratch::dir("eval");
    let (pred, refs) = scratch::halves(data);
    let (pp, rp) = (dir.join("pred.jsonl"), dir.join("refs.jsonl"));
    std::fs::write(&pp, pred).expect("write predictions");
    std::fs::write(&rp, refs).expect("write references");
    let p = jsonl::read_predictions(&pp);
    let r = jsonl::read_references(&rp);
    let (Ok(p), Ok(r)) = (p, r) else {
        return;
    };
    let Ok(aligned) = jsonl::align(&r, &rp, &p, &pp, true) else {
        return;
    };
    let preds: Vec<(String, String)> = r
        .iter()
        .zip(&aligned.texts)
        .map(|(r, t)| (r.image_id.clone(), t.to_string()))
        .collect();
    let refs: Vec<(String, Vec<String>)> = r
        .iter()
        .map(|r| (r.image_id.clone(), r.text.clone()))
        .collect();
    for mode in [Tokenize::Char, Tokenize::Space] {
        if let Ok(e) = ecic::metrics::evaluate(&preds, &refs, mode) {
            let _ = e;
        }
    }
});
