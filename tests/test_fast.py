"""The fast path computes the same thing as the plain one (CPU-runnable checks)."""

import copy

import pytest
import torch
from transformers import AttentionInterface

from tunesmith import fast
from tunesmith.args import SftArguments
from tunesmith.template import IGNORE, Encoded
from tunesmith.train import add_lora, loss_of, micro_batches


@pytest.fixture(scope="module")
def tiny():
    """A small random Qwen2-architecture model (real transformers code, random weights)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()


def samples(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 40, (1,), generator=g))
        ids = torch.randint(0, 300, (length,), generator=g).tolist()
        cut = length // 2
        out.append(Encoded(ids, [IGNORE] * cut + ids[cut:]))
    return out


def losses_and_grads(model, args, data):
    torch.manual_seed(0)
    m = add_lora(copy.deepcopy(model), args)
    if args.packing_window:
        fast.use_document_attention(m.get_base_model())
    total = sum(loss_of(m, b) for b in micro_batches(data, args, "cpu"))
    total.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return total.item(), grads


def test_packed_document_attention_equals_padded_batches(tiny):
    data = samples()
    plain = SftArguments(dataset=["x"], lora_dropout=0.0, packing_window=False, per_device_train_batch_size=2)
    packed = SftArguments(dataset=["x"], lora_dropout=0.0, packing_window=True)
    loss_a, grads_a = losses_and_grads(tiny, plain, data)
    loss_b, grads_b = losses_and_grads(tiny, packed, data)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6)


def test_samples_do_not_see_each_other(tiny):
    """Changing one packed sample leaves the loss of the others unchanged."""
    args = SftArguments(dataset=["x"], lora_dropout=0.0)
    data = samples(3)
    other = [data[0], Encoded([7] * len(data[1].input_ids), [IGNORE] * len(data[1].labels)), data[2]]
    m = add_lora(copy.deepcopy(tiny), args)
    fast.use_document_attention(m.get_base_model())
    assert m.config._attn_implementation == fast.DOC_ATTENTION
    with torch.no_grad():
        a = sum(loss_of(m, b) for b in micro_batches([data[0], data[2]], args, "cpu")).item()
        b = sum(loss_of(m, b) for b in micro_batches(other, args, "cpu")).item()
    assert b == pytest.approx(a, rel=1e-5)


def test_checkpointing_a_share_of_layers_changes_nothing_but_memory(tiny):
    data = samples()
    args = SftArguments(dataset=["x"], lora_dropout=0.0)
    loss_a, grads_a = losses_and_grads(tiny, args, data)
    torch.manual_seed(0)
    m = add_lora(copy.deepcopy(tiny), args)
    fast.use_document_attention(m.get_base_model())
    assert fast.checkpoint_layers(m, 0.5) == 2
    m.train()
    calls = []
    AttentionInterface.register(fast.DOC_ATTENTION, lambda *a, **k: calls.append(1) or fast.document_attention(*a, **k))
    try:
        total = sum(loss_of(m, b) for b in micro_batches(data, args, "cpu"))
        total.backward()
    finally:
        AttentionInterface.register(fast.DOC_ATTENTION, fast.document_attention)
    assert len(calls) == 3 + 2  # every layer forward, then the two checkpointed layers again in backward
    assert total.item() == pytest.approx(loss_a, rel=1e-5)
    for n, p in m.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads_a[n], rtol=1e-4, atol=1e-6)


def test_chunked_cross_entropy_equals_the_plain_loss():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    plain = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    g_plain = torch.autograd.grad(plain, [hidden, head.weight])
    chunked = fast.chunked_cross_entropy(hidden, head, targets, chunk=8)
    g_chunked = torch.autograd.grad(chunked, [hidden, head.weight])
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    for a, b in zip(g_plain, g_chunked):
        torch.testing.assert_close(a, b)
