"""Write the metric fixtures the Rust tests check `src/metrics` against (docs/metrics.md).

The numbers come from pycocoevalcap 1.2 itself (Bleu, Rouge, Cider), fed the strings our tokenizer
produces: PTBTokenizer is never called. The `char` rule is ported below so that the fixture also
pins the tokenizer: each image stores the raw strings and the joined token strings, and the Rust
test checks that `tokenize(raw).join(" ")` gives exactly what pycocoevalcap saw. In `space` mode the
raw string itself is what pycocoevalcap sees (BLEU/CIDEr split it with `str.split()`, ROUGE-L with
`split(" ")`).

Run through `scripts/metric-fixtures.sh`, which makes the venv. Usage: metric_fixtures.py OUT_DIR
"""

import json
import os
import random
import sys

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge


def char_tokens(text):
    """The MUGE `char` rule: whitespace (Python's `str.isspace`) separates and is dropped, a maximal
    run of ASCII letters/digits is one token, every other character is one token."""
    out, run = [], []
    for c in text:
        if c.isascii() and c.isalnum():
            run.append(c)
            continue
        if run:
            out.append("".join(run))
            run = []
        if not c.isspace():
            out.append(c)
    if run:
        out.append("".join(run))
    return out


def feed(text, mode):
    """The string pycocoevalcap is given for one caption."""
    if mode == "char":
        return " ".join(char_tokens(text))
    if mode == "space":
        return text
    raise ValueError(mode)


def score(name, mode, images):
    """images: list of (image_id, pred_raw, [ref_raw, ...])."""
    gts, res = {}, {}
    rows = []
    for image_id, pred, refs in images:
        p = feed(pred, mode)
        r = [feed(x, mode) for x in refs]
        res[image_id] = [p]
        gts[image_id] = r
        rows.append({"image_id": image_id, "pred": pred, "refs": refs, "pred_fed": p, "refs_fed": r})
    bleu, bleu_img = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_img = Rouge().compute_score(gts, res)
    cider, cider_img = Cider().compute_score(gts, res)
    for i, row in enumerate(rows):
        row["bleu"] = [float(bleu_img[k][i]) for k in range(4)]
        row["rouge_l"] = float(rouge_img[i])
        row["cider_d"] = float(cider_img[i])
    return {
        "name": name,
        "tokenize": mode,
        "corpus": {
            "bleu1": float(bleu[0]),
            "bleu2": float(bleu[1]),
            "bleu3": float(bleu[2]),
            "bleu4": float(bleu[3]),
            "rouge_l": float(rouge),
            "cider_d": float(cider),
            "images": len(rows),
        },
        "images": rows,
    }


# Hand-written corpus: every case the issue names, in `char` mode.
EDGE = [
    ("e01", "新款女士连衣裙，夏季显瘦", ["夏季新款连衣裙显瘦", "女士连衣裙，夏季新款", "显瘦的夏季女士连衣裙"]),
    # ASCII runs and digits stay whole: iPhone14 / Pro / 256GB
    ("e02", "iPhone14 Pro 256GB 手机壳", ["iPhone14Pro手机壳256GB", "苹果 iPhone14 Pro 手机壳", "手机壳 iPhone 14 Pro"]),
    # full-width punctuation, one token each
    ("e03", "时尚！百搭（黑色）。", ["百搭黑色，时尚！", "时尚百搭（黑色款）"]),
    # repeated n-grams: clipping by the max count in one reference
    ("e04", "好好好好好好", ["好好看", "好的好的", "好好好"]),
    # one-character candidate
    ("e05", "裙", ["连衣裙", "裙子很美", "长裙"]),
    # empty candidate
    ("e06", "", ["一款简约的帆布鞋", "帆布鞋"]),
    # double spaces and tabs inside a caption: dropped in char mode
    ("e07", "简约  风格\t T恤", ["简约风格T恤", "纯棉T恤  简约风格", "T恤"]),
    # 10 references
    ("e08", "复古皮质手提包", ["复古手提包", "皮质手提包", "复古皮质包", "手提包复古风", "皮包", "复古风格手提包",
                          "真皮手提包", "复古女包", "皮质女士手提包", "复古皮质手提包"]),
    # one reference
    ("e09", "运动鞋男款透气", ["男款透气运动鞋"]),
    # long candidate vs short references (brevity ratio > 1), and mixed half-width punctuation
    ("e10", "这款外套采用优质面料,做工精细,穿着舒适,适合春秋季节日常通勤穿搭,百搭又时尚,值得拥有!",
     ["优质面料外套", "精致外套,百搭时尚"]),
    # a candidate equal to one reference
    ("e11", "纯棉儿童睡衣套装", ["纯棉儿童睡衣套装", "儿童睡衣"]),
    # ideographic space U+3000 and NBSP are whitespace too
    ("e12", "北欧\u3000风格\u00a0台灯", ["北欧风格台灯", "简约台灯"]),
]

# Space mode: the raw strings are what pycocoevalcap sees; ROUGE-L splits on single spaces
# (empty tokens count), BLEU and CIDEr-D on any whitespace.
SPACE = [
    ("s1", "a  red dress", ["a red dress", "red  dress", "the red dress for summer"]),
    ("s2", " leading and trailing ", ["leading and trailing", " leading  and trailing "]),
    ("s3", "", ["", "something"]),
    ("s4", "tab\tseparated words", ["tab separated words", "words"]),
    ("s5", "x", ["x x x", "x"]),
    ("s6", "new new new shoes", ["new shoes", "new new shoes", "old shoes"]),
]

CJK = list("新款女士男童装连衣裙夏季春秋显瘦宽松休闲时尚百搭简约复古韩版纯棉真皮手提包鞋帽子外套毛衣黑白红蓝色")
ASCII_WORDS = ["T", "iPhone", "2023", "XL", "3D", "USB", "ins", "A4", "100ml", "LED"]
PUNCT = list("，。！？、（）,.!") + ["  ", " ", "\t"]


def random_caption(rng, length):
    parts = []
    for _ in range(length):
        x = rng.random()
        if x < 0.8:
            parts.append(rng.choice(CJK))
        elif x < 0.9:
            parts.append(rng.choice(ASCII_WORDS))
        else:
            parts.append(rng.choice(PUNCT))
    return "".join(parts)


def mutate(rng, text):
    """A caption that shares n-grams with `text`, so higher-order scores are not all zero."""
    chars = list(text)
    for _ in range(rng.randint(0, 4)):
        op = rng.random()
        if op < 0.4 and chars:
            chars[rng.randrange(len(chars))] = rng.choice(CJK)
        elif op < 0.7 and chars:
            del chars[rng.randrange(len(chars))]
        else:
            chars.insert(rng.randint(0, len(chars)), rng.choice(CJK))
    return "".join(chars)


def random_corpus(seed, n_images):
    rng = random.Random(seed)
    images = []
    for i in range(n_images):
        base = random_caption(rng, rng.randint(1, 30))
        refs = [mutate(rng, base) if rng.random() < 0.7 else random_caption(rng, rng.randint(1, 30))
                for _ in range(rng.randint(1, 10))]
        x = rng.random()
        if x < 0.03:
            pred = ""
        elif x < 0.06:
            pred = rng.choice(CJK)
        elif x < 0.8:
            pred = mutate(rng, base)
        else:
            pred = random_caption(rng, rng.randint(1, 40))
        images.append(("r%04d" % i, pred, refs))
    return images


def main():
    out = sys.argv[1]
    fixtures = {
        "edge_char": score("edge_char", "char", EDGE),
        "single_image": score("single_image", "char", EDGE[:1]),
        "space_mode": score("space_mode", "space", SPACE),
        "random_char": score("random_char", "char", random_corpus(20240601, 300)),
    }
    for name, data in fixtures.items():
        path = os.path.join(out, name + ".json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1)
            f.write("\n")
        print("wrote", path, data["corpus"])


if __name__ == "__main__":
    main()
