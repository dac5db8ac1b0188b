#!/usr/bin/env bash
# Per-stage-kind speed of a sweep: samples/s, wall time and peak RSS
# of every stage kind, and captions/s of evaluate with greedy and beam-3
# decoding. Runs SPEC (default experiments/ablation.toml) into RUNS (reusing
# whatever is cached there), then the same sweep with beam-3 decoding (which
# reuses every trained stage and re-runs only evaluate), and prints medians
# (min-max) over the stages of each kind from the store.
# Usage: scripts/bench-stages.sh [SPEC] [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
SPEC=${1:-experiments/ablation.toml}
RUNS=${2:-runs}
cargo build --release -q
BIN=target/release/ecic
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
$BIN sweep "$SPEC" --runs "$RUNS" --no-report >/dev/null
$BIN sweep "$SPEC" --runs "$RUNS" --no-report --set 'stages.evaluate.method="beam"' \
    --set stages.evaluate.beam_width=3 >/dev/null
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$RUNS" <<'PY'
import glob, json, sqlite3, statistics, sys
db = sqlite3.connect(glob.glob(sys.argv[1] + "/*.sqlite")[0])
def fmt(xs, unit="", digits=1):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.median(xs):.{digits}f}{unit} ({min(xs):.{digits}f}-{max(xs):.{digits}f})"
rows = db.execute("""
    select s.kind, s.key, s.wall_s, s.peak_rss_kb, s.params,
           (select value from metrics m where m.stage_key = s.key and m.metric = 'samples_per_s'),
           (select value from metrics m where m.stage_key = s.key and m.metric = 'captions_per_s')
    from stages s where s.status = 'done'""").fetchall()
kinds = ["preprocess", "pretrain-align", "domain-adapt", "cider-optimize", "evaluate"]
print(f"{'stage kind':<22} {'n':>3}  {'samples/s median (min-max)':<28} {'wall s':<24} {'peak RSS MiB':<22}")
for k in kinds:
    rs = [r for r in rows if r[0] == k]
    if k == "evaluate":
        for method in ["greedy", "beam"]:
            sel = [r for r in rs if json.loads(r[4] or "{}").get("baseline") is None
                   and json.loads(r[4] or "{}").get("method", "greedy") == method]
            label = "evaluate greedy" if method == "greedy" else "evaluate beam-3"
            print(f"{label:<22} {len(sel):>3}  {fmt([r[6] for r in sel], ' cap/s'):<28} "
                  f"{fmt([r[2] for r in sel], ' s'):<24} {fmt([r[3] / 1024 if r[3] else None for r in sel], '', 0):<22}")
        continue
    print(f"{k:<22} {len(rs):>3}  {fmt([r[5] for r in rs]):<28} {fmt([r[2] for r in rs], ' s'):<24} "
          f"{fmt([r[3] / 1024 if r[3] else None for r in rs], '', 0):<22}")
PY
