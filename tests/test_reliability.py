"""Never lose a run: real processes killed and interrupted with real signals, a real full disk and a
read-only folder (size-limited tmpfs mounts, when this user may mount), injected NaNs. The runs are
short (smollm2-135m, 4 steps); the reference is one uninterrupted run with the same flags.
One torch thread per run: on this shared 2-core machine that is ~6x faster than two contending ones,
and a bitwise comparison needs the same thread count in every run anyway."""

import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import GUIDE_DATA, curves, tunesmith

STEPS = 4
SFT = ["sft", "--model", "smollm2-135m", "--dataset", str(GUIDE_DATA), "--max_steps", str(STEPS), "--save_steps", "1",
       "--gradient_accumulation_steps", "1", "--max_length", "256", "--logging_steps", "1", "--learning_rate", "5e-4"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def sft(*args, check=True, env_extra=None):
    return tunesmith(*args, check=check, env_extra={**ONE_THREAD, **(env_extra or {})})


def start(*extra, env_extra=None) -> subprocess.Popen:
    env = {**os.environ, "TUNESMITH_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1", **ONE_THREAD, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "tunesmith", *SFT, *map(str, extra)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_checkpoint(out: Path, step: int, proc: subprocess.Popen, timeout=300) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(out.glob(f"v*/checkpoint-{step}"))
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"run ended ({proc.returncode}) before checkpoint-{step}:\n{proc.stderr.read()[-2000:]}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no checkpoint-{step} after {timeout} s")


def signal_after_first_checkpoint(out: Path, sig, expect_exit: int) -> str:
    """Start a run, send `sig` once checkpoint-1 exists, check the exit code; returns stderr."""
    proc = start("--output_dir", out)
    wait_for_checkpoint(out, 1, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == expect_exit, err[-2000:]
    return err


def adapter(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(ckpt / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path) -> None:
    import torch

    x, y = adapter(a), adapter(b)
    assert x.keys() == y.keys() and len(x) > 0
    differ = [k for k in x if not torch.equal(x[k], y[k])]
    assert not differ, f"{len(differ)} of {len(x)} tensors differ, e.g. {differ[0]}"


def last_checkpoint(proc) -> Path:
    return Path(proc.stdout.strip().splitlines()[-1].split("last_model_checkpoint: ")[1])


def logged_steps(run: Path) -> list[int]:
    lines = [json.loads(x) for x in (run / "logging.jsonl").read_text().splitlines()]
    return [int(x["global_step/max_steps"].split("/")[0]) for x in lines if "loss" in x]


def resume_command(stderr: str) -> list[str]:
    line = next(x for x in stderr.splitlines() if "continue with: " in x)
    cmd = shlex.split(line.split("continue with: ", 1)[1])
    assert cmd[0] == "tunesmith"
    return cmd[1:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its final checkpoint."""
    out = tmp_path_factory.mktemp("reference")
    return last_checkpoint(sft(*SFT, "--output_dir", out))


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MiB tmpfs: room for one smollm2 checkpoint (29 MiB), not two."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a size-limited tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_sigkill_at_a_random_point_then_resume_gives_the_same_adapter(tmp_path, reference):
    out = tmp_path / "out"
    kill_after = random.randint(1, STEPS - 1)
    proc = start("--output_dir", out)
    wait_for_checkpoint(out, kill_after, proc)
    time.sleep(random.uniform(0, 1.5))  # somewhere inside the next step (or its checkpoint write)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    print(f"killed after checkpoint-{kill_after}")

    resumed = sft(*SFT, "--output_dir", out, "--resume_from_checkpoint", "true")
    assert "resuming from" in resumed.stderr
    final = last_checkpoint(resumed)
    assert_same_adapter(final, reference)
    assert final.parent == next(out.glob("v*"))  # the same run folder goes on
    assert logged_steps(final.parent) == list(range(1, STEPS + 1))  # every step logged once, in order
    assert [s for s, _ in curves(final.parent)["train/loss"]] == list(range(1, STEPS + 1))  # and drawn once


def test_ctrl_c_saves_prints_the_resume_command_and_it_continues_exactly(tmp_path, reference):
    err = signal_after_first_checkpoint(tmp_path / "out", signal.SIGINT, expect_exit=130)
    cmd = resume_command(err)
    saved = Path(cmd[cmd.index("--resume_from_checkpoint") + 1])
    assert saved.name in {f"checkpoint-{n}" for n in (2, 3)} and (saved / "adapter_model.safetensors").is_file()

    # The printed command, with one safe change (log less often), finishes the same training.
    final = last_checkpoint(sft(*cmd, "--logging_steps", "2"))
    assert_same_adapter(final, reference)


def test_sigterm_saves_and_exits_143(tmp_path):
    err = signal_after_first_checkpoint(tmp_path / "out", signal.SIGTERM, expect_exit=143)
    assert "SIGTERM" in err and "--resume_from_checkpoint" in resume_command(err)


def test_second_ctrl_c_stops_at_once_and_leaves_only_complete_checkpoints(tmp_path):
    from tunesmith.train.checkpoint import checkpoint_problem

    out, data = tmp_path / "out", tmp_path / "data.json"
    shutil.copy(GUIDE_DATA, data)
    proc = start("--output_dir", out, "--dataset", data)
    wait_for_checkpoint(out, 1, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    t = time.time()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.time() - t < 15, err[-2000:]
    assert "stopping now" in err
    run = next(out.glob("v*"))
    visible = sorted(p.name for p in run.glob("checkpoint-*"))
    assert visible and all(checkpoint_problem(run / name) is None for name in visible), visible

    # Resuming with edited data is refused, in one line that says so.
    data.write_text(data.read_text().replace("CSDN", "ACME"))
    refused = sft(*SFT, "--output_dir", out, "--dataset", data, "--resume_from_checkpoint", "true", check=False)
    assert refused.returncode == 2 and "training data differs" in refused.stderr
    assert len(refused.stderr.strip().splitlines()[-1]) > 40 and "Traceback" not in refused.stderr


def test_resume_with_a_changed_setting_is_refused_naming_it(reference):
    proc = sft(*SFT, "--lora_rank", "4", "--resume_from_checkpoint", reference, check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "--lora_rank 4" in last and "8" in last and "Traceback" not in proc.stderr


def test_full_disk_keeps_the_last_checkpoint_and_the_run_resumes_after_space_is_freed(small_disk, reference):
    out = small_disk / "out"
    proc = sft(*SFT, "--output_dir", out, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "the disk is full" in last and "checkpoint-1 is intact" in last, last
    run = next(out.glob("v*"))
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not list(run.glob(".checkpoint-*"))  # the half-written one is cleaned up, its space freed

    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)  # "free space"
    final = last_checkpoint(sft(*resume_command(last)))
    assert_same_adapter(final, reference)


def test_folder_turning_read_only_mid_run_gives_one_clear_error(small_disk):
    out = small_disk / "out"
    proc = start("--output_dir", out, "--save_total_limit", "1")
    ckpt = wait_for_checkpoint(out, 1, proc)
    for _ in range(50):  # EBUSY while the run has a file open for writing: try again a moment later
        if subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True).returncode == 0:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("could not make the folder read-only")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "Read-only file system" in last and "checkpoint-1 is intact" in last and "Traceback" not in err
    assert (ckpt / "adapter_model.safetensors").stat().st_size > 1_000_000


def test_nan_steps_are_skipped_and_too_many_in_a_row_stop_the_run(tmp_path):
    out = tmp_path / "out"
    proc = sft(*SFT, "--output_dir", out, "--max_steps", "6", "--max_nonfinite_steps", "2", check=False,
                     env_extra={"TUNESMITH_FAULT_NAN_STEPS": "2,4,5"})
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "step 2: loss nan" in proc.stderr and "step skipped" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "diverged" in last and "steps 4-5" in last and "--learning_rate" in last and "checkpoint-3" in last
    run = next(out.glob("v*"))
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3"]
    import torch

    optimizer = torch.load(run / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in optimizer["state"].values()} == {2}  # 3 steps, 1 skipped: 2 updates
    skipped = [json.loads(x) for x in (run / "logging.jsonl").read_text().splitlines() if "skipped" in x]
    assert [x["global_step/max_steps"] for x in skipped] == ["2/6", "4/6", "5/6"]


def test_infer_refuses_a_damaged_checkpoint(tmp_path, reference):
    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(reference, ckpt)
    weights = ckpt / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # one flipped bit-pattern inside a tensor: the file still parses
    weights.write_bytes(bytes(data))
    proc = tunesmith("infer", "--adapters", ckpt, "--query", "hi", check=False)
    assert proc.returncode == 2
    assert "damaged" in proc.stderr and "adapter_model.safetensors" in proc.stderr


def test_report_to_wandb_offline_none_and_unknown(tmp_path):
    """wandb with no account and no network (WANDB_MODE=offline) keeps the curves in the run folder; none writes
    no curves; an unknown name is one line before anything loads."""
    offline = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HTTPS_PROXY": "http://127.0.0.1:9"}  # no network
    proc = sft(*SFT, "--max_steps", "2", "--output_dir", tmp_path / "w", "--report_to", "wandb", env_extra=offline)
    run = last_checkpoint(proc).parent
    assert not (run / "runs").exists()
    [wandb_run] = (run / "wandb").glob("offline-run-*")
    [records] = wandb_run.glob("run-*.wandb")  # what `wandb sync` uploads: history records, values as JSON text
    data = records.read_bytes()
    losses = [json.loads(x)["loss"] for x in (run / "logging.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(losses) == 2 and b"train/loss" in data and b"train/grad_norm" in data
    assert all(json.dumps(v).encode() in data for v in losses) and "wandb sync" in proc.stderr

    run = last_checkpoint(sft(*SFT, "--max_steps", "1", "--output_dir", tmp_path / "n", "--report_to", "none")).parent
    assert sorted(p.name for p in run.iterdir()) == ["args.json", "checkpoint-1", "images", "logging.jsonl"]
    proc = sft(*SFT, "--output_dir", tmp_path / "x", "--report_to", "swanlab", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == ("tunesmith sft: error: --report_to swanlab: expected "
                                                            "tensorboard, wandb, none (or all)")


def test_the_trainer_keeps_a_status_file_for_watchers(tmp_path):
    """TUNESMITH_STATUS_FILE (set by the web UI): phase, step, ETA and checkpoint as JSON; a failure's one line."""
    path = tmp_path / "status.json"
    proc = sft(*SFT, "--max_steps", "2", "--output_dir", tmp_path / "o", env_extra={"TUNESMITH_STATUS_FILE": str(path)})
    final = last_checkpoint(proc)
    state = json.loads(path.read_text())
    assert state["phase"] == "finished" and state["step"] == state["max_steps"] == 2
    assert Path(state["checkpoint"]) == final and Path(state["run_dir"]) == final.parent
    assert state["remaining_s"] == 0 and state["elapsed_s"] > 0 and state["tokens_per_s"] > 0
    losses = [json.loads(x)["loss"] for x in (final.parent / "logging.jsonl").read_text().splitlines() if '"loss"' in x]
    assert state["loss"] == pytest.approx(losses[-1], rel=1e-5)

    proc = sft("sft", "--model", "smollm2-135m", "--dataset", tmp_path / "missing.jsonl", check=False,
               env_extra={"TUNESMITH_STATUS_FILE": str(path)})
    state = json.loads(path.read_text())
    assert proc.returncode == 2 and state["phase"] == "failed" and state["error"] == proc.stderr.strip()
