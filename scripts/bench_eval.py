"""Helper of scripts/bench-eval.sh: make the corpus, time both sides, check, print the ratio.

Usage: bench_eval.py ECIC_BINARY WORK_DIR IMAGES RUNS
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


def caption(rng, n):
    return "".join(rng.choice(CJK) if rng.random() < 0.93 else rng.choice(EXTRA) for _ in range(n))


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
    rng = random.Random(7)
    refs_path, pred_path = os.path.join(work, "refs.jsonl"), os.path.join(work, "pred.jsonl")
    gts, res = {}, {}
    with open(refs_path, "w", encoding="utf-8") as fr, open(pred_path, "w", encoding="utf-8") as fp:
        for i in range(n_images):
            image_id = "%032x" % rng.getrandbits(128)
            base = caption(rng, rng.randint(12, 28))
            refs = [mutate(rng, base) for _ in range(5)]
            pred = mutate(rng, base) if rng.random() < 0.8 else caption(rng, rng.randint(8, 30))
            fr.write(json.dumps({"image_id": image_id, "text": refs}, ensure_ascii=False) + "\n")
            fp.write(json.dumps({"image_id": image_id, "text": pred}, ensure_ascii=False) + "\n")
            gts[image_id] = [" ".join(char_tokens(r)) for r in refs]
            res[image_id] = [" ".join(char_tokens(pred))]

    py_times, py = [], None
    for _ in range(max(1, runs // 2)):
        t = time.perf_counter()
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
        py_times.append(time.perf_counter() - t)
        py = {"bleu1": bleu[0], "bleu2": bleu[1], "bleu3": bleu[2], "bleu4": bleu[3],
              "rouge_l": float(rouge), "cider_d": float(cider)}

    rs_times, rs = [], None
    for _ in range(runs):
        t = time.perf_counter()
        out = subprocess.run([ecic, "eval", "--pred", pred_path, "--refs", refs_path, "--json"],
                             check=True, capture_output=True)
        rs_times.append(time.perf_counter() - t)
        rs = json.loads(out.stdout)

    worst = max(abs(rs[k] - py[k]) for k in py)
    for k in py:
        print("%-8s pycocoevalcap %.12f  ecic %.12f" % (k, py[k], rs[k]))
    py_med, rs_med = statistics.median(py_times), statistics.median(rs_times)
    print("images %d x 5 refs; cores %d" % (n_images, os.cpu_count() or 0))
    print("pycocoevalcap BLEU+ROUGE-L+CIDEr-D: median %.3f s of %d runs" % (py_med, len(py_times)))
    print("ecic eval --json (whole process):   median %.4f s of %d runs" % (rs_med, len(rs_times)))
    print("max |difference| %.2e; speed ratio %.0fx" % (worst, py_med / rs_med))
    if worst > 1e-9:
        sys.exit("numbers disagree beyond 1e-9")


if __name__ == "__main__":
    main()
