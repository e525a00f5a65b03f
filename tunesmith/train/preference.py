"""The preference losses of `tunesmith rlhf` (DPO with sigmoid/ipo/hinge and RPO, ORPO, SimPO, KTO), as TRL
computes them, on packed rows.

    Objective   what fit() trains on: one window's pairs (or KTO answers), grouped so that a prompt's chosen
                and rejected answers share one packed row (per-sample attention keeps them apart); the loss of
                a group is the sum of its pairs' losses, fit() divides by the window's pairs (a mean, as TRL)

The reference log-probabilities come from the same model with the adapter switched off (PEFT's
disable_adapter), or with a second, frozen adapter "ref" (--ref_adapters, or the --adapters a run starts from):
no second copy of the model.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from .batches import loss_of, micro_batches

REF = "ref"  # the frozen reference adapter's name (as TRL names it)


def token_logps(hidden, head, targets, chunk: int = 4096):
    """log p(target) per answer token; the logits exist one chunk at a time: the fused loss's chunks for a plain
    frozen head (as sft's loss), else `chunk` rows, recomputed in backward."""
    from ..engine import fused_loss

    if fused_loss.fusable(head):
        return -fused_loss.linear_token_nll(hidden, head, targets)
    from torch.utils.checkpoint import checkpoint

    def part(h, t):
        return -F.cross_entropy(head(h).float(), t, reduction="none")

    if hidden.shape[0] <= chunk:
        return part(hidden, targets)
    return torch.cat([checkpoint(part, hidden[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
                      for i in range(0, hidden.shape[0], chunk)])


def disable_dropout(model) -> None:
    """Every dropout module at p=0 (the policy's LoRA dropout, the reference adapter's, the model's own), as TRL's
    preference trainers do by default (disable_dropout=True): a noisy policy or reference would put noise into
    policy minus reference, the reward itself."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class Objective:
    """One window's preference loss for fit(), and the metrics TRL logs (rewards/chosen, rewards/rejected,
    rewards/accuracies, rewards/margins, logps/chosen, logps/rejected; nll_loss, log_odds_*, kl where they apply)."""

    def __init__(self, model, args, reference: str | None):
        self.model, self.args = model, args
        self.reference = reference  # None: the base (adapter off); REF: the frozen adapter
        self.kind, self.beta = args.rlhf_type, args.beta
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    # --- what fit() asks -----------------------------------------------------------------------

    def units(self, items) -> int:
        """A window's loss is the mean over its pairs (KTO: answers)."""
        return len(items)

    def length(self, item) -> int:
        return item.length()

    def batches(self, items, args, device):
        """The window as groups of pairs that fit one packed row (a pair longer than a row gets two); KTO's
        KL term (detached) and the chosen-token count of the NLL terms are window-wide and worked out first."""
        budget = max(args.max_length, args.per_device_train_batch_size * args.max_length)
        window = {"n": len(items)}
        if self.kind == "kto":
            window["kl"] = self._kl(items, device) if len(items) > 1 else 0.0
        else:  # the tokens the NLL term is a mean over (ORPO's runs over the whole chosen sequence, as TRL's)
            window["chosen_tokens"] = sum(self._nll_tokens(p) for p in items)
        groups, group, size = [], [], 0
        for item in items:
            if group and size + item.length() > budget:
                groups.append(group)
                group, size = [], 0
            group.append(item)
            size += item.length()
        if group:
            groups.append(group)
        return [{"items": g, "window": window, "device": device} for g in groups]

    def __call__(self, micro):
        items, window = micro["items"], micro["window"]
        whole = None  # the answer's length where a sequence carries loss beyond its answer
        if self.kind == "kto":
            seqs = [s.answer.encoded() for s in items]
        elif self.kind == "orpo":
            seqs = [e for p in items for e in (p.chosen.whole(), p.rejected.encoded())]
            whole = [n for p in items for n in (len(p.chosen.answer), None)]
        else:
            seqs = [e for p in items for e in (p.chosen.encoded(), p.rejected.encoded())]
        policy, nll = self._logps(seqs, micro["device"], grad=True, whole=whole)
        ref = None
        if self.kind in ("dpo", "kto"):
            with torch.no_grad(), self._reference():
                ref, _ = self._logps(seqs, micro["device"], grad=False)
        return getattr(self, f"_{self.kind}")(items, window, policy, ref, nll)

    def metrics(self) -> dict:
        """Means since the last call, in TRL's names."""
        out = {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k]}
        if self.kind == "kto" and "rewards/chosen" in out and "rewards/rejected" in out:  # TRL: of the means
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        self.sums, self.counts = {}, {}
        out = {k: round(v, 6) for k, v in out.items()}
        return out

    # --- the losses ------------------------------------------------------------------------------

    def _dpo(self, items, window, policy, ref, nll):
        chosen, rejected = policy[0::2], policy[1::2]
        chosen_ratio, rejected_ratio = chosen - ref[0::2], rejected - ref[1::2]
        delta = chosen_ratio - rejected_ratio
        a = self.args
        if a.loss_type == "sigmoid":
            losses = -F.logsigmoid(self.beta * delta)
        elif a.loss_type == "hinge":
            losses = torch.relu(1 - self.beta * delta)
        else:  # ipo: per answer token, as TRL normalises it
            n_c, n_r = self._answer_tokens(items, policy)
            losses = (chosen_ratio / n_c - rejected_ratio / n_r - 1 / (2 * self.beta)) ** 2
        loss = losses.sum()
        if a.rpo_alpha:  # RPO: TRL's "sft" term, the NLL per chosen token of the window
            loss = loss + a.rpo_alpha * nll * window["n"] / window["chosen_tokens"]
            self._nll(items, window, nll)
        self._rewards(self.beta * chosen_ratio.detach(), self.beta * rejected_ratio.detach(), chosen, rejected)
        return loss

    def _simpo(self, items, window, policy, ref, nll):
        n_c, n_r = self._answer_tokens(items, policy)
        chosen, rejected = policy[0::2] / n_c, policy[1::2] / n_r  # average log-probability per token
        logits = chosen - rejected - self.args.simpo_gamma / self.beta
        loss = -F.logsigmoid(self.beta * logits).sum()
        if self.args.cpo_alpha:
            loss = loss + self.args.cpo_alpha * nll * window["n"] / window["chosen_tokens"]
        self._nll(items, window, nll)
        self._rewards(self.beta * chosen.detach(), self.beta * rejected.detach(), chosen, rejected)
        return loss

    def _orpo(self, items, window, policy, ref, nll):
        n_c, n_r = self._answer_tokens(items, policy)
        chosen, rejected = policy[0::2] / n_c, policy[1::2] / n_r
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        loss = nll * window["n"] / window["chosen_tokens"] - self.beta * ratio.sum()
        self._nll(items, window, nll)
        self._add("log_odds_ratio", ratio.sum().item(), len(items))
        self._add("log_odds_chosen", log_odds.sum().item(), len(items))
        self._rewards(self.beta * chosen.detach(), self.beta * rejected.detach(), chosen, rejected)
        return loss

    def _kto(self, items, window, policy, ref, nll):
        a, kl = self.args, window["kl"]
        good = torch.tensor([s.label for s in items], device=policy.device)
        ratio = policy - ref
        losses = torch.where(good, a.desirable_weight * (1 - torch.sigmoid(self.beta * (ratio - kl))),
                             a.undesirable_weight * (1 - torch.sigmoid(self.beta * (kl - ratio))))
        rewards = self.beta * ratio.detach()
        n_good = int(good.sum())
        if n_good:
            self._add("rewards/chosen", rewards[good].sum().item(), n_good)
            self._add("logps/chosen", policy[good].detach().sum().item(), n_good)
        if len(items) - n_good:
            self._add("rewards/rejected", rewards[~good].sum().item(), len(items) - n_good)
            self._add("logps/rejected", policy[~good].detach().sum().item(), len(items) - n_good)
        self._add("kl", kl * len(items), len(items))
        return losses.sum()

    # --- pieces ------------------------------------------------------------------------------------

    def _logps(self, seqs, device, grad: bool, whole=None):
        """Summed log-probability of each sequence's answer, and the summed NLL of the chosen sequences (even
        positions; KTO: none), from packed rows. `whole`: per sequence, None, or its answer's length where the
        sequence carries loss on its prompt too (ORPO's chosen: the NLL covers them, the log-probability not)."""
        out, totals = [], []
        for row in self._rows(seqs, device, whole):
            per_token = loss_of(self.model, row["batch"], loss=token_logps)
            zeros = torch.zeros(row["n"], device=per_token.device, dtype=per_token.dtype)
            totals.append(zeros.index_add(0, row["segments"], per_token))
            out.append(totals[-1] if row["answer"] is None else
                       zeros.index_add(0, row["segments"], per_token * row["answer"]))
        logps, totals = torch.cat(out), torch.cat(totals)
        nll = -totals[0::2].sum() if grad and self.kind != "kto" else None
        return logps, nll

    def _rows(self, seqs, device, whole=None):
        """micro_batches' rows for these sequences, each with which sequence every loss token belongs to (and,
        with `whole`, a mask of the answer tokens among them)."""
        start = 0
        for batch in micro_batches(seqs, self.args, device):
            n = batch["cu_seq_lens_q"].numel() - 1 if "cu_seq_lens_q" in batch else batch["input_ids"].shape[0]
            mine = seqs[start:start + n]
            counts = [sum(1 for x in s.labels[1:] if x != -100) for s in mine]  # the shifted labels' loss tokens
            segments = torch.repeat_interleave(torch.arange(n), torch.tensor(counts)).to(device)
            answer = None
            if whole is not None:  # an answer is the last tokens of its sequence
                lengths = [c if a is None else a for c, a in zip(counts, whole[start:start + n])]
                answer = torch.tensor([float(j >= c - a) for c, a in zip(counts, lengths) for j in range(c)],
                                      device=device)
            yield {"batch": batch, "n": n, "segments": segments, "answer": answer}
            start += n

    def _nll_tokens(self, pair) -> int:
        """The tokens of a pair's NLL term: the chosen answer's; ORPO's, all of the chosen sequence but its first
        (TRL's ORPOTrainer computes it over prompt and answer)."""
        if self.kind == "orpo":
            return len(pair.chosen.prompt) + len(pair.chosen.answer) - 1
        return len(pair.chosen.answer)

    def _nll(self, items, window, nll) -> None:
        """nll_loss as TRL logs it: the mean per token of the step's NLL term (this group's share of it)."""
        share = sum(self._nll_tokens(p) for p in items) / window["chosen_tokens"]
        self._add("nll_loss", nll.item() / window["chosen_tokens"], share)

    def _answer_tokens(self, items, policy):
        as_tensor = lambda xs: torch.tensor(xs, device=policy.device, dtype=policy.dtype)  # noqa: E731
        return as_tensor([len(p.chosen.answer) for p in items]), as_tensor([len(p.rejected.answer) for p in items])

    def _kl(self, items, device) -> float:
        """TRL's KL estimate: each prompt with another answer of the window (rotated by one, in data order), policy
        minus reference, averaged, clamped at 0, no gradient."""
        ordered = sorted(items, key=lambda s: s.index)
        seqs = [s.answer.encoded(ordered[k - 1].answer.answer) for k, s in enumerate(ordered)]
        with torch.no_grad():
            policy, _ = self._logps(seqs, device, grad=False)
            with self._reference():
                ref, _ = self._logps(seqs, device, grad=False)
        return max(0.0, (policy - ref).mean().item())

    @contextlib.contextmanager
    def _reference(self):
        """The reference model: the adapter off, or the frozen "ref" adapter active; in eval mode, so that no
        dropout outside a dropout module (a config's attention_dropout) makes it noisy either."""
        training = self.model.training
        self.model.eval()
        try:
            with self._reference_weights():
                yield
        finally:
            self.model.train(training)

    @contextlib.contextmanager
    def _reference_weights(self):
        if self.reference is None:
            with self.model.disable_adapter():
                yield
            return
        active = self.model.active_adapter
        self.model.base_model.set_adapter(self.reference)
        try:
            yield
        finally:
            self.model.base_model.set_adapter(active)  # (and the trained adapter trainable again)

    def _rewards(self, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
        n = len(chosen_rewards)
        self._add("rewards/chosen", chosen_rewards.sum().item(), n)
        self._add("rewards/rejected", rejected_rewards.sum().item(), n)
        self._add("rewards/accuracies", (chosen_rewards > rejected_rewards).float().sum().item(), n)
        self._add("rewards/margins", (chosen_rewards - rejected_rewards).sum().item(), n)
        self._add("logps/chosen", chosen_logps.detach().sum().item(), n)
        self._add("logps/rejected", rejected_logps.detach().sum().item(), n)

    def _add(self, key: str, total: float, n: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + total
        self.counts[key] = self.counts.get(key, 0) + n
