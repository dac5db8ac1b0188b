#!/usr/bin/env python3
"""candle vs PyTorch on the same tiny captioning model (docs/models.md, "Speed against PyTorch").

The model is the tiny preset of src/model/ with the llava backbone and early fusion:
ViT (64 px images, patch 8 or 16, width 96, 4 heads, MLP ratio 2, pre-LN blocks, learned
position embeddings, no class token; llava reads the penultimate block, so a depth-d encoder
runs d-1 blocks) -> 2-layer GELU projector -> visual tokens prepended to the caption ->
LLaMA-style decoder (RMSNorm, RoPE rotate-half, fused qkv, SwiGLU gate_up/down, untied
lm_head; width 128, 4 heads, SwiGLU hidden 256), vocabulary 3000, 24-token captions, label
smoothing 0.1. Training steps count forward + backward + global-norm clipping (1.0) + AdamW
(lr 1e-3, weight decay 0.01 on linear matrices only) on both sides.

Cases (names as `examples/bench_candle.rs` takes them):
  full     2+2 layers (encoder depth + decoder depth), batch 16, everything trained (align phase)
  full44   4+4 layers, batch 32
  lora     2+2, batch 16: vision frozen, projector trained, LoRA r8 alpha 16 on the decoder's
           qkv/o/gate_up/down (frozen f32 base)
  qlora    as lora with the frozen decoder and encoder linears held 4-bit (Q4_0 blocks of 32,
           dequantized per forward on both sides)
  adapter  2+2, batch 16: bottleneck adapters (16) after each decoder attention and MLP
  greedy   32 images, greedy decoding with a KV cache, 24 new tokens at most
  beam3    32 images, beam search width 3 with a KV cache
and `matmul`: f32 GFLOP/s of square matmuls n = 1024, 1536, 2048 on each side.

Achieved GFLOP/s of training cases count the matmul FLOPs of one step as the model runs them
(every linear and attention product: forward 2*m*n*k; backward 2*m*n*k for the input gradient
plus 2*m*n*k for the weight gradient where the weight is trained), counted by hooks in one
PyTorch forward; the same count divides both sides' step times.

Every timed run of either side is a fresh process (candle: `bench_candle`; torch: this script
with `--torch-one`), so that per-process effects (memory placement, which kernels a library picks
at start-up) are sampled run by run on both sides rather than fixed for a whole invocation: on
this project's machines PyTorch's 1-thread speed is bimodal between invocations. Each row prints
the medians and, on the right, each side's slowest and fastest run.

Usage: scripts/bench-vs-torch.sh [--threads 1,2] [--runs 3] [--cases full,lora,...]
       [--patch 8,16] [--steps 8] [--check]
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 3000
T = 24
BOS, EOS = 1, 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# FLOP counter: set to a list to record one forward pass.
COUNT = None


class Lin(nn.Module):
    """The one linear seam: plain, LoRA-wrapped, or a Q4_0 frozen base with an f32 LoRA path."""

    def __init__(self, inp, out, bias, train_base=True, lora=None, quant=False):
        super().__init__()
        bound = 1.0 / math.sqrt(inp)
        w = torch.empty(out, inp).uniform_(-bound, bound)
        self.quant = quant and inp % 32 == 0
        if self.quant:
            # Q4_0: per block of 32, scale d = max/-8 (signed absmax), q = round(w/d)+8 in 0..15.
            blocks = w.view(out, inp // 32, 32)
            idx = blocks.abs().argmax(-1, keepdim=True)
            mx = blocks.gather(-1, idx)
            d = mx / -8.0
            inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
            q = (blocks * inv + 8.5).clamp(0, 15).floor().to(torch.int8) - 8
            self.register_buffer("q", q)
            self.register_buffer("d", d.to(torch.float16))
            self.weight = None
        else:
            self.weight = nn.Parameter(w, requires_grad=train_base)
        self.bias = nn.Parameter(torch.zeros(out), requires_grad=train_base) if bias else None
        self.inp, self.out = inp, out
        if lora is not None:
            r, alpha = lora
            self.lora_a = nn.Parameter(torch.empty(r, inp).uniform_(-bound, bound))
            self.lora_b = nn.Parameter(torch.zeros(out, r))
            self.scale = alpha / r
        else:
            self.lora_a = None

    def forward(self, x):
        if self.quant:
            w = (self.q.float() * self.d.float()).view(self.out, self.inp)
        else:
            w = self.weight
        y = F.linear(x, w, self.bias)
        if self.lora_a is not None:
            y = y + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale
        if COUNT is not None:
            rows = x.numel() // self.inp
            COUNT.append((rows, self.inp, self.out, w.requires_grad, x.requires_grad))
            if self.lora_a is not None:
                r = self.lora_a.shape[0]
                COUNT.append((rows, self.inp, r, True, x.requires_grad))
                COUNT.append((rows, r, self.out, True, True))
        return y


def attention(q, k, v, causal):
    if COUNT is not None:
        b, h, t, d = q.shape
        s = k.shape[2]
        # scores q k^T then weights @ v; a gradient flows to both operands or to neither
        g = q.requires_grad
        COUNT.append((b * h * t, d, s, g, g))
        COUNT.append((b * h * t, s, d, g, g))
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


class Adapter(nn.Module):
    def __init__(self, dim, k):
        super().__init__()
        self.down = Lin(dim, k, True)
        self.up = Lin(k, dim, True)
        nn.init.zeros_(self.up.weight)

    def forward(self, h):
        return h + self.up(F.gelu(self.down(h), approximate="tanh"))


class Sub(nn.Module):
    pass


class VitBlock(nn.Module):
    def __init__(self, w, heads, ratio, trained, quant):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(w, eps=1e-5)
        self.norm2 = nn.LayerNorm(w, eps=1e-5)
        self.attn = Sub()
        self.attn.qkv = Lin(w, 3 * w, True, trained, None, quant)
        self.attn.proj = Lin(w, w, True, trained, None, quant)
        self.mlp = Sub()
        self.mlp.fc1 = Lin(w, w * ratio, True, trained, None, quant)
        self.mlp.fc2 = Lin(w * ratio, w, True, trained, None, quant)
        for p in list(self.norm1.parameters()) + list(self.norm2.parameters()):
            p.requires_grad_(trained)

    def forward(self, x):
        b, n, w = x.shape
        qkv = self.attn.qkv(self.norm1(x)).view(b, n, 3, self.heads, w // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = attention(q, k, v, False).transpose(1, 2).reshape(b, n, w)
        x = x + self.attn.proj(a)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x)), approximate="tanh"))


class Vit(nn.Module):
    def __init__(self, patch, width, blocks, trained, quant):
        super().__init__()
        self.p = patch
        n = (64 // patch) ** 2
        self.patch_embed = Lin(3 * patch * patch, width, True, trained, None, quant)
        self.pos_embed = nn.Parameter(torch.randn(n, width) * 0.02, requires_grad=trained)
        self.blocks = nn.ModuleList(VitBlock(width, 4, 2, trained, quant) for _ in range(blocks))

    def forward(self, img):
        b, c, h, w = img.shape
        p = self.p
        x = img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        x = x.reshape(b, (h // p) * (w // p), c * p * p)
        x = self.patch_embed(x) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return x


def rope_tables(d, max_pos, theta=10000.0):
    pos = torch.arange(max_pos, dtype=torch.float64)[:, None]
    i = torch.arange(d // 2, dtype=torch.float64)[None, :]
    a = pos / theta ** (2 * i / d)
    return a.cos().float(), a.sin().float()


def rope(x, cos, sin, off):
    t, half = x.shape[2], x.shape[3] // 2
    c, s = cos[off : off + t], sin[off : off + t]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


class RmsNorm(nn.Module):
    def __init__(self, w, trained):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(w), requires_grad=trained)

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, 1e-5)


class Layer(nn.Module):
    def __init__(self, w, hidden, heads, trained, lora, quant, adapter):
        super().__init__()
        self.heads = heads
        self.input_layernorm = RmsNorm(w, trained)
        self.post_attention_layernorm = RmsNorm(w, trained)
        self.self_attn = Sub()
        self.self_attn.qkv_proj = Lin(w, 3 * w, False, trained, lora, quant)
        self.self_attn.o_proj = Lin(w, w, False, trained, lora, quant)
        self.mlp = Sub()
        self.mlp.gate_up_proj = Lin(w, 2 * hidden, False, trained, lora, quant)
        self.mlp.down_proj = Lin(hidden, w, False, trained, lora, quant)
        self.adapter_attn = Adapter(w, adapter) if adapter else None
        self.adapter_mlp = Adapter(w, adapter) if adapter else None

    def forward(self, x, cos, sin, cache, off):
        b, t, w = x.shape
        qkv = self.self_attn.qkv_proj(self.input_layernorm(x)).view(b, t, 3, self.heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        q, k = rope(q, cos, sin, off), rope(k, cos, sin, off)
        if cache is not None:
            if cache[0] is not None:
                k = torch.cat([cache[0], k], 2)
                v = torch.cat([cache[1], v], 2)
            cache[0], cache[1] = k, v
        a = attention(q, k, v, t > 1).transpose(1, 2).reshape(b, t, w)
        a = self.self_attn.o_proj(a)
        if self.adapter_attn is not None:
            a = self.adapter_attn(a)
        x = x + a
        g, u = self.mlp.gate_up_proj(self.post_attention_layernorm(x)).chunk(2, -1)
        m = self.mlp.down_proj(F.silu(g) * u)
        if self.adapter_mlp is not None:
            m = self.adapter_mlp(m)
        return x + m


class Lm(nn.Module):
    def __init__(self, depth, trained, lora, quant, adapter, max_pos):
        super().__init__()
        w = 128
        self.embed_tokens = nn.Embedding(VOCAB, w)
        nn.init.normal_(self.embed_tokens.weight, std=0.02)
        self.embed_tokens.weight.requires_grad_(trained)
        self.layers = nn.ModuleList(
            Layer(w, 256, 4, trained, lora, quant, adapter) for _ in range(depth)
        )
        self.norm = RmsNorm(w, trained)
        self.lm_head = Lin(w, VOCAB, False, trained, None, quant)
        cos, sin = rope_tables(w // 4, max_pos)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def forward(self, x, caches=None, off=0):
        for i, layer in enumerate(self.layers):
            x = layer(x, self.cos, self.sin, None if caches is None else caches[i], off)
        return x

    def logits(self, h):
        return self.lm_head(self.norm(h))


class Captioner(nn.Module):
    def __init__(self, patch, depth, peft):
        super().__init__()
        full = peft is None
        lora = (8, 16.0) if peft in ("lora", "qlora") else None
        quant = peft == "qlora"
        adapter = 16 if peft == "adapter" else 0
        self.vision = Vit(patch, 96, depth - 1, full, quant)
        self.connector = Sub()
        self.connector.projector = Sub()
        self.connector.projector.fc1 = Lin(96, 128, True)
        self.connector.projector.fc2 = Lin(128, 128, True)
        self.nv = (64 // patch) ** 2
        # lm_head is an LM linear outside the default LoRA targets: frozen under PEFT, and 4-bit
        # under QLoRA like every frozen encoder / decoder linear whose input width divides by 32.
        self.lm = Lm(depth, full, lora, quant, adapter, self.nv + T + 2)

    def visual(self, img):
        p = self.connector.projector
        return p.fc2(F.gelu(p.fc1(self.vision(img)), approximate="tanh"))

    def loss(self, img, inp, tgt):
        vis = self.visual(img)
        x = torch.cat([vis, self.lm.embed_tokens(inp)], 1)
        h = self.lm(x)[:, self.nv :]
        logits = self.lm.logits(h)
        return F.cross_entropy(logits.reshape(-1, VOCAB), tgt.reshape(-1), label_smoothing=0.1)

    def begin(self, img, repeat):
        vis = self.visual(img)
        if repeat > 1:
            vis = vis.repeat_interleave(repeat, 0)
        n = vis.shape[0]
        bos = torch.full((n, 1), BOS, dtype=torch.long)
        x = torch.cat([vis, self.lm.embed_tokens(bos)], 1)
        caches = [[None, None] for _ in self.lm.layers]
        h = self.lm(x, caches, 0)
        return self.lm.logits(h[:, -1]), caches, x.shape[1]

    def step(self, tok, caches, off):
        h = self.lm(self.lm.embed_tokens(tok[:, None]), caches, off)
        return self.lm.logits(h[:, 0])


CASES = {
    "full": (2, 16, None),
    "full44": (4, 32, None),
    "lora": (2, 16, "lora"),
    "qlora": (2, 16, "qlora"),
    "adapter": (2, 16, "adapter"),
    "greedy": (2, 32, None),
    "beam3": (2, 32, None),
}


def make_batch(patch, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(n, 3, 64, 64, generator=g) * 2 - 1
    cap = torch.randint(3, VOCAB, (n, T - 1), generator=g)
    inp = torch.cat([torch.full((n, 1), BOS), cap], 1)
    tgt = torch.cat([cap, torch.full((n, 1), EOS)], 1)
    return img, inp, tgt


def optimizer(model):
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        matrix = p.dim() >= 2 and "emb" not in name and "norm" not in name and "pos" not in name
        (decay if matrix else rest).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
    )


def step_flops(model, img, inp, tgt):
    global COUNT
    COUNT = []
    model.loss(img, inp, tgt)  # with autograd on, so requires_grad tells which gradients run
    recs, COUNT = COUNT, None
    total = 0
    for rows, k, n, w_grad, x_grad in recs:
        f = 2 * rows * k * n
        total += f * (1 + int(w_grad) + int(x_grad))
    return total


def torch_train(case, patch, steps, warmup):
    depth, bsz, peft = CASES[case]
    torch.manual_seed(0)
    model = Captioner(patch, depth, peft)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(model)
    img, inp, tgt = make_batch(patch, bsz)
    flops = step_flops(model, img, inp, tgt)
    fwd = bwd = upd = 0.0
    for s in range(warmup + steps):
        if s == warmup:
            fwd = bwd = upd = 0.0
            start = time.perf_counter()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model.loss(img, inp, tgt)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        t3 = time.perf_counter()
        fwd, bwd, upd = fwd + t1 - t0, bwd + t2 - t1, upd + t3 - t2
    secs = time.perf_counter() - start
    ms = lambda x: 1e3 * x / steps
    return {
        "samples_per_s": steps * bsz / secs,
        "fwd_ms": ms(fwd),
        "bwd_ms": ms(bwd),
        "opt_ms": ms(upd),
        "step_ms": 1e3 * secs / steps,
        "flops": flops,
        "trainable": sum(p.numel() for p in params),
    }


@torch.inference_mode()
def greedy(model, img, max_len):
    logits, caches, off = model.begin(img, 1)
    n = img.shape[0]
    done = torch.zeros(n, dtype=torch.bool)
    out = []
    for s in range(max_len):
        t = logits.argmax(-1)
        t = torch.where(done, torch.full_like(t, EOS), t)
        out.append(t)
        done |= t == EOS
        if bool(done.all()) or s + 1 == max_len:
            break
        logits = model.step(t, caches, off)
        off += 1
    toks = torch.stack(out, 1).tolist()
    return [r[: r.index(EOS)] if EOS in r else r for r in toks]


@torch.inference_mode()
def beam(model, img, max_len, w=3):
    """Same rules as src/decode: top 2w candidates per image, EOS among the first w finishes a
    hypothesis, w live beams continue, length penalty 1.0, an image stops with w finished."""
    logits, caches, off = model.begin(img, w)
    b = img.shape[0]
    scores = torch.full((b * w,), float("-inf"))
    scores[::w] = 0.0
    hist = [[] for _ in range(b * w)]
    finished = [[] for _ in range(b)]
    done = [False] * b
    for s in range(max_len):
        lp = torch.log_softmax(logits, -1) + scores[:, None]
        top_s, top_i = lp.view(b, -1).topk(2 * w, -1)
        top_s, top_i = top_s.tolist(), top_i.tolist()
        rows, nxt, new_scores = [], [], []
        for i in range(b):
            if done[i]:
                rows += [i * w] * w
                nxt += [EOS] * w
                new_scores += [float("-inf")] * w
                continue
            kept = 0
            for rank, (sc, flat) in enumerate(zip(top_s[i], top_i[i])):
                r, v = i * w + flat // VOCAB, flat % VOCAB
                if v == EOS:
                    if rank < w:
                        finished[i].append((sc / max(len(hist[r]) + 1, 1), hist[r]))
                elif kept < w:
                    rows.append(r)
                    nxt.append(v)
                    new_scores.append(sc)
                    kept += 1
            while kept < w:
                rows.append(i * w)
                nxt.append(EOS)
                new_scores.append(float("-inf"))
                kept += 1
            if len(finished[i]) >= w:
                done[i] = True
        scores = torch.tensor(new_scores)
        if all(done):
            break
        idx = torch.tensor(rows)
        for c in caches:
            c[0], c[1] = c[0].index_select(0, idx), c[1].index_select(0, idx)
        hist = [hist[r] + [v] for r, v in zip(rows, nxt)]
        if s + 1 == max_len:
            for r, h in enumerate(hist):
                if scores[r] > float("-inf") and not done[r // w]:
                    finished[r // w].append((float(scores[r]) / len(h), h))
            break
        logits = model.step(torch.tensor(nxt), caches, off)
        off += 1
    return [max(f, key=lambda x: x[0])[1] if f else [] for f in finished]


def torch_decode(case, patch, runs, warmup):
    depth, bsz, _ = CASES[case]
    torch.manual_seed(0)
    model = Captioner(patch, depth, None).eval()
    img, _, _ = make_batch(patch, bsz)
    secs, tokens = 0.0, 0
    for r in range(warmup + runs):
        t0 = time.perf_counter()
        out = greedy(model, img, T) if case == "greedy" else beam(model, img, T)
        if r >= warmup:
            secs += time.perf_counter() - t0
            tokens += sum(len(o) for o in out)
    return {"captions_per_s": runs * bsz / secs, "tokens": tokens // max(runs, 1)}


def torch_matmul():
    out = {}
    for n in (1024, 1536, 2048):
        g = torch.Generator().manual_seed(n)
        a = torch.rand(n, n, generator=g) * 2 - 1
        b = torch.rand(n, n, generator=g) * 2 - 1
        a @ b
        reps = max(4 * 2048**3 // n**3, 2)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        out[str(n)] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
    return {"gflops": out}


def cpu_isa():
    """The CPU model and its widest vector extensions, from /proc/cpuinfo (what lscpu shows)."""
    model, flags = "?", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() == "model name" and model == "?":
                    model = val.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "avx512_fp16", "amx_tile"]
    have = [f for f in wanted if f in flags]
    return f"{model}; {' '.join(have) if have else 'no AVX2'}; {'AVX-512' if 'avx512f' in flags else 'no AVX-512'}"


def candle(case, patch, threads, steps, warmup, export=None):
    exe = os.path.join(ROOT, "target", "release", "examples", "bench_candle")
    cmd = [exe, case, "--patch", str(patch), "--steps", str(steps), "--warmup", str(warmup)]
    if export:
        cmd += ["--export", export]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def torch_fresh(case, patch, threads, steps, warmup):
    """One torch run in a fresh process (see the module doc)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--torch-one",
           f"{case},{patch},{threads},{steps},{warmup}"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def check(patch):
    """Loads candle's initial weights and batch into the PyTorch model and compares the losses
    of the first training steps: the two sides compute the same function and update."""
    from safetensors.torch import load_file

    import tempfile

    ok = True
    for case in ("full", "full44"):
        with tempfile.TemporaryDirectory() as d:
            c = candle(case, patch, 1, 2, 2, export=d)
            depth, bsz, _ = CASES[case]
            torch.manual_seed(0)
            model = Captioner(patch, depth, None)
            w = load_file(os.path.join(d, "weights.safetensors"))
            missing, unexpected = model.load_state_dict(w, strict=False)
            missing = [m for m in missing if not m.endswith(("cos", "sin"))]
            if missing or unexpected:
                print(f"{case}: key mismatch, missing {missing} unexpected {unexpected}")
                ok = False
                continue
            b = load_file(os.path.join(d, "batch.safetensors"))
            img, inp, tgt = b["images"], b["input_ids"].long(), b["target_ids"].long()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = optimizer(model)
        losses = []
        for _ in range(len(c["losses"])):
            opt.zero_grad(set_to_none=True)
            loss = model.loss(img, inp, tgt)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
        diff = max(abs(a - b) for a, b in zip(losses, c["losses"]))
        good = diff < 1e-3
        ok &= good
        print(
            f"check {case} patch {patch}: candle losses {[round(x, 5) for x in c['losses']]}"
            f" torch {[round(x, 5) for x in losses]} max diff {diff:.2e} {'ok' if good else 'MISMATCH'}"
        )
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cases", default="full,full44,lora,qlora,adapter,greedy,beam3")
    ap.add_argument("--patch", default="8")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--check", action="store_true", help="only check that both sides agree")
    ap.add_argument("--no-matmul", action="store_true")
    ap.add_argument("--json", help="also write every run here (json lines)")
    ap.add_argument("--torch-one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_interop_threads(1)
    if a.torch_one:
        case, patch, th, steps, warm = a.torch_one.split(",")
        torch.set_num_threads(int(th))
        fn = torch_decode if case in ("greedy", "beam3") else torch_train
        print(json.dumps(fn(case, int(patch), int(steps), int(warm))))
        return
    patches = [int(p) for p in a.patch.split(",")]
    if a.check:
        sys.exit(0 if all(check(p) for p in patches) else 1)
    threads = [int(t) for t in a.threads.split(",")]
    cases = a.cases.split(",")
    log = open(a.json, "w") if a.json else None
    print(f"torch {torch.__version__}; load average at start {os.getloadavg()}", flush=True)
    print(f"host: {cpu_isa()}", flush=True)
    rows = []
    head = "threads patch case      candle     torch  ratio  GFLOP/s c/t   step split fwd+bwd+opt (median ms)"
    for th in threads:
        torch.set_num_threads(th)
        if not a.no_matmul:
            cm = candle("matmul", 8, th, 1, 0)
            c = cm["gflops"]
            t = torch_matmul()["gflops"]
            print(f"threads {th}: candle's own kernels run at {cm.get('isa', '?')}")
            print(
                f"threads {th}: f32 matmul GFLOP/s n=1024/1536/2048: candle "
                + "/".join(f"{c[k]:.0f}" for k in ("1024", "1536", "2048"))
                + ", torch "
                + "/".join(f"{t[k]:.0f}" for k in ("1024", "1536", "2048")),
                flush=True,
            )
        print("  (training: samples/s; decoding: captions/s; medians of alternating runs)")
        print(head, flush=True)
        for patch in patches:
            for case in cases:
                cr, tr = [], []
                dec = case in ("greedy", "beam3")
                steps = max(2, a.steps // 4) if dec else a.steps
                warm = 1 if dec else a.warmup
                for r in range(a.runs):
                    order = ("candle", "torch") if r % 2 == 0 else ("torch", "candle")
                    for side in order:
                        if side == "candle":
                            cr.append(candle(case, patch, th, steps, warm))
                        else:
                            tr.append(torch_fresh(case, patch, th, steps, warm))
                        if log:
                            rec = (cr if side == "candle" else tr)[-1]
                            log.write(json.dumps(dict(rec, side=side, case=case, patch=patch, threads=th)) + "\n")
                key = "captions_per_s" if dec else "samples_per_s"
                cm = statistics.median(x[key] for x in cr)
                tm = statistics.median(x[key] for x in tr)
                row = {"threads": th, "patch": patch, "case": case, "candle": cm, "torch": tm}
                line = f"{th:>2} {patch:>5} {case:<8} {cm:>9.1f} {tm:>9.1f} {cm / tm:>6.2f}x"
                span = lambda xs: f"{min(x[key] for x in xs):.0f}-{max(x[key] for x in xs):.0f}"
                row["candle_range"], row["torch_range"] = span(cr), span(tr)
                if not dec:
                    f = tr[0]["flops"]
                    cg = f * cm / (CASES[case][1] * 1e9)
                    tg = f * tm / (CASES[case][1] * 1e9)
                    med = lambda xs, k: statistics.median(x[k] for x in xs)
                    line += (
                        f"  {cg:>6.1f} {tg:>6.1f}   candle {med(cr, 'fwd_ms'):.0f}+{med(cr, 'bwd_ms'):.0f}+{med(cr, 'opt_ms'):.0f}"
                        f" torch {med(tr, 'fwd_ms'):.0f}+{med(tr, 'bwd_ms'):.0f}+{med(tr, 'opt_ms'):.0f} ms"
                    )
                rows.append(row)
                print(line + f"   runs: candle {row['candle_range']}, torch {row['torch_range']}", flush=True)
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
