"""Issue 3: every data shape users bring, hub ids offline, self-cognition, multi-turn loss, the tokenized
cache and `data inspect`. Runs on local files and the default model's tokenizer only (no training)."""

import csv
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import load_datasets, tunesmith
from tunesmith.cli import parse_args
from tunesmith.data.sources import parse_spec
from tunesmith.errors import UserError

# One two-turn conversation with a system prompt, written by hand in every form.
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
    {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
]
FORMS = {
    "alpaca": {"system": "You are terse.", "history": [["1+1?", "2"]], "instruction": "2+2?", "input": "", "output": "4"},
    "sharegpt": {"conversations": [{"from": "system", "value": "You are terse."}, {"from": "human", "value": "1+1?"},
                                   {"from": "gpt", "value": "2"}, {"from": "human", "value": "2+2?"},
                                   {"from": "gpt", "value": "4"}]},
    "messages": {"messages": CONVERSATION},
    "query/response": {"system": "You are terse.", "history": [["1+1?", "2"]], "query": "2+2?", "response": "4"},
}


def write_as(path, records):
    """Write records as .json / .jsonl / .csv / .parquet, by the file's suffix."""
    if path.suffix == ".json":
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    elif path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(records[0]))
            w.writeheader()
            w.writerows([{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in records])
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    return str(path)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_every_form_in_every_file_type_gives_the_same_conversation(tmp_path, form, suffix):
    path = write_as(tmp_path / f"data{suffix}", [FORMS[form]] * 3)
    records, report = load_datasets([path], 42, [], [])
    assert [r["messages"] for r in records] == [CONVERSATION] * 3
    assert report == [f"{path}: 3 records ({form})"]


def test_folder_of_mixed_files_reports_each_form(tmp_path):
    (tmp_path / "d").mkdir()
    write_as(tmp_path / "d" / "a.jsonl", [FORMS["alpaca"]])
    write_as(tmp_path / "d" / "b.parquet", [FORMS["sharegpt"]] * 2)
    records, report = load_datasets([str(tmp_path / "d")], 42, [], [])
    assert len(records) == 3 and all(r["messages"] == CONVERSATION for r in records)
    assert report == [f"{tmp_path / 'd'}: 3 records (alpaca, sharegpt)"]


def test_columns_rename_fields(tmp_path):
    path = write_as(tmp_path / "d.csv", [{"prompt": "2+2?", "completion": "4"}])
    with pytest.raises(UserError, match=r"d.csv row 1 \(line 2\): unknown record form \(fields: prompt, completion\).*--columns"):
        load_datasets([path], 42, [], [])
    records, _ = load_datasets([path], 42, [], [], {"prompt": "instruction", "completion": "output"})
    assert records[0]["messages"] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    with pytest.raises(UserError, match="--columns"):
        parse_args("sft", ["--dataset", path, "--columns", "prompt=instruction"])


@pytest.mark.parametrize("text, expected", [
    ("data.jsonl#50", (None, "data.jsonl", None, 50)),
    ("hf::llm-wizard/alpaca-gpt4-data-zh#500", ("hf", "llm-wizard/alpaca-gpt4-data-zh", None, 500)),
    ("ms::AI-ModelScope/alpaca-gpt4-data-en", ("ms", "AI-ModelScope/alpaca-gpt4-data-en", None, None)),
    ("owner/name:subset#3", (None, "owner/name", "subset", 3)),
])
def test_dataset_syntax(text, expected):
    s = parse_spec(text)
    assert (s.hub, s.name, s.subset, s.sample) == expected


def test_hub_route_and_local_datasets_copies(tmp_path):
    """hf:: goes through datasets.load_dataset (here on a local folder: no internet needed), and a
    `save_to_disk` copy of a hub dataset is a valid --dataset."""
    import datasets

    write_as(tmp_path / "repo.jsonl", [FORMS["alpaca"]] * 4)
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo.jsonl").rename(tmp_path / "repo" / "train.jsonl")
    records, report = load_datasets([f"hf::{tmp_path / 'repo'}#2"], 42, [], [])
    assert [r["messages"] for r in records] == [CONVERSATION] * 2 and "4 records (alpaca), sampled 2" in report[0]

    datasets.Dataset.from_list([FORMS["query/response"]] * 5).save_to_disk(str(tmp_path / "saved"))
    records, report = load_datasets([str(tmp_path / "saved")], 42, [], [])
    assert [r["messages"] for r in records] == [CONVERSATION] * 5 and "(query/response)" in report[0]


def test_hub_datasets_left_out_records_are_reported(tmp_path):
    import datasets

    rows = [FORMS["query/response"], {**FORMS["query/response"], "response": ""}, FORMS["query/response"]]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    records, report = load_datasets([str(tmp_path / "saved")], 42, [], [])
    assert len(records) == 2 and "left out 1 unusable records" in report[0] and "row 2" in report[0]


def test_unreachable_hub_is_one_clear_line(tmp_path):
    proc = tunesmith("data", "inspect", "AI-ModelScope/alpaca-gpt4-data-zh#500", check=False,
                     env_extra={"HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert "no dataset hub is reachable" in err and "llm-wizard/alpaca-gpt4-data-zh" in err and "save_to_disk" in err


def test_builtin_self_cognition(tmp_path):
    records, report = load_datasets(["self-cognition"], 42, ["小黄", "Xiao Huang"], ["魔搭", "ModelScope"])
    answers = [r["messages"][-1]["content"] for r in records]
    assert len(records) >= 100 and "{{" not in json.dumps(records, ensure_ascii=False)
    assert sum("小黄" in a for a in answers) >= 40 and sum("Xiao Huang" in a for a in answers) >= 40
    assert len({r["messages"][0]["content"] for r in records}) == len(records)  # every question differs
    few, report = load_datasets(["self-cognition#10"], 42, ["X"], ["Y"])
    assert len(few) == 10 and "sampled 10" in report[0]
    proc = tunesmith("data", "inspect", "self-cognition#10", check=False)
    assert proc.returncode == 2 and "--model_name" in proc.stderr and "Traceback" not in proc.stderr


def test_builtin_self_cognition_by_language():
    # The guide's main job mixes `self-cognition:en#8` into eight Chinese records: eight English ones, each
    # naming the new identity, so that English questions take it too (issue 19).
    en, report = load_datasets(["self-cognition:en#8"], 42, ["Swift-Robot"], ["CSDN 迪菲赫尔曼"])
    assert len(en) == 8 and report[0].startswith("self-cognition:en#8: 55 records") and "sampled 8" in report[0]
    chinese = re.compile("[\u4e00-\u9fff]")
    assert not any(chinese.search(r["messages"][0]["content"]) for r in en)
    assert sum("Swift-Robot" in r["messages"][-1]["content"] for r in en) >= 7
    zh, _ = load_datasets(["self-cognition:zh"], 42, ["X"], ["Y"])
    assert len(zh) == 56 and all(chinese.search(r["messages"][0]["content"]) for r in zh)
    everything, _ = load_datasets(["self-cognition"], 42, ["X"], ["Y"])
    assert len(everything) == len(zh) + 55
    proc = tunesmith("data", "inspect", "self-cognition:fr#8", "--model_name", "R", "--model_author", "L", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "self-cognition:fr#8: the built-in set has the subsets zh and en" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("name, records, needle", [
    ("mixed.jsonl", [FORMS["alpaca"], FORMS["messages"]], "mixed.jsonl:2: a messages record in a file of alpaca records"),
    ("types.parquet", [{"query": "a", "response": "b"}, {"query": "a", "response": "  "}], "types.parquet row 2: field 'response' is empty"),
    ("loss.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "loss": "no"}]}],
     "loss.jsonl:1: messages[1].loss must be true or false"),
])
def test_bad_records_name_file_and_record(tmp_path, name, records, needle):
    with pytest.raises(UserError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_datasets([write_as(tmp_path / name, records)], 42, [], [])


def test_bad_csv_and_parquet_files(tmp_path):
    (tmp_path / "short.csv").write_text("query,response\na,b\nc\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"short.csv row 2 \(line 3\): has fewer cells than the header"):
        load_datasets([str(tmp_path / "short.csv")], 42, [], [])
    (tmp_path / "latin1.csv").write_bytes(b"query,response\na,b\ncaf\xe9,b\n")
    with pytest.raises(UserError, match=r"latin1.csv row 2 .*not UTF-8"):
        load_datasets([str(tmp_path / "latin1.csv")], 42, [], [])
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="broken.parquet: not a readable parquet file"):
        load_datasets([str(tmp_path / "broken.parquet")], 42, [], [])
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(UserError, match="empty.jsonl: file is empty"):
        load_datasets([str(tmp_path / "empty.jsonl")], 42, [], [])


# ---------------------------------------------------------------------------------------------
# Tokens: loss mask, cache, inspect (the default model's tokenizer only)


@pytest.fixture(scope="module")
def tok(default_model):
    from tunesmith.model.load import load_tokenizer

    return load_tokenizer(default_model)


@pytest.fixture()
def home(tmp_path, monkeypatch, default_model):
    """A fresh tokenized cache; the converted models are shared, not rebuilt."""
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "models").symlink_to(default_model.parent)
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def trained_text(tok, enc):
    return tok.decode([t for t, l in zip(enc.input_ids, enc.labels) if l != -100])


def test_loss_on_every_answer_last_round_and_per_message(tmp_path, tok, default_model, home):
    from tunesmith.data.cache import prepare

    conv = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "two"},
                         {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "four"}]}
    muted = {"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "skip me", "loss": False},
                          {"role": "user", "content": "b?"}, {"role": "assistant", "content": "learn me"}]}
    path = write_as(tmp_path / "multi.jsonl", [conv, muted])
    default = prepare(parse_args("data", ["--dataset", path]), tok, default_model).train
    assert trained_text(tok, default[0]) == "two<|im_end|>four<|im_end|>"
    assert trained_text(tok, default[1]) == "learn me<|im_end|>"
    last = prepare(parse_args("data", ["--dataset", path, "--loss_scale", "last_round"]), tok, default_model).train
    assert trained_text(tok, last[0]) == "four<|im_end|>"


def test_second_run_uses_the_cache_and_changes_invalidate_it(tmp_path, tok, default_model, home, capfd):
    from tunesmith.data.cache import prepare

    path = write_as(tmp_path / "d.jsonl", [{"query": f"q{i}?", "response": f"answer {i}"} for i in range(1500)])
    argv = ["--dataset", path + "#1200", "--system", "S"]

    def prepared(args):  # (the samples, whether they came from the cache: what sft's log line says)
        capfd.readouterr()
        out = prepare(parse_args("data", args), tok, default_model)
        return out, "skipped reading and tokenizing" in capfd.readouterr().err

    (first, cached_1), (second, cached_2) = prepared(argv), prepared(argv)
    assert not cached_1 and cached_2
    assert len(first.train) == len(second.train) == 1200
    assert [first.train[i] for i in (0, 599, 1199)] == [second.train[i] for i in (0, 599, 1199)]
    for change in (["--max_length", "12"], ["--system", "T"], ["--seed", "1"], ["--model_name", "N"]):
        assert not prepared(argv + change)[1]
    write_as(tmp_path / "d.jsonl", [{"query": f"q{i}?", "response": f"ANSWER {i}"} for i in range(1500)])
    changed, cached = prepared(argv)
    assert not cached and "ANSWER" in tok.decode(changed.train[0].input_ids)
    assert len(list((home / "tokenized").iterdir())) == 6


def test_data_inspect_shows_counts_lengths_and_the_loss_mask(tmp_path, home):
    path = write_as(tmp_path / "d.jsonl", [{"query": "Who are you?", "response": "I am {{NAME}}."}] * 3
                    + [{"query": "long " * 300, "response": "ok"}])
    out = tunesmith("data", "inspect", path, "self-cognition#5", "--model_name", "Robo", "--model_author", "Lab",
                    "--max_length", "100", "--system", "Be brief.").stdout
    assert f"{path}: 4 records (query/response)" in out and "self-cognition#5: 111 records (query/response), sampled 5" in out
    assert "samples: 9 for training" in out and "longer than --max_length 100: 1 (dropped" in out
    assert "tokens per sample: min " in out and " p95 " in out
    assert "<|im_start|>system\nBe brief.<|im_end|>" in out and "[[I am Robo.<|im_end|>]]" in out


# ---------------------------------------------------------------------------------------------
# Random and corrupt files: a clean error naming the file, or every record loaded


good = st.sampled_from(list(FORMS.values()))
junk = st.one_of(st.dictionaries(st.text(max_size=5), st.one_of(st.text(max_size=5), st.integers(), st.none()), max_size=3),
                 st.lists(st.integers(), max_size=2), st.text(max_size=5), st.none())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(st.one_of(good, good, junk), min_size=1, max_size=6),
       suffix=st.sampled_from([".json", ".jsonl", ".csv"]), cut=st.integers(0, 400), garbage=st.binary(max_size=4))
def test_random_and_corrupt_files_never_crash_or_lose_records(tmp_path, records, suffix, cut, garbage):
    path = tmp_path / f"f{suffix}"
    if suffix == ".csv":
        records = [r if isinstance(r, dict) and r else {"x": "y"} for r in records]
        keys = list(records[0])
        records = [{k: r.get(k, "") for k in keys} for r in records]  # csv: one header for all rows
    write_as(path, records)
    raw = path.read_bytes()
    path.write_bytes(raw[:cut] + garbage + raw[cut:] if garbage else raw)  # maybe corrupt some bytes
    try:
        loaded, report = load_datasets([str(path)], 0, [], [])
    except UserError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return
    assert len(loaded) == int(report[0].split(": ")[1].split(" records")[0])  # nothing dropped unreported
    assert all(m["role"] in ("system", "user", "assistant", "tool") for r in loaded for m in r["messages"])


def test_sft_starts_from_the_cache_that_inspect_filled(tmp_path, home):
    """End to end: `data inspect` tokenizes and caches; `sft` with the same data settings skips
    tokenizing and trains (2 steps) with --loss_scale last_round on multi-turn sharegpt data."""
    path = write_as(tmp_path / "chat.jsonl", [FORMS["sharegpt"]] * 4)
    data_flags = [path, "self-cognition#4", "--model_name", "Robo", "--model_author", "Lab", "--loss_scale", "last_round"]
    out = tunesmith("data", "inspect", *data_flags).stdout
    assert "<|im_start|>assistant\n2<|im_end|>" in out and "<|im_start|>assistant\n[[4<|im_end|>]]" in out
    proc = tunesmith("sft", "--dataset", *data_flags, "--max_steps", "2", "--output_dir", tmp_path / "out")
    assert "tokenized data from cache" in proc.stderr and "8 training samples" in proc.stderr
    args = json.loads((tmp_path / "out").glob("v*/args.json").__next__().read_text())
    assert args["loss_scale"] == "last_round" and args["dataset"][1] == "self-cognition#4"
