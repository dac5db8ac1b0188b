#!/usr/bin/env python3
"""Reference numbers for tests/train_loss.rs: label-smoothed, masked token cross-entropy as
torch.nn.CrossEntropyLoss(label_smoothing=eps, reduction='mean') over the unmasked positions defines it,
and its gradient with respect to the logits, softmax - target_distribution divided by the count, in
float64, pure Python.

Run: python3 tests/train_fixtures/smoothed_ce_reference.py > tests/train_fixtures/smoothed_ce_reference.json
"""
import json
import math

N, V = 5, 7
EPS = 0.1
LOGITS = [[2.0 * math.sin(1.0 + 0.7 * i + 1.3 * j) for j in range(V)] for i in range(N)]
TARGETS = [(3 * i + 1) % V for i in range(N)]
MASK = [1, 1, 0, 1, 1]


def main():
    losses, grads = [], []
    count = sum(MASK)
    for row, y, m in zip(LOGITS, TARGETS, MASK):
        mx = max(row)
        lse = mx + math.log(sum(math.exp(x - mx) for x in row))
        logp = [x - lse for x in row]
        loss = (1 - EPS) * (-logp[y]) + EPS * (-sum(logp) / V)
        losses.append(loss)
        target = [EPS / V + ((1 - EPS) if j == y else 0.0) for j in range(V)]
        grads.append([m * (math.exp(lp) - t) / count for lp, t in zip(logp, target)])
    total = sum(l * m for l, m in zip(losses, MASK)) / count
    print(json.dumps(dict(logits=LOGITS, targets=TARGETS, mask=MASK, eps=EPS, loss=total, grad=grads), indent=1))


if __name__ == "__main__":
    main()
