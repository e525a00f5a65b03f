"""GGUF export of the families beyond qwen2 / SmolLM, proven in llama.cpp: tiny random Qwen3 (q/k norms, a
head_dim apart from hidden/heads), Mistral and Llama 3.1 (its RoPE scaling as llama.cpp's rope_freqs) models with
the default model's tokenizer, exported as a user does; llama.cpp's logits for a prompt equal transformers'."""

import shutil

import numpy as np
import pytest

from conftest import tunesmith

pytestmark = pytest.mark.slow
PROMPT = "中国的首都是哪里? What is the capital of France? 1234567"
FAMILIES = {
    "qwen3": dict(head_dim=32),
    "mistral": dict(head_dim=16, sliding_window=None),
    "llama": dict(head_dim=16, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 64}),
}


def tiny(kind: str, folder, default_model):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(kind, vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                  tie_word_embeddings=False, **FAMILIES[kind])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random weights large enough that the logits differ clearly between tokens
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    for f in default_model.iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, folder / f.name)
    return model


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_a_family_exported_to_gguf_gives_transformers_logits_in_llama_cpp(kind, tmp_path, default_model):
    import torch
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    model = tiny(kind, tmp_path / kind, default_model)
    proc = tunesmith("export", "--model", tmp_path / kind, "--to_gguf", "true", "--gguf_type", "f32",
                     "--output_dir", tmp_path / "gguf")
    path = tmp_path / "gguf" / "model-f32.gguf"
    assert proc.stdout.strip().splitlines()[-1] == f"gguf_file: {path}"

    ids = AutoTokenizer.from_pretrained(tmp_path / kind)(PROMPT)["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    llm = Llama(model_path=str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == ids  # the same tokenizer inside the file
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    assert expected.std() > 0.5  # logits that tell tokens apart, so equal logits mean the same model
    np.testing.assert_allclose(got, expected, atol=2e-3 * np.abs(expected).max(), rtol=0)
    assert (got.argmax(-1) == expected.argmax(-1)).all()
