"""The model's decoder layers, and activation checkpointing on a share of them."""

from __future__ import annotations

import torch


def decoder_layers(model) -> list:
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def checkpoint_layers(model, share: float, preserve_rng: bool = True) -> int:
    """Recompute activations in `share` (0..1) of the decoder layers, spread evenly; returns how many.
    Our own wrapper around torch.utils.checkpoint (non-reentrant; the RNG state is kept so that
    dropout masks repeat, unless the layers draw none from it, as with lean LoRA, whose masks come
    from their own seeds, and which a CUDA graph needs): the same on every transformers version,
    and no hooks run twice."""
    from torch.utils.checkpoint import checkpoint

    layers = decoder_layers(model)
    n = round(share * len(layers))
    chosen = {round(i * len(layers) / n) for i in range(n)} if n else set()
    for i, layer in enumerate(layers):
        plain = layer.__dict__.pop("_tunesmith_plain_forward", None)
        if plain is not None:  # undo an earlier choice
            layer.forward = plain
        if i not in chosen:
            continue
        plain = layer.forward

        def forward(*args, _plain=plain, _layer=layer, **kwargs):
            if _layer.training and torch.is_grad_enabled():
                return checkpoint(_plain, *args, use_reentrant=False, preserve_rng_state=preserve_rng, **kwargs)
            return _plain(*args, **kwargs)

        layer._tunesmith_plain_forward = plain
        layer.forward = forward
    return len(chosen)
