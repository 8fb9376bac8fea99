"""MSA-Conv as a layer: a drop-in for ``nn.Conv2d`` on ``[B, C, H, W]`` (docs/tic.md).

``MSAConv2d`` is the released layer (a 1x1 conv to q, k, v, attention inside each pixel's window,
plus the input, a ``kernel_size`` conv with the stride, ReLU) with heads, and with this project's
reading of the paper's two mechanisms (research/tic.md §2, §7; the paper's definitions are not
public):

- ``shift`` (Multi-Directional Cyclic Shift): groups of heads read K and V cyclically rolled by a
  fraction of the map (:data:`SHIFT_SCHEMES`), so their windows sit a quarter of the map away in
  different directions. The offsets are computed from the map at forward time.
- ``inter_pool`` (Inter-Pooling): the last ``heads // 2`` heads attend over the 2x average-pooled
  map (the window then covers twice the distance) and their result is upsampled back (bilinear).
  With both, each head keeps its shift direction, as a fraction of the map it attends over.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..msa_conv import PADDINGS, msa_conv2d

__all__ = ["MSAConv2d", "SHIFT_SCHEMES", "shift_offsets", "dilated_conv"]

# each scheme: the directions of its head groups, as fractions (fy, fx) of the map (H, W)
SHIFT_SCHEMES: dict[str, tuple[tuple[float, float], ...]] = {
    "cross": ((0.25, 0.0), (-0.25, 0.0), (0.0, 0.25), (0.0, -0.25)),
    "cross+diag": ((0.25, 0.0), (-0.25, 0.0), (0.0, 0.25), (0.0, -0.25),
                   (0.25, 0.25), (0.25, -0.25), (-0.25, 0.25), (-0.25, -0.25)),
}


def shift_offsets(scheme: str | None, heads: int, height: int, width: int) -> list[list[int]] | None:
    """The ``kv_shift [heads, 2]`` of ``scheme`` on a ``height x width`` map (None: no shift).

    The heads are split into one group per direction (``heads // directions`` each, in order); the
    heads beyond a multiple of the directions stay unshifted. An offset is the direction's
    fraction of the map, truncated toward zero (``-0.25`` of 28 rows is -7).

    >>> shift_offsets("cross", 4, 28, 56)
    [[7, 0], [-7, 0], [0, 14], [0, -14]]
    >>> shift_offsets("cross", 5, 8, 8)[-1]
    [0, 0]
    """
    if scheme is None:
        return None
    directions = SHIFT_SCHEMES[scheme]
    per_group = heads // len(directions)
    offsets = []
    for head in range(heads):
        group = head // per_group if per_group else len(directions)
        if group >= len(directions):
            offsets.append([0, 0])
        else:
            fy, fx = directions[group]
            offsets.append([int(fy * height), int(fx * width)])
    return offsets


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"MSAConv2d: {name} must be an int or a pair of ints, got {value!r}")


class MSAConv2d(nn.Module):
    """Multi-head self-attention inside the (dilated) window of a convolution, then a convolution.

    ``[B, in_channels, H, W] -> [B, out_channels, H', W']`` with ``H' = (H - 1) // stride + 1``
    (as ``nn.Conv2d(..., kernel_size, stride, padding=kernel_size // 2)``), any ``H, W >= 1``.
    ``heads`` must divide ``in_channels`` (``heads == in_channels``: depthwise, one attention map
    per channel). The attention itself has stride 1; the output conv strides.

    >>> layer = MSAConv2d(8, 16, 3, stride=2, heads=4, shift="cross")
    >>> layer(torch.randn(2, 8, 9, 7)).shape
    torch.Size([2, 16, 5, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, dilation=1, heads: int = 1,
                 padding: str = "zero", shift: str | None = None, bias: bool = False, inter_pool: bool = False):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("heads", heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MSAConv2d: {name} must be an integer >= 1, got {value!r}")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        if any(k < 1 or k % 2 == 0 for k in self.kernel_size):
            raise ValueError(f"MSAConv2d: kernel_size must be odd and >= 1, got {kernel_size!r}")
        if any(s < 1 for s in self.stride):
            raise ValueError(f"MSAConv2d: stride must be >= 1, got {stride!r}")
        if any(d < 1 for d in self.dilation):
            raise ValueError(f"MSAConv2d: dilation must be >= 1, got {dilation!r}")
        if in_channels % heads:
            raise ValueError(f"MSAConv2d: heads ({heads}) must divide in_channels ({in_channels})")
        if padding not in PADDINGS:
            raise ValueError(f"MSAConv2d: padding must be one of {', '.join(map(repr, PADDINGS))}, got {padding!r}")
        if shift is not None and shift not in SHIFT_SCHEMES:
            raise ValueError(f"MSAConv2d: shift must be None or one of {', '.join(map(repr, SHIFT_SCHEMES))}, "
                             f"got {shift!r}")
        if inter_pool and heads < 2:
            raise ValueError("MSAConv2d: inter_pool needs heads >= 2 (half of the heads attend over the pooled map)")
        self.in_channels, self.out_channels, self.heads = in_channels, out_channels, heads
        self.padding, self.shift, self.inter_pool = padding, shift, bool(inter_pool)
        self.pooled_heads = heads // 2 if inter_pool else 0
        self.qkv = nn.Conv2d(in_channels, 3 * in_channels, 1, bias=bias)
        self.proj = nn.Conv2d(in_channels, out_channels, self.kernel_size, stride=self.stride,
                              padding=(self.kernel_size[0] // 2, self.kernel_size[1] // 2), bias=bias)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"dilation={self.dilation}, heads={self.heads}, padding={self.padding!r}, shift={self.shift!r}, "
                f"inter_pool={self.inter_pool}")

    def _attend(self, qkv: torch.Tensor, first: int, heads: int, dilation: tuple[int, int]) -> torch.Tensor:
        """``qkv [B, 3 * heads * D, h, w]`` of the layer's heads ``first .. first + heads - 1`` ->
        their attention output ``[B, heads * D, h, w]`` (shifted as those heads of the layer, at
        this map's size)."""
        B, _, h, w = qkv.shape
        channels = qkv.shape[1] // 3
        tokens = qkv.permute(0, 2, 3, 1).reshape(B, h, w, 3, heads, channels // heads)
        q, k, v = tokens.unbind(3)
        offsets = shift_offsets(self.shift, self.heads, h, w)
        out = msa_conv2d(q, k, v, self.kernel_size, dilation, self.padding,
                         None if offsets is None else offsets[first:first + heads])
        return out.reshape(B, h, w, channels).permute(0, 3, 1, 2)

    def attention(self, x: torch.Tensor, window_scale: tuple[int, int] = (1, 1)) -> torch.Tensor:
        """The attention part alone: ``[B, C, H, W] -> [B, C, H, W]`` (before the residual)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"MSAConv2d: input must be [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        dilation = (self.dilation[0] * window_scale[0], self.dilation[1] * window_scale[1])
        qkv = self.qkv(x)
        if not self.pooled_heads:
            return self._attend(qkv, 0, self.heads, dilation)
        B, _, H, W = qkv.shape
        D = self.in_channels // self.heads
        local = self.heads - self.pooled_heads
        grouped = qkv.view(B, 3, self.heads, D, H, W)
        near = self._attend(grouped[:, :, :local].reshape(B, 3 * local * D, H, W), 0, local, dilation)
        pooled = F.avg_pool2d(grouped[:, :, local:].reshape(B, 3 * self.pooled_heads * D, H, W), 2, ceil_mode=True)
        far = self._attend(pooled, local, self.pooled_heads, dilation)
        far = F.interpolate(far, size=(H, W), mode="bilinear", align_corners=False)
        return torch.cat([near, far], dim=1)

    def forward(self, x: torch.Tensor, window_scale: tuple[int, int] = (1, 1)) -> torch.Tensor:
        """``window_scale (sy, sx)``: every dilation of the layer (the attention window's and the
        output conv's) multiplied by it, so that on an image ``s`` times larger the layer covers
        the same part of the image as at scale 1 (:class:`~sinklora_ext.tic.model.TiC`'s
        ``native_resolution``)."""
        return F.relu(dilated_conv(self.proj, self.attention(x, window_scale) + x, window_scale))


def dilated_conv(conv: nn.Conv2d, x: torch.Tensor, scale: tuple[int, int]) -> torch.Tensor:
    """``conv(x)`` with its dilation (and its "same" padding) multiplied by ``scale``: the same
    output size, the taps ``scale`` times further apart."""
    if tuple(scale) == (1, 1):
        return conv(x)
    dilation = (conv.dilation[0] * scale[0], conv.dilation[1] * scale[1])
    padding = tuple(d * (k // 2) for d, k in zip(dilation, conv.kernel_size))
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, padding, dilation, conv.groups)
