#!/usr/bin/env bash
# candle vs PyTorch on the same tiny model: training samples/s (full 2+2
# batch 16, full 4+4 batch 32, LoRA r8, QLoRA, adapter) and decoding captions/s (greedy and
# beam-3 with a KV cache, 32 images), runs alternating between the two sides, medians, ratio
# candle/torch, achieved GFLOP/s and the f32 matmul peak of each side measured in the same run.
# Needs PyPI: torch goes into a venv under target/ (a large download; a bench, never CI).
# Run on an idle machine; arguments go to scripts/bench_vs_torch.py, e.g.
#   scripts/bench-vs-torch.sh --threads 1,2 --runs 3 --patch 8,16
#   scripts/bench-vs-torch.sh --check     # both sides compute the same losses from candle's weights
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ECIC_TORCH_VENV:-target/torch-venv}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, safetensors" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet torch safetensors numpy
fi
cargo build --release --example bench_candle
exec "$VENV/bin/python" scripts/bench_vs_torch.py "$@"
