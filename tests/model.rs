//! Model tests at the tiny preset: shapes and gradients for every backbone x fusion x PEFT,
//! LoRA identities, QLoRA tolerance, checkpoints, and layer numerics against a Python fixture
//! (`tests/fixtures/model_ops/make_fixture.py`).

mod common;
use candle_core::{backprop::GradStore, Device, Tensor, D};
use common::max_abs_diff;
use ecic::model::{
    ops, prompt_tensor, Backbone, Captioner, Component, Fusion, Inputs, ModelConfig, PeftConfig,
    PeftMethod, Phase, VitStem,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const V: usize = 64;

fn cfg(b: Backbone, f: Fusion) -> ModelConfig {
    let mut c = ModelConfig::tiny(b, f, V, 0, 1, 2);
    c.max_caption_len = 8;
    c.seed = 7;
    c
}

fn images(c: &ModelConfig, n: usize, seed: u64) -> Tensor {
    let s = c.input_size();
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let d: Vec<f32> = (0..n * 3 * s * s).map(|_| r.gen_range(-1.0..1.0)).collect();
    Tensor::from_vec(d, (n, 3, s, s), &Device::Cpu).unwrap()
}

fn batch(n: usize, t: usize, seed: u64) -> (Tensor, Tensor, Tensor) {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let cap: Vec<Vec<u32>> = (0..n)
        .map(|_| (0..t - 1).map(|_| r.gen_range(3..V as u32)).collect())
        .collect();
    let inp: Vec<u32> = cap
        .iter()
        .flat_map(|c| std::iter::once(1).chain(c.iter().copied()))
        .collect();
    let tgt: Vec<u32> = cap
        .iter()
        .flat_map(|c| c.iter().copied().chain(std::iter::once(2)))
        .collect();
    let dev = Device::Cpu;
    (
        Tensor::from_vec(inp, (n, t), &dev).unwrap(),
        Tensor::from_vec(tgt, (n, t), &dev).unwrap(),
        Tensor::ones((n, t), candle_core::DType::F32, &dev).unwrap(),
    )
}

fn align_ckpt(c: &ModelConfig, dir: &tempfile::TempDir) -> (Captioner, std::path::PathBuf) {
    let m = Captioner::new(c, &PeftConfig::full(), Phase::Align, &Device::Cpu).unwrap();
    let p = dir.path().join("align.safetensors");
    m.save_trained(&p).unwrap();
    (m, p)
}

fn adapt(c: &ModelConfig, peft: &PeftConfig, base: &std::path::Path) -> Captioner {
    let mut m = Captioner::new(c, peft, Phase::Adapt, &Device::Cpu).unwrap();
    m.load_base(base).unwrap();
    m
}

/// Sets every LoRA B / adapter up-projection to small random values so deltas are non-zero.
fn perturb_peft(m: &Captioner, seed: u64) {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    for tv in m.trainable_vars() {
        if tv.component == Component::Adapter {
            let n = tv.var.elem_count();
            let d: Vec<f32> = (0..n).map(|_| r.gen_range(-0.05..0.05)).collect();
            tv.var
                .set(&Tensor::from_vec(d, tv.var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}

fn check_grads(m: &Captioner, grads: &GradStore, what: &str) {
    let vars = m.trainable_vars();
    assert!(!vars.is_empty(), "{what}: nothing trainable");
    for tv in &vars {
        assert!(
            grads.get(tv.var.as_tensor()).is_some(),
            "{what}: {} received no gradient",
            tv.name
        );
    }
}

fn peft_methods() -> Vec<PeftConfig> {
    vec![
        PeftConfig::full(),
        PeftConfig::lora(4, 8.0),
        PeftConfig::qlora(4, 8.0),
        PeftConfig::adapter(8),
    ]
}

#[test]
fn every_pair_and_method_builds_trains_and_grads_reach_exactly_the_intended_params() {
    let dir = tempfile::tempdir().unwrap();
    for b in [Backbone::Blip2, Backbone::Llava, Backbone::Phi3v] {
        for f in [Fusion::Early, Fusion::Late, Fusion::Multilevel] {
            let c = cfg(b, f);
            let img = images(&c, 2, 1);
            let (inp, tgt, mask) = batch(2, 6, 2);
            let (align, base) = align_ckpt(&c, &dir);
            // Align (tiny, from scratch): everything trains, no PEFT tensors.
            let counts = align.counts();
            assert_eq!(counts.trainable, counts.total, "{b:?}/{f:?} align");
            let logits = align.logits(&img, &inp).unwrap();
            assert_eq!(logits.dims(), &[2, 6, V]);
            let loss = align.loss(&img, &inp, &tgt, &mask, 0.1).unwrap();
            check_grads(
                &align,
                &loss.backward().unwrap(),
                &format!("{b:?}/{f:?} align"),
            );
            for peft in peft_methods() {
                let what = format!("{b:?}/{f:?}/{:?}", peft.method);
                let m = adapt(&c, &peft, &base);
                for tv in m.trainable_vars() {
                    let ok = match (peft.method, tv.component) {
                        (_, Component::Connector) => true,
                        (PeftMethod::Full, Component::Lm) => true,
                        (PeftMethod::Lora | PeftMethod::Qlora, Component::Adapter) => {
                            tv.name.contains(".lora_")
                        }
                        (PeftMethod::Adapter, Component::Adapter) => tv.name.contains(".adapter_"),
                        _ => false,
                    };
                    assert!(
                        ok,
                        "{what}: {} ({:?}) should be frozen",
                        tv.name, tv.component
                    );
                    let matrix = tv.var.rank() == 2
                        && tv.name.ends_with(".weight")
                        && !tv.name.contains("embed_tokens");
                    assert_eq!(
                        tv.decay,
                        matrix || tv.name.contains("lora_"),
                        "{what}: decay flag of {}",
                        tv.name
                    );
                }
                let comps: Vec<Component> =
                    m.trainable_vars().iter().map(|t| t.component).collect();
                assert!(
                    comps.contains(&Component::Connector),
                    "{what}: connector must train"
                );
                assert!(
                    !comps.contains(&Component::Vision),
                    "{what}: vision must be frozen"
                );
                assert_eq!(
                    comps.contains(&Component::Lm),
                    peft.method == PeftMethod::Full,
                    "{what}: LM policy"
                );
                let loss = m.loss(&img, &inp, &tgt, &mask, 0.0).unwrap();
                assert!(loss.to_scalar::<f32>().unwrap().is_finite());
                check_grads(&m, &loss.backward().unwrap(), &what);
                if peft.method == PeftMethod::Qlora {
                    let c = m.counts();
                    let ratio = c.frozen_bytes as f64 / c.frozen_f32_bytes as f64;
                    assert!(ratio <= 0.30, "{what}: frozen base is {ratio:.3} of f32");
                }
            }
        }
    }
}

/// `model.stem = "conv"` and `"patch_conv"`: every backbone builds with the convolutional
/// stem, its stages get gradients in align, the token grid is the patch stem's, and a QLoRA
/// adapt stage over it trains, saves and reloads.
#[test]
fn conv_stems_build_train_and_keep_the_token_grid_for_every_backbone() {
    let dir = tempfile::tempdir().unwrap();
    let stems = [VitStem::Conv, VitStem::PatchConv];
    for (b, stem) in [Backbone::Blip2, Backbone::Llava, Backbone::Phi3v]
        .into_iter()
        .flat_map(|b| stems.map(|s| (b, s)))
    {
        let f = Fusion::Late;
        let patch =
            Captioner::new(&cfg(b, f), &PeftConfig::full(), Phase::Align, &Device::Cpu).unwrap();
        let mut c = cfg(b, f);
        c.vision.stem = stem;
        let img = images(&c, 2, 3);
        let (inp, tgt, mask) = batch(2, 6, 4);
        let (align, base) = align_ckpt(&c, &dir);
        let names: Vec<String> = align.trainable_vars().into_iter().map(|t| t.name).collect();
        // 64 px, patch 16: four 3x3 stages, or a 2x2 patchify stage and three; no patch
        // embedding.
        let convs = if stem == VitStem::Conv { 4 } else { 3 };
        assert_eq!(
            names.iter().any(|n| n == "vision.stem.patch.proj.weight"),
            stem == VitStem::PatchConv,
            "{b:?} {stem:?}"
        );
        assert!(!names
            .iter()
            .any(|n| n == &format!("vision.stem.{convs}.conv.weight")));
        for i in 0..convs {
            assert!(
                names
                    .iter()
                    .any(|n| n == &format!("vision.stem.{i}.conv.weight")),
                "{b:?}: stage {i} missing from {names:?}"
            );
        }
        assert!(!names.iter().any(|n| n.contains("patch_embed")), "{b:?}");
        let loss = align.loss(&img, &inp, &tgt, &mask, 0.0).unwrap();
        check_grads(
            &align,
            &loss.backward().unwrap(),
            &format!("{b:?} conv align"),
        );
        let vis = align.visual_tokens(&img, false).unwrap();
        let vis_patch = patch.visual_tokens(&img, false).unwrap();
        assert_eq!(vis.dims(), vis_patch.dims(), "{b:?}: same token grid");
        let m = adapt(&c, &PeftConfig::qlora(4, 8.0), &base);
        let loss = m.loss(&img, &inp, &tgt, &mask, 0.0).unwrap();
        check_grads(&m, &loss.backward().unwrap(), &format!("{b:?} conv qlora"));
        let p = dir.path().join("conv-adapt.safetensors");
        m.save_trained(&p).unwrap();
        let mut again = adapt(&c, &PeftConfig::qlora(4, 8.0), &base);
        again.load_trained(&p).unwrap();
        let d = max_abs_diff(
            &m.logits(&img, &inp).unwrap(),
            &again.logits(&img, &inp).unwrap(),
        );
        assert!(d == 0.0, "{b:?}: reload differs by {d}");
    }
}

/// `model.retrieve`: for every fusion the retrieved captions change the caption logits (the
/// decoder reads them), gradients reach every trainable tensor in align and LoRA adapt, the
/// left padding of shorter prompts is what `prompt_tensor` says, and a model built with
/// retrieval refuses inputs without prompts (and the other way round) with a clear error.
#[test]
fn retrieval_prompts_are_read_by_every_fusion_and_train() {
    let dir = tempfile::tempdir().unwrap();
    let p = prompt_tensor(&[&[5, 6, 2], &[7, 2]], 0, &Device::Cpu).unwrap();
    assert_eq!(
        p.to_vec2::<u32>().unwrap(),
        vec![vec![5, 6, 2], vec![0, 7, 2]]
    );
    for f in [Fusion::Early, Fusion::Late, Fusion::Multilevel] {
        let mut c = cfg(Backbone::Llava, f);
        c.retrieved = 2;
        let img = images(&c, 2, 3);
        let (inp, tgt, mask) = batch(2, 6, 4);
        let prompt = |ids: &[&[u32]]| {
            Inputs::new(
                img.clone(),
                Some(prompt_tensor(ids, 0, &Device::Cpu).unwrap()),
            )
        };
        let a = prompt(&[&[5, 6, 2, 9, 2], &[7, 2, 8, 2]]);
        let b = prompt(&[&[11, 12, 2, 13, 2], &[14, 2, 15, 2]]);
        let (align, base) = align_ckpt(&c, &dir);
        let la = align.logits(&a, &inp).unwrap();
        let lb = align.logits(&b, &inp).unwrap();
        assert_eq!(la.dims(), &[2, 6, V]);
        assert!(
            max_abs_diff(&la, &lb) > 1e-4,
            "{f:?}: the prompt is not read"
        );
        let loss = align.loss(&a, &inp, &tgt, &mask, 0.0).unwrap();
        check_grads(
            &align,
            &loss.backward().unwrap(),
            &format!("{f:?} retrieval align"),
        );
        let m = adapt(&c, &PeftConfig::lora(4, 8.0), &base);
        let loss = m.loss(&a, &inp, &tgt, &mask, 0.0).unwrap();
        check_grads(
            &m,
            &loss.backward().unwrap(),
            &format!("{f:?} retrieval lora"),
        );
        // log_probs (SCST) agrees with the teacher-forced loss on the same prompt.
        let seqs: Vec<Vec<u32>> = vec![vec![3, 4, 5], vec![6, 7]];
        let lp = m.log_probs(&a, &seqs, 1).unwrap().to_vec1::<f32>().unwrap();
        assert!(lp.iter().all(|v| v.is_finite() && *v < 0.0), "{lp:?}");
        let e = m
            .loss(&img, &inp, &tgt, &mask, 0.0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.retrieve") && e.contains("none were given"),
            "{e}"
        );
        let plain = Captioner::new(
            &cfg(Backbone::Llava, f),
            &PeftConfig::full(),
            Phase::Align,
            &Device::Cpu,
        )
        .unwrap();
        let e = plain
            .loss(&a, &inp, &tgt, &mask, 0.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("without model.retrieve"), "{e}");
        let long = Tensor::zeros(
            (2, c.prompt_len() + 1),
            candle_core::DType::U32,
            &Device::Cpu,
        )
        .unwrap();
        let e = m
            .logits(Inputs::new(img.clone(), Some(long)), &inp)
            .unwrap_err()
            .to_string();
        assert!(e.contains("prompt ids"), "{e}");
    }
}

#[test]
fn vision_lora_policy_adds_lora_to_encoder_attention_only() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(Backbone::Llava, Fusion::Early);
    let (_, base) = align_ckpt(&c, &dir);
    let peft = PeftConfig {
        vision: ecic::model::VisionPolicy::Lora,
        ..PeftConfig::lora(4, 8.0)
    };
    let m = adapt(&c, &peft, &base);
    let vis: Vec<String> = m
        .trainable_vars()
        .into_iter()
        .map(|t| t.name)
        .filter(|n| n.starts_with("vision."))
        .collect();
    assert!(!vis.is_empty());
    assert!(
        vis.iter()
            .all(|n| n.contains(".attn.") && n.contains(".lora_")),
        "{vis:?}"
    );
    let img = images(&c, 2, 1);
    let (inp, tgt, mask) = batch(2, 5, 2);
    check_grads(
        &m,
        &m.loss(&img, &inp, &tgt, &mask, 0.0)
            .unwrap()
            .backward()
            .unwrap(),
        "vision lora",
    );
}

#[test]
fn modules_to_save_train_embeddings_and_head_in_full_and_keep_them_unquantized() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(Backbone::Llava, Fusion::Late);
    let (_, base) = align_ckpt(&c, &dir);
    let saved = ["lm.embed_tokens.weight", "lm.lm_head.weight"];
    for peft in [
        PeftConfig::lora(4, 8.0),
        PeftConfig::qlora(4, 8.0),
        PeftConfig::adapter(8),
    ] {
        let what = format!("{:?}", peft.method);
        let plain = adapt(&c, &peft, &base);
        let names: Vec<String> = plain.trainable_vars().into_iter().map(|t| t.name).collect();
        assert!(
            saved.iter().all(|s| !names.iter().any(|n| n == s)),
            "{what}: base modules train without modules_to_save: {names:?}"
        );
        let peft = PeftConfig {
            modules_to_save: vec!["embed_tokens".into(), "lm_head".into()],
            ..peft
        };
        let m = adapt(&c, &peft, &base);
        let vars = m.trainable_vars();
        let names: Vec<&str> = vars.iter().map(|t| t.name.as_str()).collect();
        for s in saved {
            assert!(names.contains(&s), "{what}: {s} not trainable: {names:?}");
        }
        // Nothing else of the LM base became trainable.
        assert_eq!(
            names.len(),
            plain.trainable_vars().len() + 2,
            "{what}: {names:?}"
        );
        let img = images(&c, 2, 1);
        let (inp, tgt, mask) = batch(2, 5, 2);
        let grads = m
            .loss(&img, &inp, &tgt, &mask, 0.0)
            .unwrap()
            .backward()
            .unwrap();
        check_grads(&m, &grads, &what);
        // QLoRA keeps the trained head in f32: more frozen bytes are 4-bit without it.
        if peft.method == ecic::model::PeftMethod::Qlora {
            let q = plain.counts().frozen_bytes;
            let f = m.counts().frozen_bytes;
            assert!(
                f < q,
                "{what}: frozen bytes {f} vs {q} without modules_to_save"
            );
        }
        // The trained copies are saved and load back into a fresh model of the same config.
        let p = dir.path().join(format!("{what}.safetensors"));
        m.save_trained(&p).unwrap();
        let mut again = adapt(&c, &peft, &base);
        again.load_trained(&p).unwrap();
        let l1 = m
            .loss(&img, &inp, &tgt, &mask, 0.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let l2 = again
            .loss(&img, &inp, &tgt, &mask, 0.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l1 - l2).abs() < 1e-6, "{what}: {l1} vs {l2}");
    }
}

#[test]
fn lora_with_zero_b_equals_base_and_merged_equals_unmerged() {
    let dir = tempfile::tempdir().unwrap();
    for (b, f) in [
        (Backbone::Blip2, Fusion::Late),
        (Backbone::Phi3v, Fusion::Multilevel),
        (Backbone::Llava, Fusion::Early),
    ] {
        let c = cfg(b, f);
        let (align, base) = align_ckpt(&c, &dir);
        let img = images(&c, 2, 3);
        let (inp, _, _) = batch(2, 7, 4);
        let want = align.logits(&img, &inp).unwrap();
        let m = adapt(&c, &PeftConfig::lora(4, 8.0), &base);
        let got = m.logits(&img, &inp).unwrap();
        assert!(
            max_abs_diff(&want, &got) < 1e-6,
            "{b:?}/{f:?}: B=0 LoRA differs from base"
        );
        perturb_peft(&m, 9);
        let unmerged = m.logits(&img, &inp).unwrap();
        assert!(
            max_abs_diff(&want, &unmerged) > 1e-3,
            "perturbation must change the output"
        );
        let merged = m.inference().unwrap().logits(&img, &inp).unwrap();
        let d = max_abs_diff(&merged, &unmerged);
        assert!(d < 1e-5, "{b:?}/{f:?}: merged vs unmerged differ by {d}");
        // Adapters start as the identity too.
        let a = adapt(&c, &PeftConfig::adapter(8), &base);
        assert!(max_abs_diff(&want, &a.logits(&img, &inp).unwrap()) < 1e-6);
    }
}

#[test]
fn qlora_forward_is_close_to_f32_base() {
    // Q4_0 keeps 16 levels per block of 32 weights: for uniformly initialised weights that is
    // ~6% RMS error per weight (the per-linear bound is a unit test in src/model/linear.rs),
    // and every frozen linear on the path (patch embedding, encoder, LM, lm_head: ~12 of them)
    // adds its own, so about sqrt(12)*6% ~ 21% end to end. Stated tolerance for the whole
    // model: relative L2 error of the logits <= 30%, and it must not be zero.
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(Backbone::Llava, Fusion::Early);
    let (align, base) = align_ckpt(&c, &dir);
    let img = images(&c, 2, 5);
    let (inp, _, _) = batch(2, 7, 6);
    let want = align.logits(&img, &inp).unwrap();
    let q = adapt(&c, &PeftConfig::qlora(4, 8.0), &base);
    let got = q.logits(&img, &inp).unwrap();
    let norm = |t: &Tensor| -> f32 {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let rel = norm(&(&want - &got).unwrap()) / norm(&want);
    eprintln!("qlora vs f32 logits: relative L2 error {rel:.4}");
    assert!(rel > 0.0 && rel <= 0.30, "relative L2 error {rel}");
    let counts = q.counts();
    eprintln!("qlora counts: {counts:?}");
}

#[test]
fn save_then_load_rebuilds_identical_outputs() {
    let dir = tempfile::tempdir().unwrap();
    for peft in [
        PeftConfig::lora(4, 8.0),
        PeftConfig::qlora(4, 8.0),
        PeftConfig::adapter(8),
        PeftConfig::full(),
    ] {
        let c = cfg(Backbone::Blip2, Fusion::Multilevel);
        let (_, base) = align_ckpt(&c, &dir);
        let m = adapt(&c, &peft, &base);
        perturb_peft(&m, 11);
        // Nudge the connector too (trained in every adapt stage).
        for tv in m
            .trainable_vars()
            .iter()
            .filter(|t| t.component == Component::Connector)
        {
            tv.var.set(&(tv.var.as_tensor() + 0.01).unwrap()).unwrap();
        }
        let p = dir.path().join("adapt.safetensors");
        m.save_trained(&p).unwrap();
        let mut again = adapt(&c, &peft, &base);
        again.load_trained(&p).unwrap();
        let img = images(&c, 2, 12);
        let (inp, _, _) = batch(2, 6, 13);
        assert_eq!(
            max_abs_diff(
                &m.logits(&img, &inp).unwrap(),
                &again.logits(&img, &inp).unwrap()
            ),
            0.0,
            "{:?}",
            peft.method
        );
    }
}

#[test]
fn bad_checkpoints_and_inputs_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(Backbone::Llava, Fusion::Late);
    let (_, base) = align_ckpt(&c, &dir);
    let other = cfg(Backbone::Blip2, Fusion::Late);
    let mut m = Captioner::new(
        &other,
        &PeftConfig::lora(4, 8.0),
        Phase::Adapt,
        &Device::Cpu,
    )
    .unwrap();
    let e = m.load_base(&base).unwrap_err().to_string();
    assert!(e.contains("align.safetensors"), "{e}");
    let e = m
        .load_base(&dir.path().join("missing.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.safetensors"), "{e}");
    let wrong = Tensor::zeros((1, 3, 32, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    let (inp, _, _) = batch(1, 4, 1);
    assert!(m.logits(&wrong, &inp).is_err());
    let mut bad = cfg(Backbone::Phi3v, Fusion::Late);
    bad.lm.heads = 3;
    bad.fusion_opts.late_layers = 9;
    let e = Captioner::new(&bad, &PeftConfig::full(), Phase::Align, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lm.heads") && e.contains("late_layers"), "{e}");
}

#[test]
fn log_probs_match_loss_and_carry_gradients() {
    let c = cfg(Backbone::Phi3v, Fusion::Early);
    let m = Captioner::new(&c, &PeftConfig::full(), Phase::Align, &Device::Cpu).unwrap();
    let img = images(&c, 2, 21);
    let seqs = vec![vec![5, 6, 7], vec![8], vec![9, 10], vec![]];
    let lp = m.log_probs(&img, &seqs, 2).unwrap();
    assert_eq!(lp.dims(), &[4]);
    // Reference: per-caption sum from the teacher-forced loss of that caption alone.
    let lpv: Vec<f32> = lp.to_vec1().unwrap();
    for (i, s) in seqs.iter().enumerate() {
        let one = img.narrow(0, i / 2, 1).unwrap();
        let inp: Vec<u32> = std::iter::once(1).chain(s.iter().copied()).collect();
        let tgt: Vec<u32> = s.iter().copied().chain(std::iter::once(2)).collect();
        let n = inp.len();
        let inp = Tensor::from_vec(inp, (1, n), &Device::Cpu).unwrap();
        let tgt = Tensor::from_vec(tgt, (1, n), &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, n), candle_core::DType::F32, &Device::Cpu).unwrap();
        let mean_nll: f32 = m
            .loss(&one, &inp, &tgt, &mask, 0.0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(
            (lpv[i] + mean_nll * n as f32).abs() < 1e-3,
            "seq {i}: {} vs {}",
            lpv[i],
            -mean_nll * n as f32
        );
    }
    check_grads(&m, &lp.sum_all().unwrap().backward().unwrap(), "log_probs");
}

fn load_fixture() -> serde_json::Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/model_ops/ops.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn tensor(v: &serde_json::Value, key: &str, shape: &[usize]) -> Tensor {
    let d: Vec<f32> = v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    Tensor::from_vec(d, shape, &Device::Cpu).unwrap()
}

#[test]
fn ops_match_reference() {
    let f = load_fixture();
    let x = tensor(&f, "norm_x", &[2, 6]);
    let w = tensor(&f, "norm_w", &[6]);
    let b = tensor(&f, "norm_b", &[6]);
    let tol = 2e-5;
    assert!(
        max_abs_diff(
            &ops::rms_norm(&x, &w, 1e-5).unwrap(),
            &tensor(&f, "rms_norm", &[2, 6])
        ) < tol
    );
    assert!(
        max_abs_diff(
            &ops::layer_norm(&x, &w, &b, 1e-5).unwrap(),
            &tensor(&f, "layer_norm", &[2, 6])
        ) < tol
    );
    let sh = [1, 2, 3, 4];
    let (q, k, v) = (
        tensor(&f, "q", &sh),
        tensor(&f, "k", &sh),
        tensor(&f, "v", &sh),
    );
    let rope = ops::Rope::new(4, 16, 10_000.0, &Device::Cpu).unwrap();
    let off = f["rope_offset"].as_u64().unwrap() as usize;
    assert!(max_abs_diff(&rope.apply(&q, off).unwrap(), &tensor(&f, "rope_q", &sh)) < tol);
    let mask = ops::causal_mask(3, 3, &Device::Cpu).unwrap();
    assert!(
        max_abs_diff(
            &ops::attention(&q, &k, &v, Some(&mask)).unwrap(),
            &tensor(&f, "attention", &sh)
        ) < tol
    );
    let l = tensor(&f, "logits", &[2, 5]);
    assert!(
        max_abs_diff(
            &ops::log_softmax_last(&l).unwrap(),
            &tensor(&f, "log_softmax", &[2, 5])
        ) < tol
    );
    // The same ops must be differentiable (candle's fused forms are not).
    let xv = candle_core::Var::from_tensor(&x).unwrap();
    let y = ops::rms_norm(xv.as_tensor(), &w, 1e-5).unwrap();
    let y = ops::softmax_last(&rope.apply(&y.reshape((1, 1, 3, 4)).unwrap(), 2).unwrap()).unwrap();
    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let gx = g
        .get(xv.as_tensor())
        .expect("gradient through rms_norm/rope/softmax");
    assert!(
        gx.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
    let _ = D::Minus1;
}

/// The fused ops (own backward) against their basic-op forms: values and input gradients.
#[test]
fn fused_ops_match_composed_values_and_gradients() {
    use candle_core::Var;
    let mut r = ChaCha8Rng::seed_from_u64(31);
    let mut rand = |shape: &[usize]| -> Tensor {
        let n = shape.iter().product();
        let d: Vec<f32> = (0..n).map(|_| r.gen_range(-2.0..2.0)).collect();
        Tensor::from_vec(d, shape, &Device::Cpu).unwrap()
    };
    let grads = |f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor, w: &Tensor| -> (Tensor, Tensor) {
        let xv = Var::from_tensor(x).unwrap();
        let y = f(xv.as_tensor());
        // A non-uniform weighting so every output element's gradient matters.
        let g = (y.mul(w).unwrap()).sum_all().unwrap().backward().unwrap();
        (y, g.get(xv.as_tensor()).unwrap().clone())
    };
    let check = |what: &str,
                 fused: &dyn Fn(&Tensor) -> Tensor,
                 comp: &dyn Fn(&Tensor) -> Tensor,
                 x: &Tensor,
                 w: &Tensor| {
        let (yf, gf) = grads(fused, x, w);
        let (yc, gc) = grads(comp, x, w);
        let (dy, dg) = (max_abs_diff(&yf, &yc), max_abs_diff(&gf, &gc));
        assert!(
            dy < 1e-5 && dg < 1e-4,
            "{what}: value diff {dy}, gradient diff {dg}"
        );
    };
    // A small case, and one large enough (40,960 floats) for the ops' row loops to run on the
    // rayon pool when there is more than one thread.
    for shape in [[3usize, 5, 8], [4, 64, 160]] {
        let x = rand(&shape);
        let w8 = rand(&shape[2..]);
        let b8 = rand(&shape[2..]);
        let wy = rand(&shape);
        check(
            "softmax",
            &|x| ops::softmax_last(x).unwrap(),
            &|x| ops::composed::softmax_last(x).unwrap(),
            &x,
            &wy,
        );
        check(
            "rms_norm",
            &|x| ops::rms_norm(x, &w8, 1e-5).unwrap(),
            &|x| ops::composed::rms_norm(x, &w8, 1e-5).unwrap(),
            &x,
            &wy,
        );
        check(
            "layer_norm",
            &|x| ops::layer_norm(x, &w8, &b8, 1e-5).unwrap(),
            &|x| ops::composed::layer_norm(x, &w8, &b8, 1e-5).unwrap(),
            &x,
            &wy,
        );
        check(
            "gelu",
            &|x| ops::gelu(x).unwrap(),
            &|x| x.gelu().unwrap(),
            &x,
            &wy,
        );
        let w4 = rand(&[shape[0], shape[1], shape[2] / 2]);
        check(
            "swiglu",
            &|x| ops::swiglu(x).unwrap(),
            &|x| ops::composed::swiglu(x).unwrap(),
            &x,
            &w4,
        );
        // Weight gradients of the norms.
        for ln in [false, true] {
            let wv = Var::from_tensor(&w8).unwrap();
            let bv = Var::from_tensor(&b8).unwrap();
            let run = |fused: bool| -> (Tensor, Tensor) {
                let y = match (ln, fused) {
                    (false, true) => ops::rms_norm(&x, wv.as_tensor(), 1e-5),
                    (false, false) => ops::composed::rms_norm(&x, wv.as_tensor(), 1e-5),
                    (true, true) => ops::layer_norm(&x, wv.as_tensor(), bv.as_tensor(), 1e-5),
                    (true, false) => {
                        ops::composed::layer_norm(&x, wv.as_tensor(), bv.as_tensor(), 1e-5)
                    }
                }
                .unwrap();
                let g = y.mul(&wy).unwrap().sum_all().unwrap().backward().unwrap();
                let gb = if ln {
                    g.get(bv.as_tensor()).unwrap().clone()
                } else {
                    w8.zeros_like().unwrap()
                };
                (g.get(wv.as_tensor()).unwrap().clone(), gb)
            };
            let ((wf, bf), (wc, bc)) = (run(true), run(false));
            assert!(
                max_abs_diff(&wf, &wc) < 1e-4 && max_abs_diff(&bf, &bc) < 1e-4,
                "norm weight grads (ln {ln})"
            );
        }
    }
    // Attention with a causal mask (scale + mask + softmax fused) and RoPE.
    let (q, k, v) = (
        rand(&[2, 2, 4, 6]),
        rand(&[2, 2, 4, 6]),
        rand(&[2, 2, 4, 6]),
    );
    let mask = ops::causal_mask(4, 4, &Device::Cpu).unwrap();
    let wa = rand(&[2, 2, 4, 6]);
    check(
        "attention",
        &|q| ops::attention(q, &k, &v, Some(&mask)).unwrap(),
        &|q| ops::composed::attention(q, &k, &v, Some(&mask)).unwrap(),
        &q,
        &wa,
    );
    let rope = ops::Rope::new(6, 16, 10_000.0, &Device::Cpu).unwrap();
    let rope_ref = |x: &Tensor| -> Tensor {
        // Independent form: rotate each (x_i, x_{i+3}) pair by its angle with basic ops.
        let (half, t, off) = (3, 4, 5);
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        for p in off..off + t {
            for i in 0..half {
                let a = p as f64 / 10_000f64.powf(2.0 * i as f64 / 6.0);
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        let cos = Tensor::from_vec(cos, (t, half), &Device::Cpu).unwrap();
        let sin = Tensor::from_vec(sin, (t, half), &Device::Cpu).unwrap();
        let x1 = x.narrow(3, 0, half).unwrap();
        let x2 = x.narrow(3, half, half).unwrap();
        let y1 = (x1.broadcast_mul(&cos).unwrap() - x2.broadcast_mul(&sin).unwrap()).unwrap();
        let y2 = (x2.broadcast_mul(&cos).unwrap() + x1.broadcast_mul(&sin).unwrap()).unwrap();
        Tensor::cat(&[y1, y2], 3).unwrap()
    };
    check("rope", &|x| rope.apply(x, 5).unwrap(), &rope_ref, &q, &wa);
    // Cross-entropy with smoothing and a partial mask.
    let logits = rand(&[6, 7]);
    let tg = Tensor::from_vec(vec![0u32, 3, 6, 2, 2, 5], 6, &Device::Cpu).unwrap();
    let mk = Tensor::from_vec(vec![1f32, 1., 0., 1., 1., 0.], 6, &Device::Cpu).unwrap();
    let one = Tensor::ones((), candle_core::DType::F32, &Device::Cpu).unwrap();
    for sm in [0.0, 0.1] {
        check(
            "cross_entropy",
            &|x| ops::cross_entropy(x, &tg, &mk, sm).unwrap(),
            &|x| ops::composed::cross_entropy(x, &tg, &mk, sm).unwrap(),
            &logits,
            &one,
        );
    }
    // Large enough (64 x 600) for the row loops to run on the rayon pool.
    let logits = rand(&[64, 600]);
    let tg = Tensor::from_vec((0..64u32).map(|i| i * 9 % 600).collect(), 64, &Device::Cpu).unwrap();
    let mk = Tensor::from_vec(
        (0..64).map(|i| (i % 5 != 0) as u8 as f32).collect(),
        64,
        &Device::Cpu,
    )
    .unwrap();
    check(
        "cross_entropy (large)",
        &|x| ops::cross_entropy(x, &tg, &mk, 0.1).unwrap(),
        &|x| ops::composed::cross_entropy(x, &tg, &mk, 0.1).unwrap(),
        &logits,
        &one,
    );
}

/// The fused linear and self-attention kernels (own backward, direct gemm) against the
/// composed forms: values and the gradients of every tracked argument.
#[test]
fn fused_kernels_match_composed_values_and_gradients() {
    use candle_core::Var;
    use ecic::model::kernels;
    let mut r = ChaCha8Rng::seed_from_u64(41);
    let mut rand = |shape: &[usize]| -> Tensor {
        let n = shape.iter().product();
        let d: Vec<f32> = (0..n).map(|_| r.gen_range(-2.0..2.0)).collect();
        Tensor::from_vec(d, shape, &Device::Cpu).unwrap()
    };
    // Linear, with and without bias, rank-3 input.
    let (x, w, b, wy) = (
        rand(&[3, 5, 7]),
        rand(&[4, 7]),
        rand(&[4]),
        rand(&[3, 5, 4]),
    );
    for bias in [false, true] {
        let run = |fused: bool| -> Vec<Tensor> {
            let (xv, wv, bv) = (
                Var::from_tensor(&x).unwrap(),
                Var::from_tensor(&w).unwrap(),
                Var::from_tensor(&b).unwrap(),
            );
            let bt = bias.then(|| bv.as_tensor());
            let y = if fused {
                kernels::linear(xv.as_tensor(), wv.as_tensor(), bt).unwrap()
            } else {
                let y = xv
                    .as_tensor()
                    .broadcast_matmul(&wv.as_tensor().t().unwrap())
                    .unwrap();
                match bt {
                    Some(bt) => y.broadcast_add(bt).unwrap(),
                    None => y,
                }
            };
            let g = y.mul(&wy).unwrap().sum_all().unwrap().backward().unwrap();
            let mut out = vec![
                y,
                g.get(xv.as_tensor()).unwrap().clone(),
                g.get(wv.as_tensor()).unwrap().clone(),
            ];
            if bias {
                out.push(g.get(bv.as_tensor()).unwrap().clone());
            }
            out
        };
        let (f, c) = (run(true), run(false));
        for (i, (a, e)) in f.iter().zip(&c).enumerate() {
            let d = max_abs_diff(a, e);
            assert!(d < 1e-4, "linear (bias {bias}) output {i}: diff {d}");
        }
    }
    // A frozen (untracked) weight gets no gradient, the input still does.
    let xv = Var::from_tensor(&x).unwrap();
    let y = kernels::linear(xv.as_tensor(), &w, None).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(&w).is_none() && g.get(xv.as_tensor()).is_some());

    // Self-attention from a fused qkv (B=2, T=5, 3 x W, W = 2 heads x 6), with RoPE + causal
    // mask (decoder) and without either (encoder), against split -> rope -> attention -> merge.
    let (bsz, t, heads, d) = (2, 5, 2, 6);
    let w = heads * d;
    let qkv = rand(&[bsz, t, 3 * w]);
    let wy = rand(&[bsz, t, w]);
    let rope = ops::Rope::new(d, 16, 10_000.0, &Device::Cpu).unwrap();
    for decoder in [false, true] {
        let fused = |x: &Tensor| -> Tensor {
            kernels::self_attention(x, heads, decoder, decoder.then(|| rope.tables())).unwrap()
        };
        let composed = |x: &Tensor| -> Tensor {
            let part = |i: usize| ops::split_heads(&x.narrow(2, i * w, w).unwrap(), heads).unwrap();
            let (mut q, mut k, v) = (part(0), part(1), part(2));
            let mask = ops::causal_mask(t, t, &Device::Cpu).unwrap();
            if decoder {
                q = rope.apply(&q, 0).unwrap();
                k = rope.apply(&k, 0).unwrap();
            }
            let a = ops::composed::attention(&q, &k, &v, decoder.then_some(&mask)).unwrap();
            ops::merge_heads(&a).unwrap()
        };
        let grad = |f: &dyn Fn(&Tensor) -> Tensor| -> (Tensor, Tensor) {
            let xv = Var::from_tensor(&qkv).unwrap();
            let y = f(xv.as_tensor());
            let g = y.mul(&wy).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g.get(xv.as_tensor()).unwrap().clone())
        };
        let ((yf, gf), (yc, gc)) = (grad(&fused), grad(&composed));
        let (dy, dg) = (max_abs_diff(&yf, &yc), max_abs_diff(&gf, &gc));
        assert!(
            dy < 1e-5 && dg < 1e-4,
            "self_attention (decoder {decoder}): value diff {dy}, gradient diff {dg}"
        );
    }
}

#[test]
fn cached_decoding_attention_matches_full_causal_attention_and_reorders_rows() {
    use ecic::model::kernels::{self, KvCache};
    let mut r = ChaCha8Rng::seed_from_u64(43);
    let (n, t, heads, d, prefix) = (3, 7, 2, 6, 4);
    let w = heads * d;
    let data: Vec<f32> = (0..n * t * 3 * w).map(|_| r.gen_range(-2.0..2.0)).collect();
    let qkv = Tensor::from_vec(data, (n, t, 3 * w), &Device::Cpu).unwrap();
    let rope = ops::Rope::new(d, 16, 10_000.0, &Device::Cpu).unwrap();
    let (cos, sin) = rope.tables();
    let tables = (&cos[..], &sin[..]);
    let full = kernels::self_attention(&qkv, heads, true, Some(rope.tables())).unwrap();
    // A prefix of 4 positions in one call, then one position per call, into a cache with room
    // to spare: every output row equals the full causal attention at that position.
    let mut cache = KvCache::new(n, heads, d, 10);
    let mut parts = vec![kernels::cached_attention(
        &qkv.narrow(1, 0, prefix).unwrap(),
        heads,
        tables,
        &mut cache,
    )
    .unwrap()];
    for p in prefix..t {
        parts.push(
            kernels::cached_attention(&qkv.narrow(1, p, 1).unwrap(), heads, tables, &mut cache)
                .unwrap(),
        );
    }
    assert_eq!(cache.len(), t);
    let cached = Tensor::cat(&parts, 1).unwrap();
    let diff = max_abs_diff(&cached, &full);
    assert!(diff < 1e-5, "cached vs full attention: {diff}");

    // Reordering (with a repeated row and a dropped one) after the prefix equals decoding the
    // reordered rows from the start.
    let idx = [2u32, 0, 2];
    let sel = Tensor::from_vec(idx.to_vec(), 3, &Device::Cpu).unwrap();
    let qkv2 = qkv.index_select(&sel, 0).unwrap();
    let full2 = kernels::self_attention(&qkv2, heads, true, Some(rope.tables())).unwrap();
    let mut cache = KvCache::new(n, heads, d, 10);
    kernels::cached_attention(
        &qkv.narrow(1, 0, prefix).unwrap(),
        heads,
        tables,
        &mut cache,
    )
    .unwrap();
    cache.select(&idx).unwrap();
    let mut parts = Vec::new();
    for p in prefix..t {
        parts.push(
            kernels::cached_attention(&qkv2.narrow(1, p, 1).unwrap(), heads, tables, &mut cache)
                .unwrap(),
        );
    }
    let tail = Tensor::cat(&parts, 1).unwrap();
    let diff = max_abs_diff(&tail, &full2.narrow(1, prefix, t - prefix).unwrap());
    assert!(diff < 1e-5, "reordered cache: {diff}");

    // Misuse is an error: a row index past the cache, a step past its capacity.
    assert!(cache.select(&[3]).is_err());
    let mut small = KvCache::new(n, heads, d, 2);
    assert!(
        kernels::cached_attention(&qkv.narrow(1, 0, 3).unwrap(), heads, tables, &mut small)
            .is_err()
    );
}

/// The 4-bit linear (QLoRA's frozen base) computes what the dense linear computes on the
/// dequantized weight, forward and input gradient alike, although it keeps no f32 weight
/// between them.
#[test]
fn quantized_linear_matches_the_dense_linear_on_its_dequantized_weight() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use ecic::model::kernels;
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect() };
    let w = Tensor::from_vec(rand(48 * 64), (48, 64), &dev).unwrap();
    let q = std::sync::Arc::new(QTensor::quantize(&w, GgmlDType::Q4_0).unwrap());
    let wd = q.dequantize(&dev).unwrap();
    let b = Tensor::from_vec(rand(48), 48, &dev).unwrap();
    let x = candle_core::Var::from_vec(rand(2 * 5 * 64), (2, 5, 64), &dev).unwrap();
    let g = Tensor::from_vec(rand(2 * 5 * 48), (2, 5, 48), &dev).unwrap();
    let run = |y: Tensor| -> (Tensor, Tensor) {
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        (y, grads.get(x.as_tensor()).unwrap().clone())
    };
    let (yq, dq) = run(kernels::quant_linear(x.as_tensor(), &q, Some(&b)).unwrap());
    let (yd, dd) = run(kernels::linear(x.as_tensor(), &wd, Some(&b)).unwrap());
    assert!(max_abs_diff(&yq, &yd) < 1e-5);
    assert!(max_abs_diff(&dq, &dd) < 1e-5);
    // The quantization itself is visible: the test compares against the 4-bit weight.
    assert!(max_abs_diff(&wd, &w) > 1e-3);
}

/// The fused LoRA linear against its composed form (base product + scaled low-rank delta, as
/// separate ops), on an f32 and on a 4-bit base, with and without bias: the same values and the
/// same gradients for the input and both factors, to the bit (the op repeats the composed
/// form's arithmetic step for step). A non-zero B, so that the low-rank path carries gradient.
#[test]
fn fused_lora_linear_matches_the_composed_form() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Var;
    use ecic::model::kernels;
    use ecic::model::lora_linear::{lora_linear, FrozenBase};
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let mut rand = |shape: &[usize]| -> Tensor {
        let n = shape.iter().product();
        let d: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        Tensor::from_vec(d, shape, &dev).unwrap()
    };
    let (inp, out, r, scale) = (64, 48, 4, 2.0);
    let (x, w, b) = (rand(&[2, 5, inp]), rand(&[out, inp]), rand(&[out]));
    let (a, bb, wy) = (rand(&[r, inp]), rand(&[out, r]), rand(&[2, 5, out]));
    let q = std::sync::Arc::new(QTensor::quantize(&w, GgmlDType::Q4_0).unwrap());
    for quant in [false, true] {
        for bias in [false, true] {
            let base = if quant {
                FrozenBase::Quant(q.clone())
            } else {
                FrozenBase::Dense(w.clone())
            };
            let bias = bias.then_some(&b);
            let run = |fused: bool| -> Vec<Tensor> {
                let (xv, av, bv) = (
                    Var::from_tensor(&x).unwrap(),
                    Var::from_tensor(&a).unwrap(),
                    Var::from_tensor(&bb).unwrap(),
                );
                let y = if fused {
                    lora_linear(xv.as_tensor(), &base, bias, &av, &bv, scale).unwrap()
                } else {
                    let y = match &base {
                        FrozenBase::Dense(w) => kernels::linear(&xv, w, bias).unwrap(),
                        FrozenBase::Quant(q) => kernels::quant_linear(&xv, q, bias).unwrap(),
                    };
                    let h = kernels::linear(&xv, &av, None).unwrap();
                    let d = kernels::linear(&h, &bv, None).unwrap();
                    (y + (d * scale).unwrap()).unwrap()
                };
                let g = y.mul(&wy).unwrap().sum_all().unwrap().backward().unwrap();
                vec![
                    y,
                    g.get(&xv).unwrap().clone(),
                    g.get(&av).unwrap().clone(),
                    g.get(&bv).unwrap().clone(),
                ]
            };
            let (f, c) = (run(true), run(false));
            for (i, what) in ["output", "dx", "dA", "dB"].iter().enumerate() {
                let d = max_abs_diff(&f[i], &c[i]);
                assert_eq!(
                    d,
                    0.0,
                    "{what} (4-bit base {quant}, bias {}): diff {d}",
                    bias.is_some()
                );
            }
        }
    }
    // A trained base is refused: the op computes no gradient for it.
    let wv = Var::from_tensor(&w).unwrap();
    let e = lora_linear(
        &x,
        &FrozenBase::Dense(wv.as_tensor().clone()),
        None,
        &a,
        &bb,
        scale,
    );
    assert!(e.is_err());
}

/// A 4-bit weight larger than one dequantization block (4M values) is multiplied block by
/// block of output rows, forward and backward; the result is the product with the whole
/// dequantized weight up to the order of float additions.
#[test]
fn large_quantized_linear_is_multiplied_in_blocks() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use ecic::model::kernels;
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect() };
    // 4,160 x 1,024 = 4.26M values: one block of 4,096 rows and one of 64.
    let (out, inp) = (4160, 1024);
    let w = Tensor::from_vec(rand(out * inp), (out, inp), &dev).unwrap();
    let q = std::sync::Arc::new(QTensor::quantize(&w, GgmlDType::Q4_0).unwrap());
    let wd = q.dequantize(&dev).unwrap();
    let x = candle_core::Var::from_vec(rand(3 * inp), (3, inp), &dev).unwrap();
    let g = Tensor::from_vec(rand(3 * out), (3, out), &dev).unwrap();
    let run = |y: Tensor| -> (Tensor, Tensor) {
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        (y, grads.get(x.as_tensor()).unwrap().clone())
    };
    let (yq, dq) = run(kernels::quant_linear(x.as_tensor(), &q, None).unwrap());
    let (yd, dd) = run(kernels::linear(x.as_tensor(), &wd, None).unwrap());
    // Values of magnitude ~10-30 (sums of 1,024 or 4,160 products).
    assert!(max_abs_diff(&yq, &yd) < 1e-3, "{}", max_abs_diff(&yq, &yd));
    assert!(max_abs_diff(&dq, &dd) < 1e-3, "{}", max_abs_diff(&dq, &dd));
    assert!(
        max_abs_diff(
            &yd,
            &Tensor::zeros((3, out), candle_core::DType::F32, &dev).unwrap()
        ) > 1.0
    );
}

/// A QLoRA base holds its frozen token-embedding table in bf16 when every value is exactly a
/// bf16 value (as a bf16 checkpoint's are): half the bytes, and the same lookups, so the same
/// logits as the same model with that table as an f32 trained copy (`modules_to_save`). A table
/// that is not exactly bf16 (the tiny presets' trained ones) stays f32.
#[test]
fn qlora_holds_an_exactly_bf16_embedding_table_in_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(Backbone::Llava, Fusion::Early);
    let (_, base) = align_ckpt(&c, &dir);
    let mut tensors = candle_core::safetensors::load(&base, &Device::Cpu).unwrap();
    let key = "lm.embed_tokens.weight";
    let table = &tensors[key];
    let rounded = table
        .to_dtype(candle_core::DType::BF16)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap();
    assert!(
        max_abs_diff(&rounded, table) > 0.0,
        "the f32 table was bf16 already"
    );
    tensors.insert(key.into(), rounded);
    let bf16_base = dir.path().join("bf16-embed.safetensors");
    candle_core::safetensors::save(&tensors, &bf16_base).unwrap();

    let qlora = PeftConfig::qlora(4, 8.0);
    let f32_table = adapt(&c, &qlora, &base);
    let half_table = adapt(&c, &qlora, &bf16_base);
    let table_elems = c.vocab_size * c.lm.width;
    assert_eq!(
        f32_table.counts().frozen_bytes - half_table.counts().frozen_bytes,
        2 * table_elems,
        "the exactly-bf16 table is held in 2 bytes a value, the other in 4"
    );
    let trained_copy = adapt(
        &c,
        &PeftConfig {
            modules_to_save: vec!["embed_tokens".into()],
            ..qlora.clone()
        },
        &bf16_base,
    );
    let img = images(&c, 2, 3);
    let (inp, _, _) = batch(2, 5, 4);
    let a = half_table.logits(&img, &inp).unwrap();
    let b = trained_copy.logits(&img, &inp).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    // An export or a later stage reads the table back in f32, with its values.
    let merged = half_table.merged_tensors().unwrap();
    assert_eq!(merged[key].dtype(), candle_core::DType::F32);
    assert_eq!(max_abs_diff(&merged[key], &tensors[key]), 0.0);
}
