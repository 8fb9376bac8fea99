"""One step's plan for every SINKLORA layer of a KV-cache group, built once per step on the host.

vLLM's metadata carries no request ids, and the worker's block table only grows (the blocks the
manager gave back stay in it). What the backend needs per request lives in the builder, keyed by
the request's first block (it holds that block from its first prefill chunk to its end, and no
other running request does): the slots it holds in its cache and whether one of them is the hole
its last eviction left, where each kv head writes its next token (the hole's slot itself is per
layer and head, on the device, in the impl). A request that starts (a prefill chunk at position 0,
which is also how a preempted request comes back) resets its entry.

Decode rows of an evicting policy read only their first ``ceil((kv_budget + 1) / block_size)``
table entries; prefill rows (every chunk of the prompt) read all of theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionMetadataBuilder, CommonAttentionMetadata

from .config import SinkLoRAConfig
from .spec import SinkLoRASpec


@dataclass
class DecodeRows:
    """Rows that take one new token; tensors on the cache's device unless noted."""

    tokens: torch.Tensor        # int64 [Bd] the rows' token indices in the step
    tables: torch.Tensor        # int32 [Bd, cols] block tables (evicting: the resident blocks only)
    lens: torch.Tensor          # int32 [Bd] slots attended, the new token's included
    positions: torch.Tensor     # int32 [Bd] the new tokens' positions (tokens seen)
    keys: torch.Tensor          # int64 [Bd] first block of each row: the key of its per-request state
    append_slots: torch.Tensor  # int32 [Bd] physical slot of the new token, -1 where it takes the hole
    any_hole: bool
    evict: torch.Tensor | None  # bool [Bd] rows past the budget, which evict after attending
    any_evict: bool
    compact: list[tuple[int, int]]  # (row, cached slots): rows whose prompt is cut to the budget first
    compact_tables: torch.Tensor | None  # int32 [len(compact), cols] their whole block tables
    first: list[tuple[int, int]] = ()  # (row, slots after compaction): first decode step of a request


@dataclass
class PrefillChunks:
    """Chunks of prompts (several tokens, or a prompt's own token): attended causally over the
    request's cached prefix and themselves, scored, written into their slots."""

    tokens: torch.Tensor      # int64 [Tp] token indices in the step
    slots: torch.Tensor       # int32 [Tp, Hkv] physical slots
    positions: torch.Tensor   # int32 [Tp]
    cu_seqlens: torch.Tensor  # int32 [n + 1] over the prefill tokens
    max_seqlen: int
    starts: list[int]         # host: each chunk's first position (its cached prefix)
    lengths: list[int]        # host: tokens per chunk
    tables: torch.Tensor      # int32 [n, cols] the chunks' block tables


@dataclass
class SinkLoRAMetadata:
    num_actual_tokens: int
    decode: DecodeRows | None
    prefill: PrefillChunks | None
    plans: dict = field(default_factory=dict)  # made by the first layer, reused by the others


@dataclass
class _RequestState:
    slots: int  # slots held (the hole excluded)
    hole: bool = False
    decoded: bool = False  # a decode step has run (the prompt's scores have decayed once)


class SinkLoRAMetadataBuilder(AttentionMetadataBuilder[SinkLoRAMetadata]):
    _cudagraph_support = AttentionCGSupport.NEVER
    reorder_batch_threshold = 1  # decodes first

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if isinstance(kv_cache_spec, SinkLoRASpec):
            self.config = kv_cache_spec.config
        else:
            self.config = SinkLoRAConfig.from_vllm_config(vllm_config)
        self.block_size = kv_cache_spec.block_size
        self.num_kv_heads = kv_cache_spec.num_kv_heads
        self.device = device
        self.requests: dict[int, _RequestState] = {}

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> SinkLoRAMetadata:
        m = common_attn_metadata
        num_reqs, bs = m.num_reqs, self.block_size
        starts = m.query_start_loc_cpu[: num_reqs + 1].tolist()
        seq_lens = m.seq_lens[:num_reqs].cpu().tolist()
        prefilling = None if m.is_prefilling is None else m.is_prefilling[:num_reqs].cpu().tolist()
        tables = m.block_table_tensor[:num_reqs]
        keys = tables[:, 0].cpu().tolist() if num_reqs else []
        decode_rows, prefill_rows = [], []
        for row in range(num_reqs):
            q_len = starts[row + 1] - starts[row]
            if q_len == 0:
                continue
            is_prefill = q_len > 1 or (prefilling is not None and prefilling[row])
            (prefill_rows if is_prefill else decode_rows).append(row)
        decode = self._plan_decode(decode_rows, starts, seq_lens, keys, tables) if decode_rows else None
        prefill = self._plan_prefill(prefill_rows, starts, seq_lens, keys, tables, m.slot_mapping) if prefill_rows else None
        return SinkLoRAMetadata(m.num_actual_tokens, decode, prefill)

    def _plan_prefill(self, rows, starts, seq_lens, keys, tables, slot_mapping) -> PrefillChunks:
        token_idx, positions, chunk_starts, lengths = [], [], [], []
        for row in rows:
            q_len = starts[row + 1] - starts[row]
            start = seq_lens[row] - q_len
            token_idx.extend(range(starts[row], starts[row + 1]))
            positions.extend(range(start, seq_lens[row]))
            chunk_starts.append(start)
            lengths.append(q_len)
            if self.config.evicts:
                state = self.requests.get(keys[row])
                if start == 0 or state is None:
                    state = self.requests[keys[row]] = _RequestState(0)
                if state.slots != start or state.hole:
                    raise RuntimeError(f"SINKLORA: a prefill chunk at position {start} of a request holding "
                                       f"{state.slots} slots; chunks must follow the request's cache")
                state.slots = start + q_len
        dev = self.device
        tokens = torch.tensor(token_idx, dtype=torch.int64, device=dev)
        slots = slot_mapping.index_select(0, tokens).to(torch.int32)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
        return PrefillChunks(tokens, slots[:, None].expand(-1, self.num_kv_heads).contiguous(),
                             torch.tensor(positions, dtype=torch.int32, device=dev), cu, max(lengths),
                             chunk_starts, lengths, tables[torch.tensor(rows, device=tables.device)].contiguous())

    def _plan_decode(self, rows, starts, seq_lens, keys, tables) -> DecodeRows:
        config, bs = self.config, self.block_size
        budget = config.kv_budget
        lens, append, evict, compact, first, any_hole = [], [], [], [], [], False
        for i, row in enumerate(rows):
            seen = seq_lens[row]  # tokens seen, the new one included
            if not config.evicts:
                lens.append(seen)
                append.append(seen - 1)
                continue
            state = self.requests.get(keys[row])
            if state is None:
                raise RuntimeError("SINKLORA: a decode step of a request whose prompt this backend never saw")
            if state.slots > budget:  # the prompt is processed: cut it to the budget first
                compact.append((i, state.slots))
                state.slots, state.hole = budget, False
            if not state.decoded:
                first.append((i, state.slots))
                state.decoded = True
            append.append(-1 if state.hole else state.slots)
            any_hole |= state.hole
            attended = state.slots + 1
            lens.append(attended)
            if attended > budget:
                evict.append(True)
                state.slots, state.hole = budget, True
            else:
                evict.append(False)
                state.slots = attended
            if attended != min(seen, budget + 1):
                raise RuntimeError(f"SINKLORA: request state out of step ({attended} slots attended, "
                                   f"{seen} tokens seen, budget {budget})")
        dev = self.device
        idx = torch.tensor(rows, device=tables.device)
        row_tables = tables[idx]
        compact_tables = None
        if compact:
            compact_tables = row_tables[torch.tensor([i for i, _ in compact], device=tables.device)]
            compact_tables = compact_tables.to(torch.int32).contiguous()
        if config.evicts:
            row_tables = row_tables[:, : config.resident_blocks(bs)]
        row_tables = row_tables.to(torch.int32).contiguous()
        logical = torch.tensor(append, dtype=torch.int64, device=dev)
        blocks = row_tables.long().gather(1, (logical.clamp(min=0) // bs)[:, None])[:, 0]
        append_slots = torch.where(logical >= 0, blocks * bs + logical.clamp(min=0) % bs, -1).to(torch.int32)
        return DecodeRows(
            tokens=torch.tensor([starts[r] for r in rows], dtype=torch.int64, device=dev),
            tables=row_tables,
            lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            positions=torch.tensor([seq_lens[r] - 1 for r in rows], dtype=torch.int32, device=dev),
            keys=torch.tensor([keys[r] for r in rows], dtype=torch.int64, device=dev),
            append_slots=append_slots, any_hole=any_hole,
            evict=torch.tensor(evict, dtype=torch.bool, device=dev) if config.evicts else None,
            any_evict=any(evict), compact=compact, compact_tables=compact_tables, first=first)
