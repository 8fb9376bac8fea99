"""SF-Attn: attention inside fixed (or shifted) groups of tokens plus global sink tokens.

One fused op covers SinkLoRA's SF-Attn, LongLoRA's S²-Attn (both readings) and full causal
attention; see docs/attention.md for the exact visibility rule. Tensors use flash-attention's layout.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401

_ops = torch.ops.sinklora_ext


def sf_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    num_sinks: int = 4,
    shift: str = "none",
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Segmented (optionally shifted) causal attention with sink tokens.

    Parameters
    ----------
    q : ``[B, N, Hq, D]`` float32, float16 or bfloat16, after RoPE.
    k, v : ``[B, N, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA: query head ``h`` reads kv head
        ``h // (Hq // Hkv)``; K/V are never repeated).
    group_size : ``G >= 1``; query ``i`` sees keys of its own group up to itself.
    num_sinks : the first ``num_sinks`` tokens are visible to every later query.
    shift : ``"none"`` (fixed groups), ``"nowrap"`` (query heads ``h >= Hq // 2`` use groups
        offset by ``G // 2``, no wrap) or ``"roll"`` (LongLoRA's cyclic roll; needs ``N % G == 0``).
    softmax_scale : defaults to ``D ** -0.5``.

    Returns ``[B, N, Hq, D]`` in q's dtype. Differentiable in q, k and v.

    >>> q = torch.randn(2, 128, 8, 64); kv = torch.randn(2, 128, 2, 64)
    >>> sf_attention(q, kv, kv, group_size=32, num_sinks=4).shape
    torch.Size([2, 128, 8, 64])
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    out, _ = _ops.sf_attention_fwd(q, k, v, None, 0, int(group_size), int(num_sinks), shift, scale)
    return out


def sf_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    group_size: int,
    num_sinks: int = 4,
    shift: str = "none",
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """:func:`sf_attention` over packed sequences of different lengths.

    ``q [total, Hq, D]``, ``k, v [total, Hkv, D]``, ``cu_seqlens`` int32 ``[B + 1]`` with the
    offsets of each sequence (``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == total``) and
    ``max_seqlen`` at least the longest length. Positions, groups and sinks restart at every
    sequence; no token attends across sequences. Returns ``[total, Hq, D]``.

    >>> q = torch.randn(10, 4, 32); kv = torch.randn(10, 2, 32)
    >>> cu = torch.tensor([0, 1, 10], dtype=torch.int32)
    >>> sf_attention_varlen(q, kv, kv, cu, 9, group_size=4).shape
    torch.Size([10, 4, 32])
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    out, _ = _ops.sf_attention_fwd(
        q, k, v, cu_seqlens, int(max_seqlen), int(group_size), int(num_sinks), shift, scale
    )
    return out


def kernel_for(op: str, dtype: torch.dtype, head_dim: int, device: torch.device | str = "cuda",
               heads_per_kv: int = 1) -> str:
    """Which kernel ``op`` runs for dense inputs of ``dtype`` and ``head_dim`` on ``device``:
    ``"mma"`` (the tensor-core kernels), ``"generic"`` or ``"cpu"``. Ops: ``sf_attention_fwd``,
    ``sf_attention_bwd``, ``column_scores``, ``paged_decode`` (``heads_per_kv``: query heads per kv
    head), ``paged_write_``, ``select_evictions``. The kernels follow the same rule, and never fall
    back: a kernel that cannot launch raises.

    >>> sinklora_ext.kernel_for("sf_attention_fwd", torch.float16, 64, "cuda")  # doctest: +SKIP
    'mma'
    """
    like = torch.empty(0, dtype=dtype, device=device)
    return _ops.kernel_for(like, op, int(head_dim), int(heads_per_kv))


@torch.library.register_fake("sinklora_ext::kernel_for")
def _kernel_for_fake(like, op, head_dim, heads_per_kv):
    raise NotImplementedError("kernel_for asks the device: it has no meaning under fake tensors")


@torch.library.register_fake("sinklora_ext::sf_attention_fwd")
def _sf_attention_fwd_fake(q, k, v, cu_seqlens, max_seqlen, group_size, num_sinks, shift, softmax_scale):
    rows = q.shape[0] if cu_seqlens is not None else q.shape[0] * q.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = q.new_empty((q.shape[-2], rows), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("sinklora_ext::sf_attention_bwd")
def _sf_attention_bwd_fake(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, group_size, num_sinks, shift, softmax_scale):
    return (
        torch.empty(q.shape, dtype=q.dtype, device=q.device),
        torch.empty(k.shape, dtype=k.dtype, device=k.device),
        torch.empty(v.shape, dtype=v.dtype, device=v.device),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, group_size, num_sinks, shift, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.args = (max_seqlen, group_size, num_sinks, shift, softmax_scale)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _ops.sf_attention_bwd(dout, q, k, v, out, lse, cu_seqlens, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("sinklora_ext::sf_attention_fwd", _backward, setup_context=_setup_context)
