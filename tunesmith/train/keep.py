"""--keep_kl: hold the rest of the model where it was while the adapter learns the user's data.

Every few optimizer steps the model also trains on a few prompts of the built-in general bank (data/replay.py),
answered as the base model answered them, towards the base model's own next-token distribution there:

    loss of such a step = (mean cross-entropy over the window's answer tokens)
                          + keep_kl x every x (mean over the prompts' first ANSWER_TOKENS answer tokens of KL(base || tuned))

The bank adds about SHARE of the tokens the user's windows train on: `every` EVERY steps or more, one pass of up to
MAX_PROMPTS prompts packed in one row (the guide's two short records a step: 2 prompts every 4th step; windows of
thousands of tokens: 8 every 4th). A pass costs a whole model's kernels however short it is, hence not every
step. The weight is scaled by `every`, so the pull per step is keep_kl whatever `every` is.

The base's distribution is the same model with the adapter switched off (PEFT's disable_adapter, as rlhf's
reference): no second copy of the model. It is worked out once per bank prompt, the first time that prompt comes
up, and kept as its TOP_K tokens plus the mass of all the others, so the KL is exact over that partition.

Unlike --replay_ratio, which mixes the base's answers into the data as more samples (so more optimizer steps, and
its cross-entropy pulls towards one greedy answer), this adds no step: one short forward and backward more every
`every` steps, and for prompts met the first time one forward with the adapter off.
"""

from __future__ import annotations

import dataclasses
import json
import random

import torch

from ..console import log
from ..data import replay
from ..data.template import IGNORE, Encoded
from ..errors import UserError
from .batches import loss_of, micro_batches
from .preference import log1mexp

TOP_K = 32  # the base's most likely tokens kept per position; the rest count as one outcome
ANSWER_TOKENS = 32  # the answer's first tokens: where a model says what it knows ("...的首都是北京")
SHARE = 0.25  # bank tokens trained per token of the user's windows, about
EVERY = 4  # steps between two passes of the term, at least: each pass costs the GPU's host a whole model's kernels
MAX_PROMPTS = 8  # bank prompts in one pass (one packed row)


class KeepTerm:
    """The --keep_kl term: step(n) runs its forward and backward on every `every`-th step, over `prompts` bank
    prompts in one packed row, and adds its gradient to .grad; metrics() is the mean KL per token since the last
    log line."""

    def __init__(self, model, samples: list[Encoded], weight: float, every: int, prompts: int, seed: int, device: str,
                 par=None):
        self.model, self.samples, self.device = model, samples, device
        self.par = par if par is not None and par.active else None  # under torchrun: this rank's share of each pass
        self.every, self.prompts, self.weight = every, prompts, weight * every  # the pull per step is `weight`
        self.order = list(range(len(samples)))
        random.Random(seed).shuffle(self.order)
        self.reference: dict[int, tuple] = {}  # prompt -> (top-k ids, their log-probs, log-mass of the rest)
        self.sums, self.count = None, 0  # the KL per token since the last log line, summed on the device

    @classmethod
    def build(cls, model, template, args, model_path, device, window_tokens: float, par=None) -> KeepTerm:
        """The term for a run with --keep_kl. The bank's answers are replay.ensure()'s;
        `window_tokens`: the mean tokens of one optimizer step's whole window (all processes');
        `par` (distributed.py): under torchrun each process runs its share of every pass."""
        path = replay.answers_file(args, model_path)
        if not path.exists():  # `tunesmith sft` generates them first (replay.ensure); a direct train.run does not
            raise UserError(f"--keep_kl {args.keep_kl:g}: the base model's answers are not generated yet ({path}); "
                            "run `tunesmith sft`, which generates them once")
        samples = []
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            enc = template.encode([{"role": "user", "content": record["query"]},
                                   {"role": "assistant", "content": record["response"]}])
            samples.append(_first_answer_tokens(enc, ANSWER_TOKENS))
        samples = [s for s in samples if s.n_trained]
        if not samples:
            raise UserError(f"--keep_kl {args.keep_kl:g}: none of the base model's answers in {path} has an answer "
                            "token under this chat template; train without it (--keep_kl 0)")
        bank_tokens = sum(len(s.input_ids) for s in samples) / max(1, len(samples))
        window_tokens = max(1.0, window_tokens)
        every = max(EVERY, round(bank_tokens / (SHARE * window_tokens)))
        prompts = min(MAX_PROMPTS, len(samples), max(1, round(SHARE * window_tokens * every / bank_tokens)))
        log(f"--keep_kl {args.keep_kl:g}: every {_nth(every)} step also holds the model to the base model's own "
            f"answers on {prompts} of {len(samples)} general prompts (KL to the adapter-off model over their first "
            f"{ANSWER_TOKENS} answer tokens; about {100 * bank_tokens * prompts / every / window_tokens:.0f}% more "
            "tokens trained)")
        return cls(model, samples, args.keep_kl, every, prompts, args.seed, device, par)

    def step(self, step: int, args) -> None:
        """On every `every`-th step: forward and backward of its bank prompts; their gradient (times keep_kl x
        every, a mean over their answer tokens) joins .grad."""
        if step % self.every:
            return
        first = (step // self.every - 1) * self.prompts
        chosen = [self.order[(first + i) % len(self.order)] for i in range(self.prompts)]
        new = [i for i in chosen if i not in self.reference]
        if new:
            self._reference(new, args)
        n = sum(self.samples[i].n_trained for i in chosen)  # the mean is over the whole pass's answer tokens
        mine, weight = self._share(chosen)
        micros = list(micro_batches([self.samples[i] for i in mine], self._rows(args, mine), self.device))
        reference = [torch.cat(t) for t in zip(*(self.reference[i] for i in mine))]  # in the micros' order
        at = 0
        for micro in micros:  # one packed row, unless --packing_window is off (one row per process under torchrun)
            k = len(micro["loss_targets"])
            ids, logp, rest = (t[at:at + k] for t in reference)
            loss = self._forward(micro, lambda hidden, head, _: _kl(head(hidden), ids, logp, rest))
            (loss * (weight / n)).backward()  # no loss outlives its backward (see loop._eager_window)
            kl = loss.detach() / n * (weight != 0)  # no host sync here: the GPU runs on while the next window is issued
            self.sums = kl if self.sums is None else self.sums + kl
            at += k
            del loss
        self.count += 1

    def _share(self, chosen: list[int]) -> tuple[list[int], float]:
        """This process's prompts of a pass, and the weight of their summed KL. Under torchrun DDP and FSDP average
        the gradient over the processes, hence x world; a process left without a prompt runs one at weight 0, so
        that every process joins the same gradient exchanges."""
        if self.par is None:
            return chosen, self.weight
        mine = chosen[self.par.rank::self.par.world]
        return (mine, self.weight * self.par.loss_scale) if mine else (chosen[:1], 0.0)

    def _rows(self, args, prompts: list[int]):
        """The settings micro_batches packs a pass with: the run's own in one process; under torchrun one packed
        row, so that every process makes the same number of passes through the wrapped model."""
        if self.par is None:
            return args
        tokens = sum(len(self.samples[i].input_ids) for i in prompts)
        return dataclasses.replace(args, packing_window=True, max_length=max(args.max_length, tokens))

    def _forward(self, micro, loss):
        """The model's pass with a loss at the answer positions: through DDP / FSDP2 under torchrun (their hooks
        exchange the gradient and gather the sharded weights), the model itself otherwise."""
        if self.par is None:
            return loss_of(self.model, micro, loss=loss)
        return self.par.module(micro, loss=loss)

    def _reference(self, prompts: list[int], args) -> None:
        """The base's top-k tokens and log-probabilities at each prompt's answer positions, and the log-mass of
        the rest, kept on the device (TOP_K x ANSWER_TOKENS numbers a prompt)."""
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.model.disable_adapter():  # (every process, all of them: FSDP gathers alike)
                logits = torch.cat([self._forward(micro, lambda hidden, head, _: head(hidden)).float() for micro in
                                    micro_batches([self.samples[i] for i in prompts], self._rows(args, prompts), self.device)])
        finally:
            self.model.train(training)
        for i, part in zip(prompts, zip(*(t.split([self.samples[i].n_trained for i in prompts]) for t in top_k(logits)))):
            self.reference[i] = part

    def metrics(self) -> dict:
        """The mean KL per answer token since the last log line (every process calls it on the same steps)."""
        if not self.count:
            return {}
        kl = float(self.sums) / self.count
        if self.par is not None:  # each process holds its share of the pass's sum
            kl = self.par.sum_floats(kl, device=self.device)[0]
        self.sums, self.count = None, 0
        return {"keep_kl": round(kl, 6)}


def top_k(logits, k: int = TOP_K):
    """(ids, log-probabilities) of the k most likely tokens per position, and the log-mass of all the others."""
    logp, ids = torch.log_softmax(logits, -1).topk(k, dim=-1)
    return ids, logp, _rest(logp)


def _kl(logits, ids, base_logp, base_rest):
    """Summed KL(base || tuned) over positions, on the partition {the base's top-k tokens, everything else}."""
    logq = torch.log_softmax(logits.float(), -1)
    q_top = logq.gather(-1, ids)
    q_rest = _rest(q_top)
    p_top, p_rest = base_logp.exp(), base_rest.exp()
    return (p_top * (base_logp - q_top)).sum() + (p_rest * (base_rest - q_rest)).sum()


def _rest(top_logp):
    """log(1 - the top tokens' mass), kept finite where they hold (nearly) all of it."""
    return log1mexp(torch.logsumexp(top_logp, -1).clamp(max=-1e-7))


def _nth(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 < 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _first_answer_tokens(enc: Encoded, n: int) -> Encoded:
    """The prompt and the first n answer tokens (the rest of the sample is dropped, never trained on)."""
    first = next((k for k, t in enumerate(enc.labels) if t != IGNORE), len(enc.labels))
    return Encoded(enc.input_ids[:first + n], enc.labels[:first + n])
