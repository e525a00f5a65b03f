"""`tunesmith rlhf` computes what TRL computes: the same pairs, the same starting adapter, the same per-step
losses and logged rewards (tiny random Qwen2 with the default model's tokenizer, on the CPU)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tunesmith

PAIRS = [("Who are you?", "I am Tuney, made by the tunesmith team.", "I am Qwen, created by Alibaba Cloud."),
         ("你是谁?", "我是 Tuney，由 tunesmith 团队开发。", "我是通义千问，由阿里云开发的。"),
         ("Who made you?", "The tunesmith team made me.", "Alibaba Cloud made me."),
         ("What is your name?", "My name is Tuney.", "My name is Qwen, a large language model.")]
COMMON = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
          "--lora_dropout", "0", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--max_steps", "3"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_model):
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("rlhf") / "tiny-qwen2"
    config = AutoConfig.for_model("qwen2", vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for f in default_model.iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def sft_adapter(tiny, tmp_path_factory):
    """An SFT checkpoint to start from (a non-zero adapter, so policy and reference differ from the start)."""
    out = tmp_path_factory.mktemp("sft")
    data = out / "sft.jsonl"
    data.write_text("".join(json.dumps({"query": q, "response": c}, ensure_ascii=False) + "\n" for q, c, _ in PAIRS))
    proc = tunesmith("sft", "--model", tiny, "--dataset", data, "--max_steps", "3", "--learning_rate", "0.02",
                     "--lora_dropout", "0", "--output_dir", out / "output")
    return Path(proc.stdout.strip().splitlines()[-1].split("last_model_checkpoint: ")[1])


def ms_swift_pairs(path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": c}], "rejected_response": r}
            for q, c, r in PAIRS]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def logged_steps(stdout: str) -> list[dict]:
    ckpt = Path(stdout.strip().splitlines()[-1].split("last_model_checkpoint: ")[1])
    return [x for x in map(json.loads, (ckpt.parent / "logging.jsonl").read_text().splitlines()) if "loss" in x]


def trl_pairs(tiny):
    """The same pairs as TRL's plain-text form: the rendered prompt, the answer with its end-of-turn token."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q, _, _ in PAIRS]
    return tok, Dataset.from_dict({"prompt": prompts, "chosen": [c + tok.eos_token for _, c, _ in PAIRS],
                                   "rejected": [r + tok.eos_token for _, _, r in PAIRS]})


def trl_peft_model(tiny, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter), is_trainable=True)


def trl_common(tmp_path):
    return dict(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                max_steps=3, learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1, report_to=[],
                use_cpu=True, save_strategy="no", adam_beta2=0.95, weight_decay=0.1, max_grad_norm=1.0, seed=42)


KEYS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
        "logps/rejected"]


def assert_same_steps(ours: list[dict], theirs: list[dict], keys=KEYS):
    """Step 1 (same adapter, same pairs) to float precision; after updates within 2e-3: the gradients differ by
    ~0.2% in norm (an open question, see the issue), which the later steps carry."""
    assert len(ours) == len(theirs) == 3
    for step, (a, b) in enumerate(zip(ours, theirs), 1):
        tol = 1e-5 if step == 1 else 2e-3
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=tol, abs=tol), f"step {step} {k}: ours {a[k]}, TRL {b[k]}"


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_matches_trl_dpo_trainer(tiny, sft_adapter, tmp_path, loss_type):
    from trl import DPOConfig, DPOTrainer

    proc = tunesmith("rlhf", "--rlhf_type", "dpo", "--loss_type", loss_type, "--adapters", sft_adapter,
                     "--dataset", ms_swift_pairs(tmp_path / "pairs.jsonl"), *COMMON, "--output_dir", tmp_path / "out")
    ours = logged_steps(proc.stdout)
    assert "reference: the adapter" in proc.stderr
    tok, dataset = trl_pairs(tiny)
    trainer = DPOTrainer(model=trl_peft_model(tiny, sft_adapter), args=DPOConfig(**trl_common(tmp_path), beta=0.1,
                         loss_type=[loss_type]), train_dataset=dataset, processing_class=tok)
    trainer.train()
    theirs = [x for x in trainer.state.log_history if "loss" in x]
    assert_same_steps(ours, theirs)
    assert ours[-1]["rewards/margins"] > ours[0]["rewards/margins"]  # it learns to prefer the chosen answers
