#!/usr/bin/env python3
"""Reference numbers for tests/train_optim.rs: AdamW over parameter groups with selective weight decay,
gradient accumulation, global-norm clipping and the warmup + cosine schedule, written from the formulas of
torch.optim.AdamW (single-tensor path) and torch.nn.utils.clip_grad_norm_, in float64, pure Python.

Run: python3 tests/train_fixtures/adamw_reference.py > tests/train_fixtures/adamw_reference.json
The Rust test rebuilds the same parameters and gradients from the same closed forms (below).
"""
import json
import math

CFG = dict(steps=6, lr=0.01, warmup=2, min_lr_ratio=0.1, weight_decay=0.1, beta1=0.9, beta2=0.99,
           eps=1e-8, grad_clip=1.0, accum=2, lr_mult=dict(vision=0.5, connector=1.0, lm=1.0, adapter=2.0))
# name -> (number of elements, group, decay); shapes do not matter to the arithmetic
PARAMS = [("w", 6, "lm", True), ("b", 3, "adapter", False), ("e", 4, "vision", False)]
SKIP = {("e", 3)}  # "e" gets no gradient at step 3: torch skips such a parameter entirely


def init(pid, i):
    return 0.1 * (i + 1) - 0.3 + 0.05 * pid


def grad(step, micro, pid, i):
    scale = 8.0 if step % 2 == 0 else 0.1
    return scale * math.sin(1.0 + 7.0 * step + 3.0 * micro + 0.5 * i + pid)


def lr_at(step, total, warmup, lr, min_ratio):
    if step < warmup:
        return lr * (step + 1) / warmup
    floor = lr * min_ratio
    if step >= total:
        return floor
    span = max(total - warmup, 1)
    p = (step - warmup) / span
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


def main():
    c = CFG
    w = {n: [init(pid, i) for i in range(k)] for pid, (n, k, _, _) in enumerate(PARAMS)}
    m = {n: [0.0] * k for n, k, _, _ in PARAMS}
    v = {n: [0.0] * k for n, k, _, _ in PARAMS}
    t = {n: 0 for n, _, _, _ in PARAMS}
    lrs, norms = [], []
    for s in range(c["steps"]):
        lr = lr_at(s, c["steps"], c["warmup"], c["lr"], c["min_lr_ratio"])
        g = {}
        for pid, (n, k, _, _) in enumerate(PARAMS):
            if (n, s) in SKIP:
                continue
            g[n] = [sum(grad(s, mi, pid, i) for mi in range(c["accum"])) / c["accum"] for i in range(k)]
        norm = math.sqrt(sum(x * x for gs in g.values() for x in gs))
        coef = min(c["grad_clip"] / (norm + 1e-6), 1.0)
        lrs.append(lr)
        norms.append(norm)
        for n, k, group, decay in PARAMS:
            if n not in g:
                continue
            t[n] += 1
            plr = lr * c["lr_mult"][group]
            bc1 = 1 - c["beta1"] ** t[n]
            bc2 = 1 - c["beta2"] ** t[n]
            for i in range(k):
                gi = g[n][i] * coef
                if decay:
                    w[n][i] *= 1 - plr * c["weight_decay"]
                m[n][i] = c["beta1"] * m[n][i] + (1 - c["beta1"]) * gi
                v[n][i] = c["beta2"] * v[n][i] + (1 - c["beta2"]) * gi * gi
                denom = math.sqrt(v[n][i]) / math.sqrt(bc2) + c["eps"]
                w[n][i] -= plr / bc1 * m[n][i] / denom
    print(json.dumps(dict(config=c, lr=lrs, grad_norm=norms, final=w, m=m, v=v), indent=1))


if __name__ == "__main__":
    main()
