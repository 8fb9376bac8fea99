"""TiC: a hierarchical image classifier built from :class:`~sinklora_ext.tic.layers.MSAConv2d`
(docs/tic.md).

A conv stem, stages of MSA-Conv blocks (the first block of every stage after the first has stride
2 and changes the width), global average pooling and a linear head. A block is
``x -> MSAConv2d(norm(x))``, plus ``x`` when the shapes agree. The norms are
``GroupNorm(1, C)`` (per image: no batch statistics, so data-parallel processes train exactly the
weights one process trains, and nothing is tied to the training resolution). There are no
positional embeddings, so the same weights run at any resolution.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MSAConv2d, dilated_conv

__all__ = ["TiC", "PRESETS", "build_model", "model_names", "count_parameters"]

# constructor arguments of each preset (num_classes and in_channels come from the data)
PRESETS: dict[str, dict] = {
    # 28x28 grey images (Fashion-MNIST) on a few CPU cores: maps 14 -> 7 -> 4
    "tic-micro": dict(channels=(32, 64, 128), depths=(1, 1, 1), kernel_size=3, dilations=(1, 1, 1), heads=4,
                      stem_stride=2),
    # ImageNet-shaped (224x224 RGB): stem stride 4, maps 56 -> 28 -> 14 -> 7
    "tic-tiny": dict(channels=(64, 128, 256, 512), depths=(2, 2, 6, 2), kernel_size=7, dilations=(2, 2, 1, 1),
                     heads=(2, 4, 8, 16), stem_stride=4),
}


def _per_stage(value, stages: int, name: str) -> tuple:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * stages
    if len(values) != stages:
        raise ValueError(f"TiC: {name} must be one value or one per stage ({stages}), got {value!r}")
    return values


class TiC(nn.Module):
    """Transformer in Convolution: ``[B, in_channels, H, W] -> [B, num_classes]`` logits, any
    ``H, W >= 1``.

    ``heads`` and ``dilations`` are one value or one per stage; ``heads`` of a stage must divide
    the width that enters each of its blocks. ``shift`` (a ``layers.SHIFT_SCHEMES`` name) and
    ``inter_pool`` switch this project's reading of the paper's two mechanisms on in every block
    (the ablation flags).

    ``native_resolution`` R (None: windows fixed in pixels, the released layer's behaviour): the
    side the model was trained at. An input runs at the nearest multiple ``s * R`` of R on each
    axis (``s`` = its size over R, rounded half up, at least 1; resampled bilinearly when it is
    not one already) with every dilation of the stem and of every MSA-Conv (windows and output
    convs) multiplied by ``s`` on that axis, so each window covers the same part of the image as
    in training; the maps still grow with the image. This project's addition (docs/tic.md
    "Resolution"); at the native size nothing changes.

    >>> model = TiC(num_classes=10, in_channels=1, channels=(8, 16), depths=(1, 1), heads=2)
    >>> model(torch.randn(2, 1, 17, 23)).shape
    torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, channels: Sequence[int] = (32, 64, 128),
                 depths: Sequence[int] = (1, 1, 1), kernel_size: int = 3, dilations=1, heads=4,
                 stem_stride: int = 1, padding: str = "zero", shift: str | None = None, inter_pool: bool = False,
                 native_resolution: int | None = None):
        super().__init__()
        channels, depths = tuple(channels), tuple(depths)
        if not channels or len(channels) != len(depths):
            raise ValueError(f"TiC: channels and depths must be non-empty and of the same length, got {channels!r} "
                             f"and {depths!r}")
        if any(not isinstance(d, int) or d < 1 for d in depths):
            raise ValueError(f"TiC: every depth must be an integer >= 1, got {depths!r}")
        if not isinstance(stem_stride, int) or stem_stride < 1:
            raise ValueError(f"TiC: stem_stride must be an integer >= 1, got {stem_stride!r}")
        if native_resolution is not None and (not isinstance(native_resolution, int) or isinstance(
                native_resolution, bool) or native_resolution < 1):
            raise ValueError(f"TiC: native_resolution must be None or an integer >= 1, got {native_resolution!r}")
        dilations = _per_stage(dilations, len(channels), "dilations")
        heads = _per_stage(heads, len(channels), "heads")
        self.config = dict(num_classes=num_classes, in_channels=in_channels, channels=list(channels),
                           depths=list(depths), kernel_size=kernel_size, dilations=list(dilations), heads=list(heads),
                           stem_stride=stem_stride, padding=padding, shift=shift, inter_pool=inter_pool,
                           native_resolution=native_resolution)
        self.native_resolution = native_resolution
        stem_kernel = 2 * stem_stride - 1 if stem_stride > 1 else 3
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], stem_kernel, stride=stem_stride, padding=stem_kernel // 2, bias=False),
            nn.GroupNorm(1, channels[0]), nn.ReLU(inplace=True))
        blocks = []
        width = channels[0]
        for stage, (out, depth) in enumerate(zip(channels, depths)):
            for index in range(depth):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(_Block(width, out, kernel_size, stride, dilations[stage], heads[stage], padding, shift,
                                     inter_pool))
                width = out
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.GroupNorm(1, width)
        self.head = nn.Linear(width, num_classes)

    def window_scale(self, height: int, width: int) -> tuple[int, int]:
        """The dilation multiplier ``(sy, sx)`` of an input of ``height x width`` (``(1, 1)``
        without ``native_resolution``); the input runs at ``(sy * R, sx * R)``.

        >>> model = TiC(channels=(8,), depths=(1,), heads=2, native_resolution=28)
        >>> model.window_scale(28, 28), model.window_scale(42, 56), model.window_scale(14, 100)
        ((1, 1), (2, 2), (1, 4))
        """
        if self.native_resolution is None:
            return 1, 1
        return tuple(max(1, math.floor(side / self.native_resolution + 0.5)) for side in (height, width))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features ``[B, channels[-1]]``."""
        scale = self.window_scale(x.shape[-2], x.shape[-1])
        if self.native_resolution is not None:
            size = (scale[0] * self.native_resolution, scale[1] * self.native_resolution)
            if tuple(x.shape[-2:]) != size:
                shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
        conv, norm, act = self.stem
        x = act(norm(dilated_conv(conv, x, scale)))
        for block in self.blocks:
            x = block(x, scale)
        return self.norm(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _Block(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride, dilation, heads, padding, shift, inter_pool):
        super().__init__()
        self.norm = nn.GroupNorm(1, in_channels)
        self.conv = MSAConv2d(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation, heads=heads,
                              padding=padding, shift=shift, inter_pool=inter_pool)
        self.residual = in_channels == out_channels and stride == 1

    def forward(self, x, window_scale=(1, 1)):
        out = self.conv(self.norm(x), window_scale)
        return x + out if self.residual else out


def model_names() -> list[str]:
    """The names :func:`build_model` takes: the TiC presets, then the baselines (when present)."""
    return sorted(PRESETS) + sorted(n for n in _baselines() if n not in PRESETS)


def _baselines() -> dict:
    try:
        from .baselines import BASELINES
    except ImportError:
        return {}
    return BASELINES


def build_model(name: str, num_classes: int = 10, in_channels: int = 1, **overrides) -> nn.Module:
    """The model called ``name``: a TiC preset (``overrides`` replace its arguments, e.g.
    ``shift="cross"``), else a baseline of ``sinklora_ext.tic.baselines`` (no overrides).

    >>> count_parameters(build_model("tic-micro"))
    121962
    """
    if name in PRESETS:
        return TiC(num_classes=num_classes, in_channels=in_channels, **{**PRESETS[name], **overrides})
    baselines = _baselines()
    if name in baselines:
        if overrides:
            raise ValueError(f"build_model: {name} is a baseline; it takes none of {', '.join(sorted(overrides))}")
        return baselines[name](num_classes, in_channels)
    raise ValueError(f"build_model: unknown model {name!r} (choose from {', '.join(model_names())})")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

