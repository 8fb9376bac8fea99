"""MSA-Conv (TiC, arXiv 2310.04134): multi-head self-attention inside the (dilated) window of a
convolution. Every pixel is a query over its own ``Kh x Kw`` window; see docs/msa_conv.md for
the exact rule, the three paddings and the per-head ``kv_shift``. Tensors use NATTEN's
heads-last layout ``[B, H, W, heads, D]``.
"""

from __future__ import annotations

import numbers

import torch

from . import _C  # noqa: F401

_ops = torch.ops.sinklora_ext

PADDINGS = ("zero", "mask", "clamp")


def _pair(value, name: str) -> list[int]:
    if isinstance(value, bool):
        raise ValueError(f"msa_conv2d: {name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, numbers.Integral):
        return [int(value), int(value)]
    try:
        pair = list(value)
    except TypeError:
        raise ValueError(f"msa_conv2d: {name} must be an int or a pair of ints, got {value!r}") from None
    if len(pair) != 2 or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in pair):
        raise ValueError(f"msa_conv2d: {name} must be an int or a pair of ints, got {value!r}")
    return [int(x) for x in pair]


def _flat_shift(kv_shift, heads: int) -> list[int] | None:
    if kv_shift is None:
        return None
    if isinstance(kv_shift, torch.Tensor):
        if kv_shift.dtype.is_floating_point or kv_shift.dtype.is_complex or kv_shift.dtype == torch.bool:
            raise ValueError(f"msa_conv2d: kv_shift must be [heads, 2] integers, got dtype {kv_shift.dtype}")
        shape = tuple(kv_shift.shape)
        values = kv_shift.tolist()
    else:
        try:
            values = [list(row) for row in kv_shift]
        except TypeError:
            raise ValueError(f"msa_conv2d: kv_shift must be [heads, 2] integers, got {kv_shift!r}") from None
        shape = (len(values), *({len(row) for row in values} or {2}))
        if len(shape) != 2 or not all(
            isinstance(x, numbers.Integral) and not isinstance(x, bool) for row in values for x in row
        ):
            raise ValueError(f"msa_conv2d: kv_shift must be [heads, 2] integers, got {kv_shift!r}")
    if shape != (heads, 2):
        raise ValueError(f"msa_conv2d: kv_shift must be [heads, 2] integers with heads = {heads}, got shape {shape}")
    return [int(x) for row in values for x in row]


def msa_conv2d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size,
    dilation=1,
    padding: str = "zero",
    kv_shift=None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Attention of every pixel over its dilated ``Kh x Kw`` window.

    Parameters
    ----------
    q, k, v : ``[B, H, W, heads, D]``, the same shape; float32, float16 or bfloat16. Only the last
        dimension must be contiguous.
    kernel_size : int or ``(Kh, Kw)``, each odd and >= 1.
    dilation : int or ``(dh, dw)``, each >= 1.
    padding : ``"zero"`` (MSA-Conv as released: an outside tap is a zero key and value that stays
        in the softmax), ``"mask"`` (outside taps are left out) or ``"clamp"`` (NATTEN's window
        shifted inside the map; needs ``Kh * dh <= H`` and ``Kw * dw <= W``).
    kv_shift : None or integers ``[heads, 2]`` of ``(sy, sx)``: head ``h`` reads K and V rolled
        cyclically, ``k'[y, x] = k[(y + sy) mod H, (x + sx) mod W]``.
    softmax_scale : defaults to ``D ** -0.5``.

    Returns ``[B, H, W, heads, D]`` in q's dtype. Differentiable in q, k and v.

    >>> q = k = v = torch.randn(2, 9, 13, 4, 32)
    >>> msa_conv2d(q, k, v, kernel_size=3, dilation=2, kv_shift=[[0, 0], [2, 0], [0, 3], [-2, -3]]).shape
    torch.Size([2, 9, 13, 4, 32])
    """
    if not isinstance(padding, str) or padding not in PADDINGS:
        raise ValueError(f"msa_conv2d: padding must be one of {', '.join(map(repr, PADDINGS))}, got {padding!r}")
    if q.dim() != 5:
        raise ValueError(f"msa_conv2d: q must be [B, H, W, heads, D], got shape {tuple(q.shape)}")
    ks = _pair(kernel_size, "kernel_size")
    dil = _pair(dilation, "dilation")
    shift = _flat_shift(kv_shift, q.shape[3])
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    out, _ = _ops.msa_conv2d_fwd(q, k, v, ks, dil, padding, shift, scale)
    return out


@torch.library.register_fake("sinklora_ext::msa_conv2d_fwd")
def _msa_conv2d_fwd_fake(q, k, v, kernel_size, dilation, padding, kv_shift, softmax_scale):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    return out, lse


@torch.library.register_fake("sinklora_ext::msa_conv2d_bwd")
def _msa_conv2d_bwd_fake(dout, q, k, v, out, lse, kernel_size, dilation, padding, kv_shift, softmax_scale):
    return (
        torch.empty(q.shape, dtype=q.dtype, device=q.device),
        torch.empty(k.shape, dtype=k.dtype, device=k.device),
        torch.empty(v.shape, dtype=v.dtype, device=v.device),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, kernel_size, dilation, padding, kv_shift, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (kernel_size, dilation, padding, kv_shift, softmax_scale)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _ops.msa_conv2d_bwd(dout, q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("sinklora_ext::msa_conv2d_fwd", _backward, setup_context=_setup_context)
