"""Tokenized data, prepared once and cached on disk.

    prepare()      --dataset/--val_dataset -> TokenizedSet for training and validation
    TokenizedSet   a list of Encoded samples backed by compact numpy arrays (memory-mapped from the cache)

Records stream from the files into worker processes (one per core) and come back as int32 arrays, so a
large .jsonl is never held as text or as Python messages in memory. The cache key covers everything
that changes the tokens: file contents, sampling, seed, tokenizer files and chat template, --system,
--max_length, --truncation_strategy, --loss_scale, --columns, --model_name/--model_author, --replay_ratio.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import random
import shutil
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import replay
from .sources import Source, open_sources, split
from ..model.resolve import cache_root
from ..console import log
from .template import IGNORE, ChatTemplate, Encoded

VERSION = 1  # bump when the stored layout or the tokenization changes
OK, TRUNCATED, TOO_LONG, NO_LOSS = 0, 1, 2, 3  # per stored record
CHUNK = 256  # records per worker task
ARRAYS = ("ids", "trained", "offsets", "raw_len", "status", "train_rows", "val_rows")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


class TokenizedSet(Sequence):
    """Samples `rows` of the stored records; item i is an Encoded with plain lists (what fit() uses)."""

    def __init__(self, store: dict, rows: np.ndarray):
        self.store = store
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        r = self.rows[i]
        a, b = self.store["offsets"][r], self.store["offsets"][r + 1]
        ids = np.asarray(self.store["ids"][a:b])
        labels = np.where(self.store["trained"][a:b], ids, IGNORE)
        return Encoded(ids.tolist(), labels.tolist())


@dataclass
class Prepared:
    train: TokenizedSet
    val: TokenizedSet
    report: list[str]  # one line per source
    stats: dict  # too_long / truncated / dropped / no_loss over training samples
    store: dict
    train_all: np.ndarray  # every training sample after sampling, before dropping (for `data inspect`)
    sources: list[str]  # where each stored record came from (file:line)


def prepare(args, tok, model_path: Path, use_cache: bool = True) -> Prepared:
    """Training and validation samples for `args` (SftArguments or InspectArguments)."""
    columns = args.column_map
    train_src = open_sources(args.dataset, columns)
    val_src = open_sources(getattr(args, "val_dataset", []), columns)
    replay_src = replay.source(args, model_path)
    template = ChatTemplate(tok, args.system, getattr(args, "enable_thinking", None))
    key = cache_key(args, train_src + val_src + ([replay_src] if replay_src else []), tok, model_path)
    folder = cache_root() / "tokenized" / key
    if use_cache and (folder / "meta.json").exists():
        try:
            return _load(folder)
        except (OSError, ValueError, KeyError) as e:  # a damaged cache is rebuilt, never trusted
            log(f"tokenized cache {folder} is unreadable ({e}); tokenizing again")
    t0 = time.time()
    store, meta = _build(args, template, train_src, val_src, replay_src)
    log(f"tokenized {len(store['status'])} records in {time.time() - t0:.1f} s "
        f"({_workers(len(store['status']))} processes)")
    if use_cache:
        _save(folder, store, meta)
    return _assemble(store, meta)


def cache_key(args, sources: list[Source], tok, model_path: Path) -> str:
    h = hashlib.sha1()
    for name in TOKENIZER_FILES:
        p = Path(model_path) / name
        if p.exists():
            h.update(name.encode() + p.read_bytes())
    parts = {
        "version": VERSION, "tokenizer": type(tok).__name__, "chat_template": tok.chat_template,
        "sources": [(s.spec.text, s.fingerprint()) for s in sources],
        "n_train": len(args.dataset), "seed": args.seed, "split": getattr(args, "split_dataset_ratio", 0.0),
        "system": args.system, "thinking": getattr(args, "enable_thinking", None), "max_length": args.max_length, "truncation": args.truncation_strategy,
        "loss_scale": args.loss_scale, "columns": args.column_map,
        "names": args.model_name, "authors": args.model_author,
        "replay": float(getattr(args, "replay_ratio", 0.0)),  # `data inspect` has no such flag: sft's default, 0.0
    }
    h.update(json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode())
    return h.hexdigest()[:24]


# ---------------------------------------------------------------------------------------------
# Building: sample, stream records to the workers, keep compact arrays


def sampled(sources: list[Source], seed: int, names: list[str], authors: list[str]):
    """Each source with what sft takes from it: (source, the chosen record numbers of its seeded #N sampling,
    a stream of (number, where, chat messages) for them). The tests read datasets through this too."""
    rng = random.Random(seed)
    for src in sources:
        chosen = src.choose(rng)
        yield src, chosen, src.messages(set(chosen), names, authors)


def _build(args, template: ChatTemplate, train_src: list[Source], val_src: list[Source],
           replay_src: Source | None = None) -> tuple[dict, dict]:
    """Store every chosen record once; training/validation samples are row numbers into it."""
    pieces = {"ids": [], "trained": [], "raw_len": [], "status": []}
    where_of: list[str] = []
    report: list[str] = []

    def add(sources: list[Source], prefix: str) -> list[int]:
        rows: list[int] = []
        for src, chosen, records in sampled(sources, args.seed, args.model_name, args.model_author):
            first_row = len(where_of)
            index: dict[int, int] = {}
            stream = ((i, msgs) for i, where, msgs in _remember(records, where_of, index, first_row))
            for enc in _encode_stream(template, stream, args.max_length, args.truncation_strategy, args.loss_scale):
                for k, v in zip(("ids", "trained", "raw_len", "status"), enc):
                    pieces[k].append(v)
            rows += [index[i] for i in chosen if i in index]
            report.append(prefix + src.report(len(chosen)))
        return rows

    train_rows = add(train_src, "")
    val_rows = add(val_src, "validation ")
    ratio = getattr(args, "split_dataset_ratio", 0.0)
    if ratio > 0:
        train_rows, held_out = split(train_rows, ratio, args.seed)
        val_rows += held_out
        report.append(f"held out {len(held_out)} records for validation (--split_dataset_ratio {ratio})")
    if replay_src is not None:  # mixed in after the split: replayed answers are trained on, never held out
        replay_src.spec.sample = replay.count(args.replay_ratio, len(train_rows))
        train_rows += add([replay_src], "")
    lengths = np.array([len(x) for x in pieces["ids"]], dtype=np.int64)
    store = {
        "ids": np.concatenate(pieces["ids"]) if pieces["ids"] else np.zeros(0, np.int32),
        "trained": np.concatenate(pieces["trained"]) if pieces["trained"] else np.zeros(0, bool),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "raw_len": np.array(pieces["raw_len"], dtype=np.int32),
        "status": np.array(pieces["status"], dtype=np.int8),
        "train_rows": np.array(train_rows, dtype=np.int64),
        "val_rows": np.array(val_rows, dtype=np.int64),
    }
    return store, {"report": report, "where": where_of}


def _remember(items, where_of: list[str], index: dict, first_row: int):
    """Pass records through, noting each one's origin and its row in the store."""
    for i, where, msgs in items:
        index[i] = first_row + len(index)
        where_of.append(where)
        yield i, where, msgs


def encode_one(template: ChatTemplate, msgs: list[dict], max_length: int, strategy: str, loss_scale: str):
    """(ids int32, trained bool, raw length, status) of one conversation."""
    enc = template.encode(msgs, last_round_only=loss_scale == "last_round")
    ids = np.asarray(enc.input_ids, dtype=np.int32)
    trained = np.asarray(enc.labels, dtype=np.int64) != IGNORE
    raw_len, status = len(ids), OK
    if raw_len > max_length:
        if strategy == "delete":
            return ids[:0], trained[:0], raw_len, TOO_LONG
        sl = slice(0, max_length) if strategy == "right" else slice(-max_length, None)
        ids, trained, status = ids[sl], trained[sl], TRUNCATED
    if not trained.any():
        return ids[:0], trained[:0], raw_len, NO_LOSS
    return ids, trained, raw_len, status


_worker: dict = {}  # set in the parent before forking, so workers inherit the tokenizer


def _encode_chunk(chunk: list[list[dict]]):
    w = _worker
    return [encode_one(w["template"], m, w["max_length"], w["strategy"], w["loss_scale"]) for m in chunk]


def _workers(n_records: int) -> int:
    if n_records < 4 * CHUNK or "fork" not in multiprocessing.get_all_start_methods():
        return 1  # a pool costs more than it saves on small sets
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _chunks(stream, size: int):
    chunk = []
    for _, msgs in stream:
        chunk.append(msgs)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _encode_stream(template, stream, max_length: int, strategy: str, loss_scale: str):
    """Encoded records in input order, on all cores, with a bounded queue so memory holds a few
    chunks, never the whole file."""
    _worker.update(template=template, max_length=max_length, strategy=strategy, loss_scale=loss_scale)
    chunks = _chunks(stream, CHUNK)
    head = list(itertools.islice(chunks, 4))
    n_workers = _workers(sum(map(len, head)))
    if n_workers == 1:
        for c in itertools.chain(head, chunks):
            yield from _encode_chunk(c)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker; quiets the fork warning
    with multiprocessing.get_context("fork").Pool(n_workers) as pool:
        pending = deque()
        for c in itertools.chain(head, chunks):
            pending.append(pool.apply_async(_encode_chunk, (c,)))
            if len(pending) >= 2 * n_workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


# ---------------------------------------------------------------------------------------------
# The cache folder


def _save(folder: Path, store: dict, meta: dict) -> None:
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ARRAYS:
        np.save(tmp / f"{name}.npy", store[name])
    (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")  # written last
    shutil.rmtree(folder, ignore_errors=True)
    try:
        tmp.rename(folder)
    except OSError:  # another run cached the same data first
        shutil.rmtree(tmp, ignore_errors=True)


def _load(folder: Path) -> Prepared:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    store = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
    prepared = _assemble(store, meta)
    log(f"tokenized data from cache {folder} ({len(store['status'])} records): skipped reading and tokenizing")
    return prepared


def _assemble(store: dict, meta: dict) -> Prepared:
    status = np.asarray(store["status"])
    train_all, val_all = np.asarray(store["train_rows"]), np.asarray(store["val_rows"])
    usable = lambda rows: rows[status[rows] <= TRUNCATED]  # noqa: E731
    s = status[train_all]
    stats = {"too_long": int(((s == TOO_LONG) | (s == TRUNCATED)).sum()), "truncated": int((s == TRUNCATED).sum()),
             "dropped": int((s == TOO_LONG).sum()), "no_loss": int((s == NO_LOSS).sum())}
    return Prepared(TokenizedSet(store, usable(train_all)), TokenizedSet(store, usable(val_all)), meta["report"],
                    stats, store, train_all, meta["where"])

