"""Each family's chat template, trained as it is served (issue 17): the official templates of Qwen3 (thinking
switch), Gemma 2 (no system role) and Llama 3 (header tokens) on the default model's tokenizer."""

from pathlib import Path

import pytest

from tunesmith.data.template import IGNORE, ChatTemplate

TEMPLATES = Path(__file__).parent / "templates"
# The families' own tokenizers have these as single tokens; the default model's tokenizer gets them added.
TOKENS = {"qwen3": ["<think>", "</think>"], "gemma2": ["<start_of_turn>", "<end_of_turn>"],
          "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}


@pytest.fixture(scope="module")
def tokenizer_for(default_model):
    from transformers import AutoTokenizer

    def make(family: str):
        tok = AutoTokenizer.from_pretrained(default_model)
        tok.chat_template = (TEMPLATES / f"{family}.jinja").read_text(encoding="utf-8")
        tok.add_tokens(TOKENS[family], special_tokens=family != "qwen3")
        return tok
    return make


def trained(tok, enc) -> list[str]:
    """The trained stretches of a sample, as text."""
    runs, current = [], []
    for i, label in zip(enc.input_ids, enc.labels):
        if label != IGNORE:
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def conversation(*turns):
    return [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(turns)]


def test_qwen3_records_without_reasoning_train_as_inference_with_thinking_off(tokenizer_for):
    tok = tokenizer_for("qwen3")
    template = ChatTemplate(tok, "You are a helpful assistant.")
    enc = template.encode(conversation("你是谁?", "我是 Swift-Robot。"))
    assert trained(tok, enc) == ["我是 Swift-Robot。<|im_end|>"]  # the empty think block is prompt, not answer
    served = ChatTemplate(tok, "You are a helpful assistant.", enable_thinking=False).encode_prompt(conversation("你是谁?"))
    assert enc.input_ids[: len(served)] == served and "<think>\n\n</think>" in tok.decode(served)


def test_qwen3_reasoning_is_trained_and_earlier_turns_follow_the_template(tokenizer_for):
    tok = tokenizer_for("qwen3")
    template = ChatTemplate(tok)
    enc = template.encode(conversation("1+1?", "<think>\nadd them\n</think>\n\n2", "2+2?", "<think>\nagain\n</think>\n\n4"))
    # the template drops the first answer's reasoning from the history and keeps the last one's
    assert trained(tok, enc) == ["2<|im_end|>", "<think>\nagain\n</think>\n\n4<|im_end|>"]
    forced = ChatTemplate(tok, enable_thinking=True).encode(conversation("1+1?", "2"))
    assert trained(tok, forced) == ["<think>\n\n</think>\n\n2<|im_end|>"]  # --enable_thinking true: as the model would answer


def test_gemma2_takes_the_system_prompt_into_the_first_turn(tokenizer_for):
    tok = tokenizer_for("gemma2")
    template = ChatTemplate(tok, "You are a helpful assistant.")
    enc = template.encode(conversation("Who are you?", "Swift-Robot.", "And?", "Made by CSDN."))
    assert trained(tok, enc) == ["Swift-Robot.<end_of_turn>", "Made by CSDN.<end_of_turn>"]
    prompt = tok.decode(template.encode_prompt(conversation("Who are you?")))
    assert prompt.endswith("<start_of_turn>user\nYou are a helpful assistant.\n\nWho are you?<end_of_turn>\n<start_of_turn>model\n")


def test_llama3_answers_end_with_eot(tokenizer_for):
    tok = tokenizer_for("llama3")
    enc = ChatTemplate(tok, "S").encode(conversation("Q?", "A."))
    assert trained(tok, enc) == ["A.<|eot_id|>"]
    assert tok.decode(ChatTemplate(tok, "S").encode_prompt(conversation("Q?"))).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


SHOWN = {  # what `data inspect` prints for one two-turn record with --system S: trained tokens in [[ ]]
    "qwen3": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1?<|im_end|>\n<|im_start|>assistant\n"  # (history: no think block)
             "[[A1.<|im_end|>]]\n<|im_start|>user\nQ2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n[[A2.<|im_end|>]]",
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ1?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n[[A1.<|eot_id|>]]<|start_header_id|>user<|end_header_id|>\n\nQ2?"
              "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n[[A2.<|eot_id|>]]",
    "gemma2": "<start_of_turn>user\nS\n\nQ1?<end_of_turn>\n<start_of_turn>model\n[[A1.<end_of_turn>]]\n<start_of_turn>user\nQ2?"
              "<end_of_turn>\n<start_of_turn>model\n[[A2.<end_of_turn>]]",
}


@pytest.mark.slow
@pytest.mark.parametrize("family", SHOWN)
def test_data_inspect_shows_each_family_trained_as_served(family, tokenizer_for, default_model, tmp_path):
    """`tunesmith data inspect` on a model folder with the family's template: each answer and its end-of-turn token
    are trained, nothing else (Qwen3's empty think block of thinking off is prompt)."""
    import json
    import shutil

    from conftest import tunesmith

    folder = tmp_path / family
    tokenizer_for(family).save_pretrained(folder)
    shutil.copy(default_model / "config.json", folder / "config.json")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": conversation("Q1?", "A1.", "Q2?", "A2.")}) + "\n", encoding="utf-8")
    proc = tunesmith("data", "inspect", "--model", folder, "--dataset", data, "--system", "S")
    assert SHOWN[family] in proc.stdout, proc.stdout


@pytest.mark.slow
def test_an_adapter_trained_with_thinking_off_is_served_with_thinking_off(tokenizer_for, default_model, tmp_path):
    """sft --enable_thinking false on a Qwen3-template model: infer, deploy, eval and export take the switch from the
    adapter's args.json (an explicit flag still wins), so the prompt opens with the empty think block it trained on."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import GUIDE_DATA, tunesmith
    from tunesmith.args import InferArguments
    from tunesmith.inference.infer import load_chat

    folder = tmp_path / "qwen3"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "qwen3", vocab_size=152064, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16)).save_pretrained(folder)
    tok = tokenizer_for("qwen3")
    tok.save_pretrained(folder)
    proc = tunesmith("sft", "--model", folder, "--dataset", GUIDE_DATA, "--max_steps", "1", "--enable_thinking", "false",
                     "--output_dir", tmp_path / "out")
    ckpt = proc.stdout.strip().splitlines()[-1].split("last_model_checkpoint: ")[1]
    question = [{"role": "user", "content": "你是谁?"}]
    served = load_chat(InferArguments(adapters=[ckpt], device="cpu"))
    assert tok.decode(served.template.encode_prompt(question)).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    thinking = load_chat(InferArguments(adapters=[ckpt], device="cpu", enable_thinking=True))
    assert tok.decode(thinking.template.encode_prompt(question)).endswith("<|im_start|>assistant\n")
