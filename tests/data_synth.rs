//! The synthetic default set: deterministic by seed, the promised shape
//! (sizes, 5-10 captions, JPEG images, ALIGN domain), and the content digest.

use std::path::Path;

use ecic::data::content_digest;
use ecic::data::muge::{read_split, BadRecordPolicy, MugeError, ReadOptions};
use ecic::data::synth::{self, SynthConfig};

fn small(seed: u64) -> SynthConfig {
    SynthConfig {
        seed,
        train: 24,
        valid: 6,
        test: 6,
        align: 12,
        align_valid: 3,
        ..SynthConfig::default()
    }
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    synth::generate(&a, &small(7)).unwrap();
    // A different thread count must not change a byte.
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| synth::generate(&b, &small(7)))
        .unwrap();
    synth::generate(&c, &small(8)).unwrap();
    let (fa, fb, fc) = (files(&a), files(&b), files(&c));
    assert_eq!(
        fa.iter().map(|f| f.0.as_str()).collect::<Vec<_>>(),
        [
            "ALIGN_train.jsonl",
            "ALIGN_train.tsv",
            "ALIGN_valid.jsonl",
            "ALIGN_valid.tsv",
            "IC_test.jsonl",
            "IC_test.tsv",
            "IC_train.jsonl",
            "IC_train.tsv",
            "IC_valid.jsonl",
            "IC_valid.tsv",
            "synth.json",
        ]
    );
    assert!(fa == fb, "same seed gave different bytes");
    for (x, y) in fa.iter().zip(&fc) {
        assert_ne!(x.1, y.1, "{} did not change with the seed", x.0);
    }
    assert_eq!(content_digest(&a).unwrap(), content_digest(&b).unwrap());
    assert_ne!(content_digest(&a).unwrap(), content_digest(&c).unwrap());
}

#[test]
fn shape_of_the_set() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small(3);
    synth::generate(tmp.path(), &cfg).unwrap();
    let opts = ReadOptions {
        policy: BadRecordPolicy::Fail,
        ..ReadOptions::default()
    };
    let mut all_ids = std::collections::HashSet::new();
    for (prefix, n) in [
        ("IC_train", 24),
        ("IC_valid", 6),
        ("IC_test", 6),
        ("ALIGN_train", 12),
        ("ALIGN_valid", 3),
    ] {
        let mut recs = Vec::new();
        let rep = read_split::<_, MugeError, _, _>(
            tmp.path(),
            prefix,
            &opts,
            |_, img| (img.width(), img.height()),
            |c| {
                recs.extend(c);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(rep.records, n, "{prefix}");
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(r.value, (128, 128));
            assert_eq!(r.image_id.len(), 32);
            assert!(r.image_id.bytes().all(|b| b.is_ascii_hexdigit()));
            assert!(
                all_ids.insert(r.image_id.clone()),
                "id repeated across splits"
            );
            assert!(
                (5..=10).contains(&r.captions.len()),
                "{} captions",
                r.captions.len()
            );
            let uniq: std::collections::HashSet<_> = r.captions.iter().collect();
            assert_eq!(
                uniq.len(),
                r.captions.len(),
                "captions repeat: {:?}",
                r.captions
            );
            // The main item's category and colour are named in every caption
            // of the e-commerce style (synonyms aside, the colour is literal).
            let (id, labels) = synth::labels(&cfg, prefix, i);
            assert_eq!(id, r.image_id);
            for c in &r.captions {
                assert!(c.contains(labels.colour), "{c:?} lacks {}", labels.colour);
                if prefix.starts_with("ALIGN") {
                    assert!(
                        c.contains(labels.category) && c.contains(labels.pattern),
                        "{c:?} vs {labels:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn digest_covers_data_files_only_and_every_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    synth::generate(
        d,
        &SynthConfig {
            train: 3,
            valid: 1,
            test: 1,
            align: 1,
            ..SynthConfig::default()
        },
    )
    .unwrap();
    let base = content_digest(d).unwrap();
    std::fs::write(d.join(".complete"), b"").unwrap();
    std::fs::write(d.join("README.md"), b"notes").unwrap();
    assert_eq!(content_digest(d).unwrap(), base);
    let p = d.join("IC_valid.jsonl");
    let mut bytes = std::fs::read(&p).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 1;
    std::fs::write(&p, &bytes).unwrap();
    assert_ne!(content_digest(d).unwrap(), base);
    let empty = tempfile::tempdir().unwrap();
    assert!(content_digest(empty.path()).is_err());
}
