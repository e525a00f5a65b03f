"""`tunesmith web-ui` and `tunesmith deploy` next to a browser, as an attacker meets them: a real headless Chromium
opens a page of another local site (tests/attacker.html) that tries cross-site fetches, a form post and a DNS-rebinding
read against both servers — nothing starts and nothing is read; rebinding-style Host headers over plain HTTP get one
403 JSON error; the web-ui API wants its token, JSON and its own page; schemathesis fuzzes deploy's OpenAPI and finds
no 5xx; the official openai client works unchanged."""

import contextlib
import functools
import http.client
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from conftest import call, chromium, deploy, stop_run, tunesmith, web_ui

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
ATTACKER = Path(__file__).with_name("attacker.html")
SECRET = "the-private-record-7f3a"
FRIEND = "tunesmith.test"  # a name deploy and the second web-ui are told to answer to (--allowed_hosts)


class Site(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """Two other local web sites serving the attacker's page: an attacker's, and a friend's (the one origin deploy
    lets in with --cors_origins). Yields their origins."""
    root = tmp_path_factory.mktemp("sites")
    (root / ATTACKER.name).write_text(ATTACKER.read_text())
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Site, directory=str(root))) for _ in range(2)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield [f"http://127.0.0.1:{s.server_port}" for s in servers]
    for s in servers:
        s.shutdown()


@pytest.fixture(scope="module")
def deployed(sites):
    """`tunesmith deploy` without --api_key (open, as the issue found it); (port, process). One torch thread: on a CPU
    that other work keeps busy, the fuzzer's small generations take seconds instead of minutes."""
    _, friend = sites
    with deploy("--model", MODEL, "--max_new_tokens", "4", "--cors_origins", friend, "--allowed_hosts", FRIEND,
                env_extra={"OMP_NUM_THREADS": "1"}) as running:
        yield running


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    """A running `tunesmith web-ui`; (the address it printed, its output dir, a private dataset on this machine)."""
    root = tmp_path_factory.mktemp("cross-site")
    private = root / "private.jsonl"
    private.write_text(json.dumps({"instruction": "What is the password?", "output": SECRET}) + "\n")
    out = root / "output"
    try:
        with web_ui(out) as page:
            yield page, out, private
    finally:
        stop_run(out)


def send(port: int, method: str, path: str, host: str, headers=None, body: bytes | None = None):
    """One plain HTTP request with the given Host header; (status, response headers, JSON body or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
    r = conn.getresponse()
    data = r.read().decode()
    conn.close()
    with contextlib.suppress(ValueError):
        data = json.loads(data)
    return r.status, r.headers, data


def refused(status, data, code: str, want=403) -> bool:
    """One JSON error: {"error": {"message", "type", "param", "code"}}."""
    return status == want and set(data) == {"error"} and data["error"]["code"] == code and data["error"]["message"]


def port_of(page: str) -> int:
    return int(page.split("/?token=")[0].rsplit(":", 1)[1])


@contextlib.contextmanager
def watching_for_commands():
    """The `tunesmith sft` and `tunesmith data inspect` processes started meanwhile under this test (polled every 50 ms:
    each takes seconds to import, so none slips through)."""
    seen, stop = set(), threading.Event()

    def poll():
        while not stop.is_set():
            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error, ValueError, IndexError):
                    cmd = child.cmdline()
                    if cmd[cmd.index("tunesmith") + 1] in ("sft", "data"):
                        seen.add(" ".join(cmd))
            stop.wait(0.05)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        yield seen
    finally:
        stop.set()
        watcher.join()


def cpu_seconds(proc: psutil.Process) -> float:
    return sum(proc.cpu_times()[:2])


# ---------------------------------------------------------------------------------------------
# Plain HTTP: the requests of the issue, and rebinding-style Host headers


REBINDING = ["attacker.example:{port}", "attacker.example", "127.0.0.1.attacker.example:{port}", "localhost.evil:{port}"]
LOOPBACK = ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "LocalHost"]


def test_the_issues_request_is_refused_and_reads_nothing(webui):
    page, out, private = webui
    body = json.dumps({"dataset": str(private), "model": MODEL}).encode()
    with watching_for_commands() as started:
        status, _, data = send(port_of(page), "POST", "/api/inspect", "attacker.example:7860",
                               {"Content-Type": "text/plain"}, body)
    assert refused(status, data, "host_not_allowed"), data
    assert "--allowed_hosts attacker.example" in data["error"]["message"]  # says what to do if the name is yours
    assert SECRET not in json.dumps(data) and not started


def test_rebinding_hosts_get_403_on_both_servers_and_loopback_names_pass(webui, deployed):
    page, _, _ = webui
    ui, (api, _) = port_of(page), deployed
    token = {"X-Tunesmith-Token": page.split("token=")[1]}
    for host in REBINDING:
        for port, method, path, headers in [(ui, "GET", "/", {}), (ui, "GET", "/api/setup", token),
                                            (ui, "POST", "/api/run", {**token, "Content-Type": "application/json"}),
                                            (api, "GET", "/health", {}), (api, "GET", "/v1/models", {}),
                                            (api, "GET", "/openapi.json", {}),
                                            (api, "POST", "/v1/chat/completions", {"Content-Type": "application/json"})]:
            status, _, data = send(port, method, path, host.format(port=port), headers, b"{}" if method == "POST" else None)
            assert refused(status, data, "host_not_allowed"), (host, path, data)
    for host in LOOPBACK:
        assert send(ui, "GET", "/api/setup", host.format(port=ui), token)[0] == 200, host
        assert send(api, "GET", "/v1/models", host.format(port=api))[0] == 200, host
    assert send(api, "GET", "/v1/models", f"{FRIEND}:{api}")[0] == 200  # --allowed_hosts


def test_the_web_ui_api_wants_its_token_json_and_its_own_page(webui):
    page, out, _ = webui
    port, token = port_of(page), page.split("token=")[1]
    own = f"127.0.0.1:{port}"
    json_type = {"Content-Type": "application/json"}
    command = json.dumps({"model": MODEL, "dataset": "self-cognition"}).encode()
    cases = [  # (method, path, headers, body, status, code)
        ("GET", "/api/setup", {}, None, 401, "invalid_token"),
        ("GET", "/api/setup", {"X-Tunesmith-Token": token[:-1]}, None, 401, "invalid_token"),
        ("POST", f"/api/command?token={token}", json_type, command, 401, "invalid_token"),  # the query: GETs only
        ("POST", "/api/command", {"X-Tunesmith-Token": token, "Content-Type": "text/plain"}, command, 415,
         "unsupported_media_type"),
        ("POST", "/api/run", {"X-Tunesmith-Token": token, "Content-Type": "application/x-www-form-urlencoded"}, command,
         415, "unsupported_media_type"),
        ("POST", "/api/run", {"X-Tunesmith-Token": token, **json_type, "Origin": "http://attacker.example"}, command,
         403, "origin_not_allowed"),
        ("POST", "/api/run", {"X-Tunesmith-Token": token, **json_type, "Origin": "null"}, command, 403,
         "origin_not_allowed"),
        ("PUT", "/api/upload/mine.jsonl", {}, b"{}\n", 401, "invalid_token"),
        ("PUT", "/api/upload/mine.jsonl", {"X-Tunesmith-Token": token, "Origin": f"http://127.0.0.1:{port + 1}"},
         b"{}\n", 403, "origin_not_allowed"),
    ]
    for method, path, headers, body, status, code in cases:
        got, _, data = send(port, method, path, own, headers, body)
        assert refused(got, data, code, status), (method, path, headers, data)
        assert "Traceback" not in data["error"]["message"]
    assert not (out / "webui" / "run.json").exists() and not (out / "webui" / "uploads").exists()
    # what the page itself sends passes: the token as a header (or ?token= on a GET), JSON, its own origin
    assert send(port, "GET", f"/api/run?token={token}", own)[0] == 200
    status, _, data = send(port, "POST", "/api/command", own,
                           {"X-Tunesmith-Token": token, **json_type, "Origin": f"http://{own}"}, command)
    assert status == 200 and data["command"].startswith(f"tunesmith sft --model {MODEL}")


def test_flags_name_the_token_and_more_hosts_and_refuse_an_open_network_page(tmp_path):
    with web_ui(tmp_path / "output", "--token", "my token", "--allowed_hosts", FRIEND) as page:
        assert page.endswith("/?token=my%20token")
        port = port_of(page)
        assert call(page.replace("%20", " "), "/api/setup")[0] == 200
        assert send(port, "GET", "/api/setup", f"{FRIEND}:{port}", {"X-Tunesmith-Token": "my token"})[0] == 200
        status, _, data = send(port, "GET", "/api/setup", f"evil.{FRIEND}", {"X-Tunesmith-Token": "my token"})
        assert refused(status, data, "host_not_allowed")
    proc = tunesmith("web-ui", "--host", "0.0.0.0", "--token", "", "--port", "0", check=False)
    assert proc.returncode != 0 and "only allowed on loopback" in proc.stderr and "Traceback" not in proc.stderr
    proc = tunesmith("deploy", "--model", MODEL, "--cors_origins", "localhost:3000", check=False)
    assert proc.returncode != 0 and "--cors_origins localhost:3000: expected an origin" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# A real browser on another site


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # rebind.test resolves to this machine, as an attacker's name does once its DNS answer is swapped; and without
        # Chromium's own guard for pages of public sites calling local addresses (other browsers, and older ones, have
        # none): the servers must refuse on their own
        launched = p.chromium.launch(executable_path=chromium(), headless=True, args=[
            "--host-resolver-rules=MAP rebind.test 127.0.0.1",
            "--disable-features=LocalNetworkAccessChecks,BlockInsecurePrivateNetworkRequests"])
        yield launched
        launched.close()


def run_attack(browser, page_url: str, target: str, posts: dict, reads: list) -> tuple[list[str], list[tuple]]:
    """Opens the attacker's page at `page_url` and runs its attack; (what the page saw, the answers the browser got
    to its requests, as (method, url, status), which the page itself cannot see)."""
    context = browser.new_context()
    page = context.new_page()
    answers = []
    page.on("response", lambda r: answers.append((r.request.method, r.url, r.status)))
    if page_url.startswith("http://rebind.test"):  # the attacker's page, from the attacker's server (before rebinding)
        page.route(page_url, lambda route: route.fulfill(body=ATTACKER.read_text(), content_type="text/html"))
    page.goto(page_url)
    seen = page.evaluate("([target, posts, reads]) => attack(target, posts, reads)", [target, posts, reads])
    context.close()
    return seen, [a for a in answers if a[1] != page_url]


def webui_attack(private: Path) -> tuple[dict, list]:
    run = json.dumps({"model": MODEL, "dataset": "self-cognition#4", "max_steps": "1"})
    return ({"/api/run": run, "/api/inspect": json.dumps({"model": MODEL, "dataset": str(private)}),
             "/api/command": json.dumps({"model": MODEL, "dataset": str(private)}), "/api/run/stop": "{}"},
            ["/api/setup", "/api/run", "/api/checkpoints"])


DEPLOY_ATTACK = ({path: json.dumps({"model": MODEL, "max_tokens": 200, **body}) for path, body in [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Write a long story about a dragon."}]}),
    ("/v1/completions", {"prompt": "Once upon a time, a dragon"})]}, ["/v1/models"])


def test_a_page_on_another_site_starts_and_reads_nothing(browser, sites, webui, deployed):
    attacker, _ = sites
    page, out, private = webui
    port, proc = deployed
    busy = cpu_seconds(proc)
    with watching_for_commands() as started:
        for target, (posts, reads) in [(page.split("/?")[0], webui_attack(private)),
                                       (f"http://127.0.0.1:{port}", DEPLOY_ATTACK)]:
            seen, answers = run_attack(browser, f"{attacker}/attacker.html", target, posts, reads)
            print(f"\n{target}:", *seen, sep="\n  ")
            assert not [s for s in seen if "READ" in s] and SECRET not in "".join(seen)
            assert len(seen) == 3 * len(posts) + len(reads)
            # the server itself refused each no-cors and form POST with 403 (the JSON POSTs were never sent: their
            # preflight got 403; the GETs' answers carry no CORS header, so the browser withheld them)
            assert [(m, status) for m, _, status in answers] == [("POST", 403)] * 2 * len(posts), answers
    assert not started  # no `tunesmith sft` and no `data inspect`
    assert not (out / "webui" / "run.json").exists() and not list(out.glob("v*-*"))
    assert cpu_seconds(proc) - busy < 1.0  # deploy generated nothing (200 tokens take it several CPU seconds)


def test_a_rebinding_page_reads_only_refusals(browser, webui, deployed):
    """The attacker's own name now resolves to 127.0.0.1: its page is same-origin with the server's port and could read
    every answer, but every answer is the Host refusal."""
    page, out, private = webui
    port, proc = deployed
    busy = cpu_seconds(proc)
    with watching_for_commands() as started:
        for server_port, (posts, reads) in [(port_of(page), webui_attack(private)), (port, DEPLOY_ATTACK)]:
            seen, _ = run_attack(browser, f"http://rebind.test:{server_port}/cats.html", "", posts, reads)
            print(f"\nrebind.test:{server_port}:", *seen, sep="\n  ")
            read = [s for s in seen if "READ" in s]
            assert len(read) == 3 * len(posts) + len(reads)  # nothing hides the answers from a same-origin page...
            assert all("READ 403" in s or "form" in s for s in read) and all("host_not_allowed" in s for s in read)
            assert SECRET not in "".join(seen)  # ...and none holds anything but the refusal
    assert not started and not (out / "webui" / "run.json").exists()
    assert cpu_seconds(proc) - busy < 1.0


def test_the_page_itself_and_a_named_site_still_work(browser, sites, webui, deployed):
    from playwright.sync_api import expect

    _, friend = sites
    page_url, _, _ = webui
    port, _ = deployed
    context = browser.new_context()
    page = context.new_page()
    page.goto(page_url)  # the printed address: the page takes the token and drops it from the address bar
    expect(page.locator("#model")).to_have_value("qwen2.5-0.5b")
    assert "token" not in page.url
    page.reload()  # the tab keeps it
    expect(page.locator("#model")).to_have_value("qwen2.5-0.5b")
    fresh = browser.new_context().new_page()  # the bare address, without the token: one line says what to do
    fresh.goto(page_url.split("?")[0])
    expect(fresh.locator("#error")).to_contain_text("open the address web-ui printed")
    fresh.context.close()
    # the origin named in --cors_origins reads deploy's answers from the browser
    page.goto(f"{friend}/attacker.html")
    seen = page.evaluate("""async (base) => {
        const models = await (await fetch(base + "/v1/models")).json();
        const r = await fetch(base + "/v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json",
            "Authorization": "Bearer unused"}, body: JSON.stringify({model: models.data[0].id, max_tokens: 2,
            messages: [{role: "user", content: "Hi"}]})});
        return [models.data[0].id, r.status, (await r.json()).choices[0].message.content];
    }""", f"http://127.0.0.1:{port}")
    assert seen[:2] == [MODEL, 200] and seen[2]
    context.close()
    status, headers, _ = send(port, "GET", "/v1/models", f"127.0.0.1:{port}", {"Origin": friend})
    assert status == 200 and headers["access-control-allow-origin"] == friend
    status, headers, _ = send(port, "GET", "/v1/models", f"127.0.0.1:{port}")
    assert status == 200 and not [h for h in headers if h.lower().startswith("access-control-")]


# ---------------------------------------------------------------------------------------------
# deploy's API: the official client, and a schema-driven fuzzer


def test_the_openai_client_works_unchanged(deployed):
    from openai import OpenAI

    port, _ = deployed
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [MODEL]
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert answer.choices[0].message.content and answer.usage.completion_tokens <= 3
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True) if c.choices]
    assert "".join(pieces) == answer.choices[0].message.content
    tiny = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          temperature=5e-324)  # too small to divide by: greedy (the fuzzer found a 500)
    assert tiny.choices[0].message.content == answer.choices[0].message.content


def test_fuzzing_deploys_openapi_finds_no_server_error(deployed):
    """Requests built from /openapi.json, valid and invalid ones, for every operation. Those with a `model` ask the
    served one (so they get past the 404 into generation), for at most 4 new tokens when they fit the context."""
    port, _ = deployed
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{port}/openapi.json")
    assert {"/v1/chat/completions", "/v1/completions"} <= set(schema.raw_schema["paths"])

    @given(st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE)))
    @settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def fuzz(case):
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = MODEL
            for key in ("max_tokens", "max_completion_tokens"):
                if type(case.body.get(key)) in (int, float) and 4 < case.body[key] <= 8192:  # 701.0 is 701 tokens
                    case.body[key] = 4
        case.call_and_validate(checks=[not_a_server_error], timeout=120)  # a busy CPU is slow, not broken

    fuzz()
