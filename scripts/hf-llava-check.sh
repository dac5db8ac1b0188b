#!/usr/bin/env bash
# Does transformers load an ecic export in the Hugging Face LLaVA layout, and caption as ecic
# does? A small sweep fine-tunes a LLaVA-shaped model (the tiny random LLaVA checkpoint of
# tests/fixtures/hf/llava: CLIP tower + LLaMA LM) with LoRA; its cell is exported (LoRA
# merged; config.json + model.safetensors beside ecic's files); ecic captions the valid
# split with the export, and scripts/hf_llava_check.py has transformers'
# LlavaForConditionalGeneration caption the same prepared pixels greedily and compares.
# Needs python3 with torch, transformers, safetensors and tokenizers: $PYTHON, else the torch
# venv under target/ (made as scripts/make-hf-fixtures.sh makes it).
# Usage: scripts/hf-llava-check.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-target/hf-llava-check}
root=$(pwd)
PYTHON=${PYTHON:-$(scripts/torch-python.sh)}
cargo build --release -q --bin ecic --example export_pixels
BIN=target/release/ecic
rm -rf "$WORK"
mkdir -p "$WORK"
cat > "$WORK/spec.toml" <<TOML
name = "hf-llava"
seeds = [0]
[data]
synth = { train = 48, valid = 24, test = 2, align = 24 }
[model]
checkpoint = "$root/tests/fixtures/hf/llava"
max_len = 16
[grid]
backbone = ["llava"]
peft = ["lora"]
fusion = ["early"]
[stages.preprocess]
augment_copies = 0
# One step each: the fixture's random weights then give a different caption per image (trained
# longer on Chinese captions its 64-token vocabulary cannot spell, the model says <unk> to
# every image, and equal captions would prove little).
[stages.pretrain_align]
steps = 1
batch_size = 8
[stages.domain_adapt]
steps = 1
batch_size = 8
[stages.evaluate]
predict_test = false
TOML
"$BIN" sweep "$WORK/spec.toml" --runs "$WORK/runs" --no-report >/dev/null
"$BIN" export hf-llava:best --runs "$WORK/runs" --out "$WORK/export"
TSV=$(find "$WORK/runs/data" -name IC_valid.tsv | head -1)
"$BIN" predict "$WORK/export" --images "$TSV" --out "$WORK/ecic.jsonl"
target/release/examples/export_pixels "$WORK/export" "$TSV" "$WORK/pixels.safetensors" "$WORK/ids.txt"
"$PYTHON" scripts/hf_llava_check.py "$WORK/export" "$WORK/pixels.safetensors" "$WORK/ids.txt" "$WORK/ecic.jsonl"
