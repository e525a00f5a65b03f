"""The memory planner: `sft --dry_run` reads only config.json; its estimate matches peaks measured on an
H100 (bench/RESULTS.md); a run that cannot fit is refused before loading, with settings that would fit."""

import json

import pytest

from conftest import GUIDE_DATA, tunesmith
from tunesmith.train import planner
from tunesmith.args import SftArguments
from tunesmith.errors import UserError
from tunesmith.engine import activation_memory

QWEN7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
          "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
          "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768}
GiB = 2**30


@pytest.fixture
def qwen7b(tmp_path):
    folder = tmp_path / "Qwen2.5-7B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN7B))
    return folder


def test_parameter_count_is_the_real_one(qwen7b):
    assert planner.read_shape(qwen7b).params == pytest.approx(7.62e9, rel=0.005)


@pytest.mark.parametrize("lean, checkpointed, measured_gib", [(True, 0, 22.43), (True, 17, 18.31), (True, 28, 15.65),
                                                               (False, 0, 28.14)])
def test_estimate_matches_h100_measurements(qwen7b, lean, checkpointed, measured_gib):
    """bench/RESULTS.md (session 2, bench_lora engines ts_gc0, ts_fit, ts_gc1, tsplain_gc0): 2048-token
    steps, ~60% answer tokens, Liger kernels, with and without lean LoRA; peak allocated."""
    s = planner.Settings(tokens=2048, loss_tokens=1229, checkpointed=checkpointed, liger=True, lean=lean)
    est = planner.estimate(planner.read_shape(qwen7b), s)
    assert est["allocated"] / GiB == pytest.approx(measured_gib, rel=0.15)
    assert est["allocated"] / GiB >= measured_gib * 0.97  # errs on the safe side


@pytest.mark.parametrize("tokens, checkpointed, measured_gib", [(2048, 0, 20.44), (32768, 28, 26.7), (65536, 28, 38.3),
                                                               (131072, 28, 62.2)])
def test_estimate_matches_h100_measurements_on_lean_layers(qwen7b, tokens, checkpointed, measured_gib):
    """bench/RESULTS.md (session 3, run s3-4: bench_lora engine ts_gc0, and the longest-sequence probe with every
    layer checkpointed, one sample of N tokens with 60% answer tokens); peak allocated."""
    s = planner.Settings(tokens=tokens, loss_tokens=int(0.6 * tokens), checkpointed=checkpointed, lean_layers=True)
    est = planner.estimate(planner.read_shape(qwen7b), s)
    assert est["allocated"] / GiB == pytest.approx(measured_gib, rel=0.05)


def test_lean_layers_recompute_before_checkpointing(qwen7b):
    """With too little memory for everything, sft first recomputes `up` (then `gate`) in backward, one matmul a
    layer, and checkpoints whole layers only when that is not enough."""

    widths = activation_memory.lean_layer_widths(3584, 18944, 28, 4, 128)
    unit = 3584 * 2 * 2048
    everything = activation_memory.lean_activation_bytes(widths, unit, [0] * 28, set())
    assert activation_memory.choose_recompute(28, widths, unit, everything) == ([0] * 28, set())
    levels, checkpointed = activation_memory.choose_recompute(28, widths, unit, 0.7 * everything)
    assert not checkpointed and set(levels) == {0, 1}  # up recomputed in some layers only
    levels, checkpointed = activation_memory.choose_recompute(28, widths, unit, 0.5 * everything)
    assert not checkpointed and set(levels) == {1, 2}  # gate too in some
    levels, checkpointed = activation_memory.choose_recompute(28, widths, unit, 0.25 * everything)
    assert 0 < len(checkpointed) < 28 and levels == [2] * 28
    for free in (0.7, 0.5, 0.25):
        plan = activation_memory.choose_recompute(28, widths, unit, free * everything)
        assert activation_memory.lean_activation_bytes(widths, unit, *plan) <= free * everything


def test_dry_run_loads_only_the_config(qwen7b):
    proc = tunesmith("sft", "--model", qwen7b, "--dry_run", "true", "--max_length", "32768", env_extra={"CUDA_VISIBLE_DEVICES": ""})
    out = proc.stdout
    assert "7.62 B parameters" in out and "32768-token forward passes" in out
    for row in ["weights", "LoRA + gradients + AdamW", "activations", "total per GPU"]:
        assert row in out
    assert "QLoRA nf4 + ckpt" in out and "80 GB (A100/H100 80G): fits" in out
    assert "24 GB (RTX 4090, A10): does NOT fit" in out and "--quant_method bnb --quant_bits 4" in out
    assert "longest forward pass" in out
    assert "loaded" not in proc.stderr  # no weights (there are none in the folder)


def test_fsdp_shards_the_layers_across_gpus(qwen7b):
    """Decoder layers are split; embeddings and the output layer (2.2 GB) stay whole during a step."""
    args = SftArguments(dataset=["x"], fsdp=True, gradient_checkpointing=1.0)
    shape = planner.read_shape(qwen7b)
    one, two, four = (planner.estimate(shape, planner.settings_for(args, shape, 2048, world=n))["weights"] for n in (1, 2, 4))
    assert two < 0.75 * one and four < 0.5 * one


def test_a_run_that_cannot_fit_is_refused_before_loading(qwen7b, monkeypatch):
    monkeypatch.setattr(planner, "detected_card", lambda: ("NVIDIA GeForce RTX 4090", 24e9, 23e9))
    args = SftArguments(dataset=["x"], max_length=32768, gradient_checkpointing=0.0)
    with pytest.raises(UserError) as e:
        planner.check_fits(args, qwen7b, 32768, "cuda", 1)
    msg = str(e.value)
    assert "per GPU" in msg and "RTX 4090 has 21.4 GiB free" in msg and "--max_length" in msg
    planner.check_fits(SftArguments(dataset=["x"], quant_method="bnb", quant_bits=4), qwen7b, 1024, "cuda", 1)  # fits: no error


def test_dry_run_needs_no_dataset(default_model):
    proc = tunesmith("sft", "--dry_run", "true", "--model", "qwen2.5-0.5b")
    assert "memory plan for qwen2.5-0.5b" in proc.stdout
    assert tunesmith("sft", "--dataset", GUIDE_DATA, "--dry_run", "true").returncode == 0


@pytest.mark.parametrize("quant_bits, checkpointed, tokens, loss_tokens, measured_gib", [
    (4, 0, 2048, 1232, 21.1), (4, 0, 8192, 4926, 65.7), (4, 28, 2048, 1232, 6.67), (None, 0, 8192, 4926, 44.2)])
def test_estimate_matches_h100_measurements_with_qlora_and_long_rows(qwen7b, quant_bits, checkpointed, tokens,
                                                                    loss_tokens, measured_gib):
    """bench/RESULTS.md (session 2, bench/scale_bench.py memory): QLoRA nf4 with and without
    checkpointing, and an 8192-token row; peak allocated."""
    s = planner.Settings(tokens=tokens, loss_tokens=loss_tokens, checkpointed=checkpointed, liger=True,
                         lean=quant_bits is None, quant_bits=quant_bits)
    est = planner.estimate(planner.read_shape(qwen7b), s)
    assert est["allocated"] / GiB == pytest.approx(measured_gib, rel=0.15)


MOE = {"qwen3_moe": dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
       "qwen2_moe": dict(moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2)}


@pytest.mark.parametrize("family", MOE)
def test_moe_parameters_and_their_adapter_are_counted_as_the_model_has_them(family, tmp_path):
    """The planner reads an MoE's experts from config.json: its parameter count and all-linear's LoRA parameters
    (attention, the experts' 3-D weights, a shared expert) are those of the model sft builds."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM
    from tunesmith.train.recipe import lora_config

    config = AutoConfig.for_model(family, vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, **MOE[family])
    model = AutoModelForCausalLM.from_config(config)
    config.save_pretrained(tmp_path)
    shape = planner.read_shape(tmp_path)
    matrices = sum(p.numel() for p in model.parameters() if p.dim() >= 2)  # (norms apart: the planner's are rough)
    assert shape.params - shape.layers * shape.layer_other_params - shape.hidden == matrices
    peft_model = get_peft_model(model, lora_config(model, SftArguments(dataset=["x"], lora_dropout=0.0, lora_rank=4)))
    assert shape.lora_params(4, ["all-linear"]) == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


QWEN3_30B_A3B_12 = {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                    "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 12, "num_attention_heads": 32,
                    "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False}


@pytest.mark.parametrize("checkpointed, reserved_gib", [(0, 34.72), (12, 29.38)])
def test_moe_estimate_matches_the_h200_measurements(checkpointed, reserved_gib, tmp_path):
    """bench/RESULTS.md s11-2: Qwen3-30B-A3B's shape with 12 layers, 2048-token rows, with no layer checkpointed and with
    all of them: peak reserved. Most of it is the weights (its 128 experts a layer) and PEFT's experts' weights with
    LoRA merged in, made anew in float32 on every forward and backward, which the dense-model estimate missed (it
    planned 6.3 GiB)."""
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_30B_A3B_12))
    shape = planner.read_shape(tmp_path)
    peft = planner.Settings(tokens=2048, loss_tokens=2048, checkpointed=checkpointed, liger=False, lean=False)
    est = planner.estimate(shape, peft)  # (measured with PEFT's own forward on the experts, before engine/moe_lora.py)
    assert reserved_gib <= (est["total"] - planner.CONTEXT) / GiB <= reserved_gib * 1.10
