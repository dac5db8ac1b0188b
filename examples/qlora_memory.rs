//! Peak memory of loading a real-size checkpoint and taking one training step, QLoRA against
//! the f32 path (LoRA on an f32 frozen base), on the same checkpoint in one run.
//!
//! ```sh
//! cargo run --release --example qlora_memory -- gen DIR      # random ~1B LLaVA checkpoint, bf16 shards
//! cargo run --release --example qlora_memory -- compare DIR  # both measurements, then the ratio
//! ```
//!
//! `gen` writes a LLaVA-1.5-layout checkpoint of about a billion parameters (CLIP ViT-B/16 at
//! 224 px, a LLaMA decoder of width 2048 x 16 layers, vocabulary 32064) with random bf16
//! weights in ~500 MB shards, as transformers would save it. `compare` runs `measure` in a fresh
//! process per method (a process's peak RSS only grows) and prints both peaks. `measure DIR
//! qlora|lora [--save-embeddings]` builds the adapt-phase model, fills it from the checkpoint
//! ([`ecic::model::Captioner::load_pretrained`]), takes one AdamW step on one image and a
//! 16-token caption, and prints one JSON line with the peak RSS (`VmHWM`) after loading and
//! after the step, and the resident set (`VmRSS`) and peak after the forward and the backward. By default `modules_to_save` is empty (the LoRA/QLoRA papers' setting);
//! `--save-embeddings` trains embeddings and head in full as the sweeps do by default.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use ecic::model::hf::Checkpoint;
use ecic::model::{Backbone, Captioner, Fusion, PeftConfig, Phase};
use ecic::train::{AdamW, Group, ParamSpec, TrainConfig};
use rand::{Rng, SeedableRng};

const VOCAB: usize = 32064;
const WIDTH: usize = 2048;
const LAYERS: usize = 16;
const INTER: usize = 5632;
const HEADS: usize = 16;
const VIT_WIDTH: usize = 768;
const VIT_LAYERS: usize = 12;
const IMAGE: usize = 224;
const PATCH: usize = 16;
const SHARD_BYTES: usize = 500 << 20;

fn main() -> Result<()> {
    ecic::runtime::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["gen", dir] => generate(Path::new(dir)),
        ["measure", dir, mode, rest @ ..] => {
            measure(Path::new(dir), mode, rest.contains(&"--save-embeddings"))
        }
        ["compare", dir, rest @ ..] => compare(Path::new(dir), rest),
        _ => bail!(
            "usage: qlora_memory gen DIR | compare DIR [--save-embeddings] | \
             measure DIR qlora|lora [--save-embeddings]"
        ),
    }
}

/// The checkpoint's tensors in the LLaVA-1.5 key layout (transformers 4.x names), with shapes.
fn layout() -> Vec<(String, Vec<usize>)> {
    let mut t: Vec<(String, Vec<usize>)> = Vec::new();
    let v = "vision_tower.vision_model.";
    let n = (IMAGE / PATCH).pow(2) + 1;
    t.push((format!("{v}embeddings.class_embedding"), vec![VIT_WIDTH]));
    t.push((
        format!("{v}embeddings.patch_embedding.weight"),
        vec![VIT_WIDTH, 3, PATCH, PATCH],
    ));
    t.push((
        format!("{v}embeddings.position_embedding.weight"),
        vec![n, VIT_WIDTH],
    ));
    for p in ["pre_layrnorm", "post_layernorm"] {
        t.push((format!("{v}{p}.weight"), vec![VIT_WIDTH]));
        t.push((format!("{v}{p}.bias"), vec![VIT_WIDTH]));
    }
    for i in 0..VIT_LAYERS {
        let at = format!("{v}encoder.layers.{i}.");
        for m in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            t.push((
                format!("{at}self_attn.{m}.weight"),
                vec![VIT_WIDTH, VIT_WIDTH],
            ));
            t.push((format!("{at}self_attn.{m}.bias"), vec![VIT_WIDTH]));
        }
        for m in ["layer_norm1", "layer_norm2"] {
            t.push((format!("{at}{m}.weight"), vec![VIT_WIDTH]));
            t.push((format!("{at}{m}.bias"), vec![VIT_WIDTH]));
        }
        t.push((
            format!("{at}mlp.fc1.weight"),
            vec![4 * VIT_WIDTH, VIT_WIDTH],
        ));
        t.push((format!("{at}mlp.fc1.bias"), vec![4 * VIT_WIDTH]));
        t.push((
            format!("{at}mlp.fc2.weight"),
            vec![VIT_WIDTH, 4 * VIT_WIDTH],
        ));
        t.push((format!("{at}mlp.fc2.bias"), vec![VIT_WIDTH]));
    }
    let p = "multi_modal_projector.";
    t.push((format!("{p}linear_1.weight"), vec![WIDTH, VIT_WIDTH]));
    t.push((format!("{p}linear_1.bias"), vec![WIDTH]));
    t.push((format!("{p}linear_2.weight"), vec![WIDTH, WIDTH]));
    t.push((format!("{p}linear_2.bias"), vec![WIDTH]));
    let l = "language_model.model.";
    t.push((format!("{l}embed_tokens.weight"), vec![VOCAB, WIDTH]));
    for i in 0..LAYERS {
        let at = format!("{l}layers.{i}.");
        for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            t.push((format!("{at}self_attn.{m}.weight"), vec![WIDTH, WIDTH]));
        }
        t.push((format!("{at}mlp.gate_proj.weight"), vec![INTER, WIDTH]));
        t.push((format!("{at}mlp.up_proj.weight"), vec![INTER, WIDTH]));
        t.push((format!("{at}mlp.down_proj.weight"), vec![WIDTH, INTER]));
        t.push((format!("{at}input_layernorm.weight"), vec![WIDTH]));
        t.push((format!("{at}post_attention_layernorm.weight"), vec![WIDTH]));
    }
    t.push((format!("{l}norm.weight"), vec![WIDTH]));
    t.push(("language_model.lm_head.weight".into(), vec![VOCAB, WIDTH]));
    t
}

fn config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": VOCAB - 1,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "llama", "hidden_size": WIDTH, "intermediate_size": INTER,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": HEADS, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
            "torch_dtype": "bfloat16"
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": VIT_WIDTH,
            "intermediate_size": 4 * VIT_WIDTH, "num_hidden_layers": VIT_LAYERS,
            "num_attention_heads": 12, "image_size": IMAGE, "patch_size": PATCH,
            "hidden_act": "quick_gelu"
        }
    })
}

/// Random bf16 values: matrices uniform with variance 1/fan_in, embeddings N(0,1)-sized,
/// norm weights 1, biases 0.
fn values(key: &str, shape: &[usize], rng: &mut rand_chacha::ChaCha8Rng) -> Vec<u8> {
    let n: usize = shape.iter().product();
    let fill = |v: f32| std::iter::repeat_n(half::bf16::from_f32(v), n).collect::<Vec<_>>();
    let vals: Vec<half::bf16> = if shape.len() == 1 && !key.contains("class_embedding") {
        fill(if key.ends_with("bias") { 0.0 } else { 1.0 })
    } else {
        let fan_in: usize = if key.contains("embed") {
            1
        } else {
            shape[1..].iter().product()
        };
        let a = (3.0 / fan_in as f32).sqrt();
        (0..n)
            .map(|_| half::bf16::from_f32(rng.gen_range(-a..a)))
            .collect()
    };
    vals.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn generate(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let all = layout();
    let params: usize = all.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    // Shards in key order, each closed once it passes SHARD_BYTES.
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new()];
    let mut bytes = 0;
    for (k, s) in all {
        let b = 2 * s.iter().product::<usize>();
        if bytes > 0 && bytes + b > SHARD_BYTES {
            shards.push(Vec::new());
            bytes = 0;
        }
        bytes += b;
        shards.last_mut().expect("one shard").push((k, s));
    }
    let total = shards.len();
    let mut map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{total:05}.safetensors", i + 1);
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = shard
            .iter()
            .map(|(k, s)| (k.clone(), s.clone(), values(k, s, &mut rng)))
            .collect();
        let views = data
            .iter()
            .map(|(k, s, d)| {
                let v =
                    safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), d)?;
                Ok((k.clone(), v))
            })
            .collect::<Result<Vec<_>>>()?;
        safetensors::serialize_to_file(views, None, &dir.join(&name))
            .with_context(|| format!("writing {name}"))?;
        for (k, _) in shard {
            map.insert(k.clone(), name.clone());
        }
        eprintln!("wrote {name} ({} tensors)", shard.len());
    }
    let index = serde_json::json!({
        "metadata": {"total_size": 2 * params},
        "weight_map": map,
    });
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index)?,
    )?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config())?,
    )?;
    println!(
        "{}: {params} parameters ({:.2} GB of bf16) in {total} shards",
        dir.display(),
        2.0 * params as f64 / 1e9
    );
    Ok(())
}

/// Peak and current resident set size of this process (`VmHWM`, `VmRSS`), in bytes.
fn rss() -> Result<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> Result<u64> {
        let line = s
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("{name} not in /proc/self/status"))?;
        let kb: u64 = line
            .split_whitespace()
            .nth(1)
            .context("no value")?
            .parse()?;
        Ok(kb * 1024)
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}

fn group(c: ecic::model::Component) -> Group {
    use ecic::model::Component;
    match c {
        Component::Vision => Group::Vision,
        Component::Connector => Group::Connector,
        Component::Lm => Group::Lm,
        Component::Adapter => Group::Adapter,
    }
}

fn measure(dir: &Path, mode: &str, save_embeddings: bool) -> Result<()> {
    let mut peft = match mode {
        "qlora" => PeftConfig::qlora(8, 16.0),
        "lora" => PeftConfig::lora(8, 16.0),
        other => bail!("method {other:?}: qlora or lora"),
    };
    if !save_embeddings {
        peft.modules_to_save.clear();
    }
    let t0 = Instant::now();
    let ck = Checkpoint::open(dir)?;
    let mut cfg = ck.model_config(Backbone::Llava, Fusion::Early)?;
    cfg.max_caption_len = 16;
    let mut model = Captioner::new(&cfg, &peft, Phase::Adapt, &Device::Cpu)?;
    model.load_pretrained(&ck)?;
    let counts = model.counts();
    let (load_peak, load_rss) = rss()?;
    let load_s = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let s = cfg.input_size();
    let px: Vec<f32> = (0..3 * s * s).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let images = Tensor::from_vec(px, (1, 3, s, s), &Device::Cpu)?;
    let ids: Vec<u32> = (0..17).map(|_| rng.gen_range(3..1000)).collect();
    let input = Tensor::new(&ids[..16], &Device::Cpu)?.unsqueeze(0)?;
    let target = Tensor::new(&ids[1..], &Device::Cpu)?.unsqueeze(0)?;
    let mask = Tensor::ones((1, 16), DType::F32, &Device::Cpu)?;
    let specs: Vec<ParamSpec> = model
        .trainable_vars()
        .into_iter()
        .map(|t| ParamSpec::new(t.name, t.var, group(t.component)).with_decay(t.decay))
        .collect();
    let mut opt = AdamW::new(specs, &TrainConfig::default())?;
    let loss = model.loss(&images, &input, &target, &mask, 0.0)?;
    // Resident after the forward: the base plus what the graph keeps for the backward.
    let (forward_peak, forward_rss) = rss()?;
    let grads = loss.backward()?;
    let (backward_peak, backward_rss) = rss()?;
    opt.accumulate(&grads, 1.0)?;
    drop(grads);
    let norm = opt.grad_norm();
    opt.step(1e-4, norm)?;
    let (step_peak, step_rss) = rss()?;
    println!(
        "{}",
        serde_json::json!({
            "method": mode,
            "modules_to_save": peft.modules_to_save,
            "total_params": counts.total,
            "trainable_params": counts.trainable,
            "frozen_bytes": counts.frozen_bytes,
            "load_peak_rss": load_peak,
            "load_rss": load_rss,
            "load_s": load_s,
            "forward_peak_rss": forward_peak,
            "forward_rss": forward_rss,
            "backward_peak_rss": backward_peak,
            "backward_rss": backward_rss,
            "step_peak_rss": step_peak,
            "step_rss": step_rss,
            "step_s": t1.elapsed().as_secs_f64(),
            "loss": loss.to_scalar::<f32>()?,
            "grad_norm": norm,
        })
    );
    Ok(())
}

fn compare(dir: &Path, rest: &[&str]) -> Result<()> {
    let exe = std::env::current_exe()?;
    let mut peaks = Vec::new();
    for mode in ["qlora", "lora"] {
        let out = std::process::Command::new(&exe)
            .arg("measure")
            .arg(dir)
            .arg(mode)
            .args(rest)
            .stderr(std::process::Stdio::inherit())
            .output()?;
        if !out.status.success() {
            bail!("measure {mode} failed: {}", out.status);
        }
        let line = String::from_utf8(out.stdout)?;
        print!("{line}");
        let v: serde_json::Value = serde_json::from_str(line.trim())?;
        peaks.push((
            mode,
            v["load_peak_rss"].as_f64().unwrap_or(0.0),
            v["step_peak_rss"].as_f64().unwrap_or(0.0),
        ));
    }
    let gb = |b: f64| b / 1e9;
    for (m, l, s) in &peaks {
        println!(
            "{m:>6}: peak RSS {:.2} GB after loading, {:.2} GB after one training step",
            gb(*l),
            gb(*s)
        );
    }
    let (q, f) = (peaks[0].2, peaks[1].2);
    println!(
        "QLoRA peak / f32-path peak: {:.1}% (load + one step)",
        100.0 * q / f
    );
    Ok(())
}
