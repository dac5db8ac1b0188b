#!/usr/bin/env bash
# Regenerate tests/fixtures/hf/ (tiny random LLaMA, Phi-3, Phi-3 with LongRoPE, OPT, CLIP vision
# and LLaVA checkpoints in Hugging Face layout, plus transformers' outputs on fixed inputs) for
# tests/hf_checkpoint.rs.
# Needs python3 and PyPI once: reuses the torch venv under target/ (scripts/bench-vs-torch.sh
# makes it) and installs transformers into it. The Rust tests only read the committed files.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="$root/target/torch-venv"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    # PyTorch's CPU-only index when it is reachable, else PyPI (a larger download).
    "$venv/bin/pip" install --quiet --disable-pip-version-check torch safetensors \
        --index-url https://download.pytorch.org/whl/cpu ||
        "$venv/bin/pip" install --quiet --disable-pip-version-check torch safetensors
fi
"$venv/bin/python" -c 'import transformers' 2>/dev/null ||
    "$venv/bin/pip" install --quiet --disable-pip-version-check transformers
out="$root/tests/fixtures/hf"
rm -rf "$out"
mkdir -p "$out"
"$venv/bin/python" "$here/hf_fixtures.py" "$out"
