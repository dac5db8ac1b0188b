//! A synthetic, fully populated store for the report's tests and benchmark:
//! a backbone × PEFT × fusion grid (or baselines only) with seeds, recorded
//! through the store's own write path (`begin_sweep`, `ingest`), captions
//! scored by the real metrics, curves, and a tiny MUGE data directory with
//! JPEG images for the gallery. Nothing here trains anything.

use std::path::{Path, PathBuf};

use base64::Engine;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::cache::{CaptionRecord, Manifest, StageOutputs};
use crate::metrics::{References, Tokenize};
use crate::store::{CellRow, StageRow, Store, SweepRow};

/// What to put in the store.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub name: String,
    pub backbones: Vec<String>,
    pub pefts: Vec<String>,
    pub fusions: Vec<String>,
    pub seeds: u64,
    pub images: usize,
    /// Only `nn` / `mfc` baseline cells (no training stages, no curves).
    pub baseline_only: bool,
    /// A caption to plant in every cell's first prediction (escaping tests).
    pub planted_caption: Option<String>,
}

impl Default for Fixture {
    fn default() -> Self {
        Fixture {
            name: "fixture".into(),
            backbones: vec!["blip2".into(), "llava".into(), "phi3v".into()],
            pefts: vec!["lora".into(), "qlora".into(), "adapter".into()],
            fusions: vec!["early".into(), "late".into(), "qformer".into()],
            seeds: 1,
            images: 40,
            baseline_only: false,
            planted_caption: None,
        }
    }
}

const WORDS: [&str; 12] = [
    "白色",
    "连衣裙",
    "纯棉",
    "宽松",
    "显瘦",
    "夏季",
    "新款",
    "红色",
    "衬衫",
    "条纹",
    "休闲",
    "时尚",
];

fn caption(rng: &mut ChaCha8Rng, base: &[usize], noise: f64) -> String {
    base.iter()
        .map(|&w| {
            if rng.gen_bool(noise) {
                WORDS[rng.gen_range(0..WORDS.len())]
            } else {
                WORDS[w]
            }
        })
        .collect()
}

fn manifest(key: &str, kind: &str, label: &str, wall_s: f64, trainable: Option<u64>) -> Manifest {
    Manifest {
        key: key.into(),
        kind: kind.into(),
        label: label.into(),
        params: json!({}),
        inputs: vec![],
        kind_version: 1,
        ecic_version: env!("CARGO_PKG_VERSION").into(),
        data_digest: "fixture".into(),
        seed: 0,
        started_at: 1_700_000_000.0,
        finished_at: 1_700_000_000.0 + wall_s,
        wall_s,
        cpu_s: None,
        peak_rss_kb: None,
        git_commit: None,
        host: Some("fixture-host".into()),
        threads: 1,
        trainable_params: trainable,
        total_params: trainable.map(|t| t * 10),
        files: vec![],
        digests: Default::default(),
    }
}

/// Write the data directory and the store under `root` (`root/data`,
/// `root/runs`); returns the runs directory and the sweep id.
pub fn build(root: &Path, f: &Fixture) -> Result<(PathBuf, i64), Box<dyn std::error::Error>> {
    let data = root.join("data");
    std::fs::create_dir_all(&data)?;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut refs: Vec<(String, Vec<String>)> = Vec::new();
    let mut bases: Vec<Vec<usize>> = Vec::new();
    let (mut tsv, mut jsonl) = (String::new(), String::new());
    for i in 0..f.images {
        let id = format!("{:032x}", 0xabc0_0000u64 + i as u64);
        let base: Vec<usize> = (0..5).map(|_| rng.gen_range(0..WORDS.len())).collect();
        let texts: Vec<String> = (0..3).map(|_| caption(&mut rng, &base, 0.2)).collect();
        let img = image::RgbImage::from_fn(48, 48, |x, y| {
            image::Rgb([
                (x * 5 + i as u32 * 20) as u8,
                (y * 5) as u8,
                (120 + i * 7) as u8,
            ])
        });
        let mut jpeg = Vec::new();
        image::DynamicImage::ImageRgb8(img).write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )?;
        tsv.push_str(&format!(
            "{id}\t{}\n",
            base64::engine::general_purpose::STANDARD.encode(&jpeg)
        ));
        jsonl.push_str(&format!("{}\n", json!({"image_id": id, "text": texts})));
        refs.push((id, texts));
        bases.push(base);
    }
    std::fs::write(data.join("IC_valid.tsv"), tsv)?;
    std::fs::write(data.join("IC_valid.jsonl"), jsonl)?;
    let references = References::new(&refs, Tokenize::Char)?;

    let runs = root.join("runs");
    let mut store = Store::open(&runs)?;
    let configs: Vec<(String, String, String)> = if f.baseline_only {
        vec![
            ("nn".into(), "-".into(), "-".into()),
            ("mfc".into(), "-".into(), "-".into()),
        ]
    } else {
        let mut v = Vec::new();
        for b in &f.backbones {
            for p in &f.pefts {
                for fu in &f.fusions {
                    v.push((b.clone(), p.clone(), fu.clone()));
                }
            }
        }
        v
    };
    let mut cells = Vec::new();
    let mut stages: Vec<StageRow> = Vec::new();
    let mut outputs: Vec<StageOutputs> = Vec::new();
    let stage = |key: &str, kind: &str, label: &str, stages: &mut Vec<StageRow>, reused: bool| {
        if !stages.iter().any(|s| s.key == key) {
            stages.push(StageRow {
                key: key.into(),
                kind: kind.into(),
                label: label.into(),
                params: json!({}),
                inputs: vec![],
                reused,
            });
            true
        } else {
            false
        }
    };
    if stage("pre", "preprocess", "preprocess", &mut stages, true) {
        outputs.push(StageOutputs {
            manifest: manifest("pre", "preprocess", "preprocess", 3.0, None),
            metrics: vec![],
            curves: vec![],
            captions: vec![],
            log_path: None,
        });
    }
    for (ci, (b, p, fu)) in configs.iter().enumerate() {
        for seed in 0..f.seeds {
            let base_name = if f.baseline_only {
                b.clone()
            } else {
                format!("{b}-{p}-{fu}")
            };
            let name = format!("{base_name}-s{seed}");
            let mut chain = vec![("preprocess".to_string(), "pre".to_string())];
            let quality =
                0.15 + 0.6 * (ci as f64 / configs.len().max(1) as f64) + 0.03 * seed as f64;
            let trainable = if f.baseline_only {
                None
            } else {
                Some(10_000u64 * (1 + (ci as u64 % 3)) * if p == "lora" { 1 } else { 7 })
            };
            if !f.baseline_only {
                let pa = format!("pa-{b}-{fu}-s{seed}");
                if stage(
                    &pa,
                    "pretrain-align",
                    &format!("pretrain-align {b}/{fu} s{seed}"),
                    &mut stages,
                    false,
                ) {
                    let curves = (0..20u64)
                        .map(|s| {
                            (
                                s * 10,
                                "loss".to_string(),
                                4.0 * (-(s as f64) / 8.0).exp() + 0.5,
                            )
                        })
                        .collect();
                    outputs.push(StageOutputs {
                        manifest: manifest(&pa, "pretrain-align", &pa, 30.0, Some(5_000)),
                        metrics: vec![],
                        curves,
                        captions: vec![],
                        log_path: None,
                    });
                }
                let da = format!("da-{name}");
                stage(
                    &da,
                    "domain-adapt",
                    &format!("domain-adapt {name}"),
                    &mut stages,
                    false,
                );
                let curves = (0..20u64)
                    .map(|s| {
                        (
                            s * 5,
                            "loss".to_string(),
                            3.0 * (-(s as f64) * quality / 5.0).exp() + 0.3,
                        )
                    })
                    .collect();
                outputs.push(StageOutputs {
                    manifest: manifest(&da, "domain-adapt", &da, 20.0 + ci as f64, trainable),
                    metrics: vec![],
                    curves,
                    captions: vec![],
                    log_path: None,
                });
                let co = format!("co-{name}");
                stage(
                    &co,
                    "cider-optimize",
                    &format!("cider-optimize {name}"),
                    &mut stages,
                    false,
                );
                let curves = (0..10u64)
                    .map(|s| {
                        (
                            s,
                            "reward".to_string(),
                            quality * (1.0 - (-(s as f64) / 3.0).exp()),
                        )
                    })
                    .collect();
                outputs.push(StageOutputs {
                    manifest: manifest(&co, "cider-optimize", &co, 10.0, trainable),
                    metrics: vec![],
                    curves,
                    captions: vec![],
                    log_path: None,
                });
                chain.push(("pretrain-align".into(), pa));
                chain.push(("domain-adapt".into(), da));
                chain.push(("cider-optimize".into(), co));
            }
            let ev = format!("ev-{name}");
            stage(
                &ev,
                "evaluate",
                &format!("evaluate {name}"),
                &mut stages,
                false,
            );
            let mut crng = ChaCha8Rng::seed_from_u64(1000 + ci as u64 * 31 + seed);
            let mut preds: Vec<(String, String)> = refs
                .iter()
                .zip(&bases)
                .map(|((id, _), base)| {
                    (
                        id.clone(),
                        caption(&mut crng, base, 1.0 - quality.min(0.95)),
                    )
                })
                .collect();
            if let (Some(c), Some(first)) = (&f.planted_caption, preds.first_mut()) {
                first.1 = c.clone();
            }
            let ev_out = references.evaluate(&preds)?;
            let mut metrics: Vec<(String, String, f64)> = crate::metrics::Metric::ALL
                .iter()
                .map(|m| {
                    (
                        "valid".to_string(),
                        m.key().to_string(),
                        ev_out.scores.get(*m),
                    )
                })
                .collect();
            metrics.push((
                String::new(),
                "captions_per_s".into(),
                50.0 + 10.0 * ci as f64,
            ));
            let captions = preds
                .iter()
                .zip(&ev_out.images)
                .map(|((id, c), s)| CaptionRecord {
                    split: "valid".into(),
                    image_id: id.clone(),
                    caption: c.clone(),
                    scores: Some(serde_json::to_value(s).unwrap_or_default()),
                })
                .collect();
            outputs.push(StageOutputs {
                manifest: manifest(&ev, "evaluate", &ev, 2.0, None),
                metrics,
                curves: vec![],
                captions,
                log_path: None,
            });
            chain.push(("evaluate".into(), ev));
            cells.push(CellRow {
                name,
                backbone: b.clone(),
                peft: p.clone(),
                fusion: fu.clone(),
                seed,
                overrides: json!({}),
                stages: chain,
            });
        }
    }
    let sweep = SweepRow {
        name: f.name.clone(),
        spec_path: root.join("spec.toml").display().to_string(),
        spec_text: format!("name = {:?}\n[grid]\nbackbone = [\"blip2\"]\n", f.name),
        sets: vec![],
        spec_hash: "0".into(),
        axes: vec!["backbone".into(), "peft".into(), "fusion".into()],
        data_dir: data.display().to_string(),
        data_digest: "fixture".into(),
        executor: "local".into(),
        jobs: 2,
        git_commit: Some("0123abc".into()),
        host: Some("fixture-host".into()),
    };
    let id = store.begin_sweep(&sweep, &cells, &stages)?;
    for o in &outputs {
        store.ingest(o)?;
    }
    store.finish_sweep(id, "done")?;
    Ok((runs, id))
}
