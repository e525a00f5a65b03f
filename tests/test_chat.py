"""Interactive infer in a real terminal (a pseudo-terminal): prompts, streaming, and the commands."""

import os
import pty
import select
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


class Terminal:
    def __init__(self, *args):
        self.master, slave = pty.openpty()
        env = {**os.environ, "TUNESMITH_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "tunesmith", *args], stdin=slave, stdout=slave,
                                     stderr=subprocess.PIPE, env=env, close_fds=True)
        os.close(slave)
        self.screen = ""

    def read_until(self, text: str, timeout: float = 300) -> str:
        """Everything printed up to the next `text` (consumed)."""
        end = time.time() + timeout
        while text not in self.screen:
            assert time.time() < end, f"waited {timeout} s for {text!r}; screen:\n{self.screen[-2000:]}"
            ready, _, _ = select.select([self.master], [], [], 1)
            if ready:
                try:
                    self.screen += os.read(self.master, 4096).decode("utf-8", errors="replace")
                except OSError:
                    break
        before, _, self.screen = self.screen.partition(text)
        return before

    def type(self, line: str):
        os.write(self.master, (line + "\n").encode())


def test_interactive_chat_streams_and_understands_the_commands(default_model):
    term = Terminal("infer", "--max_new_tokens", "24", "--temperature", "0")
    try:
        term.read_until("<<< ")
        term.type("中国的首都是哪里?")
        answer = term.read_until("<<< ")
        assert ">>> " in answer and "北京" in answer
        term.type("它有多少人口?")  # multi-turn: the history is kept until `clear`
        assert term.read_until("<<< ").strip()
        term.type("clear")
        term.read_until("<<< ")
        term.type("multi-line")
        term.read_until("<<<[M] ")
        term.type("Translate to English:")
        term.type("你好#")
        answer = term.read_until("<<<[M] ")
        assert "hello" in answer.lower()
        term.type("single-line")
        term.read_until("<<< ")
        term.type("exit")
        assert term.proc.wait(timeout=60) == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
        os.close(term.master)
