"""Paged KV cache ops (docs/paged_kv.md; signatures in docs/ops.md): decode with fused H2O score
accumulation, cache writes, column scores of a prefill, the choice of evictions, and the step plan
that validates a step's index tensors once for all of its layers. Layout is FlashInfer's "NHD":

- ``k_cache, v_cache [num_blocks, block_size, Hkv, D]``; ``scores`` float32 and ``positions`` int32
  ``[num_blocks, block_size, Hkv]``;
- ``block_tables`` int32 ``[B, max_blocks_per_seq]``, ``seq_lens`` int32 ``[B]``: slot ``t`` of
  sequence ``b`` lives in block ``block_tables[b, t // block_size]`` at offset ``t % block_size``.

Without a plan every call checks its index tensors on the host (on CUDA, one device sync per call).
With ``plan=plan_paged(...)``, made once per step, the calls of every layer check in O(1) that they
are given the very tensors the plan validated, unmodified since (ValueError otherwise); a call
captured in a CUDA graph needs one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _C  # noqa: F401  (registers the ops)

_ops = torch.ops.sinklora_ext

# Fields of the plan tensor (csrc/paged_plan.h).
_PLAN_FIELDS = 17
_PLAN_HEADS_Q, _PLAN_SPLITS, _PLAN_PARTITION = 13, 14, 15


@dataclass(frozen=True, eq=False)
class PagedPlan:
    """The plan of one step of a paged cache (:func:`plan_paged`): which ``block_tables``,
    ``seq_lens`` and ``slots`` were validated against the pool, and on CUDA the split-KV sizes of the
    decode. Pass it as ``plan=`` to :func:`paged_decode`, :func:`paged_write_` and
    :func:`select_evictions`; it stays valid while those tensors are not written to."""

    tensor: torch.Tensor  # int64 [16], on the CPU

    @property
    def num_heads_q(self) -> int | None:
        """The query heads the split sizes were computed for (None: each decode sizes its own)."""
        return int(self.tensor[_PLAN_HEADS_Q]) or None

    @property
    def decode_split(self) -> tuple[int, int]:
        """CUDA decode: (splits per sequence and kv head, slots per split); (0, 0) when not planned."""
        return int(self.tensor[_PLAN_SPLITS]), int(self.tensor[_PLAN_PARTITION])


def _plan_tensor(plan: PagedPlan | None) -> torch.Tensor | None:
    if plan is None:
        return None
    if not isinstance(plan, PagedPlan):
        raise TypeError(f"plan must be a PagedPlan (from sinklora_ext.plan_paged), got {type(plan).__name__}")
    return plan.tensor


def plan_paged(
    k_cache: torch.Tensor,
    block_tables: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
    num_heads_q: int | None = None,
) -> PagedPlan:
    """Validate a step's index tensors once, against the pool of ``k_cache``: every block a sequence
    uses (``seq_lens`` within ``block_tables``) is a block of the pool, every entry of ``slots``
    (int32 ``[..., Hkv]``, e.g. the write slots of all layers ``[L, B, Hkv]``) is a slot of the pool or
    -1. ``seq_lens`` is ``[B]``, or ``[rows, B]`` when the layers of a step attend different lengths
    (per-layer budgets): a call then passes one row. Raises the ValueError an unplanned call would. On CUDA this is one host copy (a sync), and
    with ``num_heads_q`` the decode's split-KV sizes are computed here, once."""
    t = _ops.plan_paged(k_cache, block_tables, seq_lens, slots, int(num_heads_q or 0))
    return PagedPlan(t)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float | None = None,
    scores: torch.Tensor | None = None,
    *,
    plan: PagedPlan | None = None,
) -> torch.Tensor:
    """One query token per sequence over its paged keys ``0 .. seq_lens[b] - 1``.

    ``q [B, Hq, D]`` (the new token, already written into the cache) → ``out [B, Hq, D]``. When
    ``scores`` is given, every attended slot gains the softmax probability it received, summed
    over the query heads of its kv head, in place, inside the same kernel.

    >>> out = paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scores=scores)  # doctest: +SKIP
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return _ops.paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, scores, _plan_tensor(plan))


def paged_write_(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    scores: torch.Tensor | None = None,
    new_scores: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    token_positions: torch.Tensor | None = None,
    *,
    plan: PagedPlan | None = None,
) -> None:
    """Write ``k, v [T, Hkv, D]`` into physical slots ``slots`` int32 ``[T, Hkv]``
    (``block * block_size + offset``; ``-1`` skips), per kv head. The slot's score becomes
    ``new_scores`` (or 0) and its position ``token_positions[t]`` when those caches are given.
    With a plan, ``slots`` may be a view of the slots the plan validated (one layer's rows)."""
    _ops.paged_write_(k, v, k_cache, v_cache, slots, scores, new_scores, positions, token_positions,
                      _plan_tensor(plan))


def select_evictions(
    scores: torch.Tensor,
    positions: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    num_sinks: int = 4,
    recent: int = 0,
    policy: str = "h2o",
    score_decay: float = 1.0,
    *,
    plan: PagedPlan | None = None,
) -> torch.Tensor:
    """The slot each (sequence, kv head) gives up this step, for one layer in one launch.

    ``h2o``: the lowest-scored slot whose position is neither a sink (``< num_sinks``) nor among
    the last ``recent`` positions; ties go to the older. ``mean``: the same on the score over the
    weight of the ``c = newest - position + 1`` queries that have seen the key (``c``, or
    ``(1 - score_decay ** c) / (1 - score_decay)`` when scores decay). ``streaming``: the oldest non-sink.
    Returns the logical slot int32 ``[B, Hkv]`` (``-1`` where nothing may be evicted); the next
    token of that head is written there. Then, in the same launch, every score of the sequences'
    slots is multiplied by ``score_decay`` (1: kept; 0: the next step's mass alone counts).
    """
    return _ops.select_evictions(scores, positions, block_tables, seq_lens, int(num_sinks), int(recent), policy,
                                 float(score_decay), _plan_tensor(plan))


def query_weights(n: int, decay: float = 1.0, window: int = 0, device=None) -> torch.Tensor:
    """float32 ``[n]``: the weight of query ``i`` of a sequence of ``n`` in its column scores,
    ``decay ** (n - 1 - i)`` (the last query 1), 0 before the last ``window`` when ``window > 0``."""
    to_end = torch.arange(n - 1, -1, -1, dtype=torch.float32, device=device)
    w = torch.full_like(to_end, float(decay)) ** to_end
    return torch.where(to_end >= window, torch.zeros_like(w), w) if window > 0 else w


def query_weights_lse(lse: torch.Tensor, cu_seqlens: torch.Tensor | None, seqlen: int, decay: float = 1.0,
                      window: int = 0) -> torch.Tensor:
    """``lse [Hq, rows]`` shifted by ``-log w`` per query row, so that the column sums computed
    from it weigh the query ``i`` of a sequence of ``n`` by ``w = decay ** (n - 1 - i)``, and by 0
    when ``window > 0`` and ``i < n - window`` (``+inf``: its probabilities become 0)."""
    if decay == 1.0 and window <= 0:
        return lse
    rows = lse.shape[1]
    idx = torch.arange(rows, device=lse.device)
    if cu_seqlens is None:
        to_end = seqlen - 1 - idx % max(seqlen, 1)
    else:
        ends = cu_seqlens[1:].long()
        to_end = ends[torch.searchsorted(ends, idx, right=True)] - 1 - idx
    to_end = to_end.to(torch.float32)
    shift = torch.zeros_like(to_end) if decay == 1.0 else to_end * -math.log(decay) if decay > 0 else \
        torch.where(to_end > 0, math.inf, 0.0)
    shift = torch.where(to_end > 0, shift, torch.zeros_like(shift))  # the last query keeps weight 1
    if window > 0:
        shift = torch.where(to_end >= window, torch.full_like(shift, math.inf), shift)
    return (lse + shift[None]).contiguous()


def column_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int = 0,
    softmax_scale: float | None = None,
    *,
    decay: float = 1.0,
    window: int = 0,
) -> torch.Tensor:
    """H2O scores of a causal prefill: column sums of the softmax, summed over the query heads
    of each kv head, recomputed from ``lse`` (from ``sf_attention_fwd``) without an N×N buffer.

    ``q [B, N, Hq, D]`` (or varlen ``[total, Hq, D]`` with ``cu_seqlens``) → float32 ``[rows, Hkv]``.
    The query ``i`` of a sequence of ``n`` counts with weight ``decay ** (n - 1 - i)`` (``decay=0``:
    the last query alone), and only among the last ``window`` queries when ``window > 0``.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    n = q.shape[1] if cu_seqlens is None else max(int(max_seqlen), 1)
    lse = query_weights_lse(lse, cu_seqlens, q.shape[1] if cu_seqlens is None else 0, decay, window)
    return _ops.column_scores(q, k, lse, cu_seqlens, int(max_seqlen), max(n, 1), 0, "none", scale)


def causal_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None,
                   with_scores: bool = True, cu_seqlens: torch.Tensor | None = None, max_seqlen: int = 0, *,
                   score_decay: float = 1.0, selection_window: int = 0):
    """Full causal attention over prompts ``[B, N, H, D]`` (or packed ``[total, H, D]`` with
    ``cu_seqlens``) and, optionally, their H2O scores ``[B, N, Hkv]`` (``[total, Hkv]``): the flash
    forward's lse feeds the column-sum kernel. ``score_decay`` weighs the queries as
    :func:`column_scores`' ``decay``. With ``selection_window > 0`` a third result holds the column
    sums of the last ``selection_window`` queries alone (SnapKV's observation window), else None."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    n = max(q.shape[1] if cu_seqlens is None else int(max_seqlen), 1)
    max_seqlen = 0 if cu_seqlens is None else int(max_seqlen)
    out, lse = _ops.sf_attention_fwd(q, k, v, cu_seqlens, max_seqlen, n, 0, "none", scale)
    shape = (*q.shape[:-2], k.shape[-2])
    selection = None
    if with_scores and selection_window > 0:
        selection = column_scores(q, k, lse, cu_seqlens, max_seqlen, scale, window=selection_window).view(shape)
    if not with_scores:
        return (out, None) if selection_window <= 0 else (out, None, None)
    scores = column_scores(q, k, lse, cu_seqlens, max_seqlen, scale, decay=score_decay).view(shape)
    return (out, scores) if selection_window <= 0 else (out, scores, selection)


_PREFIX_ROWS = 512  # query rows per piece in prefix_chunk_attention (bounds its [Hkv, g * rows, P] buffer)


def prefix_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_prefix: torch.Tensor,
                           v_prefix: torch.Tensor, softmax_scale: float | None = None, with_scores: bool = True, *,
                           score_decay: float = 1.0):
    """Causal attention of a chunk of a prompt, ``q, k, v [n, H, D]``, that follows a prefix of
    ``P`` tokens already processed, ``k_prefix, v_prefix [P, Hkv, D]``: query ``i`` sees the whole
    prefix and the chunk's keys up to ``i`` (chunked prefill). Returns ``out [n, Hq, D]`` and, with
    scores, the chunk keys' column sums ``[n, Hkv]`` and the prefix keys' ``[P, Hkv]``, both under
    the softmax over prefix and chunk, query ``i`` weighted by ``score_decay ** (n - 1 - i)``
    (as :func:`column_scores`), else ``None, None``.

    The chunk on itself runs in the flash kernel, which gives its lse; the prefix in float32
    batched matmuls, ``_PREFIX_ROWS`` query rows at a time; the two merge by their log-sum-exp."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    own, own_lse = _ops.sf_attention_fwd(q[None], k[None], v[None], None, 0, max(n, 1), 0, "none", scale)
    prefix = k_prefix.shape[0]
    if prefix == 0:
        out, lse = own[0], own_lse
        prefix_mass = torch.zeros(0, hkv, dtype=torch.float32, device=q.device) if with_scores else None
    else:
        own = own[0].float().view(n, hkv, group, d).permute(1, 2, 0, 3)  # [Hkv, g, n, D]
        own_lse = own_lse.view(hkv, group, n)
        keys_t = k_prefix.float().permute(1, 2, 0)  # [Hkv, D, P]
        vals = v_prefix.float().transpose(0, 1)      # [Hkv, P, D]
        q4 = q.float().view(n, hkv, group, d).permute(1, 2, 0, 3)
        weights = query_weights(n, score_decay, device=q.device) if score_decay != 1.0 else None
        out = torch.empty_like(q)
        lse = torch.empty_like(own_lse)
        mass = torch.zeros(hkv, prefix, dtype=torch.float32, device=q.device) if with_scores else None
        for i0 in range(0, n, _PREFIX_ROWS):
            i1 = min(n, i0 + _PREFIX_ROWS)
            m = i1 - i0
            logits = torch.bmm(q4[:, :, i0:i1].reshape(hkv, group * m, d), keys_t).mul_(scale)
            piece_lse = torch.logaddexp(logits.logsumexp(-1).view(hkv, group, m), own_lse[:, :, i0:i1])
            probs = logits.sub_(piece_lse.view(hkv, group * m, 1)).exp_()  # [Hkv, g * m, P]
            merged = torch.bmm(probs, vals).view(hkv, group, m, d)
            merged += own[:, :, i0:i1] * (own_lse[:, :, i0:i1] - piece_lse).exp()[..., None]
            out[i0:i1] = merged.permute(2, 0, 1, 3).reshape(m, hq, d).to(q.dtype)
            lse[:, :, i0:i1] = piece_lse
            if with_scores:
                if weights is None:
                    mass += probs.sum(1)
                else:
                    mass += torch.bmm(weights[i0:i1].repeat(group).expand(hkv, 1, -1), probs)[:, 0]
        prefix_mass = mass.t() if with_scores else None
    if not with_scores:
        return out, None, None
    chunk_scores = column_scores(q[None], k[None], lse.reshape(hq, n), None, 0, scale, decay=score_decay)
    return out, chunk_scores, prefix_mass


def physical_slots(block_tables: torch.Tensor, logical: torch.Tensor, block_size: int) -> torch.Tensor:
    """Physical slot ids (``block * block_size + offset``) of logical slots ``[B, ...]``; -1 stays -1."""
    valid = logical >= 0
    t = logical.clamp(min=0).long()
    blocks = block_tables.long().gather(1, (t // block_size).reshape(t.shape[0], -1)).reshape(t.shape)
    phys = blocks * block_size + t % block_size
    return torch.where(valid, phys, torch.full_like(phys, -1)).to(torch.int32)


@torch.library.register_fake("sinklora_ext::paged_decode")
def _paged_decode_fake(q, k_cache, v_cache, block_tables, seq_lens, softmax_scale, scores, plan=None):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.register_fake("sinklora_ext::paged_write_")
def _paged_write_fake(k, v, k_cache, v_cache, slots, scores, new_scores, positions, token_positions, plan=None):
    return None


@torch.library.register_fake("sinklora_ext::select_evictions")
def _select_evictions_fake(scores, positions, block_tables, seq_lens, num_sinks, recent, policy, score_decay=1.0,
                           plan=None):
    return seq_lens.new_empty((seq_lens.shape[0], scores.shape[2]))


@torch.library.register_fake("sinklora_ext::plan_paged")
def _plan_paged_fake(k_cache, block_tables, seq_lens, slots, num_heads_q):
    return torch.empty(_PLAN_FIELDS, dtype=torch.int64, device="cpu")


@torch.library.register_fake("sinklora_ext::column_scores")
def _column_scores_fake(q, k, lse, cu_seqlens, max_seqlen, group_size, num_sinks, shift, softmax_scale):
    rows = q.shape[0] if cu_seqlens is not None else q.shape[0] * q.shape[1]
    return q.new_empty((rows, k.shape[-2]), dtype=torch.float32)
