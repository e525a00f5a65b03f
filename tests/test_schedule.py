"""The learning-rate schedule is transformers' own (get_scheduler), with the formulas ms-swift's runs follow:
a linear warm-up over ceil(warmup_ratio * steps) steps, then cosine or linear decay to 0, or constant."""

import math

import pytest
import torch

from tunesmith.cli import parse_args
from tunesmith.train.recipe import build_optimizer


def rates(kind: str, steps: int, warmup_ratio: float) -> list[float]:
    args = parse_args("sft", ["--dataset", "x.json", "--lr_scheduler_type", kind, "--warmup_ratio", str(warmup_ratio),
                              "--learning_rate", "1e-4"])
    model = torch.nn.Linear(4, 4)
    optimizer, scheduler = build_optimizer(model, args, steps)
    out = []
    for _ in range(steps):  # the rate each optimizer step uses, as fit logs it after stepping
        optimizer.step()
        scheduler.step()
        out.append(scheduler.get_last_lr()[0])
    return out


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("ratio", [0.05, 0.18])
def test_schedules_follow_the_published_formulas(kind, ratio):
    steps, peak = 20, 1e-4
    warmup = math.ceil(ratio * steps)  # 1 or 4 steps, rounded up as transformers' Trainer does
    expected = []
    for s in range(1, steps + 1):
        if kind == "constant":  # transformers' (and so ms-swift's) constant ignores the warm-up
            expected.append(peak)
        elif s < warmup:
            expected.append(peak * s / warmup)
        else:
            progress = (s - warmup) / (steps - warmup)
            expected.append(peak * (0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress))
    assert rates(kind, steps, ratio) == pytest.approx(expected, abs=1e-12)
    assert expected[-1] == (peak if kind == "constant" else pytest.approx(0.0, abs=1e-12))


def test_an_unknown_schedule_is_one_line():
    from conftest import tunesmith

    proc = tunesmith("sft", "--dataset", "x.json", "--lr_scheduler_type", "onecycle", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "--lr_scheduler_type" in proc.stderr and "cosine" in proc.stderr
