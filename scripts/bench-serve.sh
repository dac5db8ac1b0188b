#!/usr/bin/env bash
# Load benchmark of `ecic serve` on loopback (docs/serving.md has the figures): throughput and
# p50/p99 latency at concurrency 1, 8 and 32, with dynamic batching (--max-batch 32) and
# without (--max-batch 1), one image per request; then the batched server's resident memory
# sampled over 10,000 requests at concurrency 32. Bounded: fixed request counts, every run
# under `timeout`. The model: the tiny preset (the ablation's size) trained by a small sweep
# into WORK (reused when there), exported once.
# Usage: scripts/bench-serve.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-target/bench-serve}
cargo build --release -q --bin ecic --example serve_load
BIN=target/release/ecic
LOAD=target/release/examples/serve_load
mkdir -p "$WORK"
if [ ! -d "$WORK/model" ]; then
  cat > "$WORK/spec.toml" <<'TOML'
name = "bench-serve"
[data]
synth = { train = 200, valid = 100, test = 4, align = 100, foundation = 200 }
[grid]
backbone = ["llava"]
peft = ["lora"]
fusion = ["early"]
[stages.pretrain_vision]
steps = 20
[stages.pretrain_lm]
steps = 20
[stages.pretrain_align]
steps = 20
[stages.domain_adapt]
steps = 40
[stages.cider_optimize]
steps = 2
[stages.evaluate]
predict_test = false
TOML
  "$BIN" sweep "$WORK/spec.toml" --runs "$WORK/runs" --no-report >/dev/null
  "$BIN" export bench-serve:best --runs "$WORK/runs" --out "$WORK/model" >/dev/null
fi
TSV=$(find "$WORK/runs/data" -name IC_valid.tsv | head -1)
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"

start_server() { # args: extra serve flags; sets PID and URL
  "$BIN" serve "$WORK/model" --addr 127.0.0.1:0 --queue 1024 "$@" > "$WORK/serve.out" 2>/dev/null &
  PID=$!
  for _ in $(seq 1 600); do
    URL=$(sed -n 's/^listening on //p' "$WORK/serve.out")
    [ -n "$URL" ] && return 0
    kill -0 "$PID" 2>/dev/null || { echo "serve died"; exit 1; }
    sleep 0.1
  done
  echo "serve did not start"; exit 1
}
stop_server() { kill -TERM "$PID"; wait "$PID"; }

for mode in "batched --max-batch 32 --max-wait-ms 5" "unbatched --max-batch 1 --max-wait-ms 0"; do
  set -- $mode
  name=$1; shift
  echo "== $name ($*)"
  start_server "$@"
  timeout 600 "$LOAD" "$URL" "$TSV" 1 200
  timeout 600 "$LOAD" "$URL" "$TSV" 8 1000
  timeout 600 "$LOAD" "$URL" "$TSV" 32 2000
  stop_server
done

echo "== memory: batched, 10,000 requests at concurrency 32"
start_server --max-batch 32 --max-wait-ms 5
timeout 900 "$LOAD" "$URL" "$TSV" 32 10000 "$PID"
stop_server
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
