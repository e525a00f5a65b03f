"""The command line, generated from the argument dataclasses in args.py.

    tunesmith sft   [config.yaml] --flag value ...   train a LoRA adapter
    tunesmith rlhf  --rlhf_type dpo|orpo|simpo|kto   preference tuning, after sft or on its own
    tunesmith infer [config.yaml] --flag value ...   chat with a base model or adapter
    tunesmith data inspect DATASET... --flag value   what training would see: counts, lengths, loss mask
    tunesmith export / deploy / eval ...             merge and GGUF, serve, before/after table
    tunesmith web-ui [--port 7860]                   train and chat in the browser
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
import typing
from pathlib import Path

from . import quiet, settings
from .errors import UserError
from .train import status

COMMANDS = {
    "sft": ("SftArguments", "tunesmith.train.recipe", "train a LoRA adapter on your data"),
    "rlhf": ("RlhfArguments", "tunesmith.train.rlhf", "preference tuning of a LoRA adapter: dpo, orpo, simpo, kto"),
    "infer": ("InferArguments", "tunesmith.inference.infer", "chat with a base model or a tuned adapter"),
    "data": ("InspectArguments", "tunesmith.data.inspect",
             "`data inspect DATASET...`: counts, token lengths and the loss mask, before training"),
    "export": ("ExportArguments", "tunesmith.export.merge", "merge an adapter into its base model; write GGUF"),
    "deploy": ("DeployArguments", "tunesmith.inference.deploy", "serve the model over an OpenAI-compatible HTTP API"),
    "eval": ("EvalArguments", "tunesmith.inference.evaluate", "compare base and tuned answers side by side"),
    "web-ui": ("WebUiArguments", "tunesmith.webui.app", "train and chat in the browser (the same sft commands, shown)"),
}

TRUE = {"true", "1", "yes", "y", "on"}
FALSE = {"false", "0", "no", "n", "off"}


def parse_bool(value: str) -> bool:
    v = str(value).strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{value}'")


def parse_share(value: str) -> float:
    """true/false, or a share between 0 and 1."""
    v = str(value).strip().lower()
    if v in TRUE or v in FALSE:
        return 1.0 if v in TRUE else 0.0
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected true, false or a share between 0 and 1, got '{value}'") from None
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1, got {value}")
    return x


SPECIAL_TYPES = {"bool_or_float": parse_share}


def _converter(f: dataclasses.Field, tp):
    return SPECIAL_TYPES.get(f.metadata.get("type_hint")) or (parse_bool if tp is bool else tp)


def field_kind(f: dataclasses.Field, hints: dict):
    """(scalar type, is_list) of a dataclass field."""
    tp = hints[f.name]
    is_list = False
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is list:
        is_list, tp = True, typing.get_args(tp)[0]
    return tp, is_list


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + exits; we raise one clear line instead
        raise UserError(message)


def build_parser(command: str, cls) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=f"tunesmith {command}" + (" inspect" if command == "data" else ""), allow_abbrev=False,
        description=f"{COMMANDS[command][2]}. Flags follow ms-swift; booleans take true/false. "
        "A YAML/JSON config file may come first; flags win over it.",
    )
    parser.add_argument("config", nargs="?", help="optional YAML or JSON file with the same keys as the flags")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, is_list = field_kind(f, hints)
        names = [f"--{f.name}"] + [f"--{a}" for a in f.metadata.get("aliases", [])]
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=f.metadata.get("help", ""))
        conv = _converter(f, tp)
        kw.update(type=conv, metavar="true|false" if conv is parse_bool else f.name.upper())
        if is_list:  # --query a --query b and --dataset a b both collect every value
            kw.update(nargs="+", action="extend")
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw["help"] += f" [default: {json.dumps(default, ensure_ascii=False)}]"
        parser.add_argument(*names, **kw)
    return parser


def _all_flags(cls) -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        out += [f.name] + list(f.metadata.get("aliases", []))
    return out


def _suggest(name: str, cls) -> str:
    close = difflib.get_close_matches(name.lstrip("-"), _all_flags(cls), n=1, cutoff=0.6)
    return f"; did you mean --{close[0]}?" if close else f"; see `tunesmith {{}} --help`"


def _load_config(path: str, cls, command: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} not found (a first argument that is not a flag is read as a YAML/JSON config)")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:
        raise UserError(f"{path}: cannot read config ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must hold a mapping of flag names to values")
    data.pop("_command", None)
    known = {f.name: f for f in dataclasses.fields(cls)}
    aliases = {a: f.name for f in dataclasses.fields(cls) for a in f.metadata.get("aliases", [])}
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in data.items():
        name = aliases.get(key, key)
        if name not in known:
            raise UserError(f"{path}: unknown key '{key}'" + _suggest(key, cls).format(command))
        tp, is_list = field_kind(known[name], hints)
        if is_list and not isinstance(value, list):
            value = [value]
        try:
            if value is not None:
                conv = _converter(known[name], tp)
                value = [conv(v) for v in value] if is_list else conv(value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            raise UserError(f"{path}: key '{key}': {e}") from None
        out[name] = value
    return out


def parse_args(command: str, argv: list[str]):
    from . import args as args_mod

    cls = getattr(args_mod, COMMANDS[command][0])
    parser = build_parser(command, cls)
    # Unknown flags get their own message with a suggestion, before argparse sees them.
    flags = set(_all_flags(cls))
    for tok in argv:
        if tok.startswith("--") and len(tok) > 2:
            name = tok[2:].split("=", 1)[0]
            if name not in flags and name != "help":
                raise UserError(f"unknown flag --{name}" + _suggest(name, cls).format(command))
    ns = vars(parser.parse_args(argv))
    config = ns.pop("config", None)
    values = _load_config(config, cls, command) if config else {}
    values.update(ns)
    args = cls(**values)
    args.validate()
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Training allocates tensors of many sizes; growable segments keep the CUDA cache from fragmenting.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    quiet.silence()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage: tunesmith {" + ",".join(COMMANDS) + "} [config.yaml] [--flag value ...]\n")
        for name, (_, _, desc) in COMMANDS.items():
            print(f"  {name:8s} {desc}")
        print("\n`tunesmith COMMAND --help` lists a command's flags.")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"tunesmith: error: unknown command '{command}'{hint} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    if command == "data":  # one action so far; its positional DATASET... are --dataset values
        if not rest or rest[0] != "inspect":
            print("tunesmith data: error: expected `tunesmith data inspect DATASET... [--flags]`", file=sys.stderr)
            return 2
        rest = rest[1:]
        k = next((i for i, t in enumerate(rest) if t.startswith("-")), len(rest))
        rest = (["--dataset", *rest[:k]] if k else []) + rest[k:]
    try:
        args = parse_args(command, rest)
        if command in ("sft", "rlhf") and not args.dry_run:
            from .data import replay
            from .inference.infer import load_chat
            from .train.distributed import relaunch

            replay.ensure(args, load_chat)  # --replay_ratio/--keep_kl: the base model's answers, once, before any process trains
            code = relaunch(argv)  # NPROC_PER_NODE=N: the same command in N processes under torchrun
            if code is not None:
                return code
        adapter_names_model = command == "rlhf" and args.adapters and not args.model  # rlhf.run reads it first
        if hasattr(args, "model") and command in ("sft", "rlhf", "infer") and not adapter_names_model and not settings.no_prefetch():
            from .model import preload

            preload.prefetch(args.model)  # overlaps reading the weights with the imports below
            if command in ("sft", "rlhf") and not args.dry_run:
                preload.stage(args)  # and, on a GPU, copying them there
        import importlib

        module = importlib.import_module(COMMANDS[command][1])
        return module.run(args) or 0
    except UserError as e:
        from .console import first_process

        if first_process():  # under torchrun every rank fails alike; one line is enough
            print(f"tunesmith {command}: error: {e}", file=sys.stderr)
        status.update(phase="failed", error=f"tunesmith {command}: error: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        print(f"\ntunesmith {command}: interrupted", file=sys.stderr)
        status.update(phase="stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
