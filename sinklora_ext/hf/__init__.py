"""Hugging Face glue: SF-Attn as a transformers attention backend, the paged H2O cache as a
transformers ``Cache``, LoRA+ through peft, and model loading (docs/training.md, docs/paged_kv.md).

- :mod:`.attention`: the ``sinklora_*`` attention functions; ``set_attention`` (for good) and
  ``use_attention`` (a ``with`` block) switch a model to a preset.
- :mod:`.cache`: ``PagedH2OCache``, ``cache_kwarg``, ``generate_with_policy``.
- :mod:`.lora`: ``apply_lora_plus``, ``load_adapter``, ``peft_quiet``, ``extend_context``.
- :mod:`.models`: ``load_model`` (the default SmolLM2 model or a local checkpoint), ``offline``,
  ``resolve_device``, ``resolve_dtype``, ``base_model``.

The names below are re-exported lazily: ``import sinklora_ext.hf`` imports neither transformers nor
peft; the first use of a name imports its module (``.attention`` and ``.cache`` register their
attention functions with transformers then).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "attention": ("implementation_name", "set_attention", "use_attention"),
    "cache": ("PagedH2OCache", "cache_kwarg", "generate_with_policy"),
    "lora": ("apply_lora_plus", "extend_context", "load_adapter", "lora_plus_config", "original_context",
             "peft_quiet", "trainable_parameter_names"),
    "models": ("base_model", "default_model_path", "load_model", "offline", "resolve_device", "resolve_dtype"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
