#!/usr/bin/env bash
# Time `ecic eval --json` (whole process) against pycocoevalcap 1.2's BLEU + ROUGE-L + CIDEr-D on the
# same tokenized input: 10,000 images x 5 references of ~20-character captions. Checks that the numbers
# agree (1e-9) and prints the speed ratio. Usage: scripts/bench-eval.sh [IMAGES] [RUNS]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="$here/.venv-metrics"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check pycocoevalcap==1.2
fi
(cd "$root" && cargo build --release --quiet --bin ecic)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$venv/bin/python" "$here/bench_eval.py" "$root/target/release/ecic" "$work" "${1:-10000}" "${2:-5}"
