"""Data: read dataset files, turn every record into chat messages, sample, fill placeholders.

Every record becomes `{"messages": [{"role": ..., "content": ...}, ...]}`. Recognised forms:
  messages  {"messages": [{"role": "user", "content": ...}, ...]}
  sharegpt  {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}
  alpaca    {"instruction", "input", "output", optional "system", "history"}
  query     {"query", "response", optional "system", "history"}
Errors name the file and the record (line for .jsonl).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

SPEC = re.compile(r"^(?P<path>.+?)(?:#(?P<n>\d+))?$")
PLACEHOLDER = re.compile(r"\{\{(NAME|AUTHOR)\}\}")
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
            "model": "assistant", "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}


@dataclass
class DatasetSpec:
    text: str
    path: Path
    sample: int | None


def parse_spec(text: str) -> DatasetSpec:
    m = SPEC.match(text.strip())
    if not m:
        raise UserError(f"--dataset '{text}': expected PATH or PATH#N")
    path = m.group("path")
    for prefix in ("hf::", "ms::"):
        if path.startswith(prefix):
            raise UserError(f"--dataset {text}: hub datasets are not supported yet; download it and pass the local file")
    return DatasetSpec(text, Path(path).expanduser(), int(m.group("n")) if m.group("n") else None)


def check_exists(spec: DatasetSpec) -> None:
    if not spec.path.exists():
        hint = " (hub dataset ids are not supported yet: pass a local file)" if "/" in str(spec.path) and not spec.path.suffix else ""
        raise UserError(f"--dataset {spec.text}: file not found{hint}")


def read_records(path: Path) -> list[tuple[str, object]]:
    """[(where, record)] from a .json array or a .jsonl file; `where` names the record for errors."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
        if not files:
            raise UserError(f"{path}: folder holds no .json or .jsonl files")
        return [r for f in files for r in read_records(f)]
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    if not text.strip():
        raise UserError(f"{path}: file is empty")
    if path.suffix == ".jsonl" or (path.suffix != ".json" and not text.lstrip().startswith("[")):
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append((f"{path}:{i}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno})") from None
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of records")
    return [(f"{path} record {i}", r) for i, r in enumerate(data)]


def _text(value, where: str, field: str, allow_empty: bool = True) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{field}' must be text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise UserError(f"{where}: field '{field}' is empty; every answer needs text to learn from")
    return value


def _history(history, where: str) -> list[dict]:
    if not history:
        return []
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
        raise UserError(f"{where}: 'history' must be a list of [question, answer] pairs")
    out = []
    for q, a in history:
        out += [{"role": "user", "content": _text(q, where, "history")},
                {"role": "assistant", "content": _text(a, where, "history", allow_empty=False)}]
    return out


def to_messages(record, where: str) -> list[dict]:
    """One record in any supported form -> a list of {role, content} messages."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record or "conversations" in record:
        key = "messages" if "messages" in record else "conversations"
        turns = record[key]
        if not isinstance(turns, list) or not turns:
            raise UserError(f"{where}: '{key}' must be a non-empty list")
        msgs = []
        for j, t in enumerate(turns):
            if not isinstance(t, dict):
                raise UserError(f"{where}: {key}[{j}] must be an object")
            role = t.get("role", t.get("from"))
            content = t.get("content", t.get("value"))
            if role not in ROLE_MAP:
                raise UserError(f"{where}: {key}[{j}] has role {role!r}; expected user/assistant/system (or human/gpt)")
            msg = {"role": ROLE_MAP[role], "content": _text(content, where, f"{key}[{j}].content")}
            if "loss" in t:
                msg["loss"] = bool(t["loss"])
            msgs.append(msg)
    elif "instruction" in record or "output" in record:
        missing = [k for k in ("instruction", "output") if k not in record]
        if missing:
            raise UserError(f"{where}: alpaca record without '{missing[0]}' (has: {', '.join(record)})")
        query = _text(record["instruction"], where, "instruction")
        extra = _text(record.get("input"), where, "input")
        query = f"{query}\n{extra}" if query and extra else (query or extra)
        msgs = _history(record.get("history"), where) + [
            {"role": "user", "content": query},
            {"role": "assistant", "content": _text(record["output"], where, "output", allow_empty=False)},
        ]
        if record.get("system"):
            msgs.insert(0, {"role": "system", "content": _text(record["system"], where, "system")})
    elif "query" in record or "response" in record:
        missing = [k for k in ("query", "response") if k not in record]
        if missing:
            raise UserError(f"{where}: record without '{missing[0]}' (has: {', '.join(record)})")
        msgs = _history(record.get("history"), where) + [
            {"role": "user", "content": _text(record["query"], where, "query")},
            {"role": "assistant", "content": _text(record["response"], where, "response", allow_empty=False)},
        ]
        if record.get("system"):
            msgs.insert(0, {"role": "system", "content": _text(record["system"], where, "system")})
    else:
        fields = ", ".join(record) or "none"
        raise UserError(f"{where}: unknown record form (fields: {fields}); expected messages, conversations, "
                        "instruction/output (alpaca) or query/response")
    if not any(m["role"] == "assistant" for m in msgs):
        raise UserError(f"{where}: no assistant answer to learn from")
    for j, m in enumerate(msgs):
        if m["role"] == "assistant" and not m["content"].strip():
            raise UserError(f"{where}: answer {j} is empty; every answer needs text to learn from")
    return msgs


def sample(records: list, n: int | None, rng: random.Random) -> list:
    """ms-swift's #N: fewer -> random sample without replacement; more -> whole set repeated plus a random rest."""
    if n is None or n == len(records):
        return list(records)
    if n < len(records):
        return rng.sample(records, n)
    reps, rest = divmod(n, len(records))
    return list(records) * reps + rng.sample(records, rest)


def fill_placeholders(msgs: list[dict], names: list[str], authors: list[str], where: str) -> list[dict]:
    """{{NAME}} / {{AUTHOR}} -> --model_name / --model_author (zh value for Chinese text, en otherwise)."""
    out = []
    for m in msgs:
        content = m["content"]
        if PLACEHOLDER.search(content):
            zh = bool(re.search(r"[\u4e00-\u9fff]", content))
            for key, values, flag in (("NAME", names, "--model_name"), ("AUTHOR", authors, "--model_author")):
                if "{{" + key + "}}" in content:
                    if not values:
                        raise UserError(f"{where}: the text holds {{{{{key}}}}} but {flag} is not set; pass {flag} VALUE (or a Chinese and an English value)")
                    value = values[0] if (zh or len(values) == 1) else values[1]
                    content = content.replace("{{" + key + "}}", value)
        out.append({**m, "content": content})
    return out


def load_datasets(specs: list[str], seed: int, names: list[str], authors: list[str]) -> tuple[list[dict], list[str]]:
    """All --dataset entries -> (records as {'messages', 'source'}, one report line per source)."""
    parsed = [parse_spec(s) for s in specs]
    for p in parsed:  # every file is checked before any is read, so a typo costs nothing
        check_exists(p)
    rng = random.Random(seed)
    records, report = [], []
    for p in parsed:
        raw = read_records(p.path)
        if not raw:
            raise UserError(f"{p.path}: holds no records")
        converted = [(where, fill_placeholders(to_messages(r, where), names, authors, where)) for where, r in raw]
        chosen = sample(converted, p.sample, rng)
        records += [{"messages": msgs, "source": where} for where, msgs in chosen]
        report.append(f"{p.text}: {len(raw)} records" + (f", sampled {len(chosen)}" if p.sample is not None else ""))
    return records, report


def split(records: list, ratio: float, seed: int) -> tuple[list, list]:
    if ratio <= 0:
        return records, []
    rng = random.Random(seed)
    idx = list(range(len(records)))
    rng.shuffle(idx)
    n_val = max(1, round(len(records) * ratio))
    if n_val >= len(records):
        raise UserError(f"--split_dataset_ratio {ratio} leaves no training data from {len(records)} records")
    val = set(idx[:n_val])
    return [r for i, r in enumerate(records) if i not in val], [records[i] for i in sorted(val)]
