"""The command line: the guide's flags, config files, and one clear line for every mistake."""

import json

import pytest

from conftest import GUIDE_DATA, tunesmith
from tunesmith.cli import parse_args
from tunesmith.errors import UserError

GUIDE_SFT = """--model Qwen2.5-7B-Instruct --train_type lora --dataset self_cognition.json --torch_dtype bfloat16
--num_train_epochs 10 --per_device_train_batch_size 1 --per_device_eval_batch_size 1 --learning_rate 1e-4
--lora_rank 8 --lora_alpha 32 --target_modules all-linear --gradient_accumulation_steps 16 --eval_steps 50
--save_steps 50 --save_total_limit 2 --logging_steps 5 --max_length 2048 --output_dir output
--system You_are_a_helpful_assistant. --warmup_ratio 0.05 --dataloader_num_workers 4 --model_author swift
--model_name swift-robot""".split()


def test_guide_sft_flags_parse_with_their_meaning():
    args = parse_args("sft", GUIDE_SFT)
    assert args.model == "Qwen2.5-7B-Instruct" and args.train_type == "lora"
    assert args.dataset == ["self_cognition.json"] and args.num_train_epochs == 10
    assert args.gradient_accumulation_steps == 16 and args.save_total_limit == 2 and args.eval_steps == 50
    assert args.target_modules == ["all-linear"] and args.model_name == ["swift-robot"]


def test_reference_defaults():
    args = parse_args("sft", ["--dataset", "x.json"])
    assert (args.lora_rank, args.lora_alpha, args.lora_dropout) == (8, 32, 0.05)
    assert args.learning_rate == 1e-4 and args.num_train_epochs == 3 and args.per_device_train_batch_size == 1
    assert args.lr_scheduler_type == "cosine" and args.weight_decay == 0.1 and args.adam_beta2 == 0.95
    assert args.max_grad_norm == 1.0 and args.save_steps == 500 and args.split_dataset_ratio == 0
    assert args.effective_accumulation() == 16  # ms-swift: 16 samples per step by default


def test_guide_infer_flags_parse():
    args = parse_args("infer", "--model Qwen2.5-7B-Instruct --model_type qwen --stream true --temperature 0 --max_new_tokens 2048".split())
    assert args.stream is True and args.temperature == 0 and args.max_new_tokens == 2048
    args = parse_args("infer", ["--adapters", "ckpt", "--stream", "false", "--query", "a", "--query", "b"])
    assert args.adapters == ["ckpt"] and args.stream is False and args.query == ["a", "b"]


def test_tuner_type_is_an_alias():
    assert parse_args("sft", ["--dataset", "x", "--tuner_type", "lora"]).train_type == "lora"


def test_config_file_with_flags_winning(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("dataset: [a.json, b.json]\nlearning_rate: 3e-4\nlora_rank: 16\n")
    args = parse_args("sft", [str(cfg), "--lora_rank", "4"])
    assert args.dataset == ["a.json", "b.json"] and args.learning_rate == 3e-4 and args.lora_rank == 4
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"dataset": "a.json", "num_train_epochs": 2}))
    assert parse_args("sft", [str(js)]).num_train_epochs == 2


@pytest.mark.parametrize("argv, needle", [
    (["--learning_rat", "1e-4"], "unknown flag --learning_rat; did you mean --learning_rate?"),
    (["--lora_rank", "0"], "--lora_rank must be a positive number"),
    (["--learning_rate", "5"], "--learning_rate must be between 0 and 1"),
    (["--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1)"),
    (["--num_train_epochs", "abc"], "--num_train_epochs"),
    (["--gradient_checkpointing", "maybe"], "expected true, false or a share"),
    (["--use_liger", "maybe"], "argument --use_liger: expected true or false"),
    (["--model_name", "a", "b", "c"], "--model_name takes one value, or two"),
])
def test_bad_flags_are_one_clear_line(argv, needle):
    with pytest.raises(UserError) as e:
        parse_args("sft", ["--dataset", "x.json", *argv])
    assert needle in str(e.value)


def test_unknown_config_key_suggests(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("datset: a.json\n")
    with pytest.raises(UserError, match="unknown key 'datset'; did you mean --dataset"):
        parse_args("sft", [str(cfg)])


def test_help_lists_the_guide_flags():
    out = tunesmith("sft", "--help").stdout
    for flag in GUIDE_SFT[::2]:
        if flag.startswith("--"):
            assert flag in out
    assert "--adapters" in tunesmith("infer", "--help").stdout


def test_cli_errors_exit_nonzero_without_traceback(tmp_path):
    proc = tunesmith("sft", "--dataset", "x.json", "--lora_rnk", "8", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "tunesmith sft: error: unknown flag --lora_rnk; did you mean --lora_rank?"
    proc = tunesmith("sfft", check=False)
    assert proc.returncode == 2 and "did you mean" in proc.stderr and "Traceback" not in proc.stderr


def test_guide_command_with_missing_model_folder_fails_before_writing(tmp_path):
    """The guide's sft, verbatim, in a folder without Qwen2.5-7B-Instruct: a clear error, no output."""
    (tmp_path / "self_cognition.json").write_text(GUIDE_DATA.read_text(encoding="utf-8"), encoding="utf-8")
    proc = tunesmith("sft", *GUIDE_SFT, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--model Qwen2.5-7B-Instruct" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "output").exists()


def test_missing_dataset_is_reported_before_the_model(tmp_path):
    proc = tunesmith("sft", "--dataset", "nope.json", "--output_dir", tmp_path / "out", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "tunesmith sft: error: --dataset nope.json: file not found"
    assert not (tmp_path / "out").exists()


def test_infer_against_no_server_is_one_line():
    """`infer --base_url` talks through the openai client; nothing listening is one line, exit 2."""
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = tunesmith("infer", "--base_url", f"http://127.0.0.1:{port}/v1", "--query", "hi", check=False, timeout=120)
    assert proc.returncode == 2 and "cannot connect" in proc.stderr and "Traceback" not in proc.stderr
