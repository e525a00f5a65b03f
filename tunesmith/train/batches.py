"""What one optimizer step trains on: accumulation windows of samples, packed into padding-free rows
(position ids restart per sample), and the loss of a row at its answer positions."""

from __future__ import annotations

import itertools
import random
from ..engine import fused_loss, lora_linear, patches
from ..args import SftArguments
from ..data.template import IGNORE, Encoded


def batch_windows(n: int, batch_size: int, accumulation: int, seed: int):
    """Endless (epoch, sample indices) per optimizer step; a fresh seeded shuffle each epoch."""
    epoch = 0
    while True:
        order = list(range(n))
        random.Random(seed + epoch).shuffle(order)
        per_window = batch_size * accumulation
        for start in range(0, n, per_window):
            yield epoch, order[start:start + per_window]
        epoch += 1


def with_last(items):
    """(item, is_last) pairs, without materialising the iterator."""
    it = iter(items)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True


def micro_batches(samples: list[Encoded], args: SftArguments, device: str):
    """The forward passes of one window: packed rows (padding-free) or plain padded micro-batches.
    Everything is built on the CPU and moved once, so the GPU never waits on the host mid-step."""
    import torch

    if args.packing_window:
        # Rows of up to max(max_length, batch*max_length) tokens; samples never attend to each other
        # (per-sample attention from the boundaries in cu_seq_lens; position ids restart per sample).
        budget = max(args.max_length, args.per_device_train_batch_size * args.max_length)
        row: list[Encoded] = []
        for s in samples + [None]:
            if s is None or (row and sum(len(r.input_ids) for r in row) + len(s.input_ids) > budget):
                lengths = [len(r.input_ids) for r in row]
                batch = {
                    "input_ids": torch.tensor([[t for r in row for t in r.input_ids]]),
                    "labels": torch.tensor([[t for r in row for t in _shift(r.labels)]]),
                    "position_ids": torch.tensor([[p for n in lengths for p in range(n)]]),
                    "cu_seq_lens_q": torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32),
                }
                batch["cu_seq_lens_k"] = batch["cu_seq_lens_q"]
                yield _to_device(batch, device, max_length_q=max(lengths), max_length_k=max(lengths), attention_mask=None)
                row = []
            if s is not None:
                row.append(s)
        return
    bs = args.per_device_train_batch_size
    pad = 0
    for i in range(0, len(samples), bs):
        group = samples[i:i + bs]
        width = max(len(s.input_ids) for s in group)
        batch = {
            "input_ids": torch.tensor([s.input_ids + [pad] * (width - len(s.input_ids)) for s in group]),
            "labels": torch.tensor([_shift(s.labels) + [IGNORE] * (width - len(s.labels)) for s in group]),
            "attention_mask": torch.tensor([[1] * len(s.input_ids) + [0] * (width - len(s.input_ids)) for s in group]),
        }
        yield _to_device(batch, device, position_ids=None)


def _to_device(batch: dict, device: str, **plain) -> dict:
    """Tensors to the device (pinned + non-blocking on CUDA), plus where the loss is: the flat
    positions of answer tokens and their targets, found here so the forward needs no host sync."""
    import torch

    keep = (batch["labels"].reshape(-1) != IGNORE).nonzero().squeeze(1)
    batch["loss_positions"], batch["loss_targets"] = keep, batch["labels"].reshape(-1)[keep]
    cuda = device.startswith("cuda")
    out = {k: (v.pin_memory().to(device, non_blocking=True) if cuda else v.to(device)) for k, v in batch.items()}
    out.update(plain)
    return out


def _shift(labels: list[int]) -> list[int]:
    """Token t is predicted at position t-1: shift labels left once per sample (never across samples)."""
    return labels[1:] + [IGNORE]


def loss_of(model, batch, loss=fused_loss.linear_cross_entropy) -> "torch.Tensor":
    """Summed cross-entropy over answer tokens. The vocabulary projection runs only where there is
    loss, in chunks that are recomputed in backward, so the [tokens, vocab] logits never exist.
    `loss(hidden, head, targets)` at the answer positions: rlhf passes per-token log-probabilities."""
    base = model.get_base_model()
    lora_linear.begin_forward(batch["input_ids"].device)  # this pass's dropout masks
    extra = {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k") if k in batch}
    with patches.mixed_precision(model, base.dtype, batch["input_ids"].device):
        out = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 position_ids=batch["position_ids"], use_cache=False, **extra)
        hidden = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
        hidden = hidden.index_select(0, batch["loss_positions"])
        head, cap = base.get_output_embeddings(), getattr(base.config, "final_logit_softcapping", None)
        scaling = getattr(base.config, "logits_scaling", 1.0)
        if scaling != 1.0 and head.bias is None:  # Granite divides its logits: head(h) / s is head(h / s)
            hidden = hidden / scaling
        if cap:  # Gemma 2's capped logits (tanh), as its forward computes them: the general chunked paths
            import torch

            def capped(h):
                return torch.tanh(head(h) / cap) * cap

            if loss is fused_loss.linear_cross_entropy:
                return fused_loss.chunked_cross_entropy(hidden, capped, batch["loss_targets"], chunk=1024)
            return loss(hidden, capped, batch["loss_targets"])  # (rlhf's per-token log-probabilities)
        return loss(hidden, head, batch["loss_targets"])


class AnswerTokens:
    """What fit() trains on for sft: a window's loss is the mean over its answer tokens, its samples are
    packed into rows by micro_batches and their loss is loss_of's. rlhf brings its own (train/preference.py)."""

    def units(self, samples: list[Encoded]) -> int:
        return sum(s.n_trained for s in samples)

    def length(self, sample: Encoded) -> int:
        return len(sample.input_ids)

    def batches(self, samples: list[Encoded], args: SftArguments, device: str):
        return list(micro_batches(samples, args, device))

    def metrics(self) -> dict:
        return {}
