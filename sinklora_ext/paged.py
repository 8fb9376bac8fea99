"""Paged KV cache ops (SPEC §3): decode with fused H2O score accumulation, cache writes, prefill
scores and per-head eviction. Layout is FlashInfer's "NHD":

- ``k_cache, v_cache [num_blocks, block_size, Hkv, D]``; ``scores`` float32 and ``positions`` int32
  ``[num_blocks, block_size, Hkv]``;
- ``block_tables`` int32 ``[B, max_blocks_per_seq]``, ``seq_lens`` int32 ``[B]``: slot ``t`` of
  sequence ``b`` lives in block ``block_tables[b, t // block_size]`` at offset ``t % block_size``.
"""

from __future__ import annotations

import contextlib

import torch

from . import _C  # registers the ops; also holds the trust_tables switch

_ops = torch.ops.sinklora_ext


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float | None = None,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence over its paged keys ``0 .. seq_lens[b] - 1``.

    ``q [B, Hq, D]`` (the new token, already written into the cache) → ``out [B, Hq, D]``. When
    ``scores`` is given, every attended slot gains the softmax probability it received, summed
    over the query heads of its kv head, in place, inside the same kernel.

    >>> out = paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scores=scores)  # doctest: +SKIP
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return _ops.paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, scores)


def write_kv_(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    scores: torch.Tensor | None = None,
    new_scores: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    token_positions: torch.Tensor | None = None,
) -> None:
    """Write ``k, v [T, Hkv, D]`` into physical slots ``slots`` int32 ``[T, Hkv]``
    (``block * block_size + offset``; ``-1`` skips), per kv head. The slot's score becomes
    ``new_scores`` (or 0) and its position ``token_positions[t]`` when those caches are given."""
    _ops.paged_write_kv_(k, v, k_cache, v_cache, slots, scores, new_scores, positions, token_positions)


def h2o_evict(
    scores: torch.Tensor,
    positions: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    num_sinks: int = 4,
    recent: int = 0,
    policy: str = "h2o",
) -> torch.Tensor:
    """Choose one slot per (sequence, kv head) to evict, in one launch over a layer.

    ``h2o``: the lowest-scored slot whose position is neither a sink (``< num_sinks``) nor among
    the last ``recent`` positions; ties go to the older. ``streaming``: the oldest non-sink.
    Returns the logical slot int32 ``[B, Hkv]`` (``-1`` where nothing may be evicted); the next
    token of that head is written there.
    """
    return _ops.h2o_evict(scores, positions, block_tables, seq_lens, int(num_sinks), int(recent), policy)


def prefill_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int = 0,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """H2O scores of a causal prefill: column sums of the softmax, summed over the query heads
    of each kv head, recomputed from ``lse`` (from ``sf_attention_fwd``) without an N×N buffer.

    ``q [B, N, Hq, D]`` (or varlen ``[total, Hq, D]`` with ``cu_seqlens``) → float32 ``[rows, Hkv]``.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    n = q.shape[1] if cu_seqlens is None else max(int(max_seqlen), 1)
    return _ops.sf_attention_column_scores(q, k, lse, cu_seqlens, int(max_seqlen), max(n, 1), 0, "none", scale)


def causal_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None,
                   with_scores: bool = True, cu_seqlens: torch.Tensor | None = None, max_seqlen: int = 0):
    """Full causal attention over prompts ``[B, N, H, D]`` (or packed ``[total, H, D]`` with
    ``cu_seqlens``) and, optionally, their H2O scores ``[B, N, Hkv]`` (``[total, Hkv]``): the flash
    forward's lse feeds the column-sum kernel."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    n = max(q.shape[1] if cu_seqlens is None else int(max_seqlen), 1)
    max_seqlen = 0 if cu_seqlens is None else int(max_seqlen)
    out, lse = _ops.sf_attention_fwd(q, k, v, cu_seqlens, max_seqlen, n, 0, "none", scale)
    if not with_scores:
        return out, None
    scores = _ops.sf_attention_column_scores(q, k, lse, cu_seqlens, max_seqlen, n, 0, "none", scale)
    return out, scores.view(*q.shape[:-2], k.shape[-2])


@contextlib.contextmanager
def trusted_tables():
    """In this thread, skip the validation of block tables, lengths, slots and varlen ``cu_seqlens``
    that CUDA calls do on the host (each a device sync). For callers that build them themselves,
    such as :class:`~sinklora_ext.kv_cache.PagedKVCache`; the paged kernels still clamp lengths to
    the table and skip entries outside the pool."""
    previous = _C.trust_tables(True)
    try:
        yield
    finally:
        _C.trust_tables(previous)


def physical_slots(block_tables: torch.Tensor, logical: torch.Tensor, block_size: int) -> torch.Tensor:
    """Physical slot ids (``block * block_size + offset``) of logical slots ``[B, ...]``; -1 stays -1."""
    valid = logical >= 0
    t = logical.clamp(min=0).long()
    blocks = block_tables.long().gather(1, (t // block_size).reshape(t.shape[0], -1)).reshape(t.shape)
    phys = blocks * block_size + t % block_size
    return torch.where(valid, phys, torch.full_like(phys, -1)).to(torch.int32)


@torch.library.register_fake("sinklora_ext::paged_decode")
def _paged_decode_fake(q, k_cache, v_cache, block_tables, seq_lens, softmax_scale, scores):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.register_fake("sinklora_ext::paged_write_kv_")
def _paged_write_kv_fake(k, v, k_cache, v_cache, slots, scores, new_scores, positions, token_positions):
    return None


@torch.library.register_fake("sinklora_ext::h2o_evict")
def _h2o_evict_fake(scores, positions, block_tables, seq_lens, num_sinks, recent, policy):
    return seq_lens.new_empty((seq_lens.shape[0], scores.shape[2]))


@torch.library.register_fake("sinklora_ext::sf_attention_column_scores")
def _column_scores_fake(q, k, lse, cu_seqlens, max_seqlen, group_size, num_sinks, shift, softmax_scale):
    rows = q.shape[0] if cu_seqlens is not None else q.shape[0] * q.shape[1]
    return q.new_empty((rows, k.shape[-2]), dtype=torch.float32)
