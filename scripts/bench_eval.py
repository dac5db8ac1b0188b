"""Helper of scripts/bench-eval.sh: make the corpus, time both sides, check, print the ratio.

Usage: bench_eval.py ECIC_BINARY WORK_DIR IMAGES ROUNDS [CORPUS]
CORPUS `mixed` (default): ~20-character captions with ASCII words, references edited from one base
caption by insertions and substitutions (12-34 characters). `short`: every caption, reference or
prediction, 12-28 characters of Chinese text (CJK and full-width punctuation only), the shape of
MUGE's own captions, where per-caption costs (process start, parsing, tokenizing, allocation)
weigh most against the n-gram work.
pycocoevalcap is timed on its scoring calls alone (data already in memory, tokenized with the port of
the `char` rule from metric_fixtures.py); ecic is timed as a whole process reading the jsonl files.
"""

import json
import os
import random
import statistics
import subprocess
import sys
import time

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from metric_fixtures import char_tokens  # noqa: E402

# ~600 common CJK characters of product captions, plus a few ASCII words and punctuation
CJK = [chr(c) for c in range(0x4E00, 0x4E00 + 20902, 35)]
EXTRA = ["T", "iPhone", "2023", "XL", "LED", "，", "！", "、"]
PUNCT = ["，", "！", "、", "；"]


def caption(rng, n):
    return "".join(rng.choice(CJK) if rng.random() < 0.93 else rng.choice(EXTRA) for _ in range(n))


def short_caption(rng):
    return "".join(rng.choice(CJK) if rng.random() < 0.95 else rng.choice(PUNCT)
                   for _ in range(rng.randint(12, 28)))


def short_mutate(rng, text):
    """Substitute, insert or delete 1-6 characters, staying within 12-28 characters."""
    chars = list(text)
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        if op < 0.5 or not 12 < len(chars) < 28:
            chars[rng.randrange(len(chars))] = rng.choice(CJK)
        elif op < 0.75:
            chars.insert(rng.randrange(len(chars)), rng.choice(CJK))
        else:
            del chars[rng.randrange(len(chars))]
    return "".join(chars)


def mutate(rng, text):
    chars = list(text)
    for _ in range(rng.randint(1, 6)):
        i = rng.randrange(len(chars))
        if rng.random() < 0.5:
            chars[i] = rng.choice(CJK)
        else:
            chars.insert(i, rng.choice(CJK))
    return "".join(chars)


def main():
    ecic, work, n_images, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    corpus = sys.argv[5] if len(sys.argv) > 5 else "mixed"
    if corpus not in ("mixed", "short"):
        sys.exit("corpus must be mixed or short, not %r" % corpus)
    rng = random.Random(7)
    refs_path, pred_path = os.path.join(work, "refs.jsonl"), os.path.join(work, "pred.jsonl")
    gts, res = {}, {}
    with open(refs_path, "w", encoding="utf-8") as fr, open(pred_path, "w", encoding="utf-8") as fp:
        for i in range(n_images):
            image_id = "%032x" % rng.getrandbits(128)
            if corpus == "short":
                base = short_caption(rng)
                refs = [short_mutate(rng, base) for _ in range(5)]
                pred = short_mutate(rng, base) if rng.random() < 0.8 else short_caption(rng)
            else:
                base = caption(rng, rng.randint(12, 28))
                refs = [mutate(rng, base) for _ in range(5)]
                pred = mutate(rng, base) if rng.random() < 0.8 else caption(rng, rng.randint(8, 30))
            fr.write(json.dumps({"image_id": image_id, "text": refs}, ensure_ascii=False) + "\n")
            fp.write(json.dumps({"image_id": image_id, "text": pred}, ensure_ascii=False) + "\n")
            gts[image_id] = [" ".join(char_tokens(r)) for r in refs]
            res[image_id] = [" ".join(char_tokens(pred))]

    def run_py():
        t = time.perf_counter()
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
        elapsed = time.perf_counter() - t
        return elapsed, {"bleu1": bleu[0], "bleu2": bleu[1], "bleu3": bleu[2], "bleu4": bleu[3],
                         "rouge_l": float(rouge), "cider_d": float(cider)}

    rss_path = os.path.join(work, "rss")

    def run_ecic():
        """Wall time, peak RSS (MiB) and the parsed output of one process. The RSS comes from GNU
        time, whose child is forked from a small process: a child forked from this Python process
        would report this process's peak (Linux keeps the high-water mark across exec)."""
        t = time.perf_counter()
        out = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss_path, ecic, "eval", "--pred",
                              pred_path, "--refs", refs_path, "--json"],
                             check=True, capture_output=True)
        elapsed = time.perf_counter() - t
        with open(rss_path) as f:
            peak = int(f.read().split()[-1]) / 1024
        return elapsed, peak, json.loads(out.stdout)

    # rounds alternate the two sides so that load changes on a shared machine hit both alike;
    # each round runs ecic twice (its runs are short, so it gets more samples)
    py_times, rs_times, rss = [], [], []
    py = rs = None
    for _ in range(runs):
        elapsed, py = run_py()
        py_times.append(elapsed)
        for _ in range(2):
            elapsed, peak, rs = run_ecic()
            rs_times.append(elapsed)
            rss.append(peak)

    worst = max(abs(rs[k] - py[k]) for k in py)
    for k in py:
        print("%-8s pycocoevalcap %.12f  ecic %.12f" % (k, py[k], rs[k]))
    py_med, rs_med = statistics.median(py_times), statistics.median(rs_times)
    print("corpus %s: images %d x 5 refs; cores %d; load %s" % (
        corpus, n_images, os.cpu_count() or 0, " ".join("%.2f" % x for x in os.getloadavg())))
    print("pycocoevalcap BLEU+ROUGE-L+CIDEr-D: median %.3f s of %d runs (%.3f-%.3f)" % (
        py_med, len(py_times), min(py_times), max(py_times)))
    print("ecic eval --json (whole process):   median %.4f s of %d runs (%.4f-%.4f)" % (
        rs_med, len(rs_times), min(rs_times), max(rs_times)))
    print("ecic peak RSS: median %.1f MiB, max %.1f MiB" % (statistics.median(rss), max(rss)))
    print("max |difference| %.2e; speed ratio %.0fx" % (worst, py_med / rs_med))
    if worst > 1e-9:
        sys.exit("numbers disagree beyond 1e-9")


if __name__ == "__main__":
    main()
