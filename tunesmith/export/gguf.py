"""Hugging Face folder -> one GGUF file (weights, config, tokenizer, chat template) for llama.cpp / Ollama.

f32, f16 and bf16 are written with the `gguf` library's own writer and tensor-name maps; every quantized
type (q8_0, q4_k_m, ...) is made from that 16-bit file by llama.cpp's own quantizer (llama-cpp-python's
llama_model_quantize), as `convert_hf_to_gguf.py` + `llama-quantize` would. Supported: qwen2, qwen3, qwen3_moe,
llama (Llama 3's RoPE scaling included), mistral, gemma2, gemma3 (text) and phi3, with a byte-level BPE
tokenizer or a SentencePiece-style one (BPE with byte fallback, as Gemma's and Llama 2's tokenizer.json are).
Each file is read back and checked, and appears under its name only when complete.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..args import GGUF_TYPES
from ..errors import UserError
from ..console import log

# transformers' model_type -> llama.cpp's architecture (Mistral is llama to llama.cpp, as its converter writes it)
ARCHITECTURES = {"qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3moe", "llama": "llama", "mistral": "llama",
                 "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}
PERMUTED = ("llama",)  # llama.cpp's rotary layout for q/k differs from transformers' here (its converter permutes)
ONE_PLUS_NORM = ("gemma2", "gemma3")  # Gemma's RMSNorm scales by (1 + w), llama.cpp's by w: its converter adds 1
# RoPE kinds written, and by which architectures (None: all)
ROPE_KINDS = {"default": None, "llama3": None, "linear": None, "longrope": ("phi3",)}
# llama.cpp fixes which Gemma layers use the sliding window: all but every Nth (its swa pattern)
SLIDING_PATTERN = {"gemma2": 2, "gemma3": 6}
OWN_TYPES = GGUF_TYPES[:3]  # f16, bf16, f32: written here; the rest come from llama.cpp's quantizer
INSTALL = "pip install 'tunesmith[gguf]'"
EXPERT = re.compile(r"(.+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


@dataclass
class Source:
    """A model folder as the export reads it, each file parsed once."""
    cfg: dict  # config.json
    tokenizer: dict | None  # tokenizer.json
    vocab_model: str = "gpt2"  # llama.cpp's tokenizer kind: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    pre: str | None = None  # for gpt2: how text is split before BPE


def check_config(model_dir: Path) -> Source:
    """The folder, if this export can write it, or one line on why not (also asked before a merge)."""
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    kind = cfg.get("model_type")
    if kind not in ARCHITECTURES:
        hint = " (Gemma 3 with vision: export its text model, model_type gemma3_text)" if kind == "gemma3" else ""
        raise UserError(f"--to_gguf: {model_dir} is a {kind} model; GGUF export supports {', '.join(ARCHITECTURES)}"
                        f"{hint} (use llama.cpp's convert_hf_to_gguf.py on the merged folder for others)")
    arch = ARCHITECTURES[kind]
    kind_of_rope = _rope(cfg).get("rope_type", "default")
    if kind_of_rope not in ROPE_KINDS or arch not in (ROPE_KINDS[kind_of_rope] or (arch,)):
        raise UserError(f"--to_gguf: {model_dir} uses {kind_of_rope} RoPE scaling, which this GGUF export does not write "
                        f"for {kind} yet")
    _check_family(model_dir, cfg, arch)
    src = Source(cfg, None)
    if (model_dir / "tokenizer.json").is_file():  # an unknown tokenizer, too, is said before any merge
        try:
            src.tokenizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        except ValueError as e:
            raise UserError(f"--to_gguf: {model_dir}/tokenizer.json is not valid JSON ({e})") from None
        src.vocab_model, src.pre = tokenizer_kind(model_dir, src.tokenizer)
        if arch == "phi3" and not _has_token(src.tokenizer, "<|endoftext|>"):  # Phi-3's and Phi-4's have it
            raise UserError(f"--to_gguf: the tokenizer of {model_dir} has no <|endoftext|> token, which llama.cpp "
                            "looks up when it loads a Phi-3 model")
    return src


def _has_token(tokenizer: dict, text: str) -> bool:
    return text in (tokenizer.get("model") or {}).get("vocab", {}) or \
        any(t["content"] == text for t in tokenizer.get("added_tokens", []))


def _check_family(model_dir: Path, cfg: dict, arch: str) -> None:
    """What llama.cpp computes one fixed way for an architecture, where a config may differ: refused, not mis-written."""
    why = None
    if arch == "qwen3moe":
        if not cfg.get("norm_topk_prob"):
            why = "norm_topk_prob false (llama.cpp's qwen3moe always renormalizes the chosen experts' weights)"
        elif cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
            why = "dense layers among its MoE ones (llama.cpp's qwen3moe has experts in every layer)"
    if arch in SLIDING_PATTERN:
        n = SLIDING_PATTERN[arch]
        expected = ["full_attention" if (i + 1) % n == 0 else "sliding_attention" for i in range(cfg["num_hidden_layers"])]
        if cfg.get("layer_types", expected) != expected:
            why = f"layer_types other than llama.cpp's {arch} pattern (every {n}th layer full attention, the rest sliding)"
    if arch == "gemma2" and not (cfg.get("attn_logit_softcapping") and cfg.get("final_logit_softcapping")):
        why = "no logit softcapping (llama.cpp's gemma2 always caps, attention and output logits)"
    if arch == "gemma3" and cfg.get("attn_logit_softcapping"):
        why = "attn_logit_softcapping (llama.cpp's gemma3 has none)"
    if arch in ONE_PLUS_NORM and not cfg.get("tie_word_embeddings", True):
        why = "an output matrix apart from its embedding (llama.cpp's Gemma reads the embedding as both)"
    if why:
        raise UserError(f"--to_gguf: {model_dir} has {why}; this GGUF export does not write it")


def _rope(cfg: dict) -> dict:
    """The RoPE settings, as transformers 5 (rope_parameters) or 4 (rope_theta + rope_scaling) write them; for
    Gemma 3, which has one per attention kind, those of its full-attention layers."""
    params = cfg.get("rope_parameters") or {}
    params = params.get("full_attention", params)
    rope = dict(cfg.get("rope_scaling") or {})
    rope.update(params)
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    if rope.get("rope_type") == "su":  # Phi-3's first name for longrope
        rope["rope_type"] = "longrope"
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    return rope


def _local_rope_theta(cfg: dict) -> float:
    """Gemma 3's RoPE base for its sliding-window layers."""
    local = (cfg.get("rope_parameters") or {}).get("sliding_attention") or {}
    return float(local.get("rope_theta", cfg.get("rope_local_base_freq", 10000.0)))


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
    src = check_config(model_dir)
    cfg = src.cfg
    if src.tokenizer is None:
        raise UserError(f"--to_gguf: {model_dir} has no tokenizer.json (the tokenizer is written from it)")
    quantized = gguf_type not in OWN_TYPES
    if quantized:
        _llama_cpp(gguf_type)  # before minutes of writing: is the quantizer there?
    # llama.cpp's own route: a 16-bit file first (bf16 for bf16 weights, f16 otherwise), then quantize it
    first = ("bf16" if str(cfg.get("dtype") or cfg.get("torch_dtype")) == "bfloat16" else "f16") if quantized else gguf_type

    t0 = time.time()
    tmp = _temp_beside(out)
    done = None
    try:
        n_tensors = _write(model_dir, src, tmp, first)
        check_gguf(tmp, model_dir, src, n_tensors)
        if quantized:
            done = _temp_beside(out)
            _quantize(tmp, done, gguf_type)
            check_gguf(done, model_dir, src, n_tensors)
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


def _write(model_dir: Path, src: Source, path: Path, gguf_type: str) -> int:
    """Our GGUF writer (f32, f16, bf16); returns the number of tensors written."""
    import gguf

    cfg = src.cfg
    arch = ARCHITECTURES[cfg["model_type"]]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(cfg.get("_name_or_path") or model_dir.name)
    rope = _rope(cfg)
    head_dim = _add_hparams(w, gguf, cfg, arch, rope)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[gguf_type]
    w.add_file_type(file_type)
    if src.vocab_model == "llama":
        _add_spm_tokenizer(w, gguf, model_dir, src.tokenizer, cfg["vocab_size"])
    else:
        _add_tokenizer(w, model_dir, cfg["vocab_size"], src.pre)

    written = 0
    for name, data in _rope_tensors(gguf, rope, head_dim):
        _add_tensor(w, gguf, name, data, gguf_type)
        written += 1
    for name, data in _tensors(model_dir, cfg, arch, gguf):
        _add_tensor(w, gguf, name, data, gguf_type)
        written += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def _add_hparams(w, gguf, cfg: dict, arch: str, rope: dict) -> int:
    """The model's shape and its architecture's own keys, as llama.cpp reads them; returns head_dim."""
    n_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_heads)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or n_heads)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_key_length(head_dim)  # Qwen3, Mistral and Gemma may set head_dim apart from hidden_size / heads
    w.add_value_length(head_dim)
    if rope.get("rope_type") == "linear":  # Gemma 3 4B and up: positions divided by factor (its global layers)
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
        w.add_vocab_size(cfg["vocab_size"])
    if arch in SLIDING_PATTERN:
        w.add_sliding_window(cfg["sliding_window"])
    if arch == "gemma2":
        w.add_attn_logit_softcapping(float(cfg["attn_logit_softcapping"]))
        w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    if arch == "gemma3":
        w.add_rope_freq_base_swa(_local_rope_theta(cfg))
        if cfg.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    if arch == "phi3":
        _add_phi3(w, cfg, rope, head_dim)
    if arch == "qwen3moe":
        w.add_expert_count(_n_experts(cfg))
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    return head_dim


def _add_phi3(w, cfg: dict, rope: dict, head_dim: int) -> None:
    """Phi-3's keys: its rotary share of each head, its pre-extension context and sliding window (0: none)."""
    w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))))
    original = rope.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
    w.add_rope_scaling_orig_ctx_len(original or cfg["max_position_embeddings"])
    w.add_sliding_window(cfg.get("sliding_window") or 0)
    if rope.get("rope_type") == "longrope":
        # the attention scale transformers' longrope applies for a context longer than the original
        scale = cfg["max_position_embeddings"] / original
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)


def _n_experts(cfg: dict) -> int:
    return cfg.get("num_experts") or cfg["num_local_experts"]  # Qwen's name, and transformers 5's


def _rope_tensors(gguf, rope: dict, head_dim: int):
    """RoPE scaling that llama.cpp reads as tensors: Llama 3.1's rope_freqs, Phi-3's long and short factors."""
    if rope.get("rope_type") == "llama3":
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(rope, head_dim)
    if rope.get("rope_type") == "longrope":
        for which, key in [(gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, "long_factor"),
                           (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, "short_factor")]:
            yield gguf.TENSOR_NAMES[which] + ".weight", np.asarray(rope[key], dtype=np.float32)


def _tensors(model_dir: Path, cfg: dict, arch: str, gguf):
    """(GGUF name, float32 array) for each tensor of the safetensors shards, changed where llama.cpp's layout
    differs: llama's q/k rows permuted, Gemma's norms as 1 + w, MoE experts stacked into one tensor per layer."""
    from safetensors import safe_open

    n_heads = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_heads
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg["num_hidden_layers"])
    experts: dict[str, dict[int, np.ndarray]] = {}  # a layer's expert matrices, gathered until all are read
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                if key == "lm_head.weight" and cfg.get("tie_word_embeddings"):
                    continue
                data = f.get_tensor(key).float().numpy()
                if arch in PERMUTED and key.endswith(("q_proj.weight", "k_proj.weight")):
                    data = _permute(data, n_heads, n_heads if "q_proj" in key else n_kv)
                if arch in ONE_PLUS_NORM and key.endswith("norm.weight"):
                    data = data + 1.0
                if match := EXPERT.fullmatch(key):
                    stacked = f"{match[1]}.{match[3]}.weight"
                    experts.setdefault(stacked, {})[int(match[2])] = data
                    if len(experts[stacked]) < _n_experts(cfg):
                        continue
                    key, gathered = stacked, experts.pop(stacked)
                    data = np.stack([gathered[e] for e in range(len(gathered))])  # [expert, out, in]
                new = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if new is None:
                    raise UserError(f"--to_gguf: no GGUF name for tensor {key} of {model_dir}")
                yield new, data
    if experts:
        raise UserError(f"--to_gguf: {model_dir} lacks some experts of {next(iter(experts))}")


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


def tokenizer_kind(model_dir: Path, tokenizer: dict) -> tuple[str, str | None]:
    """llama.cpp's tokenizer model for tokenizer.json: ("llama", None) for SentencePiece-style BPE with byte
    fallback (Gemma's, Llama 2's, Phi-3's), else ("gpt2", how text is split before byte-level BPE)."""
    model = tokenizer.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama", None
    return "gpt2", pre_tokenizer(model_dir, tokenizer.get("pre_tokenizer") or {})


def pre_tokenizer(model_dir: Path, spec: dict) -> str:
    """llama.cpp's name for how the tokenizer splits text before BPE, read from tokenizer.json's pre_tokenizer
    (Qwen's digit-by-digit split, Llama 3's digits in threes, or GPT-2's byte-level regex as SmolLM has it)."""
    parts = spec.get("pretokenizers", [spec])
    regexes = [(p.get("pattern") or {}).get("Regex", "") for p in parts if p.get("type") == "Split"]
    if any("\\p{N}{1,3}" in r for r in regexes):
        return "llama-bpe"
    if any("[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|" in r for r in regexes):
        return "qwen2"
    if not regexes and spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "smollm"
    raise UserError(f"--to_gguf: the tokenizer of {model_dir} splits text in a way this GGUF export does not know "
                    "(it writes byte-level BPE tokenizers of Qwen's, Llama 3's and GPT-2/SmolLM's kind, and "
                    "SentencePiece-style BPE with byte fallback: use llama.cpp's convert_hf_to_gguf.py for others)")


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
    _add_special(w, gguf, model_dir, len(tokens), merges=True, chat_template=getattr(tok, "chat_template", None))


def _add_spm_tokenizer(w, gguf, model_dir: Path, tokenizer: dict, vocab_size: int) -> None:
    """A SentencePiece-style tokenizer as llama.cpp's "llama" model: tokens, scores and types. llama.cpp merges the
    pair whose joined piece scores highest; tokenizer.json (as converted from SentencePiece, or trained by `tokenizers`)
    numbers pieces in merge order, so -id is that order."""
    model = tokenizer["model"]
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {t["id"]: t for t in tokenizer.get("added_tokens", [])}
    tokens, scores, types = [], [], []
    for i in range(vocab_size):  # the embedding may be larger than the tokenizer: padding entries, as llama.cpp does
        text = added[i]["content"] if i in added else by_id.get(i)
        if text is None:
            text, kind = f"[PAD{i}]", gguf.TokenType.UNUSED
        elif i in added:
            kind = gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED
        elif text == model.get("unk_token"):
            kind = gguf.TokenType.UNKNOWN
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        tokens.append(text)
        scores.append(-float(i) if kind == gguf.TokenType.NORMAL else -1000.0)
        types.append(kind)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(_space_prefix(tokenizer))
    _add_special(w, gguf, model_dir, len(tokens), merges=False, chat_template=_chat_template(model_dir))


def _space_prefix(tokenizer: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text (Llama 2's and Phi-3's do, Gemma's not)."""
    steps = [tokenizer.get("normalizer") or {}, tokenizer.get("pre_tokenizer") or {}]
    steps = [s for step in steps for s in step.get("normalizers", step.get("pretokenizers", [step]))]
    return any(s.get("type") == "Prepend" or (s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never")
               for s in steps)


def _chat_template(model_dir: Path) -> str | list | None:
    """The chat template where transformers' tokenizer finds it: chat_template.jinja first, then tokenizer_config.json's
    "chat_template" (a string, or a list of named ones); read from the files, so no tokenizer is loaded for it."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    return json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None


def _add_special(w, gguf, model_dir: Path, n_tokens: int, merges: bool, chat_template: str | None) -> None:
    """Special token ids, add_bos/add_eos, BPE merges (byte-level BPE only) and the chat template."""
    special = gguf.SpecialVocab(model_dir, load_merges=merges, n_vocab=n_tokens)
    if merges and not special.merges:
        raise UserError(f"--to_gguf: {model_dir}/tokenizer.json has no BPE merges; only byte-level BPE tokenizers are supported")
    if chat_template:  # the template training and inference use (transformers' order), not gguf's own pick
        special.chat_template = chat_template
    special.add_to_gguf(w, quiet=True)


def check_gguf(path: Path, model_dir: Path, src: Source, n_tensors: int) -> None:
    """Read the file back: architecture, every tensor present with its shape, tokenizer and chat template there."""
    import gguf

    cfg = src.cfg
    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field else None
    expected = ARCHITECTURES[cfg["model_type"]]
    problems = []
    if arch != expected:
        problems.append(f"architecture {arch!r}, expected {expected!r}")
    vocab = ["tokenizer.ggml.merges"] if src.vocab_model == "gpt2" else ["tokenizer.ggml.scores"]
    for key in ["tokenizer.ggml.tokens", *vocab, "tokenizer.chat_template", f"{expected}.rope.freq_base"]:
        if key not in reader.fields:
            problems.append(f"{key} missing")
    if len(reader.tensors) != n_tensors:
        problems.append(f"{len(reader.tensors)} tensors, {n_tensors} written")
    elif len(reader.fields["tokenizer.ggml.tokens"].data) != cfg["vocab_size"]:
        problems.append(f"{len(reader.fields['tokenizer.ggml.tokens'].data)} tokens, expected {cfg['vocab_size']}")
    if problems:
        raise UserError(f"the GGUF file written from {model_dir} reads back wrong ({'; '.join(problems)}); nothing was kept")
    log(f"GGUF read back: {arch}, {len(reader.tensors)} tensors, {len(reader.fields)} metadata keys, chat template included")
