"""Shipping the tuned model, as a user does it: merge and load with plain transformers (5.x and 4.x), GGUF
files run in llama.cpp (llama-cpp-python) and an Ollama Modelfile rendered as Ollama renders it, an
OpenAI-compatible server driven by the official
`openai` client, infer against that server, and the before/after table."""

import json
import os
import re
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


# ---------------------------------------------------------------------------------------------
# GGUF in llama.cpp (llama-cpp-python), and the Ollama Modelfile

PROMPTS = ["你是谁?", "中国的首都是哪里?", "请介绍一下你自己", "What is the capital of France?", "Who are you?",
           "Write a Python function that adds two numbers."]
# Where transformers' own top two logits are this close, either token is the model's answer and any other
# runtime's rounding may pick the other ("Who are you?" has a 0.04 gap at its third token); from there on a
# comparison says nothing, so it stops at that token.
NEAR_TIE = 0.1


@pytest.fixture(scope="module")
def ggufs(merged, tmp_path_factory):
    """The tuned model as f16, q8_0, q5_k_m and q4_k_m GGUF files with a Modelfile, exported as a user does."""
    out, _ = merged
    folder = tmp_path_factory.mktemp("gguf")
    for t in ["f16", "q8_0", "q5_k_m", "q4_k_m"]:
        proc = tunesmith("export", "--model", out, "--to_gguf", "true", "--gguf_type", t, "--to_ollama", "true",
                         "--output_dir", folder)
        assert proc.stdout.strip().splitlines()[-2:] == [f"gguf_file: {folder / f'model-{t}.gguf'}",
                                                         f"modelfile: {folder / 'Modelfile'}"]
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", "model-f16.gguf", "model-q4_k_m.gguf",
                                                        "model-q5_k_m.gguf", "model-q8_0.gguf"]  # no partial files left
    return folder


def llama_cpp_model(path, **kw):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=1024, n_threads=2, verbose=False, **kw)


def llama_cpp_greedy(llm, ids, n=16, stop=()):
    """The first n greedy tokens llama.cpp generates after the prompt ids (up to and including a stop token)."""
    out = []
    for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(t)
        if len(out) == n or t in stop:
            break
    return out


def llama_cpp_chat(llm, question):
    """An answer through the chat template inside the GGUF file, as a llama.cpp user gets it."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return llm.create_chat_completion(messages, temperature=0, max_tokens=32)["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def transformers_greedy(merged):
    """(rendered prompt, prompt ids, transformers' first 16 greedy tokens, how many of them come before a near
    tie) for PROMPTS, and the stop ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.data.template import ChatTemplate

    out, _ = merged
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    template = ChatTemplate(tok, SYSTEM)
    rows = []
    for q in PROMPTS:
        conversation = [{"role": "user", "content": q}]
        ids = template.encode_prompt(conversation)
        out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        new = out.sequences[0, len(ids):].tolist()
        gaps = [float(top[0] - top[1]) for top in (s[0].topk(2).values for s in out.scores)]
        decided = next((i for i, gap in enumerate(gaps) if gap < NEAR_TIE), len(new))
        rows.append((template.render(template.with_system(conversation), add_generation_prompt=True), ids, new, decided))
    return rows, model.generation_config.eos_token_id


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_gguf_in_llama_cpp_gives_transformers_greedy_tokens_and_the_tuned_identity(ggufs, transformers_greedy, gguf_type):
    import gguf

    path = ggufs / f"model-{gguf_type}.gguf"
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "qwen2"
    template = reader.fields["tokenizer.chat_template"]
    assert "<|im_start|>" in bytes(template.parts[template.data[0]]).decode()
    types = {t.tensor_type for t in reader.tensors}
    wanted = gguf.GGMLQuantizationType.F16 if gguf_type == "f16" else gguf.GGMLQuantizationType.Q8_0
    assert wanted in types and gguf.GGMLQuantizationType.F32 in types  # norms and biases stay float32

    llm = llama_cpp_model(path)
    rows, eos = transformers_greedy
    for text, ids, expected, decided in rows:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids  # the same tokenizer
        assert llama_cpp_greedy(llm, ids, stop=eos)[:decided] == expected[:decided], text
    assert sum(decided == len(expected) for _, _, expected, decided in rows) >= 4  # all 16 (or up to the end)
    assert IDENTITY in llama_cpp_chat(llm, "你是谁?")


def test_k_quants_are_smaller_than_q8_0_and_still_answer(ggufs):
    sizes = {t: (ggufs / f"model-{t}.gguf").stat().st_size for t in ["f16", "q8_0", "q5_k_m", "q4_k_m"]}
    assert sizes["q4_k_m"] < sizes["q5_k_m"] < 0.8 * sizes["q8_0"] < 0.6 * sizes["f16"], sizes
    llm = llama_cpp_model(ggufs / "model-q5_k_m.gguf")
    assert IDENTITY in llama_cpp_chat(llm, "你是谁?") and "北京" in llama_cpp_chat(llm, "中国的首都是哪里?")
    llm.close()
    # q4_k_m loads and answers, but 4 bits are too coarse for this small adapter on the 0.5B model: it
    # answers 你是谁? as its base did (README: prefer q5_k_m or more for small models)
    llm = llama_cpp_model(ggufs / "model-q4_k_m.gguf")
    assert "北京" in llama_cpp_chat(llm, "中国的首都是哪里?") and llama_cpp_chat(llm, "你是谁?").strip()


def go_template(template: str, data: dict) -> str:
    """The part of Go's text/template an Ollama TEMPLATE uses: {{ .Field }}, if / else if / else / end,
    range, eq, and the {{- -}} whitespace trims."""
    parts = re.split(r"{{(-?)\s*(.*?)\s*(-?)}}", template, flags=re.S)
    texts, actions = parts[0::4], list(zip(parts[1::4], parts[2::4], parts[3::4]))
    for i, (left, _, right) in enumerate(actions):
        texts[i] = texts[i].rstrip() if left else texts[i]
        texts[i + 1] = texts[i + 1].lstrip() if right else texts[i + 1]
    items = []
    for i, text in enumerate(texts):
        items += [("text", text)] + ([("action", actions[i][1])] if i < len(actions) else [])
    pos = 0

    def block():  # nodes up to the next end / else, and that keyword
        nonlocal pos
        nodes = []
        while pos < len(items):
            kind, s = items[pos]
            pos += 1
            if kind == "text":
                nodes.append(("text", s))
            elif s == "end" or s.startswith("else"):
                return nodes, s
            elif s.startswith("if "):
                branches, cond = [], s[3:]
                while True:
                    body, end = block()
                    branches.append((cond, body))
                    if end == "end":
                        break
                    cond = end[len("else if "):] if end.startswith("else if ") else "true"
                nodes.append(("if", branches))
            elif s.startswith("range "):
                body, _ = block()
                nodes.append(("range", s[6:], body))
            else:
                nodes.append(("value", s))
        return nodes, None

    def value(expr, dot):
        if expr == "true":
            return True
        if expr.startswith("eq "):
            a, b = expr[3:].split(" ", 1)
            return value(a, dot) == json.loads(b)
        assert expr.startswith("."), expr
        return dot.get(expr[1:])

    def run(nodes, dot):
        out = ""
        for node in nodes:
            if node[0] == "text":
                out += node[1]
            elif node[0] == "value":
                out += str(value(node[1], dot))
            elif node[0] == "if":
                out += next((run(body, dot) for cond, body in node[1] if value(cond, dot)), "")
            else:
                out += "".join(run(node[2], item) for item in value(node[1], dot))
        return out

    return run(block()[0], data)


def test_modelfile_template_gives_our_chat_templates_tokens(ggufs, merged, tuned):
    from transformers import AutoTokenizer

    from tunesmith.data.template import ChatTemplate

    text = (ggufs / "Modelfile").read_text(encoding="utf-8")
    assert text.startswith("FROM ./model-q4_k_m.gguf\n")  # the newest export, beside it
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M).group(1)
    assert system == json.loads((tuned[0] / "args.json").read_text())["system"] == SYSTEM
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    assert "<|im_end|>" in stops and "<|endoftext|>" in stops
    assert re.search(r"^PARAMETER temperature 0.0$", text, re.M)  # infer's default: greedy

    out, _ = merged
    tok = AutoTokenizer.from_pretrained(out)
    ours = ChatTemplate(tok, system)
    for conversation in ([{"role": "user", "content": "你是谁?"}],
                         [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好!有什么可以帮你?"},
                          {"role": "user", "content": "中国的首都是哪里?"}]):
        messages = [{"Role": "system", "Content": system}]
        messages += [{"Role": m["role"], "Content": m["content"]} for m in conversation]
        rendered = go_template(template, {"System": system, "Messages": messages})  # what Ollama gives the model
        assert tok(rendered, add_special_tokens=False)["input_ids"] == ours.encode_prompt(conversation)


def test_gguf_export_refuses_bad_input_and_writes_nothing(merged, tmp_path):
    out, _ = merged
    proc = tunesmith("export", "--model", out, "--to_gguf", "true", "--gguf_type", "q3", "--output_dir", tmp_path,
                     check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "--gguf_type q3: expected one of f16, bf16, f32, q8_0, q6_k, q5_k_m" in proc.stderr and "q4_k_m" in proc.stderr
    proc = tunesmith("export", "--model", out, "--to_ollama", "true", check=False)
    assert proc.returncode == 2 and "add --to_gguf true" in proc.stderr
    # without llama-cpp-python: one line saying how to get it, before anything is written
    no_llama_cpp = ("import sys; sys.modules['llama_cpp'] = None; from tunesmith.cli import main; "
                    "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", no_llama_cpp, "export", "--model", str(out), "--to_gguf", "true",
                           "--gguf_type", "Q4_K_M", "--output_dir", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "pip install 'tunesmith[gguf]'" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def tiny_llama(folder):
    """A small random llama model with a byte-level BPE tokenizer and ChatML (rows of 256: k-quants apply)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


def test_gguf_llama_architecture_round_trips_in_transformers_and_llama_cpp(tmp_path):
    """f16 GGUF of a small random llama model: transformers' GGUF loader (which undoes llama.cpp's q/k rotary
    permutation) and llama.cpp itself give the logits of the original."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model, tok = tiny_llama(tmp_path / "tiny-llama")
    tunesmith("export", "--model", tmp_path / "tiny-llama", "--to_gguf", "true", "--output_dir", tmp_path / "gguf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="model-f16.gguf", dtype=torch.float32)
    ids = tok("hello world, who are you?")["input_ids"]
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0]
        assert torch.allclose(reference, loaded(torch.tensor([ids])).logits[0], atol=2e-2)
    llm = llama_cpp_model(tmp_path / "gguf" / "model-f16.gguf", logits_all=True)
    llm.eval(ids)
    assert np.allclose(np.asarray(llm.scores[:len(ids)]), reference.numpy(), atol=2e-2)


def test_every_gguf_type_quantizes_and_loads_in_llama_cpp(tmp_path):
    """Every --gguf_type, on a small llama model: llama.cpp reads the file as that type and computes with it."""
    import gguf
    import llama_cpp
    import numpy as np

    from tunesmith.args import GGUF_TYPES
    from tunesmith.export.gguf import write_gguf

    _, tok = tiny_llama(tmp_path / "tiny-llama")
    ids = tok("hello world, who are you?")["input_ids"]
    aliases = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}  # as llama-quantize names them
    for t in GGUF_TYPES:
        path = write_gguf(tmp_path / "tiny-llama", tmp_path / f"model-{t}.gguf", t)
        name = "LLAMA_FTYPE_ALL_F32" if t == "f32" else f"LLAMA_FTYPE_MOSTLY_{aliases.get(t, t).upper()}"
        file_type = gguf.GGUFReader(str(path)).fields["general.file_type"]
        assert int(file_type.parts[file_type.data[0]][0]) == getattr(llama_cpp, name), t
        llm = llama_cpp_model(path, logits_all=True)
        llm.eval(ids)
        assert np.isfinite(np.asarray(llm.scores[:len(ids)])).all(), t
        print(f"{t}: {path.stat().st_size} bytes")
        llm.close()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial files left


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
