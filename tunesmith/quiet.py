"""Known-harmless warnings of the libraries we build on, silenced in this one place.

Each entry names what triggers it and why it does not matter to a user. Warnings whose cause is ours
are fixed at the cause instead (the CUDA-graph AccumulateGrad stream warning: no loss keeps its
autograd graph past its backward, train/loop._eager_window / engine/cuda_graphs.GraphedRows._capture).
"""

from __future__ import annotations

import logging
import warnings

KNOWN = [
    # PEFT's PeftModel.__init__ reads model.is_gradient_checkpointing, which transformers 5.x deprecates
    # in favour of is_activation_checkpointing; same value, nothing to act on.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # PEFT's own patterns for fused MoE experts (qwen3_moe: rank and alpha doubled on gate_up_proj, which fuses two
    # projections) match the parameter, not a module name, so PEFT reports them unmatched; the adapter does take
    # them (its gate_up_proj lora_A has 2r rows per expert). tunesmith sets no other pattern.
    (RuntimeWarning, r"The following (rank|alpha)_pattern keys did not match any targeted module"),
]


class _DropBnbKernelsHubNotice(logging.Filter):
    """bitsandbytes logs at import that it could not fetch an optional CPU kernel from the kernels hub
    (no network, no `kernels` package); its built-in CPU path runs instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


_BNB_FILTER = _DropBnbKernelsHubNotice()  # one instance: addFilter keeps it once, however often silence() runs


def silence() -> None:
    for category, message in KNOWN:
        warnings.filterwarnings("ignore", message=message, category=category)
    # a logger's filters see only the records made on it: the module that logs the notice
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_BNB_FILTER)
