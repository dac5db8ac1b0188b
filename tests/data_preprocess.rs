//! Preprocessing: deterministic output, shards that load with the right
//! shape and normalisation, a tokenizer that round-trips every training
//! caption, and the per-split bad-record policies.

mod common;
use std::path::{Path, PathBuf};

use ecic::data::muge::BadRecordPolicy;
use ecic::data::preprocess::{self, PreprocessError, PreprocessMeta, PreprocessParams, Split};
use ecic::data::synth::{self, SynthConfig};
use ecic::data::tokenizer::{char_tokens, CaptionTokenizer, TokenizerKind};

fn synth_dir(tmp: &Path) -> PathBuf {
    let d = tmp.join("data");
    let cfg = SynthConfig {
        train: 20,
        valid: 6,
        test: 5,
        align: 8,
        ..SynthConfig::default()
    };
    synth::generate(&d, &cfg).unwrap();
    d
}

fn params() -> PreprocessParams {
    PreprocessParams {
        image_size: 32,
        ..PreprocessParams::default()
    }
}

/// Every file under `dir`, relative path and bytes, sorted.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((
                    p.strip_prefix(dir).unwrap().display().to_string(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

fn captions(dir: &Path, prefix: &str) -> Vec<String> {
    common::jsonl_captions(&dir.join(format!("{prefix}.jsonl")))
}

#[test]
fn deterministic_and_seed_dependent() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_dir(tmp.path());
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    preprocess::run(&data, &a, &params(), 5).unwrap();
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| preprocess::run(&data, &b, &params(), 5))
        .unwrap();
    preprocess::run(&data, &c, &params(), 6).unwrap();
    let (ta, tb, tc) = (tree(&a), tree(&b), tree(&c));
    assert!(ta == tb, "same inputs and seed gave different bytes");
    let shard =
        |t: &[(String, Vec<u8>)], name: &str| t.iter().find(|f| f.0 == name).unwrap().1.clone();
    // The seed moves the augmented train rows only.
    assert_ne!(
        shard(&ta, "train/shard-00000.safetensors"),
        shard(&tc, "train/shard-00000.safetensors")
    );
    assert_eq!(
        shard(&ta, "valid/shard-00000.safetensors"),
        shard(&tc, "valid/shard-00000.safetensors")
    );
}

#[test]
fn splits_load_with_shape_normalisation_and_captions() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_dir(tmp.path());
    let out = tmp.path().join("pp");
    let p = params();
    let summary = preprocess::run(&data, &out, &p, 1).unwrap();
    assert_eq!(summary, PreprocessMeta::load(&out).unwrap());
    let names: Vec<_> = summary
        .splits
        .iter()
        .map(|s| (s.name.as_str(), s.images, s.rows))
        .collect();
    assert_eq!(
        names,
        [
            ("train", 20, 40),
            ("valid", 6, 6),
            ("test", 5, 5),
            ("align_train", 8, 8)
        ]
    );

    let train = Split::load(&out, "train").unwrap();
    assert_eq!(train.images.dims(), [40, 3, 32, 32]);
    assert_eq!(train.copies[..4], [0, 1, 0, 1]);
    assert_eq!(train.ids[0], train.ids[1]);
    let valid = Split::load(&out, "valid").unwrap();
    assert_eq!(valid.images.dims(), [6, 3, 32, 32]);

    // Reference for the normalisation: the mean colour of each source JPEG,
    // decoded independently here, must match the de-normalised clean row
    // (a resize keeps the mean up to rounding and edge effects).
    let src = std::fs::read_to_string(data.join("IC_valid.tsv")).unwrap();
    for (i, line) in src.lines().enumerate() {
        let (id, b64) = line.split_once('\t').unwrap();
        assert_eq!(valid.ids[i], id);
        let bytes = ecic::data::muge::decode_base64(b64).unwrap();
        let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
        let row: Vec<f32> = valid
            .images
            .get(i)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for ch in 0..3 {
            let want = img.pixels().map(|px| f64::from(px[ch])).sum::<f64>()
                / (img.width() * img.height()) as f64
                / 255.0;
            let plane = &row[ch * 1024..(ch + 1) * 1024];
            let got = plane
                .iter()
                .map(|&v| f64::from(v * p.std[ch] + p.mean[ch]))
                .sum::<f64>()
                / 1024.0;
            assert!(
                (got - want).abs() < 0.01,
                "row {i} channel {ch}: {got} vs {want}"
            );
        }
    }

    // Captions and tokens line up with the tokenizer.
    let tok = CaptionTokenizer::load(&out.join("tokenizer.json")).unwrap();
    assert_eq!(tok.kind(), TokenizerKind::Char);
    for (caps, toks) in valid.captions.iter().zip(&valid.tokens) {
        assert_eq!(caps.len(), toks.len());
        for (c, t) in caps.iter().zip(toks) {
            assert_eq!(&tok.encode(c).unwrap(), t);
        }
    }
    assert!(matches!(
        Split::load(&out, "dev"),
        Err(PreprocessError::UnknownSplit(_))
    ));
}

#[test]
fn tokenizer_round_trips_every_training_caption() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_dir(tmp.path());
    let out = tmp.path().join("pp");
    preprocess::run(&data, &out, &params(), 1).unwrap();
    let tok = CaptionTokenizer::load(&out.join("tokenizer.json")).unwrap();
    let mut all = captions(&data, "IC_train");
    all.extend(captions(&data, "ALIGN_train"));
    assert!(all.len() > 100);
    for c in &all {
        let ids = tok.encode(c).unwrap();
        assert_eq!(ids.len(), char_tokens(c).len(), "{c}");
        assert!(!ids.contains(&tok.unk_id()), "{c}");
        assert!(ids.iter().all(|&i| i > tok.unk_id()), "specials inside {c}");
        assert_eq!(&tok.decode(&ids), c);
        assert_eq!(
            ids,
            tok.encode_with_pipeline(c).unwrap(),
            "fast path differs from the tokenizers pipeline: {c}"
        );
    }
    assert_eq!(
        tok.vocab_size(),
        PreprocessMeta::load(&out).unwrap().vocab_size
    );
}

#[test]
fn bad_records_skip_in_train_and_fail_in_valid() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_dir(tmp.path());
    let corrupt = |prefix: &str| {
        let p = data.join(format!("{prefix}.tsv"));
        let mut lines: Vec<String> = std::fs::read_to_string(&p)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        let id = lines[2].split('\t').next().unwrap().to_owned();
        lines[2] = format!("{id}\t%%%%");
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    };
    corrupt("IC_train");
    let out = tmp.path().join("pp");
    let s = preprocess::run(&data, &out, &params(), 1).unwrap();
    let train = s.split("train").unwrap();
    assert_eq!((train.images, train.skipped), (19, 1));
    assert!(
        train.bad[0].contains("IC_train.tsv:3: bad base64"),
        "{:?}",
        train.bad
    );

    corrupt("IC_valid");
    let err = preprocess::run(&data, &tmp.path().join("pp2"), &params(), 1).unwrap_err();
    assert!(
        err.to_string().contains("IC_valid.tsv:3: bad base64"),
        "{err}"
    );

    let mut lenient = params();
    lenient.policy.valid = BadRecordPolicy::Skip;
    let s = preprocess::run(&data, &tmp.path().join("pp3"), &lenient, 1).unwrap();
    assert_eq!(s.split("valid").unwrap().skipped, 1);

    let mut bad = params();
    bad.image_size = 0;
    bad.std = [0.0, 1.0, 1.0];
    let err = preprocess::run(&data, &tmp.path().join("pp4"), &bad, 1).unwrap_err();
    assert!(
        matches!(&err, PreprocessError::Params(p) if p.len() == 2),
        "{err}"
    );
}
