"""A paged KV cache with H2O / StreamingLLM eviction (docs/paged_kv.md).

One pool of blocks per layer (``k, v [num_blocks, block_size, Hkv, D]``, float32 ``scores`` and int32
``positions [num_blocks, block_size, Hkv]``), a free-list allocator shared by all layers, one block
table and length per sequence, and a per-(layer, sequence, kv head) slot for the next write.

Eviction keeps every (sequence, layer, kv head) at exactly the budget: after a prefill longer than
the budget the cache is compacted to the sinks, the recent tokens and the best-scored others, and
whole blocks go back to the pool; at each decode step every head evicts one key and the next token
reuses that head's freed slot, so a sequence never grows past ``budget + 1`` slots (the extra one is
the token being attended). Slot order differs per head; attention does not depend on it.

Steps are all or nothing: a prefill or decode step that raises part way (in a layer, a kernel, the
eviction) is undone by :meth:`PagedKVCache.rollback`, which :class:`~sinklora_ext.engine.PagedLlama`
calls for it; every sequence then reads exactly what it read before the step.

Each step validates its index tensors once: :meth:`PagedKVCache.begin_decode_step` (and
:meth:`~PagedKVCache.begin_prefills`) makes a :class:`~sinklora_ext.paged.PagedPlan` of the step's
block tables, lengths and the write slots of every layer, and every layer's ops run with it (no
per-layer host checks; a CUDA graph of the step replays with the plan of each new step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .paged import PagedPlan, paged_decode, paged_write_, physical_slots, plan_paged, select_evictions

POLICIES = ("full", "h2o", "streaming")


@dataclass(frozen=True)
class _Step:
    idx: torch.Tensor        # [B] cache rows of the stepping sequences
    tables: torch.Tensor     # [B, max_blocks_per_seq]
    lens: torch.Tensor       # [B] slots attended this step
    positions: torch.Tensor  # [B] positions of the new tokens
    over: torch.Tensor | None  # [B] sequences past the budget (evict after attending)
    any_evicts: bool
    slots: torch.Tensor      # [L, B, Hkv] physical write slots of every layer (-1: the row idles)
    plan: PagedPlan          # validated tables, lens and slots, shared by every layer of the step
    writes: torch.Tensor | None = None  # [B] rows that take a token (static steps: the others idle)


@dataclass(frozen=True)
class _Undo:
    """The state of the sequences a step changes, as it was before the step."""
    seqs: list[int]
    owned: list[list[int]]  # each sequence's blocks
    lengths: list[int]
    tokens_seen: list[int]
    free: list[int] | None = None  # prefills: the free stack (their compaction returns blocks part way)
    next_slots: torch.Tensor | None = None  # decode steps: [layers, max_seqs, Hkv]
    score_blocks: torch.Tensor | None = None  # decode steps that accumulate scores: the blocks they attend
    scores: torch.Tensor | None = None  # and those blocks' scores [layers, blocks, block_size, Hkv]


class BlockPoolExhausted(MemoryError):
    """The block pool has no room for a request; the sequences already in the cache are untouched."""


@dataclass(frozen=True)
class CachePolicy:
    """``full`` never evicts; ``h2o`` keeps sinks + recent + heavy hitters; ``streaming`` keeps
    sinks + the most recent tokens. ``budget`` counts tokens per (sequence, layer, kv head)."""

    name: str = "full"
    budget: int | None = None
    num_sinks: int = 4
    recent: int | None = None

    def __post_init__(self):
        if self.name not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.name!r}")
        if self.name == "full":
            return
        if self.budget is None or self.budget < 1:
            raise ValueError(f"kv budget must be >= 1 for policy {self.name!r}, got {self.budget}")
        if self.num_sinks < 0:
            raise ValueError(f"num_sinks must be >= 0, got {self.num_sinks}")
        if self.name == "streaming" and self.budget < self.num_sinks:
            raise ValueError(f"kv budget ({self.budget}) must be >= sinks ({self.num_sinks})")
        if self.recent_tokens < 0:
            raise ValueError(f"recent must be >= 0, got {self.recent}")
        if self.budget < self.num_sinks + self.recent_tokens:
            raise ValueError(f"kv budget ({self.budget}) must be >= sinks ({self.num_sinks}) + recent "
                             f"({self.recent_tokens})")

    @property
    def recent_tokens(self) -> int:
        if self.name == "streaming":
            return (self.budget or 0) - self.num_sinks
        return self.recent if self.recent is not None else (self.budget or 0) // 2

    @property
    def evicts(self) -> bool:
        return self.name != "full"

    def slots_per_sequence(self, max_tokens: int, max_prompt: int | None = None) -> int:
        """Cache slots one sequence needs for ``max_tokens`` tokens in all (prompt + new), of which
        a prompt is at most ``max_prompt`` (default ``max_tokens``). An evicting policy keeps
        ``budget + 1`` slots, but a prompt is written whole before it is cut to the budget."""
        max_prompt = max_tokens if max_prompt is None else max_prompt
        return max(min(max_tokens, self.budget + 1), max_prompt) if self.evicts else max_tokens

    def resident_blocks(self, block_size: int) -> int | None:
        """Blocks a sequence holds once its prompt is cut to the budget (None: no bound, ``full``)."""
        return -(-(self.budget + 1) // block_size) if self.evicts else None


def kept_slots(scores: torch.Tensor, positions: torch.Tensor, policy: CachePolicy, budget: int) -> torch.Tensor:
    """The slots a compaction to ``budget`` keeps, per kv head: of ``n`` cached slots with
    ``scores, positions [n, Hkv]``, the sinks, the last ``recent`` positions and (h2o) the best-scored
    others or (streaming) the newest others. Returns logical slots ``[budget, Hkv]``, sorted."""
    newest = positions.max(dim=0, keepdim=True).values
    sinks = positions < policy.num_sinks
    protected = sinks | (positions > newest - policy.recent_tokens)
    if policy.name == "h2o":
        rank = torch.where(protected, torch.full_like(scores, float("inf")), scores)
    else:
        rank = torch.where(sinks, torch.full_like(scores, float("inf")), positions.float())
    # best first; among equal ranks the newer is kept (the older goes, as in eviction)
    by_pos = torch.argsort(positions, dim=0, descending=True, stable=True)
    order = by_pos.gather(0, torch.argsort(rank.gather(0, by_pos), dim=0, descending=True, stable=True))
    return order[:budget].sort(dim=0).values


class PagedKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int = 16,
                 max_seqs: int = 8, max_blocks_per_seq: int | None = None, dtype=torch.float32, device="cpu",
                 policy: CachePolicy | None = None):
        if num_blocks < 1 or block_size < 1 or max_seqs < 1:
            raise ValueError("num_blocks, block_size and max_seqs must be >= 1")
        self.policy = policy or CachePolicy()
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_blocks, self.block_size, self.max_seqs = num_blocks, block_size, max_seqs
        self.max_blocks_per_seq = max_blocks_per_seq or num_blocks
        self.device = torch.device(device)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        # one tensor for all layers, so a step saves and restores its rows' scores in one copy each
        self._all_scores = torch.zeros(num_layers, *shape[:3], dtype=torch.float32, device=self.device)
        self.scores = list(self._all_scores.unbind(0))
        self.positions = [torch.zeros(shape[:3], dtype=torch.int32, device=self.device) for _ in range(num_layers)]
        self.block_tables = torch.zeros(max_seqs, self.max_blocks_per_seq, dtype=torch.int32, device=self.device)
        self.seq_lens = torch.zeros(max_seqs, dtype=torch.int32, device=self.device)  # what kernels read
        self.lengths = [0] * max_seqs  # the host's copy: bookkeeping never waits on the device
        self.next_slots = torch.zeros(num_layers, max_seqs, num_kv_heads, dtype=torch.int32, device=self.device)
        self.tokens_seen = [0] * max_seqs
        self._owned: list[list[int]] = [[] for _ in range(max_seqs)]
        self._active = [False] * max_seqs
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 is handed out first
        self._static: dict[str, torch.Tensor] | None = None
        self._step: _Step | None = None  # the decode step begun last
        self._prefill = None
        self._undo: _Undo | None = None
        self._num_heads_q: int | None = None  # learnt from the first decode: plans then size the splits

    # -- allocation -----------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def free_rows(self) -> int:
        """Sequences that can still be added."""
        return self._active.count(False)

    def blocks_of(self, seq: int) -> list[int]:
        return list(self._owned[seq])

    def add_sequence(self) -> int:
        for seq, active in enumerate(self._active):
            if not active:
                self._active[seq] = True
                self.tokens_seen[seq] = 0
                self._set_length(seq, 0)
                return seq
        raise BlockPoolExhausted(f"KV cache holds at most {self.max_seqs} sequences; all are in use")

    def release(self, seq: int) -> None:
        """Return a sequence's blocks to the pool."""
        self._check_seq(seq)
        self._undo = None
        self._free.extend(reversed(self._owned[seq]))
        self._owned[seq] = []
        self._active[seq] = False
        self._set_length(seq, 0)
        self.tokens_seen[seq] = 0

    def _set_length(self, seq: int, n: int) -> None:
        self.lengths[seq] = n
        self.seq_lens[seq] = n

    def _check_seq(self, seq: int) -> None:
        if not (0 <= seq < self.max_seqs and self._active[seq]):
            raise ValueError(f"sequence {seq} is not in the cache")

    def _blocks_needed(self, seq: int, slots: int) -> int:
        return max(0, -(-slots // self.block_size) - len(self._owned[seq]))

    def reserve(self, requests: dict[int, int]) -> None:
        """Make room for ``slots`` tokens in each ``seq``; all or nothing."""
        needed = {seq: self._blocks_needed(seq, slots) for seq, slots in requests.items()}
        for seq, slots in requests.items():
            self._check_seq(seq)
            if -(-slots // self.block_size) > self.max_blocks_per_seq:
                raise BlockPoolExhausted(f"sequence {seq} needs {slots} slots, more than a block table holds "
                                         f"({self.max_blocks_per_seq} blocks of {self.block_size})")
        total = sum(needed.values())
        if total > len(self._free):
            raise BlockPoolExhausted(
                f"KV block pool exhausted: {total} more blocks of {self.block_size} tokens needed, "
                f"{len(self._free)} of {self.num_blocks} free; sequences already cached are untouched")
        for seq, count in needed.items():
            for _ in range(count):
                block = self._free.pop()
                self.block_tables[seq, len(self._owned[seq])] = block
                self._owned[seq].append(block)

    def _shrink(self, seq: int, slots: int) -> None:
        keep = -(-slots // self.block_size)
        while len(self._owned[seq]) > keep:
            self._free.append(self._owned[seq].pop())

    # -- failed steps -----------------------------------------------------------------------------
    def _checkpoint(self, seqs: list[int], decode: bool) -> _Undo:
        seqs = list(seqs)
        undo = dict(seqs=seqs, owned=[list(self._owned[s]) for s in seqs], lengths=[self.lengths[s] for s in seqs],
                    tokens_seen=[self.tokens_seen[s] for s in seqs])
        if not decode:
            undo["free"] = list(self._free)
        else:
            undo["next_slots"] = self.next_slots.clone()
            if self.policy.evicts:  # the step adds attention mass to every slot its rows attend
                blocks = torch.tensor([b for s in seqs for b in self._owned[s]], dtype=torch.long, device=self.device)
                undo.update(score_blocks=blocks, scores=self._all_scores.index_select(1, blocks))
        return _Undo(**undo)

    def rollback(self) -> None:
        """Undo the step begun last (:meth:`begin_prefills` or :meth:`begin_decode_step`) when it, or
        the caller's use of its result, failed before another step began: its sequences get back
        their lengths, tokens seen, blocks (the ones the step took return to the pool), next write
        slots and H2O scores, so every later step reads exactly what it would have read had the
        failed step never begun. K/V the step wrote lie only in slots no later step reads before
        writing them again. Prefills are undone exactly for sequences that started empty (as
        :class:`~sinklora_ext.engine.PagedLlama` prefills them); a completed prefill, a release or
        a new step closes the step, and then this does nothing."""
        undo, self._undo = self._undo, None
        self._step = self._prefill = None
        if undo is None:
            return
        if undo.free is not None:  # a prefill, whose compaction may have returned blocks already
            self._free = list(undo.free)
        else:  # a decode step only takes blocks: they go back in the order they left
            for seq, owned in reversed(list(zip(undo.seqs, undo.owned))):
                self._free.extend(reversed(self._owned[seq][len(owned):]))
        for seq, owned in zip(undo.seqs, undo.owned):
            self._owned[seq] = list(owned)
        for seq, length, seen in zip(undo.seqs, undo.lengths, undo.tokens_seen):
            self.lengths[seq], self.tokens_seen[seq] = length, seen
        self.seq_lens.copy_(torch.tensor(self.lengths, dtype=torch.int32))
        if undo.next_slots is not None:
            self.next_slots.copy_(undo.next_slots)
        if undo.scores is not None:
            self._all_scores.index_copy_(1, undo.score_blocks, undo.scores)

    # -- prefill ----------------------------------------------------------------------------------
    def begin_prefill(self, seq: int, length: int) -> None:
        """Reserve ``length`` slots for a prompt (all layers); positions continue from tokens seen."""
        self.begin_prefills({seq: length})

    def begin_prefills(self, lengths: dict[int, int]) -> None:
        """Reserve slots for the prompts of several sequences at once, all or nothing; each layer's
        K/V then arrive packed in the order of ``lengths`` (:meth:`write_prefill`)."""
        self._undo = None
        for seq in lengths:
            self._check_seq(seq)
        self._undo = self._checkpoint(lengths, decode=False)
        self.reserve({seq: self.lengths[seq] + n for seq, n in lengths.items()})
        parts, slots, positions = [], [], []
        for seq, n in lengths.items():
            start = self.lengths[seq]
            logical = torch.arange(start, start + n, device=self.device, dtype=torch.int32)
            slots.append(physical_slots(self.block_tables[seq : seq + 1], logical[None], self.block_size)[0])
            positions.append(torch.arange(self.tokens_seen[seq], self.tokens_seen[seq] + n, dtype=torch.int32,
                                          device=self.device))
            parts.append((seq, start, n))
        slots = torch.cat(slots)[:, None].expand(-1, self.num_kv_heads).contiguous()
        # validated once for every layer's write
        self._prefill = (parts, slots, torch.cat(positions), plan_paged(self.k[0], slots=slots))

    def write_prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor | None = None) -> None:
        """Write one layer's prompt K/V ``[P, Hkv, D]`` (post-RoPE; several prompts packed) and
        their H2O scores ``[P, Hkv]``."""
        _, slots, positions, plan = self._prefill
        paged_write_(k, v, self.k[layer], self.v[layer], slots, self.scores[layer],
                     None if scores is None else scores.float().contiguous(), self.positions[layer], positions,
                     plan=plan)

    def finish_prefill(self) -> None:
        """After every layer was written: evict down to the budget and free whole blocks."""
        parts = self._prefill[0]
        budget = self.policy.budget
        for seq, start, length in parts:
            self._set_length(seq, start + length)
            self.tokens_seen[seq] += length
            if self.policy.evicts and start + length > budget:
                for layer in range(self.num_layers):
                    self._compact(layer, seq, budget)
                self._set_length(seq, budget)
                self._shrink(seq, budget + 1)
        self._prefill = self._undo = None

    def _compact(self, layer: int, seq: int, budget: int) -> None:
        n, bs, hkv = self.lengths[seq], self.block_size, self.num_kv_heads
        t = torch.arange(n, device=self.device)
        phys = self.block_tables[seq].long()[t // bs] * bs + t % bs  # [n]
        keep = kept_slots(self.scores[layer].view(-1, hkv)[phys], self.positions[layer].view(-1, hkv)[phys],
                          self.policy, budget)
        heads = torch.arange(hkv, device=self.device)[None, :].expand(budget, hkv)
        src, dst = phys[keep], phys[:budget, None].expand(budget, hkv)
        for cache in (self.k[layer], self.v[layer], self.scores[layer], self.positions[layer]):
            flat = cache.view(-1, hkv, *cache.shape[3:])
            flat[dst, heads] = flat[src, heads].clone()

    # -- decode -----------------------------------------------------------------------------------
    def begin_decode_step(self, seqs: list[int], static: bool = False) -> torch.Tensor:
        """Room and write slots for one new token per sequence, for every layer. Returns the new
        tokens' positions ``[B]`` (tokens seen so far, not cache length).

        ``static=True`` makes the step cover every cache row with the same tensors each time (rows
        not in ``seqs`` attend nothing and write nothing), so it can be captured in a CUDA graph;
        positions are then ``[max_seqs]``."""
        self._undo = None
        for seq in seqs:
            self._check_seq(seq)
        evicts, budget = self.policy.evicts, self.policy.budget
        growing = {seq: self.lengths[seq] + 1 for seq in seqs if not evicts or self.lengths[seq] <= budget}
        self._undo = self._checkpoint(seqs, decode=True)
        try:
            self.reserve(growing)
            return self._stage_decode_step(seqs, growing, static)
        except BaseException:
            self.rollback()
            raise

    def _stage_decode_step(self, seqs: list[int], growing: dict[int, int], static: bool) -> torch.Tensor:
        evicts, budget = self.policy.evicts, self.policy.budget
        if growing:  # the new token goes into the next slot of every layer and head
            rows = list(growing)
            slots = torch.tensor([self.lengths[s] for s in rows], dtype=torch.int32)
            self.next_slots[:, rows, :] = slots.to(self.device)[None, :, None]
            for seq in rows:
                self.lengths[seq] += 1
            self.seq_lens.copy_(torch.tensor(self.lengths, dtype=torch.int32))
        if static:
            positions = self._begin_static_step(seqs)
            for seq in seqs:
                self.tokens_seen[seq] += 1
            return positions
        idx = torch.tensor(seqs, device=self.device)
        positions = torch.tensor([self.tokens_seen[s] for s in seqs], dtype=torch.int32, device=self.device)
        lens = self.seq_lens[idx]
        tables = self.block_tables[idx]
        slots = self._write_slots(tables, idx)
        # what every layer of this step shares: rows, tables, lengths, write slots, who evicts, the plan
        self._step = _Step(idx, tables, lens, positions, lens > budget if evicts else None,
                           evicts and any(self.lengths[s] > budget for s in seqs), slots, self._plan(tables, lens, slots))
        for seq in seqs:
            self.tokens_seen[seq] += 1
        return positions

    def _begin_static_step(self, seqs: list[int]) -> torch.Tensor:
        if self._static is None:
            n = self.max_seqs
            self._static = dict(idx=torch.arange(n, device=self.device),
                                lens=torch.zeros(n, dtype=torch.int32, device=self.device),
                                positions=torch.zeros(n, dtype=torch.int32, device=self.device),
                                over=torch.zeros(n, dtype=torch.bool, device=self.device),
                                writes=torch.zeros(n, dtype=torch.bool, device=self.device),
                                slots=torch.zeros(self.num_layers, n, self.num_kv_heads, dtype=torch.int32,
                                                  device=self.device))
        buf = self._static
        writes = torch.zeros(self.max_seqs, dtype=torch.bool)
        writes[seqs] = True
        buf["writes"].copy_(writes)
        buf["lens"].copy_(torch.where(buf["writes"], self.seq_lens, 0))
        buf["positions"].copy_(torch.tensor(self.tokens_seen, dtype=torch.int32))
        if self.policy.evicts:
            buf["over"].copy_(buf["writes"] & (self.seq_lens > self.policy.budget))
        slots = self._write_slots(self.block_tables, buf["idx"])
        buf["slots"].copy_(torch.where(buf["writes"][None, :, None], slots, torch.full_like(slots, -1)))
        self._step = _Step(buf["idx"], self.block_tables, buf["lens"], buf["positions"],
                           buf["over"] if self.policy.evicts else None, self.policy.evicts, buf["slots"],
                           self._plan(self.block_tables, buf["lens"], buf["slots"]), buf["writes"])
        return buf["positions"]

    def _write_slots(self, tables: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Physical slots ``[L, B, Hkv]`` the step's new token takes in each layer and kv head."""
        logical = self.next_slots[:, idx].transpose(0, 1)  # [B, L, Hkv]
        return physical_slots(tables, logical, self.block_size).transpose(0, 1).contiguous()

    def _plan(self, tables: torch.Tensor, lens: torch.Tensor, slots: torch.Tensor) -> PagedPlan:
        return plan_paged(self.k[0], tables, lens, slots, self._num_heads_q)

    @property
    def step_plan(self) -> PagedPlan | None:
        """The plan of the decode step begun last (None before the first)."""
        return None if self._step is None else self._step.plan

    def decode_layer(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     softmax_scale: float | None = None) -> torch.Tensor:
        """Write the step's K/V ``[B, Hkv, D]``, attend ``q [B, Hq, D]`` over each sequence's cache
        (scores accumulate), then evict one key per head where the budget is exceeded."""
        step, plan = self._step, self._step.plan
        if self._num_heads_q is None:
            self._num_heads_q = q.shape[1]
        scores = self.scores[layer] if self.policy.evicts else None
        paged_write_(k, v, self.k[layer], self.v[layer], step.slots[layer], scores, None, self.positions[layer],
                     step.positions, plan=plan)
        out = paged_decode(q, self.k[layer], self.v[layer], step.tables, step.lens, softmax_scale, scores, plan=plan)
        if step.any_evicts:
            victims = select_evictions(self.scores[layer], self.positions[layer], step.tables, step.lens,
                                       self.policy.num_sinks, self.policy.recent_tokens, self.policy.name, plan=plan)
            current = self.next_slots[layer, step.idx]
            self.next_slots[layer, step.idx] = torch.where(step.over[:, None] & (victims >= 0), victims, current)
        return out

    # -- inspection -------------------------------------------------------------------------------
    def kept_positions(self, layer: int, seq: int) -> list[list[int]]:
        """Per kv head, the sorted positions of the tokens that stay after this step's eviction."""
        n, bs = self.lengths[seq], self.block_size
        t = torch.arange(n, device=self.device)
        phys = self.block_tables[seq].long()[t // bs] * bs + t % bs
        pos = self.positions[layer].view(-1, self.num_kv_heads)[phys]
        out = []
        for h in range(self.num_kv_heads):
            keep = torch.ones(n, dtype=torch.bool)
            if self.policy.evicts and n > self.policy.budget:
                keep[int(self.next_slots[layer, seq, h])] = False
            out.append(sorted(pos[keep.to(pos.device), h].tolist()))
        return out
