"""How fast can a small image encoder learn the product category of the synthetic set from its
1,000 generic-domain images, under direct supervision? PyTorch, 2 threads, AdamW, cosine, batch
32; held-out accuracy on IC_valid every quarter of the run (chance 1/12).

    target/torch-venv/bin/python scripts/probe_category_torch.py RUNS/data/synth-XXXX STEM:STEPS[:LR] ...

STEM: patch16, patch8 (ViT patchify), conv (stride-2 conv stem + 2x2 patchify), conv8, cnn
(4 x [3x3 conv, GroupNorm, GELU, 2x2 max pool], 32-64-96-96), cnns (16-32-64-96), cnnr (cnns
without norm), cnnl (cnns with a per-pixel LayerNorm); every stem feeds 2 pre-LN transformer
blocks of width 96 and a linear head on mean-pooled tokens. Labels: the first category word of
each image's first caption. Needs torch and pillow (scripts/bench-vs-torch.sh makes the venv).
Figures in docs/models.md."""
import base64, io, json, re, sys, time, numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from PIL import Image
torch.set_num_threads(2); torch.manual_seed(0)
import os
src = open(os.path.join(os.path.dirname(__file__), "..", "src/data/synth/vocab.rs")).read()
cats = [re.findall(r'"([^"]+)"', m) for m in re.findall(r'synonyms: &\[([^\]]*)\]', src)]
def first(text):
    best = None
    for gi, g in enumerate(cats):
        for w in g:
            i = text.find(w)
            if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(w) > best[2])):
                best = (i, gi, len(w))
    return None if best is None else best[1]
D = sys.argv[1].rstrip("/") + "/"
def load(prefix, size=64):
    caps = {}
    for l in open(D + prefix + ".jsonl"):
        r = json.loads(l); caps[r["image_id"]] = r["text"]
    X, Y = [], []
    for l in open(D + prefix + ".tsv"):
        if not l.strip(): continue
        i, b = l.rstrip("\n").split("\t")
        im = Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB").resize((size, size), Image.BILINEAR)
        X.append(np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255); Y.append(first(caps[i][0]))
    X = torch.tensor(np.array(X)); X = (X - 0.5) / 0.25
    return X, torch.tensor(Y)
Xa, Ya = load("ALIGN_train"); Xv, Yv = load("IC_valid")
class Block(nn.Module):
    def __init__(s, w, h=4):
        super().__init__(); s.n1 = nn.LayerNorm(w); s.at = nn.MultiheadAttention(w, h, batch_first=True); s.n2 = nn.LayerNorm(w)
        s.mlp = nn.Sequential(nn.Linear(w, 2 * w), nn.GELU(), nn.Linear(2 * w, w))
    def forward(s, x):
        y = s.n1(x); x = x + s.at(y, y, y, need_weights=False)[0]; return x + s.mlp(s.n2(x))
class Net(nn.Module):
    def __init__(s, stem, w=96):
        super().__init__()
        if stem.startswith("patch"):
            p = int(stem[5:]); s.stem = nn.Conv2d(3, w, p, p); n = (64 // p) ** 2
        elif stem == "conv":  # 3 stride-2 3x3 convs + 2x2 patchify: 64 -> 4x4 tokens
            s.stem = nn.Sequential(nn.Conv2d(3, 24, 3, 2, 1), nn.GroupNorm(1, 24), nn.GELU(), nn.Conv2d(24, 48, 3, 2, 1), nn.GroupNorm(1, 48), nn.GELU(), nn.Conv2d(48, 96, 3, 2, 1), nn.GroupNorm(1, 96), nn.GELU(), nn.Conv2d(96, w, 2, 2)); n = 16
        elif stem == "conv8":  # 2 stride-2 convs + 2x2 patchify: 8x8 tokens
            s.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.GroupNorm(1, 32), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GroupNorm(1, 64), nn.GELU(), nn.Conv2d(64, w, 2, 2)); n = 64
        elif stem == "cnn":  # plain CNN, tokens = 4x4 map
            def cb(i, o): return [nn.Conv2d(i, o, 3, 1, 1), nn.GroupNorm(4, o), nn.GELU(), nn.MaxPool2d(2)]
            s.stem = nn.Sequential(*cb(3, 32), *cb(32, 64), *cb(64, 96), *cb(96, w)); n = 16
        elif stem == "cnns":  # slimmer CNN
            def cb(i, o): return [nn.Conv2d(i, o, 3, 1, 1), nn.GroupNorm(4, o), nn.GELU(), nn.MaxPool2d(2)]
            s.stem = nn.Sequential(*cb(3, 16), *cb(16, 32), *cb(32, 64), *cb(64, w)); n = 16
        elif stem == "cnnd":  # stride-2 first conv, then pools
            def cb(i, o): return [nn.Conv2d(i, o, 3, 1, 1), nn.GroupNorm(4, o), nn.GELU(), nn.MaxPool2d(2)]
            s.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.GroupNorm(4, 32), nn.GELU(), *cb(32, 64), *cb(64, 96), *cb(96, w)); n = 16
        elif stem == "cnnr":  # no norm
            def cb(i, o): return [nn.Conv2d(i, o, 3, 1, 1), nn.GELU(), nn.MaxPool2d(2)]
            s.stem = nn.Sequential(*cb(3, 16), *cb(16, 32), *cb(32, 64), *cb(64, w)); n = 16
        elif stem == "cnnl":  # per-pixel LayerNorm over channels (channel-last)
            class CL(nn.Module):
                def __init__(s, i, o): super().__init__(); s.c = nn.Conv2d(i, o, 3, 1, 1); s.n = nn.LayerNorm(o)
                def forward(s, x): return F.max_pool2d(F.gelu(s.n(s.c(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)), 2)
            s.stem = nn.Sequential(CL(3, 16), CL(16, 32), CL(32, 64), CL(64, w)); n = 16
        s.pos = nn.Parameter(torch.randn(1, n, w) * 0.02); s.blocks = nn.Sequential(Block(w), Block(w)); s.norm = nn.LayerNorm(w); s.head = nn.Linear(w, 12)
    def forward(s, x):
        h = s.stem(x).flatten(2).transpose(1, 2) + s.pos
        return s.head(s.norm(s.blocks(h)).mean(1))
def run(stem, steps, lr=3e-3, aug=False):
    torch.manual_seed(0); m = Net(stem); opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(1); t0 = time.time(); out = []
    for st in range(steps):
        idx = torch.randint(0, len(Xa), (32,), generator=g); x = Xa[idx]
        if aug and torch.rand(1, generator=g) < 0.5: x = x.flip(3)
        for pg in opt.param_groups: pg["lr"] = lr * 0.5 * (1 + np.cos(np.pi * st / steps))
        loss = F.cross_entropy(m(x), Ya[idx]); opt.zero_grad(); loss.backward(); opt.step()
        if (st + 1) % (steps // 4) == 0:
            with torch.no_grad(): acc = (m(Xv).argmax(1) == Yv).float().mean().item()
            out.append(f"{st+1}:{acc:.3f}")
    print(stem, steps, lr, " ".join(out), f"{(time.time()-t0)/steps*1000:.1f} ms/step", flush=True)
for spec in sys.argv[2:]:
    a = spec.split(":"); run(a[0], int(a[1]), float(a[2]) if len(a) > 2 else 3e-3)
