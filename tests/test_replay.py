"""--replay_ratio (issue 19): the base model's own answers to a built-in bilingual bank of general prompts, generated
once per base model, cached, and mixed into the training data at the ratio the user sets."""

import json
import re

import pytest

from conftest import GUIDE_DATA, tunesmith

MODEL = "smollm2-135m"
HAN = re.compile(r"[\u4e00-\u9fff]")


def test_a_bad_ratio_is_one_line_and_no_run(tmp_path):
    for value, says in (("-1", "--replay_ratio must be 0 (off) or more"), ("nan", "got nan"), ("inf", "got inf"),
                        ("half", "--replay_ratio: invalid float value: 'half'")):
        proc = tunesmith("sft", "--dataset", GUIDE_DATA, "--replay_ratio", value, "--output_dir", tmp_path / "out",
                         check=False, timeout=120)
        assert proc.returncode == 2, (value, proc.stderr)
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and says in proc.stderr, (value, proc.stderr)
        assert not (tmp_path / "out").exists()


def test_the_bank_is_bilingual_general_and_not_what_eval_scores():
    """Retention is scored on eval's general questions: replaying those would rehearse the test."""
    from tunesmith.data import replay
    from tunesmith.data.sources import BUILTIN_DIR
    from tunesmith.inference.evaluate import BUILTIN

    def key(q):
        return re.sub(r"[\s?？。.!！,，]", "", q).lower()

    bank = replay.prompts()
    chinese = [q for q in bank if HAN.search(q)]
    assert len(set(map(key, bank))) == len(bank) and 16 <= len(chinese) <= len(bank) - 16
    scored = {key(q["query"]) for q in BUILTIN}
    identity = {key(json.loads(line)["query"]) for line in (BUILTIN_DIR / "self_cognition.jsonl").open(encoding="utf-8")}
    identity |= {key(r["instruction"]) for r in json.loads(GUIDE_DATA.read_text(encoding="utf-8"))}
    assert not {key(q) for q in bank} & (scored | identity)


@pytest.mark.slow
def test_answers_are_generated_once_per_model_and_mixed_at_the_ratio(tmp_path, default_model):
    """The first run with replay asks the base model once and caches its answers; a run at another ratio reuses them
    and mixes in round(ratio x samples) of them."""
    from tunesmith.data import replay
    from tunesmith.model.resolve import cache_root

    home = tmp_path / "home"  # a fresh replay cache; the converted models are shared, not rebuilt
    home.mkdir()
    (home / "models").symlink_to(cache_root() / "models")
    env = {"TUNESMITH_HOME": str(home)}
    sft = ["sft", "--model", MODEL, "--dataset", GUIDE_DATA, "--max_steps", "1", "--system", "You are a helpful assistant.",
           "--output_dir", tmp_path / "out"]
    bank = replay.prompts()

    first = tunesmith(*sft, "--replay_ratio", "0.5", env_extra=env)
    assert f"the base model answers {len(bank)} general prompts once (greedy)" in first.stderr
    [cached] = (home / "replay").glob("*.jsonl")
    records = [json.loads(line) for line in cached.read_text(encoding="utf-8").splitlines()]
    assert len(records) > len(bank) // 2 and all(r["query"] in bank and r["response"].strip() for r in records)
    assert any(HAN.search(r["query"]) for r in records) and any(not HAN.search(r["query"]) for r in records)
    # what is replayed is what the base model says: `tunesmith infer` gives the same greedy answers, one at a time
    one_line = [r for r in records if "\n" not in r["response"]]
    picked = [next(r for r in one_line if HAN.search(r["query"])), next(r for r in one_line if not HAN.search(r["query"]))]
    said = tunesmith("infer", "--model", MODEL, "--system", "You are a helpful assistant.", "--temperature", "0",
                     "--max_new_tokens", "128", "--stream", "false", *[a for r in picked for a in ("--query", r["query"])],
                     env_extra=env).stdout.strip().splitlines()
    assert said == [r["response"] for r in picked]
    mixed = f"replay of the base model's own answers (--replay_ratio 0.5): {len(records)} records (query/response), sampled 4"
    assert mixed in first.stderr and "12 training samples" in first.stderr

    stamp = cached.stat().st_mtime_ns
    second = tunesmith(*sft, "--replay_ratio", "2", env_extra=env)
    assert "general prompts once" not in second.stderr and cached.stat().st_mtime_ns == stamp
    assert "(--replay_ratio 2): " in second.stderr and "sampled 16" in second.stderr and "24 training samples" in second.stderr
    assert list((home / "replay").glob("*.jsonl")) == [cached]

    trained = json.loads((sorted((tmp_path / "out").glob("v1-*"))[0] / "args.json").read_text())
    assert trained["replay_ratio"] == 2  # the checkpoint says how it was trained
