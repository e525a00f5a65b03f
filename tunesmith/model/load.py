"""Load a resolved model folder (resolve.py): tokenizer, config and model on the chosen device and dtype,
from the files or from tensors staged on the GPU while Python started (preload.py); 4/8-bit bases for QLoRA."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from . import preload
from .families import attention_implementation
from ..console import log
from ..errors import UserError


def tokenizer_end_of_turn_ids(tok) -> list[int]:
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
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra,
                                                         attn_implementation=attention_implementation(load_config(path)))
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
        with _no_allocator_warmup():
            model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(
                None, config=config, state_dict=tensors, dtype=dtype, attn_implementation=attention_implementation(config),
                device_map={"": device})  # without it transformers would move the tensors to the CPU
        model.config.name_or_path = model.name_or_path = str(path)  # as from_pretrained(path) sets them
        if (path / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(path)
        return model
    except Exception:
        return None


@contextlib.contextmanager
def _no_allocator_warmup():
    """transformers reserves the model's whole size on the GPU before it loads a state dict, to make its copies
    faster. Staged tensors are adopted without a copy, so that reservation only doubled the load's peak (7B:
    28.4 GiB reserved against 15.7 GiB). Off for this one call."""
    from transformers import modeling_utils

    saved = getattr(modeling_utils, "caching_allocator_warmup", None)
    if saved is not None:
        modeling_utils.caching_allocator_warmup = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if saved is not None:
            modeling_utils.caching_allocator_warmup = saved


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
    ids = tokenizer_end_of_turn_ids(tok)
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
