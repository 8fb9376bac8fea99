"""vLLM plugin (docs/serving.md): the ``SINKLORA`` attention backend, which serves H2O and StreamingLLM
eviction inside vLLM, and the KV-cache spec and manager that give evicted blocks back to vLLM's
pool. vLLM calls :func:`register` in every process (entry point ``vllm.general_plugins``)::

    LLM(model, attention_backend="SINKLORA", enable_prefix_caching=False,
        additional_config={"sinklora": {"policy": "h2o", "kv_budget": 256, "num_sinks": 4, "recent": 128}})

Importing this package imports nothing from vLLM; :func:`register` and the modules vLLM loads by
class path do.
"""

from __future__ import annotations

from .config import BACKEND_NAME, CONFIG_KEY, SinkLoRAConfig

__all__ = ["register", "BACKEND_NAME", "CONFIG_KEY", "SinkLoRAConfig"]

_WRAPPED = "_sinklora_wrapped"


def register() -> None:
    """Register the backend, its KV-cache spec and manager, and the platform hooks; idempotent."""
    from vllm.platforms import current_platform
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from . import names
    from .spec import SinkLoRAManager, SinkLoRASpec

    names.register_member()
    KVCacheSpecRegistry._ensure_registered()  # the built-in specs first, or they would be left out
    KVCacheSpecRegistry.register(SinkLoRASpec, SinkLoRAManager, uniform_type_base_spec=SinkLoRASpec)
    _hook_platform(type(current_platform))


def _hook_platform(platform) -> None:
    """Refuse unsupported engine settings when the config is built (a clear error in the caller's
    process), and on the CPU honour ``attention_backend="SINKLORA"``, which the CPU platform
    otherwise replaces by its own backend."""
    from .config import check_engine, uses_backend

    check = platform.check_and_update_config
    if not getattr(check, _WRAPPED, False):
        original_check = check.__func__

        def check_and_update_config(cls, vllm_config):
            if uses_backend(vllm_config):
                check_engine(vllm_config)
            return original_check(cls, vllm_config)

        setattr(check_and_update_config, _WRAPPED, True)
        platform.check_and_update_config = classmethod(check_and_update_config)

    if platform.__name__ != "CpuPlatform":
        return
    select = platform.get_attn_backend_cls
    if getattr(select, _WRAPPED, False):
        return
    original_select = select.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if getattr(selected_backend, "name", None) == BACKEND_NAME and not attn_selector_config.use_mla:
            return selected_backend.get_path()
        return original_select(cls, selected_backend, attn_selector_config, num_heads)

    setattr(get_attn_backend_cls, _WRAPPED, True)
    platform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
