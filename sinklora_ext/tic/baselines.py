"""Baselines for the TiC experiment: a plain CNN and a small ViT, sized like the ``tic-micro`` preset.

Both take ``[B, C, H, W]`` at any resolution and return ``[B, num_classes]`` logits.
:data:`BASELINES` maps a model name to its constructor ``(num_classes, in_channels, **sizes)``.
Parameter counts at the defaults, 10 classes, 1 input channel (Fashion-MNIST):

- ``cnn-micro`` (:class:`ConvNet`, ``width=20, depth=3``): 113,150;
- ``vit-micro`` (:class:`VisionTransformer`, ``width=40, depth=6``): 121,450

(``tic-micro``: 121,962).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
                         nn.ReLU(inplace=True))


class ConvNet(nn.Module):
    """``depth`` stages of two 3x3 conv-BN-ReLU layers, ``width * 2**i`` channels in stage ``i``, a
    2x2 max pool between stages, global average pooling and a linear classifier. Nothing depends on
    the resolution (a map pooled below 1x1 keeps 1x1: the pool rounds its output size up)."""

    def __init__(self, num_classes: int, in_channels: int, *, width: int = 20, depth: int = 3):
        super().__init__()
        layers, channels = [], in_channels
        for stage in range(depth):
            if stage:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            out = width * 2**stage
            layers += [conv_bn_relu(channels, out), conv_bn_relu(out, out)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention (``scaled_dot_product_attention``) and a GELU MLP, each residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, dim)
        x = x + self.proj(attended)
        return x + self.mlp(self.mlp_norm(x))


class VisionTransformer(nn.Module):
    """A small ViT: non-overlapping ``patch_size`` patches (the image zero-padded on the bottom and
    right up to a multiple of it), learned position embeddings for the token grid of
    ``train_resolution``, resampled bicubically to the token grid of any other input, ``depth``
    transformer blocks of ``width`` channels, mean pooling over the tokens, a linear classifier."""

    def __init__(self, num_classes: int, in_channels: int, *, width: int = 40, depth: int = 6, heads: int = 4,
                 patch_size: int = 4, train_resolution: int = 28):
        super().__init__()
        if width % heads:
            raise ValueError(f"VisionTransformer: width ({width}) must be a multiple of heads ({heads})")
        self.patch_size = patch_size
        self.train_grid = -(-train_resolution // patch_size)
        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, width, self.train_grid, self.train_grid) * 0.02)
        self.blocks = nn.Sequential(*(TransformerBlock(width, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, num_classes)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """``[1, width, gh, gw]``: the learned embeddings resampled to a ``gh x gw`` token grid."""
        return F.interpolate(self.pos_embed, size=grid, mode="bicubic", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        x = F.pad(x, (0, -x.shape[3] % p, 0, -x.shape[2] % p))
        tokens = self.patch_embed(x)  # [B, width, gh, gw]
        tokens = (tokens + self.position_embedding(tokens.shape[2:])).flatten(2).transpose(1, 2)
        return self.classifier(self.norm(self.blocks(tokens)).mean(dim=1))


BASELINES = {"cnn-micro": ConvNet, "vit-micro": VisionTransformer}
