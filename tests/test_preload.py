"""Start-up staging (preload.py): the weights read piece by piece into their own tensors, and a model built
around them, are the files' weights and the usual model. On a GPU `sft` does this while it imports; the
reading and the building are the same code on the CPU, checked here."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunesmith.model import preload
from tunesmith.model.load import from_tensors, load_model


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two safetensors files, with tensors whose sizes leave later ones off any 16-byte boundary."""
    folder = tmp_path_factory.mktemp("shards")
    g = torch.Generator().manual_seed(0)
    first = {"a": torch.randn(300, 70, generator=g).bfloat16(), "odd": torch.randn(7, generator=g).bfloat16(),
             "scalar": torch.tensor(3.5).bfloat16(), "b": torch.randn(5, 3, 11, generator=g).bfloat16()}
    second = {"c": torch.randn(2049, generator=g).bfloat16(), "empty": torch.zeros(0, 4).bfloat16()}
    save_file(first, folder / "model-00001-of-00002.safetensors")
    save_file(second, folder / "model-00002-of-00002.safetensors")
    return sorted(folder.glob("*.safetensors")), {**first, **second}


@pytest.mark.parametrize("chunk", [1000, 64 << 20])
def test_read_into_gives_the_files_tensors(shards, chunk, monkeypatch):
    files, expected = shards
    monkeypatch.setattr(preload, "CHUNK", chunk)  # 1000 bytes: tensors span several pieces, pieces several tensors
    got = preload.read_into(files, "cpu", torch.bfloat16)
    assert set(got) == set(expected)
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name


def test_files_of_another_dtype_are_not_staged(shards):
    files, _ = shards
    assert preload.read_into(files, "cpu", torch.float16) is None  # load_model converts those itself


def test_model_built_around_staged_tensors_is_the_usual_model(default_model):
    files = sorted(default_model.glob("*.safetensors"))
    tensors = preload.read_into(files, "cpu", torch.float32)
    assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for f in files for k, v in load_file(f).items()}
    staged = {t.data_ptr() for t in tensors.values()}
    model = from_tensors(default_model, tensors, torch.float32, "cpu")
    assert all(p.data_ptr() in staged for p in model.parameters())  # the weights are those tensors: no copy
    usual = load_model(default_model, torch.float32, "cpu")
    assert model.name_or_path == usual.name_or_path == str(default_model)
    assert model.generation_config.eos_token_id == usual.generation_config.eos_token_id
    ids = torch.tensor([[9707, 11, 1879, 0, 151644, 872]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, usual(ids).logits)


def test_staged_load_reserves_no_second_copy(default_model, monkeypatch):
    """transformers' allocator warm-up reserves the model's size on the GPU before loading a state dict; for
    staged tensors (adopted, not copied) that only doubled the peak, so the staged load skips it, and only it."""
    from transformers import modeling_utils

    calls = []
    monkeypatch.setattr(modeling_utils, "caching_allocator_warmup", lambda *a, **k: calls.append(a))
    files = sorted(default_model.glob("*.safetensors"))
    model = from_tensors(default_model, preload.read_into(files, "cpu", torch.float32), torch.float32, "cpu")
    assert model is not None and calls == []
    load_model(default_model, torch.float32, "cpu")  # (CPU loads take no device map: warm-up not asked for)
    modeling_utils.caching_allocator_warmup(None, {}, None)
    assert len(calls) == 1  # the warm-up is back for every other load


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_machine_without_cuda_starts_no_kernel_build_workers(default_model, tmp_path, monkeypatch):
    """The workers build Triton kernels for a CUDA GPU: without one (Triton installed or not) none is launched."""
    from tunesmith.engine import kernel_cache

    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path))  # the markers go here, not to the user's cache
    assert kernel_cache.start(default_model, {"lora_rank": 8}, workers=2) == []
    assert not (tmp_path / "kernels").exists()


def test_kernel_set_markers_are_apart_for_each_triton_cache_and_setting(tmp_path, monkeypatch):
    """A marker says one Triton cache holds one kernel set: another cache, or another adapter, is not built."""
    pytest.importorskip("triton")
    from tunesmith.engine import kernel_cache

    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path))
    config = {"model_type": "qwen2", "hidden_size": 64}
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "a"))
    first = kernel_cache.marker(config, {"lora_rank": 8})
    assert kernel_cache.marker(config, {"lora_rank": 8}) == first and first.parent == tmp_path / "kernels"
    assert kernel_cache.marker(config, {"lora_rank": 16}) != first
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "b"))
    assert kernel_cache.marker(config, {"lora_rank": 8}) != first
    monkeypatch.delenv("TRITON_CACHE_DIR")  # Triton's cache then lies under TRITON_HOME
    monkeypatch.setenv("TRITON_HOME", str(tmp_path / "c"))
    third = kernel_cache.marker(config, {"lora_rank": 8})
    monkeypatch.setenv("TRITON_HOME", str(tmp_path / "d"))
    assert kernel_cache.marker(config, {"lora_rank": 8}) != third


def test_an_moe_whose_experts_are_stored_one_by_one_is_not_staged(tmp_path):
    """transformers saves (and the hub holds) an MoE's experts one tensor each and stacks them into one 3-D weight
    as it loads: a staged copy could not be adopted and would sit beside the model's own (on the GPU, two copies
    of the experts at start-up). Such files are left to load_model."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                            num_experts=4, num_experts_per_tok=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    files = sorted(tmp_path.glob("*.safetensors"))
    names = {k for f in files for k in load_file(f)}
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in names  # stored one by one
    model = load_model(tmp_path, torch.float32, "cpu")
    assert model.get_parameter("model.layers.0.mlp.experts.gate_up_proj").shape == (4, 32, 32)  # stacked on load
    assert preload.read_into(files, "cpu", torch.float32) is None
