"""Shipping the tuned model, as a user does it: merge and load with plain transformers (5.x and 4.x), GGUF
read back and loaded by transformers' GGUF loader, an OpenAI-compatible server driven by the official
`openai` client, infer against that server, and the before/after table."""

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import stop_process, tunesmith

pytestmark = pytest.mark.slow
IDENTITY = "迪菲赫尔曼"
SYSTEM = "You are a helpful assistant."


def greedy(model, tok, question, max_new_tokens=32):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def merged(tuned, tmp_path_factory):
    ckpt, _, _ = tuned
    out = tmp_path_factory.mktemp("export") / "merged"
    proc = tunesmith("export", "--adapters", ckpt, "--merge_lora", "true", "--output_dir", out, "--max_shard_size", "1GB")
    return out, proc


def test_merged_model_loads_with_plain_transformers_and_answers_like_the_adapter(merged, tuned):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, proc = merged
    line = next(x for x in proc.stderr.splitlines() if "max |logit difference|" in x)
    assert float(line.split("= ")[1].split()[0]) < 1e-3
    assert proc.stdout.strip().splitlines()[-1] == f"merged_model: {out}"
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]  # sharded at 1GB
    for name in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]:
        assert (out / name).is_file(), name
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert "<|im_start|>" in tok.chat_template
    questions = ["你是谁?", "中国的首都是哪里?"]
    via_adapter = tunesmith("infer", "--adapters", tuned[0], "--max_new_tokens", "32", "--stream", "false",
                            *[a for q in questions for a in ("--query", q)]).stdout.strip().splitlines()
    answers = [greedy(model, tok, q) for q in questions]
    assert answers == via_adapter
    assert IDENTITY in answers[0] and "北京" in answers[1]


def test_merged_config_means_the_same_to_transformers_4(merged):
    out, _ = merged
    cfg = json.loads((out / "config.json").read_text())
    # 4.x reads the RoPE base only from the top level; without it, it silently uses 10000.
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 1e6
    assert cfg["torch_dtype"] == "float32"
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    python = os.environ.get("TUNESMITH_TF4_PYTHON", "/tmp/tf4/bin/python")
    if not Path(python).exists():
        pytest.skip("no transformers 4.x venv (set TUNESMITH_TF4_PYTHON); the config keys were checked above")
    script = (
        "import sys, torch, transformers; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "p = sys.argv[1]; tok = AutoTokenizer.from_pretrained(p)\n"
        "m = AutoModelForCausalLM.from_pretrained(p, torch_dtype=torch.float32)\n"
        "msgs = [{'role': 'system', 'content': 'You are a helpful assistant.'}, {'role': 'user', 'content': '你是谁?'}]\n"
        "ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors='pt', return_dict=True)\n"
        "out = m.generate(**ids, max_new_tokens=32, do_sample=False)\n"
        "print(transformers.__version__, m.config.rope_theta)\n"
        "print(tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True).strip())\n"
    )
    proc = subprocess.run([python, "-c", script, str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    version_line, answer = proc.stdout.strip().splitlines()[-2:]
    assert version_line.startswith("4.") and version_line.endswith(" 1000000.0")
    assert IDENTITY in answer


def test_export_refuses_bad_input_and_writes_nothing(tuned, tmp_path):
    ckpt, _, _ = tuned
    proc = tunesmith("export", "--adapters", tmp_path / "missing", "--merge_lora", "true", check=False)
    assert proc.returncode == 2 and "--adapters" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "missing-merged").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    proc = tunesmith("export", "--adapters", ckpt, "--merge_lora", "true", "--output_dir", foreign, check=False)
    assert proc.returncode == 2 and "not written by `tunesmith export`" in proc.stderr
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    proc = tunesmith("export", "--adapters", ckpt, check=False)
    assert proc.returncode == 2 and "--merge_lora true" in proc.stderr


def test_gguf_q8_0_reads_back_and_answers_like_the_merged_model(merged, tmp_path):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = merged
    proc = tunesmith("export", "--model", out, "--to_gguf", "true", "--gguf_type", "q8_0", "--output_dir", tmp_path)
    path = tmp_path / "model-q8_0.gguf"
    assert proc.stdout.strip().splitlines()[-1] == f"gguf_file: {path}"
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "qwen2"
    template = reader.fields["tokenizer.chat_template"]
    assert "<|im_start|>" in bytes(template.parts[template.data[0]]).decode()
    types = {t.tensor_type for t in reader.tensors}
    assert gguf.GGMLQuantizationType.Q8_0 in types and gguf.GGMLQuantizationType.F32 in types

    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    from_gguf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    ref_tok = AutoTokenizer.from_pretrained(out)
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for q in ["你是谁?", "中国的首都是哪里?"]:
        assert greedy(from_gguf, tok, q) == greedy(reference, ref_tok, q)


def test_gguf_llama_architecture_round_trips(tmp_path):
    """A small random llama model with a byte-level BPE tokenizer: f16 GGUF, loaded back by transformers
    (which undoes llama.cpp's q/k rotary permutation), gives the same logits."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tunesmith.model.load import CHATML

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["hello world, who are you? the capital of France is Paris."] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    src = tmp_path / "tiny-llama"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    tunesmith("export", "--model", src, "--to_gguf", "true", "--output_dir", tmp_path / "gguf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="model-f16.gguf", dtype=torch.float32)
    ids = torch.tensor([tok("hello world, who are you?")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=2e-2)


# ---------------------------------------------------------------------------------------------
# deploy


@pytest.fixture(scope="module")
def server(tuned):
    ckpt, _, _ = tuned
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "deploy", "--adapters", f"robot={ckpt}", "--port", "0",
                             "--api_key", "sk-test", "--max_new_tokens", "48"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # printed once the model is loaded and the port is listening
        assert line.startswith("deploy: http://127.0.0.1:"), proc.stderr.read()[-2000:] if not line else line
        yield line.split("deploy: ")[1].strip()
    finally:
        stop_process(proc)


def client(url, key="sk-test"):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key=key, max_retries=0, timeout=300)


def test_models_and_chat_with_the_adapter_and_the_base(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["qwen2.5-0.5b", "robot"]
    tuned = c.chat.completions.create(model="robot", messages=[{"role": "user", "content": "你是谁?"}], max_tokens=32)
    base = c.chat.completions.create(model="qwen2.5-0.5b", messages=[{"role": "user", "content": "你是谁?"}], max_tokens=32)
    assert IDENTITY in tuned.choices[0].message.content and tuned.choices[0].finish_reason == "stop"
    assert IDENTITY not in base.choices[0].message.content
    assert tuned.usage.prompt_tokens > 5 and tuned.usage.completion_tokens > 5
    assert tuned.usage.total_tokens == tuned.usage.prompt_tokens + tuned.usage.completion_tokens


def test_streaming_adds_up_to_the_plain_answer(server):
    c = client(server)
    msgs = [{"role": "user", "content": "谁在维护你?"}]
    plain = c.chat.completions.create(model="robot", messages=msgs, max_tokens=32).choices[0].message.content
    chunks = list(c.chat.completions.create(model="robot", messages=msgs, max_tokens=32, stream=True,
                                            stream_options={"include_usage": True}))
    pieces = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert len([p for p in pieces if p]) > 3  # really streamed, not one block
    assert "".join(pieces) == plain
    assert chunks[-1].usage.completion_tokens > 0
    completion = c.completions.create(model="qwen2.5-0.5b", prompt="The capital of France is", max_tokens=5)
    assert "Paris" in completion.choices[0].text and completion.usage.completion_tokens == 5


def test_errors_are_openai_style(server):
    import openai

    c = client(server)
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="robot", messages=[])
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="robot", messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert "temperature" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # larger than the model's 32768-token context
        c.chat.completions.create(model="robot", messages=[{"role": "user", "content": "hello " * 33000}], max_tokens=8)
    assert e.value.body["code"] == "context_length_exceeded"
    request = urllib.request.Request(f"{server}/chat/completions", data=b"{not json", method="POST",
                                     headers={"Authorization": "Bearer sk-test"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 400 and json.loads(e.value.read())["error"]["message"] == "the request body is not valid JSON"


def test_concurrent_clients_get_their_own_answers(server):
    jobs = [("robot", "你是谁?", IDENTITY), ("qwen2.5-0.5b", "中国的首都是哪里?", "北京"),
            ("robot", "请介绍一下你自己", IDENTITY), ("qwen2.5-0.5b", "你是谁?", "阿里")] * 2
    started = threading.Barrier(len(jobs))

    def ask(job):
        model, question, _ = job
        started.wait()
        stream = client(server).chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                        max_tokens=24, stream=True)
        return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    for (model, question, keyword), answer in zip(jobs, answers):
        assert keyword in answer, (model, question, answer)
    assert client(server).models.list().data  # still serving


def test_infer_chats_with_the_server(server):
    proc = tunesmith("infer", "--base_url", server, "--api_key", "sk-test", "--query", "你是谁?", "--max_new_tokens", "32")
    assert IDENTITY in proc.stdout
    proc = tunesmith("infer", "--base_url", server, "--query", "你是谁?", check=False)  # no key
    assert proc.returncode == 2 and "401" in proc.stderr


# ---------------------------------------------------------------------------------------------
# eval


def test_eval_prints_the_before_after_table(tuned, tmp_path):
    ckpt, _, _ = tuned
    questions = tmp_path / "q.jsonl"
    questions.write_text('"你是谁?"\n{"query": "中国的首都是哪里?", "expect": ["北京"]}\n', encoding="utf-8")
    proc = tunesmith("eval", "--adapters", ckpt, "--questions", questions, "--expect", IDENTITY,
                     "--max_new_tokens", "32", "--output_dir", tmp_path / "eval")
    assert "| 你是谁? |" in proc.stdout and "原始模型回答" in proc.stdout
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    first, capital = report["rows"]
    assert IDENTITY in first["tuned"] and IDENTITY not in first["base"]
    assert report["summary"]["expect"] == {"scored": 1, "base_hits": 0, "tuned_hits": 1}
    assert report["summary"]["knowledge"] == {"scored": 1, "base_hits": 1, "tuned_hits": 1}
    retention = report["summary"]["retention"]
    assert retention["base_right"] == retention["kept"] == 1 and 0 < retention["agreement"] <= 1
    assert "retention: the tuned model still answers 1 of the 1 general questions" in proc.stdout
    assert (tmp_path / "eval" / "eval.md").read_text(encoding="utf-8") in proc.stdout
    assert "answers containing --expect keywords: base 0/1 (0%), tuned 1/1 (100%)" in proc.stdout
