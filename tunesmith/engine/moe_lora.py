"""LoRA on an MoE's experts without merging it into their weights (Qwen3-MoE, Qwen2-MoE).

PEFT adapts the experts' 3-D weights (gate_up_proj, down_proj) by adding scaling * lhs @ rhs to the whole expert
stack on every forward, in float32 for a bf16 model, and backward builds the stack's gradient the same way: about 11
times a layer's expert weights at once, and most of an MoE step's memory traffic (bench/RESULTS.md s11-2). Here each
token's experts apply the base weight and the two low-rank factors instead,

    x W_e^T + scaling * (x rhs_e^T) lhs_e^T        (PEFT's ParamWrapper.get_delta_factors: delta_e = scaling lhs_e rhs_e)

with the tokens sorted by expert and one grouped matmul over all experts (torch's grouped_mm, bf16), or one expert at
a time where grouped_mm does not apply (float32, the CPU's test models). The adapter stays PEFT's own (the same
parameters, the same files); routing stays transformers' (the MoE block calls experts(x, top_k_index, top_k_weights)).
"""

from __future__ import annotations

import functools

import torch


def use_lean_experts(model) -> int:
    """Swap in the lean forward on each PEFT-wrapped experts module of a supported layout; returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        chain = _chain(module)
        if not chain or hasattr(module, "_tunesmith_peft_forward") or _is_inner(model, name):
            continue
        for wrapper in chain[:-1]:
            wrapper._tunesmith_peft_forward = wrapper.forward
        module.forward = functools.partial(experts_forward, module)
        count += 1
    return count


def _chain(module) -> list | None:
    """[outer ParamWrapper, ..., the experts module] when `module` is PEFT's LoRA on a gated experts stack laid out as
    transformers' Qwen MoEs lay it out (E x out x in, no biases) and only on its gate_up_proj / down_proj; else None."""
    chain = [module]
    while type(chain[-1]).__name__ == "ParamWrapper":
        chain.append(chain[-1].base_layer)
    experts = chain[-1]
    if len(chain) < 2 or not all(w.parameter_name in ("gate_up_proj", "down_proj") for w in chain[:-1]):
        return None
    gated = isinstance(getattr(experts, "gate_up_proj", None), torch.nn.Parameter) and experts.gate_up_proj.dim() == 3
    plain = not getattr(experts, "is_transposed", False) and not getattr(experts, "has_bias", False)
    return chain if gated and plain and getattr(experts, "has_gate", True) and hasattr(experts, "act_fn") else None


def _is_inner(model, name: str) -> bool:
    """A ParamWrapper wrapped by another one (only the outermost is called)."""
    parent, _, child = name.rpartition(".")
    return child == "base_layer" and type(model.get_submodule(parent)).__name__ == "ParamWrapper"


def _factors(wrapper):
    """(lhs, rhs, scaling) of the wrapper's one active adapter; None when LoRA is off here (adapters disabled, as for
    rlhf's reference pass, or merged into the weights)."""
    if wrapper is None or wrapper.disable_adapters or wrapper.merged:
        return None
    adapters = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
    if not adapters:
        return None
    if len(adapters) > 1:
        raise NotImplementedError("lean expert LoRA takes one active adapter")
    return wrapper.get_delta_factors(adapters[0])


def experts_forward(outer, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """The experts' output for each token: the sum over its top-k experts of weight x expert(token)."""
    chain = _chain(outer)
    experts, wrappers = chain[-1], {w.parameter_name: w for w in chain[:-1]}
    k, n_experts = top_k_index.shape[-1], experts.num_experts
    chosen = top_k_index.reshape(-1)
    chosen_sorted, order = torch.sort(chosen, stable=True)
    token = order // k  # the token of each (token, expert) pair, pairs grouped by expert
    counts = torch.histc(chosen_sorted.float() if chosen.device.type == "cpu" else chosen_sorted.int(),
                         bins=n_experts, min=0, max=n_experts - 1)
    x = hidden_states[token]
    gate_up = project(x, experts.gate_up_proj, _factors(wrappers.get("gate_up_proj")), counts)
    gate, up = gate_up.chunk(2, dim=-1)
    out = project(experts.act_fn(gate) * up, experts.down_proj, _factors(wrappers.get("down_proj")), counts)
    out = out * top_k_weights.reshape(-1)[order, None].to(out.dtype)
    return torch.zeros_like(hidden_states).index_add_(0, token, out.to(hidden_states.dtype))


def project(x: torch.Tensor, weight: torch.Tensor, factors, counts: torch.Tensor) -> torch.Tensor:
    """x's rows, grouped by expert (`counts` rows each), through their expert's weight (E x out x in) and LoRA."""
    if _grouped(x, weight, factors):
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        out = _grouped_mm(x, weight.transpose(-1, -2), offsets)
        if factors is not None:
            lhs, rhs, scaling = factors
            low = _grouped_mm(x, rhs.transpose(-1, -2).contiguous(), offsets)
            out = out + scaling * _grouped_mm(low, lhs.transpose(-1, -2).contiguous(), offsets)
        return out
    pieces = []
    for e, rows in enumerate(x.split([int(c) for c in counts.tolist()])):
        y = rows @ weight[e].T
        if factors is not None:
            lhs, rhs, scaling = factors
            y = y + scaling * ((rows @ rhs[e].T) @ lhs[e].T)
        pieces.append(y)
    return torch.cat(pieces)


def _grouped(x, weight, factors) -> bool:
    """grouped_mm takes bf16 operands whose rows are 16-byte multiples (8 elements)."""
    if not hasattr(torch.nn.functional, "grouped_mm") and not hasattr(torch, "_grouped_mm"):
        return False
    dims = [weight.shape[-1], weight.shape[-2]] + ([factors[1].shape[-2]] if factors is not None else [])
    return x.dtype == weight.dtype == torch.bfloat16 and all(d % 8 == 0 for d in dims)


def _grouped_mm(a, b, offsets):
    f = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return f(a, b, offs=offsets)
