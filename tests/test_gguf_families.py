"""GGUF export of the families beyond qwen2 / SmolLM, proven in llama.cpp: tiny random Qwen3 (q/k norms, a
head_dim apart from hidden/heads), Mistral and Llama 3.1 (its RoPE scaling as llama.cpp's rope_freqs) models with
the default model's tokenizer, exported as a user does; llama.cpp's logits for a prompt equal transformers'. Then
Gemma 2, Gemma 3 and Phi-3 with a SentencePiece-style tokenizer built here, and Qwen3-MoE: as f16 the same
tokens for the prompts and the same greedy continuation as transformers, as q8_0 the same first token."""

import json
import shutil

import numpy as np
import pytest

from conftest import ROOT, copy_tokenizer, tunesmith

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


def test_the_gguf_carries_the_chat_template_transformers_serves(tmp_path, default_model):
    """A folder with two templates (chat_template.jinja and an older one in tokenizer_config.json): the GGUF carries
    the one transformers' tokenizer reads, which is the one sft trained and infer serves."""
    import gguf
    from transformers import AutoTokenizer

    folder = tmp_path / "llama"
    tiny("llama", folder, default_model)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = "{{ 'an older template' }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    served = AutoTokenizer.from_pretrained(folder).chat_template
    assert served == (folder / "chat_template.jinja").read_text(encoding="utf-8")
    tunesmith("export", "--model", folder, "--to_gguf", "true", "--gguf_type", "f32", "--output_dir", tmp_path / "gguf")
    field = gguf.GGUFReader(str(tmp_path / "gguf" / "model-f32.gguf")).fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == served


# ---------------------------------------------------------------------------------------------
# SentencePiece-style families (Gemma 2, Gemma 3, Phi-3) and Qwen3-MoE: f16 greedy tokens as transformers', q8_0 runs

PROMPTS = ["The capital of France is Paris. Who are you?", "中国的首都是哪里? 1234567"]
TEXT = ["the capital of france is paris, the capital of italy is rome. who are you? i am a model. 0123456789",
        "The Capital Of France Is Paris. Who Are You? It Is Me."]
PHI3_CHAT = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
STYLES = {  # specials in id order, and whether "▁" goes before the text (Llama 2's way) or not (Gemma's)
    "gemma": dict(specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], prefix=False),
    "llama": dict(specials=["<unk>", "<s>", "</s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"], prefix=True),
}


def spm_tokenizer(folder, style: str):
    """A small tokenizer of SentencePiece's kind as Gemma's and Llama 2's tokenizer.json are: BPE over "▁"-for-space
    text, the 256 <0xNN> byte pieces for what its vocabulary lacks (the Chinese prompt), a <bos> put first."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials, prefix = STYLES[style]["specials"], STYLES[style]["prefix"]
    bos, eos, unk, pad = (specials[2], specials[1], specials[3], specials[0]) if style == "gemma" else \
        (specials[1], specials[2], specials[0], specials[0])
    space = normalizers.Replace(" ", "▁")
    trained = Tokenizer(models.BPE(unk_token=unk))
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), space]) if prefix else space
    trained.train_from_iterator(TEXT * 10, trainers.BpeTrainer(vocab_size=200, special_tokens=specials))
    learnt = json.loads(trained.to_str())["model"]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)]  # SentencePiece's order: specials, bytes, the rest
    pieces += [t for t, _ in sorted(learnt["vocab"].items(), key=lambda kv: kv[1]) if t not in specials]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learnt["merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(pieces)}, merges, unk_token=unk, byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = trained.normalizer
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B:1",
                                                       special_tokens=[(bos, pieces.index(bos))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad)
    hf.chat_template = (ROOT / "tests" / "templates" / "gemma2.jinja").read_text() if style == "gemma" else PHI3_CHAT
    hf.save_pretrained(folder)
    return hf


NEW_FAMILIES = {  # model_type: (tokenizer style or None for the default model's byte-level BPE, config)
    "gemma2": ("gemma", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8)),
    "gemma3_text": ("gemma", dict(num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                  rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                      "rope_theta": 1000000.0},
                                                   "sliding_attention": {"rope_type": "default",
                                                                         "rope_theta": 10000.0}})),
    "phi3": ("llama", dict(max_position_embeddings=1024, original_max_position_embeddings=256,
                           rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                            "short_factor": [1.0 + i / 8 for i in range(8)],
                                            "long_factor": [2.0 + i for i in range(8)]})),
    "qwen3_moe": (None, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)),
}


def tiny_new(kind: str, folder, default_model):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    style, extra = NEW_FAMILIES[kind]
    folder.mkdir()
    if style:
        tok = spm_tokenizer(folder, style)
    else:
        copy_tokenizer(folder, default_model)
        tok = AutoTokenizer.from_pretrained(folder)
    shape = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = AutoConfig.for_model(kind, **{**shape, **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random weights large enough that the logits differ clearly between tokens; norms
        for p in model.parameters():  # off their start (1, or Gemma's 0 meaning 1) so that each is checked
            p.normal_(0, 0.2) if p.ndim >= 2 else p.add_(torch.randn_like(p) * 0.1)
        if config.tie_word_embeddings:  # Gemma's: a small embedding (its input is scaled by sqrt(hidden)), else the
            model.get_input_embeddings().weight.normal_(0, 0.05)  # residual is the last token and greedy repeats it,
            model.model.norm.weight.add_(4.0)  # and a final norm that makes logits of it that tell tokens apart
    model.save_pretrained(folder)
    return model, AutoTokenizer.from_pretrained(folder)


def greedy_transformers(model, ids: list[int], n: int) -> tuple[list[int], "np.ndarray", list[float]]:
    """n greedy tokens after ids, the logits of the prompt's last token, and each step's lead of the top logit
    over the second."""
    import torch

    ids, first, leads = list(ids), None, []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].numpy()
            first = logits if first is None else first
            top2 = np.sort(logits)[-2:]
            leads.append(float(top2[1] - top2[0]))
            ids.append(int(logits.argmax()))
    return ids[-n:], first, leads


def same_greedy(expected: list[int], got: list[int], leads: list[float], tie: float) -> int:
    """How many greedy tokens agree before the end or a step where they differ because transformers' own top two
    logits were within `tie` (the 16-bit file may take the other there, and the continuations part); a
    difference anywhere else fails."""
    for i, (e, g) in enumerate(zip(expected, got)):
        if e != g:
            assert leads[i] < tie, f"greedy token {i}: {g}, transformers {e} (its lead {leads[i]:.3f})"
            return i
    return len(expected)


def greedy_llama_cpp(llm, ids: list[int], n: int) -> tuple[list[int], "np.ndarray"]:
    llm.reset()
    llm.eval(ids)
    first = np.array(llm.scores[llm.n_tokens - 1])
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out, first


@pytest.mark.parametrize("kind", list(NEW_FAMILIES))
def test_new_family_in_llama_cpp_gives_transformers_greedy_tokens(kind, tmp_path, default_model):
    """f16: llama.cpp tokenizes the prompts as transformers does and its first 16 greedy tokens and last-token
    logits equal transformers'; q8_0: llama.cpp loads the file as q8_0 and its top token agrees."""
    import gguf
    from llama_cpp import Llama

    from tunesmith.export.gguf import write_gguf

    model, tok = tiny_new(kind, tmp_path / kind, default_model)
    proc = tunesmith("export", "--model", tmp_path / kind, "--to_gguf", "true", "--output_dir", tmp_path / "gguf")
    path = tmp_path / "gguf" / "model-f16.gguf"
    assert proc.stdout.strip().splitlines()[-1] == f"gguf_file: {path}"
    q8 = write_gguf(tmp_path / kind, tmp_path / "gguf" / "model-q8_0.gguf", "q8_0")
    types = {t.tensor_type for t in gguf.GGUFReader(str(q8)).tensors}
    assert gguf.GGMLQuantizationType.Q8_0 in types

    f16 = Llama(model_path=str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    q8_0 = Llama(model_path=str(q8), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]  # with <bos> where the tokenizer puts one
        assert f16.tokenize(prompt.encode(), add_bos=True, special=False) == ids, prompt
        expected, logits, leads = greedy_transformers(model, ids, 16)
        got, got_logits = greedy_llama_cpp(f16, ids, 16)
        assert logits.std() > 0.5  # logits that tell tokens apart, so equal logits mean the same model
        assert len(ids) > 8 and len(set(expected)) > 3  # past the sliding window (8), a continuation that varies
        gap = np.abs(got_logits - logits).max() / np.abs(logits).max()
        agreed = same_greedy(expected, got, leads, tie=1e-2 * np.abs(logits).max())
        print(f"{kind} f16 {prompt[:12]!r}: max logit gap {gap:.2e} of the largest; {agreed}/16 greedy tokens agree "
              f"({'all' if agreed == 16 else 'then a near tie'})")
        assert gap < 1e-2 and agreed >= 8
        q8_tokens, q8_logits = greedy_llama_cpp(q8_0, ids, 4)
        print(f"{kind} q8_0: top token {q8_tokens[0]} vs {expected[0]}, max gap "
              f"{np.abs(q8_logits - logits).max() / np.abs(logits).max():.2e}")
        assert np.isfinite(q8_logits).all() and q8_tokens[0] == expected[0]


REFUSED = {  # what llama.cpp computes one fixed way, in a config that differs: one line, before any weight is read
    "qwen3_moe": (dict(num_experts=4, norm_topk_prob=False), "norm_topk_prob false"),
    "gemma2": (dict(tie_word_embeddings=False), "an output matrix apart from its embedding"),
    "gemma3_text": (dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"]),
                    "layer_types other than llama.cpp's gemma3 pattern"),
    "phi3": (dict(pad_token_id=0), "no <|endoftext|> token"),
    "gemma3": ({}, "export its text model, model_type gemma3_text"),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_export_refuses_in_one_line_what_llama_cpp_would_compute_otherwise(kind, tmp_path):
    from transformers import AutoConfig

    overrides, message = REFUSED[kind]
    folder = tmp_path / kind
    AutoConfig.for_model(kind, **overrides).save_pretrained(folder)  # the config alone: no weights are read
    spm_tokenizer(folder, "gemma")  # Phi-3's without its <|endoftext|>
    proc = tunesmith("export", "--model", folder, "--to_gguf", "true", "--output_dir", tmp_path / "gguf", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "gguf").exists()
