"""The ``SINKLORA`` attention backend: what vLLM asks of a backend class, and the hook that gives
its layers the :class:`~sinklora_ext.vllm.spec.SinkLoRASpec` (and so its block manager)."""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionBackend, AttentionType
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheLayout

from .config import BACKEND_NAME, engine_config


class SinkLoRABackend(AttentionBackend):
    # the cache write, the scores and the eviction are one step of the impl
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float32, torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls():
        from .impl import SinkLoRAImpl

        return SinkLoRAImpl

    @staticmethod
    def get_builder_cls():
        from .metadata import SinkLoRAMetadataBuilder

        return SinkLoRAMetadataBuilder

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(range(1, 257))  # the paged kernels' head_dim range

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # each page holds K‖V per (token, kv head); the ops take either order of tokens and heads
        return (KVCacheLayout.LBNHC, KVCacheLayout.LBHNC)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def customize_spec(cls, spec):
        from .spec import SinkLoRASpec

        if type(spec) is not FullAttentionSpec:  # sliding-window, MLA, cross-attention: not ours
            return spec
        return SinkLoRASpec.from_spec(spec, engine_config())
