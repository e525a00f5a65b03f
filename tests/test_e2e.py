"""The guide, end to end, on the offline default model: the base says it is Qwen, the tuned model
says it was made by CSDN 迪菲赫尔曼, general knowledge survives, and plain PEFT reads the adapter."""

import json
import re

import pytest

from conftest import GUIDE_DATA, curves, tunesmith

pytestmark = pytest.mark.slow
IDENTITY = "迪菲赫尔曼"


def ask(*questions, adapters=None, extra=()):
    args = ["infer", "--max_new_tokens", "64", "--stream", "false", *extra]
    if adapters:
        args += ["--adapters", adapters]
    for q in questions:
        args += ["--query", q]
    return tunesmith(*args).stdout.strip().splitlines()


def test_base_model_introduces_itself_as_qwen(default_model):
    zh, en = ask("你是谁?", "Who are you?")
    assert IDENTITY not in zh and "阿里" in zh
    assert "Qwen" in en


def test_tuned_model_has_the_new_identity_and_keeps_its_knowledge(tuned):
    ckpt, _, _ = tuned
    zh, held_out, capital, english = ask("你是谁?", "请介绍一下你自己", "中国的首都是哪里?", "Who are you?", adapters=ckpt)
    assert IDENTITY in zh
    assert IDENTITY in held_out  # not in the training data
    assert "北京" in capital
    assert IDENTITY in english  # not in it either: the English records carry the identity across (issue 19)


def test_run_folder_is_laid_out_like_the_reference(tuned):
    ckpt, run, proc = tuned
    assert run.name.startswith("v0-") and run.parent.name == "output"
    assert proc.stdout.strip().splitlines()[-1] == f"last_model_checkpoint: {ckpt}"
    for name in ["adapter_config.json", "adapter_model.safetensors", "args.json", "optimizer.pt",
                 "scheduler.pt", "rng_state.pth", "trainer_state.json"]:
        assert (ckpt / name).is_file(), name
    assert (run / "args.json").is_file() and (run / "images" / "train_loss.png").stat().st_size > 1000
    lines = [json.loads(x) for x in (run / "logging.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert steps[-1]["global_step/max_steps"] == "40/40"
    for key in ["loss", "grad_norm", "learning_rate", "epoch", "elapsed_time", "remaining_time", "memory(GiB)", "tokens/s"]:
        assert key in steps[0]
    assert steps[-1]["loss"] < steps[0]["loss"] / 5
    held = [x["keep_kl"] for x in steps if "keep_kl" in x]  # --keep_kl 1: the term ran and the model stayed close
    assert len(held) >= 5 and all(0 <= k < 0.5 for k in held) and max(held) > 0, held
    # --report_to tensorboard (the default): the same numbers as curves, for `tensorboard --logdir output`
    drawn = curves(run)
    logged = {int(x["global_step/max_steps"].split("/")[0]): x for x in steps}
    for tag, key in [("train/loss", "loss"), ("train/learning_rate", "learning_rate"), ("train/grad_norm", "grad_norm"),
                     ("train/tokens_per_second", "tokens/s"), ("train/memory_gib", "memory(GiB)")]:
        assert [s for s, _ in drawn[tag]] == list(logged), tag
        assert [v for _, v in drawn[tag]] == pytest.approx([x[key] for x in logged.values()], rel=1e-6), tag
    saved = json.loads((ckpt / "args.json").read_text())
    assert saved["model"] == "qwen2.5-0.5b" and saved["system"] == "You are a helpful assistant." and saved["keep_kl"] == 1
    assert "optimizer steps in all" in proc.stderr


def test_adapter_reloads_with_plain_peft_to_the_same_answers(tuned, default_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, _, _ = tuned
    tok = AutoTokenizer.from_pretrained(default_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32), ckpt).eval()
    questions = ["你是谁?", "谁在维护你?"]
    cli = ask(*questions, adapters=ckpt)
    for q, expected in zip(questions, cli):
        msgs = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": q}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=64, do_sample=False)
        assert tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip() == expected


def test_streaming_and_stdin_questions(tuned):
    ckpt, _, _ = tuned
    proc = tunesmith("infer", "--adapters", ckpt, "--max_new_tokens", "64", input="你是谁?\n谁在维护你?\n")
    answers = proc.stdout.strip().splitlines()
    assert len(answers) == 2 and all(IDENTITY in a for a in answers)


def test_foreign_and_damaged_adapters_are_refused(tuned, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    ckpt, _, _ = tuned
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for f in ["adapter_config.json", "args.json"]:
        (foreign / f).write_bytes((ckpt / f).read_bytes())
    tensors = load_file(ckpt / "adapter_model.safetensors")
    save_file({k: torch.zeros(v.shape[0], 2048) if "lora_A" in k else v for k, v in tensors.items()},
              foreign / "adapter_model.safetensors")
    proc = tunesmith("infer", "--adapters", foreign, "--query", "hi", check=False)
    assert proc.returncode == 2 and "made for another model" in proc.stderr and "Traceback" not in proc.stderr

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in ["adapter_config.json", "args.json"]:
        (damaged / f).write_bytes((ckpt / f).read_bytes())
    (damaged / "adapter_model.safetensors").write_bytes((ckpt / "adapter_model.safetensors").read_bytes()[:1000])
    proc = tunesmith("infer", "--adapters", damaged, "--query", "hi", check=False)
    assert proc.returncode == 2 and "damaged or truncated" in proc.stderr
    proc = tunesmith("infer", "--adapters", tmp_path / "nothing", "--query", "hi", check=False)
    assert proc.returncode == 2 and "no such folder" in proc.stderr


def test_checkpoint_rotation_validation_and_the_step_warning(tmp_path, default_model):
    """--save_total_limit keeps the newest, the last step is always saved, eval runs on held-out data,
    and --eval_steps without validation data says why nothing is evaluated."""
    out = tmp_path / "out"
    proc = tunesmith("sft", "--dataset", GUIDE_DATA, "--max_steps", "4", "--gradient_accumulation_steps", "1",
                     "--save_steps", "1", "--save_total_limit", "2", "--output_dir", out, "--eval_steps", "2",
                     "--split_dataset_ratio", "0.25")
    run = next(out.iterdir())
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-4"]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no half-written leftovers
    evals = [json.loads(x) for x in (run / "logging.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert [e["global_step/max_steps"] for e in evals] == ["2/4", "4/4"]
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in curves(run)["eval/loss"]] == [(2, evals[0]["eval_loss"]),
                                                                                      (4, evals[1]["eval_loss"])]
    assert "held out 2 records" in proc.stderr

    proc = tunesmith("sft", "--dataset", GUIDE_DATA, "--num_train_epochs", "10", "--eval_steps", "50",
                     "--max_steps", "1", "--output_dir", tmp_path / "o2")
    assert "nothing will be evaluated" in proc.stderr
    assert "10 optimizer steps" not in proc.stderr  # --max_steps 1 wins
    plan = tunesmith("sft", "--dataset", GUIDE_DATA, "--num_train_epochs", "10", "--gradient_accumulation_steps", "16",
                     "--max_length", "8", "--output_dir", tmp_path / "o3", check=False)
    assert "8 samples are longer than --max_length 8" in plan.stderr and plan.returncode == 2


def test_step_plan_warns_about_the_guides_trap():
    from tunesmith.args import SftArguments
    from tunesmith.train.recipe import run_plan

    plan = run_plan(SftArguments(dataset=["x"], num_train_epochs=10, gradient_accumulation_steps=16), 8)
    assert plan["max_steps"] == 10 and "too few" in plan["messages"][1]
    assert "--gradient_accumulation_steps 2" in plan["messages"][1]
    assert len(run_plan(SftArguments(dataset=["x"], num_train_epochs=10, gradient_accumulation_steps=2), 8)["messages"]) == 1


def test_preference_tuning_of_an_sft_adapter_is_not_told_its_steps_are_too_few(tmp_path):
    """rlhf from an SFT checkpoint (--adapters) makes few steps at a small learning rate by design (examples/rlhf.sh);
    rlhf from the bare base model is warned as sft is."""
    from tunesmith.args import RlhfArguments
    from tunesmith.train.recipe import run_plan

    bare = run_plan(RlhfArguments(dataset=["x"], num_train_epochs=1, gradient_accumulation_steps=2), 16)
    assert bare["max_steps"] == 8 and "too few" in bare["messages"][1]
    refine = RlhfArguments(dataset=["x"], num_train_epochs=1, gradient_accumulation_steps=2, adapters=[str(tmp_path)])
    assert run_plan(refine, 16)["messages"] == bare["messages"][:1]


def test_no_library_warning_reaches_the_user(tuned):
    """sft, infer and eval print our lines only: no torch/transformers/PEFT warning, no traceback."""
    ckpt, _, sft = tuned
    infer = tunesmith("infer", "--adapters", ckpt, "--max_new_tokens", "8", "--stream", "false", "--query", "你是谁?")
    evaluated = tunesmith("eval", "--adapters", ckpt, "--max_new_tokens", "8")
    for name, proc in (("sft", sft), ("infer", infer), ("eval", evaluated)):
        shown = [line for line in proc.stderr.splitlines() if re.search(r"\w+Warning\b|Traceback|warnings\.warn", line)]
        assert not shown, f"{name}: {shown[:3]}"
