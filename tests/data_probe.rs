//! Probes of the synthetic set that print figures rather than assert them
//! (run with `--ignored --nocapture`; `scripts/bench-preprocess.sh` does).
//!
//! - `contact_sheet`: a 6x6 PNG of the first training images, to look at.
//! - `learnability`: 1-nearest-neighbour on 8x8 colour thumbnails predicts
//!   each attribute of the main item well above chance, so the images carry
//!   what the captions say.

use std::path::PathBuf;

use ecic::data::muge::{read_split, BadRecordPolicy, MugeError, ReadOptions};
use ecic::data::synth::{self, SynthConfig};

fn data_dir(cfg: &SynthConfig) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("d");
    synth::generate(&dir, cfg).expect("synth");
    (tmp, dir)
}

fn images(dir: &std::path::Path, prefix: &str, side: u32) -> Vec<(String, image::RgbImage)> {
    let opts = ReadOptions {
        policy: BadRecordPolicy::Fail,
        ..ReadOptions::default()
    };
    let mut out = Vec::new();
    read_split::<_, MugeError, _, _>(
        dir,
        prefix,
        &opts,
        |_, img| {
            image::imageops::resize(
                &img.to_rgb8(),
                side,
                side,
                image::imageops::FilterType::Triangle,
            )
        },
        |chunk| {
            out.extend(chunk.into_iter().map(|r| (r.image_id, r.value)));
            Ok(())
        },
    )
    .expect("read");
    out
}

#[test]
#[ignore = "prints a picture, run by hand"]
fn contact_sheet() {
    let cfg = SynthConfig {
        train: 36,
        valid: 0,
        test: 0,
        align: 0,
        ..SynthConfig::default()
    };
    let (_tmp, dir) = data_dir(&cfg);
    let imgs = images(&dir, "IC_train", 128);
    let mut sheet = image::RgbImage::new(6 * 128, 6 * 128);
    for (i, (_, im)) in imgs.iter().enumerate() {
        image::imageops::replace(&mut sheet, im, (i % 6) as i64 * 128, (i / 6) as i64 * 128);
    }
    let out = std::env::var("ECIC_SHEET").unwrap_or_else(|_| "/tmp/ecic-sheet.png".to_owned());
    sheet.save(&out).expect("save sheet");
    for i in 0..36 {
        let (_, l) = synth::labels(&cfg, "IC_train", i);
        println!("{i:2}: {} {} {}", l.colour, l.pattern, l.category);
    }
    println!("wrote {out}");
}

#[test]
#[ignore = "prints figures, run by hand"]
fn learnability() {
    let cfg = SynthConfig {
        train: 1000,
        valid: 0,
        test: 300,
        align: 0,
        ..SynthConfig::default()
    };
    let (_tmp, dir) = data_dir(&cfg);
    let feats = |prefix: &str| -> Vec<Vec<f32>> {
        images(&dir, prefix, 8)
            .into_iter()
            .map(|(_, im)| im.as_raw().iter().map(|&b| f32::from(b)).collect())
            .collect()
    };
    let (train, test) = (feats("IC_train"), feats("IC_test"));
    let lab = |prefix: &str, n: usize| {
        (0..n)
            .map(|i| synth::labels(&cfg, prefix, i).1)
            .collect::<Vec<_>>()
    };
    let (ltr, lte) = (lab("IC_train", cfg.train), lab("IC_test", cfg.test));
    let (cats, colours, patterns) = synth::attribute_names();
    let mut hits = [0usize; 3];
    for (f, l) in test.iter().zip(&lte) {
        let nn = train
            .iter()
            .enumerate()
            .map(|(j, g)| {
                (
                    f.iter().zip(g).map(|(a, b)| (a - b) * (a - b)).sum::<f32>(),
                    j,
                )
            })
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .map(|x| x.1)
            .unwrap_or(0);
        hits[0] += usize::from(ltr[nn].category == l.category);
        hits[1] += usize::from(ltr[nn].colour == l.colour);
        hits[2] += usize::from(ltr[nn].pattern == l.pattern);
    }
    let n = test.len() as f64;
    println!(
        "1-NN on 8x8 thumbnails, {} train / {} test images:",
        train.len(),
        test.len()
    );
    for (k, (name, classes)) in [
        ("category", cats.len()),
        ("colour", colours.len()),
        ("pattern", patterns.len()),
    ]
    .iter()
    .enumerate()
    {
        println!(
            "  {name:<9} accuracy {:.3}  (chance {:.3})",
            hits[k] as f64 / n,
            1.0 / *classes as f64
        );
    }
}

/// Peak resident set of this process so far, from /proc (Linux).
fn peak_rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
#[ignore = "benchmark: needs ECIC_BENCH_DATA, run by scripts/bench-preprocess.sh"]
fn preprocess_throughput() {
    let Ok(data) = std::env::var("ECIC_BENCH_DATA") else {
        println!("set ECIC_BENCH_DATA to a MUGE directory");
        return;
    };
    let size: u32 = std::env::var("ECIC_BENCH_SIZE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let copies: u32 = std::env::var("ECIC_BENCH_COPIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let out = tempfile::tempdir().expect("tempdir");
    let mut params = ecic::data::preprocess::PreprocessParams {
        image_size: size,
        ..Default::default()
    };
    params.augment.copies = copies;
    let rss0 = peak_rss_kib().unwrap_or(0);
    let t = std::time::Instant::now();
    let s = ecic::data::preprocess::run(std::path::Path::new(&data), out.path(), &params, 1)
        .expect("preprocess");
    let secs = t.elapsed().as_secs_f64();
    let images: usize = s.splits.iter().map(|x| x.images).sum();
    let rows: usize = s.splits.iter().map(|x| x.rows).sum();
    println!(
        "preprocess {images} images -> {rows} rows at {size} px (train copies {copies}) on {} threads: {secs:.2} s, \
         {:.0} images/s, {:.0} rows/s",
        rayon::current_num_threads(),
        images as f64 / secs,
        rows as f64 / secs
    );
    println!(
        "peak RSS {:.0} MiB (before preprocessing {:.0} MiB)",
        peak_rss_kib().unwrap_or(0) as f64 / 1024.0,
        rss0 as f64 / 1024.0
    );
}
