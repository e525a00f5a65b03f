"""Files a reader polls (args.json, the status file, the web UI's state) are never seen half-written, and a
failed write leaves the old file and no stray temporary beside it."""

import os
import threading

import pytest

from tunesmith.files import write_atomic


def test_readers_see_the_old_file_or_the_new_one(tmp_path):
    path = tmp_path / "status.json"
    write_atomic(path, "a" * 100_000)
    seen, stop = set(), threading.Event()

    def read():
        while not stop.is_set():
            seen.add(path.read_text(encoding="utf-8")[:1] + str(len(path.read_text(encoding="utf-8"))))

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(200):
        write_atomic(path, ("b" if i % 2 else "a") * 100_000)
    stop.set()
    reader.join()
    assert seen <= {"a100000", "b100000"}
    assert sorted(os.listdir(tmp_path)) == ["status.json"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "args.json"
    write_atomic(path, '{"old": true}')
    with pytest.raises(TypeError):
        write_atomic(path, None)  # fails inside the write, after the temporary file exists
    assert path.read_text(encoding="utf-8") == '{"old": true}'
    assert sorted(os.listdir(tmp_path)) == ["args.json"]
