"""LoRA+ (LongLoRA / SinkLoRA recipe) through peft, and context extension by linear RoPE
position interpolation (docs/training.md).

LoRA+ = LoRA r=8, alpha=16 on q, k, v, o plus trainable input embeddings and all RMSNorms. The
embeddings and norms are peft ``modules_to_save``, so ``save_pretrained`` stores them in the
adapter and plain ``PeftModel.from_pretrained`` reloads them (:func:`load_adapter`: the same, from
local files only and without peft's deprecation warning).

peft reads transformers' deprecated ``is_gradient_checkpointing`` whenever it wraps a model or
loads an adapter, a ``FutureWarning`` for peft and not for our users: :func:`apply_lora_plus` and
:func:`load_adapter` silence that one warning around their peft call, and :func:`peft_quiet` does
for any other (``with peft_quiet(): get_peft_model(...)``). No filter outlives the call.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

from .models import base_model, offline

PEFT_DEPRECATION = "`is_gradient_checkpointing` is deprecated"

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# peft matches modules_to_save by suffix: "norm" catches input_layernorm,
# post_attention_layernorm and the final model.norm.
TRAINABLE_EXTRAS = ("embed_tokens", "norm")


def lora_plus_config(r: int = 8, alpha: int = 16, dropout: float = 0.0, extras: tuple[str, ...] = TRAINABLE_EXTRAS,
                     tied_embeddings: bool = True):
    """``tied_embeddings``: the model's ``lm_head`` shares the embedding (then it follows the trained
    embedding copy)."""
    from peft import LoraConfig

    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(LORA_TARGETS),
        modules_to_save=list(extras),
        bias="none",
        task_type="CAUSAL_LM",
        ensure_weight_tying=tied_embeddings,
    )


@contextlib.contextmanager
def peft_quiet():
    """Inside the block, peft's reads of ``is_gradient_checkpointing`` warn nothing (that warning only;
    ``warnings.catch_warnings``, so the process's filters are as they were after the block)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_DEPRECATION, category=FutureWarning)
        yield


def apply_lora_plus(model, r: int = 8, alpha: int = 16, dropout: float = 0.0,
                    extras: tuple[str, ...] = TRAINABLE_EXTRAS):
    """Wrap ``model`` for LoRA+ training; only LoRA, embedding and norm parameters get gradients."""
    from peft import get_peft_model

    tied = bool(base_model(model).config.tie_word_embeddings)
    config = lora_plus_config(r, alpha, dropout, extras, tied_embeddings=tied)
    with peft_quiet():
        return get_peft_model(model, config)


def load_adapter(model, adapter, **kwargs):
    """``PeftModel.from_pretrained(model, adapter, **kwargs)`` for a local adapter directory (nothing
    is fetched from a hub), without peft's deprecation warning."""
    from peft import PeftModel

    with offline(), peft_quiet():
        return PeftModel.from_pretrained(model, str(Path(adapter).expanduser()), **kwargs)


def trainable_parameter_names(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def original_context(config) -> int:
    """The context the model was pretrained for, before any interpolation of ours."""
    return int(getattr(config, "sinklora_original_context", None) or config.max_position_embeddings)


def extend_context(model, target_context: int, original: int | None = None) -> float:
    """Linear RoPE position interpolation to ``target_context`` tokens, written into the config (so the
    saved model reloads with it) and applied to the loaded model's rotary embedding.

    factor = target / original context (LongLoRA rounds it up to an integer; we keep it exact);
    ``original`` overrides the pretrained context read from the config (scaled-down experiments).
    Returns the factor; 1.0 (nothing changed) when the target fits the original context.
    """
    if target_context < 1:
        raise ValueError(f"target context must be >= 1, got {target_context}")
    if original is not None and original < 1:
        raise ValueError(f"original context must be >= 1, got {original}")
    base = base_model(model)
    config = base.config
    original = original or original_context(config)
    factor = target_context / original
    if factor <= 1.0:
        return 1.0
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    config.rope_parameters = {"rope_type": "linear", "factor": factor, "rope_theta": theta}
    config.sinklora_original_context = original
    config.max_position_embeddings = int(math.ceil(target_context))
    rotary = base.model.rotary_emb
    device = rotary.inv_freq.device
    new_rotary = type(rotary)(config=config)
    base.model.rotary_emb = new_rotary.to(device)
    return factor

