"""The fast path computes the same thing as the plain one (CPU-runnable checks)."""

import contextlib
import copy

import pytest
import torch
from transformers import AttentionInterface

from tunesmith.engine import attention, checkpointing, fused_loss
from tunesmith.engine.decoder_layer import MOE
from tunesmith.args import SftArguments
from tunesmith.data.template import IGNORE, Encoded
from tunesmith.train.recipe import add_lora
from tunesmith.train.batches import loss_of, micro_batches

from numerics import assert_close_up_to_summation_order, assert_same_bits, summation_tolerance


@pytest.fixture(scope="module")
def tiny():
    """A small random Qwen2-architecture model (real transformers code, random weights)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()


def samples(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 40, (1,), generator=g))
        ids = torch.randint(0, 300, (length,), generator=g).tolist()
        cut = length // 2
        out.append(Encoded(ids, [IGNORE] * cut + ids[cut:]))
    return out


def losses_and_grads(model, args, data):
    torch.manual_seed(0)
    m = add_lora(copy.deepcopy(model), args)
    if args.packing_window:
        attention.use_document_attention(m.get_base_model())
    total = sum(loss_of(m, b) for b in micro_batches(data, args, "cpu"))
    total.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return total.item(), grads


def test_packed_document_attention_equals_padded_batches(tiny):
    data = samples()
    plain = SftArguments(dataset=["x"], lora_dropout=0.0, packing_window=False, per_device_train_batch_size=2)
    packed = SftArguments(dataset=["x"], lora_dropout=0.0, packing_window=True)
    loss_a, grads_a = losses_and_grads(tiny, plain, data)
    loss_b, grads_b = losses_and_grads(tiny, packed, data)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert_close_up_to_summation_order(grads_b, grads_a)


def test_samples_do_not_see_each_other(tiny):
    """Changing one packed sample leaves the loss of the others unchanged."""
    args = SftArguments(dataset=["x"], lora_dropout=0.0)
    data = samples(3)
    other = [data[0], Encoded([7] * len(data[1].input_ids), [IGNORE] * len(data[1].labels)), data[2]]
    m = add_lora(copy.deepcopy(tiny), args)
    attention.use_document_attention(m.get_base_model())
    assert m.config._attn_implementation == attention.DOC_ATTENTION
    with torch.no_grad():
        a = sum(loss_of(m, b) for b in micro_batches([data[0], data[2]], args, "cpu")).item()
        b = sum(loss_of(m, b) for b in micro_batches(other, args, "cpu")).item()
    assert b == pytest.approx(a, rel=1e-5)


def test_checkpointing_a_share_of_layers_changes_nothing_but_memory(tiny):
    data = samples()
    args = SftArguments(dataset=["x"], lora_dropout=0.0)
    loss_a, grads_a = losses_and_grads(tiny, args, data)
    torch.manual_seed(0)
    m = add_lora(copy.deepcopy(tiny), args)
    attention.use_document_attention(m.get_base_model())
    assert checkpointing.checkpoint_layers(m, 0.5) == 2
    m.train()
    calls = []
    AttentionInterface.register(attention.DOC_ATTENTION, lambda *a, **k: calls.append(1) or attention.document_attention(*a, **k))
    try:
        total = sum(loss_of(m, b) for b in micro_batches(data, args, "cpu"))
        total.backward()
    finally:
        AttentionInterface.register(attention.DOC_ATTENTION, attention.document_attention)
    assert len(calls) == 3 + 2  # every layer forward, then the two checkpointed layers again in backward
    assert total.item() == pytest.approx(loss_a, rel=1e-5)
    assert_close_up_to_summation_order({n: p.grad for n, p in m.named_parameters() if p.grad is not None}, grads_a)


def test_chunked_cross_entropy_equals_the_plain_loss():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    plain = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    g_plain = torch.autograd.grad(plain, [hidden, head.weight])
    chunked = fused_loss.chunked_cross_entropy(hidden, head, targets, chunk=8)
    g_chunked = torch.autograd.grad(chunked, [hidden, head.weight])
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    assert_close_up_to_summation_order(dict(enumerate(g_chunked)), dict(enumerate(g_plain)))


def test_linear_cross_entropy_equals_the_plain_loss():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    plain = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    (g_plain,) = torch.autograd.grad(plain * 3, hidden)
    fused = fused_loss.linear_cross_entropy(hidden, head, targets, budget_bytes=8 * 4 * 50)  # chunks of 64 rows min
    fused_small = fused_loss._LinearCrossEntropy.apply(hidden, head.weight, targets, 5).sum()  # 8 chunks, one ragged
    (g_fused,) = torch.autograd.grad(fused_small * 3, hidden)
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    assert fused_small.item() == pytest.approx(plain.item(), rel=1e-6)
    assert_close_up_to_summation_order({"hidden": g_fused}, {"hidden": g_plain})
    # rows with target -100 (padding in a captured row) count for nothing
    padded = torch.cat([targets[:30], torch.full((7,), -100)])
    plain = torch.nn.functional.cross_entropy(head(hidden), padded, reduction="sum", ignore_index=-100)
    (g_plain,) = torch.autograd.grad(plain, hidden)
    rows = fused_loss._LinearCrossEntropy.apply(hidden, head.weight, padded, 5)  # each row's loss (rlhf's log-probs)
    torch.testing.assert_close(rows, torch.nn.functional.cross_entropy(head(hidden), padded, reduction="none",
                                                                       ignore_index=-100))
    fused = rows.sum()
    (g_fused,) = torch.autograd.grad(fused, hidden)
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    assert_close_up_to_summation_order({"hidden": g_fused}, {"hidden": g_plain})


def lean_and_peft(tiny, dropout):
    args = SftArguments(dataset=["x"], lora_dropout=dropout)
    torch.manual_seed(0)
    peft_model = add_lora(copy.deepcopy(tiny), args)
    for p in peft_model.parameters():  # B starts at zero: give the adapter something to say
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    lean = copy.deepcopy(peft_model)
    return peft_model, lean, args


def test_lean_lora_computes_what_peft_computes(tiny):
    """Same loss and the same gradient for every adapter tensor (dropout 0, float32)."""
    from tunesmith.engine import lora_linear

    peft_model, lean, args = lean_and_peft(tiny, 0.0)
    assert lora_linear.use_lean_lora(lean) == 3 * 7  # q k v o gate up down in each of 3 layers
    data = samples()
    grads = []
    for m in (peft_model, lean):
        attention.use_document_attention(m.get_base_model())
        m.train()
        total = sum(loss_of(m, b) for b in micro_batches(data, args, "cpu"))
        total.backward()
        grads.append((total.item(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (loss_a, ga), (loss_b, gb) = grads
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert len(ga) == 2 * 21
    assert_close_up_to_summation_order(gb, ga)


def test_lean_lora_gradients_with_dropout_are_exact():
    """The dropout mask is drawn again in backward, not stored: numerical and analytic gradients agree."""
    from tunesmith.engine.lora_linear import LoraLinear, SwigluLoraDown

    torch.manual_seed(0)
    d = dict(dtype=torch.float64)
    x = torch.randn(2, 5, 6, **d, requires_grad=True)
    w, bias = torch.randn(4, 6, **d), torch.randn(4, **d)
    a, b = torch.randn(3, 6, **d, requires_grad=True), torch.randn(4, 3, **d, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: LoraLinear.apply(x, w, bias, a, b, 0.7, 0.4, 1234), (x, a, b))
    gate, up = (torch.randn(2, 5, 6, **d, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda g, u, a, b: SwigluLoraDown.apply(g, u, w, None, a, b, 0.7, 0.4, 99),
                                    (gate, up, a, b))
    # dropout really drops: another seed gives another output
    assert not torch.equal(LoraLinear.apply(x, w, bias, a, b, 0.7, 0.4, 1), LoraLinear.apply(x, w, bias, a, b, 0.7, 0.4, 2))


def test_lean_lora_with_dropout_and_checkpointing_repeats_the_masks(tiny):
    """A checkpointed layer recomputed in backward draws the same dropout masks as its first forward."""
    from tunesmith.engine import lora_linear

    _, lean, args = lean_and_peft(tiny, 0.3)
    lora_linear.use_lean_lora(lean)
    data = samples()
    results = []
    for share in (0.0, 1.0):
        m = copy.deepcopy(lean)
        attention.use_document_attention(m.get_base_model())
        checkpointing.checkpoint_layers(m, share)
        m.train()
        torch.manual_seed(5)
        total = sum(loss_of(m, b) for b in micro_batches(data, args, "cpu"))
        total.backward()
        results.append((total.item(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (loss_a, ga), (loss_b, gb) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert_same_bits(gb, ga)  # the same kernels on the same inputs, the masks drawn again from their seeds


def test_triton_kernels_match_plain_torch():
    """The CUDA kernels of the lean LoRA path, run by Triton's CPU interpreter: same masks when asked
    again, the right keep rate and scale, SwiGLU forward/backward as autograd computes them."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    script = Path(__file__).parent / "kernel_checks.py"
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(script), "cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernel checks passed on cpu" in done.stdout


@pytest.mark.parametrize("more_tokens,more_slots", [(16, 1), (512, 4)])
def test_a_row_padded_for_a_cuda_graph_computes_the_same(tiny, more_tokens, more_slots):
    """CUDA graphs replay fixed-size rows: the spare tokens, sample slots and loss slots that pad a
    row to its bucket, or to a bigger graph that hosts a shape never captured, change neither the loss
    nor any gradient (checked on the CPU)."""
    from tunesmith.engine import cuda_graphs, lora_linear

    args = SftArguments(dataset=["x"], lora_dropout=0.0)
    torch.manual_seed(0)
    m = add_lora(copy.deepcopy(tiny), args)
    lora_linear.use_lean_lora(m)
    attention.use_document_attention(m.get_base_model())
    (batch,) = list(micro_batches(samples(4), args, "cpu"))
    rows = cuda_graphs.GraphedRows(m, lambda b: loss_of(m, b))
    length, slots = cuda_graphs.shape_of(batch)  # (the graph's longest sample is its row length)
    assert slots >= len(batch["cu_seq_lens_q"]) and length >= batch["max_length_q"]
    static = rows._static((length + more_tokens, slots * more_slots), "cpu")
    rows._fill(static, batch)
    results = []
    for b in (batch, static):
        m.zero_grad()
        loss = loss_of(m, b)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in rows.params]))
    (loss_a, ga), (loss_b, gb) = results
    assert static["input_ids"].shape[1] > batch["input_ids"].shape[1]
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert_close_up_to_summation_order(dict(enumerate(gb)), dict(enumerate(ga)))


def test_a_shape_never_captured_borrows_the_smallest_graph_that_holds_it(tiny):
    from tunesmith.engine import cuda_graphs

    rows = cuda_graphs.GraphedRows(tiny, None)
    rows.graphs = {(512, 8): None, (1024, 8): None, (768, 16): None, (2048, 32): None}
    assert rows.host((512, 8)) == (512, 8)  # captured: itself
    assert rows.host((256, 8)) == (512, 8)
    assert rows.host((768, 8)) == (768, 16)  # the shortest row that holds it
    assert rows.host((1024, 16)) == (2048, 32)  # (1024, 8) has too few sample slots
    assert rows.host((2304, 8)) is None  # nothing holds it: it runs eagerly


def _lean_layer_run(tiny, dropout, layers=True, level=0, share=0.0, lean=True, targets=("all-linear",)):
    """Summed loss and LoRA gradients of one packed row, the pass's dropout seed fixed."""
    from tunesmith.engine import decoder_layer, lora_linear, moe_lora

    args = SftArguments(dataset=["x"], lora_dropout=dropout, target_modules=list(targets))
    torch.manual_seed(0)
    m = add_lora(copy.deepcopy(tiny), args)
    for name, p in m.named_parameters():
        if "lora_B" in name:  # (PEFT starts B at zero: no gradient would reach A)
            torch.nn.init.normal_(p, std=0.1)
    attention.use_document_attention(m.get_base_model())
    if lean:
        lora_linear.use_lean_lora(m)
        moe_lora.use_lean_experts(m)
    if layers:
        assert decoder_layer.use_lean_layers(m) == len(checkpointing.decoder_layers(m))  # (samples: < 40)
        for layer in checkpointing.decoder_layers(m):
            layer._tunesmith_recompute = level
    checkpointing.checkpoint_layers(m, share, preserve_rng=False)
    (batch,) = list(micro_batches(samples(), args, "cpu"))
    lora_linear._forward_seed[torch.device("cpu")] = 12345  # what begin_forward would draw
    hidden = m.get_base_model().get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                              cu_seq_lens_q=batch["cu_seq_lens_q"], max_length_q=batch["max_length_q"],
                                              use_cache=False).last_hidden_state
    loss = fused_loss.linear_cross_entropy(hidden[0].index_select(0, batch["loss_positions"]),
                                     m.get_base_model().get_output_embeddings(), batch["loss_targets"])
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_a_second_adapter_on_the_same_base_model_is_planned_as_the_first(tiny, caplog):
    """prepare_model twice on one base model in one process (the adapter unloaded between, as bench/bench_lora.py
    does for each engine): the second start-up line says what the first said, every layer lean both times."""
    import logging

    from tunesmith.train.recipe import prepare_model

    base = copy.deepcopy(tiny)
    args = SftArguments(dataset=["x"], packing_window=True, lora_dropout=0.05)
    lines = []
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            model = prepare_model(base, args, "cpu")
        lines += [r.getMessage() for r in caplog.records if "fast path" in r.getMessage()]
        model.unload()
    assert len(lines) == 2 and lines[0] == lines[1] and "lean decoder layers (3)" in lines[0], lines


def test_lean_decoder_layers_compute_what_transformers_and_peft_compute(tiny):
    """Without dropout the lean layer (norms, rope, attention and all seven LoRA projections in three
    autograd functions) gives PEFT's loss and gradients."""
    loss_b, grads_b = _lean_layer_run(tiny, 0.0)
    plain_loss, plain_grads = _lean_layer_run(tiny, 0.0, layers=False, lean=False)  # transformers + PEFT
    assert loss_b == pytest.approx(plain_loss, rel=1e-5)
    assert len(grads_b) == 2 * 7 * 3
    assert_close_up_to_summation_order(grads_b, plain_grads)


def test_lean_layer_recompute_and_checkpointing_draw_the_same_masks(tiny):
    """With dropout, recomputing up, gate and up, or the whole layer in backward changes nothing: the
    masks come again from the same seeds, through the same kernels, so the gradients are the same bits.
    The lean projections inside transformers' layer (the path for other architectures) draw the same
    masks too; that path sums in another order (tests/numerics.py), and a different mask would be
    thousands of times outside its tolerance."""
    loss, grads = _lean_layer_run(tiny, 0.2)
    nodrop, nodrop_grads = _lean_layer_run(tiny, 0.0)
    assert loss != pytest.approx(nodrop, rel=1e-4)  # dropout did something
    for kwargs in ({"level": 1}, {"level": 2}, {"share": 1.0}):
        other_loss, other = _lean_layer_run(tiny, 0.2, **kwargs)
        assert other_loss == loss, kwargs
        assert_same_bits(other, grads)
    other_loss, other = _lean_layer_run(tiny, 0.2, layers=False)
    assert other_loss == pytest.approx(loss, rel=1e-6)
    assert_close_up_to_summation_order(other, grads)
    mask_effect = max((nodrop_grads[n] - grads[n]).abs().max().item() / summation_tolerance(grads[n]) for n in grads)
    assert mask_effect > 1000  # the tolerance could tell one mask from another


# Tiny random configs of the families of issue 17: sliding windows of 8 tokens (the samples run to 40), Gemma 2's
# logit softcapping, Qwen3's q/k norms, Phi-3's fused projections, Llama 3's RoPE scaling, Granite's multipliers,
# OLMo 2's norms after attention and MLP, GLM-4's four norms, fused gate_up_proj, q/k/v biases and half of each head
# turned by interleaved RoPE.
SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
FAMILIES = {
    "qwen3": {},
    "qwen3_moe": dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
                      num_experts_per_tok=2, use_sliding_window=True, sliding_window=8,
                      max_window_layers=2),  # (layer 0 sliding, layer 1 full)
    "gemma2": dict(query_pre_attn_scalar=16, sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(query_pre_attn_scalar=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(pad_token_id=0, eos_token_id=1, bos_token_id=1),
    "llama": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(sliding_window=8),
    "granite": dict(embedding_multiplier=2.0, attention_multiplier=0.1, residual_multiplier=0.5, logits_scaling=4.0),
    "olmo2": dict(pad_token_id=0, eos_token_id=1, bos_token_id=1),
    "glm4": dict(pad_token_id=0, eos_token_id=1, bos_token_id=1),  # (its own partial rotary 0.5, q/k/v biases)
    "glm": dict(pad_token_id=0, eos_token_id=1, bos_token_id=1),  # (GLM-4-9B-chat's: two norms, else as glm4)
}


# Which layers run lean in sft (max_length 64): all but Gemma 2's softcapped ones (sliding windows of 8 tokens run lean;
# the MoEs' attention, their MoE blocks transformers')
LEAN_LAYERS = {family: [True, True] for family in ("qwen3", "llama", "phi3", "gemma3_text", "granite", "olmo2", "mistral",
                                                  "glm4", "glm", "qwen3_moe", "qwen2_moe")}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_on_packed_rows_as_transformers_and_peft_compute(family):
    """sft's model and loss (prepare_model: packed rows, per-sample attention, lean LoRA and lean layers where they
    apply; loss_of) give the loss and gradients of the PEFT model's own forward on each sample alone, with the
    family's own attention (eager for Gemma 2): sliding windows, both of Gemma 2's softcaps and q/k norms included."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunesmith.model.families import attention_implementation
    from tunesmith.train.recipe import prepare_model

    config = AutoConfig.for_model(family, **SHAPE, **FAMILIES[family])
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, attn_implementation=attention_implementation(config)).float()
    data = samples()
    results = []
    for packed in (False, True):
        args = SftArguments(dataset=["x"], lora_dropout=0.0, packing_window=packed, per_device_train_batch_size=1,
                            max_length=64)
        torch.manual_seed(0)
        m = prepare_model(copy.deepcopy(base), args, "cpu") if packed else add_lora(copy.deepcopy(base), args)
        torch.manual_seed(1)
        for name, p in m.named_parameters():
            if "lora_B" in name:  # (PEFT starts B at zero: no gradient would reach A)
                torch.nn.init.normal_(p, std=0.1)
        if packed:
            total = sum(loss_of(m, b) for b in micro_batches(data, args, "cpu"))
        else:  # transformers' logits (PEFT's forward), cross-entropy on the answer tokens
            total = sum(torch.nn.functional.cross_entropy(m(input_ids=torch.tensor([s.input_ids])).logits[0, :-1],
                                                          torch.tensor(s.labels[1:]), reduction="sum") for s in data)
        total.backward()
        results.append((total.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
        if packed:  # the lean decoder layers take the layers whose samples fit their window, without softcapping
            lean = [hasattr(layer, "_tunesmith_plain_layer") for layer in checkpointing.decoder_layers(m)]
            assert lean == LEAN_LAYERS.get(family, [False, False])
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert grads_b.keys() == grads_a.keys() and grads_a
    assert_close_up_to_summation_order(grads_b, grads_a)


# Families on lean layers beyond Qwen2 (issue 17), every layer lean: Qwen3's q/k norms, Phi-3's fused qkv_proj and
# gate_up_proj with partial rotary, Gemma 2 without softcapping and Gemma 3 (q/k norms) with windows longer than any
# sample: Gemma's four (1 + w) norms, GeGLU and query_pre_attn_scalar; the MoEs' lean attention before transformers' MoE
# blocks (PEFT's LoRA on the experts' 3-D weights, Qwen2-MoE's shared expert on lean LoRA).
LEAN_FAMILIES = {
    "qwen3": {},
    "phi3": dict(pad_token_id=0, eos_token_id=1, bos_token_id=1, partial_rotary_factor=0.5),
    "gemma2": dict(query_pre_attn_scalar=16, sliding_window=64, attn_logit_softcapping=None, final_logit_softcapping=30.0),
    "gemma3_text": dict(query_pre_attn_scalar=24, sliding_window=64, layer_types=["sliding_attention", "full_attention"]),
    "granite": FAMILIES["granite"],
    "olmo2": FAMILIES["olmo2"],
    "glm4": FAMILIES["glm4"],
    "glm": FAMILIES["glm"],
    "qwen3_moe": FAMILIES["qwen3_moe"],
    "qwen2_moe": FAMILIES["qwen2_moe"],
}


def tiny_family(family):
    """A tiny random model of the family, its norm weights random too (Gemma's start at zero, the others at one)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunesmith.model.families import attention_implementation

    config = AutoConfig.for_model(family, **SHAPE, **LEAN_FAMILIES[family])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention_implementation(config)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("family", LEAN_FAMILIES)
def test_lean_layers_of_each_family_compute_what_transformers_and_peft_compute(family):
    """Without dropout, on a packed row of five samples: the lean layers give the loss and every LoRA gradient of
    transformers' layers with PEFT's LoRA (on Phi-3, PEFT's one adapter on each fused Linear)."""
    model = tiny_family(family)
    loss, grads = _lean_layer_run(model, 0.0)
    plain_loss, plain_grads = _lean_layer_run(model, 0.0, layers=False, lean=False)
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    # (Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj; the MoEs: q/k/v/o, the experts' two, Qwen2-MoE's shared expert)
    per_layer = {"phi3": 4, "glm4": 6, "glm": 6, "qwen3_moe": 6, "qwen2_moe": 9}.get(family, 7)
    assert len(grads) == 2 * per_layer * SHAPE["num_hidden_layers"]
    assert_close_up_to_summation_order(grads, plain_grads)


def _expert_run(model, dtype, grouped=True, off=False, monkeypatch=None):
    """Loss and LoRA gradients of a tiny MoE in `dtype` through its LoRA'd experts (lean: engine/moe_lora.py)."""
    from tunesmith.engine import moe_lora

    if monkeypatch is not None and not grouped:
        monkeypatch.setattr(moe_lora, "_grouped", lambda *a: False)
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with contextlib.ExitStack() as stack:
        if off:
            stack.enter_context(model.disable_adapter())
        loss = model(input_ids=ids, labels=ids).loss
    if not off:
        loss.backward()
    if monkeypatch is not None:
        monkeypatch.undo()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", sorted(MOE))
def test_lean_expert_lora_computes_what_peft_computes(family, monkeypatch):
    """LoRA on the experts without merging it into their weights: in float32 (one expert at a time) the loss and every
    gradient of PEFT's merged forward; in bf16 the grouped matmuls give what the one-at-a-time path gives, up to bf16
    rounding, and both stay near PEFT's; with the adapter switched off (rlhf's reference), the base model exactly."""
    from tunesmith.engine import moe_lora

    args = SftArguments(dataset=["x"], lora_dropout=0.0)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        peft = add_lora(tiny_family(family).to(dtype), args)
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        lean, looped = copy.deepcopy(peft), copy.deepcopy(peft)
        assert moe_lora.use_lean_experts(lean) == moe_lora.use_lean_experts(looped) == SHAPE["num_hidden_layers"]
        runs[dtype] = [_expert_run(m, dtype, grouped=g, monkeypatch=monkeypatch) for m, g in
                       ((peft, True), (lean, True), (looped, False))]
        ids = torch.randint(0, SHAPE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            base = tiny_family(family).to(dtype)(input_ids=ids, labels=ids).loss.item()
        assert _expert_run(lean, dtype, off=True)[0] == base
    (peft32, lean32, _), (peft16, lean16, looped16) = runs[torch.float32], runs[torch.bfloat16]
    assert lean32[0] == pytest.approx(peft32[0], rel=1e-6)
    assert len(lean32[1]) == len(peft32[1]) == 2 * SHAPE["num_hidden_layers"] * (6 if family == "qwen3_moe" else 9)
    assert_close_up_to_summation_order(lean32[1], peft32[1])
    assert lean16[0] == pytest.approx(looped16[0], rel=1e-2) and lean16[0] == pytest.approx(peft16[0], rel=2e-2)
    for name, grad in looped16[1].items():
        assert (lean16[1][name] - grad).norm() <= 0.05 * grad.norm() + 1e-6, name


@pytest.mark.parametrize("family", LEAN_FAMILIES)
def test_lean_layers_of_each_family_draw_the_dropout_masks_of_transformers_layers_with_lean_projections(family):
    """With dropout the lean projections inside transformers' own layer draw the same masks (on a fused Linear one
    mask for all its row blocks, as PEFT's), so loss and gradients agree (a different mask would be far outside);
    recomputing up, gate and up, or the whole layer changes no bit. On the MoEs LoRA on attention only (the
    experts' parameters take no dropout)."""
    model = tiny_family(family)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj") if family in MOE else ("all-linear",)
    loss, grads = _lean_layer_run(model, 0.2, targets=targets)
    nodrop, _ = _lean_layer_run(model, 0.0, targets=targets)
    assert loss != pytest.approx(nodrop, rel=1e-4)
    other_loss, other = _lean_layer_run(model, 0.2, layers=False, targets=targets)
    assert other_loss == pytest.approx(loss, rel=1e-6)
    assert_close_up_to_summation_order(other, grads)
    for kwargs in ({"level": 1}, {"level": 2}, {"share": 1.0}):
        again_loss, again = _lean_layer_run(model, 0.2, targets=targets, **kwargs)
        assert again_loss == loss, kwargs
        assert_same_bits(again, grads)


def test_the_start_up_line_says_which_layers_fall_back_and_why():
    from tunesmith.engine.decoder_layer import lean_note

    assert lean_note(2, [None, None]) == "lean decoder layers (2)"
    assert lean_note(1, ["a sliding window of 8 tokens, shorter than --max_length 64", None]) == (
        "lean decoder layers (1 of 2; transformers' for layer 0: a sliding window of 8 tokens, shorter than "
        "--max_length 64)")
    window = "a sliding window of 1024 tokens, shorter than --max_length 4096"
    assert lean_note(10, ([window] * 5 + [None]) * 10) == (
        f"lean decoder layers (10 of 60; transformers' for 50 layers: {window})")


class _FlashLike(torch.autograd.Function):
    """Stands in for flash attention on the CPU: keeps what FlashVarlen keeps (q, k, v and the output)."""

    @staticmethod
    def forward(ctx, q, k, v, bounds, longest, scale, window, attend):
        out = attend(q, k, v, bounds, longest, scale, window).contiguous()  # (as flash returns it)
        ctx.save_for_backward(q, k, v, out)
        return out


def _kept(model, tokens: int) -> float:
    """Bytes the lean layers keep for backward, in hidden-widths of one token and layer (parameters and their views
    left out), for a packed row of two samples of `tokens` tokens in all."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    layers = checkpointing.decoder_layers(model)
    lean = [layer.forward for layer in layers]
    for layer in layers:
        def forward(*args, _forward=layer.forward, **kwargs):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                return _forward(*args, **kwargs)
        layer.forward = forward
    ids = torch.randint(0, SHAPE["vocab_size"], (1, tokens))
    half = tokens // 2
    positions = torch.cat([torch.arange(half), torch.arange(tokens - half)])[None]
    try:
        model.get_base_model().get_decoder()(input_ids=ids, position_ids=positions, use_cache=False,
                                             cu_seq_lens_q=torch.tensor([0, half, tokens], dtype=torch.int32),
                                             max_length_q=tokens - half)
    finally:
        for layer, forward in zip(layers, lean):
            layer.forward = forward
    return sum(kept.values()) / (len(layers) * SHAPE["hidden_size"] * 4)


@pytest.mark.parametrize("family", [f for f in LEAN_FAMILIES if f not in MOE])  # (MoE layers: counted as transformers')
def test_the_memory_model_counts_what_the_lean_layers_of_each_family_keep(family, monkeypatch):
    """activation_memory.family_widths (the planner's figure) against what the lean layers really keep per token,
    flash attention's share included; beyond it only the r-wide LoRA intermediates, cos/sin and 1/rms of each row,
    which the model leaves out (at this tiny hidden size of 64 they are a width or so; at 3584, a few hundredths)."""
    from tunesmith.engine import activation_memory, decoder_layer, lora_linear

    args = SftArguments(dataset=["x"], lora_dropout=0.1)
    m = add_lora(tiny_family(family), args)
    attention.use_document_attention(m.get_base_model())
    lora_linear.use_lean_lora(m)
    assert decoder_layer.use_lean_layers(m) == SHAPE["num_hidden_layers"]
    m.train()
    attend = attention.varlen_attention
    monkeypatch.setattr(attention, "varlen_attention", lambda *a: _FlashLike.apply(*a, attend))
    per_token = (_kept(m, 48) - _kept(m, 24)) / 24  # (less what does not grow with tokens)
    cfg, hidden = m.config, SHAPE["hidden_size"]
    rotary = int(SHAPE["head_dim"] * cfg.rope_parameters.get("partial_rotary_factor", 1.0))
    # 1/rms where the norm's input is kept
    rows = {"olmo2": 2 + 2, "gemma2": 1 + 2, "gemma3_text": 1 + 2, "glm4": 1 + 2}.get(family, 1)
    rows += cfg.num_attention_heads + cfg.num_key_value_heads if family in ("qwen3", "gemma3_text") else 0  # per head
    ropes = 2 if family == "gemma3_text" else 1  # cos/sin of each kind of layer (Gemma 3: local, global), shared
    small = (7 * args.lora_rank + rows + 2 * rotary * ropes / SHAPE["num_hidden_layers"]) / hidden
    full, mlp, _ = activation_memory.family_widths(family, hidden, cfg.intermediate_size, cfg.num_attention_heads,
                                                   cfg.num_key_value_heads, SHAPE["head_dim"])
    assert per_token == pytest.approx(full + small, abs=0.05), (per_token, full, small)
    for level in (1, 2):  # recomputing up, then gate too, frees what the model says (Phi-3's row blocks too)
        for layer in checkpointing.decoder_layers(m):
            layer._tunesmith_recompute = level
        assert (_kept(m, 48) - _kept(m, 24)) / 24 == pytest.approx(per_token - level * mlp, abs=0.05), level
