"""QLoRA: `--quant_method bnb --quant_bits 4` trains on a 4-bit (nf4) base through bitsandbytes, writes an
ordinary PEFT adapter, and `export` merges it into the unquantized base. bitsandbytes runs nf4 on CPUs too."""

import json
from pathlib import Path

import pytest

from conftest import GUIDE_DATA, tunesmith

THREADS = {"OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_qlora_trains_a_plain_adapter_that_exports_into_the_unquantized_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    proc = tunesmith("sft", "--model", "smollm2-135m", "--dataset", GUIDE_DATA, "--max_steps", "2",
                     "--gradient_accumulation_steps", "4", "--quant_method", "bnb", "--quant_bits", "4",
                     "--output_dir", tmp_path, env_extra=THREADS, timeout=600)
    assert "4-bit nf4, computed in float32" in proc.stderr
    ckpt = Path(proc.stdout.strip().splitlines()[-1].split("last_model_checkpoint: ")[1])
    saved = json.loads((ckpt / "args.json").read_text())
    assert (saved["quant_method"], saved["quant_bits"]) == ("bnb", 4)
    from safetensors import safe_open

    with safe_open(ckpt / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
        dtypes = {f.get_tensor(k).dtype for k in keys}
    assert len(keys) == 30 * 7 * 2 and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in keys)
    import torch

    assert dtypes == {torch.float32}
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8

    out = tunesmith("export", "--adapters", ckpt, "--merge_lora", "true", env_extra=THREADS)
    assert "merge check" in out.stderr and "trained on a 4-bit base" in out.stderr
    merged = json.loads((ckpt.parent / f"{ckpt.name}-merged" / "config.json").read_text())
    assert "quantization_config" not in merged  # a plain, unquantized model


@pytest.mark.parametrize("flags, message", [
    (["--quant_method", "bnb", "--quant_bits", "3"], "--quant_bits 3: bitsandbytes loads 4 (nf4) or 8 bits per weight"),
    (["--quant_method", "foo"], "argument --quant_method: invalid choice: 'foo'"),
    (["--quant_bits", "4"], "--quant_bits 4 needs --quant_method bnb (QLoRA)"),
    (["--quant_method", "bnb", "--fsdp", "true"], "--fsdp with --quant_method bnb is not supported"),
])
def test_bad_quantization_flags_are_one_line(tmp_path, flags, message):
    proc = tunesmith("sft", "--dataset", GUIDE_DATA, "--output_dir", tmp_path, *flags, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
