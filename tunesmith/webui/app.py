"""`tunesmith web-ui`: train and chat in the browser, through the same code paths as the command line.

    tunesmith web-ui [--port 7860] [--output_dir output]      then open the printed http://127.0.0.1:7860/?token=…

The page (tunesmith/webui/web/) fills a form generated from SftArguments, shows the `tunesmith sft …` command it
stands for and runs exactly that command as a subprocess. Step, ETA, checkpoint and outcome come from the status
file the trainer keeps for it (train/status.py), the loss curve from the run's logging.jsonl. One run at a time per --output_dir: its pid is kept in OUTPUT_DIR/webui/run.json,
so a reloaded page, a second tab or a restarted web-ui sees the run instead of starting another. Stop sends
SIGINT: the run finishes its step and saves a checkpoint (train/stopping.py). `data inspect` runs the same way. Chat
loads base + adapter once (deploy's Engine) and streams base and tuned answers side by side.

Next to a browser: deploy.BrowserGuard refuses other Host names (DNS rebinding) and requests from pages of another
origin; every /api call needs the launch's token (printed in the URL, as notebook servers do) and every POST JSON, which
neither a form nor a cross-site "simple" fetch can send.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
import typing
from pathlib import Path
from typing import Literal, Optional
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from .. import cli
from ..inference import deploy
from ..args import DeployArguments, InspectArguments, SftArguments, WebUiArguments
from ..train import status as run_status
from ..train.checkpoint import checkpoints, writable_dir
from ..data.sources import BUILTIN, check_local
from ..errors import UserError
from ..files import write_atomic
from ..model.resolve import DEFAULT_MODEL, DEFAULT_MODELS
from ..console import log
from ..inference.deploy import ApiError, ChatRequest
from ..train.run_log import hms

WEB = Path(__file__).parent / "web"
# The guide's settings (examples/guide.sh): the form starts from these, not from the dataclass defaults.
GUIDE = {
    "torch_dtype": "bfloat16", "num_train_epochs": 10, "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 2, "learning_rate": 1e-4, "lora_rank": 8, "lora_alpha": 32,
    "target_modules": ["all-linear"], "logging_steps": 5, "max_length": 2048, "system": "You are a helpful assistant.",
    "warmup_ratio": 0.05, "model_author": ["swift"], "model_name": ["swift-robot"], "save_steps": 50, "save_total_limit": 2,
}
COMMON = ["num_train_epochs", "max_steps", "learning_rate", "gradient_accumulation_steps", "per_device_train_batch_size",
          "lora_rank", "lora_alpha", "max_length", "system", "model_name", "model_author", "logging_steps", "save_steps"]
# Set by the page itself (model and dataset pickers, the work folder) or accepted only for compatibility.
NOT_IN_FORM = {"model", "dataset", "output_dir", "dataloader_num_workers", "report_to", "train_type"}
UPLOAD_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
MAX_UPLOAD = 2 * 2**30


# ---------------------------------------------------------------------------------------------
# The form: SftArguments' fields, their kinds and the guide's defaults, and form values -> command line


def form_fields() -> list[dict]:
    hints = typing.get_type_hints(SftArguments)
    out = []
    for f in dataclasses.fields(SftArguments):
        if f.name in NOT_IN_FORM:
            continue
        tp, is_list = cli.field_kind(f, hints)
        value = GUIDE.get(f.name, _default(f))
        kind = "bool" if tp is bool else "list" if is_list else "value"
        out.append({"name": f.name, "kind": kind, "help": f.metadata.get("help", ""), "choices": f.metadata.get("choices"),
                    "value": "" if value is None else shlex.join(value) if is_list else str(value).lower() if tp is bool
                    else str(value), "common": f.name in COMMON})
    return out


def command(name: str, values: dict[str, str]) -> list[str]:
    """Form values (strings, as typed) -> the flags of `tunesmith NAME`, checked by the command's own parser.
    Only values that differ from the command's defaults are kept, so the command shown stays short."""
    cls = SftArguments if name == "sft" else InspectArguments
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    argv: dict[str, list[str]] = {}
    for key, value in values.items():
        value = "" if value is None else str(value).strip()
        if key not in fields or not value:
            continue
        is_list = cli.field_kind(fields[key], hints)[1]
        try:
            argv[key] = shlex.split(value) if is_list else [value]
        except ValueError as e:
            raise UserError(f"{key}: {e} (quote values that hold spaces: 'Xiao Huang')") from None
    if not argv.get("dataset"):
        raise UserError("no training data: pick the built-in self-cognition set, upload a file, or name one")
    args = cli.parse_args(name, [t for k, v in argv.items() for t in [f"--{k}", *v]])
    check_local(args.dataset + args.val_dataset)  # a missing file is said now, not after the run starts
    first = ["model", "dataset"]  # then in the order of the dataclass, as --help lists them
    changed = [k for k in first + [k for k in fields if k not in first]
               if k in argv and (k in first or getattr(args, k) != _default(fields[k]))]
    if name == "data":
        return ["data", "inspect", *argv["dataset"], *[t for k in changed if k != "dataset" for t in [f"--{k}", *argv[k]]]]
    return [name, *[t for k in changed for t in [f"--{k}", *argv[k]]]]


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def shown(argv: list[str]) -> str:
    return shlex.join(["tunesmith", *argv])


def _python_env() -> dict:
    # Unbuffered, so the log file is live; the progress bar on, since the page reads it.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TUNESMITH_NO_PROGRESS": "0"}


# ---------------------------------------------------------------------------------------------
# The one run: started as a subprocess, followed through its log and run folder, stopped with SIGINT


class Runs:
    """The page's training run. run.json holds its pid and command, so the run outlives the page and the server."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.folder = writable_dir(output_dir / "webui", "--output_dir")
        self.state_file = self.folder / "run.json"
        self.lock, self.save_lock = threading.Lock(), threading.Lock()
        self.proc: subprocess.Popen | None = None  # the child we started, so its exit is collected

    def start(self, argv: list[str]) -> dict:
        from filelock import FileLock

        with self.lock, FileLock(str(self.state_file) + ".lock"):  # also against a second web-ui on this folder
            current = self._load()
            if current and self._alive(current):
                raise ApiError(409, f"a run is already going (started {current['started']}): {current['command']}; "
                               "stop it first", code="run_active")
            stamp = time.strftime("%Y%m%d-%H%M%S")
            log_path, status_path = self.folder / f"sft-{stamp}.log", self.folder / f"sft-{stamp}.status.json"
            env = {**_python_env(), "TUNESMITH_STATUS_FILE": str(status_path)}  # the trainer's state (train/status.py)
            with open(log_path, "wb") as out:
                self.proc = subprocess.Popen([sys.executable, "-m", "tunesmith", *argv], stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            import psutil

            state = {"pid": self.proc.pid, "create_time": psutil.Process(self.proc.pid).create_time(), "argv": argv,
                     "command": shown(argv), "log": str(log_path), "status": str(status_path), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            self._save(state)
            return self.status()

    def stop(self) -> dict:
        current = self._load()
        try:
            if not current or not self._alive(current):
                raise ProcessLookupError
            os.kill(current["pid"], signal.SIGINT)  # as Ctrl-C: finish the step, save a checkpoint (train/stopping.py)
        except ProcessLookupError:  # also when it ended just now
            raise ApiError(409, "no run is going", code="no_run") from None
        self._save(stop_requested=time.time())
        return self.status()

    def _save(self, state: dict | None = None, **changes) -> None:
        """A new state, or changes to the current one. Written whole and renamed into place: a tab polling meanwhile
        never reads half a file (and so no run)."""
        with self.save_lock:
            state = {**(state or self._load() or {}), **changes}
            write_atomic(self.state_file, json.dumps(state, ensure_ascii=False, indent=2))

    def _load(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return None

    def _alive(self, state: dict) -> bool:
        if self.proc is not None and self.proc.pid == state["pid"]:
            return self.proc.poll() is None
        import psutil

        try:  # started by an earlier web-ui: the same pid and start time, and not a zombie
            p = psutil.Process(state["pid"])
            return abs(p.create_time() - state["create_time"]) < 1 and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def status(self) -> dict:
        state = self._load()
        if not state:
            return {"status": "idle"}
        text = _tail(Path(state["log"]))
        lines = [ln.rsplit("\r", 1)[-1] for ln in text.split("\n")]  # the progress bar redraws with \r
        lines = [ln for ln in lines if ln.strip()]
        alive = self._alive(state)
        out = {"command": state["command"], "started": state["started"], "pid": state["pid"], "log": lines[-30:],
               "points": [], "eval_points": []}
        trainer = run_status.read(Path(state["status"]))  # what the trainer says of itself (train/status.py)
        run_dir = trainer.get("run_dir")
        if run_dir:
            out["run_dir"] = run_dir
            out.update(_progress(Path(run_dir) / "logging.jsonl"))  # the loss curve
            out["checkpoints"] = [str(c) for c in checkpoints(Path(run_dir))]
            if (Path(run_dir) / "runs").is_dir():  # --report_to tensorboard: the command that shows its curves
                out["curves"] = shlex.join(["tensorboard", "--logdir", str(Path(run_dir) / "runs")])
        if "step" in trainer:  # every step; logging.jsonl only every --logging_steps
            out.update(step=trainer["step"], max_steps=trainer["max_steps"])
            if "elapsed_s" in trainer:
                out.update(elapsed=hms(trainer["elapsed_s"]), remaining=hms(trainer["remaining_s"]))
        phase = trainer.get("phase")
        if alive:
            out["status"] = "stopping" if state.get("stop_requested") else "running"
        elif phase in ("finished", "stopped"):
            out.update(status=phase, checkpoint=trainer.get("checkpoint"))
        else:  # failed: its one error line, or (a crash) the last lines it printed
            errors = [trainer["error"]] if trainer.get("error") else [ln for ln in lines if "error:" in ln]
            out.update(status="failed", error=(errors or lines or ["the run ended without a word"])[-1])
        return out


def _tail(path: Path, size: int = 65536) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - size))
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _progress(path: Path) -> dict:
    """Loss points and the newest step, ETA and speed from logging.jsonl (train/loop.py writes it)."""
    out: dict = {"points": [], "eval_points": []}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:  # a line being written right now
            continue
        if "global_step/max_steps" in entry:
            step, total = map(int, entry["global_step/max_steps"].split("/"))
            out.update(step=step, max_steps=total)
            if "loss" in entry:
                out["points"].append([step, entry["loss"]])
                out.update(elapsed=entry["elapsed_time"], remaining=entry["remaining_time"],
                           speed=entry.get("train_speed(s/it)"), tokens_per_s=entry.get("tokens/s"))
            if "eval_loss" in entry:
                out["eval_points"].append([step, entry["eval_loss"]])
    return out


# ---------------------------------------------------------------------------------------------
# Chat: deploy's Engine (base + the chosen checkpoint as a PEFT adapter), loaded once per choice


class Chats:
    def __init__(self, args: WebUiArguments):
        self.args = args
        self.lock = threading.Lock()
        self.key, self.engine = None, None

    def engine_for(self, model: str | None, checkpoint: str | None) -> deploy.Engine:
        with self.lock:
            key = (None if checkpoint else model, checkpoint)
            if key != self.key:
                self.engine = None  # let the previous model go before the next one loads
                args = DeployArguments(model=None if checkpoint else model, adapters=[f"tuned={checkpoint}"] if checkpoint else [],
                                       device=self.args.device, max_new_tokens=self.args.max_new_tokens, temperature=0.0)
                args.validate()
                self.engine, self.key = deploy.Engine(args), key
            return self.engine


class WebChatRequest(ChatRequest):
    model: Literal["base", "tuned"]
    base_model: Optional[str] = None  # the model to chat with before any checkpoint exists
    checkpoint: Optional[str] = None


# ---------------------------------------------------------------------------------------------
# The app


def api_guard(token: str):
    """What every /api call needs besides BrowserGuard's checks: the launch's token (a page on another site cannot know
    it; header X-Tunesmith-Token, or ?token= on a GET, as an EventSource cannot send headers) and JSON on every POST."""

    def check(request: Request):
        sent = request.headers.get("x-tunesmith-token") or (request.query_params.get("token", "")
                                                             if request.method == "GET" else "")
        if token and not hmac.compare_digest(sent.encode(), token.encode()):
            raise ApiError(401, "missing or wrong token: open the address web-ui printed at start "
                           "(http://HOST:PORT/?token=…)", code="invalid_token")
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.method == "POST" and media_type != "application/json":
            raise ApiError(415, "send the body as JSON, with the header Content-Type: application/json",
                           code="unsupported_media_type")
    return check


def build_app(args: WebUiArguments, token: str) -> FastAPI:
    output_dir = writable_dir(args.output_dir)
    runs, chats = Runs(output_dir), Chats(args)
    uploads = output_dir / "webui" / "uploads"
    app = deploy.json_errors(FastAPI(title="tunesmith web-ui", docs_url=None, redoc_url=None))
    app.add_middleware(deploy.BrowserGuard, hosts=deploy.allowed_hosts(args.host, args.allowed_hosts), origins=[],
                       hint="use the page web-ui serves")
    app.mount("/static", StaticFiles(directory=WEB), name="static")
    api = APIRouter(prefix="/api", dependencies=[Depends(api_guard(token))])

    @app.get("/")
    def page():
        return FileResponse(WEB / "index.html")

    @api.get("/setup")
    def setup():
        """Everything the page needs to draw itself: models, datasets and the form."""
        return {"models": list(DEFAULT_MODELS), "model": args.model or DEFAULT_MODEL, "builtin": [next(iter(BUILTIN))],
                "uploaded": _uploaded(uploads), "fields": form_fields(), "output_dir": str(output_dir)}

    @api.put("/upload/{name}")
    async def upload(name: str, request: Request):
        if Path(name).name != name or not name.lower().endswith(UPLOAD_SUFFIXES) or name.startswith("."):
            raise ApiError(400, f"{name}: upload a {', '.join(UPLOAD_SUFFIXES)} file (alpaca, sharegpt, messages "
                           "or query/response records)")
        uploads.mkdir(parents=True, exist_ok=True)
        tmp, size = uploads / f".{name}.part", 0
        with open(tmp, "wb") as f:
            async for part in request.stream():
                size += len(part)
                if size > MAX_UPLOAD:
                    f.close()
                    tmp.unlink()
                    raise ApiError(413, f"{name}: larger than {MAX_UPLOAD // 2**30} GiB; pass its path instead")
                f.write(part)
        if not size:
            tmp.unlink()
            raise ApiError(400, f"{name}: the file is empty")
        tmp.replace(uploads / name)
        return {"dataset": str(uploads / name), "uploaded": _uploaded(uploads)}

    @api.post("/command")
    async def preview(request: Request):
        values = await _values(request)
        return {"command": shown(command("sft", {**values, "output_dir": str(output_dir)}))}

    @api.post("/inspect")
    async def inspect(request: Request):
        argv = command("data", {**await _values(request), "samples": "2"})
        proc = await run_in_threadpool(subprocess.run, [sys.executable, "-m", "tunesmith", *argv], capture_output=True,
                                       text=True, env={**_python_env(), "TUNESMITH_NO_PROGRESS": "1"}, timeout=900)
        if proc.returncode:
            errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln] or proc.stderr.splitlines()[-1:]
            raise ApiError(400, (errors or ["data inspect failed"])[-1])
        return {"command": shown(argv), "output": proc.stdout}

    @api.get("/run")
    def status():
        return runs.status()

    @api.post("/run")
    async def start(request: Request):
        values = await _values(request)
        return runs.start(command("sft", {**values, "output_dir": str(output_dir)}))

    @api.post("/run/stop")
    def stop():
        return runs.stop()

    @api.get("/checkpoints")
    def all_checkpoints():
        found = [c for run in sorted(output_dir.glob("v*-*"), key=lambda p: p.stat().st_mtime, reverse=True)
                 for c in reversed(checkpoints(run))]
        return {"checkpoints": [str(c) for c in found]}

    @api.post("/chat")
    async def chat(request: Request):
        req = await deploy.parse_request(request, WebChatRequest)
        if req.model == "tuned" and not req.checkpoint:
            raise ApiError(400, "no checkpoint to chat with yet: train first, or pick one")
        engine = await run_in_threadpool(chats.engine_for, req.base_model or args.model, req.checkpoint)
        name = engine.base if req.model == "base" else "tuned"
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = engine.template(name).encode_prompt(messages)
        job = deploy.generation_job(engine, req, ids, req.max_tokens, strip=True)

        def chunk(delta=None, finish=None, usage=None):
            return {"object": "chat.completion.chunk", "model": name,
                    "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
        return StreamingResponse(deploy.sse_stream(engine, name, ids, job, req, chunk, lambda piece: {"content": piece},
                                            first={"role": "assistant", "content": ""}), media_type="text/event-stream")

    app.include_router(api)
    return app


async def _values(request: Request) -> dict[str, str]:
    try:
        data = json.loads(await request.body())
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "expected a JSON object of form values")
    return {k: v for k, v in data.items() if k != "output_dir"}  # runs go where this web-ui keeps them


def _uploaded(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("*") if p.suffix.lower() in UPLOAD_SUFFIXES) if folder.is_dir() else []


def run(args: WebUiArguments) -> int:
    if args.token == "" and not deploy.is_loopback(args.host):
        raise UserError(f"--token '' --host {args.host}: a page without a token is only allowed on loopback (127.0.0.1); "
                        "drop --token for a random one, or give your own")
    token = secrets.token_urlsafe(32) if args.token is None else args.token
    sock = deploy.bind(args.host, args.port)
    app = build_app(args, token)
    sock.listen(128)
    print(f"web-ui: http://{args.host}:{sock.getsockname()[1]}/" + (f"?token={quote(token, safe='')}" if token else ""),
          flush=True)
    log(f"runs go to {Path(args.output_dir).resolve()}; Ctrl-C stops the page, not a run it started")
    deploy.serve_on(sock, app)
    return 0
