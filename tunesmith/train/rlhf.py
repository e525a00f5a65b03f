"""`tunesmith rlhf`: preference tuning (DPO, ORPO, SimPO, KTO), the sft recipe with other data, adapter and loss.

    run()        the adapter's args.json fills --model/--system, then recipe.run() with Preference
    Preference   data (data/preference.py), the adapter (new, or --adapters, plus the frozen reference), the
                 loss (preference.Objective); everything else (run folder, logging.jsonl, checkpoints, resume,
                 Ctrl-C, NaN guard, memory plan) is sft's
"""

from __future__ import annotations

from . import recipe
from .checkpoint import check_adapter_dir
from .preference import REF, Objective, disable_dropout
from ..args import RlhfArguments, load_args_json
from ..console import log
from ..data import preference as data
from ..errors import UserError


class Preference:
    def __init__(self, args: RlhfArguments):
        self.reference = None  # None: the base with the adapter off; REF: a frozen adapter

    def prepare(self, args: RlhfArguments, tok):
        return data.prepare(args, tok)

    def length(self, item) -> int:
        return item.length()

    def adapter(self, model, args: RlhfArguments):
        """A new LoRA adapter, or the --adapters one to train on; the reference adapter beside it, frozen."""
        from peft import PeftModel

        if args.adapters:
            model = PeftModel.from_pretrained(model, str(args.adapters[0]), is_trainable=True)
        else:
            model = recipe.add_lora(model, args)
        ref = args.ref_adapters[0] if args.ref_adapters else args.adapters[0] if args.adapters else None
        if ref is not None and args.rlhf_type in ("dpo", "kto"):
            model.load_adapter(str(ref), adapter_name=REF, is_trainable=False)
            self.reference = REF
        disable_dropout(model)
        return model

    def objective(self, model, args: RlhfArguments) -> Objective:
        return Objective(model, args, self.reference)


def run(args: RlhfArguments) -> int:
    for name in ("adapters", "ref_adapters"):
        paths = getattr(args, name)
        if paths:
            setattr(args, name, [str(check_adapter_dir(paths[0]))])
    if args.adapters:  # the SFT run's base model and system prompt, unless given
        trained = load_args_json(args.adapters[0] + "/args.json")
        args.model = args.model or trained.get("model")
        args.system = args.system if args.system is not None else trained.get("system")
    if args.val_dataset or args.split_dataset_ratio > 0:
        raise UserError("rlhf does not validate yet: drop --val_dataset / --split_dataset_ratio")
    method = Preference(args)
    ref = ("none" if args.rlhf_type in ("orpo", "simpo") else
           f"the adapter {(args.ref_adapters or args.adapters)[0]}" if (args.ref_adapters or args.adapters) else
           "the base model (adapter off)")
    extra = {"dpo": f"loss_type {args.loss_type}" + (f", rpo_alpha {args.rpo_alpha}" if args.rpo_alpha else ""),
             "simpo": f"simpo_gamma {args.simpo_gamma}, cpo_alpha {args.cpo_alpha}", "orpo": "",
             "kto": f"desirable_weight {args.desirable_weight}, undesirable_weight {args.undesirable_weight}"}
    log(f"rlhf {args.rlhf_type}: beta {args.beta}" + (f", {extra[args.rlhf_type]}" if extra[args.rlhf_type] else "")
        + f"; reference: {ref}; dropout off (as TRL's disable_dropout), CUDA graphs off for rlhf")
    return recipe.run(args, method)
