"""Build a Qwen2.5-7B-Instruct-shaped model folder with random (initialised) weights.

No model hub is reachable from the GPU machines, so benchmarks and the guide's GPU commands run on
the exact architecture with random weights. The tokenizer and chat template come from the offline
default model (same Qwen2.5 vocabulary).

    python bench/make_qwen7b.py OUT_DIR --tokenizer TOKENIZER_DIR [--layers N]
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


def main():
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--layers", type=int, default=28)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(QWEN25_7B, num_hidden_layers=a.layers, max_window_layers=a.layers)
    config = Qwen2Config(**cfg)
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
