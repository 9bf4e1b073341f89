"""MoCo v2's InfoNCE loss term by term, epoch by epoch: why the loss can climb while kNN rises.

    python tools/infonce_terms.py --preset laptop --dataset imagefolder --data-dir cifar10-images \
        --device cpu --out-dir runs/infonce-terms

Takes mocov2.py's flags and runs mocov2.py's own main() with them, unchanged: the same computations in
the same order (the run's metrics.jsonl equals that of `python mocov2.py` with the same flags). Around
each call of mocov2.info_nce it records, without gradient, what the loss is made of. Per query q (l2-
normalised), its key k and the K queued keys n_j, at temperature T:

    loss = -cos(q, k) / T + log( exp(cos(q, k) / T) + sum_j exp(cos(q, n_j) / T) )

and the log term is at least that of the negatives alone, log sum_j exp(cos(q, n_j) / T). So the loss
rises when the positive similarity cos(q, k) falls, or when the queries come closer to the queued keys.
Written per epoch to infonce_terms.jsonl in the run directory, and printed as a table:
  positive     mean cos(q, k)
  negative     mean cos(q, n_j) over the queue
  hardest      mean over queries of the largest cos(q, n_j)
  lse_negatives  mean of log sum_j exp(cos(q, n_j) / T)
  loss         the mean InfoNCE loss of those calls (each step calls it twice, once per view)
A fresh run only: --resume is refused (the terms of the steps before it are not in last.pt).
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import mocov2  # noqa: E402
from engine.files import atomic_write  # noqa: E402

TERMS = ("loss", "positive", "negative", "hardest", "lse_negatives")


def recording(info_nce, calls):
    """info_nce, which also appends to `calls` the terms of its loss (see the module's docstring)."""

    def info_nce_recorded(q, k, queue, temperature):
        loss = info_nce(q, k, queue, temperature)
        with torch.no_grad():
            q = F.normalize(q.float(), dim=1)
            k = F.normalize(k.float(), dim=1)
            positive = (q * k).sum(dim=1)  # N
            negative = q @ queue.T  # N x K
            calls.append(
                {
                    "loss": loss.item(),
                    "positive": positive.mean().item(),
                    "negative": negative.mean().item(),
                    "hardest": negative.max(dim=1).values.mean().item(),
                    "lse_negatives": torch.logsumexp(negative / temperature, dim=1).mean().item(),
                }
            )
        return loss

    return info_nce_recorded


def per_epoch(calls, epoch_ends):
    """Average the calls of each epoch; epoch_ends: the step at which each epoch ended (metrics.jsonl)."""
    rows, start = [], 0
    for epoch, end in enumerate(epoch_ends, start=1):
        chunk = calls[2 * start : 2 * end]  # two calls per step: one per view
        rows.append({"epoch": epoch, "step": end, **{t: sum(c[t] for c in chunk) / len(chunk) for t in TERMS}})
        start = end
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = mocov2.parse_args(argv)
    if args.resume:
        raise common.ConfigError("--resume: this tool measures a fresh run only; drop --resume")
    calls, info_nce = [], mocov2.info_nce
    mocov2.info_nce = recording(info_nce, calls)  # moco_loss looks info_nce up at each call: it gets this one
    try:
        mocov2.main(argv)
    finally:
        mocov2.info_nce = info_nce
    out = Path(args.out_dir)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = per_epoch(calls, [line["step"] for line in lines])
    text = "".join(json.dumps(row) + "\n" for row in rows)
    atomic_write(out / "infonce_terms.jsonl", lambda f: f.write(text.encode()))
    print(
        "| epoch | loss | positive cos | negative cos | hardest negative cos | log-sum-exp of negatives | kNN top-1 |"
    )
    print("|---|---|---|---|---|---|---|")
    for row, line in zip(rows, lines):
        knn = "-" if line.get("knn_top1") is None else f"{line['knn_top1']:.2f}"
        print(
            f"| {row['epoch']} | {row['loss']:.3f} | {row['positive']:.3f} | {row['negative']:.3f} | "
            f"{row['hardest']:.3f} | {row['lse_negatives']:.3f} | {knn} |"
        )
    print(f"wrote {out / 'infonce_terms.jsonl'}")


if __name__ == "__main__":
    common.run_cli(main)
