"""What tunesmith needs to know of a model family beyond its config (issue 17): whether it trains it at all (text-only
causal language models), and the attention kernel it loads with. Both are read from transformers' own classes, so a
new family of the same kind needs no entry here."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def causal_lm_class(config):
    """transformers' class behind AutoModelForCausalLM for this config, or None."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (KeyError, ValueError):
        return None


def check_supported(config, path: Path) -> None:
    """One line, before any weights load, for a family tunesmith does not train: models without a causal LM class
    (encoder-decoders, vision-language models), and those whose causal LM class is a multimodal one."""
    cls = causal_lm_class(config)
    kind = getattr(config, "model_type", "?")
    arch = ", ".join(getattr(config, "architectures", None) or []) or kind
    if cls is None:
        raise UserError(f"--model {path}: a {kind} model ({arch}) is not a text causal language model, and tunesmith "
                        "trains only those; use a text-only model of this family (e.g. its -Instruct LLM)")
    if cls.__name__.endswith("ForConditionalGeneration"):
        text = getattr(getattr(config, "text_config", None), "model_type", None)
        raise UserError(f"--model {path}: a {kind} model ({cls.__name__}: text with images or audio) is not supported "
                        f"yet; tunesmith trains text-only models: use a text-only checkpoint of this family"
                        + (f" (model_type {text}, e.g. the family's smallest text model)" if text else ""))


def attention_implementation(config) -> str:
    """SDPA, or eager attention for a family whose attention SDPA cannot compute (Gemma 2: logit softcapping)."""
    cls = causal_lm_class(config)
    return "eager" if cls is not None and getattr(cls, "_supports_sdpa", True) is False else "sdpa"


def skeleton(config):
    """The model of `config` on the meta device: its modules and parameter shapes, no weights (a second or so)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
