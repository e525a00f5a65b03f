"""What keeps a run from being lost while it trains.

    StopSignals     Ctrl-C / SIGTERM: finish the step, save, print the resume command; twice: stop now
    NonFinite       a NaN/inf loss or gradient: skip that update; too many in a row: stop with a hint

The test hook that drives NonFinite on a healthy model (settings.fault_nan_steps) is poison(), outside it.
"""

from __future__ import annotations

import math
import signal

from ..errors import UserError
from ..console import log

SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


class Diverged(UserError):
    exit_code = 3


class StopSignals:
    """Inside `with StopSignals() as stop:` the first SIGINT/SIGTERM only sets stop.signum; the loop
    checks it at the next step boundary. A second one exits at once (code 128+signal): checkpoints are
    renamed into place only when complete, so stopping mid-write leaves nothing that looks finished."""

    def __enter__(self):
        self.signum = None
        self._before = {s: signal.signal(s, self._handle) for s in SIGNAL_NAMES}
        return self

    def __exit__(self, *exc):
        for s, handler in self._before.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:
            log(f"{SIGNAL_NAMES[signum]} again: stopping now, without saving this step")
            raise SystemExit(128 + signum)
        self.signum = signum
        log(f"{SIGNAL_NAMES[signum]}: finishing this step and saving a checkpoint (Ctrl-C again to stop at once)")

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class NonFinite:
    """Counts optimizer steps whose loss or gradient norm is NaN/inf."""

    def __init__(self, patience: int):
        self.patience = patience
        self.in_a_row: list[int] = []

    def ok(self, step: int, loss: float, grad_norm: float) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = []
            return True
        self.in_a_row.append(step)
        log(f"step {step}: loss {loss}, gradient norm {grad_norm}: step skipped, no update "
            f"({len(self.in_a_row)} in a row; stopping at {self.patience}, --max_nonfinite_steps)")
        return False

    @property
    def gave_up(self) -> bool:
        return len(self.in_a_row) >= self.patience

    def error(self, last_ckpt, args) -> Diverged:
        steps = self.in_a_row
        kept = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was saved before it"
        dtype = "" if args.torch_dtype in ("float32", "fp32") else f", or --torch_dtype float32 (now {args.torch_dtype})"
        return Diverged(f"training diverged: {len(steps)} steps in a row (steps {steps[0]}-{steps[-1]}) had a NaN/inf "
                        f"loss or gradient and were skipped; {kept}. Start again with a lower --learning_rate "
                        f"(now {args.learning_rate:g}){dtype}")


def poison(loss, step: int, steps: set[int]):
    """Test hook (settings.fault_nan_steps): a NaN loss, and so NaN gradients, at the chosen steps."""
    return loss * float("nan") if step in steps else loss
