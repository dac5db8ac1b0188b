#!/usr/bin/env bash
# Prints training samples/s (batch 16, 24-token captions, vocab 400) per backbone x fusion x
# phase/PEFT and greedy / beam-3 captions/s (32 images, 24 tokens max) at the tiny preset,
# single-threaded as the sweep runs each stage. Run on an idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-1} cargo test --release --test model_speed -- --ignored --nocapture 2>&1 | grep -E "samples/s|test result"
