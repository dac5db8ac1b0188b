//! Diagnostic: how much does a trained stage's model use its image? Prints the teacher-forced
//! loss on a split with the right images and with images shifted by one row (mismatched).
//! Also greedy-decodes the first 12 images beside their first reference.
//! Usage: cargo run --release --example probe_grounding -- RUNS_DIR STAGE_KEY [SPLIT]
//! (SPLIT: valid, train, align_train; a pretrain-align or later training stage key)
use candle_core::{Device, Tensor};
use ecic::data::preprocess::Split;
use ecic::model::{Captioner, ModelConfig, PeftConfig, Phase, TeacherForcing};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let objects = std::path::Path::new(&a[1]).join("objects-v1");
    let key = &a[2];
    let lin: serde_json::Value =
        serde_json::from_slice(&std::fs::read(objects.join(key).join("lineage.json")).unwrap())
            .unwrap();
    let cfg: ModelConfig = serde_json::from_value(lin["model"].clone()).unwrap();
    let peft: PeftConfig = serde_json::from_value(lin["peft"].clone()).unwrap();
    let weights: Vec<String> = serde_json::from_value(lin["weights"].clone()).unwrap();
    let phase = if weights.len() > 1 {
        Phase::Adapt
    } else {
        Phase::Align
    };
    let mut m = Captioner::new(&cfg, &peft, phase, &Device::Cpu).unwrap();
    for (i, w) in weights.iter().enumerate() {
        let p = objects.join(w).join("weights.safetensors");
        if i == 0 {
            m.load_base(&p).unwrap();
        } else {
            m.load_trained(&p).unwrap();
        }
    }
    let pre = objects.join(lin["preprocess"].as_str().unwrap());
    let split_name = a.get(3).map(String::as_str).unwrap_or("valid");
    let split = Split::load(&pre, split_name).unwrap();
    let n = split.len().min(128);
    let maxc = cfg.max_caption_len;
    {
        let ids = Tensor::new(&[[cfg.bos_id]], &Device::Cpu).unwrap();
        let vis0 = m
            .visual_tokens(&split.images.narrow(0, 0, 1).unwrap(), false)
            .unwrap();
        let vis1 = m
            .visual_tokens(&split.images.narrow(0, 1, 1).unwrap(), false)
            .unwrap();
        let l0 = m
            .logits(&split.images.narrow(0, 0, 1).unwrap(), &ids)
            .unwrap();
        let l1 = m
            .logits(&split.images.narrow(0, 1, 1).unwrap(), &ids)
            .unwrap();
        let d = (l0 - l1)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let dv = (&vis0 - &vis1)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let nv = vis0
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        println!("first-token logits max |diff| between two images: {d:.3e}; visual tokens diff {dv:.3e}, rms {nv:.3e}");
    }
    {
        let tok =
            ecic::data::tokenizer::CaptionTokenizer::load(&pre.join("tokenizer.json")).unwrap();
        let dc = ecic::decode::DecodeConfig {
            max_len: maxc,
            ..Default::default()
        };
        // PROBE_N=all decodes the whole split (e.g. to score attributes offline).
        let k = match std::env::var("PROBE_N").ok().as_deref() {
            Some("all") => split.len(),
            Some(v) => v.parse().unwrap_or(12),
            None => 12,
        }
        .min(split.len());
        for start in (0..k).step_by(64) {
            let len = 64.min(k - start);
            let got =
                ecic::decode::generate(&m, &split.images.narrow(0, start, len).unwrap(), &dc, 0)
                    .unwrap();
            for (j, g) in got.iter().enumerate() {
                let i = start + j;
                println!(
                    "  {} {} | {}",
                    split.ids[i],
                    tok.decode(g),
                    split.captions[i][0]
                );
            }
        }
    }
    for shift in [0usize, 1, 7] {
        let mut tot = 0.0;
        let reps = 3;
        for pick in 0..reps {
            let caps: Vec<&[u32]> = (0..n)
                .map(|r| {
                    let t = &split.tokens[r];
                    t[pick % t.len()].as_slice()
                })
                .collect();
            let TeacherForcing {
                input: inp,
                target: tgt,
                mask: msk,
                len: t,
            } = TeacherForcing::new(&cfg, &caps);
            let rows: Vec<u32> = (0..n).map(|r| ((r + shift) % n) as u32).collect();
            let img = split
                .images
                .index_select(&Tensor::new(rows, &Device::Cpu).unwrap(), 0)
                .unwrap();
            let inp = Tensor::from_vec(inp, (n, t), &Device::Cpu).unwrap();
            let tgt = Tensor::from_vec(tgt, (n, t), &Device::Cpu).unwrap();
            let msk = Tensor::from_vec(msk, (n, t), &Device::Cpu).unwrap();
            let l = m.loss(&img, &inp, &tgt, &msk, 0.0).unwrap();
            tot += l.to_scalar::<f32>().unwrap() as f64;
        }
        println!("{split_name} shift {shift}: loss {:.4}", tot / reps as f64);
    }
}
