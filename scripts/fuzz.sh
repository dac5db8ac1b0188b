#!/usr/bin/env bash
# Coverage-guided fuzzing of ecic's input readers: the spec loader (`spec`), the MUGE reader (`muge`) and
# `ecic eval`'s JSONL readers (`eval_jsonl`), with cargo-fuzz (libFuzzer) on the nightly toolchain.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 600 s each, every target)
#
# Runs under `nice -n 19`. Seeds come from fuzz/corpus/<target>/ (kept in the repository, read only here);
# what libFuzzer finds goes to fuzz/work/<target>/ and a crash to fuzz/artifacts/<target>/ (both ignored by
# git). Each target's log is fuzz/<target>.log; the summary line per target gives executions, seconds and
# crashes (a panic is a crash: exit non-zero). Reproduce a crash with
#   cargo +nightly fuzz run --sanitizer none TARGET fuzz/artifacts/TARGET/crash-...
# Needs rustup's nightly toolchain; installs cargo-fuzz from crates.io when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(spec muge eval_jsonl)
command -v cargo-fuzz >/dev/null || cargo +nightly install cargo-fuzz --locked
declare -A max_len=([spec]=8192 [muge]=16384 [eval_jsonl]=8192)
# One build of every target with one set of flags, then the binaries run directly: `cargo fuzz run`
# per target would rebuild the whole crate each time its flags differ from the last build's.
nice -n 19 cargo +nightly fuzz build --sanitizer none 2>&1 | tail -1
bin=fuzz/target/x86_64-unknown-linux-gnu/release
status=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/work/$t" "fuzz/artifacts/$t"
    set +e
    t0=$SECONDS
    nice -n 19 "$bin/$t" "fuzz/work/$t" "fuzz/corpus/$t" \
        -max_total_time="$secs" -max_len="${max_len[$t]:-8192}" -timeout=30 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" >"fuzz/$t.log" 2>&1
    rc=$?
    elapsed=$((SECONDS - t0))
    set -e
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "fuzz/$t.log" | grep -o '[0-9]*$' || echo '?')
    crashes=$(ls "fuzz/artifacts/$t" | wc -l)
    echo "$t: $execs executions in $elapsed s, exit $rc, $crashes crash file(s) in fuzz/artifacts/$t"
    [ "$rc" -ne 0 ] && status=1
done
exit $status
