"""The environment switches tunesmith reads, in one place. Each is read when it is asked for, so a test or a
launcher may set it per process. (Paths are not here: TUNESMITH_HOME and TUNESMITH_WHEEL_DIR live with
model/resolve, which uses them.)

    TUNESMITH_NO_PROGRESS=1        no progress bar (logs, CI, the web UI's file-backed runs)
    TUNESMITH_NO_PREFETCH=1        do not read the weight files ahead of the imports (and do not stage them)
    TUNESMITH_NO_STAGE=1           do not copy the weights onto the GPU during start-up (model/preload)
    TUNESMITH_PREFETCH_READERS=N   reader threads of the prefetch (default 4)
    TUNESMITH_KERNEL_PREBUILD=0    do not build the Triton kernels in worker processes during start-up
    TUNESMITH_STATUS_FILE=PATH     `sft` keeps its state there as JSON (train/status.py; the web UI sets it)
    TUNESMITH_PEFT_EXPERTS=1       an MoE's expert LoRA runs PEFT's own forward (merged into the expert weights),
                                   not engine/moe_lora.py's: the baseline bench/family_speed.sh measures beside it

Test hooks, not user features (they make healthy runs fail on purpose, so tests can check the fallbacks):

    TUNESMITH_FAULT_CAPTURE=N[,M]  the Nth CUDA-graph capture meets an operation that cannot be captured
    TUNESMITH_FAULT_NAN_STEPS=3,4  the loss of those optimizer steps becomes NaN
"""

from __future__ import annotations

import os
from pathlib import Path


def _on(name: str) -> bool:
    return os.environ.get(name) == "1"


def _numbers(name: str) -> set[int]:
    return {int(s) for s in os.environ.get(name, "").split(",") if s.strip().isdigit()}


def no_progress() -> bool:
    return _on("TUNESMITH_NO_PROGRESS")


def no_prefetch() -> bool:
    return _on("TUNESMITH_NO_PREFETCH")


def no_stage() -> bool:
    return _on("TUNESMITH_NO_STAGE")


def prefetch_readers() -> int:
    value = os.environ.get("TUNESMITH_PREFETCH_READERS", "4")
    return max(1, int(value)) if value.isdigit() else 4


def kernel_prebuild() -> bool:
    return os.environ.get("TUNESMITH_KERNEL_PREBUILD", "1") != "0"


def status_file() -> Path | None:
    value = os.environ.get("TUNESMITH_STATUS_FILE")
    return Path(value) if value else None


def peft_experts() -> bool:
    return _on("TUNESMITH_PEFT_EXPERTS")


def fault_captures() -> set[int]:
    return _numbers("TUNESMITH_FAULT_CAPTURE")


def fault_nan_steps() -> set[int]:
    return _numbers("TUNESMITH_FAULT_NAN_STEPS")
