"""The paged H2O cache as a transformers ``Cache``, so ``model.generate`` decodes with eviction
(docs/paged_kv.md):

>>> cache = PagedH2OCache(model, CachePolicy("h2o", budget=256), max_prompt=input_ids.shape[1])  # doctest: +SKIP
>>> model.generate(input_ids, **{cache_kwarg(model): cache}, max_new_tokens=64)  # doctest: +SKIP
>>> generate_with_policy(model, input_ids, CachePolicy("h2o", budget=256), max_new_tokens=64)  # doctest: +SKIP

``cache_kwarg`` names the keyword: ``cache`` in newer transformers 5.x, ``past_key_values`` up to 5.18;
``generate_with_policy`` does the same, with the pool sized for the prompt and new tokens.

Each forward call that is given the cache runs with the ``sinklora_paged`` attention function, and
only that call (:func:`~sinklora_ext.hf.attention.use_attention`, entered and left by forward hooks
the cache puts on the model and takes off in :meth:`PagedH2OCache.detach`, on leaving
``with cache:`` or when the cache is gone): a prompt goes through the flash forward plus the
column-sum score kernel into the paged pool (evicted down to the budget); each decode step goes
through ``paged_decode`` with fused scores and one eviction launch. A forward call that fails
midway is undone (:meth:`~sinklora_ext.kv_cache.PagedKVCache.rollback`): the cache then holds what it
held before that call. The cache's sequence length is the number of tokens seen, so positions keep
counting past the budget. One sequence per cache (batch size 1).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..engine import PagedLlama
from ..kv_cache import CachePolicy, prompt_attention
from .attention import use_attention
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
        if self.owner._forward is None:  # any other attention would see only this call's keys
            raise RuntimeError("this PagedH2OCache was detached, or the model it is given is not the one it was made "
                               "for: make a new PagedH2OCache(model, ...)")
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
                owner._step_open = True
                cache.begin_prefill(seq, t)
            out, scores, selection = prompt_attention(q, k, v, scaling, cache.policy)
            cache.write_prefill(self.layer_idx, k[0], v[0], None if scores is None else scores[0],
                                None if selection is None else selection[0])
            if self.layer_idx == cache.num_layers - 1:
                cache.finish_prefill()
            return out
        if t != 1:
            raise ValueError("PagedH2OCache takes one prompt, then one token per step")
        if self.layer_idx == 0:
            owner._step_open = True
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
        self._step_open = False  # the forward call under way began a prefill or decode step of the pool
        self._prompt_call = False  # that call is the prompt's
        self._forward = None  # that call's switch of the model's attention (an ExitStack)
        self._hooks = _attach(self, base)

    @property
    def tokens_seen(self) -> int:
        return self.paged.tokens_seen[self.seq]

    def reset(self) -> None:
        self.paged.release(self.seq)
        self.seq = self.paged.add_sequence()

    def detach(self) -> None:
        """Take the cache's forward hooks off the model (idempotent; ``with cache:`` does it on exit)."""
        self._hooks()
        self._end_forward(failed=True)  # a forward call cut short past the hooks (KeyboardInterrupt)

    def __enter__(self) -> "PagedH2OCache":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def _begin_forward(self, base) -> None:
        self._end_forward(failed=True)
        self._prompt_call = self.tokens_seen == 0
        self._forward = contextlib.ExitStack()
        self._forward.enter_context(use_attention(base, ATTN_NAME))

    def _end_forward(self, failed: bool) -> None:
        """Close the forward call under way, if any. When it failed, the cache goes back to what it
        held before the call: the pool step it began is undone (a prompt: the cache starts over, as
        the prompt may have been written whole before the call failed). Then the model gets its
        attention back."""
        forward, self._forward = self._forward, None
        if forward is None:
            return
        if failed:
            _active.layer = None
        if failed and self._step_open:
            self.paged.rollback()
        if failed and self._prompt_call and self.tokens_seen:
            self.reset()
        self._step_open = False
        forward.close()


def _attach(cache: PagedH2OCache, base):
    """Forward hooks that switch ``base`` to the paged attention for the calls given ``cache``;
    returns the function that takes them off (also run once ``cache`` is collected)."""
    ref = weakref.ref(cache)

    def ours(args, kwargs):
        owner = ref()
        return owner if owner is not None and any(v is owner for v in (*args, *kwargs.values())) else None

    def before(module, args, kwargs):
        if (owner := ours(args, kwargs)) is not None:
            owner._begin_forward(module)

    def after(module, args, kwargs, output):  # always_call: also when forward raised (output None)
        if (owner := ours(args, kwargs)) is not None:
            owner._end_forward(failed=output is None)

    handles = (base.register_forward_pre_hook(before, with_kwargs=True),
               base.register_forward_hook(after, with_kwargs=True, always_call=True))
    return weakref.finalize(cache, lambda: [h.remove() for h in handles])


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
    """Register the paged attention with transformers (idempotent; done on import)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask

    AttentionInterface.register(ATTN_NAME, paged_attention)
    AttentionMaskInterface.register(ATTN_NAME, flash_attention_mask)


@torch.no_grad()
def generate_with_policy(model, input_ids: torch.Tensor, policy: CachePolicy, **generate_kwargs):
    """``model.generate`` through a fresh paged cache; the model keeps its attention (also on error)
    and carries no hook of the cache afterwards."""
    max_tokens = input_ids.shape[1] + generate_kwargs.get("max_new_tokens", 64)
    with PagedH2OCache(model, policy, max_tokens=max_tokens, max_prompt=input_ids.shape[1]) as cache:
        return model.generate(input_ids, **{cache_kwarg(model): cache}, **generate_kwargs)


register()
