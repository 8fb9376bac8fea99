"""The plugin's configuration: ``additional_config={"sinklora": {...}}`` of a vLLM engine (docs/serving.md),
and the engine settings the backend refuses. Pure Python: importable without vLLM."""

from __future__ import annotations

from dataclasses import dataclass

from ..kv_cache import POLICIES, CachePolicy, decode_rule
from ..usage import UsageError

CONFIG_KEY = "sinklora"
BACKEND_NAME = "SINKLORA"
_FIELDS = ("policy", "kv_budget", "num_sinks", "recent", "score_decay")


@dataclass(frozen=True)
class SinkLoRAConfig:
    """``policy`` one of :data:`~sinklora_ext.kv_cache.POLICIES`; ``kv_budget`` tokens kept per
    (request, layer, kv head); ``num_sinks``; ``recent`` (default: :func:`~sinklora_ext.kv_cache.default_recent`); ``score_decay`` (decay, ema)."""

    policy: str = "full"
    kv_budget: int | None = None
    num_sinks: int = 4
    recent: int | None = None
    score_decay: float | None = None

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise UsageError(f"additional_config.sinklora.policy must be one of {POLICIES}, got {self.policy!r}")
        if self.policy.startswith(("snapkv-", "pyramidkv-")):
            raise UsageError(f"additional_config.sinklora.policy {self.policy!r}: the snapkv and pyramidkv "
                             "policies are not supported on vLLM yet (a chunked prompt's observation window spans "
                             f"chunks); use {decode_rule(self.policy)!r}")
        if self.score_decay is not None and (isinstance(self.score_decay, bool)
                                             or not isinstance(self.score_decay, (int, float))):
            raise UsageError(f"additional_config.sinklora.score_decay must be a number, got {self.score_decay!r}")
        for name in ("kv_budget", "num_sinks", "recent"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise UsageError(f"additional_config.sinklora.{name} must be an integer, got {value!r}")
        if self.policy != "full" and self.kv_budget is None:
            raise UsageError(f"additional_config.sinklora.kv_budget is required for policy {self.policy!r}")
        try:
            self.cache_policy  # noqa: B018  (the cache's own rules on budget, sinks and recent)
        except ValueError as e:
            raise UsageError(f"additional_config.sinklora: {e}") from None

    @property
    def cache_policy(self) -> CachePolicy:
        return CachePolicy(self.policy, self.kv_budget, self.num_sinks, self.recent,
                           None if self.score_decay is None else float(self.score_decay))

    @property
    def evicts(self) -> bool:
        return self.policy != "full"

    def resident_blocks(self, block_size: int) -> int | None:
        """Blocks a request keeps once its prompt is processed (None: ``full``, all of them)."""
        return self.cache_policy.resident_blocks(block_size)

    @classmethod
    def from_additional_config(cls, additional_config) -> "SinkLoRAConfig":
        raw = (additional_config or {}).get(CONFIG_KEY, {}) if isinstance(additional_config, dict) else {}
        if not isinstance(raw, dict):
            raise UsageError(f"additional_config.sinklora must be a JSON object, got {raw!r}")
        unknown = sorted(set(raw) - set(_FIELDS))
        if unknown:
            raise UsageError(f"additional_config.sinklora: unknown keys {unknown}; known: {list(_FIELDS)}")
        return cls(**raw)

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "SinkLoRAConfig":
        return cls.from_additional_config(getattr(vllm_config, "additional_config", None))


_engine_config: SinkLoRAConfig | None = None


def set_engine_config(config: SinkLoRAConfig) -> None:
    """The config of the engine this process serves (set as the engine builds its layers, where
    vLLM's current config is known; its KV-cache specs are made later, where it is not)."""
    global _engine_config
    _engine_config = config


def engine_config() -> SinkLoRAConfig:
    if _engine_config is None:
        raise RuntimeError(f"{BACKEND_NAME}: no layer of this process was built with the backend")
    return _engine_config


def uses_backend(vllm_config) -> bool:
    """Whether the engine asked for the SINKLORA attention backend."""
    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    return backend is not None and getattr(backend, "name", str(backend)) == BACKEND_NAME


def check_engine(vllm_config) -> SinkLoRAConfig:
    """The plugin's config, after refusing the engine settings it does not support (a UsageError
    naming the setting). Called at engine start, in the process that builds the config."""
    config = SinkLoRAConfig.from_vllm_config(vllm_config)
    cache, model = vllm_config.cache_config, vllm_config.model_config
    parallel = vllm_config.parallel_config

    def refuse(setting: str, why: str) -> None:
        raise UsageError(f"attention_backend={BACKEND_NAME}: {setting} is not supported ({why})")

    if config.evicts and getattr(cache, "enable_prefix_caching", False):
        refuse("enable_prefix_caching=True",
               f"policy {config.policy!r} rewrites a request's blocks in place, so they cannot be shared; "
               "pass enable_prefix_caching=False (--no-enable-prefix-caching)")
    if getattr(vllm_config, "speculative_config", None) is not None:
        refuse("speculative decoding", "a rejected draft token cannot be un-evicted")
    if str(getattr(cache, "cache_dtype", "auto")) != "auto":
        refuse(f"kv_cache_dtype={cache.cache_dtype!r}", "the cache holds the model's dtype (kv_cache_dtype='auto')")
    if model is not None and getattr(model, "use_mla", False):
        refuse("MLA models", "the backend caches per-head K and V")
    if model is not None and model.get_sliding_window() is not None:
        refuse("sliding-window models", "the policies assume full attention over the kept keys")
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if getattr(parallel, name, 1) > 1:
            refuse(f"{name}={getattr(parallel, name)}", "a request's keys must live on one rank")
    return config
