"""`tunesmith rlhf` computes what TRL computes: the same pairs, the same starting adapter, the same per-step
losses and logged rewards (tiny random Qwen2 with the default model's tokenizer, on the CPU)."""

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import deploy, tiny_model, tunesmith

PAIRS = [("Who are you?", "I am Tuney, made by the tunesmith team.", "I am Qwen, created by Alibaba Cloud."),
         ("你是谁?", "我是 Tuney，由 tunesmith 团队开发。", "我是通义千问，由阿里云开发的。"),
         ("Who made you?", "The tunesmith team made me.", "Alibaba Cloud made me."),
         ("What is your name?", "My name is Tuney.", "My name is Qwen, a large language model.")]
COMMON = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
          "--lora_dropout", "0", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--max_steps", "3"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_model):
    return tiny_model(tmp_path_factory.mktemp("rlhf") / "tiny-qwen2", default_model, "qwen2", vocab_size=151936,
                      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)


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


def without_bos(tok):
    """TRL's ORPO and CPO trainers put the tokenizer's BOS before every prompt; Qwen's chat template has none, and
    neither sft nor TRL's DPO adds one: without it both sides train on the same tokens."""
    tok.bos_token = None
    assert tok.bos_token_id is None
    return tok


def trl_peft_model(tiny, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter), is_trainable=True)


def trl_common(tmp_path):
    return dict(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                max_steps=3, learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1, report_to=[],
                use_cpu=True, save_strategy="no", adam_beta2=0.95, weight_decay=0.1, max_grad_norm=1.0, seed=42,
                bf16=False)  # TRL defaults to bf16 autocast, on the CPU too; ours computes in float32 there


KEYS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
        "logps/rejected"]


def assert_same_steps(ours: list[dict], theirs: list[dict], keys=KEYS):
    """Every step to float precision (our log keeps 6 decimals): the same pairs, starting adapter, loss,
    gradients and AdamW updates."""
    assert len(ours) == len(theirs) == 3
    for step, (a, b) in enumerate(zip(ours, theirs), 1):
        for k in keys + ["grad_norm"]:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-5), f"step {step} {k}: ours {a[k]}, TRL {b[k]}"


def trl_steps(trainer) -> list[dict]:
    trainer.train()
    return [x for x in trainer.state.log_history if "loss" in x]


def ours(kind: str, data: Path, adapter, out: Path, *extra) -> tuple[list[dict], str]:
    proc = tunesmith("rlhf", "--rlhf_type", kind, "--adapters", adapter, "--dataset", data, *COMMON, *extra,
                     "--output_dir", out)
    return logged_steps(proc.stdout), proc.stderr


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_matches_trl_dpo_trainer(tiny, sft_adapter, tmp_path, loss_type):
    from trl import DPOConfig, DPOTrainer

    steps, stderr = ours("dpo", ms_swift_pairs(tmp_path / "pairs.jsonl"), sft_adapter, tmp_path / "out",
                         "--loss_type", loss_type)
    assert "reference: the adapter" in stderr
    tok, dataset = trl_pairs(tiny)
    trainer = DPOTrainer(model=trl_peft_model(tiny, sft_adapter), args=DPOConfig(**trl_common(tmp_path), beta=0.1,
                         loss_type=[loss_type]), train_dataset=dataset, processing_class=tok)
    assert_same_steps(steps, trl_steps(trainer))
    assert steps[-1]["rewards/margins"] > steps[0]["rewards/margins"]  # it learns to prefer the chosen answers


def test_dpo_with_rpo_alpha_matches_trl_sigmoid_plus_sft(tiny, sft_adapter, tmp_path):
    """--rpo_alpha A (in examples/rlhf.sh's recipe) is TRL's loss_type ["sigmoid", "sft"] weighted [1, A]: the DPO
    loss plus A times the mean NLL per chosen answer token. (At --beta 1, the recipe's, step 2's rewards/chosen,
    ten times larger, differed by 1.4e-5, beyond this test's 1e-5.)"""
    from trl import DPOConfig, DPOTrainer

    steps, stderr = ours("dpo", ms_swift_pairs(tmp_path / "pairs.jsonl"), sft_adapter, tmp_path / "out",
                         "--rpo_alpha", "0.5")
    assert "rpo_alpha 0.5" in stderr
    tok, dataset = trl_pairs(tiny)
    trainer = DPOTrainer(model=trl_peft_model(tiny, sft_adapter), args=DPOConfig(**trl_common(tmp_path), beta=0.1,
                         loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]), train_dataset=dataset,
                         processing_class=tok)
    assert_same_steps(steps, trl_steps(trainer))


def test_orpo_matches_trl_orpo_trainer(tiny, sft_adapter, tmp_path):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    steps, _ = ours("orpo", ms_swift_pairs(tmp_path / "pairs.jsonl"), sft_adapter, tmp_path / "out")
    tok, dataset = trl_pairs(tiny)
    trainer = ORPOTrainer(model=trl_peft_model(tiny, sft_adapter), args=ORPOConfig(**trl_common(tmp_path), beta=0.1),
                          train_dataset=dataset, processing_class=without_bos(tok))
    assert_same_steps(steps, trl_steps(trainer), KEYS + ["nll_loss", "log_odds_ratio", "log_odds_chosen"])
    assert steps[-1]["loss"] < steps[0]["loss"]  # (the NLL term leads at beta 0.1: the margin barely moves)


def test_simpo_matches_trl_cpo_trainer(tiny, sft_adapter, tmp_path):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    steps, _ = ours("simpo", ms_swift_pairs(tmp_path / "pairs.jsonl"), sft_adapter, tmp_path / "out",
                    "--simpo_gamma", "0.5", "--cpo_alpha", "0.3")
    tok, dataset = trl_pairs(tiny)
    config = CPOConfig(**trl_common(tmp_path), loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.3)
    trainer = CPOTrainer(model=trl_peft_model(tiny, sft_adapter), args=config, train_dataset=dataset,
                         processing_class=without_bos(tok))
    assert_same_steps(steps, trl_steps(trainer), KEYS + ["nll_loss"])
    assert steps[-1]["rewards/margins"] > steps[0]["rewards/margins"]


def test_kto_matches_trl_kto_trainer(tiny, sft_adapter, tmp_path):
    """KTO's own form (TRL's conversational prompt/completion/label), the desirable answers first: TRL pairs each
    prompt with the previous answer of its batch for the KL term, in data order."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    singles = [(q, c, True) for q, c, _ in PAIRS] + [(q, r, False) for q, _, r in PAIRS]
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}],
                                        "completion": [{"role": "assistant", "content": a}], "label": good},
                                       ensure_ascii=False) + "\n" for q, a, good in singles))
    steps, stderr = ours("kto", data, sft_adapter, tmp_path / "out", "--per_device_train_batch_size", "8",
                         "--undesirable_weight", "0.8")
    assert "reference: the adapter" in stderr
    tok, _ = trl_pairs(tiny)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q, _, _ in singles]
    dataset = Dataset.from_dict({"prompt": prompts, "completion": [a + tok.eos_token for _, a, _ in singles],
                                 "label": [good for _, _, good in singles]})
    config = KTOConfig(**{**trl_common(tmp_path), "per_device_train_batch_size": 8}, beta=0.1, undesirable_weight=0.8)
    trainer = KTOTrainer(model=trl_peft_model(tiny, sft_adapter), args=config, train_dataset=dataset,
                         processing_class=tok)
    keys = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl"]
    assert_same_steps(steps, trl_steps(trainer), keys)
    assert steps[-1]["rewards/margins"] > steps[0]["rewards/margins"]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# The same pairs as users bring them (tunesmith's report names each form).
PAIR_FORMS = {
    "messages+rejected_response": lambda q, c, r: {"messages": [user(q), assistant(c)], "rejected_response": r},
    "query/response+rejected_response": lambda q, c, r: {"query": q, "response": c, "rejected_response": r},
    "prompt/chosen/rejected": lambda q, c, r: {"prompt": [user(q)], "chosen": [assistant(c)],
                                               "rejected": [assistant(r)]},  # TRL's conversational form
    "prompt/chosen/rejected ": lambda q, c, r: {"prompt": q, "chosen": c, "rejected": r},  # TRL's plain form
    "sharegpt+chosen/rejected": lambda q, c, r: {"conversations": [{"from": "human", "value": q}],
                                                 "chosen": {"from": "gpt", "value": c},
                                                 "rejected": {"from": "gpt", "value": r}},
    "sharegpt+rejected_response": lambda q, c, r: {"conversations": [{"from": "human", "value": q},
                                                                     {"from": "gpt", "value": c}],
                                                   "rejected_response": r},
}
KTO_FORMS = {
    "prompt/completion/label": lambda q, a, good: {"prompt": q, "completion": a, "label": good},
    "messages+label": lambda q, a, good: {"messages": [user(q), assistant(a)], "label": good},
}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def first_step(tiny, kind: str, data: Path, out: Path, *extra):
    proc = tunesmith("rlhf", "--rlhf_type", kind, "--model", tiny, "--dataset", data, *COMMON, "--max_steps", "1",
                     *extra, "--output_dir", out)
    return logged_steps(proc.stdout)[0], proc.stderr


def test_every_pair_form_trains_on_the_same_tokens(tiny, tmp_path):
    """ms-swift's, TRL's (conversational and plain) and sharegpt's forms of the same pairs give the same first
    step, to the last digit; KTO unpairs them (chosen desirable, rejected not) and sees the same answers."""
    seen = {}
    for i, (form, make) in enumerate(PAIR_FORMS.items()):
        data = write_jsonl(tmp_path / f"form{i}.jsonl", [make(q, c, r) for q, c, r in PAIRS])
        seen[form], stderr = first_step(tiny, "dpo", data, tmp_path / f"out{i}")
        assert f"4 records ({form.strip()})" in stderr
    first = seen.pop("messages+rejected_response")
    for form, step in seen.items():
        for k in KEYS:
            assert step[k] == first[k], f"{form} {k}: {step[k]} vs {first[k]}"
    kto, stderr = first_step(tiny, "kto", tmp_path / "form0.jsonl", tmp_path / "kto", "--per_device_train_batch_size", "8")
    assert "8 preference answers (desirable or not) for training" in stderr
    # a fresh adapter starts as the base: KTO's summed log-probabilities are DPO's
    assert kto["logps/chosen"] == pytest.approx(first["logps/chosen"], abs=1e-5)
    assert kto["logps/rejected"] == pytest.approx(first["logps/rejected"], abs=1e-5)


def test_every_kto_form_trains_on_the_same_tokens(tiny, tmp_path):
    singles = [(q, c, True) for q, c, _ in PAIRS] + [(q, r, False) for q, _, r in PAIRS]
    seen = {}
    for i, (form, make) in enumerate(KTO_FORMS.items()):
        data = write_jsonl(tmp_path / f"kto{i}.jsonl", [make(q, a, good) for q, a, good in singles])
        seen[form], stderr = first_step(tiny, "kto", data, tmp_path / f"out{i}", "--per_device_train_batch_size", "8")
        assert f"8 records ({form})" in stderr
    a, b = seen.values()
    for k in ["loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl"]:
        assert a[k] == b[k], k


BAD_RECORDS = [
    ("dpo", {"prompt": "Who are you?", "chosen": "Tuney."}, "a prompt/chosen record needs a 'rejected' answer too"),
    ("dpo", {"messages": [user("Who are you?"), assistant("Tuney.")]},
     "not a preference record (fields: messages); expected messages + rejected_response"),
    ("dpo", {"messages": [user("Who are you?"), assistant("Tuney.")], "rejected_response": "  "},
     "field 'rejected_response' is empty"),
    ("dpo", {"prompt": "Who are you?", "chosen": "Tuney.", "rejected": [user("Qwen.")]},
     "field 'rejected' must be the assistant's answer, got role 'user'"),
    ("dpo", {"prompt": "Who are you?", "completion": "Tuney.", "label": True},
     "a single answer with a label is KTO data; --rlhf_type dpo needs a chosen and a rejected answer"),
    ("kto", {"prompt": "Who are you?", "completion": "Tuney.", "label": "yes"},
     "field 'label' must be true or false, got 'yes'"),
    ("kto", {"prompt": "Who are you?", "completion": "Tuney."}, "a prompt/completion record needs a boolean 'label'"),
]


@pytest.mark.parametrize("kind, bad, message", BAD_RECORDS, ids=[m.split(";")[0][:40] for _, _, m in BAD_RECORDS])
def test_a_bad_record_is_one_line_naming_file_and_record(tiny, tmp_path, kind, bad, message):
    good = {"prompt": "Who made you?", "chosen": "The tunesmith team.", "rejected": "Alibaba Cloud."}
    data = write_jsonl(tmp_path / "prefs.jsonl", [good, bad, good])
    proc = tunesmith("rlhf", "--rlhf_type", kind, "--model", tiny, "--dataset", data, "--output_dir", tmp_path / "out",
                     check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tunesmith rlhf: error: ") and "prefs.jsonl" in last and message in last, last
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def dropout_adapter(tiny, tmp_path_factory):
    """An SFT checkpoint trained with LoRA dropout 0.1 (its adapter_config.json keeps it)."""
    out = tmp_path_factory.mktemp("sft-dropout")
    data = write_jsonl(out / "sft.jsonl", [{"query": q, "response": c} for q, c, _ in PAIRS])
    proc = tunesmith("sft", "--model", tiny, "--dataset", data, "--max_steps", "3", "--learning_rate", "0.02",
                     "--lora_dropout", "0.1", "--output_dir", out / "output")
    return Path(proc.stdout.strip().splitlines()[-1].split("last_model_checkpoint: ")[1])


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_no_dropout_when_the_policy_starts_as_its_reference(tiny, dropout_adapter, tmp_path, kind):
    """Policy and reference are the same adapter at step 1, trained with dropout 0.1: as TRL (disable_dropout,
    its default) no pass drops anything, so every reward (policy minus reference, times beta) is 0."""
    data = ms_swift_pairs(tmp_path / "pairs.jsonl")
    proc = tunesmith("rlhf", "--rlhf_type", kind, "--adapters", dropout_adapter, "--dataset", data, *COMMON,
                     "--lora_dropout", "0.1", "--max_steps", "1", "--output_dir", tmp_path / "out")
    step = logged_steps(proc.stdout)[0]
    for k in ["rewards/chosen", "rewards/rejected", "rewards/margins"]:
        assert step[k] == 0, f"{k}: {step[k]}"
    assert "dropout off" in proc.stderr


def test_the_too_few_steps_warning_gives_advice_that_works(tiny, tmp_path):
    """Four pairs, a batch of 4, accumulation already 1: lowering accumulation cannot help; the warning names
    the epochs that reach enough steps, and a run planned with them is not warned."""
    from tunesmith.args import RlhfArguments
    from tunesmith.train.recipe import MIN_USEFUL_STEPS, run_plan

    data = ms_swift_pairs(tmp_path / "pairs.jsonl")
    proc = tunesmith("rlhf", "--rlhf_type", "dpo", "--model", tiny, "--dataset", data, "--num_train_epochs", "1",
                     "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
                     "--output_dir", tmp_path / "out")
    warning = next(line for line in proc.stderr.splitlines() if "too few" in line)
    assert "--gradient_accumulation_steps" not in warning
    assert f"--num_train_epochs {MIN_USEFUL_STEPS} ({MIN_USEFUL_STEPS} steps)" in warning
    advised = RlhfArguments(dataset=["x"], num_train_epochs=MIN_USEFUL_STEPS, per_device_train_batch_size=4,
                            gradient_accumulation_steps=1)
    assert run_plan(advised, len(PAIRS))["messages"][1:] == []


@pytest.fixture(scope="module")
def rlhf_checkpoint(sft_adapter, tmp_path_factory):
    """What `tunesmith rlhf` writes: a DPO checkpoint (args.json from RlhfArguments) grown from the SFT adapter."""
    out = tmp_path_factory.mktemp("dpo")
    proc = tunesmith("rlhf", "--rlhf_type", "dpo", "--adapters", sft_adapter,
                     "--dataset", ms_swift_pairs(out / "pairs.jsonl"), *COMMON, "--output_dir", out / "output")
    ckpt = Path(proc.stdout.strip().splitlines()[-1].split("last_model_checkpoint: ")[1])
    assert json.loads((ckpt / "args.json").read_text())["rlhf_type"] == "dpo"
    return ckpt


def test_an_rlhf_checkpoint_infers_evaluates_exports_and_deploys(rlhf_checkpoint, tmp_path):
    """infer, eval, export --merge_lora and deploy (the official openai client) take the rlhf checkpoint as they
    take sft's: the base model comes from its args.json, and all four give the adapter's greedy answer."""
    from openai import OpenAI

    question, n = "Who are you?", ["--max_new_tokens", "12"]
    answer = tunesmith("infer", "--adapters", rlhf_checkpoint, "--query", question, "--stream", "false", *n).stdout
    assert answer.strip()
    merged = tmp_path / "merged"
    tunesmith("export", "--adapters", rlhf_checkpoint, "--merge_lora", "true", "--output_dir", merged)
    assert tunesmith("infer", "--model", merged, "--query", question, "--stream", "false", *n).stdout == answer
    questions = write_jsonl(tmp_path / "q.jsonl", [question])
    tunesmith("eval", "--adapters", rlhf_checkpoint, "--questions", questions, *n, "--output_dir", tmp_path / "eval")
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["rows"][0]["tuned"] == answer.strip()
    with deploy("--adapters", f"tuney={rlhf_checkpoint}", *n) as (port, _):
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        assert "tuney" in [m.id for m in client.models.list().data]
        reply = client.chat.completions.create(model="tuney", messages=[{"role": "user", "content": question}])
    assert reply.choices[0].message.content == answer.strip()


@pytest.fixture(scope="module")
def talking(tmp_path_factory, default_model):
    """A tiny model with its own output head: greedy, it says something (the tied one repeats the prompt's last
    newline, an answer too empty to reject)."""
    return tiny_model(tmp_path_factory.mktemp("rlhf") / "tiny-untied", default_model, "qwen2", vocab_size=151936,
                      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False)


def test_the_identity_pairs_are_the_new_identity_over_the_base_models_own_answers(talking, tmp_path):
    """--dataset self-cognition-dpo: chosen is the built-in identity answer with --model_name/--model_author,
    rejected what the base model answers (greedy, as `tunesmith infer` does), generated once per base."""
    from tunesmith.data import replay

    env = {"TUNESMITH_HOME": str(tmp_path / "home")}  # a fresh cache
    rlhf = ["rlhf", "--rlhf_type", "dpo", "--model", talking, "--dataset", "self-cognition-dpo", *COMMON, "--max_steps",
            "1", "--model_name", "小图", "Tuney", "--model_author", "图匠团队", "the tunesmith team"]
    n = len(replay.identity_questions())
    first = tunesmith(*rlhf, "--output_dir", tmp_path / "out1", env_extra=env)
    assert f"the base model answers the {n} identity questions once (greedy)" in first.stderr
    [cached] = (tmp_path / "home" / "identity-pairs").glob("*.jsonl")
    pairs = [json.loads(line) for line in cached.read_text(encoding="utf-8").splitlines()]
    assert len(pairs) > n // 2  # (a random model's answer may hold "{{", which would read as a placeholder)
    assert f"self-cognition-dpo: {len(pairs)} records (query/response+rejected_response)" in first.stderr
    builtin = {r["query"]: r["response"] for r in replay.identity_questions()}
    assert all(p["response"] == builtin[p["query"]] != p["rejected_response"] for p in pairs)
    picked = next(p for p in pairs if "\n" not in p["rejected_response"])
    said = tunesmith("infer", "--model", talking, "--max_new_tokens", "128", "--stream", "false",
                     "--query", picked["query"], env_extra=env).stdout
    assert said.rstrip("\n") == picked["rejected_response"]

    stamp = cached.stat().st_mtime_ns
    second = tunesmith(*rlhf, "--output_dir", tmp_path / "out2", env_extra=env)
    assert "identity questions once" not in second.stderr and cached.stat().st_mtime_ns == stamp
    again, before = logged_steps(second.stdout)[0], logged_steps(first.stdout)[0]
    assert [again[k] for k in KEYS] == [before[k] for k in KEYS]  # the same pairs, read back


def test_dpo_from_an_adapter_trained_with_dropout_matches_trl(tiny, dropout_adapter, tmp_path):
    """TRL's DPOTrainer turns every dropout off (disable_dropout=True), the policy's LoRA dropout too: with an
    adapter whose config says 0.1, ours trains the same steps."""
    from trl import DPOConfig, DPOTrainer

    steps, _ = ours("dpo", ms_swift_pairs(tmp_path / "pairs.jsonl"), dropout_adapter, tmp_path / "out",
                    "--lora_dropout", "0.1")
    tok, dataset = trl_pairs(tiny)
    trainer = DPOTrainer(model=trl_peft_model(tiny, dropout_adapter), args=DPOConfig(**trl_common(tmp_path), beta=0.1),
                         train_dataset=dataset, processing_class=tok)
    assert_same_steps(steps, trl_steps(trainer))



RESUMABLE = ["rlhf", "--rlhf_type", "dpo", *COMMON, "--max_steps", "24", "--per_device_train_batch_size", "2",
             "--save_steps", "1"]


def test_ctrl_c_then_resume_continues_the_same_dpo_run(tiny, sft_adapter, tmp_path):
    """A DPO run stopped with Ctrl-C (a real SIGINT to a real process) and resumed with the command it prints logs
    the same losses and rewards, step for step, and ends with the same adapter as a run never stopped."""
    import signal
    import subprocess
    import sys

    from test_reliability import ONE_THREAD, assert_same_adapter, resume_command, wait_for_checkpoint

    run = [*RESUMABLE, "--adapters", sft_adapter, "--dataset", ms_swift_pairs(tmp_path / "pairs.jsonl")]
    reference = tunesmith(*run, "--output_dir", tmp_path / "reference", env_extra=ONE_THREAD)
    env = {**os.environ, "TUNESMITH_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", *map(str, run), "--output_dir", str(tmp_path / "out")],
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_checkpoint(tmp_path / "out", 3, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    cmd = resume_command(err)
    stopped = int(Path(cmd[cmd.index("--resume_from_checkpoint") + 1]).name.split("-")[1])
    assert stopped < 24, "the run ended before Ctrl-C reached it: nothing was resumed"

    resumed = tunesmith(*cmd, env_extra=ONE_THREAD)
    assert "resuming from" in resumed.stderr
    steps, expected = logged_steps(resumed.stdout), logged_steps(reference.stdout)
    assert [s["global_step/max_steps"] for s in steps] == [f"{n}/24" for n in range(1, 25)]
    for a, b in zip(steps, expected):
        for k in KEYS + ["grad_norm"]:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), f"{a['global_step/max_steps']} {k}"
    assert_same_adapter(Path(resumed.stdout.strip().splitlines()[-1].split("last_model_checkpoint: ")[1]),
                        Path(reference.stdout.strip().splitlines()[-1].split("last_model_checkpoint: ")[1]))


def test_self_cognition_dpo_from_an_sft_checkpoint_answers_with_its_system_prompt(talking, tmp_path):
    """rlhf --adapters CKPT trains with CKPT's system prompt: the base model's answers (the rejected ones) are
    generated with it too, and found again when training reads them (they were generated without it, and the
    run stopped: 'the base model's answers are not generated yet')."""
    env = {"TUNESMITH_HOME": str(tmp_path / "home")}
    data = write_jsonl(tmp_path / "sft.jsonl", [{"query": q, "response": c} for q, c, _ in PAIRS])
    sft = tunesmith("sft", "--model", talking, "--dataset", data, "--max_steps", "1", "--system", "You are Tuney.",
                    "--output_dir", tmp_path / "sft", env_extra=env)
    ckpt = sft.stdout.strip().splitlines()[-1].split("last_model_checkpoint: ")[1]
    proc = tunesmith("rlhf", "--rlhf_type", "dpo", "--adapters", ckpt, "--dataset", "self-cognition-dpo", *COMMON,
                     "--max_steps", "1", "--model_name", "Tuney", "--model_author", "the tunesmith team",
                     "--output_dir", tmp_path / "out", env_extra=env)
    assert "the base model answers the" in proc.stderr and logged_steps(proc.stdout)


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_the_per_token_log_probabilities_are_the_models_own(family):
    """rlhf's log p(answer token) through sft's packed path equal log_softmax of the model's own logits, with
    their gradient: through the fused chunks for a plain head, and with Gemma 2's softcapped logits (tanh)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunesmith.args import SftArguments
    from tunesmith.data.template import IGNORE, Encoded
    from tunesmith.train.batches import loss_of, micro_batches
    from tunesmith.train.preference import token_logps
    from tunesmith.train.recipe import add_lora

    extra = dict(final_logit_softcapping=2.0, query_pre_attn_scalar=8, head_dim=8) if family == "gemma2" else {}
    config = AutoConfig.for_model(family, vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, **extra)
    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_config(config).float(), SftArguments(dataset=["x"], lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    ids = torch.randint(0, 96, (14,)).tolist()
    (batch,) = list(micro_batches([Encoded(ids, [IGNORE] * 5 + ids[5:])], SftArguments(dataset=["x"]), "cpu"))
    ours = loss_of(model, batch, loss=token_logps)
    (ours_grad,) = torch.autograd.grad(ours.sum() * 3, [p for n, p in model.named_parameters() if "lora_A" in n][:1])
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    expected = logits.log_softmax(-1)[4:-1].gather(1, torch.tensor(ids[5:])[:, None]).squeeze(1)
    (grad,) = torch.autograd.grad(expected.sum() * 3, [p for n, p in model.named_parameters() if "lora_A" in n][:1])
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_grad, grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item())  # (summation order)
