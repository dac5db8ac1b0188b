#!/usr/bin/env bash
# Regenerate tests/fixtures/metrics/*.json from pycocoevalcap 1.2 itself (the reference the Rust
# metrics are checked against, docs/metrics.md). Needs python3 and PyPI; the venv lives in
# scripts/.venv-metrics (git-ignored) and is reused on later runs.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="$here/.venv-metrics"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check pycocoevalcap==1.2
fi
mkdir -p "$root/tests/fixtures/metrics"
"$venv/bin/python" "$here/metric_fixtures.py" "$root/tests/fixtures/metrics"
