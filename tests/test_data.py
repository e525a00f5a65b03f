"""Dataset files: every supported form gives the same conversation; bad files give one clear line."""

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import load_datasets
from tunesmith.data.sources import sample, to_messages
from tunesmith.errors import UserError

EXPECTED = [{"role": "user", "content": "你是谁?"}, {"role": "assistant", "content": "我是小助手。"}]


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


@pytest.mark.parametrize("record", [
    {"instruction": "你是谁?", "input": "", "output": "我是小助手。"},
    {"conversations": [{"from": "human", "value": "你是谁?"}, {"from": "gpt", "value": "我是小助手。"}]},
    {"messages": [{"role": "user", "content": "你是谁?"}, {"role": "assistant", "content": "我是小助手。"}]},
    {"query": "你是谁?", "response": "我是小助手。"},
])
def test_all_forms_give_the_same_conversation(tmp_path, record):
    for name, text in [("d.json", json.dumps([record])), ("d.jsonl", json.dumps(record) + "\n")]:
        records, report = load_datasets([write(tmp_path, name, text)], 42, [], [])
        assert [r["messages"] for r in records] == [EXPECTED]
        assert "1 records" in report[0]


def test_alpaca_input_joins_instruction_with_newline():
    msgs = to_messages({"instruction": "Translate", "input": "你好", "output": "Hello", "system": "S"}, "r")
    assert msgs == [{"role": "system", "content": "S"}, {"role": "user", "content": "Translate\n你好"},
                    {"role": "assistant", "content": "Hello"}]


def test_guide_file_loads_and_placeholders_fill(tmp_path):
    from conftest import GUIDE_DATA

    records, _ = load_datasets([str(GUIDE_DATA)], 42, [], [])
    assert len(records) == 8 and records[0]["messages"][0]["content"] == "你是谁?"
    path = write(tmp_path, "p.jsonl", "\n".join(json.dumps(r) for r in [
        {"query": "你是谁?", "response": "我是{{NAME}},由{{AUTHOR}}开发。"},
        {"query": "Who are you?", "response": "I am {{NAME}}, made by {{AUTHOR}}."}]))
    records, _ = load_datasets([path], 42, ["小黄", "Xiao Huang"], ["魔搭", "ModelScope"])
    assert records[0]["messages"][1]["content"] == "我是小黄,由魔搭开发。"
    assert records[1]["messages"][1]["content"] == "I am Xiao Huang, made by ModelScope."
    with pytest.raises(UserError, match=r"p.jsonl:1: the text holds \{\{NAME\}\} but --model_name is not set"):
        load_datasets([path], 42, [], [])


def test_sampling_follows_the_reference():
    rng = random.Random(0)
    data = list(range(10))
    few = sample(data, 4, rng)
    assert len(few) == 4 and len(set(few)) == 4
    many = sample(data, 25, random.Random(0))
    assert len(many) == 25 and all(many.count(x) in (2, 3) for x in data) and many[:20] == data + data
    assert sample(data, None, rng) == data


def test_sampling_spec_and_seed(tmp_path):
    path = write(tmp_path, "d.jsonl", "\n".join(json.dumps({"query": f"q{i}", "response": f"a{i}"}) for i in range(20)))
    a, report = load_datasets([path + "#5"], 1, [], [])
    b, _ = load_datasets([path + "#5"], 1, [], [])
    assert len(a) == 5 and a == b and "sampled 5" in report[0]


@pytest.mark.parametrize("name, text, needle", [
    ("bad.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]', "bad.json:2: malformed JSON"),
    ("bad.jsonl", '{"query": "a", "response": "b"}\n{"query": "c", "response": \n', "bad.jsonl:2: malformed JSON"),
    ("missing.json", '[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', "missing.json record 2: alpaca record without 'output'"),
    ("empty_answer.json", '[{"instruction": "a", "output": "  "}]', "record 1: field 'output' is empty"),
    ("wrong_type.json", '[{"instruction": "a", "output": 5}]', "field 'output' must be text, got int"),
    ("fields.json", '[{"prompt": "a", "completion": "b"}]', "unknown record form (fields: prompt, completion)"),
    ("empty.json", "   \n", "empty.json: file is empty"),
    ("role.jsonl", '{"messages": [{"role": "robot", "content": "x"}]}', "role.jsonl:1: messages[0] has role 'robot'"),
    ("noanswer.jsonl", '{"messages": [{"role": "user", "content": "x"}]}', "no assistant answer"),
])
def test_bad_files_name_file_and_record(tmp_path, name, text, needle):
    with pytest.raises(UserError) as e:
        load_datasets([write(tmp_path, name, text)], 42, [], [])
    assert needle in str(e.value)


def test_non_utf8_names_the_line(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"query": "a", "response": "b"}\n{"query": "caf\xe9", "response": "b"}\n')
    with pytest.raises(UserError, match=r"latin1.jsonl:2: not UTF-8"):
        load_datasets([str(p)], 42, [], [])


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_datasets([str(tmp_path / "nope.json")], 42, [], [])


records = st.one_of(
    st.dictionaries(st.sampled_from(["instruction", "input", "output", "query", "response", "messages", "history", "system"]),
                    st.one_of(st.text(), st.integers(), st.none(), st.lists(st.text(), max_size=3),
                              st.lists(st.dictionaries(st.sampled_from(["role", "content", "from", "value"]),
                                                       st.one_of(st.sampled_from(["user", "assistant", "gpt"]), st.text())), max_size=3))),
    st.text(), st.integers(), st.lists(st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(records)
def test_any_record_is_clean_error_or_valid_conversation(record):
    try:
        msgs = to_messages(record, "f.jsonl:1")
    except UserError as e:
        assert str(e).startswith("f.jsonl:1")
        return
    assert msgs and all(m["role"] in ("system", "user", "assistant", "tool") and isinstance(m["content"], str) for m in msgs)
    assert any(m["role"] == "assistant" and m["content"].strip() for m in msgs)
