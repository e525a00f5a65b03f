"""Preference data for `tunesmith rlhf`: records with a chosen and a rejected answer (DPO, ORPO, SimPO), or
single answers marked desirable or not (KTO), tokenized with the model's chat template as `sft` renders them.

Recognised forms, detected per record:
  ms-swift   any `sft` form (messages, conversations, alpaca, query/response) whose last answer is the chosen
             one, plus "rejected_response"; or plus a boolean "label" (KTO)
  TRL        "prompt", "chosen", "rejected" (plain text, or lists of messages); "prompt", "completion", "label" (KTO)
  sharegpt   "conversations" plus "chosen" and "rejected" turns ({"from": "gpt", "value": ...})
  built-in   self-cognition-dpo: the identity set, chosen the --model_name/--model_author answer, rejected the
             base model's own (generated once, data/replay.py)
For KTO a paired record gives two answers: the chosen one desirable, the rejected one not (as TRL unpairs them).
Errors name the file and the record, as for `sft`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import UserError
from . import replay
from .sources import ROLE_MAP, check_local, detect_form, fill_placeholders, open_source, sample, split, to_messages
from .template import IGNORE, ChatTemplate, Encoded


@dataclass
class Answer:
    """One answer to a prompt, as tokens: the prompt's (up to where the answer begins) and the answer's
    (up to and including its end-of-turn token; nothing after it carries loss)."""

    prompt: list[int]
    answer: list[int]

    def encoded(self, answer: list[int] | None = None) -> Encoded:
        """The sequence prompt + answer, loss on the answer (another record's answer for KTO's KL term)."""
        answer = self.answer if answer is None else answer
        return Encoded(self.prompt + answer, [IGNORE] * len(self.prompt) + list(answer))

    def whole(self) -> Encoded:
        """The sequence with loss on every token, the prompt's too (ORPO's NLL term, as TRL computes it)."""
        return Encoded(self.prompt + self.answer, self.prompt + self.answer)


@dataclass
class Pair:
    """A prompt with a chosen and a rejected answer (DPO, ORPO, SimPO)."""

    chosen: Answer
    rejected: Answer

    def length(self) -> int:
        return len(self.chosen.prompt) + len(self.chosen.answer) + len(self.rejected.prompt) + len(self.rejected.answer)


@dataclass
class Single:
    """A prompt with one answer, desirable or not (KTO)."""

    answer: Answer
    label: bool
    index: int = 0  # its place in the training data (KTO's KL term pairs answers in data order)

    def length(self) -> int:
        return len(self.answer.prompt) + len(self.answer.answer)


@dataclass
class PreferenceSet:
    train: list
    val: list
    report: list[str]
    stats: dict


def _answer_text(value, where: str, field: str) -> str:
    """An answer given as text, as one assistant message, or as a list holding one assistant message."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        role = value.get("role", value.get("from"))
        if ROLE_MAP.get(role) != "assistant":
            raise UserError(f"{where}: field '{field}' must be the assistant's answer, got role {role!r}")
        value = value.get("content", value.get("value"))
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{field}' must be the answer's text (or one assistant message), "
                        f"got {type(value).__name__}")
    if not value.strip():
        raise UserError(f"{where}: field '{field}' is empty; every answer needs text to learn from")
    return value


def _prompt(value, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        msgs = to_messages({"messages": value + [{"role": "assistant", "content": "-"}]}, where, "messages")[:-1]
        if msgs[-1]["role"] == "assistant":
            raise UserError(f"{where}: field 'prompt' must end with a user turn, not an answer")
        return msgs
    raise UserError(f"{where}: field 'prompt' must be text or a non-empty list of messages")


def _label(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{where}: field 'label' must be true or false, got {value!r}")
    return value


def parse_record(record, where: str) -> tuple[str, list[dict], list[tuple[str, bool]]]:
    """(form, prompt messages, [(answer, desirable)]): a pair is [(chosen, True), (rejected, False)]."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "prompt" in record and ("chosen" in record or "completion" in record):  # TRL
        prompt = _prompt(record["prompt"], where)
        if "completion" in record:
            if "label" not in record:
                raise UserError(f"{where}: a prompt/completion record needs a boolean 'label' (KTO)")
            return "prompt/completion/label", prompt, [(_answer_text(record["completion"], where, "completion"),
                                                        _label(record["label"], where))]
        if "rejected" not in record:
            raise UserError(f"{where}: a prompt/chosen record needs a 'rejected' answer too")
        return "prompt/chosen/rejected", prompt, [(_answer_text(record["chosen"], where, "chosen"), True),
                                                  (_answer_text(record["rejected"], where, "rejected"), False)]
    if "conversations" in record and "chosen" in record:  # sharegpt with chosen/rejected turns
        if "rejected" not in record:
            raise UserError(f"{where}: a conversations/chosen record needs a 'rejected' answer too")
        prompt = _prompt(record["conversations"], where)
        return "sharegpt+chosen/rejected", prompt, [(_answer_text(record["chosen"], where, "chosen"), True),
                                                    (_answer_text(record["rejected"], where, "rejected"), False)]
    extra = [k for k in ("rejected_response", "label") if k in record]
    if not extra:
        fields = ", ".join(map(str, record)) or "none"
        raise UserError(f"{where}: not a preference record (fields: {fields}); expected messages + rejected_response "
                        "(ms-swift), prompt/chosen/rejected (TRL), or for KTO prompt/completion/label or messages + label")
    form = detect_form({k: v for k, v in record.items() if k not in extra}, where)
    msgs = to_messages(record, where, form)
    if msgs[-1]["role"] != "assistant":
        raise UserError(f"{where}: the conversation must end with the (chosen) answer")
    prompt, answer = msgs[:-1], msgs[-1]["content"]
    if "rejected_response" in record:
        return f"{form}+rejected_response", prompt, [(answer, True),
                                                     (_answer_text(record["rejected_response"], where, "rejected_response"), False)]
    return f"{form}+label", prompt, [(answer, _label(record["label"], where))]


def tokenize(template: ChatTemplate, prompt: list[dict], answer: str, where: str) -> Answer:
    """The prompt and answer tokens as `sft` renders the conversation (loss on the last answer)."""
    enc = template.encode(prompt + [{"role": "assistant", "content": answer}], last_round_only=True)
    trained = [i for i, x in enumerate(enc.labels) if x != IGNORE]
    if not trained:
        raise UserError(f"{where}: the answer has no tokens to learn from")
    a, b = trained[0], trained[-1] + 1
    return Answer(enc.input_ids[:a], enc.input_ids[a:b])


def prepare(args, tok) -> PreferenceSet:
    """Training (and validation) items for `args` (RlhfArguments): Pairs for dpo/orpo/simpo, Singles for kto."""
    from ..console import log

    template = ChatTemplate(tok, args.system, getattr(args, "enable_thinking", None))
    rng = random.Random(args.seed)
    stats = {"too_long": 0, "truncated": 0, "dropped": 0, "no_loss": 0}

    def read(specs: list[str], prefix: str) -> tuple[list, list[str]]:
        items, report = [], []
        for src in _sources(args, specs):
            records, forms = [], set()
            for _, where, record in src.records():
                form, prompt, answers = parse_record(record, where)
                forms.add(form)
                records.append((where, prompt, answers))
            if not records:
                raise UserError(f"--dataset {src.spec.text}: holds no records")
            chosen = sample(list(range(len(records))), src.spec.sample, rng)  # #N as for sft
            for i in chosen:
                where, prompt, answers = records[i]
                items += _items(template, args, where, prompt, answers, stats)
            line = f"{prefix}{src.spec.text}: {len(records)} records ({', '.join(sorted(forms))})"
            report.append(line + (f", sampled {len(chosen)}" if src.spec.sample is not None else ""))
        return items, report

    train, report = read(args.dataset, "")
    val, val_report = read(args.val_dataset, "validation ")
    report += val_report
    if args.split_dataset_ratio > 0:
        train, held_out = split(train, args.split_dataset_ratio, args.seed)
        val += held_out
        report.append(f"held out {len(held_out)} records for validation (--split_dataset_ratio {args.split_dataset_ratio})")
    for i, item in enumerate(train):
        item.index = i
    kind = "answers (desirable or not)" if args.rlhf_type == "kto" else "pairs (chosen, rejected)"
    log(f"{len(train)} preference {kind} for training, {len(val)} for validation")
    return PreferenceSet(train, val, report, stats)


def _sources(args, specs: list[str]) -> list:
    """--dataset entries as sources; the built-in identity pairs are the base model's cached answers (replay.py)."""
    return [replay.identity_source(args, spec) if spec.name == replay.IDENTITY_SET else open_source(spec, args.column_map)
            for spec in check_local(specs)]


def _items(template: ChatTemplate, args, where: str, prompt: list[dict], answers: list[tuple[str, bool]], stats: dict) -> list:
    names, authors = args.model_name, args.model_author
    prompt = fill_placeholders(prompt, names, authors, where)
    texts = [fill_placeholders([{"role": "assistant", "content": a}], names, authors, where)[0]["content"]
             for a, _ in answers]
    tokens = [tokenize(template, prompt, t, where) for t in texts]
    if max(len(t.prompt) + len(t.answer) for t in tokens) > args.max_length:
        stats["too_long"] += 1
        if args.truncation_strategy == "delete" or max(len(t.answer) for t in tokens) >= args.max_length:
            stats["dropped"] += 1
            return []
        stats["truncated"] += 1  # right or left: the answers are kept whole, the prompt loses its start
        for t in tokens:
            t.prompt = t.prompt[len(t.prompt) + len(t.answer) - args.max_length:] if len(t.prompt) + len(t.answer) > args.max_length else t.prompt
    if args.rlhf_type == "kto":
        return [Single(t, good) for t, (_, good) in zip(tokens, answers)]
    if len(tokens) != 2:
        raise UserError(f"{where}: a single answer with a label is KTO data; --rlhf_type {args.rlhf_type} needs a "
                        "chosen and a rejected answer (or use --rlhf_type kto)")
    return [Pair(tokens[0], tokens[1])]
