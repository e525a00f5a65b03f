"""`tunesmith data inspect DATASET...`: what training would see, before any GPU time is spent.

Record counts per source after sampling, token-length statistics against --max_length, and rendered
samples with the trained tokens in [[double brackets]]. Uses (and fills) the same tokenized cache as sft.
"""

from __future__ import annotations

import numpy as np

from ..args import InspectArguments
from ..model.load import load_tokenizer
from ..model.resolve import resolve_model
from .cache import NO_LOSS, TOO_LONG, prepare

OPEN, CLOSE = "[[", "]]"


def run(args: InspectArguments) -> int:
    resolved = resolve_model(args.model)
    tok = load_tokenizer(resolved.path)
    data = prepare(args, tok, resolved.path)
    print(f"model {resolved.name}, --max_length {args.max_length}, --loss_scale {args.loss_scale}")
    print("sources (after sampling):")
    for line in data.report:
        print(f"  {line}")
    raw = np.asarray(data.store["raw_len"])[data.train_all]  # before truncation: what the user's data holds
    status = np.asarray(data.store["status"])[data.train_all]
    print(f"samples: {len(raw)} for training, {len(data.val)} for validation")
    if len(raw):
        p50, p95 = np.percentile(raw, [50, 95])
        print(f"tokens per sample: min {raw.min()}  mean {raw.mean():.1f}  p50 {p50:.0f}  p95 {p95:.0f}  max {raw.max()}")
    over = int((raw > args.max_length).sum())
    fate = {"delete": "dropped", "right": "cut at the end", "left": "cut at the start"}[args.truncation_strategy]
    print(f"longer than --max_length {args.max_length}: {over} ({fate}: --truncation_strategy {args.truncation_strategy})")
    if (status == NO_LOSS).any():
        print(f"no answer tokens to train on: {int((status == NO_LOSS).sum())} (skipped)")
    kept = [data.train[i] for i in range(min(len(data.train), 2000))]  # enough for a share, cheap
    if kept:
        trained = sum(s.n_trained for s in kept)
        total = sum(len(s.input_ids) for s in kept)
        print(f"trained tokens: {100 * trained / total:.1f}% of all tokens (answers and their end-of-turn token)")
    for k in range(min(args.samples, len(data.train))):
        row = int(data.train.rows[k])
        print(f"\nsample {k + 1} ({data.sources[row]}); trained tokens are in {OPEN} {CLOSE}:")
        print(render(tok, data.train[k].input_ids, data.train[k].labels))
    if not len(data.train):
        print("no usable samples: " + ("all are too long" if (status == TOO_LONG).all() else "see the counts above"))
    return 0


def render(tok, ids: list[int], labels: list[int]) -> str:
    """The sample's text with every run of trained tokens wrapped in [[ ]]."""
    out, start = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or (labels[k] != -100) != (labels[start] != -100):
            text = tok.decode(ids[start:k])
            out.append(f"{OPEN}{text}{CLOSE}" if labels[start] != -100 else text)
            start = k
    return "".join(out)
