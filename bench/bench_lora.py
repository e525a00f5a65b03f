"""LoRA training speed: tunesmith's fast path against transformers + PEFT, in one run, on one GPU.

    python bench/bench_lora.py [--layers 28] [--seq 2048] [--steps 10] [--out results.json]

Model: the Qwen2.5-7B-Instruct architecture with initialised random weights (no hub here), bf16,
LoRA r8/alpha32 on all linear layers, AdamW. Data: variable-length chat-like samples (prompt
without loss, answer with loss) packed to --seq tokens. Every engine sees the same tokens.

Engines
  hf_gc      transformers + PEFT, gradient checkpointing, full-logits loss (the ms-swift default)
  hf         the same without checkpointing
  ts_*       tunesmith: packed per-sample attention, Liger kernels when installed, lean LoRA
             projections, loss only at answer positions through a fused linear+cross-entropy;
             *_gc1 / _gc05 / _gc0 = share of layers with activation checkpointing; ts_fit = the
             share tunesmith plans so that its peak memory stays within hf_gc's measured peak
  tsplain_*  tunesmith with PEFT's own LoRA layers (--lean_lora false), to show what lean LoRA gives
  tsgraph_*  tunesmith with each packed row's forward+backward replayed from a CUDA graph
Also: per-step loss of tunesmith vs hf over 20 steps (dropout 0, same adapter init, same data),
the longest trainable sequence, and the guide's run (8 records x 10 epochs, accumulation 16).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as `tunesmith sft` sets it

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tunesmith.args import SftArguments  # noqa: E402
from tunesmith.data.template import IGNORE, Encoded  # noqa: E402
from tunesmith.train.recipe import add_lora, build_optimizer, prepare_model  # noqa: E402
from tunesmith.train.batches import loss_of, micro_batches

from make_qwen7b import SHAPES  # noqa: E402

GiB = 2**30


def _old_project(y, h, weight, bias, b, scale, i, rank):
    """A/B (BENCH_AB=1): the r-wide term added after the frozen matmul, as before session 16."""
    import torch.nn.functional as F

    out = F.linear(y, weight, None if bias is None else bias.to(weight.dtype))
    return out.addmm_(h[:, i * rank:(i + 1) * rank], b.to(weight.dtype).t(), alpha=scale)


def build_model(layers: int, family: str = "qwen2"):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(SHAPES[family], num_hidden_layers=layers, **({"max_window_layers": layers} if family == "qwen2" else {}))
    cfg = AutoConfig.for_model(shape.pop("model_type"), **shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    std = model.model.layers[0].mlp.up_proj.weight.float().std().item()
    assert 0.005 < std < 0.1, f"weights look uninitialised (std {std})"
    return model


def chat_samples(total: int, seed: int, mean_len: int = 300) -> list[Encoded]:
    """Variable-length samples that fill exactly `total` tokens; ~40% prompt, ~60% answer."""
    g = torch.Generator().manual_seed(seed)
    out, used = [], 0
    while used < total:
        n = int(min(max(16, torch.empty(1).log_normal_(math.log(mean_len), 0.6, generator=g).item()), total - used))
        if total - used - n < 16:
            n = total - used
        ids = torch.randint(100, 150000, (n,), generator=g).tolist()
        cut = max(1, int(n * 0.4))
        out.append(Encoded(ids, [IGNORE] * cut + ids[cut:]))
        used += n
    return out


def hf_batch(samples: list[Encoded], packed_positions: bool):
    """One row for transformers: labels unshifted (the model shifts); a sample's first token has no
    label, so no position learns across a sample boundary."""
    ids = torch.tensor([[t for s in samples for t in s.input_ids]], device="cuda")
    labels = torch.tensor([[x for s in samples for x in ([IGNORE] + s.labels[1:])]], device="cuda")
    batch = {"input_ids": ids, "labels": labels}
    if packed_positions:
        batch["position_ids"] = torch.tensor([[p for s in samples for p in range(len(s.input_ids))]], device="cuda")
    return batch


def lora_args(**kw) -> SftArguments:
    return SftArguments(dataset=["bench"], lora_rank=8, lora_alpha=32, lora_dropout=kw.pop("dropout", 0.05),
                        learning_rate=1e-4, max_length=kw.pop("max_length", 2048), **kw)


class Engine:
    """Wraps the shared base model with LoRA for one engine; unwrap() restores the base."""

    def __init__(self, base, kind: str, share: float | None = 1.0, dropout: float = 0.05, max_length: int = 2048,
                 budget: int | None = None):
        self.kind = kind
        args = lora_args(dropout=dropout, max_length=max_length, gradient_checkpointing=share,
                         lean_lora=kind != "tsplain")
        self.graphed = None
        torch.manual_seed(1234)  # the same adapter init for every engine
        if kind.startswith("hf"):
            base.set_attn_implementation("sdpa")
            self.model = add_lora(base, args)
            if share > 0:
                self.model.gradient_checkpointing_enable()
                self.model.enable_input_require_grads()
        else:
            self.model = prepare_model(base, args, "cuda", longest_row=max_length, memory_budget=budget)
        if kind == "tsgraph":
            from tunesmith.engine.cuda_graphs import GraphedRows, usable

            assert usable(self.model, "cuda"), "CUDA graphs need lean LoRA and Triton"
            self.graphed = GraphedRows(self.model, lambda batch: loss_of(self.model, batch))
            capture = self.graphed._capture

            def logged(shape, *a, **k):  # what each capture adds to the memory the process holds
                out = capture(shape, *a, **k)
                print(f"  captured {shape}: {torch.cuda.memory_allocated() / GiB:.2f} GiB allocated, "
                      f"{torch.cuda.memory_reserved() / GiB:.2f} reserved, peak so far "
                      f"{torch.cuda.max_memory_reserved() / GiB:.2f}", flush=True)
                return out
            self.graphed._capture = logged
        self.args = args
        self.optimizer, self.scheduler = build_optimizer(self.model, args, 1000)
        self.model.train()

    def step(self, samples: list[Encoded], packed_positions: bool = False) -> float:
        if self.kind.startswith("hf"):
            loss = self.model(**hf_batch(samples, packed_positions), use_cache=False).loss
            loss.backward()
            value = loss.detach()
        elif self.graphed is not None and (value := self.graphed.window(
                list(micro_batches(samples, self.args, "cuda")), 1.0 / sum(s.n_trained for s in samples))) is not None:
            pass  # replayed (a row length runs eagerly a few times before it is captured)
        else:
            n = sum(s.n_trained for s in samples)
            value = 0.0
            for micro in micro_batches(samples, self.args, "cuda"):
                loss = loss_of(self.model, micro) / n
                loss.backward()
                value = value + loss.detach()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def unwrap(self, base):
        if getattr(base, "is_gradient_checkpointing", False):
            base.gradient_checkpointing_disable()
        self.model.unload()
        del self.optimizer, self.model
        gc.collect()
        torch.cuda.empty_cache()


def timed(engine: Engine, batches: list[list[Encoded]], warmup: int = 3):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()  # peaks include the warm-up (and a CUDA graph's capture)
    # with CUDA graphs, every batch twice first: a row shape runs eagerly 3 times, then is captured
    for b in batches * 2 if engine.graphed is not None else batches[:warmup]:
        engine.step(b)
    torch.cuda.synchronize()
    times = []
    for b in batches[warmup:]:
        t = time.perf_counter()
        engine.step(b)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), torch.cuda.max_memory_allocated() / GiB, torch.cuda.max_memory_reserved() / GiB


def longest(base, kind: str, share: float, lengths: list[int], deadline: float) -> int:
    best = 0
    for n in lengths:
        if time.time() > deadline:
            break
        engine = Engine(base, kind, share, max_length=n)
        try:
            engine.step(chat_samples(n, seed=n, mean_len=n))
            torch.cuda.synchronize()
            best = n
            print(f"  {kind} share {share}: {n} tokens ok ({torch.cuda.max_memory_allocated() / GiB:.1f} GiB)", flush=True)
        except torch.OutOfMemoryError:
            print(f"  {kind} share {share}: {n} tokens out of memory", flush=True)
            engine.optimizer.zero_grad(set_to_none=True)
            engine.unwrap(base)
            break
        engine.unwrap(base)
        torch.cuda.reset_peak_memory_stats()
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--family", choices=list(SHAPES), default="qwen2", help="another family's 8B-class shape (make_qwen7b.py)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--engines", default="hf_gc,hf,tsgraph_fit,tsgraph_gc0,ts_fit,ts_gc0,tsplain_gc0")
    ap.add_argument("--loss_engines", default="ts,tsgraph")
    ap.add_argument("--long", default="", help="comma list of lengths to probe for ts (hf probes the first half)")
    ap.add_argument("--skip_loss_check", action="store_true")
    ap.add_argument("--skip_guide", action="store_true")
    ap.add_argument("--profile", nargs="?", const="hf_gc0,ts_gc0,tsplain_gc0", default="",
                    help="print kernel and host profiles of one step of these engines")
    ap.add_argument("--out", default="bench_lora.json")
    a = ap.parse_args()
    import transformers

    info = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__}
    import peft

    info["peft"] = peft.__version__
    try:
        import liger_kernel.transformers  # noqa: F401
        from importlib.metadata import version
        info["liger_kernel"] = version("liger-kernel")
    except Exception as e:
        info["liger_kernel"] = f"unavailable: {type(e).__name__}: {e}"
    info["attention"] = "flash (aten._flash_attention_forward, native GQA)"
    print(json.dumps(info), flush=True)
    t0 = time.time()
    base = build_model(a.layers, a.family)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"model: {n_params / 1e9:.2f} B params, built in {time.time() - t0:.0f} s", flush=True)
    batches = [chat_samples(a.seq, seed=i) for i in range(a.steps + 3)]
    results = {"info": info, "seq": a.seq, "engines": {}}
    shares = {"gc1": 1.0, "gc05": 0.5, "gc025": 0.25, "gc0": 0.0, "fit": None}
    engines = a.engines.split(",")
    check = [chat_samples(a.seq, seed=100 + i) for i in range(20)]
    guide = [chat_samples(45, seed=1000 + i, mean_len=45)[0] for i in range(8)]
    lengths = [int(x) for x in a.long.split(",")] if a.long else []
    deadline = time.time() + 300

    def engine_for(name, default_share=1.0):
        """The engine a name asks for: its kind, its share of checkpointed layers (the suffix) and, for *_fit, no
        more activation memory than the baseline with checkpointing (hf_gc's, counted above what is allocated now:
        memory an earlier engine left behind must not shrink a later one's plan)."""
        kind, share = name.split("_")[0], shares.get(name.split("_")[-1], default_share)
        if name == "hf":
            share = 0.0
        budget = None if share is not None else \
            torch.cuda.memory_allocated() + int(results["engines"]["hf_gc"]["activation_gib"] * GiB)
        return Engine(base, kind, share, budget=budget)

    def measure(name, label=None):
        gc.collect()
        torch.cuda.empty_cache()
        static = torch.cuda.memory_allocated()
        engine = engine_for(name)
        s, alloc, reserved = timed(engine, batches)
        layers = [m for m in engine.model.modules() if type(m).__name__.endswith("DecoderLayer")]
        n_ckpt = sum(hasattr(m, "_tunesmith_plain_forward") for m in layers)
        levels = [getattr(m, "_tunesmith_recompute", 0) for m in layers]
        name = label or name
        results["engines"][name] = {"s_per_step": s, "tokens_per_s": a.seq / s, "peak_alloc_gib": alloc,
                                    "peak_reserved_gib": reserved, "checkpointed_layers": n_ckpt,
                                    "activation_gib": alloc - static / GiB}
        print(f"{name:10s} {s:.4f} s/step {a.seq / s:8.0f} tok/s  peak {alloc:.2f} GiB alloc / {reserved:.1f} reserved, "
              f"{alloc - static / GiB:.2f} GiB above the base weights, {n_ckpt} layers checkpointed, recompute levels "
              f"{levels.count(1)}x1 {levels.count(2)}x2", flush=True)
        engine.unwrap(base)

    def loss_run(kind):
        engine = Engine(base, kind, share=0.0, dropout=0.0)
        out = [float(engine.step(b, packed_positions=True)) for b in check]
        engine.unwrap(base)
        return out

    def guide_run(kind):  # the guide: 8 records x 10 epochs, accumulation 16 -> 10 optimizer steps
        # hf_gc: ms-swift's default, checkpointing on; ts: what `tunesmith sft` plans for a 360-token
        # window (no checkpointing: its activations fit many times over)
        engine = Engine(base, kind, share=1.0 if kind == "hf_gc" else 0.0)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for epoch in range(10):
            if kind.startswith("ts"):
                engine.step(guide)  # one packed window
            else:  # batch by batch: 8 forward/backward passes, then one optimizer step
                n = sum(s.n_trained for s in guide)
                for s in guide:
                    out = engine.model(**hf_batch([s], False), use_cache=False)
                    (out.loss * (s.n_trained / n)).backward()
                engine.optimizer.step()
                engine.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        engine.unwrap(base)
        return time.perf_counter() - t

    def profile(name):
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        engine = engine_for(name, default_share=0.0)
        for b in batches * 2 if engine.graphed is not None else batches[:5]:  # (graphs: captured by then)
            engine.step(b)
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
            engine.step(batches[5])
            torch.cuda.synchronize()
        table = p.key_averages().table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=70)
        if os.environ.get("OUT"):  # the whole timeline: chrome://tracing, or bench/kernel_time.py for a breakdown
            trace = os.path.join(os.environ["OUT"], f"trace_{name}.json")
            p.export_chrome_trace(trace)
            subprocess.run(["gzip", "-f", trace], check=False)
        print(f"--- profile of one {name} step ---\n{table}", flush=True)
        table = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
        print(f"--- host time of one {name} step, by operator ---\n{table}", flush=True)
        import cProfile
        import io
        import pstats

        host = cProfile.Profile()
        host.enable()
        engine.step(batches[6])
        torch.cuda.synchronize()
        host.disable()
        text = io.StringIO()
        pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(30)
        print(f"--- Python functions of one {name} step (cProfile, by own time) ---\n{text.getvalue()[-6000:]}", flush=True)
        engine.unwrap(base)

    # Phase 1, plain transformers + PEFT (before tunesmith's kernels patch the model's modules).
    for name in [e for e in engines if e.startswith("hf")]:
        measure(name)
    profiled = a.profile.split(",") if a.profile else []
    if "hf_gc0" in profiled:
        profile("hf_gc0")
    losses_hf = None if a.skip_loss_check else loss_run("hf")
    guide_hf = None if a.skip_guide else guide_run("hf_gc")
    # the plain model's limit, probed before Liger patches its modules (the probe ends in out of memory)
    long_hf = longest(base, "hf_gc", 1.0, [n for n in lengths if n <= 32768], deadline) if lengths else None
    gc.collect()
    torch.cuda.empty_cache()

    # Phase 2, tunesmith.
    for name in [e for e in engines if e.startswith("ts")]:
        measure(name)
    if os.environ.get("BENCH_AB"):  # the same engines with the code before the changes under test, then after
        from tunesmith.engine import decoder_layer, fused_loss

        new_project, new_ce = decoder_layer._project, fused_loss._triton

        def variant(project: bool, ce: bool) -> None:
            decoder_layer._project = new_project if project else _old_project
            fused_loss._triton = new_ce if ce else (lambda t: False)

        for name in [e for e in engines if e.startswith("ts")]:
            for run in (1, 2):  # twice, alternating: the spread between the two is the noise
                variant(False, False)
                measure(name, f"{name}_before{run}")
                variant(True, False)
                measure(name, f"{name}_project{run}")
                variant(False, True)
                measure(name, f"{name}_loss{run}")
                variant(True, True)
                measure(name, f"{name}_after{run}")
    for name in [n for n in profiled if n.startswith("ts")]:
        profile(name)
    if losses_hf is not None:
        results["loss_check"] = {"hf": losses_hf}
        print("  hf:", " ".join(f"{x:.4f}" for x in losses_hf), flush=True)
        for kind in a.loss_engines.split(","):
            losses = loss_run(kind)
            rel = [abs(x - y) / abs(y) for x, y in zip(losses, losses_hf)]
            results["loss_check"][kind] = {"losses": losses, "max_rel_diff": max(rel)}
            print(f"loss check {kind} vs hf (20 steps, dropout 0): max relative difference {max(rel):.2e}", flush=True)
            print(f"  {kind}:", " ".join(f"{x:.4f}" for x in losses), flush=True)
    if guide_hf is not None:
        results["guide_run"] = {"hf_gc": guide_hf}
        guide_run("ts")  # once unmeasured: Triton compiles its kernels for these row shapes (kept on disk)
        for kind in ("ts", "tsgraph"):
            took = guide_run(kind)
            results["guide_run"][kind] = {"s": took, "speedup": guide_hf / took}
            print(f"guide run (10 epochs x 8 samples, accumulation 16): {kind} {took:.2f} s, hf_gc batch by batch "
                  f"{guide_hf:.2f} s -> {guide_hf / took:.1f}x", flush=True)
    if lengths:  # last: an out-of-memory probe can leave the allocator fragmented for whatever runs next
        results["longest"] = {"hf_gc": long_hf, "ts_gc1": longest(base, "ts", 1.0, lengths, deadline + 200)}
        print(f"longest sequence: {results['longest']}", flush=True)

    flops_per_token = 4 * n_params  # frozen base: forward + input-gradient matmuls (no weight gradients)
    for name, r in results["engines"].items():
        r["mfu_vs_790tflops"] = r["tokens_per_s"] * flops_per_token / 790e12
    if "hf_gc" in results["engines"]:
        ref = results["engines"]["hf_gc"]
        for r in results["engines"].values():
            r["speedup_vs_hf_gc"] = r["tokens_per_s"] / ref["tokens_per_s"]

    print("\n| engine | s/step | tokens/s | peak GiB (alloc/reserved) | vs hf_gc | MFU |")
    print("|---|---|---|---|---|---|")
    for name, r in results["engines"].items():
        print(f"| {name} | {r['s_per_step']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_alloc_gib']:.1f} / {r['peak_reserved_gib']:.1f} | "
              f"{r.get('speedup_vs_hf_gc', float('nan')):.2f}x | {100 * r['mfu_vs_790tflops']:.0f}% |")
    Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
