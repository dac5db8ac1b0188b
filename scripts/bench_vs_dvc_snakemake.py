#!/usr/bin/env python3
"""Helper of scripts/bench-vs-dvc-snakemake.sh.

`gen PLAN_JSON DIR` writes, from the stage DAG of an `ecic plan --format json`,
the same DAG for DVC (DIR/dvc/dvc.yaml, in a git repository) and for Snakemake
(DIR/smk/Snakefile): one stage / rule per ecic stage, with the same inputs;
each stage's command is trivial (it writes its key into its output file).

`summary RESULTS_TSV` prints the table: medians per tool and the ratios to ecic.
"""

import json
import statistics
import sys
from pathlib import Path


def gen(plan_path: str, out: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    stages = plan["stages"]
    keys = {s["key"] for s in stages}
    short = {s["key"]: f"{s['kind'].replace('-', '_')}_{s['key'][:12]}" for s in stages}
    out = Path(out)

    # DVC: one stage per node; deps are the outputs of its input stages.
    (out / "dvc").mkdir(parents=True, exist_ok=True)
    lines = ["stages:"]
    for s in stages:
        name = short[s["key"]]
        lines.append(f"  {name}:")
        lines.append(f"    cmd: echo {s['key']} > out/{name}")
        deps = [f"out/{short[k]}" for k in s["inputs"] if k in keys]
        if deps:
            lines.append("    deps:")
            lines += [f"      - {d}" for d in deps]
        lines.append("    outs:")
        lines.append(f"      - out/{name}")
    (out / "dvc" / "dvc.yaml").write_text("\n".join(lines) + "\n")

    # Snakemake: one rule per node (same shape as DVC), and `all`.
    (out / "smk").mkdir(parents=True, exist_ok=True)
    rules = ["rule all:", "    input:"]
    rules += [f'        "out/{short[s["key"]]}",' for s in stages]
    for s in stages:
        name = short[s["key"]]
        rules.append(f"\nrule {name}:")
        deps = [f'"out/{short[k]}"' for k in s["inputs"] if k in keys]
        if deps:
            rules.append("    input: " + ", ".join(deps))
        rules.append(f'    output: "out/{name}"')
        rules.append(f'    shell: "echo {s["key"]} > {{output}}"')
    (out / "smk" / "Snakefile").write_text("\n".join(rules) + "\n")
    cells = plan["summary"]["cells"]
    print(f"{cells} cells, {len(stages)} stages", file=sys.stderr)


def summary(tsv: str) -> None:
    rows = {}
    for line in Path(tsv).read_text().splitlines():
        tool, what, value = line.split("\t")
        rows.setdefault((tool, what), []).append(float(value))
    tools = []
    for tool, _ in rows:
        if tool not in tools:
            tools.append(tool)

    def med(tool, what):
        v = rows.get((tool, what))
        return statistics.median(v) if v else None

    # Ratios to ecic's (first) row: how many times ecic's figure the tool takes.
    base = next((t for t in tools if t.startswith("ecic")), tools[0])
    tools.sort(key=lambda t: not t.startswith("ecic"))
    print(f"{'tool':<40} {'no-op re-run ms':>16} {'x ecic':>8} {'overhead/stage ms':>18} {'x ecic':>8}  runs (full/no-op)")
    for t in tools:
        n, o = med(t, "noop_ms"), med(t, "per_stage_ms")
        bn, bo = med(base, "noop_ms"), med(base, "per_stage_ms")
        fmt = lambda v: f"{v:.1f}" if v is not None else "-"
        ratio = lambda v, b: f"{v / b:.1f}" if v is not None and b else "-"
        runs = f"{len(rows.get((t, 'per_stage_ms'), []))}/{len(rows.get((t, 'noop_ms'), []))}"
        print(f"{t:<40} {fmt(n):>16} {ratio(n, bn):>8} {fmt(o):>18} {ratio(o, bo):>8}  {runs}")

if __name__ == "__main__":
    if sys.argv[1] == "gen":
        gen(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "summary":
        summary(sys.argv[2])
    else:
        sys.exit(f"unknown command {sys.argv[1]}")
