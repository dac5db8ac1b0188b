#!/usr/bin/env bash
# Regenerate tests/fixtures/hf/ (tiny random LLaMA, Phi-3, Phi-3 with LongRoPE, OPT, CLIP vision,
# LLaVA, BLIP-2 (OPT) and Phi-3-Vision checkpoints in Hugging Face layout, plus reference outputs
# on fixed inputs) for tests/hf_checkpoint.rs. BLIP-2 and Phi-3-Vision have their own scripts, so
# the others' files do not depend on them.
# Needs python3 and PyPI once: the torch venv under target/ (scripts/torch-python.sh makes it,
# with transformers). The Rust tests only read the committed files.
# Phi-3-Vision's model code is not in transformers: PHI3V_REFERENCE must name a copy of
# image_embedding_phi3_v.py from the hub repository microsoft/Phi-3-vision-128k-instruct (its
# sha256 is recorded in tests/fixtures/hf/phi3v/expected.safetensors).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
phi3v_reference="${PHI3V_REFERENCE:?set PHI3V_REFERENCE to a copy of Phi-3-Vision's image_embedding_phi3_v.py}"
python=$("$here/torch-python.sh")
out="$root/tests/fixtures/hf"
rm -rf "$out"
mkdir -p "$out"
"$python" "$here/hf_fixtures.py" "$out"
"$python" "$here/hf_fixtures_blip2.py" "$out"
"$python" "$here/phi3v_fixture.py" "$out/phi3v" "$phi3v_reference"
