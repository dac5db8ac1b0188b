#!/usr/bin/env bash
# Preprocessing benchmark: throughput at 64 px and peak memory on a
# 50k-image synthetic set. Prints figures; asserts nothing.
#   scripts/bench-preprocess.sh [IMAGES]   (default 50000)
# Targets: >= 1,000 images/s on 2 cores; peak RSS <= 1 GiB.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-50000}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cargo build --release --quiet
echo "== generating $n synthetic training images"
/usr/bin/env time -f "synth: %e s wall, peak RSS %M KiB" \
  target/release/ecic data synth --out "$work/d" --train "$n" --valid 0 --test 0 --align 0 >/dev/null
du -sh "$work/d"
echo "== preprocessing (clean view + 1 augmented copy per image)"
ECIC_BENCH_DATA="$work/d" cargo test --release --quiet --test data_probe -- --ignored --nocapture --exact preprocess_throughput 2>&1 \
  | grep -E "preprocess|peak RSS"
echo "== preprocessing (clean view only)"
ECIC_BENCH_DATA="$work/d" ECIC_BENCH_COPIES=0 cargo test --release --quiet --test data_probe -- --ignored --nocapture --exact preprocess_throughput 2>&1 \
  | grep -E "preprocess|peak RSS"
echo "== learnability probe (1-NN on 8x8 thumbnails)"
cargo test --release --quiet --test data_probe -- --ignored --nocapture --exact learnability 2>&1 | grep -E "accuracy|1-NN"
