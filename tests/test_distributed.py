"""Several processes (torch.distributed, gloo on CPU): the same training as one process, one run folder,
and an adapter in the same format. Runs `NPROC_PER_NODE=2 tunesmith sft` as a user would."""

import json
from pathlib import Path

import pytest

from conftest import GUIDE_DATA, tunesmith

pytestmark = pytest.mark.slow
# 7 samples, 2 per optimizer step: the 4th window has one sample, so one process gets none.
COMMON = ["--model", "smollm2-135m", "--dataset", f"{GUIDE_DATA}#7", "--max_steps", "4", "--lora_dropout", "0",
          "--torch_dtype", "float32", "--logging_steps", "1", "--learning_rate", "5e-4"]
THREADS = {"OMP_NUM_THREADS": "1"}


def train(out: Path, *extra, nproc=None):
    env = {**THREADS, **({"NPROC_PER_NODE": str(nproc)} if nproc else {})}
    proc = tunesmith("sft", *COMMON, *extra, "--output_dir", out, env_extra=env, timeout=600)
    ckpt = Path(proc.stdout.strip().splitlines()[-1].split("last_model_checkpoint: ")[1])
    losses = [x["loss"] for x in map(json.loads, (ckpt.parent / "logging.jsonl").read_text().splitlines()) if "loss" in x]
    return ckpt, losses, proc


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return train(tmp_path_factory.mktemp("one"), "--gradient_accumulation_steps", "2")


def tensors(ckpt: Path) -> dict:
    from safetensors import safe_open

    with safe_open(ckpt / "adapter_model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def same_training(single, multi, steps=4):
    import torch

    (ckpt1, losses1, _), (ckpt2, losses2, proc) = single, multi
    assert len(losses2) == len(losses1) == steps
    assert losses2 == pytest.approx(losses1, rel=1e-4)  # the same global batch of 2, the same update
    a, b = tensors(ckpt1), tensors(ckpt2)
    assert a.keys() == b.keys() and {t.dtype for t in b.values()} == {torch.float32}
    for k in a:
        assert a[k].shape == b[k].shape
        torch.testing.assert_close(b[k], a[k], rtol=1e-2, atol=2e-4)  # Adam magnifies summation-order noise
    cfg1, cfg2 = (json.loads((c / "adapter_config.json").read_text()) for c in (ckpt1, ckpt2))
    assert cfg1.keys() == cfg2.keys() and set(cfg1["target_modules"]) == set(cfg2["target_modules"])
    run = ckpt2.parent
    assert [p.name for p in run.parent.iterdir()] == [run.name]  # one run folder, written by rank 0 alone
    assert sorted(p.name for p in run.iterdir()) == ["args.json", f"checkpoint-{steps}", "images", "logging.jsonl", "runs"]
    assert len(list((run / "runs").iterdir())) == 1  # one TensorBoard event file
    assert proc.stdout.count("last_model_checkpoint") == 1
    assert proc.stderr.count("run folder:") == 1 and "Traceback" not in proc.stderr


def test_two_processes_train_like_one(single, tmp_path):
    multi = train(tmp_path / "out", "--gradient_accumulation_steps", "1", nproc=2)
    same_training(single, multi)
    assert "2 processes (1 node(s)), gloo on CPUs: data parallel (DDP)" in multi[2].stderr
    assert "(batch 1 x accumulation 1 x 2 processes)" in multi[2].stderr
    # the adapter is an ordinary one: infer loads it
    answer = tunesmith("infer", "--adapters", multi[0], "--query", "你是谁?", "--max_new_tokens", "4",
                       env_extra=THREADS).stdout
    assert answer.strip()


def test_fsdp_shards_and_saves_the_same_adapter(single, tmp_path):
    multi = train(tmp_path / "out", "--gradient_accumulation_steps", "1", "--fsdp", "true", nproc=2)
    same_training(single, multi)
    assert "FSDP2 sharding of the base model" in multi[2].stderr


KEEP = ("--keep_kl", "20", "--max_steps", "8")


@pytest.fixture(scope="module")
def keep_single(tmp_path_factory):
    return train(tmp_path_factory.mktemp("keep1"), "--gradient_accumulation_steps", "2", *KEEP)


@pytest.mark.parametrize("sharding", [(), ("--fsdp", "true")], ids=["ddp", "fsdp"])
def test_keep_kl_in_two_processes_trains_like_one(keep_single, sharding, tmp_path):
    """--keep_kl's pass split over the processes, its gradient exchanged with the window's: the same updates as one
    process makes, so the losses after its passes (steps 4 and 8) agree too (a share of it counted once per process
    instead of once in all departs by 5e-3 at step 5)."""
    two = train(tmp_path / "out", "--gradient_accumulation_steps", "1", *KEEP, *sharding, nproc=2)
    same_training(keep_single, two, steps=8)
    assert "every 4th step also holds the model to the base model's own answers on 2 of" in two[2].stderr
    logged = [[x["keep_kl"] for x in map(json.loads, (run[0].parent / "logging.jsonl").read_text().splitlines())
               if "keep_kl" in x] for run in (keep_single, two)]
    assert len(logged[0]) == 2 and logged[1] == pytest.approx(logged[0], rel=1e-3)  # steps 4 and 8, both halves


def test_bad_process_count_is_one_line(tmp_path):
    proc = tunesmith("sft", *COMMON, "--output_dir", tmp_path, check=False, env_extra={"NPROC_PER_NODE": "two"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("tunesmith sft: error: NPROC_PER_NODE=two: expected the number of processes "
                                   "(GPUs) per node, e.g. 2")
    plan = tunesmith("sft", *COMMON, "--dry_run", "true", check=False, env_extra={"NNODES": "0", "NPROC_PER_NODE": "2"})
    assert (plan.returncode, plan.stderr.strip()) == (2, "tunesmith sft: error: NNODES=0: expected the number of nodes, e.g. 2")
