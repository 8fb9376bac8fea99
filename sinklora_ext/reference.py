"""Pure-PyTorch references (the test oracles). Dense and O(N²): for correctness, not speed."""

from __future__ import annotations

import torch

from .patterns import SHIFTS


def sf_visibility_mask(
    seqlen: int, group_size: int, num_sinks: int, shift: str, num_heads: int, device=None
) -> torch.Tensor:
    """Bool ``[num_heads, N, N]``: ``mask[h, i, j]`` iff query ``i`` of head ``h`` sees key ``j``.

    docs/attention.md, written as literally as possible.
    """
    if shift not in SHIFTS:
        raise ValueError(f"shift must be one of {SHIFTS}, got {shift!r}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    n, g, s = seqlen, group_size, group_size // 2
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    sink = j < num_sinks
    unshifted = (j <= i) & ((i // g == j // g) | sink)
    if shift == "none":
        shifted = unshifted
    elif shift == "nowrap":
        shifted = (j <= i) & (((i + s) // g == (j + s) // g) | sink)
    else:
        if n % g != 0:
            raise ValueError(f"shift='roll' requires seqlen % group_size == 0, got {n} and {g}")
        pi, pj = (i - s) % n, (j - s) % n
        shifted = ((pi // g == pj // g) & (pj <= pi)) | (sink & (j <= i))
    heads = torch.arange(num_heads, device=device)[:, None, None]
    is_shifted = (heads >= num_heads // 2) & (shift != "none")
    return torch.where(is_shifted, shifted[None], unshifted[None])


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    softmax_scale: float | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention, ``q [B, N, Hq, D]``, ``k, v [B, N, Hkv, D]``, ``mask [Hq, N, N]``.

    ``upcast=True`` computes in float64 for float64 inputs and float32 otherwise; ``upcast=False``
    stays in the input dtype (flash-attention's "what plain PyTorch achieves" baseline).
    Returns (out in q's dtype, lse ``[B, Hq, N]`` float32/float64).
    """
    dtype = q.dtype
    if upcast:
        work = torch.float64 if dtype == torch.float64 else torch.float32
        q, k, v = q.to(work), k.to(work), v.to(work)
    hq, hkv = q.shape[2], k.shape[2]
    if hq % hkv:
        raise ValueError(f"Hq ({hq}) must be a multiple of Hkv ({hkv})")
    k = k.repeat_interleave(hq // hkv, dim=2)
    v = v.repeat_interleave(hq // hkv, dim=2)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    scores = torch.einsum("bihd,bjhd->bhij", q * scale, k)
    scores = scores.masked_fill(~mask[None], float("-inf"))
    lse = torch.logsumexp(scores.float() if not upcast else scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhij,bjhd->bihd", probs, v)
    return out.to(dtype), lse


def sf_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    num_sinks: int = 4,
    shift: str = "none",
    softmax_scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Reference for :func:`sinklora_ext.sf_attention` (same arguments)."""
    mask = sf_visibility_mask(q.shape[1], group_size, num_sinks, shift, q.shape[2], q.device)
    return attention_ref(q, k, v, mask, softmax_scale, upcast)[0]


def sf_attention_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    group_size: int,
    num_sinks: int = 4,
    shift: str = "none",
    softmax_scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Reference for :func:`sinklora_ext.sf_attention_varlen`: each sequence on its own."""
    bounds = cu_seqlens.tolist()
    out = torch.empty_like(q)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        sl = slice(start, end)
        out[sl] = sf_attention_ref(
            q[None, sl], k[None, sl], v[None, sl], group_size, num_sinks, shift, softmax_scale, upcast
        )[0]
    return out


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` slots of one sequence of a paged cache: ``[length, Hkv, ...]``."""
    bs = cache.shape[1]
    t = torch.arange(length, device=cache.device)
    return cache[block_table.long()[t // bs], t % bs]


def paged_decode_ref(q, k_cache, v_cache, block_tables, seq_lens, softmax_scale=None, scores=None):
    """Reference for :func:`sinklora_ext.paged_decode`: gather each sequence's keys, dense softmax in
    float64; adds the probabilities (summed over each kv head's query heads) into ``scores``."""
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros(b, hq, d, dtype=torch.float64, device=q.device)
    for i in range(b):
        n = int(seq_lens[i])
        if n == 0:
            continue
        k = gather_paged(k_cache, block_tables[i], n).double().repeat_interleave(hq // hkv, dim=1)
        v = gather_paged(v_cache, block_tables[i], n).double().repeat_interleave(hq // hkv, dim=1)
        p = torch.softmax(torch.einsum("hd,thd->ht", q[i].double() * scale, k), dim=-1)  # [Hq, n]
        out[i] = torch.einsum("ht,thd->hd", p, v)
        if scores is not None:
            mass = p.reshape(hkv, hq // hkv, n).sum(1).T  # [n, Hkv]
            bs = k_cache.shape[1]
            t = torch.arange(n, device=q.device)
            blocks = block_tables[i].long()[t // bs]
            scores[blocks, t % bs] += mass.to(scores.dtype)
    return out.to(q.dtype)


def query_weights_ref(n: int, decay: float = 1.0, window: int = 0) -> torch.Tensor:
    """float64 ``[n]``: the weight of query ``i`` in the column sums, ``decay ** (n - 1 - i)``
    (``0 ** 0 = 1``), 0 before the last ``window`` queries when ``window > 0``."""
    to_end = torch.arange(n - 1, -1, -1, dtype=torch.float64)
    w = torch.full((n,), float(decay), dtype=torch.float64) ** to_end
    if window > 0:
        w[to_end >= window] = 0
    return w


def causal_column_scores_ref(q, k, softmax_scale=None, decay: float = 1.0, window: int = 0):
    """Column sums of the causal softmax, summed over each kv head's query heads (float64), the
    query rows weighted as :func:`query_weights_ref`: ``q [B, N, Hq, D]`` → ``[B, N, Hkv]``."""
    n, hq, hkv = q.shape[1], q.shape[2], k.shape[2]
    mask = sf_visibility_mask(n, max(n, 1), 0, "none", hq, q.device)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    kk = k.double().repeat_interleave(hq // hkv, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q.double() * scale, kk).masked_fill(~mask[None], float("-inf"))
    p = torch.softmax(s, dim=-1)  # [B, Hq, N, N]
    cols = torch.einsum("bhij,i->bhj", p, query_weights_ref(n, decay, window).to(p.device))  # [B, Hq, N]
    return cols.reshape(q.shape[0], hkv, hq // hkv, n).sum(2).transpose(1, 2)


def prefix_chunk_attention_ref(q, k, v, k_prefix, v_prefix, softmax_scale=None, decay: float = 1.0,
                               upcast: bool = True):
    """Causal attention of a chunk ``q, k, v [n, H, D]`` after a prefix ``[P, Hkv, D]`` (query ``i``
    sees the prefix and chunk keys ``<= i``): ``(out [n, Hq, D], chunk column sums [n, Hkv], prefix
    column sums [P, Hkv])``, the columns summed over each kv head's query heads with query ``i``
    weighted as :func:`query_weights_ref`; in float64 with ``upcast``, else in the inputs' dtype
    (plain PyTorch's error)."""
    n, hq, d = q.shape
    hkv, prefix = k.shape[1], k_prefix.shape[0]
    work = torch.float64 if upcast else q.dtype
    kk = torch.cat([k_prefix, k]).to(work).repeat_interleave(hq // hkv, dim=1)
    vv = torch.cat([v_prefix, v]).to(work).repeat_interleave(hq // hkv, dim=1)
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    s = torch.einsum("ihd,jhd->hij", q.to(work) * scale, kk)
    visible = torch.arange(prefix + n)[None, :] <= prefix + torch.arange(n)[:, None]
    p = torch.softmax(s.masked_fill(~visible.to(s.device)[None], float("-inf")), dim=-1)  # [Hq, n, P + n]
    out = torch.einsum("hij,jhd->ihd", p, vv).to(q.dtype)
    cols = torch.einsum("hij,i->hj", p.double(), query_weights_ref(n, decay).to(p.device))
    cols = cols.reshape(hkv, hq // hkv, prefix + n).sum(1).t()
    return out, cols[prefix:], cols[:prefix]


def eviction_rank_ref(policy: str, score: float, pos: int, newest: int, decay: float = 1.0) -> float:
    """The rank a key is evicted by (the lowest goes), in float32 as the kernels compute it."""
    if policy == "streaming":
        return 0.0
    if policy == "mean":
        f32 = torch.float32
        seen = torch.tensor(float(newest - pos + 1), dtype=f32)
        d = torch.tensor(decay, dtype=f32)
        weight = seen if decay == 1.0 else (1 - d ** seen) / (1 - d)
        r = float(torch.tensor(score, dtype=f32) / weight)
        return 0.0 if abs(r) < torch.finfo(f32).tiny else r
    return score


def select_evictions_ref(scores, positions, block_tables, seq_lens, num_sinks, recent, policy="h2o",
                         score_decay=1.0):
    """Reference for :func:`sinklora_ext.select_evictions` (plain loops); decays ``scores`` in place."""
    b, hkv = seq_lens.shape[0], scores.shape[2]
    victims = torch.full((b, hkv), -1, dtype=torch.int32)
    for i in range(b):
        n = int(seq_lens[i])
        if n == 0:
            continue
        sc = gather_paged(scores, block_tables[i], n)  # [n, Hkv]
        pos = gather_paged(positions, block_tables[i], n)
        for h in range(hkv):
            newest = int(pos[:, h].max())
            best = None
            for t in range(n):
                p = int(pos[t, h])
                if p < num_sinks or p > newest - recent:
                    continue
                key = (eviction_rank_ref(policy, float(sc[t, h]), p, newest, score_decay), p)
                if best is None or key < best[0]:
                    best = (key, t)
            if best is not None:
                victims[i, h] = best[1]
        if score_decay != 1.0:
            bs = scores.shape[1]
            t = torch.arange(n, device=scores.device)
            blocks = block_tables[i].long()[t // bs]
            decayed = scores[blocks, t % bs] * torch.tensor(score_decay, dtype=torch.float32)
            tiny = torch.finfo(torch.float32).tiny
            scores[blocks, t % bs] = torch.where(decayed.abs() < tiny, torch.zeros_like(decayed), decayed)
    return victims


def _msa_axis_taps(n: int, k: int, d: int, padding: str) -> torch.Tensor:
    """``[n, k]`` int64: the rolled coordinate of tap ``a`` of query ``i`` along one axis, ``-1``
    where the tap is outside the map (docs/msa_conv.md)."""
    r = (k - 1) // 2
    taps = torch.empty(n, k, dtype=torch.long)
    for i in range(n):
        for a in range(k):
            if padding == "clamp":
                g, t = i % d, i // d
                length = len(range(g, n, d))
                s = min(max(t - r, 0), length - k)
                y = (s + a) * d + g
            else:
                y = i + (a - r) * d
            taps[i, a] = y if 0 <= y < n else -1
    return taps


def msa_conv2d_ref(q, k, v, kernel_size, dilation=1, padding="zero", kv_shift=None, softmax_scale=None,
                   return_lse=False, upcast=True):
    """MSA-Conv by gathering every query's window explicitly (docs/msa_conv.md).

    ``q, k, v [B, H, W, heads, D]``; returns ``[B, H, W, heads, D]`` (and the log-sum-exp
    ``[B, H, W, heads]`` with ``return_lse``), in float64, or with ``upcast=False`` computed in
    the inputs' dtype (plain PyTorch's error, the tests' baseline)."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    B, H, W, heads, D = q.shape
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    if upcast:
        q, k, v = (t.double() for t in (q, k, v))
    rows = _msa_axis_taps(H, kh, dh, padding).to(q.device)
    cols = _msa_axis_taps(W, kw, dw, padding).to(q.device)
    shifts = torch.zeros(heads, 2, dtype=torch.long) if kv_shift is None else torch.as_tensor(kv_shift).long().cpu()
    outs, lses = [], []
    for h in range(heads):
        sy, sx = int(shifts[h, 0]), int(shifts[h, 1])
        valid = (rows >= 0)[:, None, :, None] & (cols >= 0)[None, :, None, :]  # [H, W, kh, kw]
        src_r = (rows.clamp(min=0) + sy) % H
        src_c = (cols.clamp(min=0) + sx) % W
        kk = k[:, :, :, h][:, src_r[:, None, :, None], src_c[None, :, None, :]]  # [B, H, W, kh, kw, D]
        vv = v[:, :, :, h][:, src_r[:, None, :, None], src_c[None, :, None, :]]
        logits = torch.einsum("bijd,bijacd->bijac", q[:, :, :, h], kk) * scale
        if padding == "zero":
            logits = torch.where(valid, logits, torch.zeros_like(logits))
            vv = torch.where(valid[..., None], vv, torch.zeros_like(vv))
        else:
            logits = logits.masked_fill(~valid, float("-inf"))
        logits = logits.flatten(-2)
        lse = torch.logsumexp(logits, dim=-1)
        p = torch.exp(logits - lse[..., None])
        outs.append(torch.einsum("bijt,bijtd->bijd", p, vv.flatten(3, 4)))
        lses.append(lse)
    out = torch.stack(outs, dim=3)
    return (out, torch.stack(lses, dim=3)) if return_lse else out
