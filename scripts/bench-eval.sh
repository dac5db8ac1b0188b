#!/usr/bin/env bash
# Time `ecic eval --json` (whole process, with its peak RSS) against pycocoevalcap 1.2's BLEU +
# ROUGE-L + CIDEr-D on the same tokenized input, 10,000 images x 5 references, on two corpora:
# `short` (every caption 12-28 Chinese characters, MUGE's shape) and `mixed` (~20-character
# captions with ASCII words). Checks that the numbers agree (1e-9) and prints the speed ratio of
# the medians; rounds alternate the two sides.
# Usage: scripts/bench-eval.sh [IMAGES] [ROUNDS] [CORPORA]   e.g. scripts/bench-eval.sh 10000 3 short
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="$here/.venv-metrics"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check pycocoevalcap==1.2
fi
(cd "$root" && cargo build --release --quiet --bin ecic)
bin="${CARGO_TARGET_DIR:-$root/target}/release/ecic"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for corpus in ${3:-short mixed}; do
    "$venv/bin/python" "$here/bench_eval.py" "$bin" "$work" "${1:-10000}" "${2:-3}" "$corpus"
done
