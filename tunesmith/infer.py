"""`tunesmith infer`: chat with a base model or a tuned adapter.

    tunesmith infer                                   chat with the default model
    tunesmith infer --adapters output/v0-…/checkpoint-80   base, template and system come from its args.json
    tunesmith infer --query "你是谁?" --query "Who are you?"   answers on stdout, then exit
    echo "你是谁?" | tunesmith infer                  one question per line from stdin

Interactive commands (as ms-swift): clear, reset-system, multi-line, single-line, exit/quit.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from .args import InferArguments, load_args_json
from .checkpoint import check_adapter_dir, check_adapter_fits
from .errors import UserError
from .models import end_of_turn_ids, load_model, load_tokenizer, log, pick_device, pick_dtype, resolve_model
from .template import ChatTemplate


@dataclass
class Chat:
    """A loaded model ready to answer: the one engine behind infer (and, later, eval and deploy)."""

    model: object
    tok: object
    template: ChatTemplate
    args: InferArguments
    device: str

    def answer(self, messages: list[dict], stream_to=None) -> str:
        import torch

        ids = self.template.encode_prompt(messages)
        input_ids = torch.tensor([ids], device=self.device)
        sampling = self.args.temperature > 0
        kwargs = dict(
            max_new_tokens=self.args.max_new_tokens,
            do_sample=sampling,
            eos_token_id=end_of_turn_ids(self.tok, self.model),
            pad_token_id=self.tok.pad_token_id,
            repetition_penalty=self.args.repetition_penalty,
        )
        if sampling:
            kwargs.update(temperature=self.args.temperature, top_p=self.args.top_p, top_k=self.args.top_k or None)
        else:  # greedy: drop sampling knobs a model's generation_config may carry, so none warns
            kwargs.update(temperature=None, top_p=None, top_k=None)
        streamer = _Streamer(self.tok, stream_to) if stream_to is not None else None
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      streamer=streamer, **kwargs)
        return self.tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()


class _Streamer:
    """Writes text as tokens arrive; decodes the whole answer so far so multi-byte characters stay whole."""

    def __init__(self, tok, out):
        self.tok, self.out, self.ids, self.shown, self.first = tok, out, [], 0, True

    def put(self, value):
        if self.first:  # generate() first hands over the prompt
            self.first = False
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        if len(text) > self.shown:
            self.out.write(text[self.shown:])
            self.out.flush()
            self.shown = len(text)

    def end(self):
        self.out.write("\n")
        self.out.flush()


def load_chat(args: InferArguments) -> Chat:
    """Base model, or base + adapter rebuilt from the checkpoint's args.json."""
    adapter = None
    if args.adapters:
        adapter = check_adapter_dir(args.adapters[0])
        trained = load_args_json(adapter / "args.json") if (adapter / "args.json").exists() else {}
        if args.model is None:
            args.model = trained.get("model")
            if args.model is None:
                raise UserError(f"--adapters {adapter}: its args.json does not name the base model; pass --model")
        if args.system is None:
            args.system = trained.get("system")
    resolved = resolve_model(args.model)
    if adapter is not None:
        check_adapter_fits(adapter, resolved.path)
    tok = load_tokenizer(resolved.path)
    device = pick_device(args.device)
    model = load_model(resolved.path, pick_dtype(args.torch_dtype, device), device)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        log(f"adapter {adapter} on {resolved.name}")
    model.eval()
    return Chat(model, tok, ChatTemplate(tok, args.system), args, device)


def run(args: InferArguments) -> int:
    chat = load_chat(args)
    out = sys.stdout
    if args.query or not sys.stdin.isatty():
        questions = args.query or [line.strip() for line in sys.stdin if line.strip()]
        for q in questions:  # each question on its own, so a script's answers don't depend on order
            if args.stream:
                chat.answer([{"role": "user", "content": q}], stream_to=out)
            else:
                print(chat.answer([{"role": "user", "content": q}]), file=out, flush=True)
        return 0
    return interactive(chat)


def interactive(chat: Chat) -> int:
    try:
        import readline  # noqa: F401  (arrow keys and history in input())
    except ImportError:
        pass
    print("tunesmith chat — commands: clear, reset-system, multi-line, single-line, exit", file=sys.stderr)
    history: list[dict] = []
    multi_line = False
    while True:
        try:
            query = _read(multi_line)
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        cmd = query.strip().lower()
        if cmd in ("exit", "quit"):
            return 0
        if cmd == "clear":
            history = []
            print("(history cleared)", file=sys.stderr)
            continue
        if cmd == "reset-system":
            chat.template.system = input("<<<[system] ") or None
            history = []
            continue
        if cmd in ("multi-line", "single-line"):
            multi_line = cmd == "multi-line"
            print("(multi-line: end your input with #)" if multi_line else "(single-line)", file=sys.stderr)
            continue
        if not query.strip():
            continue
        history.append({"role": "user", "content": query})
        print(">>> ", end="", flush=True)
        reply = chat.answer(history, stream_to=sys.stdout) if chat.args.stream else chat.answer(history)
        if not chat.args.stream:
            print(reply)
        history.append({"role": "assistant", "content": reply})


def _read(multi_line: bool) -> str:
    if not multi_line:
        return input("<<< ")
    lines = []
    prompt = "<<<[M] "
    while True:
        line = input(prompt)
        prompt = ""
        if line.endswith("#"):
            lines.append(line[:-1])
            return "\n".join(lines)
        lines.append(line)
