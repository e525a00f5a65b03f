"""`tunesmith infer`: chat with a base model or a tuned adapter.

    tunesmith infer                                   chat with the default model
    tunesmith infer --adapters output/v0-…/checkpoint-80   base, template and system come from its args.json
    tunesmith infer --query "你是谁?" --query "Who are you?"   answers on stdout, then exit
    echo "你是谁?" | tunesmith infer                  one question per line from stdin

Interactive commands (as ms-swift): clear, reset-system, multi-line, single-line, exit/quit.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ..args import InferArguments, load_args_json
from ..train.checkpoint import check_adapter_dir, check_adapter_fits
from ..errors import UserError
from ..model.families import check_supported
from ..model.load import end_of_turn_ids, load_config, load_model, load_tokenizer, pick_device, pick_dtype
from ..console import log
from ..model.resolve import resolve_model
from ..data.template import ChatTemplate


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length" (max_new_tokens reached)


@dataclass
class Chat:
    """A loaded model ready to answer: the one engine behind infer, eval and deploy."""

    model: object
    tok: object
    template: ChatTemplate
    args: InferArguments
    device: str
    model_name: str = ""  # what --model resolved to (alias, folder or hub id)
    systems: dict = field(default_factory=dict)  # adapter name -> its training system prompt

    def answer(self, messages: list[dict], stream_to=None) -> str:
        on_text = None
        if stream_to is not None:
            def on_text(piece):
                stream_to.write(piece)
                stream_to.flush()
        text = self.generate(self.template.encode_prompt(messages), on_text=on_text).text
        if stream_to is not None:
            stream_to.write("\n")
            stream_to.flush()
        return text

    def generate(self, ids: list[int], *, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, stop: list[str] | None = None, seed: int | None = None,
                 strip: bool = True, on_text=None, cancelled=None) -> Generation:
        """Continue token ids; the knobs default to the command's flags. on_text(piece) receives the answer as it
        grows; cancelled() returning True stops early (a client that went away). strip: drop the whitespace around
        a chat answer (a raw completion keeps it: " Paris" after "The capital of France is")."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        temperature = self.args.temperature if temperature is None else temperature
        top_p = self.args.top_p if top_p is None else top_p
        input_ids = torch.tensor([ids], device=self.device)
        sampling = temperature > 0
        kwargs = dict(
            max_new_tokens=max_new_tokens or self.args.max_new_tokens,
            do_sample=sampling,
            eos_token_id=end_of_turn_ids(self.tok, self.model),
            pad_token_id=self.tok.pad_token_id,
            repetition_penalty=self.args.repetition_penalty,
        )
        if sampling:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=self.args.top_k or None)
            if seed is not None:
                torch.manual_seed(seed)
        else:  # greedy: drop sampling knobs a model's generation_config may carry, so none warns
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=self.tok)
        if cancelled is not None:
            class _Cancel(StoppingCriteria):
                def __call__(self, *a, **k):
                    return cancelled()
            kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancel()])
        streamer = _Streamer(self.tok, on_text, stop, strip) if on_text is not None else None
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      streamer=streamer, **kwargs)
        new = out[0, len(ids):].tolist()
        ended = bool(new) and new[-1] in kwargs["eos_token_id"]
        full = self.tok.decode(new, skip_special_tokens=True)
        text = _cut(full, stop or [])
        text = text.strip() if strip else text
        if streamer is not None:
            streamer.flush(text)
        finish = "stop" if ended or len(new) < kwargs["max_new_tokens"] or len(_cut(full, stop or [])) < len(full) else "length"
        return Generation(text, len(ids), len(new), finish)

    def greedy_many(self, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 64) -> list[Generation]:
        """The greedy answers to many prompts, batch_size at a time (left-padded and masked). On a CPU one answer is
        bound by reading all weights once per token, so a batch costs little more than one answer."""
        import torch

        eos = end_of_turn_ids(self.tok, self.model)
        pad = eos[0] if self.tok.pad_token_id is None else self.tok.pad_token_id
        out = []
        for start in range(0, len(prompts), batch_size):
            group = prompts[start:start + batch_size]
            width = max(map(len, group))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in group], device=self.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=self.device)
            with torch.no_grad():
                rows = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                           do_sample=False, temperature=None, top_p=None, top_k=None, repetition_penalty=1.0,
                                           eos_token_id=eos, pad_token_id=pad)
            for p, row in zip(group, rows[:, width:].tolist()):
                end = next((k for k, t in enumerate(row) if t in eos), None)
                n = len(row) if end is None else end + 1
                text = self.tok.decode(row[:n], skip_special_tokens=True).strip()
                out.append(Generation(text, len(p), n, "length" if end is None else "stop"))
        return out

class _Streamer:
    """Hands on text as tokens arrive; decodes the whole answer so far so multi-byte characters stay whole.
    It holds back trailing whitespace and anything that may begin a stop string, so the pieces always add
    up to exactly the final answer (flush hands on the rest)."""

    def __init__(self, tok, on_text, stop, strip):
        self.tok, self.on_text, self.stop, self.strip = tok, on_text, stop or [], strip
        self.ids, self.shown, self.first = [], 0, True

    def put(self, value):
        if self.first:  # generate() first hands over the prompt
            self.first = False
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        text = _cut(text, self.stop)
        if self.stop:
            text = text[: max(0, len(text) - max(map(len, self.stop)) + 1)]
        self._show(text)

    def end(self):
        pass

    def flush(self, final: str):
        self._show(final)

    def _show(self, text: str):
        text = text.strip() if self.strip else text
        if len(text) > self.shown:
            self.on_text(text[self.shown:])
            self.shown = len(text)


def _cut(text: str, stop: list[str]) -> str:
    """The text before the first stop string (OpenAI leaves the stop string out)."""
    for s in stop:
        if s in text:
            text = text[: text.index(s)]
    return text


def load_chat(args: InferArguments, named: dict[str, str] | None = None) -> Chat:
    """Base model, or base + adapter(s) rebuilt from the checkpoints' args.json.

    `named` maps PEFT adapter names to checkpoint folders (deploy serves several on one base); by default
    the one --adapters folder. The first adapter's args.json fills --model and --system when not given."""
    named = named if named is not None else ({"default": args.adapters[0]} if args.adapters else {})
    adapters = {name: check_adapter_dir(path) for name, path in named.items()}
    systems = {}
    for name, adapter in adapters.items():
        trained = load_args_json(adapter / "args.json") if (adapter / "args.json").exists() else {}
        if args.model is None:
            args.model = trained.get("model")
            if args.model is None:
                raise UserError(f"--adapters {adapter}: its args.json does not name the base model; pass --model")
        elif trained.get("model") not in (None, args.model) and len(adapters) > 1:
            raise UserError(f"--adapters {adapter}: trained on {trained['model']}, not on {args.model} like the others; "
                            "serve adapters of one base model per deploy")
        systems[name] = args.system if args.system is not None else trained.get("system")
        if args.enable_thinking is None:  # an adapter trained with --enable_thinking answers as it was trained
            args.enable_thinking = trained.get("enable_thinking")
    if adapters and args.system is None:
        args.system = next(iter(systems.values()))
    resolved = resolve_model(args.model)
    check_supported(load_config(resolved.path), resolved.path)
    for adapter in adapters.values():
        check_adapter_fits(adapter, resolved.path)
    tok = load_tokenizer(resolved.path)
    device = pick_device(args.device)
    model = load_model(resolved.path, pick_dtype(args.torch_dtype, device), device)
    for i, (name, adapter) in enumerate(adapters.items()):
        from peft import PeftModel

        if i == 0:
            model = PeftModel.from_pretrained(model, adapter, adapter_name=name)
        else:
            model.load_adapter(adapter, adapter_name=name)
        log(f"adapter {adapter} on {resolved.name}")
    model.eval()
    return Chat(model, tok, ChatTemplate(tok, args.system, args.enable_thinking), args, device, resolved.name, systems)


class RemoteChat:
    """The same answer() as Chat, from a running `tunesmith deploy` (or any OpenAI-compatible server), streaming,
    through the official `openai` client."""

    def __init__(self, args: InferArguments):
        import os

        from openai import OpenAI

        self.args, self.url = args, args.base_url.rstrip("/")
        key = args.api_key or os.environ.get("OPENAI_API_KEY") or "none"  # (the client wants one; deploy may not)
        self.client = OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=600)
        self.template = ChatTemplate(None, args.system)
        served = [m.id for m in self._call(self.client.models.list).data]
        if args.model is None:
            args.model = served[-1]  # deploy lists the base first and adapters after it: the tuned one
        elif args.model not in served:
            raise UserError(f"--model {args.model}: {self.url} serves {', '.join(served)}")
        log(f"chatting with {args.model} at {self.url}")

    def _call(self, fn, **kwargs):
        """fn(**kwargs), with the server's refusals and a missing server as one line each."""
        import openai

        try:
            return fn(**kwargs)
        except openai.APIStatusError as e:
            body = e.body if isinstance(e.body, dict) else {}
            error = body.get("error", body)  # (the client hands over the error object or the whole body)
            message = error.get("message") if isinstance(error, dict) else None
            raise UserError(f"--base_url {self.url}: the server answered {e.status_code}: {message or e.message}") from None
        except openai.APIConnectionError as e:
            raise UserError(f"--base_url {self.url}: cannot connect ({e.__cause__ or e}); is `tunesmith deploy` running?") from None

    def answer(self, messages: list[dict], stream_to=None) -> str:
        import openai

        stream = self._call(self.client.chat.completions.create, model=self.args.model,
                            messages=self.template.with_system(messages), stream=True,
                            max_tokens=self.args.max_new_tokens, temperature=self.args.temperature, top_p=self.args.top_p)
        parts = []
        try:
            for event in stream:
                for choice in event.choices:
                    piece = choice.delta.content or ""
                    parts.append(piece)
                    if stream_to is not None and piece:
                        stream_to.write(piece)
                        stream_to.flush()
        except openai.APIError as e:  # an error event in the middle of the stream
            raise UserError(f"--base_url {self.url}: {e.message}") from None
        if stream_to is not None:
            stream_to.write("\n")
            stream_to.flush()
        return "".join(parts).strip()


def run(args: InferArguments) -> int:
    chat = RemoteChat(args) if args.base_url else load_chat(args)
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


COMMANDS = ("exit", "quit", "clear", "reset-system", "multi-line", "single-line")


def _read(multi_line: bool) -> str:
    if not multi_line:
        return input("<<< ")
    lines = []
    prompt = "<<<[M] "
    while True:
        line = input(prompt)
        if prompt and line.strip().lower() in COMMANDS:  # a command needs no closing '#'
            return line
        prompt = ""
        if line.endswith("#"):
            lines.append(line[:-1])
            return "\n".join(lines)
        lines.append(line)
