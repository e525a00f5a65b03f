"""Model families beyond qwen2/llama on tiny random models with the default model's tokenizer (issue 17), through the
commands a user runs: sft, infer, eval and export --merge_lora."""

import json

import pytest

from conftest import GUIDE_DATA, copy_tokenizer, tiny_model, tunesmith

pytestmark = pytest.mark.slow

SHAPE = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
# What sets each family apart, small enough to matter on the guide's records (sliding windows of 8 tokens)
FAMILIES = {
    "qwen3": {},
    "qwen3_moe": dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
                      num_experts_per_tok=2),
    "gemma2": dict(query_pre_attn_scalar=16, sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(query_pre_attn_scalar=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "phi3": {},
    "llama": dict(max_position_embeddings=131072, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}),  # Llama 3.1's RoPE scaling
    "mistral": dict(sliding_window=8),
    "glm4": {},  # (GLM-4-9B-0414's: partial rotary 0.5, interleaved, q/k/v biases, four norms)
    "glm": {},  # (GLM-4-9B-chat's: the same with two norms)
}
FLAGS = {moe: ["--lora_dropout", "0"] for moe in ("qwen3_moe", "qwen2_moe")}  # (PEFT adapts the experts' 3-D weights
# without dropout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, default_model):
    """family -> (its tiny random model folder, a checkpoint of 2 sft steps on it, sft's stderr); trained once."""
    root, done = tmp_path_factory.mktemp("families"), {}

    def train(family):
        if family not in done:
            folder = tiny_model(root / family, default_model, family, **SHAPE, **FAMILIES[family])
            proc = tunesmith("sft", "--model", folder, "--dataset", GUIDE_DATA, "--max_steps", "2", "--learning_rate",
                             "1e-2", *FLAGS.get(family, []), "--output_dir", root / f"{family}-out")
            done[family] = folder, proc.stdout.strip().splitlines()[-1].split("last_model_checkpoint: ")[1], proc.stderr
        return done[family]
    return train


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_chats_evaluates_and_merges(family, trained, tmp_path):
    """sft, infer, eval and export --merge_lora (the merged folder's logits checked against base + adapter) on
    each family, without a traceback or a library warning."""
    _, ckpt, sft_log = trained(family)
    if family in ("qwen3_moe", "qwen2_moe"):  # the start-up line says which layers train
        assert "lean decoder layers (2) with transformers' MoE blocks" in sft_log
    elif family != "gemma2":
        assert "lean decoder layers (2)" in sft_log  # (sliding windows of 8 tokens included)
    else:  # Gemma 2's softcapped attention logits: transformers' layers
        assert f"transformers' {family} decoder layers (" in sft_log and "lean decoder layers" not in sft_log
    answer = tunesmith("infer", "--adapters", ckpt, "--query", "你是谁?", "--max_new_tokens", "4", "--stream", "false")
    assert answer.stdout.strip()
    questions = tmp_path / "q.txt"
    questions.write_text("你是谁?\nWho are you?\n", encoding="utf-8")
    tunesmith("eval", "--adapters", ckpt, "--questions", questions, "--max_new_tokens", "4", "--output_dir", tmp_path / "eval")
    report = json.loads((tmp_path / "eval" / "eval.json").read_text(encoding="utf-8"))
    assert [r["question"] for r in report["rows"]] == ["你是谁?", "Who are you?"]
    merged = tunesmith("export", "--adapters", ckpt, "--merge_lora", "true")
    assert "same top token" in merged.stderr and "merged_model:" in merged.stdout
    for log in (sft_log, answer.stderr, merged.stderr):
        assert "Traceback" not in log and "Warning" not in log, log


def test_a_qwen3_moe_adapter_keeps_routing_and_says_what_gguf_lacks(trained, tmp_path):
    """LoRA on attention and on the experts (PEFT's names, nested base_layer for each expert parameter), none on the
    router; default dropout is one line before the weights load; GGUF export of this config (transformers' default
    norm_topk_prob false, which llama.cpp's qwen3moe cannot compute) is refused in one line."""
    from safetensors import safe_open

    folder, ckpt, _ = trained("qwen3_moe")
    with safe_open(f"{ckpt}/adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any(".mlp.experts.base_layer.lora_A" in k for k in keys) and any(".self_attn.q_proj.lora_A" in k for k in keys)
    assert not any(".mlp.gate." in k for k in keys), [k for k in keys if ".mlp.gate." in k]
    proc = tunesmith("sft", "--model", folder, "--dataset", GUIDE_DATA, "--output_dir", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "pass --lora_dropout 0" in proc.stderr.strip().splitlines()[-1]
    assert "loaded" not in proc.stderr and not (tmp_path / "out").exists()
    proc = tunesmith("export", "--adapters", ckpt, "--to_gguf", "true", "--gguf_type", "q4_k_m", "--output_dir",
                     tmp_path / "gguf", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "norm_topk_prob false" in proc.stderr
    assert not (tmp_path / "gguf").exists()


def test_a_qwen2_moe_adapter_keeps_routing_and_loads_in_plain_peft(trained, tmp_path):
    """Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): LoRA on attention, on the experts' 3-D weights and on the shared
    expert, none on the router nor on the shared expert's gate; PEFT's own PeftModel.from_pretrained loads the adapter
    and computes what the checkpoint's merged model computes; default dropout is one line before the weights load."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    folder, ckpt, _ = trained("qwen2_moe")
    with safe_open(f"{ckpt}/adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    for part in (".mlp.experts.base_layer.lora_A", ".mlp.experts.lora_A", ".mlp.shared_expert.down_proj.lora_A",
                 ".self_attn.q_proj.lora_A"):
        assert any(part in k for k in keys), part
    routing = [k for k in keys if ".mlp.gate." in k or "shared_expert_gate" in k]
    assert not routing, routing
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), ckpt).eval()
    loaded = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    assert loaded.keys() == set(keys)  # every tensor found its place (the experts' gate_up_proj at twice the rank)
    with safe_open(f"{ckpt}/adapter_model.safetensors", "pt") as f:
        assert all(torch.equal(loaded[k], f.get_tensor(k)) for k in keys)
    ids = torch.tensor([[9707, 11, 1246, 525, 498, 30]])
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    assert not torch.allclose(tuned, base)  # the adapter (2 steps at 1e-2) changes the logits
    torch.testing.assert_close(merged, tuned, rtol=1e-4, atol=1e-4)
    proc = tunesmith("sft", "--model", folder, "--dataset", GUIDE_DATA, "--output_dir", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "pass --lora_dropout 0" in proc.stderr.strip().splitlines()[-1]
    assert "loaded" not in proc.stderr and not (tmp_path / "out").exists()


def test_a_family_tunesmith_does_not_train_is_one_line_before_any_weights(tmp_path, default_model):
    """A vision-language Gemma 3 (its config alone: no weights are read) is named, with what to do."""
    from transformers import AutoConfig

    folder = tmp_path / "gemma3"
    AutoConfig.for_model("gemma3").save_pretrained(folder)
    copy_tokenizer(folder, default_model)
    for command in (["sft", "--dataset", GUIDE_DATA, "--output_dir", tmp_path / "out"], ["infer", "--query", "hi"]):
        proc = tunesmith(command[0], "--model", folder, *command[1:], check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "a gemma3 model (Gemma3ForConditionalGeneration" in lines[-1] and "text-only checkpoint" in lines[-1]
        assert "gemma3_text" in lines[-1] and not any("loaded" in line for line in lines)
