"""sinklora_ext: fused SF-Attn / S²-Attn attention with sink tokens, LoRA+ context extension,
paged H2O decoding, and MSA-Conv (TiC) attention inside convolution windows.

>>> import torch, sinklora_ext
>>> q = torch.randn(1, 64, 4, 32); k = v = torch.randn(1, 64, 2, 32)
>>> sinklora_ext.sf_attention(q, k, v, group_size=16).shape
torch.Size([1, 64, 4, 32])
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers the torch.ops.sinklora_ext ops)
from .attention import kernel_for, sf_attention, sf_attention_varlen
from .msa_conv import msa_conv2d
from .paged import (PagedPlan, causal_prefill, column_scores, paged_decode, paged_write_, plan_paged,
                    prefix_chunk_attention, select_evictions)
from .patterns import PRESETS, AttentionPattern, resolve_pattern

__version__ = "0.1.0"

__all__ = [
    "sf_attention",
    "sf_attention_varlen",
    "paged_decode",
    "paged_write_",
    "select_evictions",
    "column_scores",
    "causal_prefill",
    "prefix_chunk_attention",
    "plan_paged",
    "PagedPlan",
    "kernel_for",
    "msa_conv2d",
    "PRESETS",
    "AttentionPattern",
    "resolve_pattern",
]
