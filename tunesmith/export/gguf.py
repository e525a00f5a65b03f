"""Hugging Face folder -> one GGUF file (weights, config, tokenizer, chat template) for llama.cpp / Ollama.

f32, f16 and bf16 are written with the `gguf` library's own writer and tensor-name maps; every quantized
type (q8_0, q4_k_m, ...) is made from that 16-bit file by llama.cpp's own quantizer (llama-cpp-python's
llama_model_quantize), as `convert_hf_to_gguf.py` + `llama-quantize` would. Supported: qwen2, qwen3, llama
(Llama 3's RoPE scaling included) and mistral, with a byte-level BPE tokenizer (tokenizer.json). Each file is read back and checked, and
appears under its name only when complete.
"""

from __future__ import annotations

import ctypes
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from ..args import GGUF_TYPES
from ..errors import UserError
from ..console import log

# transformers' model_type -> llama.cpp's architecture (Mistral is llama to llama.cpp, as its converter writes it)
ARCHITECTURES = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama", "mistral": "llama"}
PERMUTED = ("llama",)  # llama.cpp's rotary layout for q/k differs from transformers' here (its converter permutes)
OWN_TYPES = GGUF_TYPES[:3]  # f16, bf16, f32: written here; the rest come from llama.cpp's quantizer
INSTALL = "pip install 'tunesmith[gguf]'"


def check_config(model_dir: Path) -> dict:
    """config.json of a model this export can write, or one line on why not (also asked before a merge)."""
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    kind = cfg.get("model_type")
    if kind not in ARCHITECTURES:
        raise UserError(f"--to_gguf: {model_dir} is a {kind} model; GGUF export supports {', '.join(ARCHITECTURES)} "
                        "(use llama.cpp's convert_hf_to_gguf.py on the merged folder for others)")
    kind_of_rope = _rope(cfg).get("rope_type", "default")
    if kind_of_rope not in ("default", "llama3"):
        raise UserError(f"--to_gguf: {model_dir} uses {kind_of_rope} RoPE scaling, which this GGUF export does not write "
                        "yet (default and llama3 it does)")
    if (model_dir / "tokenizer.json").is_file():
        pre_tokenizer(model_dir)  # an unknown tokenizer, too, is said before any merge
    return cfg


def _rope(cfg: dict) -> dict:
    """The RoPE settings, as transformers 5 (rope_parameters) or 4 (rope_theta + rope_scaling) write them."""
    rope = dict(cfg.get("rope_scaling") or {})
    rope.update(cfg.get("rope_parameters") or {})
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    return rope


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """Llama 3.1's RoPE scaling as per-frequency divisors (llama.cpp's rope_freqs tensor): long wavelengths
    slowed by `factor`, short ones kept, the band between blended (the published formula, as transformers'
    _compute_llama3_parameters applies it to the frequencies)."""
    factor, low, high = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    wavelen = 2 * np.pi * rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = np.clip((old / wavelen - low) / (high - low), 0.0, 1.0)
    divisor = 1.0 / ((1 - smooth) / factor + smooth)  # 1 where smooth is 1 (short), factor where 0 (long)
    return divisor.astype(np.float32)


def write_gguf(model_dir: Path, out: Path, gguf_type: str) -> Path:
    cfg = check_config(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise UserError(f"--to_gguf: {model_dir} has no tokenizer.json (a byte-level BPE tokenizer is needed)")
    quantized = gguf_type not in OWN_TYPES
    if quantized:
        _llama_cpp(gguf_type)  # before minutes of writing: is the quantizer there?
    # llama.cpp's own route: a 16-bit file first (bf16 for bf16 weights, f16 otherwise), then quantize it
    first = ("bf16" if str(cfg.get("dtype") or cfg.get("torch_dtype")) == "bfloat16" else "f16") if quantized else gguf_type

    t0 = time.time()
    tmp = _temp_beside(out)
    done = None
    try:
        n_tensors = _write(model_dir, cfg, tmp, first)
        check_gguf(tmp, model_dir, cfg, n_tensors)
        if quantized:
            done = _temp_beside(out)
            _quantize(tmp, done, gguf_type)
            check_gguf(done, model_dir, cfg, n_tensors)
        else:
            done, tmp = tmp, None
        os.chmod(done, 0o644)
        os.replace(done, out)
    finally:
        for leftover in (tmp, done):
            if leftover is not None:
                leftover.unlink(missing_ok=True)
    log(f"GGUF ({gguf_type}) written to {out}: {out.stat().st_size / 2**20:.0f} MiB in {time.time() - t0:.0f} s")
    print(f"gguf_file: {out}", flush=True)
    return out


def _temp_beside(out: Path) -> Path:
    """A hidden file next to `out`, renamed into place only when complete."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.partial-")
        os.close(fd)
    except OSError as e:
        raise UserError(f"--output_dir: cannot write {out} ({e.strerror})") from None
    return Path(name)


def _write(model_dir: Path, cfg: dict, path: Path, gguf_type: str) -> int:
    """Our GGUF writer (f32, f16, bf16); returns the number of tensors written."""
    import gguf
    from safetensors import safe_open

    rope = _rope(cfg)
    arch, pre = ARCHITECTURES[cfg["model_type"]], pre_tokenizer(model_dir)
    n_layers, n_heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(cfg.get("_name_or_path") or model_dir.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n_layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_key_length(head_dim)  # Qwen3 and Mistral may set head_dim apart from hidden_size / heads
    w.add_value_length(head_dim)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
        w.add_vocab_size(cfg["vocab_size"])
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[gguf_type]
    w.add_file_type(file_type)
    _add_tokenizer(w, model_dir, cfg["vocab_size"], pre)

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), n_layers)
    written = 0
    if rope.get("rope_type") == "llama3":
        _add_tensor(w, gguf, gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                    llama3_rope_factors(rope, head_dim), gguf_type)
        written += 1
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                if key == "lm_head.weight" and cfg.get("tie_word_embeddings"):
                    continue
                new = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if new is None:
                    raise UserError(f"--to_gguf: no GGUF name for tensor {key} of {model_dir}")
                data = f.get_tensor(key).float().numpy()
                if arch in PERMUTED and key.endswith(("q_proj.weight", "k_proj.weight")):
                    data = _permute(data, n_heads, n_heads if "q_proj" in key else n_kv)
                _add_tensor(w, gguf, new, data, gguf_type)
                written += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def _llama_cpp(gguf_type: str):
    """llama-cpp-python, or one line on how to get it."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"--gguf_type {gguf_type} is made by llama.cpp's quantizer, which needs llama-cpp-python: "
                        f"{INSTALL} (it builds llama.cpp, ~20 min on 2 cores); {', '.join(OWN_TYPES)} need nothing more") from None

    if not hasattr(llama_cpp, _ftype_name(gguf_type)):
        raise UserError(f"--gguf_type {gguf_type}: llama-cpp-python {llama_cpp.__version__} does not know this type; "
                        "pip install -U llama-cpp-python")
    return llama_cpp


def _ftype_name(gguf_type: str) -> str:
    name = gguf_type.upper() + ("_M" if gguf_type in ("q3_k", "q4_k", "q5_k") else "")  # llama-quantize's aliases
    return f"LLAMA_FTYPE_MOSTLY_{name}"


def _quantize(src: Path, dst: Path, gguf_type: str) -> None:
    """llama.cpp's llama_model_quantize, its log kept quiet: fallbacks are counted, its reason for failing is shown."""
    llama_cpp = _llama_cpp(gguf_type)
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(_level, text, _user):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _ftype_name(gguf_type))
    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        failed = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    if failed:
        said = [t.split("failed to quantize: ", 1)[1].strip() for t in lines if "failed to quantize: " in t]
        why = said[-1] if said else f"return code {failed}"
        raise UserError(f"--gguf_type {gguf_type}: llama.cpp's quantizer failed ({why}); nothing was written")
    fallback = sum("not divisible" in t for t in lines)
    if fallback:
        log(f"llama.cpp: {fallback} tensors have rows that {gguf_type}'s blocks do not divide and took its fallback type")


def _add_tensor(w, gguf, name: str, data: np.ndarray, gguf_type: str) -> None:
    """1-D tensors (norms, biases) stay float32, as llama.cpp expects; matrices take the chosen type."""
    if data.ndim == 1 or gguf_type == "f32":
        w.add_tensor(name, data.astype(np.float32))
    elif gguf_type == "f16":
        w.add_tensor(name, data.astype(np.float16))
    else:
        q = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.BF16)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)


def _permute(w: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """llama.cpp's rotary layout for llama q/k (its converter's permute; transformers' GGUF loader undoes it)."""
    if n_kv != n_head:
        n_head = n_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def pre_tokenizer(model_dir: Path) -> str:
    """llama.cpp's name for how the tokenizer splits text before BPE, read from tokenizer.json's pre_tokenizer
    (Qwen's digit-by-digit split, Llama 3's digits in threes, or GPT-2's byte-level regex as SmolLM has it)."""
    try:
        spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    except (OSError, ValueError):
        spec = {}
    parts = spec.get("pretokenizers", [spec])
    regexes = [(p.get("pattern") or {}).get("Regex", "") for p in parts if p.get("type") == "Split"]
    if any("\\p{N}{1,3}" in r for r in regexes):
        return "llama-bpe"
    if any("[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|" in r for r in regexes):
        return "qwen2"
    if not regexes and spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "smollm"
    raise UserError(f"--to_gguf: the tokenizer of {model_dir} splits text in a way this GGUF export does not know "
                    "(it writes byte-level BPE tokenizers of Qwen's, Llama 3's and GPT-2/SmolLM's kind; SentencePiece "
                    "ones such as Gemma's or Mistral 7B's not yet: use llama.cpp's convert_hf_to_gguf.py)")


def _add_tokenizer(w, model_dir: Path, vocab_size: int, pre: str) -> None:
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab = tok.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):  # the embedding may be larger than the tokenizer: padding entries, as llama.cpp does
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise UserError(f"--to_gguf: {model_dir}/tokenizer.json has no BPE merges; only byte-level BPE tokenizers are supported")
    if special.chat_template is None and getattr(tok, "chat_template", None):
        special.chat_template = tok.chat_template
    special.add_to_gguf(w, quiet=True)


def check_gguf(path: Path, model_dir: Path, cfg: dict, n_tensors: int) -> None:
    """Read the file back: architecture, every tensor present with its shape, tokenizer and chat template there."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field else None
    expected = ARCHITECTURES[cfg["model_type"]]
    problems = []
    if arch != expected:
        problems.append(f"architecture {arch!r}, expected {expected!r}")
    for key in ["tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template", f"{expected}.rope.freq_base"]:
        if key not in reader.fields:
            problems.append(f"{key} missing")
    if len(reader.tensors) != n_tensors:
        problems.append(f"{len(reader.tensors)} tensors, {n_tensors} written")
    elif len(reader.fields["tokenizer.ggml.tokens"].data) != cfg["vocab_size"]:
        problems.append(f"{len(reader.fields['tokenizer.ggml.tokens'].data)} tokens, expected {cfg['vocab_size']}")
    if problems:
        raise UserError(f"the GGUF file written from {model_dir} reads back wrong ({'; '.join(problems)}); nothing was kept")
    log(f"GGUF read back: {arch}, {len(reader.tensors)} tensors, {len(reader.fields)} metadata keys, chat template included")
