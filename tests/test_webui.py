"""`tunesmith web-ui`, as a user meets it: a real server on loopback, its API over real HTTP, and the page in a real
headless Chromium (Playwright) — pick the small model and the built-in data, inspect it, train, watch the chart,
reload, try a duplicate run from a second tab, stop with a checkpoint kept, and chat with base and tuned side by side."""

import json
from pathlib import Path

import pytest

from conftest import GUIDE_DATA, ROOT, call, chromium, stop_run, web_ui

MODEL = "smollm2-135m"
SCREENSHOT = ROOT / "docs" / "webui.png"


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    """A running `tunesmith web-ui`; yields (the address it printed, with its token; its output dir)."""
    out = tmp_path_factory.mktemp("webui") / "output"
    try:
        with web_ui(out) as url:
            yield url, out
    finally:
        stop_run(out)


def test_bad_input_gets_one_clear_line(webui):
    url, _ = webui
    cases = [
        ("/api/command", {"model": MODEL, "dataset": ""}, 400, "no training data"),
        ("/api/command", {"model": MODEL, "dataset": "missing.jsonl"}, 400, "--dataset missing.jsonl: file not found"),
        ("/api/command", {"model": MODEL, "dataset": "self-cognition", "learning_rate": "fast"}, 400, "--learning_rate"),
        ("/api/command", {"model": MODEL, "dataset": "self-cognition", "lora_rank": "0"}, 400, "--lora_rank must be"),
        ("/api/command", b"{not json", 400, "not valid JSON"),
        ("/api/run/stop", {}, 409, "no run is going"),
        ("/api/chat", {"model": "tuned", "messages": [{"role": "user", "content": "hi"}]}, 400, "no checkpoint"),
        ("/api/chat", {"model": "tuned", "checkpoint": "/nowhere", "messages": [{"role": "user", "content": "hi"}]},
         400, "--adapters /nowhere"),
        ("/api/nothing", {}, 404, "no such endpoint"),
    ]
    for path, body, status, words in cases:
        code, answer = call(url, path, body)
        assert code == status and words in answer["error"]["message"], (path, code, answer)
        assert "Traceback" not in answer["error"]["message"]
    code, answer = call(url, "/api/upload/../../evil.json", b"[]", "PUT")
    assert code in (400, 404)
    code, answer = call(url, "/api/upload/notes.txt", b"hello", "PUT")
    assert code == 400 and ".jsonl" in answer["error"]["message"]


def test_upload_lands_in_the_command(webui):
    url, out = webui
    record = {"instruction": "Who are you?", "output": "A test model."}
    code, answer = call(url, "/api/upload/mine.jsonl", (json.dumps(record) + "\n").encode(), "PUT")
    assert code == 200 and Path(answer["dataset"]) == out / "webui" / "uploads" / "mine.jsonl"
    code, answer = call(url, "/api/command", {"model": MODEL, "dataset": answer["dataset"], "num_train_epochs": "3"})
    assert code == 200
    assert answer["command"] == f"tunesmith sft --model {MODEL} --dataset {out}/webui/uploads/mine.jsonl --output_dir {out}"
    assert call(url, "/api/setup")[1]["uploaded"] == [str(out / "webui" / "uploads" / "mine.jsonl")]


@pytest.mark.slow
def test_train_watch_stop_and_chat_in_a_real_browser(webui):
    from playwright.sync_api import expect, sync_playwright

    url, out = webui
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        expect(page.locator("#model")).to_have_value("qwen2.5-0.5b")  # the offline default, preselected
        expect(page.locator("#f-num_train_epochs")).to_have_value("10")  # the guide's settings
        page.set_input_files("#upload", str(GUIDE_DATA))  # an upload lands in the list, ticked
        uploaded = page.locator(f"#datasets input[value='{out}/webui/uploads/self_cognition.json']")
        expect(uploaded).to_be_checked()
        uploaded.uncheck()
        page.fill("#model", MODEL)
        page.check("#ds-self-cognition")
        page.fill("#f-learning_rate", "fast")  # bad input: one line on the page
        page.locator("#f-learning_rate").dispatch_event("change")
        expect(page.locator("#error")).to_contain_text("--learning_rate: invalid float value: 'fast'")
        page.fill("#ds-self-cognition-n", "16")
        for name, value in {"max_length": "128", "max_steps": "200", "logging_steps": "1", "learning_rate": "1e-3",
                            "model_name": "Robbie", "model_author": "Tunesmith"}.items():
            page.fill(f"#f-{name}", value)
        page.locator("#f-model_author").dispatch_event("change")
        expect(page.locator("#error")).to_be_hidden()
        expect(page.locator("#command")).to_contain_text(
            f"tunesmith sft --model {MODEL} --dataset 'self-cognition#16' --torch_dtype bfloat16 "
            "--system 'You are a helpful assistant.' --max_length 128 --model_name Robbie --model_author Tunesmith")

        page.click("#inspect")  # `tunesmith data inspect`: the rendered sample with its trained tokens marked
        expect(page.locator("#inspect-output mark", has_text="Robbie").first).to_be_visible(timeout=60_000)
        expect(page.locator("#inspect-command")).to_contain_text("tunesmith data inspect 'self-cognition#16'")

        command = page.locator("#command").inner_text()
        page.click("#start")
        expect(page.locator("#status")).to_have_text("running")
        expect(page.locator("#run-command")).to_have_text(command)
        page.wait_for_function("document.getElementById('chart').dataset.points >= 3", timeout=120_000)
        expect(page.locator("#progress")).to_contain_text("of 200")
        expect(page.locator("#progress")).to_contain_text("ETA")
        expect(page.locator("#curves")).to_contain_text("tensorboard --logdir ")  # the run's curves, one command away

        page.reload()  # the run survives a reload, and so does the form
        expect(page.locator("#status")).to_have_text("running")
        expect(page.locator("#run-command")).to_have_text(command)
        expect(page.locator("#command")).to_have_text(command)
        expect(page.locator("#start")).to_be_disabled()
        page.wait_for_function("document.getElementById('chart').dataset.points >= 24", timeout=120_000)

        second = browser.new_page()  # a second tab sees the run, and cannot start another
        second.goto(url)
        expect(second.locator("#status")).to_have_text("running")
        second.fill("#model", MODEL)
        second.check("#ds-self-cognition")
        second.evaluate("start()")  # as if its button had been clicked before it learned of the run
        expect(second.locator("#error")).to_contain_text("a run is already going")
        second.close()
        with web_ui(out) as restarted:  # another web-ui on the same folder (or this one restarted) knows the run too
            assert call(restarted, "/api/run")[1]["status"] == "running"
            code, answer = call(restarted, "/api/run", {"model": MODEL, "dataset": "self-cognition"})
            assert code == 409 and "a run is already going" in answer["error"]["message"]
        assert len(list(out.glob("v*-*"))) == 1

        page.click("#stop")
        expect(page.locator("#status")).to_have_text("stopped", timeout=60_000)
        run = call(url, "/api/run")[1]
        ckpt = Path(run["checkpoint"])
        assert (ckpt / "adapter_model.safetensors").is_file() and ckpt.name == f"checkpoint-{run['step']}"
        expect(page.locator("#checkpoint")).to_have_value(str(ckpt))

        page.evaluate("""() => { window.pieces = 0; new MutationObserver(() => window.pieces++)
            .observe(document.getElementById('tuned-answers'), {childList: true, subtree: true, characterData: true}); }""")
        page.fill("#chat-input", "Who are you?")
        page.click("#send")
        expect(page.locator("#send")).to_be_enabled(timeout=120_000)
        base = page.locator("#base-answers .a").last.inner_text()
        tuned = page.locator("#tuned-answers .a").last.inner_text()
        assert len(base) > 5 and len(tuned) > 5 and base != tuned, (base, tuned)
        assert page.evaluate("window.pieces") >= 4  # streamed: the answer grew piece by piece
        page.click("#inspect")  # for the screenshot: the data and its loss mask next to the run
        expect(page.locator("#inspect-output mark", has_text="Robbie").first).to_be_visible(timeout=60_000)
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        browser.close()
