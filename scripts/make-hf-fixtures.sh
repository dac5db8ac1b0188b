#!/usr/bin/env bash
# Regenerate tests/fixtures/hf/ (tiny random LLaMA, Phi-3, Phi-3 with LongRoPE, OPT, CLIP vision,
# LLaVA and BLIP-2 (OPT) checkpoints in Hugging Face layout, plus transformers' outputs on fixed
# inputs) for tests/hf_checkpoint.rs. BLIP-2 has its own script, so the others' files do not
# depend on it.
# Needs python3 and PyPI once: the torch venv under target/ (scripts/torch-python.sh makes it,
# with transformers). The Rust tests only read the committed files.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
python=$("$here/torch-python.sh")
out="$root/tests/fixtures/hf"
rm -rf "$out"
mkdir -p "$out"
"$python" "$here/hf_fixtures.py" "$out"
"$python" "$here/hf_fixtures_blip2.py" "$out"
