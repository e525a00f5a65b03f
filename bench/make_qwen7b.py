"""Build a Qwen2.5-7B-Instruct-shaped model folder with random (initialised) weights.

No model hub is reachable from the GPU machines, so benchmarks and the guide's GPU commands run on
the exact architecture with random weights. The tokenizer and chat template come from the offline
default model (same Qwen2.5 vocabulary).

    python bench/make_qwen7b.py OUT_DIR --tokenizer TOKENIZER_DIR [--layers N] [--family qwen3]

--family builds another family's 8B-class shape instead, on the same tokenizer (so each vocabulary is at least
the tokenizer's 151,665 ids: Llama 3.1's 128,256 becomes Qwen's 151,936; the others keep their own):
qwen3 (Qwen3-8B: q/k norms, head_dim 128), llama (Llama-3.1-8B: llama3 RoPE scaling), gemma3_text (Gemma-3-12B:
five sliding-window layers of 1,024 tokens to one global, (1 + w) norms, GeGLU, tied 262k embeddings), phi3
(Phi-4-mini: fused qkv/gate_up, partial rotary 0.75, longrope with made-up factors, tied 200k embeddings) and glm4
(GLM-4-9B-0414: fused gate_up, q/k/v biases, four norms a layer, interleaved partial rotary 0.5, 2 kv heads; its 151,552
ids become Qwen's 151,936).
"""

import argparse
import json
import shutil
import time
from pathlib import Path

QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "max_position_embeddings": 32768, "max_window_layers": 28, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "use_sliding_window": False, "tie_word_embeddings": False, "vocab_size": 152064,
    "bos_token_id": 151643, "eos_token_id": 151645, "attention_dropout": 0.0, "initializer_range": 0.02,
    "torch_dtype": "bfloat16", "use_cache": True,
}
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "tie_word_embeddings": False, "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645,
    "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "torch_dtype": "bfloat16",
    "use_cache": True,
}
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "vocab_size": 151936,
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16", "use_cache": True,
}
GEMMA3_12B = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 1024,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-06, "vocab_size": 262208, "tie_word_embeddings": True,
    "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    "torch_dtype": "bfloat16", "use_cache": True,
}
PHI4_MINI = {
    "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_act": "silu", "hidden_size": 3072,
    "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 24, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.75,
    "rms_norm_eps": 1e-05, "vocab_size": 200064, "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 32.0, "partial_rotary_factor": 0.75,
                        "original_max_position_embeddings": 4096, "short_factor": [1.0] * 48,
                        "long_factor": [1.0 + i / 8 for i in range(48)]},
    "torch_dtype": "bfloat16", "use_cache": True,
}
GLM4_9B = {
    "architectures": ["Glm4ForCausalLM"], "model_type": "glm4", "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 13696, "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 2,
    "head_dim": 128, "max_position_embeddings": 32768, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-05,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    "attention_bias": True, "attention_dropout": 0.0, "tie_word_embeddings": False, "vocab_size": 151936,
    "torch_dtype": "bfloat16", "use_cache": True,
}
QWEN3_30B_A3B = {  # 128 experts of 768, 8 routed a token (the expert count under both names transformers has used)
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_local_experts": 128,
    "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "attention_bias": False, "tie_word_embeddings": False, "vocab_size": 151936, "torch_dtype": "bfloat16", "use_cache": True,
}
SHAPES = {"qwen2": QWEN25_7B, "qwen3": QWEN3_8B, "llama": LLAMA31_8B, "gemma3_text": GEMMA3_12B, "phi3": PHI4_MINI,
          "glm4": GLM4_9B, "qwen3_moe": QWEN3_30B_A3B}
QWEN_IDS = {"bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643}  # the tokenizer's


def main():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--family", choices=list(SHAPES), default="qwen2")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = dict(SHAPES[a.family], **QWEN_IDS)
    layers = a.layers or base["num_hidden_layers"]
    cfg = dict(base, num_hidden_layers=layers, **({"max_window_layers": layers} if a.family == "qwen2" else {}))
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    t = time.time()
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    weight = next(p for p in model.model.layers[0].parameters() if p.dim() >= 2)  # (the MoEs' MLPs have no up_proj)
    std = weight.float().std().item()
    assert 0.005 < std < 0.1, f"weights look uninitialised (std {std})"
    model.generation_config.eos_token_id = [151645, 151643]
    model.save_pretrained(out)
    for f in Path(a.tokenizer).iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens", "vocab", "merges")):
            shutil.copy(f, out / f.name)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"folder": str(out), "params": n, "init_std": std, "seconds": round(time.time() - t, 1)}))


if __name__ == "__main__":
    main()
