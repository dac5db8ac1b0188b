#!/usr/bin/env bash
# Engine overhead figures, printed as medians of several runs:
#  1. a fully cached sweep (no-op re-run), process start included;
#  2. orchestration overhead per executed stage: sweep wall time minus the
#     stages' own wall time (from their manifests), per stage, on trivial
#     stages (the most-frequent-caption baseline over many seeds);
#  3. `ecic plan` on a ~10,000-cell grid.
# Usage: scripts/bench-engine.sh [RUNS_DIR_OF_A_COMPLETED_SWEEP SPEC]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
BIN=target/release/ecic
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
now() { date +%s.%N; }

# --- 2. trivial stages ------------------------------------------------------
cat > "$WORK/trivial.toml" <<'TOML'
name = "trivial"
# 45 seeds = 90 stages: the size of the issue's 27-cell, 91-stage ablation DAG,
# over which a sweep's fixed costs are spread the same way.
seeds = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44]
[data]
synth = { train = 16, valid = 4, test = 2, align = 8 }
[grid]
backbone = ["mfc"]
[stages.preprocess]
augment_copies = 0
[stages.evaluate]
predict_test = false
TOML
$BIN plan "$WORK/trivial.toml" --runs "$WORK/r0" >/dev/null 2>&1   # materialise the data
overheads=()
cpus=()
for i in 1 2 3 4 5; do
    # Fresh directories, nothing deleted before a timed run (see
    # scripts/bench-vs-dvc-snakemake.sh: ext4 scans past recently freed inodes).
    mkdir -p "$WORK/r$i"; cp -r "$WORK/r0/data" "$WORK/r$i/"
    $BIN plan "$WORK/trivial.toml" --runs "$WORK/r$i" >/dev/null 2>&1   # data digest memo of the copy
    # GNU time's user+sys include the waited-for stage processes.
    sync; t0=$(now); /usr/bin/time -f '%U %S' -o "$WORK/time.txt" \
        $BIN sweep "$WORK/trivial.toml" --runs "$WORK/r$i" --jobs 1 --no-report >/dev/null 2>&1; t1=$(now)
    read -r inside inside_cpu n < <(python3 - "$WORK/r$i" <<'PY'
import json, pathlib, sys
ms = [json.loads(p.read_text()) for p in pathlib.Path(sys.argv[1], "objects-v1").glob("*/manifest.json")]
print(sum(m["wall_s"] for m in ms), sum(m["cpu_s"] or 0 for m in ms), len(ms))
PY
)
    overheads+=("$(python3 -c "print(($t1 - $t0 - $inside) / $n * 1000)")")
    cpus+=("$(python3 -c "u, s = open('$WORK/time.txt').read().split()[-2:]; print((float(u) + float(s) - $inside_cpu) / $n * 1000)")")
done
# The sweep's fixed cost (plan, store, worker start, final sync), from a 2-stage sweep.
sed 's/^seeds = .*/seeds = [0]/' "$WORK/trivial.toml" >"$WORK/one.toml"
fixed=()
for i in 1 2 3 4 5; do
    mkdir -p "$WORK/f$i"; cp -r "$WORK/r0/data" "$WORK/f$i/"
    $BIN plan "$WORK/one.toml" --runs "$WORK/f$i" >/dev/null 2>&1
    sync; t0=$(now); $BIN sweep "$WORK/one.toml" --runs "$WORK/f$i" --jobs 1 --no-report >/dev/null 2>&1; t1=$(now)
    fixed+=("$(python3 - "$WORK/f$i" "$t0" "$t1" <<'PY'
import json, pathlib, sys
ms = [json.loads(p.read_text()) for p in pathlib.Path(sys.argv[1], "objects-v1").glob("*/manifest.json")]
print((float(sys.argv[3]) - float(sys.argv[2]) - sum(m["wall_s"] for m in ms)) * 1000)
PY
)")
done
ov=$(printf '%s\n' "${overheads[@]}" | median)
fx=$(printf '%s\n' "${fixed[@]}" | median)
echo "orchestration overhead per executed stage: $(printf '%s\n' "${overheads[@]}" | median) ms wall, $(printf '%s\n' "${cpus[@]}" | median) ms CPU (medians of 5; $n trivial stages, --jobs 1; sweep minus the stages' own wall/CPU time from their manifests, so it includes the sweep's fixed costs / $n; load average $(cut -d' ' -f1-3 /proc/loadavg))"
echo "  of which fixed per sweep: $fx ms (overhead of a 2-stage sweep, median of 5); marginal per stage: $(python3 -c "print(($ov * $n - $fx) / ($n - 2))") ms wall"

# --- 1. no-op re-run ----------------------------------------------------------
SPEC=${2:-$WORK/trivial.toml}
RUNS=${1:-$WORK/r1}
noop=()
for i in 1 2 3 4 5 6 7; do
    t0=$(now); $BIN sweep "$SPEC" --runs "$RUNS" --no-report >/dev/null 2>&1; t1=$(now)
    noop+=("$(python3 -c "print(($t1 - $t0) * 1000)")")
done
echo "fully cached sweep of $(basename "$SPEC") (process start included): $(printf '%s\n' "${noop[@]}" | median) ms (median of 7)"

# --- 3. plan of a 10,000-cell grid -------------------------------------------
cat > "$WORK/grid10k.toml" <<'TOML'
name = "grid10k"
[data]
synth = { train = 16, valid = 4, test = 2, align = 8 }
[grid]
backbone = ["blip2", "llava", "phi3v"]
peft = ["lora", "qlora", "adapter"]
fusion = ["early", "late", "multilevel"]
"stages.domain_adapt.lr" = [1e-4, 2e-4, 3e-4, 4e-4, 5e-4, 6e-4, 7e-4, 8e-4, 9e-4, 1e-3]
"stages.domain_adapt.steps" = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150, 160, 170, 180, 190, 200, 210, 220, 230, 240, 250, 260, 270, 280, 290, 300, 310, 320, 330, 340, 350, 360, 370]
TOML
$BIN plan "$WORK/grid10k.toml" --runs "$WORK/r0" --format json >/dev/null 2>&1
for fmt in json table; do
    plans=()
    for i in 1 2 3; do
        t0=$(now); $BIN plan "$WORK/grid10k.toml" --runs "$WORK/r0" --format $fmt >"$WORK/plan.$fmt" 2>/dev/null; t1=$(now)
        plans+=("$(python3 -c "print(($t1 - $t0) * 1000)")")
    done
    echo "ecic plan of a $(python3 -c "import json; print(json.load(open('$WORK/plan.json'))['summary']['cells'])")-cell grid ($fmt output): $(printf '%s\n' "${plans[@]}" | median) ms (median of 3)"
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
