"""`tunesmith export`: ship a tuned model.

    tunesmith export --adapters CKPT --merge_lora true      CKPT-merged/: a standalone Hugging Face model
    tunesmith export --adapters CKPT --to_gguf true         CKPT-merged/ plus CKPT-merged/model-f16.gguf
    tunesmith export --model DIR --to_gguf true --gguf_type q8_0   a GGUF file of any qwen2/llama folder
    ... --to_gguf true --gguf_type q4_k_m --to_ollama true          + a Modelfile beside it (`ollama create`)

The merge is checked before it is shown: the written folder is loaded back with plain transformers and
its logits are compared with base + adapter on a few prompts. Everything is written into a hidden
temporary folder and renamed into place, so a failure never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..args import ExportArguments, InferArguments
from ..errors import UserError
from ..model.load import load_model
from ..console import log

MARKER = "tunesmith_export.json"  # marks a folder we wrote, so a rerun may replace it and nothing else
CHECK_PROMPTS = ["你是谁?", "Who are you?", "中国的首都是哪里?", "Write a Python function that adds two numbers."]
# Largest allowed |merged - (base + adapter)| logit difference, by the dtype the merged weights are stored in.
# float32 merges differ only by summation order (~1e-5 of logits of magnitude ~30); half precision rounds
# every weight, which moves logits by a few tenths.
TOLERANCE = {"float32": 1e-3, "bfloat16": 1.0, "float16": 0.25}


def run(args: ExportArguments) -> int:
    if args.adapters:
        if args.to_gguf:
            _check_gguf_base(args)  # an unsupported family is one line before minutes of merging
        merged = merge(args)
    else:
        from ..model.resolve import resolve_model

        merged = resolve_model(args.model).path
    if args.to_gguf:
        from .gguf import write_gguf
        from .modelfile import write_modelfile

        if args.adapters:
            folder = merged
        else:
            folder = Path(args.output_dir) if args.output_dir else merged.parent / f"{merged.name}-gguf"
        path = folder / f"model-{args.gguf_type}.gguf"
        ollama = _modelfile(args, merged, path.name) if args.to_ollama else None  # its problems before the long write
        write_gguf(merged, path, args.gguf_type)
        if ollama:
            write_modelfile(ollama, folder)
    return 0


def _check_gguf_base(args: ExportArguments) -> None:
    from ..args import load_args_json
    from ..model.resolve import resolve_model
    from .gguf import check_config

    trained = Path(args.adapters[0]) / "args.json"
    base = args.model or (load_args_json(trained).get("model") if trained.is_file() else None)
    if base:  # else merge() says what is missing
        check_config(resolve_model(base).path)


def _modelfile(args: ExportArguments, merged: Path, gguf_name: str) -> str:
    """The Modelfile's text; its SYSTEM is the adapter's training prompt (kept in the merged folder's marker)."""
    from ..model.load import load_tokenizer
    from .modelfile import modelfile

    marker = merged / MARKER
    trained = json.loads(marker.read_text(encoding="utf-8")).get("system") if marker.is_file() else None
    return modelfile(load_tokenizer(merged), args.system if args.system is not None else trained, gguf_name)


def merged_dir(args: ExportArguments) -> Path:
    ckpt = Path(args.adapters[0])
    return Path(args.output_dir) if args.output_dir else ckpt.parent / f"{ckpt.name}-merged"


def merge(args: ExportArguments) -> Path:
    """Merge the adapter into its base, write the folder, load it back and compare logits."""
    import torch

    from ..inference.infer import load_chat

    final = merged_dir(args)
    staging = _staging(final, "--output_dir" if args.output_dir else "--adapters")
    try:
        t0 = time.time()
        chat = load_chat(InferArguments(model=args.model, adapters=list(args.adapters), torch_dtype=args.torch_dtype,
                                        device=args.device, system=args.system))
        bits = _trained_quant(args.adapters[0])
        if bits:
            log(f"the adapter was trained on a {bits}-bit base (QLoRA); it is merged into "
                "the unquantized base, as PEFT does")
        prompts = [chat.template.encode_prompt([{"role": "user", "content": q}]) for q in CHECK_PROMPTS]
        reference = _logits(chat.model, prompts, chat.device)
        save_dtype = _save_dtype(args.torch_dtype, chat.model)
        model = chat.model.merge_and_unload()
        model.to(save_dtype)
        model.config.dtype = save_dtype
        model.save_pretrained(staging, max_shard_size=args.max_shard_size)
        chat.tok.save_pretrained(staging)
        base_name, system = chat.args.model, chat.args.system
        del model, chat
        make_portable(staging)

        # What a user gets: the written folder, loaded by plain transformers, in the dtype we computed in.
        reloaded = load_model(staging, reference[0].dtype, "cpu" if not torch.cuda.is_available() else "cuda")
        merged_logits = _logits(reloaded, prompts, str(reloaded.device))
        del reloaded
        diff = max(float((a - b).abs().max()) for a, b in zip(reference, merged_logits))
        same_top = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference, merged_logits))
        positions = sum(a.shape[0] for a in reference)
        name = str(save_dtype).replace("torch.", "")
        tol = TOLERANCE[name]
        log(f"merge check: max |logit difference| merged vs base+adapter = {diff:.2e} (tolerance {tol:g} for {name}); "
            f"same top token at {same_top}/{positions} positions of {len(prompts)} prompts")
        if not diff <= tol:
            raise UserError(f"the merged model answers differently from base + adapter (max logit difference {diff:.3g} "
                            f"> {tol:g} for {name}); nothing was written")
        (staging / MARKER).write_text(json.dumps({
            "adapter": str(Path(args.adapters[0]).resolve()), "base_model": base_name, "system": system, "dtype": name,
            "max_logit_difference": diff, "exported": time.strftime("%Y-%m-%d %H:%M:%S"),
        }, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _publish(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"merged model written to {final} in {time.time() - t0:.0f} s")
    print(f"merged_model: {final}", flush=True)
    return final


def _trained_quant(adapter: str) -> int | None:
    """--quant_bits of the sft run that made this adapter (args.json), None for a plain LoRA."""
    path = Path(adapter) / "args.json"
    trained = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return trained.get("quant_bits") if trained.get("quant_method") else None


def _save_dtype(name: str, model):
    """--torch_dtype auto keeps the base model's stored dtype."""
    import torch

    from ..args import normalize_dtype

    name = normalize_dtype(name)
    if name == "auto":
        stored = getattr(model.get_base_model().config, "dtype", None) or torch.float32
        return getattr(torch, stored) if isinstance(stored, str) else stored
    return getattr(torch, name)


def _logits(model, prompts: list[list[int]], device: str) -> list:
    import torch

    out = []
    with torch.no_grad():
        for ids in prompts:
            out.append(model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu())
    return out


def make_portable(folder: Path) -> None:
    """Make config.json and tokenizer_config.json mean the same to transformers 4.x as to 5.x.

    5.x keeps the RoPE base only in `rope_parameters`; 4.x ignores that key and silently uses its
    default base 10000 — a different model. We also write the 4.x spelling of each setting."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" in rope:
            cfg["rope_theta"] = rope["rope_theta"]
        if "partial_rotary_factor" in rope:
            cfg["partial_rotary_factor"] = rope["partial_rotary_factor"]
        kind = rope.get("rope_type", "default")
        if kind != "default":  # 4.x reads scaling (yarn, llama3, linear, ...) from rope_scaling
            cfg["rope_scaling"] = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    tok_path = folder / "tokenizer_config.json"
    jinja = folder / "chat_template.jinja"
    if tok_path.is_file() and jinja.is_file():  # older 4.x reads the template only from tokenizer_config.json
        tok_cfg = json.loads(tok_path.read_text(encoding="utf-8"))
        tok_cfg.setdefault("chat_template", jinja.read_text(encoding="utf-8"))
        tok_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _staging(final: Path, flag: str) -> Path:
    """A hidden temporary folder beside `final`; refuses a destination that is not ours to replace."""
    if final.exists() and not (final / MARKER).is_file() and (not final.is_dir() or any(final.iterdir())):
        raise UserError(f"{flag}: {final} already exists and was not written by `tunesmith export`; "
                        "choose another --output_dir or remove it")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.partial-"))
    except OSError as e:
        raise UserError(f"{flag}: cannot write into {final.parent} ({e.strerror})") from None


def _publish(staging: Path, final: Path) -> None:
    """Rename the finished folder into place; an earlier export there is replaced only now."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary folder
    for f in staging.iterdir():  # data on disk before the rename makes it visible
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
