//! The MUGE reader: a split's `.tsv` and `.jsonl` (the input cut at its first
//! NUL) read under both bad-record policies, its captions for the tokenizer,
//! and the whole input as an image: bad records or errors, never a panic.
#![no_main]

#[path = "scratch.rs"]
mod scratch;

use ecic::data::muge::{self, BadRecordPolicy, MugeError, ReadOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = scratch::dir("muge");
    let (tsv, jsonl) = scratch::halves(data);
    std::fs::write(dir.join("IC_valid.tsv"), tsv).expect("write tsv");
    std::fs::write(dir.join("IC_valid.jsonl"), jsonl).expect("write jsonl");
    for (policy, require_refs) in [
        (BadRecordPolicy::Fail, true),
        (BadRecordPolicy::Skip, false),
    ] {
        let opts = ReadOptions {
            policy,
            require_refs,
            max_line_bytes: 1 << 16,
            chunk_lines: 8,
            ..ReadOptions::default()
        };
        let read = muge::read_split::<_, MugeError, _, _>(
            &dir,
            "IC_valid",
            &opts,
            |_, img| (img.width(), img.height()),
            |_| Ok(()),
        );
        if let Err(e) = read {
            let _ = e.to_string();
        }
    }
    let _ = muge::caption_texts(&dir, "IC_valid", 1 << 16);
    let _ = muge::decode_image(data);
});
