"""An Ollama Modelfile for an exported GGUF file: FROM, TEMPLATE, SYSTEM, stop tokens, sampling.

The TEMPLATE (Go template syntax, as Ollama's own) is read off the model's chat template rather than
looked up by name: a conversation of marker strings is rendered with our template (data/template.py) and the
text around each marker is each role's prefix and suffix. Before anything is written the pieces are put
together again for other conversations and must give exactly what our template renders, so `ollama run`
sees the prompts the adapter was trained on.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from ..args import InferArguments
from ..data.template import ChatTemplate
from ..errors import UserError
from ..files import write_atomic

SYS, U1, A1, U2 = "SystemMarkerQx", "UserMarkerQx1", "AssistantMarkerQx1", "UserMarkerQx2"
# Ollama's names for our infer defaults
SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
            "repetition_penalty": "repeat_penalty", "max_new_tokens": "num_predict"}


def modelfile(tok, system: str | None, gguf_name: str) -> str:
    """The Modelfile text; `system` is the prompt the adapter was trained with (None: the template's default)."""
    p = _pieces(ChatTemplate(tok, None))
    system = p["default_system"] if system is None else system
    _check(p, tok, system)
    go = ('{{ if .System }}' + p["system_prefix"] + '{{ .System }}' + p["system_suffix"] + '{{ end }}'
          '{{ range .Messages }}{{ if eq .Role "user" }}' + p["user_prefix"] + '{{ .Content }}' + p["user_suffix"]
          + '{{ else if eq .Role "assistant" }}' + p["assistant_prefix"] + '{{ .Content }}' + p["assistant_suffix"]
          + '{{ end }}{{ end }}' + p["generation_prompt"])
    for text in [p[k] for k in p if k != "default_system"] + [system or ""]:
        if "{{" in text or '"""' in text:
            raise UserError('--to_ollama: the chat template or system prompt contains "{{" or """, which a Modelfile '
                            "cannot quote; write the Modelfile by hand")
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {_quote(s)}" for s in _stops(tok, p)]
    defaults = {f.name: f.default for f in fields(InferArguments)}
    lines += [f"PARAMETER {ours_to_ollama} {defaults[ours]}" for ours, ours_to_ollama in SAMPLING.items()]
    return "\n".join(lines) + "\n"


def write_modelfile(text: str, folder: Path) -> Path:
    """Written beside the GGUF file, under its name only when complete."""
    out = write_atomic(folder / "Modelfile", text)
    print(f"modelfile: {out}", flush=True)
    return out


def _pieces(t: ChatTemplate) -> dict:
    def msg(role, content):
        return {"role": role, "content": content}

    cant = UserError("--to_ollama: this model's chat template does not render each message as prefix + text + "
                     "suffix, so it has no Ollama TEMPLATE equivalent; export without --to_ollama")
    try:
        full = t.render([msg("system", SYS), msg("user", U1), msg("assistant", A1), msg("user", U2)])
        asked = t.render([msg("system", SYS), msg("user", U1), msg("assistant", A1), msg("user", U2)], True)
        answered = t.render([msg("system", SYS), msg("user", U1), msg("assistant", A1)])
        alone = t.render([msg("user", U1)], True)
    except Exception:  # jinja errors of templates that refuse such a conversation
        raise cant from None
    at = [full.find(m) for m in (SYS, U1, A1, U2)]
    if -1 in at or at != sorted(at) or not asked.startswith(full):
        raise cant
    user_suffix = full[at[3] + len(U2):]
    assistant_suffix = answered[answered.find(A1) + len(A1):]
    between = full[at[2] + len(A1):at[3]]
    if not between.startswith(assistant_suffix):
        raise cant
    user_prefix = between[len(assistant_suffix):]
    system_part = full[at[0] + len(SYS):at[1]]
    user_part = full[at[1] + len(U1):at[2]]
    if not (system_part.endswith(user_prefix) and user_part.startswith(user_suffix)):
        raise cant
    p = {"system_prefix": full[:at[0]], "system_suffix": system_part[:len(system_part) - len(user_prefix)],
         "user_prefix": user_prefix, "user_suffix": user_suffix,
         "assistant_prefix": user_part[len(user_suffix):], "assistant_suffix": assistant_suffix,
         "generation_prompt": asked[len(full):]}
    # a default system prompt the template adds when the conversation has none (Qwen's "You are Qwen, ...")
    head, tail = p["system_prefix"], p["system_suffix"] + user_prefix + U1
    p["default_system"] = alone[len(head):alone.index(tail)] if alone.startswith(head) and tail in alone else None
    return p


def _render(p: dict, system: str | None, messages: list[dict]) -> str:
    """What Ollama renders from the TEMPLATE above (.System, then each user/assistant message, then the prompt)."""
    out = p["system_prefix"] + system + p["system_suffix"] if system else ""
    for m in messages:
        if m["role"] in ("user", "assistant"):
            out += p[f"{m['role']}_prefix"] + m["content"] + p[f"{m['role']}_suffix"]
    return out + p["generation_prompt"]


def _check(p: dict, tok, system: str | None) -> None:
    ours = ChatTemplate(tok, system)
    for conversation in ([{"role": "user", "content": "你是谁?"}],
                         [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                          {"role": "user", "content": "What is 2+2?"}]):
        if _render(p, system, conversation) != ours.render(ours.with_system(conversation), add_generation_prompt=True):
            raise UserError("--to_ollama: an Ollama TEMPLATE read off this model's chat template renders a "
                            "conversation differently from it; export without --to_ollama")


def _stops(tok, p: dict) -> list[str]:
    """The end-of-turn text and the model's end-of-sequence tokens."""
    stops = [p["assistant_suffix"].strip()]
    config = Path(getattr(tok, "name_or_path", "")) / "generation_config.json"
    ids = json.loads(config.read_text(encoding="utf-8")).get("eos_token_id") if config.is_file() else None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    stops += [tok.convert_ids_to_tokens(i) for i in ids] + [tok.eos_token]
    return [s for s in dict.fromkeys(stops) if s]


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
