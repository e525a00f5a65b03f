"""`tunesmith eval`: the guide's before/after table (section 4.2) for a tuned adapter.

    tunesmith eval --adapters CKPT                                   built-in identity + general questions
    tunesmith eval --adapters CKPT --expect 迪菲赫尔曼 --questions my.txt  + share of answers with the keyword

The base is loaded once; each question is answered with the adapter switched off (PEFT disable_adapter)
and on, with the same system prompt, greedy. The table goes to the terminal, eval.md and eval.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..args import EvalArguments
from ..train.checkpoint import writable_dir
from ..errors import UserError
from ..files import write_atomic
from .infer import load_chat
from ..console import log

# Identity questions, in and beyond the guide's 8 records, in Chinese and English; then general knowledge,
# each with the keyword a right answer contains, so forgetting shows.
BUILTIN = [
    {"query": "你是谁?"},
    {"query": "谁在维护你?"},
    {"query": "你的开发者是谁?"},
    {"query": "请介绍一下你自己"},
    {"query": "你是哪家公司开发的?"},
    {"query": "Who are you?"},
    {"query": "Who developed you?"},
    {"query": "中国的首都是哪里?", "expect": ["北京"]},
    {"query": "一年有几个月?", "expect": ["12", "十二"]},
    {"query": "What is the capital of France?", "expect": ["Paris"]},
    {"query": "水的化学式是什么?", "expect": ["H2O", "H₂O"]},
    {"query": "一周有几天?", "expect": ["7", "七"]},
    {"query": "What is the largest planet in the solar system?", "expect": ["Jupiter"]},
    {"query": "What is 12 times 12?", "expect": ["144"]},
]


def run(args: EvalArguments) -> int:
    questions = load_questions(args.questions)
    chat = load_chat(args)
    out_dir = _out_dir(args)
    rows = []
    for i, q in enumerate(questions, 1):
        messages = [{"role": "user", "content": q["query"]}]
        with chat.model.disable_adapter():
            base = chat.answer(messages)
        tuned = chat.answer(messages)
        keywords, group = (q["expect"], "knowledge") if q.get("expect") else (args.expect, "expect")
        row = {"question": q["query"], "base": base, "tuned": tuned}
        if keywords:
            row.update(expect=keywords, group=group, base_hit=_hit(base, keywords), tuned_hit=_hit(tuned, keywords))
        rows.append(row)
        log(f"{i}/{len(questions)} {q['query']}")
    summary = _summary(rows)
    report = {"adapter": str(Path(args.adapters[0]).resolve()), "base_model": chat.model_name, "system": chat.template.system,
              "max_new_tokens": args.max_new_tokens, "rows": rows, "summary": summary}
    markdown = to_markdown(rows, summary)
    print(markdown, flush=True)
    write_atomic(out_dir / "eval.md", markdown)
    write_atomic(out_dir / "eval.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    log(f"written {out_dir / 'eval.md'} and {out_dir / 'eval.json'}")
    return 0


def load_questions(path: str | None) -> list[dict]:
    """A .txt (one question a line), or .json/.jsonl of strings or {"query": ..., "expect": [...]} objects."""
    if path is None:
        return BUILTIN
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--questions {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".json":
            items = json.loads(text)
        elif p.suffix == ".jsonl":
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            items = [line.strip() for line in text.splitlines() if line.strip()]
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"--questions {path}: cannot read it ({str(e).splitlines()[0]})") from None
    out = []
    for n, item in enumerate(items if isinstance(items, list) else [None], 1):
        if isinstance(item, str):
            item = {"query": item}
        q = item.get("query") or item.get("question") if isinstance(item, dict) else None
        expect = item.get("expect", []) if isinstance(item, dict) else []
        if not isinstance(q, str) or not q.strip() or not isinstance(expect, (list, str)):
            raise UserError(f"--questions {path}: item {n} is not a question (a string, or an object with "
                            "\"query\" and an optional \"expect\" list)")
        out.append({"query": q.strip(), "expect": [expect] if isinstance(expect, str) else expect})
    if not out:
        raise UserError(f"--questions {path}: no questions in it")
    return out


def _hit(answer: str, keywords: list[str]) -> bool:
    return any(k.lower() in answer.lower() for k in keywords)


def _summary(rows: list[dict]) -> dict:
    """Per group — "expect": questions scored by --expect; "knowledge": questions with their own keywords —
    how many base and tuned answers contain the keywords. For knowledge also the retention: how many of the
    answers the base got right the tuned model still gets right, and how much the tuned answers agree with
    the base's (character overlap, 0-1), so that forgetting shows as a figure."""
    import difflib

    out = {}
    for group in ("expect", "knowledge"):
        scored = [r for r in rows if r.get("group") == group]
        if scored:
            out[group] = {"scored": len(scored), "base_hits": sum(r["base_hit"] for r in scored),
                          "tuned_hits": sum(r["tuned_hit"] for r in scored)}
    knowledge = [r for r in rows if r.get("group") == "knowledge"]
    if knowledge:
        out["retention"] = {
            "base_right": sum(r["base_hit"] for r in knowledge),
            "kept": sum(r["base_hit"] and r["tuned_hit"] for r in knowledge),
            "agreement": round(sum(difflib.SequenceMatcher(None, r["base"], r["tuned"]).ratio() for r in knowledge)
                               / len(knowledge), 3),
        }
    return out


def to_markdown(rows: list[dict], summary: dict) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ") or "(empty)"

    scored = bool(summary)
    lines = ["| 用户提问 / question | 原始模型回答 / base | 微调后模型回答 / tuned |" + (" expected |" if scored else ""),
             "|---|---|---|" + ("---|" if scored else "")]
    for r in rows:
        base, tuned = cell(r["base"]), cell(r["tuned"])
        if "expect" in r:
            base += " ✅" if r["base_hit"] else " ❌"
            tuned += " ✅" if r["tuned_hit"] else " ❌"
        line = f"| {cell(r['question'])} | {base} | {tuned} |"
        if scored:
            line += f" {' / '.join(r.get('expect', []))} |"
        lines.append(line)
    titles = {"expect": "answers containing --expect keywords", "knowledge": "general knowledge kept"}
    for group, s in summary.items():
        if group == "retention":
            lines.append(f"retention: the tuned model still answers {s['kept']} of the {s['base_right']} general questions "
                         f"the base got right; its general answers agree with the base's {s['agreement']:.0%} "
                         "(character overlap)")
            continue
        n = s["scored"]
        lines.append(f"\n{titles[group]}: base {s['base_hits']}/{n} ({s['base_hits'] / n:.0%}), "
                     f"tuned {s['tuned_hits']}/{n} ({s['tuned_hits'] / n:.0%})")
    return "\n".join(lines) + "\n"


def _out_dir(args: EvalArguments) -> Path:
    ckpt = Path(args.adapters[0])
    return writable_dir(Path(args.output_dir) if args.output_dir else ckpt.parent / f"{ckpt.name}-eval")
