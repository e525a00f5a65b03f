"""Activation memory: what backward keeps per token and layer (measured widths), and the plan that fits it
in the GPU: the share of layers to checkpoint, or on lean layers the recompute level of each layer.
The planner (train/planner.py) adds weights, adapter, loss and context to these figures."""

from __future__ import annotations

import torch
from .checkpointing import decoder_layers
from ..console import log


# Bytes of saved activations per token per layer, in units of hidden_size x element size, by
# (Liger kernels, lean LoRA); measured on the Qwen2.5-7B architecture on an H100 (bench/RESULTS.md).
ACTIVATION_WIDTH = {(True, True): 20, (False, True): 28, (True, False): 35, (False, False): 52}


MARGIN_WIDTH = 6  # gradients in flight between layers, residual sums: a few more hidden-wide tensors


QK_NORM = ("qwen3", "qwen3_moe", "gemma3_text", "olmo2")  # families with per-head q/k RMSNorm


QUANTIZED_EXTRA_WIDTH = 4  # a bitsandbytes 4/8-bit base keeps a little more per layer (measured: 39 vs 35)


def activation_bytes(layers: int, hidden: int, elt: int, tokens: int, checkpointed: int, liger: bool,
                     lean: bool = True, quantized: bool = False) -> int:
    """Saved activations of one forward pass of `tokens` tokens with `checkpointed` of the `layers`
    layers recomputed in backward (one layer's full activations exist during its recompute)."""
    width = ACTIVATION_WIDTH[(liger, lean)] + (QUANTIZED_EXTRA_WIDTH if quantized else 0)
    full = width * hidden * elt * tokens  # one layer, nothing recomputed
    kept = hidden * elt * tokens  # one checkpointed layer keeps only its input
    margin = MARGIN_WIDTH * hidden * elt * tokens
    return (layers - checkpointed) * full + checkpointed * kept + (full if checkpointed else 0) + margin


def fewest_checkpointed(layers: int, hidden: int, elt: int, tokens: int, liger: bool, lean: bool, budget: float,
                        quantized: bool = False) -> int:
    """The fewest layers to checkpoint so the activations fit in `budget` bytes (all of them if none fits)."""
    fits = (k for k in range(layers + 1)
            if activation_bytes(layers, hidden, elt, tokens, k, liger, lean, quantized) <= budget)
    return next(fits, layers)


def moe_layer_width(hidden: int, heads: int, kv_heads: int, head_dim: int, qk_norm: bool, expert_intermediate: int,
                    top_k: int, shared_intermediate: int = 0) -> float:
    """What one MoE layer (lean attention, transformers' MoE block) keeps per token, in hidden-widths: the attention's
    as on lean layers (lean_layer_widths), and for each of the top_k experts a token goes to its copy of the input, its
    gate and up, their product and its output; a shared expert's gate, up and product (rough, measured in total on
    Qwen3-30B-A3B's shape: bench/RESULTS.md s11-1)."""
    x_h_attention = lean_layer_widths(hidden, 0, heads, kv_heads, head_dim, qk_norm)[0]
    routed = top_k * (3 * expert_intermediate + 2 * hidden) / hidden
    return x_h_attention + routed + 3 * shared_intermediate / hidden


MERGED_KEPT, MERGED_TRANSIENT = 0.25, 11  # in merged-expert sizes (bf16 bytes of a layer's expert weights), measured:
# s11-2, Qwen3-30B-A3B's shape, 12 layers: 34.72 GiB reserved with no layer checkpointed, 29.38 with all of them


def moe_activation_bytes(layers: int, width: float, unit: float, merged: float, checkpointed: int) -> float:
    """Saved activations of an MoE model's layers with `checkpointed` of them recomputed in backward (unit: one
    hidden-width of one layer, hidden x element size x tokens; merged: the bf16 bytes of one layer's expert weights
    that carry LoRA). PEFT merges LoRA into the experts' weights on every forward, in float32 for a bf16 model, and
    backward makes their gradient the same way: while one layer runs forward or backward, about MERGED_TRANSIENT
    times its expert weights are there at once, whatever is checkpointed; a layer not recomputed keeps a little."""
    full = width * unit + MERGED_KEPT * merged
    kept = (layers - checkpointed) * full + checkpointed * unit + (full if checkpointed else 0)
    return kept + MERGED_TRANSIENT * merged + MARGIN_WIDTH * unit


def moe_figures(model, elt: int) -> tuple[float, float] | None:
    """(moe_layer_width, merged expert bytes a layer) of a model with MoE layers, else None. The merged bytes are
    those PEFT's own forward merges (moe_lora.use_lean_experts leaves none)."""
    cfg = model.config
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    if not experts or not getattr(cfg, "moe_intermediate_size", None):
        return None
    heads = cfg.num_attention_heads
    width = moe_layer_width(cfg.hidden_size, heads, cfg.num_key_value_heads,
                            getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                            getattr(cfg, "model_type", "") in QK_NORM, cfg.moe_intermediate_size,
                            cfg.num_experts_per_tok, getattr(cfg, "shared_expert_intermediate_size", 0) or 0)
    wrapped = sum(m.get_base_layer().get_parameter(m.parameter_name).numel() for m in model.modules()
                  if type(m).__name__ == "ParamWrapper" and not hasattr(m, "_tunesmith_peft_forward"))  # PEFT's LoRA
    # on 3-D expert weights, merged on every forward (moe_lora's lean forward merges nothing)
    return width, wrapped * elt / cfg.num_hidden_layers


def usable_for_activations(model, reserve: int = 0, budget: int | None = None) -> float:
    """GPU bytes left for activations: `budget` in all less what is allocated now, else 85% of what is free,
    less `reserve` (the loss) and the adapter's gradients and AdamW states (12 bytes a trainable parameter)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if budget is None:
        return (torch.cuda.mem_get_info()[0] - reserve - 12 * trainable) * 0.85
    return budget - torch.cuda.memory_allocated() - reserve - 12 * trainable


def plan_checkpointing(model, tokens: int | None, liger: bool, lean: bool = False, reserve: int = 0,
                       budget: int | None = None) -> float:
    """The smallest share of layers to checkpoint so that the activations of the largest forward
    pass fit: in `budget` bytes of GPU memory in all, or else in 85% of what is free now, less
    `reserve` bytes (the loss's logits: planner.loss_bytes) and the adapter's gradients and AdamW
    states (checkpointing costs a second forward of those layers)."""
    if not tokens or not torch.cuda.is_available():
        return 1.0
    cfg = model.config
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    elt = next(model.parameters()).element_size()
    free = usable_for_activations(model, reserve, budget)
    quantized = bool(getattr(cfg, "quantization_config", None))
    moe = None if quantized else moe_figures(model, elt)
    if moe:
        def need_of(k):
            return moe_activation_bytes(layers, moe[0], hidden * elt * tokens, moe[1], k)
        k = next((k for k in range(layers + 1) if need_of(k) <= free), layers)
        need = need_of(k)
    else:
        k = fewest_checkpointed(layers, hidden, elt, tokens, liger, lean, free, quantized)
        need = activation_bytes(layers, hidden, elt, tokens, k, liger, lean, quantized)
    if need <= free:
        log(f"activations of {tokens} tokens need ~{need / 2**30:.1f} GiB with {k} of {layers} layers "
            f"checkpointed ({free / 2**30:.1f} GiB usable)")
    return k / layers


def lean_layer_widths(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int, qk_norm: bool = False,
                      gemma: bool = False):
    """What one lean decoder layer (decoder_layer.py) keeps per token, in hidden-widths: (with nothing
    recomputed, less per recompute level, transient while one layer runs backward). Per-head q/k norms
    (qk_norm: Qwen3, Gemma 3) keep q and k once more, before the norm. Gemma's norms after attention and
    after the MLP keep their inputs (2 more); its norms and GeGLU run in torch, whose float32 and
    intermediate-wide temporaries add to the transient (rough: 2 intermediate-widths and 4 hidden-widths).
    Phi-3's fused projections keep what separate ones keep (they run as row blocks)."""
    attention = (2 * heads * head_dim + 2 * kv_heads * head_dim) / hidden  # q and the output, k and v
    attention += (heads + kv_heads) * head_dim / hidden if qk_norm else 0
    mlp = intermediate / hidden  # gate or up
    full = 2 + attention + 2 * mlp + (2 if gemma else 0)  # + x and h
    transient = 3 * mlp + 4 + (2 * mlp + 4 if gemma else 0)  # the product, its gradient, a recompute
    return full, mlp, transient


def family_widths(model_type: str, hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int):
    """lean_layer_widths for a family's lean layers (OLMo 2's and GLM-4's two norms after attention and MLP keep their
    inputs, as Gemma's; their SwiGLU is the Triton one, so the transient is Llama's, less rough for OLMo 2's torch
    norms)."""
    gemma = model_type in ("gemma2", "gemma3_text")
    full, mlp, transient = lean_layer_widths(hidden, intermediate, heads, kv_heads, head_dim, gemma=gemma,
                                             qk_norm=model_type in QK_NORM)
    return (full + 2 if model_type in ("olmo2", "glm4") else full), mlp, transient


def lean_activation_bytes(widths: tuple, unit: float, levels: list[int], checkpointed: set) -> float:
    """Saved activations of lean layers at these recompute levels with these layers checkpointed (a
    checkpointed layer keeps its input; one at a time is recomputed, at level 2); unit = one hidden-width
    of one layer (hidden x element size x tokens)."""
    full, mlp, transient = widths
    kept = sum(full - lv * mlp for i, lv in enumerate(levels) if i not in checkpointed)
    kept += len(checkpointed) + ((full - 2 * mlp) if checkpointed else 0)
    return (kept + transient) * unit


def choose_recompute(layers: int, widths: tuple, unit: float, free: float) -> tuple[list[int], set]:
    """The least recompute whose activations fit `free` bytes, cheapest first: `up` recomputed layer by
    layer (one matmul each), then `gate` too, then whole layers checkpointed (all of them if nothing fits)."""
    def spread(k):
        return {round(i * layers / k) for i in range(k)} if k else set()

    plans = []
    for u in range(2 * layers + 1):
        ones, twos = (spread(u), set()) if u <= layers else (set(range(layers)), spread(u - layers))
        plans.append(([2 if i in twos else 1 if i in ones else 0 for i in range(layers)], set()))
    plans += [([2] * layers, spread(k)) for k in range(1, layers + 1)]
    return next((p for p in plans if lean_activation_bytes(widths, unit, *p) <= free), plans[-1])


def config_widths(config) -> tuple:
    heads = config.num_attention_heads
    return family_widths(getattr(config, "model_type", ""), config.hidden_size, config.intermediate_size, heads,
                         config.num_key_value_heads, getattr(config, "head_dim", None) or config.hidden_size // heads)


def plan_memory(model, tokens: int | None, reserve: int = 0, budget: int | None = None) -> tuple[list[int], int]:
    """For a model on lean decoder layers: the least recompute that fits the activations of `tokens`
    tokens in `budget` bytes in all (else 85% of what is free now), less `reserve` (the loss) and the
    adapter's gradients and AdamW states. Returns (recompute level per layer, how many layers to checkpoint)."""
    n = len(decoder_layers(model))
    if not tokens or not torch.cuda.is_available():
        return [0] * n, 0
    elt = next(model.parameters()).element_size()
    free = usable_for_activations(model, reserve, budget)
    widths, unit = config_widths(model.config), model.config.hidden_size * elt * tokens
    levels, checkpointed = choose_recompute(n, widths, unit, free)
    need = lean_activation_bytes(widths, unit, levels, checkpointed)
    if need <= free:
        log(f"activations of {tokens} tokens need ~{need / 2**30:.1f} GiB ({free / 2**30:.1f} GiB usable): up "
            f"recomputed in {sum(lv >= 1 for lv in levels)} layers, gate in {sum(lv == 2 for lv in levels)}, "
            f"{len(checkpointed)} of {n} layers checkpointed")
    return levels, len(checkpointed)
