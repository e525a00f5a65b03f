"""Hostile input to `tunesmith deploy`, over real HTTP on loopback: malformed and oversized requests, and what a web
page could make a browser send, get one clear OpenAI-style JSON error (never a 500), clients that abandon a request
stop its generation, and a bounded load test leaves the server answering correctly with its memory back near where it
started."""

import http.client
import json
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import deploy

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
HELLO = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
         "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    with deploy("--model", MODEL, "--max_new_tokens", "16") as running:
        yield running


def raw(port, head: bytes, body: bytes = b"", timeout=60) -> tuple[int, bytes]:
    """One HTTP/1.1 request over a plain socket; (status, body) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    payload = data.split(b"\r\n\r\n", 1)[1]
    return status, payload


def post(port, path, body: bytes, extra: str = "", timeout=60, host="127.0.0.1") -> tuple[int, bytes]:
    head = (f"POST /v1/{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode()
    return raw(port, head, body, timeout)


def post_json(port, obj, path="chat/completions", **kw):
    return post(port, path, json.dumps(obj).encode(), **kw)


def error_of(status, payload) -> dict:
    err = json.loads(payload)["error"]  # one JSON error object, nothing else
    assert set(err) == {"message", "type", "param", "code"} and err["message"], payload
    return err


def abandon_stream(port, max_tokens=2000, path="chat/completions"):
    """Start a streaming request, read its first event, and hang up mid-stream."""
    story = "Write a very long story about a dragon."
    body = json.dumps({"model": MODEL, "max_tokens": max_tokens, "stream": True, "temperature": 0,
                       **({"prompt": story} if path == "completions" else {"messages": [{"role": "user", "content": story}]})
                       }).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall((f"POST /v1/{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        data = b""
        while b"data: " not in data:
            chunk = s.recv(4096)
            assert chunk, data  # the server hung up before streaming anything
            data += chunk
        status = int(data.split(b" ", 2)[1])
    return status


def wait_idle(proc, seconds=1.5, limit=0.3, deadline=30):
    """Waits until the server spends under `limit` CPU seconds per `seconds` (no generation running); the time it took."""
    start = time.monotonic()
    while time.monotonic() - start < deadline:
        before = sum(proc.cpu_times()[:2])
        time.sleep(seconds)
        if sum(proc.cpu_times()[:2]) - before < limit:
            return time.monotonic() - start
    raise AssertionError(f"the server still burns CPU {deadline} s later: an abandoned generation was not stopped")


HUGE = json.dumps({"model": MODEL, "prompt": "hello " * 600_000}).encode()  # 3.6 MB, ~600k tokens, context 8192
CASES = {  # kind -> (how to send it, the status a user must get, the error code if any)
    "malformed_json": (lambda p: post(p, "chat/completions", b'{"model": "x", "messages": [}'), 400, None),
    "deeply_nested": (lambda p: post(p, "chat/completions", b"[" * 100_000), 400, None),
    "not_an_object": (lambda p: post(p, "completions", b'"just a string"'), 400, None),
    "wrong_type": (lambda p: post_json(p, {**HELLO, "messages": "hi"}), 400, None),
    "missing_field": (lambda p: post_json(p, {"model": MODEL}), 400, None),
    "bad_max_tokens": (lambda p: post_json(p, {**HELLO, "max_tokens": "many"}), 400, None),
    "huge_max_tokens": (lambda p: post_json(p, {**HELLO, "max_tokens": 10**12}), 400, "context_length_exceeded"),
    "huge_seed": (lambda p: post_json(p, {**HELLO, "seed": 10**30}), 400, None),
    "many_stops": (lambda p: post_json(p, {**HELLO, "stop": [str(i) for i in range(1000)]}), 400, None),
    "huge_prompt": (lambda p: post(p, "completions", HUGE), 400, "context_length_exceeded"),
    "oversized_body": (lambda p: raw(p, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                        b"Connection: close\r\nContent-Length: 1000000000\r\n\r\n", b"{" * 1000),
                       413, "request_too_large"),
    "unknown_model": (lambda p: post_json(p, {**HELLO, "model": "nope"}), 404, "model_not_found"),
    # what a web page could make a browser send: its own name resolving here (DNS rebinding), or a cross-site post
    "rebinding_host": (lambda p: post_json(p, HELLO, host=f"attacker.example:{p}"), 403, "host_not_allowed"),
    "other_origin": (lambda p: post_json(p, HELLO, extra="Origin: http://attacker.example\r\n"), 403, "origin_not_allowed"),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_each_hostile_request_gets_one_clear_json_error(server, kind):
    port, _ = server
    send, want, code = CASES[kind]
    start = time.monotonic()
    status, payload = send(port)
    took = time.monotonic() - start
    assert status == want, payload[:300]
    assert error_of(status, payload)["code"] == code
    assert took < 5, f"{kind} took {took:.1f} s"  # refused before generating (or tokenizing megabytes)


def test_no_cors_headers_without_cors_origins(server):
    port, _ = server
    for method, headers in [("OPTIONS", {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}),
                            ("GET", {})]:  # a browser's preflight is refused; an answer never invites one
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request(method, "/v1/models", headers=headers)
        r = conn.getresponse()
        r.read()
        conn.close()
        assert r.status == (403 if method == "OPTIONS" else 200)
        assert not [h for h in r.headers if h.lower().startswith("access-control-")], r.headers


def test_abandoned_requests_stop_generating(server):
    port, proc = server
    assert post_json(port, HELLO)[0] == 200  # warm
    for path in ["chat/completions", "completions"]:
        assert abandon_stream(port, path=path) == 200
        wait_idle(proc)  # 2000 tokens would take far longer than this: the generation was cancelled
    # a plain (non-streaming) request whose client hangs up before the answer
    body = json.dumps({**HELLO, "max_tokens": 2000, "messages": [{"role": "user", "content": "Write a very long story about a dragon."}]})
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        time.sleep(1)
    wait_idle(proc)
    status, payload = post_json(port, HELLO)
    assert status == 200 and json.loads(payload)["choices"][0]["message"]["content"]


def load_test(port, proc, requests=80, clients=8, time_limit=120):
    """`requests` requests from `clients` concurrent clients, cycling through valid, streaming, abandoned and
    hostile ones; stops sending at `time_limit` seconds. Returns the report."""
    kinds = ["chat", "stream", "abandoned", "completion", *CASES]
    deadline = time.monotonic() + time_limit

    def one(i):
        kind = kinds[i % len(kinds)]
        if time.monotonic() > deadline:
            return kind, "skipped (time limit)"
        try:
            if kind == "chat":
                status, payload = post_json(port, HELLO)
                ok = status == 200 and json.loads(payload)["choices"][0]["message"]["content"]
            elif kind == "completion":
                status, payload = post_json(port, {"model": MODEL, "prompt": "The capital of France is",
                                                   "max_tokens": 8}, path="completions")
                ok = status == 200 and json.loads(payload)["choices"][0]["text"]
            elif kind == "stream":
                status, payload = post_json(port, {**HELLO, "stream": True})
                ok = status == 200 and b"data: [DONE]" in payload and b"finish_reason\": \"" in payload
            elif kind == "abandoned":
                status = abandon_stream(port)
                ok = status == 200
            else:
                send, want, code = CASES[kind]
                status, payload = send(port)
                ok = status == want and error_of(status, payload)["code"] == code
            return kind, status if ok else f"{status} (unexpected)"
        except Exception as e:  # a refused or reset connection is a failure of the server
            return kind, f"{type(e).__name__}"

    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    by_status = Counter(str(s) for _, s in results)
    return {"requests": requests, "clients": clients, "seconds": round(time.monotonic() - start, 1),
            "served": sum(isinstance(s, int) for _, s in results), "by_status": dict(sorted(by_status.items())),
            "by_kind": dict(sorted(Counter(f"{k} -> {s}" for k, s in results).items())),
            "failures": [(k, s) for k, s in results if not isinstance(s, int)]}


def test_load_leaves_the_server_answering_with_memory_back(server):
    port, proc = server
    status, payload = post_json(port, HELLO)  # warm-up: the model's buffers exist from here on
    assert status == 200
    answer = json.loads(payload)["choices"][0]["message"]["content"]
    wait_idle(proc)
    rss_before, threads_before = proc.memory_info().rss, proc.num_threads()

    report = load_test(port, proc)
    settled = wait_idle(proc)  # abandoned streams stop: nothing left generating
    status, payload = post_json(port, HELLO)
    after = json.loads(payload)["choices"][0]["message"]["content"]
    rss_after = proc.memory_info().rss
    report.update(rss_before_mb=round(rss_before / 2**20), rss_after_mb=round(rss_after / 2**20),
                  threads_before=threads_before, threads_after=proc.num_threads(), idle_after_s=round(settled, 1),
                  same_answer_after=after == answer)
    print("\nload test report:", json.dumps(report, indent=1))

    assert report["failures"] == [] and report["served"] == report["requests"]
    assert "500" not in report["by_status"]
    assert status == 200 and after == answer  # still answers, and the same as before the load (greedy)
    assert rss_after <= max(rss_before * 1.25, rss_before + 300 * 2**20)
    assert proc.num_threads() <= threads_before + 40  # at most the idle worker pool; no generation threads left
