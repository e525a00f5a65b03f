"""Chat template and loss mask: the model's own template renders every conversation, the same way
for training and for inference. Loss falls on assistant answers only, up to and including the
end-of-turn token (e.g. Qwen's <|im_end|>), so the tuned model learns to stop.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..errors import UserError

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


class ChatTemplate:
    def __init__(self, tokenizer, system: str | None = None, enable_thinking: bool | None = None):
        self.tok = tokenizer
        self.system = system
        self.enable_thinking = enable_thinking  # None: the template's own default (see thinking())

    def with_system(self, messages: list[dict]) -> list[dict]:
        """--system unless the conversation brings its own; None keeps the template's default."""
        if self.system is not None and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.system}] + list(messages)
        return list(messages)

    def switchable(self) -> bool:
        """Whether the chat template has a thinking switch (Qwen3: `enable_thinking`)."""
        return "enable_thinking" in (getattr(self.tok, "chat_template", None) or "")

    def thinking(self, messages: list[dict]) -> bool | None:
        """The switch for rendering a training record: --enable_thinking when given; otherwise thinking off
        for a record whose answers carry no <think> reasoning (so its prompt is what inference with
        thinking off shows), and the template's default for one that reasons."""
        if not self.switchable():
            return None
        if self.enable_thinking is not None:
            return self.enable_thinking
        reasons = any(m["role"] == "assistant" and "</think>" in m["content"] for m in messages)
        return None if reasons else False

    def render(self, messages: list[dict], add_generation_prompt: bool = False, thinking: bool | None = None) -> str:
        from jinja2 import TemplateError

        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        extra = {"enable_thinking": thinking} if thinking is not None and self.switchable() else {}
        try:
            return self.tok.apply_chat_template(clean, tokenize=False, add_generation_prompt=add_generation_prompt, **extra)
        except TemplateError as e:
            if clean and clean[0]["role"] == "system" and "system" in str(e).lower() and len(clean) > 1:
                # a template without a system role (Gemma 2): the system prompt opens the first user turn, as
                # Gemma 3's own template does it
                first = {"role": clean[1]["role"], "content": clean[0]["content"] + "\n\n" + clean[1]["content"]}
                return self.render([first] + clean[2:], add_generation_prompt, thinking)
            raise UserError(f"this model's chat template refuses the conversation: {e}") from None

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation that ends where the assistant's next answer begins."""
        text = self.render(self.with_system(messages), add_generation_prompt=True, thinking=self.enable_thinking)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    @functools.cached_property
    def end_of_turn(self) -> str:
        """What the template writes after an answer (Qwen's <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>)."""
        probe = self.render([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "tunesmith-probe"}])
        return probe.rsplit("tunesmith-probe", 1)[1].strip()

    def encode(self, messages: list[dict], last_round_only: bool = False) -> Encoded:
        """Token ids and labels of a whole conversation: labels copy the ids on trained answers."""
        msgs = self.with_system(messages)
        thinking = self.thinking(msgs)
        full = self.render(msgs, thinking=thinking)
        answers = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if last_round_only:
            answers = answers[-1:]
        answers = [i for i in answers if msgs[i].get("loss") is not False]
        spans = self._spans(msgs, full, answers, thinking)
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [IGNORE] * len(ids)
        for k, (s, e) in enumerate(offsets):
            if e > s and any(a <= s and e <= b for a, b in spans):
                labels[k] = ids[k]
        return Encoded(ids, labels)

    def _spans(self, msgs: list[dict], full: str, answers: list[int], thinking) -> list[tuple[int, int]]:
        """Character ranges [a, b) of the answers that carry loss: from where the prompt for the answer ends
        to its end-of-turn token (the newline after it not). A template that renders earlier answers unlike
        the last one (Qwen3 drops their reasoning) is followed by the end-of-turn token instead."""
        spans, follow = [], False
        for i in answers:
            thinks = thinking if i == answers[-1] else None
            before = self.render(msgs[:i], add_generation_prompt=True, thinking=thinks) if i else ""
            if not full.startswith(before):
                raise UserError("this model's chat template renders a conversation differently from its parts; "
                                "tunesmith cannot tell which tokens are the answer (try --model_type with a ChatML model)")
            upto = None if follow else self.render(msgs[: i + 1], thinking=thinking)
            if upto is not None and full.startswith(upto):
                spans.append((len(before), len(upto.rstrip())))  # the end-of-turn token counts, the newline after it not
                continue
            follow = True
            eot = self.end_of_turn
            end = full.find(eot, len(before)) if eot else -1
            if end < 0:
                raise UserError("this model's chat template renders a conversation differently from its parts; "
                                "tunesmith cannot find where an answer ends")
            spans.append((len(before), end + len(eot)))
        return spans
