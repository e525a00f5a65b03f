"""`tunesmith deploy`: an OpenAI-compatible HTTP API for the base model and tuned adapters.

    tunesmith deploy --adapters CKPT                        serves the base (its alias) and the adapter (checkpoint-N)
    tunesmith deploy --adapters robot=CKPT_A coder=CKPT_B   several adapters on one base, chosen by the request's model
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "robot", "messages": [{"role": "user", "content": "你是谁?"}]}'

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both with
"stream": true as server-sent events). The base is loaded once; adapters are PEFT adapters on it, switched
per request. One generation runs at a time (a lock): on a CPU parallel generations only slow each other.

Hostile input: bodies above MAX_BODY get 413 before being read, prompts far beyond the context are refused after
tokenizing a bounded prefix, at most MAX_WAITING generations run or wait (429 beyond), and a client that goes
away (streaming or not) cancels its generation, also while it still waits for the lock.

Next to a browser (BrowserGuard): a Host header that is not this server's (DNS rebinding) and a request from a web
page of another origin get 403 before any endpoint runs; CORS headers only for the pages of --cors_origins.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import socket
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Literal, Optional, Union
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from ..args import DeployArguments
from ..errors import UserError
from .infer import Chat, Generation, load_chat
from ..console import log
from ..data.template import ChatTemplate


class Engine:
    """The loaded model and what it serves: base name -> no adapter, adapter names -> PEFT adapters."""

    def __init__(self, args: DeployArguments):
        named = parse_adapters(args.adapters)
        self.chat: Chat = load_chat(args, named)
        self.base = args.served_model_name or Path(self.chat.model_name).name
        if self.base in named:
            raise UserError(f"--adapters: the name {self.base} is the base model's; choose another")
        self.names = [self.base, *named]
        config = getattr(self.chat.model, "config", None)
        self.context = getattr(config, "max_position_embeddings", None) or 2048
        self.lock = threading.Lock()
        self.busy, self.busy_lock = 0, threading.Lock()

    def admit(self) -> None:
        """Take one of the MAX_WAITING places for a generation (running or waiting); release() gives it back."""
        with self.busy_lock:
            if self.busy >= MAX_WAITING:
                raise ApiError(429, f"the server is busy: {self.busy} generations are running or waiting; retry later",
                               code="server_busy", kind="rate_limit_error")
            self.busy += 1

    def release(self) -> None:
        with self.busy_lock:
            self.busy -= 1

    def template(self, model: str) -> ChatTemplate:
        system = self.chat.args.system if model == self.base else self.chat.systems[model]
        return ChatTemplate(self.chat.tok, system, self.chat.args.enable_thinking)

    def generate(self, model: str, ids: list[int], **kw) -> Generation:
        import contextlib

        with self.lock:
            cancelled = kw.get("cancelled")
            if cancelled is not None and cancelled():  # its client left while it waited: nothing to compute
                return Generation("", len(ids), 0, "cancelled")
            if model == self.base:
                adapters_off = self.chat.model.disable_adapter() if self.chat.systems else contextlib.nullcontext()
            else:
                self.chat.model.set_adapter(model)
                adapters_off = contextlib.nullcontext()
            with adapters_off:
                return self.chat.generate(ids, **kw)


def parse_adapters(values: list[str]) -> dict[str, str]:
    """NAME=CKPT or a bare CKPT (named after its folder)."""
    named = {}
    for v in values:
        name, _, path = v.rpartition("=") if "=" in v else (Path(v).name, "", v)
        if not name or name in named:
            raise UserError(f"--adapters {v}: {'empty' if not name else 'duplicate'} adapter name; use NAME=CKPT with distinct names")
        named[name] = path
    return named


# ---------------------------------------------------------------------------------------------
# Requests, as the OpenAI API defines them (fields we do not use are accepted and ignored)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stop: Union[str, list[str], None] = Field(None, max_length=4)  # OpenAI: up to 4 sequences
    seed: Optional[int] = Field(None, ge=-(2**63), lt=2**64)  # what torch.manual_seed accepts
    stream: bool = False
    stream_options: Optional[StreamOptions] = None

    def stop_list(self) -> list[str] | None:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return ([s for s in stop if s] or None) if stop else None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class CompletionRequest(Sampling):
    prompt: Union[str, list[str]]


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        self.status, self.body = status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------
# The app


MAX_BODY = 4 * 2**20  # bytes of a request body: far more than any prompt that fits a context
MAX_WAITING = 32  # generations running or queued for the lock; beyond, 429 (each holds a thread)


def json_errors(app: FastAPI) -> FastAPI:
    """Every failure as one JSON error ({"error": {"message": ...}}): ours, unknown paths, and bugs."""

    @app.exception_handler(ApiError)
    def _api_error(request, e: ApiError):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(UserError)
    def _user_error(request, e: UserError):
        return JSONResponse(ApiError(400, str(e)).body, status_code=400)

    @app.exception_handler(HTTPException)
    def _http(request, e: HTTPException):
        message = f"no such endpoint: {request.method} {request.url.path}" if e.status_code == 404 else str(e.detail)
        return JSONResponse(ApiError(e.status_code, message).body, status_code=e.status_code)

    @app.exception_handler(Exception)
    def _bug(request, e: Exception):  # never a bare "Internal Server Error" text: one JSON error, like the others
        error = ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")
        return JSONResponse(error.body, status_code=500)

    return app


# ---------------------------------------------------------------------------------------------
# Next to a browser: what a web page the user merely visits can send to a server on this machine


LOOPBACK = {"localhost", "127.0.0.1", "[::1]"}


def host_name(host: str) -> str:
    """A Host header (or an address) as a name without its port: 'LocalHost:8000' -> 'localhost', '[::1]:80' -> '[::1]'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return f"[{host}]" if host.count(":") > 1 else host.split(":")[0].rstrip(".")  # a bare IPv6 address: bracketed


def is_loopback(host: str) -> bool:
    try:
        return host_name(host) in LOOPBACK or ipaddress.ip_address(host_name(host).strip("[]")).is_loopback
    except ValueError:  # a name
        return False


def allowed_hosts(host: str, extra: list[str]) -> set[str]:
    """The names a Host header may carry: loopback, --host (every address of this machine for 0.0.0.0 and ::),
    and --allowed_hosts."""
    names = {*LOOPBACK, host_name(host), *map(host_name, extra)}
    if host_name(host) in ("0.0.0.0", "[::]"):
        import psutil

        names |= {host_name(a.address.split("%")[0]) for addrs in psutil.net_if_addrs().values() for a in addrs
                  if a.family in (socket.AF_INET, socket.AF_INET6)}
    return names


def check_origins(origins: list[str]) -> list[str]:
    """--cors_origins as a browser sends Origin: scheme://host[:port], no path, no trailing slash."""
    for o in origins:
        parts = urlsplit(o)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") or parts.query:
            raise UserError(f"--cors_origins {o}: expected an origin such as http://localhost:3000 (scheme, host and port)")
    return [o.rstrip("/").lower() for o in origins]


class BrowserGuard:
    """ASGI middleware, outermost. Refuses with 403 what a web page on another site could make the user's browser
    send: a Host that is none of `hosts` (DNS rebinding: the page's own name resolving to this machine, so that it
    could read the answers), and an Origin that is neither this server's own nor one of `origins` (a cross-site
    fetch or form post, which a browser sends without asking first). Clients other than browsers send no Origin."""

    def __init__(self, app, hosts: set[str], origins: list[str], hint: str):
        self.app, self.hosts, self.origins, self.hint = app, hosts, set(origins), hint

    def host_allowed(self, host: str) -> bool:
        name = host_name(host)
        return bool(name) and ("*" in self.hosts or name in self.hosts
                               or any(h.startswith("*.") and name.endswith(h[1:]) for h in self.hosts))

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            host, origin = headers.get("host", ""), headers.get("origin")
            error = None
            if not self.host_allowed(host):
                said = f"the Host header '{host}' does not name this server" if host else "the request has no Host header"
                error = ApiError(403, f"{said}; open it by 127.0.0.1 or localhost, or start it with --allowed_hosts "
                                 f"{host_name(host) or 'NAME'}", code="host_not_allowed")
            elif origin is not None and origin.lower() not in self.origins and not _same_origin(origin, host):
                error = ApiError(403, f"a request from the web page at {origin} is refused (another origin); {self.hint}",
                                 code="origin_not_allowed")
            if error:
                await JSONResponse(error.body, status_code=error.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _same_origin(origin: str, host: str) -> bool:
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.strip().lower()


def openapi_body(cls: type[BaseModel]) -> dict:
    """`cls` as the operation's JSON body in /openapi.json (the endpoint parses the body itself: parse_request),
    with its nested models written out in place."""
    schema = cls.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            return inline(defs[node["$ref"].rsplit("/", 1)[1]]) if "$ref" in node else {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


def build_app(engine: Engine, args: DeployArguments) -> FastAPI:
    app = json_errors(FastAPI(title="tunesmith", docs_url=None, redoc_url=None))
    origins = check_origins(args.cors_origins)
    if origins:  # answers those pages' preflights and lets them read the answers; no CORS headers for anyone else
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"], allow_headers=["*"])
    app.add_middleware(BrowserGuard, hosts=allowed_hosts(args.host, args.allowed_hosts), origins=origins,
                       hint="name it in --cors_origins to serve that page")
    expected = f"Bearer {args.api_key}".encode()

    def authorized(request: Request):
        sent = request.headers.get("authorization", "").encode()
        if args.api_key and not hmac.compare_digest(sent, expected):  # in constant time: no guessing by timing
            raise ApiError(401, "missing or incorrect API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": STARTED, "owned_by": "tunesmith",
             "root": engine.chat.model_name if name == engine.base else name, "max_model_len": engine.context}
            for name in engine.names]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)], openapi_extra=openapi_body(ChatRequest))
    async def chat_completions(request: Request):
        req = await parse_request(request, ChatRequest)
        model = _served(engine, req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        _precheck(engine, "".join(m["content"] for m in messages))
        ids = engine.template(model).encode_prompt(messages)
        job = generation_job(engine, req, ids, req.max_completion_tokens or req.max_tokens, strip=True)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": model}
        if req.stream:
            def chunk(delta=None, finish=None, usage=None):
                choices = [] if usage else [{"index": 0, "delta": delta or {}, "finish_reason": finish, "logprobs": None}]
                return {**head, "object": "chat.completion.chunk", "choices": choices, **({"usage": usage} if usage else {})}
            return StreamingResponse(sse_stream(engine, model, ids, job, req, chunk, lambda piece: {"content": piece},
                                          first={"role": "assistant", "content": ""}), media_type="text/event-stream")
        gen = await _generate(request, engine, model, ids, job)
        return {**head, "object": "chat.completion", "usage": _usage(gen), "choices": [{
            "index": 0, "message": {"role": "assistant", "content": gen.text}, "finish_reason": gen.finish_reason,
            "logprobs": None}]}

    @app.post("/v1/completions", dependencies=[Depends(authorized)], openapi_extra=openapi_body(CompletionRequest))
    async def completions(request: Request):
        req = await parse_request(request, CompletionRequest)
        model = _served(engine, req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise ApiError(400, "prompt: send one prompt per request", param="prompt")
        _precheck(engine, prompts[0])
        ids = engine.chat.tok(prompts[0], add_special_tokens=False)["input_ids"]
        if not ids:
            raise ApiError(400, "prompt: empty", param="prompt")
        job = generation_job(engine, req, ids, req.max_tokens or 16, strip=False)  # OpenAI's default for completions: 16
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model, "object": "text_completion"}
        if req.stream:
            def chunk(delta=None, finish=None, usage=None):
                choices = [] if usage else [{"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}]
                return {**head, "choices": choices, **({"usage": usage} if usage else {})}
            return StreamingResponse(sse_stream(engine, model, ids, job, req, chunk, lambda piece: piece, first=None),
                                     media_type="text/event-stream")
        gen = await _generate(request, engine, model, ids, job)
        return {**head, "usage": _usage(gen),
                "choices": [{"index": 0, "text": gen.text, "finish_reason": gen.finish_reason, "logprobs": None}]}

    return app


STARTED = int(time.time())


async def parse_request(request: Request, cls):
    """The JSON body as `cls`, whatever Content-Type the client sent (curl -d sends a form type). A body above
    MAX_BODY is refused by its Content-Length before reading, or as soon as a chunked one grows past it."""
    too_big = ApiError(413, f"the request body is larger than {MAX_BODY // 2**20} MiB", code="request_too_large")
    try:
        declared = int(request.headers.get("content-length") or 0)
    except ValueError:
        raise ApiError(400, "the Content-Length header is not a number") from None
    if declared > MAX_BODY:
        raise too_big
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY:
            raise too_big
    try:
        data = json.loads(bytes(body))
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested beyond Python's limit
        raise ApiError(400, "the request body is not valid JSON") from None
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ())) or None
        raise ApiError(400, f"{where or 'body'}: {err.get('msg')}", param=where) from None


def _served(engine: Engine, model: str) -> str:
    if model not in engine.names:
        raise ApiError(404, f"the model '{model}' does not exist here; served: {', '.join(engine.names)}",
                       param="model", code="model_not_found")
    return model


def _too_long(engine: Engine, tokens: int, max_tokens: int | None = None) -> ApiError:
    asks = f"{tokens} prompt tokens and asks for {max_tokens} more" if max_tokens else f"at least {tokens} prompt tokens"
    return ApiError(400, f"this model's maximum context length is {engine.context} tokens; the request has {asks}",
                    param="messages", code="context_length_exceeded")


def _precheck(engine: Engine, text: str) -> None:
    """Refuse a prompt far beyond the context without tokenizing all of it: a prefix of 8 characters per token of
    context that already has more tokens than the context fits cannot fit either (a few megabytes of text would
    otherwise take seconds to tokenize, on the event loop)."""
    cut = engine.context * 8
    if len(text) > cut:
        n = len(engine.chat.tok(text[:cut], add_special_tokens=False)["input_ids"])
        if n >= engine.context:
            raise _too_long(engine, n)


def generation_job(engine: Engine, req: Sampling, ids: list[int], max_tokens: int | None, strip: bool) -> dict:
    """Generation settings; refuses a request that cannot fit the model's context (as OpenAI does)."""
    room = engine.context - len(ids)
    if max_tokens is None:
        max_tokens = min(engine.chat.args.max_new_tokens, room)
    if room <= 0 or len(ids) + max_tokens > engine.context:
        raise _too_long(engine, len(ids), max_tokens)
    temperature = req.temperature
    if temperature is not None and temperature < 1e-5:  # greedy, as vLLM: dividing the logits by it would overflow
        temperature = 0.0
    return dict(max_new_tokens=max_tokens, temperature=temperature, top_p=req.top_p, stop=req.stop_list(),
                seed=req.seed, strip=strip)


def _usage(gen: Generation) -> dict:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens}


async def _generate(request: Request, engine: Engine, model: str, ids: list[int], job: dict) -> Generation:
    """A whole answer, generated in a thread; a client that disconnects meanwhile cancels it."""
    engine.admit()
    gone = threading.Event()
    try:
        task = asyncio.ensure_future(run_in_threadpool(engine.generate, model, ids, **job, cancelled=gone.is_set))
        while not (await asyncio.wait({task}, timeout=0.25))[0]:
            if await request.is_disconnected():
                gone.set()
        return task.result()
    finally:
        gone.set()
        engine.release()


def sse_stream(engine: Engine, model: str, ids: list[int], job: dict, req: Sampling, chunk, delta, first):
    """Server-sent events: generation runs in a thread and hands pieces to the event loop; a client that goes away
    stops it at the next token (or before it starts, if it still waits for the lock)."""
    engine.admit()
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    gone = threading.Event()

    def put(item):
        try:
            loop.call_soon_threadsafe(pieces.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            gone.set()

    def work():
        try:
            put(engine.generate(model, ids, **job, on_text=put, cancelled=gone.is_set))
        except Exception as e:  # reported to the client below, never a silent hang
            put(e)
        finally:
            engine.release()

    def event(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def events():
        try:
            if first is not None:
                yield event(chunk(first))
            while True:
                item = await pieces.get()
                if isinstance(item, str):
                    yield event(chunk(delta(item)))
                elif isinstance(item, Exception):
                    yield event(ApiError(500, f"generation failed: {type(item).__name__}: {item}", kind="server_error").body)
                    break
                else:
                    yield event(chunk(None if first is None else {}, finish=item.finish_reason))
                    if req.stream_options and req.stream_options.include_usage:
                        yield event(chunk(usage=_usage(item)))
                    break
            yield "data: [DONE]\n\n"
        finally:  # also on a disconnect: the response task is cancelled at its `await`
            gone.set()

    try:
        threading.Thread(target=work, daemon=True, name="tunesmith-generate").start()
    except BaseException:
        engine.release()
        raise
    stream = events()
    weakref.finalize(stream, gone.set)  # a stream dropped before it ever started cancels too
    return stream


def bind(host: str, port: int) -> socket.socket:
    """A bound socket (port 0: any free one). Bound before loading a model: a busy port fails in a second."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    return sock


def serve_on(sock: socket.socket, app: FastAPI) -> None:
    """Serve `app` on a socket that already listens (so a client that saw the address printed can connect)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    server.run(sockets=[sock])


def run(args: DeployArguments) -> int:
    check_origins(args.cors_origins)  # a mistyped flag is said before the model loads
    sock = bind(args.host, args.port)
    engine = Engine(args)
    app = build_app(engine, args)
    sock.listen(128)
    log(f"serving {', '.join(engine.names)} (context {engine.context} tokens)"
        + ("; API key required" if args.api_key else ""))
    print(f"deploy: http://{args.host}:{sock.getsockname()[1]}/v1", flush=True)
    serve_on(sock, app)
    return 0
