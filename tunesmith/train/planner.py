"""Peak GPU memory of a training run, from config.json alone (`sft --dry_run`, and the check before loading).

    weights        base parameters (bf16, or 4/8-bit with QLoRA; a per-GPU shard with --fsdp)
    adapter        LoRA weights, gradients and AdamW's two moments, all float32 (16 bytes a parameter)
    activations    what backward needs, per token and layer (activation_memory.activation_bytes: measured widths;
                   on lean decoder layers activation_memory.lean_activation_bytes, with sft's recompute plan)
    loss           one chunk of float32 logits and their gradient (fused_loss.chunked_cross_entropy)
    context        CUDA context, kernels and library workspaces, outside PyTorch's allocator

Decoder architectures (Qwen2/3, Llama, Mistral, Gemma, ...): attention with grouped KV heads and a gated MLP, or
an MoE block of gated experts (Qwen2-MoE, Qwen3-MoE: activation_memory.moe_activation_bytes). Checked against
measured peaks on an H100 (bench/gpu_scale.sh) and an H200 (Qwen3-30B-A3B, bench/RESULTS.md s11-1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..console import log

GiB = 2**30
CONTEXT = 0.75 * GiB  # CUDA context + cuBLAS/flash workspaces; not counted by torch's allocator
ALLOCATOR_SLACK = 1.03  # reserved / allocated with expandable segments
ADAPTER_BYTES = 4 + 4 + 8  # float32 weight, gradient, AdamW exp_avg + exp_avg_sq
CARDS = [("24 GB (RTX 4090, A10)", 24e9), ("40 GB (A100 40G)", 40e9), ("80 GB (A100/H100 80G)", 80e9)]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class Shape:
    """What memory depends on, read from config.json."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    model_type: str = ""
    experts: int = 0  # MoE: experts per MoE layer, each of expert_intermediate, top_k of them per token; a shared
    expert_intermediate: int = 0  # expert of shared_intermediate (Qwen2-MoE); moe_layers of the layers are MoE
    top_k: int = 0
    shared_intermediate: int = 0
    moe_layers: int = 0

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection in one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_linear_params(self) -> int:
        """The largest layer's projections (an MoE layer's: attention and its MoE block)."""
        dense = sum(a * b for a, b in self.linears().values())
        return dense - self._mlp_params + self.moe_block_params if self.moe_layers else dense

    @property
    def _mlp_params(self) -> int:
        return sum(a * b for n, (a, b) in self.linears().items() if n in MLP)

    @property
    def expert_params(self) -> int:
        """The routed experts' gate, up and down of one MoE layer (3-D weights, PEFT merges LoRA into them)."""
        return self.experts * 3 * self.hidden * self.expert_intermediate

    @property
    def moe_block_params(self) -> int:
        """One MoE block: the experts, the router, a shared expert and its one-output gate (Qwen2-MoE)."""
        shared = (3 * self.shared_intermediate + 1) * self.hidden if self.shared_intermediate else 0
        return self.expert_params + self.experts * self.hidden + shared

    @property
    def all_linear_params(self) -> int:
        """Every layer's projections: dense layers' MLPs, MoE layers' blocks."""
        dense = sum(a * b for a, b in self.linears().values())
        return (self.layers * (dense - self._mlp_params) + (self.layers - self.moe_layers) * self._mlp_params
                + self.moe_layers * self.moe_block_params)

    @property
    def outer_params(self) -> int:
        """Parameters outside the decoder layers: embeddings, output layer, final norm."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def layer_other_params(self) -> int:
        """Norms and biases of one layer (never quantized)."""
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return 2 * self.hidden + bias

    @property
    def params(self) -> int:
        return self.outer_params + self.all_linear_params + self.layers * self.layer_other_params

    def lora_params(self, rank: int, targets) -> int:
        """LoRA's parameters on these targets. all-linear on an MoE layer: attention, each expert's gate and up (one
        3-D weight at twice the rank) and down, the shared expert; not the router nor the shared expert's gate."""
        names = LINEARS if "all-linear" in targets else [t for t in targets if t in LINEARS]
        per = {n: rank * (a + b) for n, (a, b) in self.linears().items() if n in names}
        mlp = sum(v for n, v in per.items() if n in MLP)
        n = self.layers * (sum(per.values()) - mlp) + (self.layers - self.moe_layers) * mlp
        if self.moe_layers and "all-linear" in targets:
            h, i, s = self.hidden, self.expert_intermediate, self.shared_intermediate
            n += self.moe_layers * (self.experts * rank * (2 * (h + 2 * i) + (i + h)) + 3 * rank * (h + s) * bool(s))
        return n


def read_shape(model_path: Path) -> Shape:
    path = Path(model_path) / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        cfg = cfg.get("text_config", cfg)
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
        step, dense = cfg.get("decoder_sparse_step") or 1, set(cfg.get("mlp_only_layers") or ())
        moe_layers = sum(i not in dense and (i + 1) % step == 0 for i in range(cfg["num_hidden_layers"])) if experts else 0
        return Shape(hidden=hidden, intermediate=cfg["intermediate_size"], layers=cfg["num_hidden_layers"], heads=heads,
                     kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=cfg.get("head_dim") or hidden // heads,
                     vocab=cfg["vocab_size"], tied=bool(cfg.get("tie_word_embeddings", False)),
                     qkv_bias=cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias", False)),
                     model_type=cfg.get("model_type", ""), experts=experts,
                     expert_intermediate=cfg.get("moe_intermediate_size") or 0, top_k=cfg.get("num_experts_per_tok") or 0,
                     shared_intermediate=cfg.get("shared_expert_intermediate_size") or 0, moe_layers=moe_layers)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: cannot plan memory for this model ({type(e).__name__}: {e})") from None


@dataclass
class Settings:
    """The run's choices that move memory."""

    tokens: int  # longest packed row (or micro-batch) of one forward pass
    loss_tokens: int  # answer tokens in it (the loss is computed only there)
    checkpointed: int | None  # layers recomputed in backward; None: sft's automatic choice
    quant_bits: int | None = None
    world: int = 1
    fsdp: bool = False
    lora_rank: int = 8
    targets: tuple[str, ...] = ("all-linear",)
    elt: int = 2  # bytes per weight/activation element (bf16)
    liger: bool = True
    lean: bool = True  # lean LoRA (engine/lora_linear.py): no stored dropout copies, SwiGLU product recomputed
    lean_layers: bool = False  # lean decoder layers (lean_layer.py): llama/qwen2-style layers, all-linear LoRA


def estimate(shape: Shape, s: Settings, card: float | None = None) -> dict:
    """Bytes per GPU by component, and `total` (what the card must hold). `card` (free bytes) lets
    `checkpointed=None` pick the layers as `sft` will (activation_memory.fewest_checkpointed)."""
    from ..engine import activation_memory

    linear = shape.all_linear_params
    other = shape.layers * shape.layer_other_params + shape.outer_params
    if s.quant_bits == 4:  # nf4 + double quantization: 8-bit absmax per 64 weights, fp32 per 256 blocks
        weights = linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + other * s.elt
        weights += max(a * b for a, b in shape.linears().values()) * s.elt  # one weight dequantized at a time
    elif s.quant_bits == 8:
        weights = linear * (1 + 4 / 4096) + other * s.elt + max(a * b for a, b in shape.linears().values()) * s.elt
    else:
        weights = (linear + other) * s.elt
    lora_params = shape.lora_params(s.lora_rank, s.targets)
    adapter = lora_params * ADAPTER_BYTES
    if s.fsdp and s.world > 1:  # layers sharded; two of them whole at a time (the one computing, the next)
        layer_bytes = shape.layer_linear_params * s.elt
        weights = (linear * s.elt) / s.world + 2 * layer_bytes + shape.outer_params * s.elt * (1 + 1 / s.world)
        adapter = adapter / s.world
    loss = loss_bytes(shape.vocab, shape.hidden, s.loss_tokens, s.elt)
    checkpointed = s.checkpointed
    if shape.moe_layers and not s.quant_bits:  # lean attention, transformers' MoE blocks (activation_memory.plan_checkpointing)
        width = activation_memory.moe_layer_width(shape.hidden, shape.heads, shape.kv_heads, shape.head_dim,
                                                  shape.model_type in activation_memory.QK_NORM, shape.expert_intermediate, shape.top_k,
                                                  shape.shared_intermediate)
        unit = shape.hidden * s.elt * s.tokens
        peft_merges = "all-linear" in s.targets and not s.lean  # (lean LoRA: engine/moe_lora.py merges nothing)
        merged = shape.expert_params * s.elt * shape.moe_layers / shape.layers if peft_merges else 0
        if checkpointed is None:
            free = (card if card is not None else 80e9) - (weights + adapter) * ALLOCATOR_SLACK - CONTEXT
            checkpointed = next((k for k in range(shape.layers + 1) if activation_memory.moe_activation_bytes(
                shape.layers, width, unit, merged, k) <= 0.85 * (free - loss)), shape.layers)
        activations = activation_memory.moe_activation_bytes(shape.layers, width, unit, merged, checkpointed)
    elif s.lean_layers and not s.quant_bits:  # as sft plans it on lean layers (activation_memory.plan_memory)
        widths = activation_memory.family_widths(shape.model_type, shape.hidden, shape.intermediate, shape.heads,
                                                 shape.kv_heads, shape.head_dim)
        unit = shape.hidden * s.elt * s.tokens
        if checkpointed is None:
            free = (card if card is not None else 80e9) - (weights + adapter) * ALLOCATOR_SLACK - CONTEXT
            levels, chosen = activation_memory.choose_recompute(shape.layers, widths, unit, 0.85 * (free - loss))
        else:  # checkpointing asked for: the first `checkpointed` layers as spread by checkpointing.checkpoint_layers
            chosen = {round(i * shape.layers / checkpointed) for i in range(checkpointed)} if checkpointed else set()
            levels = [2 if chosen else 0] * shape.layers
        activations = activation_memory.lean_activation_bytes(widths, unit, levels, chosen)
        checkpointed = len(chosen)
    elif checkpointed is None:  # as sft plans it once the weights are on the GPU (activation_memory.plan_checkpointing)
        free = (card if card is not None else 80e9) - (weights + adapter) * ALLOCATOR_SLACK - CONTEXT
        checkpointed = activation_memory.fewest_checkpointed(shape.layers, shape.hidden, s.elt, s.tokens, s.liger, s.lean,
                                                0.85 * (free - loss), bool(s.quant_bits))
    if not ((s.lean_layers or shape.moe_layers) and not s.quant_bits):
        activations = activation_memory.activation_bytes(shape.layers, shape.hidden, s.elt, s.tokens, checkpointed, s.liger, s.lean,
                                            bool(s.quant_bits))
    allocated = weights + adapter + activations + loss
    total = allocated * ALLOCATOR_SLACK + CONTEXT
    return {"weights": weights, "adapter": adapter, "activations": activations, "loss": loss, "allocated": allocated,
            "total": total, "checkpointed": checkpointed, "lora_params": lora_params, "params": shape.params}


def loss_bytes(vocab: int, hidden: int, loss_tokens: int, elt: int) -> int:
    """The loss at answer positions (fused_loss.linear_cross_entropy): one chunk of float32 logits (and
    its half-precision softmax gradient) at a time, plus the gathered hidden states and their gradient."""
    from ..engine import fused_loss

    rows = min(max(1, loss_tokens), fused_loss.loss_chunk_rows(vocab))
    return (4 + elt) * rows * vocab + 2 * loss_tokens * hidden * elt


def settings_for(args, shape: Shape, tokens: int, world: int = 1) -> Settings:
    """The settings of `sft` ARGS on a GPU, for forward passes of `tokens` tokens, all of them answer
    tokens (the worst case: the loss's logits grow with answer tokens)."""
    import importlib.util

    from ..engine.decoder_layer import MOE, PER_LAYER  # (layers that may fall back one by one, MoE blocks of
    # transformers' own: counted as transformers' layers, an upper bound)

    share = args.gradient_checkpointing
    lean_layers = lean_layers_apply(args, shape.model_type)
    moe = lean_layers and shape.model_type in MOE  # (lean attention: sft applies no Liger kernels to the MoE blocks)
    return Settings(tokens=tokens, loss_tokens=tokens, checkpointed=None if share is None else round(share * shape.layers),
                    quant_bits=args.quant_bits if args.quant_method else None, world=world,
                    fsdp=bool(args.fsdp) and world > 1, lora_rank=args.lora_rank, targets=tuple(args.target_modules),
                    elt=4 if str(args.torch_dtype) in ("float32", "fp32") else 2,
                    liger=args.use_liger and importlib.util.find_spec("liger_kernel") is not None and not moe,
                    lean=args.lean_lora and not args.quant_method,  # lean LoRA needs a plain (unquantized) base
                    lean_layers=lean_layers and shape.model_type not in PER_LAYER + MOE)


def lean_layers_apply(args, model_type: str) -> bool:
    """Whether `sft` ARGS run a model of this type on lean decoder layers (train.prepare_model decides the same)."""
    from ..engine.decoder_layer import ARCHITECTURES

    return bool(args.lean_lora and args.packing_window and not args.quant_method
                and list(args.target_modules) == ["all-linear"] and model_type in ARCHITECTURES)


def _with(s: Settings, **changes) -> Settings:
    return Settings(**{**s.__dict__, **changes})


def longest_fitting(shape: Shape, s: Settings, card: float) -> int:
    """The most tokens per forward pass (all of them answer tokens) that fit `card` bytes; 0 if none."""
    def fits(n):
        return estimate(shape, _with(s, tokens=n, loss_tokens=n), card)["total"] <= card

    lo, hi = 0, 1 << 22
    while hi - lo > 64:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo // 64 * 64


def detected_card() -> tuple[str, float, float] | None:
    """(name, total bytes, free bytes) of this process's GPU, or None without one."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info()
        return torch.cuda.get_device_name(), float(total), float(free)
    except Exception:
        return None


def _gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def dry_run(args, world: int = 1) -> int:
    """`sft --dry_run`: the table of memory per GPU, and what fits the detected card (or common ones)."""
    from ..model.resolve import resolve_model

    if world == 1:
        from .distributed import requested_world

        world = requested_world()
    path = resolve_model(args.model).path
    shape = read_shape(path)
    card = detected_card()
    tokens = max(args.max_length, args.per_device_train_batch_size * args.max_length) if args.packing_window \
        else args.per_device_train_batch_size * args.max_length
    base = settings_for(args, shape, tokens, world)
    columns = [("no checkpointing", _with(base, checkpointed=0)), ("checkpointing", _with(base, checkpointed=shape.layers))]
    if base.quant_bits is None:
        columns.append(("QLoRA nf4 + ckpt", _with(base, checkpointed=shape.layers, quant_bits=4)))
    est = [estimate(shape, c) for _, c in columns]
    quant = f", base in {base.quant_bits} bits (bitsandbytes)" if base.quant_bits else ""
    gpus = f", {world} GPUs {'sharded (FSDP2)' if base.fsdp else 'data parallel'}" if world > 1 else ""
    print(f"memory plan for {Path(path).name}: {shape.params / 1e9:.2f} B parameters, {shape.layers} layers, "
          f"{'bf16' if base.elt == 2 else 'float32'}{quant}{gpus}"
          f"{', lean decoder layers' if base.lean_layers else ', Liger kernels' if base.liger else ''}; "
          f"LoRA r={args.lora_rank} on {' '.join(args.target_modules)}: {est[0]['lora_params'] / 1e6:.1f} M trainable; "
          f"{tokens}-token forward passes (--max_length {args.max_length} x batch {args.per_device_train_batch_size})")
    rows = [("weights", "weights"), ("LoRA + gradients + AdamW", "adapter"), ("activations", "activations"),
            ("loss (logits chunk)", "loss"), ("total per GPU (+ CUDA context)", "total")]
    width = max(len(n) for n, _ in columns) + 2
    print(f"{'GiB per GPU':32s}" + "".join(f"{n:>{width}s}" for n, _ in columns))
    for label, key in rows:
        print(f"{label:32s}" + "".join(f"{_gib(e[key]):>{width}s}" for e in est))
    if card:
        cards = [(f"this GPU, {card[0]} ({_gib(card[2])} of {_gib(card[1])} GiB free)", card[2])]
    else:
        cards = CARDS
        print("no CUDA GPU here: planned for GPUs in bf16")
    for name, free in cards:
        run = estimate(shape, base, free)
        how = f"{run['checkpointed']} of {shape.layers} layers checkpointed" + (" (auto)" if base.checkpointed is None else "")
        longest = longest_fitting(shape, _with(base, checkpointed=shape.layers if base.checkpointed is None else base.checkpointed), free)
        batch = longest // args.max_length
        fits = run["total"] <= free
        print(f"{name}: {'fits' if fits else 'does NOT fit'}, {_gib(run['total'])} GiB with {how}; longest forward pass "
              f"{longest} tokens (--max_length {longest} at batch 1"
              + (f", or --per_device_train_batch_size {batch} at --max_length {args.max_length})" if batch >= 2 else ")"))
        if not fits:
            print("  " + suggestions(shape, base, free))
    return 0


def suggestions(shape: Shape, s: Settings, free: float) -> str:
    """Settings that would fit `free` bytes, cheapest change first."""
    tips = []
    full = _with(s, checkpointed=shape.layers)
    if s.checkpointed != shape.layers and estimate(shape, full, free)["total"] <= free:
        tips.append("--gradient_checkpointing true")
    if s.quant_bits is None and estimate(shape, _with(full, quant_bits=4), free)["total"] <= free:
        tips.append("--quant_method bnb --quant_bits 4 (QLoRA)")
    longest = longest_fitting(shape, full, free)
    if longest >= 256:
        tips.append(f"--max_length {longest} with checkpointing")
    for n in (2, 4, 8):
        if s.quant_bits is None and estimate(shape, _with(full, world=n, fsdp=True), free)["total"] <= free:
            tips.append(f"NPROC_PER_NODE={n} --fsdp true")
            break
    return "would fit with: " + ("; or ".join(tips) if tips else "none of our settings; a GPU with more memory")


def check_fits(args, model_path: Path, longest_row: int, device: str, world: int) -> None:
    """Before any weights load: refuse a run whose estimate exceeds the GPU's free memory, saying what fits.
    Conservative in one way only: every token of the longest forward pass is counted as an answer token."""
    if not device.startswith("cuda"):
        return
    from ..model import preload

    staged = preload.staged_bytes()  # weights already copied to the GPU count as free: they are the model's
    card = detected_card()
    if card is None:
        return
    card = (card[0], card[1], card[2] + staged)
    shape = read_shape(model_path)
    s = settings_for(args, shape, longest_row, world)
    est = estimate(shape, s, card[2])
    if est["total"] <= card[2]:
        log(f"memory plan: ~{_gib(est['total'])} GiB per GPU at most ({longest_row}-token forward passes; "
            f"{card[0]} has {_gib(card[2])} GiB free)")
        return
    raise UserError(
        f"this run needs ~{_gib(est['total'])} GiB per GPU ({longest_row}-token forward passes; weights "
        f"{_gib(est['weights'])}, activations {_gib(est['activations'])} with {est['checkpointed']} of {shape.layers} "
        f"layers checkpointed, loss {_gib(est['loss'])}) but {card[0]} has {_gib(card[2])} GiB free; "
        + suggestions(shape, s, card[2]) + " (see `tunesmith sft ... --dry_run`)")
