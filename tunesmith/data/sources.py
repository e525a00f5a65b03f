"""Data: find each --dataset, read its records one by one, turn them into chat messages, sample, fill placeholders.

Every record becomes a list of {"role", "content"} messages. Recognised forms, detected per file:
  messages  {"messages": [{"role": "user", "content": ...}, ...]}
  sharegpt  {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}
  alpaca    {"instruction", "input", "output", optional "system", "history"}
  query     {"query", "response", optional "system", "history"}
Sources: .json (array), .jsonl, .csv, .parquet, folders of them, a `datasets.save_to_disk` folder, the
built-in `self-cognition`, and hub ids through the `datasets` library (ModelScope's client when installed).
Files are read as streams, so a huge .jsonl is never held in memory as text.
Errors name the file and the record (line for .jsonl and .json lines, row for .csv/.parquet).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import os
import random
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from ..console import log

SPEC = re.compile(r"^(?:(?P<hub>hf|ms)::)?(?P<name>.+?)(?:#(?P<n>-?\d+))?$", re.IGNORECASE)
PLACEHOLDER = re.compile(r"\{\{(NAME|AUTHOR)\}\}")
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
            "model": "assistant", "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}
SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
BUILTIN_DIR = Path(__file__).parent  # the built-in sets sit beside this module
# Our own bilingual self-cognition set stands in for ms-swift's registered one, under its ids too.
BUILTIN = {"self-cognition": "self_cognition.jsonl", "swift/self-cognition": "self_cognition.jsonl",
           "modelscope/self-cognition": "self_cognition.jsonl"}
LANGUAGES = ("zh", "en")  # its subsets: the records of one language ("tag"), e.g. self-cognition:en#8
# ModelScope ids with a known Hugging Face copy (ms-swift registers the same pairs): used when the
# ModelScope client is not installed.
MS_TO_HF = {"AI-ModelScope/alpaca-gpt4-data-zh": "llm-wizard/alpaca-gpt4-data-zh",
            "AI-ModelScope/alpaca-gpt4-data-en": "vicgalle/alpaca-gpt4"}
JSON_COLUMNS = ("messages", "conversations", "history")  # csv cells holding JSON lists


# ---------------------------------------------------------------------------------------------
# --dataset syntax: [hf::|ms::]id_or_path[:subset][#N]


@dataclass
class DatasetSpec:
    text: str
    name: str
    hub: str | None = None  # "hf", "ms" or None (local path, built-in, or an id for the default hub)
    subset: str | None = None
    sample: int | None = None


def parse_spec(text: str) -> DatasetSpec:
    m = SPEC.match(text.strip())
    if not m or not m.group("name").strip():
        raise UserError(f"--dataset '{text}': expected [hf::|ms::]ID_OR_PATH[:SUBSET][#N]")
    n = int(m.group("n")) if m.group("n") else None
    if n is not None and n <= 0:
        raise UserError(f"--dataset {text}: #N must be a positive number of records")
    name, subset = m.group("name"), None
    # A local path may hold ':' itself; only split off a subset when the whole name is not a path.
    if ":" in name and not Path(name).expanduser().exists():
        name, subset = name.rsplit(":", 1)
        subset = subset or None
    hub = m.group("hub").lower() if m.group("hub") else None
    return DatasetSpec(text, name, hub, subset, n)


# ---------------------------------------------------------------------------------------------
# Reading files as streams of (where, record)


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text (byte {e.start} of the record); save the file as UTF-8") from None


def _iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines with their 1-based numbers, read as bytes one at a time."""
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            if i == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8):]
            if line.strip():
                yield i, line


def _jsonl(path: Path) -> Iterator[tuple[str, object]]:
    for i, line in _iter_lines(path):
        where = f"{path}:{i}"
        try:
            yield where, json.loads(_decode(line, where))
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None


def _json(path: Path) -> list[tuple[str, object]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    if not text.strip():
        raise UserError(f"{path}: file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return list(_jsonl(path))  # a .json file that really holds one record per line
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    return [(f"{path} record {i}", r) for i, r in enumerate(data, 1)]


class _NotUtf8(Exception):
    def __init__(self, line: int):
        self.line = line


def _text_lines(path: Path) -> Iterator[str]:
    """A file's lines decoded one at a time, so a bad byte is found on its own line."""
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            if i == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8):]
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError:
                raise _NotUtf8(i) from None


def _csv(path: Path) -> Iterator[tuple[str, object]]:
    reader = csv.DictReader(_text_lines(path))
    row = 0
    try:
        for rec in reader:
            row += 1
            where = f"{path} row {row} (line {reader.line_num})"
            if None in rec or None in rec.values():
                raise UserError(f"{where}: has {'more' if None in rec else 'fewer'} cells than the header "
                                f"({', '.join(reader.fieldnames)})")
            for key in JSON_COLUMNS:  # list-valued columns are stored as JSON text in a cell
                if rec.get(key, "").lstrip().startswith("["):
                    try:
                        rec[key] = json.loads(rec[key])
                    except json.JSONDecodeError as e:
                        raise UserError(f"{where}: column '{key}' holds malformed JSON ({e.msg})") from None
            yield where, rec
    except _NotUtf8 as e:
        raise UserError(f"{path} row {row + 1} (line {e.line}): not UTF-8 text; save the file as UTF-8") from None
    except csv.Error as e:
        raise UserError(f"{path} row {row + 1} (line {reader.line_num}): malformed CSV ({e})") from None


def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path}: not a readable parquet file ({str(e).splitlines()[0][:120]})") from None


def _parquet(path: Path) -> Iterator[tuple[str, object]]:
    row = 0
    for batch in _parquet_file(path).iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            row += 1
            yield f"{path} row {row}", rec


def read_file(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) for every record of one file; `where` names it for errors."""
    try:
        if path.stat().st_size == 0:
            raise UserError(f"{path}: file is empty")
        if path.suffix == ".parquet":
            yield from _parquet(path)
        elif path.suffix == ".csv":
            yield from _csv(path)
        elif path.suffix == ".json":
            yield from _json(path)
        else:
            yield from _jsonl(path)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


def count_file(path: Path) -> int:
    """Records in a file, cheaply where the format allows it (line count, parquet metadata)."""
    if path.suffix == ".parquet":
        return _parquet_file(path).metadata.num_rows
    if path.suffix == ".jsonl":
        try:
            return sum(1 for _ in _iter_lines(path))
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    return sum(1 for _ in read_file(path))


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha1()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# A source: one --dataset entry, as a list of files or a `datasets.Dataset`


@dataclass
class Source:
    spec: DatasetSpec
    files: list[Path] = field(default_factory=list)
    dataset: object = None  # a datasets.Dataset for hub ids and save_to_disk folders
    columns: dict = field(default_factory=dict)
    forms: dict = field(default_factory=dict)  # file label -> detected form
    skipped: list = field(default_factory=list)  # (where, why) of hub records left out
    tag: str | None = None  # the built-in set's language subset: only records with this "tag"
    _count: int | None = None

    @property
    def strict(self) -> bool:
        """Local files are the user's to fix: any bad record is an error. Hub data is not: bad
        records are left out and reported."""
        return self.dataset is None

    def fingerprint(self) -> str:
        if self.dataset is not None:
            return getattr(self.dataset, "_fingerprint", None) or self.spec.name
        return _hash_files(self.files)

    def count(self) -> int:
        if self._count is None:
            if self.dataset is not None:
                self._count = len(self.dataset)
            elif self.tag:
                self._count = sum(1 for _, rows in self._groups() for _ in rows)
            else:
                counts = [count_file(p) for p in self.files]
                empty = [p for p, n in zip(self.files, counts) if n == 0]
                if empty:
                    raise UserError(f"{empty[0]}: file is empty")
                self._count = sum(counts)
            if self._count == 0:
                raise UserError(f"--dataset {self.spec.text}: holds no records")
        return self._count

    def choose(self, rng: random.Random) -> list[int]:
        """Record indices after #N sampling, in training order (may repeat)."""
        return sample(list(range(self.count())), self.spec.sample, rng)

    def _groups(self) -> Iterator[tuple[str, Iterator]]:
        if self.dataset is not None:
            yield self.spec.name, ((f"{self.spec.name} row {i}", r) for i, r in enumerate(self.dataset, 1))
            return
        for p in self.files:
            rows = read_file(p)
            if self.tag:
                rows = ((where, r) for where, r in rows if isinstance(r, dict) and r.get("tag") == self.tag)
            yield str(p), rows

    def records(self) -> Iterator[tuple[str, str, object]]:
        """(file label, where, record) of every record, fields renamed by --columns (data/preference.py reads
        its own forms from these)."""
        for label, rows in self._groups():
            for where, record in rows:
                yield label, where, remap(record, self.columns, where)

    def messages(self, wanted: set[int], names: list[str], authors: list[str]) -> Iterator[tuple[int, str, list[dict]]]:
        """(index, where, messages) of the wanted records. Every record is checked, wanted or not,
        so a file's errors do not depend on the seed."""
        i = -1
        for label, rows in self._groups():
            form = first = None
            for where, record in rows:
                i += 1
                try:
                    record = remap(record, self.columns, where)
                    f = detect_form(record, where)
                    if form is None:
                        form, first = f, where
                    elif f != form:
                        raise UserError(f"{where}: a {f} record in a file of {form} records (first one: {first}); "
                                        "keep one form per file")
                    msgs = fill_placeholders(to_messages(record, where, f), names, authors, where)
                except UserError as e:
                    if self.strict or "--model_name" in str(e) or "--model_author" in str(e):
                        raise
                    self.skipped.append((where, str(e)))
                    continue
                if i in wanted:
                    yield i, where, msgs
            self.forms[label] = form or "no usable records"
        if self._count is not None and i + 1 != self._count:  # the file changed while we read it
            raise UserError(f"--dataset {self.spec.text}: found {i + 1} records, expected {self._count}; "
                            "was the file modified during loading?")

    def report(self, n_chosen: int) -> str:
        forms = sorted(set(self.forms.values()))
        line = f"{self.spec.text}: {self.count()} records ({', '.join(forms) or '?'})"
        if self.spec.sample is not None:
            line += f", sampled {n_chosen}"
        if self.skipped:
            where, why = self.skipped[0]
            line += f"; left out {len(self.skipped)} unusable records (e.g. {why})"
        return line


def open_source(spec: DatasetSpec, columns: dict) -> Source:
    """Find where a --dataset entry lives: a local file/folder, the built-in set, or a hub."""
    path = Path(spec.name).expanduser()
    if spec.hub is None and path.exists():
        if path.is_dir():
            if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
                return Source(spec, dataset=_load_from_disk(path, spec), columns=columns)
            files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not files:
                raise UserError(f"--dataset {spec.text}: folder holds no {'/'.join(SUFFIXES)} files")
            return Source(spec, files=files, columns=columns)
        if path.suffix not in SUFFIXES:
            raise UserError(f"--dataset {spec.text}: unknown file type '{path.suffix}'; use {', '.join(SUFFIXES)}")
        return Source(spec, files=[path], columns=columns)
    if spec.name in BUILTIN:
        if spec.subset not in (None, "default", *LANGUAGES):
            raise UserError(f"--dataset {spec.text}: the built-in set has the subsets {' and '.join(LANGUAGES)} "
                            f"(its Chinese or English records only), e.g. {spec.name}:en#8")
        tag = spec.subset if spec.subset in LANGUAGES else None
        return Source(spec, files=[BUILTIN_DIR / BUILTIN[spec.name]], columns=columns, tag=tag)
    if spec.hub is None and (path.suffix in SUFFIXES or spec.name.startswith((".", "/", "~")) or spec.name.count("/") != 1):
        raise UserError(f"--dataset {spec.text}: file not found")
    return Source(spec, dataset=load_hub(spec), columns=columns)


def _load_from_disk(path: Path, spec: DatasetSpec):
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = _pick_split(ds, spec)
    return ds


def _pick_split(dd, spec: DatasetSpec):
    if "train" in dd:
        return dd["train"]
    if len(dd) == 1:
        return next(iter(dd.values()))
    raise UserError(f"--dataset {spec.text}: has splits {', '.join(dd)} but no 'train'")


def _reachable(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def load_hub(spec: DatasetSpec):
    """A hub dataset through `datasets` (or ModelScope's client for ms:: / plain ids when installed).
    With no hub in reach, only the local `datasets` cache is tried, and the error says what to do."""
    name, hub = spec.name, spec.hub
    if hub != "hf":
        try:
            from modelscope import MsDataset  # only when the user has it
        except ImportError:
            MsDataset = None
        if MsDataset is not None and _reachable("www.modelscope.cn"):
            try:
                ds = MsDataset.load(name, subset_name=spec.subset or "default", split="train")
                return ds.to_hf_dataset() if hasattr(ds, "to_hf_dataset") else ds
            except Exception as e:
                raise UserError(f"--dataset {spec.text}: ModelScope could not load it ({str(e).splitlines()[0][:150]})") from None
        if name in MS_TO_HF:
            log(f"{name}: loading its Hugging Face copy {MS_TO_HF[name]} (install `modelscope` to use ModelScope)")
            name = MS_TO_HF[name]
    online = os.environ.get("HF_DATASETS_OFFLINE", "0") in ("0", "") and _reachable("huggingface.co")
    if not online:  # skip the library's slow retries; its cache still answers
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets

        datasets.config.HF_DATASETS_OFFLINE = datasets.config.HF_HUB_OFFLINE = not online or datasets.config.HF_HUB_OFFLINE
        dd = datasets.load_dataset(name, spec.subset)
    except ImportError:
        raise UserError(f"--dataset {spec.text}: hub datasets need the `datasets` package (pip install datasets)") from None
    except Exception as e:
        why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        if not online:
            raise UserError(
                f"--dataset {spec.text}: no dataset hub is reachable (or HF_DATASETS_OFFLINE is on) and '{name}' is not in the local "
                f"`datasets` cache ({why}). On a machine with internet run "
                f"`python -c \"import datasets; datasets.load_dataset('{name}').save_to_disk('{name.split('/')[-1]}')\"`, "
                f"copy that folder here and pass --dataset {name.split('/')[-1]}{'#' + str(spec.sample) if spec.sample else ''} "
                "(a downloaded .json/.jsonl/.csv/.parquet file works too)") from None
        raise UserError(f"--dataset {spec.text}: cannot load '{name}' from the Hugging Face hub ({why})") from None
    return _pick_split(dd, spec) if isinstance(dd, dict) else dd


# ---------------------------------------------------------------------------------------------
# Records -> messages


def remap(record, columns: dict, where: str):
    if not columns or not isinstance(record, dict):
        return record
    out = {}
    for k, v in record.items():
        new = columns.get(k, k)
        if new in out and new != k:
            raise UserError(f"{where}: --columns maps '{k}' to '{new}', which the record already has")
        out[new] = v
    return out


def detect_form(record, where: str) -> str:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for form, keys in (("messages", ("messages",)), ("sharegpt", ("conversations",)),
                       ("alpaca", ("instruction", "output")), ("query/response", ("query", "response"))):
        if any(k in record for k in keys):
            return form
    fields = ", ".join(json.dumps(k, ensure_ascii=False)[1:-1] for k in record) or "none"  # (a "\n" in a name stays on one line)
    raise UserError(f"{where}: unknown record form (fields: {fields}); expected messages, conversations, "
                    """instruction/output (alpaca) or query/response; rename fields with --columns '{"prompt": "query", ...}'""")


def _text(value, where: str, field: str, allow_empty: bool = True) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{field}' must be text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise UserError(f"{where}: field '{field}' is empty; every answer needs text to learn from")
    return value


def _history(history, where: str) -> list[dict]:
    if history is None or (isinstance(history, (list, str)) and not history):
        return []
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
        raise UserError(f"{where}: 'history' must be a list of [question, answer] pairs")
    out = []
    for q, a in history:
        out += [{"role": "user", "content": _text(q, where, "history")},
                {"role": "assistant", "content": _text(a, where, "history", allow_empty=False)}]
    return out


def _turns(record: dict, key: str, where: str) -> list[dict]:
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: '{key}' must be a non-empty list")
    msgs = []
    for j, t in enumerate(turns):
        if not isinstance(t, dict):
            raise UserError(f"{where}: {key}[{j}] must be an object")
        role = t.get("role", t.get("from"))
        content = t.get("content", t.get("value"))
        if not isinstance(role, str) or role not in ROLE_MAP:
            raise UserError(f"{where}: {key}[{j}] has role {role!r}; expected user/assistant/system (or human/gpt)")
        msg = {"role": ROLE_MAP[role], "content": _text(content, where, f"{key}[{j}].content")}
        if t.get("loss") is not None:
            if not isinstance(t["loss"], bool):
                raise UserError(f"{where}: {key}[{j}].loss must be true or false, got {t['loss']!r}")
            msg["loss"] = t["loss"]
        msgs.append(msg)
    return msgs


def to_messages(record, where: str, form: str | None = None) -> list[dict]:
    """One record in any supported form -> a list of {role, content} messages."""
    form = form or detect_form(record, where)
    if form in ("messages", "sharegpt"):
        msgs = _turns(record, "messages" if form == "messages" else "conversations", where)
    else:
        q, a = ("instruction", "output") if form == "alpaca" else ("query", "response")
        missing = [k for k in (q, a) if k not in record]
        if missing:
            raise UserError(f"{where}: {form} record without '{missing[0]}' (has: {', '.join(map(str, record))})")
        query = _text(record[q], where, q)
        if form == "alpaca":  # ms-swift joins instruction and input with a newline
            extra = _text(record.get("input"), where, "input")
            query = f"{query}\n{extra}" if query and extra else (query or extra)
        msgs = _history(record.get("history"), where) + [
            {"role": "user", "content": query},
            {"role": "assistant", "content": _text(record[a], where, a, allow_empty=False)},
        ]
        if record.get("system"):
            msgs.insert(0, {"role": "system", "content": _text(record["system"], where, "system")})
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


def check_local(specs: list[str]) -> list[DatasetSpec]:
    """Every local path exists: checked before anything is read or loaded, so a typo costs nothing."""
    parsed = [parse_spec(s) for s in specs]
    for p in parsed:
        path = Path(p.name).expanduser()
        if p.hub is None and not path.exists() and p.name not in BUILTIN and (path.suffix in SUFFIXES or p.name.startswith((".", "/", "~"))):
            raise UserError(f"--dataset {p.text}: file not found")
    return parsed


def open_sources(specs: list[str], columns: dict) -> list[Source]:
    return [open_source(p, columns) for p in check_local(specs)]


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
