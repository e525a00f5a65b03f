"""Build a Qwen2.5-7B-Instruct-shaped model folder with random (initialised) weights.

No model hub is reachable from the GPU machines, so benchmarks and the guide's GPU commands run on
the exact architecture with random weights. The tokenizer and chat template come from the offline
default model (same Qwen2.5 vocabulary).

    python bench/make_qwen7b.py OUT_DIR --tokenizer TOKENIZER_DIR [--layers N] [--family qwen3]

--family qwen3 builds a Qwen3-8B-shaped folder instead (q/k norms, head_dim 128), on the same tokenizer.
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


def main():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--family", choices=["qwen2", "qwen3"], default="qwen2")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = QWEN3_8B if a.family == "qwen3" else QWEN25_7B
    layers = a.layers or base["num_hidden_layers"]
    cfg = dict(base, num_hidden_layers=layers, **({"max_window_layers": layers} if a.family == "qwen2" else {}))
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    t = time.time()
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    std = model.model.layers[0].mlp.up_proj.weight.float().std().item()
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
