#!/usr/bin/env bash
# Prints the path of a python with torch (CPU), safetensors and transformers: the venv under
# target/torch-venv, created on first use (needs PyPI once). Used by the scripts that check
# ecic against transformers.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/target/torch-venv"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" >&2
    # PyTorch's CPU-only index when it is reachable, else PyPI (a larger download).
    "$venv/bin/pip" install --quiet --disable-pip-version-check torch safetensors \
        --index-url https://download.pytorch.org/whl/cpu >&2 ||
        "$venv/bin/pip" install --quiet --disable-pip-version-check torch safetensors >&2
fi
"$venv/bin/python" -c 'import transformers' 2>/dev/null ||
    "$venv/bin/pip" install --quiet --disable-pip-version-check transformers >&2
echo "$venv/bin/python"
