"""The ``SINKLORA`` attention of one layer, on this package's paged kernels.

Each page of vLLM's per-layer cache ``[num_blocks, kv heads, block_size, 2 * head_dim]`` holds K‖V
per (token, kv head); the ops read and write K and V as two strided views of it, without copies.
Beside it, per layer: float32 scores and int32 positions per slot (paged like the cache) and, per
request (its first block) and kv head, the slot its last eviction freed.

A step: decode rows first (a request whose prompt was just processed is compacted to the budget,
then: write the new token into the slot each head freed, attend with fused scores, evict one key
per head past the budget), then prefill chunks (causal attention over the request's cached prefix
and the chunk, the prompt scores, the write). Decodes go first because the blocks a compaction gives
back may already belong to a prefill of the same step.
"""

from __future__ import annotations

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionImpl, AttentionType

from ..kv_cache import decayed_scores, kept_slots
from ..paged import (causal_prefill, paged_decode, paged_write_, plan_paged, prefix_chunk_attention,
                     select_evictions)
from .config import BACKEND_NAME, SinkLoRAConfig, set_engine_config
from .metadata import DecodeRows, PrefillChunks, SinkLoRAMetadata


def split_kv_cache(kv_cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V views ``[num_blocks, block_size, kv heads, head_dim]`` of vLLM's per-layer cache
    ``[num_blocks, kv heads, block_size, 2 * head_dim]`` (either stride order)."""
    if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * head_dim:
        raise ValueError(f"{BACKEND_NAME}: kv_cache must be [num_blocks, kv_heads, block_size, 2 * {head_dim}], "
                         f"got {tuple(kv_cache.shape)}")
    return kv_cache[..., :head_dim].permute(0, 2, 1, 3), kv_cache[..., head_dim:].permute(0, 2, 1, 3)


class SinkLoRAImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes=None, sliding_window=None, kv_cache_dtype: str = "auto", logits_soft_cap=None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name=None, sinks=None, **kwargs):
        refused = {"alibi_slopes": alibi_slopes is not None, "sliding_window": sliding_window is not None,
                   "logits_soft_cap": bool(logits_soft_cap), "attention sinks": sinks is not None,
                   "kv_sharing_target_layer_name": kv_sharing_target_layer_name is not None,
                   f"attn_type={attn_type}": attn_type != AttentionType.DECODER,
                   f"kv_cache_dtype={kv_cache_dtype}": kv_cache_dtype != "auto"}
        for what, bad in refused.items():
            if bad:
                raise NotImplementedError(f"{BACKEND_NAME}: {what} is not supported")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.config = SinkLoRAConfig.from_vllm_config(get_current_vllm_config())
        set_engine_config(self.config)
        self.policy = self.config.cache_policy
        self._state_of: int | None = None  # data_ptr of the cache the side tensors belong to

    def _side_tensors(self, kv_cache: torch.Tensor) -> None:
        if self._state_of == kv_cache.data_ptr():
            return
        num_blocks, block_size = kv_cache.shape[0], kv_cache.shape[2]
        shape, dev = (num_blocks, block_size, self.num_kv_heads), kv_cache.device
        self.scores = torch.zeros(shape, dtype=torch.float32, device=dev)
        self.positions = torch.zeros(shape, dtype=torch.int32, device=dev)
        self.holes = torch.zeros(num_blocks, self.num_kv_heads, dtype=torch.int32, device=dev)
        self._state_of = kv_cache.data_ptr()

    def forward(self, layer, query, key, value, kv_cache, attn_metadata: SinkLoRAMetadata | None, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(f"{BACKEND_NAME}: fused output quantization is not supported")
        if attn_metadata is None:  # profiling and warm-up
            return output
        self._side_tensors(kv_cache)
        k_cache, v_cache = split_kv_cache(kv_cache, self.head_size)
        out = output.view(output.shape[0], self.num_heads, self.head_size)
        if attn_metadata.decode is not None:
            self._decode(attn_metadata, attn_metadata.decode, query, key, value, k_cache, v_cache, out)
        if attn_metadata.prefill is not None:
            self._prefill(attn_metadata.prefill, query, key, value, k_cache, v_cache, out)
        return output

    # -- decode -----------------------------------------------------------------------------------
    def _decode(self, md: SinkLoRAMetadata, d: DecodeRows, query, key, value, k_cache, v_cache, out) -> None:
        evicts, bs = self.config.evicts, k_cache.shape[1]
        for (row, slots), table in zip(d.compact, d.compact_tables if d.compact else ()):
            self._compact(table, slots, k_cache, v_cache)
        decay = self.policy.decay_factor
        if decay != 1.0 and d.first:  # a prompt's scores decay once before its first step adds mass
            for row, slots in d.first:
                t = torch.arange(slots, device=k_cache.device)
                blocks, offsets = d.tables[row].long()[t // bs], t % bs
                self.scores[blocks, offsets] = decayed_scores(self.scores[blocks, offsets], decay)
        slots = d.append_slots[:, None].expand(-1, self.num_kv_heads)
        if d.any_hole:
            hole = self.holes.index_select(0, d.keys).long()  # [Bd, Hkv] logical
            phys = d.tables.long().gather(1, hole // bs) * bs + hole % bs
            slots = torch.where(slots >= 0, slots, phys.to(torch.int32))
        slots = slots.contiguous()
        q, k, v = query.index_select(0, d.tokens), key.index_select(0, d.tokens), value.index_select(0, d.tokens)
        scores = self.scores if evicts else None
        paged_write_(k, v, k_cache, v_cache, slots, scores, None, self.positions if evicts else None,
                     d.positions if evicts else None)
        plan = md.plans.get("decode")
        if plan is None:
            plan = md.plans["decode"] = plan_paged(k_cache, d.tables, d.lens, None, self.num_heads)
        attended = paged_decode(q, k_cache, v_cache, d.tables, d.lens, self.scale,
                                scores if self.policy.scored else None, plan=plan)
        out.index_copy_(0, d.tokens, attended.to(out.dtype))
        if d.any_evict or decay != 1.0:  # a decaying rule decays every step, under the budget too
            victims = select_evictions(self.scores, self.positions, d.tables, d.lens, self.policy.num_sinks,
                                       self.policy.recent_tokens, self.policy.eviction_rank, decay, plan=plan)
        if d.any_evict:
            rows = d.evict & (victims >= 0).all(dim=1)
            self.holes.index_copy_(0, d.keys[rows], victims[rows])

    def _compact(self, table: torch.Tensor, slots: int, k_cache, v_cache) -> None:
        """Cut a processed prompt of ``slots`` cached tokens to the budget, per kv head."""
        budget, bs, hkv = self.config.kv_budget, k_cache.shape[1], self.num_kv_heads
        t = torch.arange(slots, device=k_cache.device)
        blocks, offsets = table.long()[t // bs], t % bs
        keep = kept_slots(self.scores[blocks, offsets], self.positions[blocks, offsets], self.policy, budget)
        heads = torch.arange(hkv, device=k_cache.device)[None, :].expand(budget, hkv)
        src_b, src_o = blocks[keep], offsets[keep]
        dst_b, dst_o = blocks[:budget, None].expand(budget, hkv), offsets[:budget, None].expand(budget, hkv)
        for cache in (k_cache, v_cache, self.scores, self.positions):
            cache[dst_b, dst_o, heads] = cache[src_b, src_o, heads].clone()

    # -- prefill ----------------------------------------------------------------------------------
    def _prefill(self, p: PrefillChunks, query, key, value, k_cache, v_cache, out) -> None:
        evicts = self.config.evicts
        scored, decay = self.policy.scored, self.policy.decay_factor
        q, k, v = query.index_select(0, p.tokens), key.index_select(0, p.tokens), value.index_select(0, p.tokens)
        if not any(p.starts):  # every chunk is a whole prompt, or its first piece: one packed pass
            if len(p.lengths) == 1:
                attended, new_scores = causal_prefill(q[None], k[None], v[None], self.scale, scored,
                                                      score_decay=decay)
                attended, new_scores = attended[0], None if new_scores is None else new_scores[0]
            else:
                attended, new_scores = causal_prefill(q, k, v, self.scale, scored, p.cu_seqlens, p.max_seqlen,
                                                      score_decay=decay)
        else:
            attended, new_scores = self._prefill_with_context(p, q, k, v, k_cache, v_cache, scored)
        paged_write_(k, v, k_cache, v_cache, p.slots, self.scores if evicts else None,
                     None if new_scores is None else new_scores.float().contiguous(),
                     self.positions if evicts else None, p.positions if evicts else None)
        out.index_copy_(0, p.tokens, attended.to(out.dtype))

    def _prefill_with_context(self, p: PrefillChunks, q, k, v, k_cache, v_cache, scored: bool):
        """Chunks that attend a cached prefix (chunked prefill), by :func:`prefix_chunk_attention`
        over the prefix gathered from the cache; the chunk's mass on the prefix goes into the
        prefix's scores (a decaying rule decays them by ``decay ** n`` first)."""
        bs, hkv = k_cache.shape[1], self.num_kv_heads
        decay = self.policy.decay_factor
        outs = torch.empty_like(q)
        new_scores = torch.empty(q.shape[0], hkv, dtype=torch.float32, device=q.device) if scored else None
        offset = 0
        for chunk, (start, n) in enumerate(zip(p.starts, p.lengths)):
            t = torch.arange(start, device=q.device)
            blocks, offsets = p.tables[chunk].long()[t // bs], t % bs
            out, chunk_scores, prefix_mass = prefix_chunk_attention(
                q[offset:offset + n], k[offset:offset + n], v[offset:offset + n], k_cache[blocks, offsets],
                v_cache[blocks, offsets], self.scale, scored, score_decay=decay)
            outs[offset:offset + n] = out
            if scored:
                new_scores[offset:offset + n] = chunk_scores
                if start:
                    heads = torch.arange(hkv, device=q.device)[None, :].expand(start, hkv)
                    index = (blocks[:, None].expand(start, hkv), offsets[:, None].expand(start, hkv), heads)
                    if decay != 1.0:
                        self.scores[index] = self.scores[index] * decay ** n
                    self.scores[index] += prefix_mass
            offset += n
        return outs, new_scores
