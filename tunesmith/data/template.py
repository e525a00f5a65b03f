"""Chat template and loss mask: the model's own template renders every conversation, the same way
for training and for inference. Loss falls on assistant answers only, up to and including the
end-of-turn token (e.g. Qwen's <|im_end|>), so the tuned model learns to stop.
"""

from __future__ import annotations

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
    def __init__(self, tokenizer, system: str | None = None):
        self.tok = tokenizer
        self.system = system

    def with_system(self, messages: list[dict]) -> list[dict]:
        """--system unless the conversation brings its own; None keeps the template's default."""
        if self.system is not None and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.system}] + list(messages)
        return list(messages)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        return self.tok.apply_chat_template(clean, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation that ends where the assistant's next answer begins."""
        text = self.render(self.with_system(messages), add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode(self, messages: list[dict], last_round_only: bool = False) -> Encoded:
        """Token ids and labels of a whole conversation: labels copy the ids on trained answers."""
        msgs = self.with_system(messages)
        full = self.render(msgs)
        spans = []  # character ranges [a, b) that carry loss
        answers = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if last_round_only:
            answers = answers[-1:]
        for i in answers:
            if msgs[i].get("loss") is False:
                continue
            before = self.render(msgs[:i], add_generation_prompt=True) if i else ""
            upto = self.render(msgs[: i + 1])
            if not (full.startswith(before) and full.startswith(upto)):
                raise UserError("this model's chat template renders a conversation differently from its parts; "
                                "tunesmith cannot tell which tokens are the answer (try --model_type with a ChatML model)")
            spans.append((len(before), len(upto.rstrip())))  # the end-of-turn token counts, the newline after it not
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [IGNORE] * len(ids)
        for k, (s, e) in enumerate(offsets):
            if e > s and any(a <= s and e <= b for a, b in spans):
                labels[k] = ids[k]
        return Encoded(ids, labels)

