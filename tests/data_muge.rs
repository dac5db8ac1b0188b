//! The MUGE reader's validation: one test per bad-record kind, each checking
//! file, line and reason, plus the two policies and both base64 alphabets.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use ecic::data::muge::{
    read_split, BadReason, BadRecord, BadRecordPolicy, MugeError, ReadOptions, ReadReport,
    SplitWriter,
};

/// A real JPEG whose standard base64 holds both `+` and `/` (so the
/// URL-safe spelling differs from it).
fn jpeg() -> Vec<u8> {
    for seed in 0u32.. {
        let img = image::RgbImage::from_fn(8, 8, |x, y| {
            let v = (x * 31 + y * 17 + seed * 7) as u8;
            image::Rgb([v, v.wrapping_mul(3), 255 - v])
        });
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode(img.as_raw(), 8, 8, image::ExtendedColorType::Rgb8)
            .unwrap();
        let b = base64::engine::general_purpose::STANDARD.encode(&out);
        if b.contains('+') && b.contains('/') {
            return out;
        }
    }
    unreachable!()
}

fn b64() -> String {
    base64::engine::general_purpose::STANDARD.encode(jpeg())
}

fn tsv_line(id: &str) -> String {
    format!("{id}\t{}\n", b64())
}

fn json_line(id: &str) -> String {
    format!("{{\"image_id\": \"{id}\", \"text\": [\"红色T恤\", \"新款红色T恤\"]}}\n")
}

/// Writes `IC_x.tsv` / `IC_x.jsonl` with the given bytes.
fn dir_with(tsv: &[u8], jsonl: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_owned();
    std::fs::write(d.join("IC_x.tsv"), tsv).unwrap();
    std::fs::write(d.join("IC_x.jsonl"), jsonl).unwrap();
    (tmp, d)
}

fn good_lines(ids: &[&str]) -> (String, String) {
    (
        ids.iter().map(|i| tsv_line(i)).collect(),
        ids.iter().map(|i| json_line(i)).collect(),
    )
}

fn read(dir: &Path, opts: &ReadOptions) -> Result<(ReadReport, Vec<String>), MugeError> {
    let mut ids = Vec::new();
    let rep = read_split::<_, MugeError, _, _>(
        dir,
        "IC_x",
        opts,
        |_, img| img.width(),
        |chunk| {
            for r in chunk {
                assert_eq!(r.value, 8);
                ids.push(r.image_id);
            }
            Ok(())
        },
    )?;
    Ok((rep, ids))
}

fn skip() -> ReadOptions {
    ReadOptions {
        policy: BadRecordPolicy::Skip,
        chunk_lines: 2,
        ..ReadOptions::default()
    }
}

/// Reads with `skip` and returns (file name, line, reason) of each bad record
/// plus the good ids.
fn bad_of(dir: &Path, opts: &ReadOptions) -> (Vec<(String, usize, BadReason)>, Vec<String>) {
    let (rep, ids) = read(dir, opts).unwrap();
    assert_eq!(rep.skipped, rep.bad.len());
    assert_eq!(rep.records, ids.len());
    let bad = rep
        .bad
        .into_iter()
        .map(|BadRecord { file, line, reason }| {
            (
                file.file_name().unwrap().to_string_lossy().into_owned(),
                line,
                reason,
            )
        })
        .collect();
    (bad, ids)
}

#[test]
fn good_split_reads_in_order() {
    let (t, j) = good_lines(&["a", "b", "c", "d", "e"]);
    let (_tmp, d) = dir_with(t.as_bytes(), j.as_bytes());
    let (bad, ids) = bad_of(&d, &skip());
    assert!(bad.is_empty());
    assert_eq!(ids, ["a", "b", "c", "d", "e"]);
}

#[test]
fn bad_base64() {
    let (_, j) = good_lines(&["a", "b", "c"]);
    let t = format!("{}b\t@@not*base64@@\n{}", tsv_line("a"), tsv_line("c"));
    let (_tmp, d) = dir_with(t.as_bytes(), j.as_bytes());
    let (bad, ids) = bad_of(&d, &skip());
    assert_eq!(bad.len(), 1);
    assert_eq!((bad[0].0.as_str(), bad[0].1), ("IC_x.tsv", 2));
    assert!(
        matches!(bad[0].2, BadReason::BadBase64(_)),
        "{:?}",
        bad[0].2
    );
    assert_eq!(ids, ["a", "c"]);
}

#[test]
fn undecodable_image() {
    let (_, j) = good_lines(&["a", "b"]);
    let junk = base64::engine::general_purpose::STANDARD.encode(b"this is not a jpeg at all");
    let t = format!("{}b\t{junk}\n", tsv_line("a"));
    let (_tmp, d) = dir_with(t.as_bytes(), j.as_bytes());
    let (bad, _) = bad_of(&d, &skip());
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].1, 2);
    assert!(matches!(bad[0].2, BadReason::BadImage(_)), "{:?}", bad[0].2);
}

#[test]
fn blank_line() {
    let (_, j) = good_lines(&["a", "b"]);
    let t = format!("{}\n{}", tsv_line("a"), tsv_line("b"));
    let (_tmp, d) = dir_with(t.as_bytes(), j.as_bytes());
    let (bad, ids) = bad_of(&d, &skip());
    assert_eq!(bad, [("IC_x.tsv".to_owned(), 2, BadReason::Blank)]);
    assert_eq!(ids, ["a", "b"]);
}

#[test]
fn over_long_line() {
    let (_, j) = good_lines(&["a", "b", "c"]);
    let long = format!("b\t{}\n", "A".repeat(10_000));
    let t = format!("{}{long}{}", tsv_line("a"), tsv_line("c"));
    let (_tmp, d) = dir_with(t.as_bytes(), j.as_bytes());
    let opts = ReadOptions {
        max_line_bytes: 4096,
        ..skip()
    };
    let (bad, ids) = bad_of(&d, &opts);
    assert_eq!(
        bad,
        [(
            "IC_x.tsv".to_owned(),
            2,
            BadReason::TooLong {
                len: 10_002,
                max: 4096
            }
        )]
    );
    // The reader resynchronises on the next line.
    assert_eq!(ids, ["a", "c"]);
}

#[test]
fn crlf() {
    let (_, j) = good_lines(&["a", "b"]);
    let t = format!("{}{}", tsv_line("a").replace('\n', "\r\n"), tsv_line("b"));
    let (_tmp, d) = dir_with(t.as_bytes(), j.as_bytes());
    let (bad, ids) = bad_of(&d, &skip());
    assert_eq!(bad, [("IC_x.tsv".to_owned(), 1, BadReason::Crlf)]);
    assert_eq!(ids, ["b"]);
}

#[test]
fn bom() {
    let (t, j) = good_lines(&["a", "b"]);
    let mut jb = vec![0xEF, 0xBB, 0xBF];
    jb.extend_from_slice(j.as_bytes());
    let (_tmp, d) = dir_with(t.as_bytes(), &jb);
    let (bad, ids) = bad_of(&d, &skip());
    // Reported once, on the jsonl; image a is left out for lack of references.
    assert_eq!(bad, [("IC_x.jsonl".to_owned(), 1, BadReason::Bom)]);
    assert_eq!(ids, ["b"]);
}

#[test]
fn invalid_utf8() {
    let (_, j) = good_lines(&["a", "b"]);
    let mut t = tsv_line("a").into_bytes();
    t.extend_from_slice(b"b\xff\xfe\t");
    t.extend_from_slice(format!("\t{}\n", b64()).as_bytes());
    let (_tmp, d) = dir_with(&t, j.as_bytes());
    let (bad, _) = bad_of(&d, &skip());
    // The id itself is broken, so jsonl record b has no image either.
    assert_eq!(
        bad,
        [
            (
                "IC_x.jsonl".to_owned(),
                2,
                BadReason::NotInTsv("b".to_owned())
            ),
            ("IC_x.tsv".to_owned(), 2, BadReason::InvalidUtf8 { at: 1 }),
        ]
    );
}

#[test]
fn missing_field() {
    let (t, _) = good_lines(&["a", "b"]);
    let t = format!("{t}c-without-tab\n");
    let j = format!(
        "{}{{\"text\": [\"蓝色\"]}}\n{}",
        json_line("a"),
        json_line("b")
    );
    let (_tmp, d) = dir_with(t.as_bytes(), j.as_bytes());
    let (bad, ids) = bad_of(&d, &skip());
    assert_eq!(
        bad,
        [
            (
                "IC_x.jsonl".to_owned(),
                2,
                BadReason::MissingField("image_id")
            ),
            (
                "IC_x.tsv".to_owned(),
                3,
                BadReason::MissingField("base64 image")
            ),
        ]
    );
    assert_eq!(ids, ["a", "b"]);
}

#[test]
fn duplicate_id() {
    let (_, j) = good_lines(&["a", "b"]);
    let t = format!("{}{}{}", tsv_line("a"), tsv_line("b"), tsv_line("a"));
    let j = format!("{j}{}", json_line("b"));
    let (_tmp, d) = dir_with(t.as_bytes(), j.as_bytes());
    let (bad, ids) = bad_of(&d, &skip());
    assert_eq!(
        bad,
        [
            (
                "IC_x.jsonl".to_owned(),
                3,
                BadReason::DuplicateId {
                    id: "b".to_owned(),
                    first: 2
                }
            ),
            (
                "IC_x.tsv".to_owned(),
                3,
                BadReason::DuplicateId {
                    id: "a".to_owned(),
                    first: 1
                }
            ),
        ]
    );
    assert_eq!(ids, ["a", "b"]);
}

#[test]
fn jsonl_id_missing_from_tsv() {
    let (t, _) = good_lines(&["a", "b"]);
    let (_, j) = good_lines(&["a", "ghost", "b"]);
    let (_tmp, d) = dir_with(t.as_bytes(), j.as_bytes());
    let (bad, ids) = bad_of(&d, &skip());
    assert_eq!(
        bad,
        [(
            "IC_x.jsonl".to_owned(),
            2,
            BadReason::NotInTsv("ghost".to_owned())
        )]
    );
    assert_eq!(ids, ["a", "b"]);
}

#[test]
fn empty_caption_list_where_refs_required() {
    let (t, _) = good_lines(&["a", "b", "c"]);
    let j = format!(
        "{}{{\"image_id\": \"b\", \"text\": []}}\n{{\"image_id\": \"c\"}}\n",
        json_line("a")
    );
    let (_tmp, d) = dir_with(t.as_bytes(), j.as_bytes());
    let (bad, ids) = bad_of(&d, &skip());
    assert_eq!(
        bad,
        [
            (
                "IC_x.jsonl".to_owned(),
                2,
                BadReason::NoCaptions("b".to_owned())
            ),
            (
                "IC_x.jsonl".to_owned(),
                3,
                BadReason::NoCaptions("c".to_owned())
            ),
        ]
    );
    assert_eq!(ids, ["a"]);
    // A test split without references is fine when none are needed.
    let (bad, ids) = bad_of(
        &d,
        &ReadOptions {
            require_refs: false,
            ..skip()
        },
    );
    assert!(bad.is_empty());
    assert_eq!(ids, ["a", "b", "c"]);
}

#[test]
fn both_base64_alphabets_accepted() {
    let std = b64();
    let url = base64::engine::general_purpose::URL_SAFE.encode(jpeg());
    let url_nopad = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(jpeg());
    assert_ne!(std, url, "fixture must exercise the alphabet difference");
    let t = format!("a\t{std}\nb\t{url}\nc\t{url_nopad}\n");
    let (_, j) = good_lines(&["a", "b", "c"]);
    let (_tmp, d) = dir_with(t.as_bytes(), j.as_bytes());
    let (bad, ids) = bad_of(&d, &skip());
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(ids, ["a", "b", "c"]);
}

#[test]
fn fail_policy_lists_every_bad_record_with_file_and_line() {
    let (_, j) = good_lines(&["a", "b", "c"]);
    let t = format!("{}\nb\t!!\n", tsv_line("a"));
    let (_tmp, d) = dir_with(t.as_bytes(), j.as_bytes());
    let opts = ReadOptions {
        policy: BadRecordPolicy::Fail,
        ..ReadOptions::default()
    };
    let err = read(&d, &opts).unwrap_err();
    let MugeError::BadRecords { bad, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(bad.len(), 3, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("IC_x.tsv:2: blank line"), "{msg}");
    assert!(msg.contains("IC_x.tsv:3: bad base64"), "{msg}");
    assert!(
        msg.contains("IC_x.jsonl:3: image_id c is not in the tsv"),
        "{msg}"
    );
}

#[test]
fn writer_output_reads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = SplitWriter::create(tmp.path(), "IC_x").unwrap();
    let caps = vec![
        "黑色波点背包".to_owned(),
        "新款 iPhone 15 手机壳".to_owned(),
    ];
    w.write("id1", &jpeg(), &caps).unwrap();
    w.finish().unwrap();
    let mut got = Vec::new();
    read_split::<_, MugeError, _, _>(
        tmp.path(),
        "IC_x",
        &ReadOptions::default(),
        |_, i| i.height(),
        |c| {
            got.extend(c.into_iter().map(|r| (r.image_id, r.captions, r.line)));
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(got, [("id1".to_owned(), caps, 1)]);
}
