"""The paged H2O cache as a transformers ``Cache``, so ``model.generate`` decodes with eviction:

>>> cache = PagedH2OCache(model, CachePolicy("h2o", budget=256), max_prompt=input_ids.shape[1])  # doctest: +SKIP
>>> model.generate(input_ids, **{cache_kwarg(model): cache}, max_new_tokens=64)  # doctest: +SKIP

``cache_kwarg`` names the keyword: ``cache`` in newer transformers 5.x, ``past_key_values`` up to 5.18.

Creating the cache switches the model to the ``sinklora_paged`` attention function: a prompt goes
through the flash forward plus the column-sum score kernel into the paged pool (evicted down to the
budget); each decode step goes through ``paged_decode`` with fused scores and one eviction launch.
The cache's sequence length is the number of tokens seen, so positions keep counting past the
budget. One sequence per cache (batch size 1).
"""

from __future__ import annotations

import inspect
import threading

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..engine import PagedLlama
from ..kv_cache import CachePolicy
from ..paged import causal_prefill
from .models import base_model

ATTN_NAME = "sinklora_paged"
_active = threading.local()  # the layer whose update() ran last: the attention call that follows is its


class PagedH2OLayer(CacheLayerMixin):
    is_sliding = False

    def __init__(self, owner: "PagedH2OCache", layer_idx: int):
        super().__init__()
        self.owner, self.layer_idx = owner, layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        _active.layer = self
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.owner.tokens_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.tokens_seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.owner.reset()

    def attend(self, query, key, value, scaling):
        """query [1, Hq, T, D], key/value [1, Hkv, T, D] (post-RoPE) → [1, T, Hq, D]."""
        owner, cache, seq = self.owner, self.owner.paged, self.owner.seq
        t = query.shape[2]
        if owner.tokens_seen == 0:  # the prompt (tokens are counted once its last layer is done)
            q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
            if self.layer_idx == 0:
                cache.begin_prefill(seq, t)
            out, scores = causal_prefill(q, k, v, scaling, with_scores=cache.policy.evicts)
            cache.write_prefill(self.layer_idx, k[0], v[0], None if scores is None else scores[0])
            if self.layer_idx == cache.num_layers - 1:
                cache.finish_prefill()
            return out
        if t != 1:
            raise ValueError("PagedH2OCache takes one prompt, then one token per step")
        if self.layer_idx == 0:
            cache.begin_decode_step([seq])
        out = cache.decode_layer(self.layer_idx, query[:, :, 0], key[:, :, 0], value[:, :, 0], scaling)
        return out[:, None]


class PagedH2OCache(Cache):
    """``max_tokens``: prompt + new tokens. An evicting policy keeps ``budget + 1`` of them, but the
    prompt is written whole before it is cut to the budget: ``max_prompt`` (default ``max_tokens``)
    is the longest prompt the pool must hold."""

    def __init__(self, model, policy: CachePolicy | None = None, max_tokens: int = 4096, block_size: int = 16,
                 max_prompt: int | None = None):
        policy = policy or CachePolicy()
        if max_prompt is not None and not 1 <= max_prompt <= max_tokens:
            raise ValueError(f"max_prompt must be in [1, max_tokens={max_tokens}], got {max_prompt}")
        self.paged = PagedLlama.make_cache(model, policy, policy.slots_per_sequence(max_tokens, max_prompt), 1,
                                           block_size)
        self.seq = self.paged.add_sequence()
        base = base_model(model)
        super().__init__(layers=[PagedH2OLayer(self, i) for i in range(base.config.num_hidden_layers)])
        register()
        base.set_attn_implementation(ATTN_NAME)

    @property
    def tokens_seen(self) -> int:
        return self.paged.tokens_seen[self.seq]

    def reset(self) -> None:
        self.paged.release(self.seq)
        self.seq = self.paged.add_sequence()


def cache_kwarg(model) -> str:
    """The keyword that ``model.generate``/``forward`` takes a ``Cache`` by: ``cache``, or
    ``past_key_values`` in transformers up to 5.18 (newer ones still take it, with a FutureWarning)."""
    base = base_model(model)
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    layer = getattr(_active, "layer", None)
    if layer is None or layer.layer_idx != module.layer_idx:
        raise RuntimeError(f"{ATTN_NAME} attention needs a PagedH2OCache passed to generate "
                           "(keyword: sinklora_ext.hf.cache.cache_kwarg(model))")
    if query.shape[0] != 1:
        raise ValueError(f"PagedH2OCache decodes one sequence at a time, got batch {query.shape[0]}")
    _active.layer = None
    return layer.attend(query, key, value, scaling), None


def register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask

    AttentionInterface.register(ATTN_NAME, paged_attention)
    AttentionMaskInterface.register(ATTN_NAME, flash_attention_mask)


@torch.no_grad()
def generate_with_policy(model, input_ids: torch.Tensor, policy: CachePolicy, **generate_kwargs):
    """``model.generate`` through a fresh paged cache; restores the model's attention afterwards."""
    base = base_model(model)
    previous = base.config._attn_implementation
    try:
        max_tokens = input_ids.shape[1] + generate_kwargs.get("max_new_tokens", 64)
        cache = PagedH2OCache(model, policy, max_tokens=max_tokens, max_prompt=input_ids.shape[1])
        return model.generate(input_ids, **{cache_kwarg(model): cache}, **generate_kwargs)
    finally:
        base.set_attn_implementation(previous)
