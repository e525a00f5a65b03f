"""Canned answers to the replay bank for a random-weight model (bench only): `--replay_ratio` and `--keep_kl` need the
base model's own answers, which a model with random weights never finishes, so `tunesmith sft` would refuse them.
    python3 bench/seed_replay.py MODEL_DIR SYSTEM      (TUNESMITH_HOME as the runs will have it)
Writes them where `tunesmith sft --model MODEL_DIR --system SYSTEM` looks; prints the file."""

import json
import sys
from types import SimpleNamespace

from tunesmith.data import replay
from tunesmith.model.resolve import resolve_model

WORDS = "the answer depends on what is asked and on what is known about it".split()


def main(model: str, system: str) -> None:
    path = replay.answers_file(SimpleNamespace(system=system, enable_thinking=None), resolve_model(model).path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"query": q, "response": " ".join(WORDS[: 4 + i % 10] * (1 + i % 4)) + "."} for i, q in enumerate(replay.prompts())]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
