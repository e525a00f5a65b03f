"""--keep_kl (issue 19): a divergence-to-base term on the built-in general prompts, computed with the adapter switched
off, that holds the rest of the model where it was while the adapter learns the user's data."""

import json
import math

import pytest

from conftest import GUIDE_DATA, tunesmith

MODEL = "smollm2-135m"
SYSTEM = "You are a helpful assistant."


def test_a_bad_weight_is_one_line_and_no_run(tmp_path):
    for command, value, says in (("sft", "-1", "--keep_kl must be 0 (off) or a positive weight"), ("sft", "nan", "got nan"),
                                 ("sft", "x", "--keep_kl: invalid float value: 'x'"),
                                 ("rlhf", "1", "--keep_kl is for `tunesmith sft`")):
        proc = tunesmith(command, "--dataset", GUIDE_DATA, "--keep_kl", value, "--output_dir", tmp_path / "out",
                         check=False, timeout=120)
        assert proc.returncode == 2, (value, proc.stderr)
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and says in proc.stderr, (value, proc.stderr)
        assert not (tmp_path / "out").exists()


def test_the_kl_is_exact_over_top_k_and_the_rest():
    """The term's KL equals KL(base || tuned) computed outright on the partition {base's top-k, every other token},
    equals the full KL when k is the whole vocabulary, and is zero for the base itself."""
    import torch

    from tunesmith.train import keep

    torch.manual_seed(0)
    base, tuned = torch.randn(5, 50) * 3, torch.randn(5, 50) * 3
    p, q = base.softmax(-1).double(), tuned.softmax(-1).double()

    def reference(k):
        return keep.top_k(base, k)

    for k in (1, 8, 32):
        ids = reference(k)[0]
        p_top, q_top = p.gather(-1, ids), q.gather(-1, ids)
        p_rest, q_rest = 1 - p_top.sum(-1), 1 - q_top.sum(-1)
        outright = (p_top * (p_top / q_top).log()).sum() + (p_rest * (p_rest / q_rest).log()).sum()
        assert math.isclose(float(keep._kl(tuned, *reference(k))), float(outright), rel_tol=1e-4)
    full = (p * (p / q).log()).sum()
    assert math.isclose(float(keep._kl(tuned, *reference(50))), float(full), rel_tol=1e-4)
    assert abs(float(keep._kl(base, *reference(8)))) < 1e-5


def _kl_to_base(adapter, queries) -> float:
    """Mean KL(base || tuned) per token over the base model's own greedy answers (32 tokens) to `queries`, measured
    with transformers and PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.model.resolve import resolve_model

    path = resolve_model(MODEL).path
    tok = AutoTokenizer.from_pretrained(path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), str(adapter))
    total, count = 0.0, 0
    with torch.no_grad():
        for query in queries:
            prompt = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": query}],
                                             add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
            n = prompt.shape[1]
            with model.disable_adapter():
                ids = model.generate(input_ids=prompt, max_new_tokens=32, do_sample=False, pad_token_id=tok.eos_token_id)
                base = model(ids).logits[0, n - 1:-1].log_softmax(-1)
            tuned = model(ids).logits[0, n - 1:-1].log_softmax(-1)
            total += float((base.exp() * (base - tuned)).sum())
            count += base.shape[0]
    return total / count


@pytest.mark.slow
def test_keep_holds_the_base_on_general_prompts(tmp_path, default_model):
    """The same identity run at a high learning rate, with and without --keep_kl: with it the tuned model stays
    closer to the base on general questions that are not in the bank it trained on (`tunesmith eval`'s: KL per token
    on the base's own answers, measured afterwards with PEFT), and logging.jsonl shows the term."""
    from tunesmith.inference.evaluate import BUILTIN

    sft = ["sft", "--model", MODEL, "--dataset", GUIDE_DATA, "--num_train_epochs", "2", "--gradient_accumulation_steps", "1",
           "--learning_rate", "1e-3", "--logging_steps", "2", "--system", SYSTEM, "--seed", "7"]
    runs = {}
    for weight in ("0", "2"):
        out = tmp_path / f"keep{weight}"
        proc = tunesmith(*sft, "--keep_kl", weight, "--output_dir", out)
        runs[weight] = next(line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("last_model_checkpoint: "))
        logged = [json.loads(line) for line in (sorted(out.glob("v0-*"))[0] / "logging.jsonl").read_text().splitlines()]
        if weight == "2":
            assert "--keep_kl 2: " in proc.stderr and "general prompts (KL to the adapter-off model" in proc.stderr
            kls = [e["keep_kl"] for e in logged if "keep_kl" in e]
            assert kls and all(k >= 0 for k in kls) and max(kls) > 0
        else:
            assert not any("keep_kl" in e for e in logged)
    general = [q["query"] for q in BUILTIN if "expect" in q]
    free, held = _kl_to_base(runs["0"], general), _kl_to_base(runs["2"], general)
    print(f"KL to the base per token on {len(general)} general questions: {free:.4f} without --keep_kl, {held:.4f} with 2")
    assert held < 0.7 * free, (held, free)
