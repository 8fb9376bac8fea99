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

import math
from dataclasses import dataclass

import torch

from .paged import PagedPlan, causal_prefill, paged_decode, paged_write_, physical_slots, plan_paged, select_evictions

# Decode rules that rank keys by attention scores (docs/paged_kv.md, "Eviction policies"): the
# score decay per step and the rank the eviction kernel takes.
SCORE_RULES = {"h2o": (1.0, "h2o"), "tova": (0.0, "h2o"), "decay": (None, "h2o"), "mean": (1.0, "mean"),
               "ema": (None, "mean")}
DEFAULT_SCORE_DECAY = 0.99  # decay, ema: about the last 100 queries
SNAPKV_WINDOW, SNAPKV_POOL = 32, 7  # snapkv-*: the prompt's last queries that choose its keys; pooling width
PYRAMID_BETA = 20  # pyramidkv-*: the top layer keeps budget / beta (PyramidKV's default), at least sinks + recent
RECENT_CAP = 50  # the rules beyond H2O protect at most this many recent tokens by default (bench/RESULTS.md)
RECOMMENDED_POLICY = "ema"  # chosen by `sinklora bench kv-quality` (bench/RESULTS.md)
POLICIES = ("full", "h2o", "streaming", "tova", "decay", "mean", "ema", *(f"snapkv-{rule}" for rule in SCORE_RULES),
            *(f"pyramidkv-{rule}" for rule in SCORE_RULES))
_SELECTING = ("snapkv-", "pyramidkv-")  # prefixes of the policies whose prompt keys an observation window chooses


@dataclass(frozen=True)
class _Step:
    idx: torch.Tensor        # [B] cache rows of the stepping sequences
    tables: torch.Tensor     # [B, max_blocks_per_seq]
    lens: torch.Tensor       # [B] slots attended this step ([L, B] when the layers' budgets differ)
    positions: torch.Tensor  # [B] positions of the new tokens
    over: torch.Tensor | None  # [B] (or [L, B]) sequences past the budget (evict after attending)
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
    layer_lengths: torch.Tensor | None = None  # per-layer budgets: [L, max_seqs] on the host
    free: list[int] | None = None  # prefills: the free stack (their compaction returns blocks part way)
    next_slots: torch.Tensor | None = None  # decode steps: [layers, max_seqs, Hkv]
    score_blocks: torch.Tensor | None = None  # decode steps that accumulate scores: the blocks they attend
    scores: torch.Tensor | None = None  # and those blocks' scores [layers, blocks, block_size, Hkv]


class BlockPoolExhausted(MemoryError):
    """The block pool has no room for a request; the sequences already in the cache are untouched."""


def decode_rule(name: str) -> str:
    """The decode rule of a policy name: ``ema`` for ``snapkv-ema`` and ``pyramidkv-ema``."""
    for prefix in _SELECTING:
        name = name.removeprefix(prefix)
    return name


def takes_score_decay(name: str) -> bool:
    """Whether a policy's decay is the ``score_decay`` setting (``decay``, ``ema`` and their snapkv- and pyramidkv-)."""
    return SCORE_RULES.get(decode_rule(name), (1.0,))[0] is None


def default_recent(name: str, budget: int) -> int:
    """Recent tokens a policy protects unless told: half the budget for ``h2o`` (as H2O), at most
    :data:`RECENT_CAP` for the other scored rules (measured: a recent window of about 50 tokens
    serves the default model at every budget), the rest of the budget for ``streaming``."""
    if name == "streaming":
        raise ValueError("streaming keeps budget - sinks recent tokens")
    return budget // 2 if name == "h2o" else min(budget // 2, RECENT_CAP)


@dataclass(frozen=True)
class CachePolicy:
    """``full`` never evicts; ``h2o`` keeps sinks + recent + heavy hitters; ``streaming`` keeps
    sinks + the most recent tokens. ``budget`` counts tokens per (sequence, layer, kv head).

    The other scored rules differ from ``h2o`` only in the score a key is ranked by: ``tova`` the
    current step's attention mass alone, ``decay`` the mass decayed by ``score_decay`` per query
    (default 0.99), ``mean`` the mass per query that has seen the key, ``ema`` the decayed mass
    over the decayed count of those queries (an exponentially weighted mean). ``snapkv-<rule>`` chooses
    the prompt's keys by the attention of its last 32 queries (pooled over 7 positions), then
    decodes under ``<rule>``. ``pyramidkv-<rule>`` is ``snapkv-<rule>`` with PyramidKV's budgets across
    layers: the first layer keeps the most, the last the least (``budget / 20``, at least sinks + recent),
    linearly in between, ``budget`` per layer on average (:meth:`layer_budgets`)."""

    name: str = "full"
    budget: int | None = None
    num_sinks: int = 4
    recent: int | None = None
    score_decay: float | None = None

    def __post_init__(self):
        if self.name not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.name!r}")
        if self.score_decay is not None:
            if not takes_score_decay(self.name):
                raise ValueError(f"score_decay applies to the decay and ema policies only, not {self.name!r}")
            if not 0.0 < self.score_decay < 1.0:
                raise ValueError(f"score_decay must be in (0, 1), got {self.score_decay}")
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
    def rule(self) -> str:
        """The decode rule: ``full``, ``streaming`` or one of :data:`SCORE_RULES`."""
        return decode_rule(self.name)

    @property
    def scored(self) -> bool:
        """Keys are ranked by attention scores (every policy but ``full`` and ``streaming``)."""
        return self.rule in SCORE_RULES

    @property
    def decay_factor(self) -> float:
        """Scores are multiplied by this after each step (1: accumulate, 0: the step's mass alone)."""
        if not self.scored:
            return 1.0
        decay = SCORE_RULES[self.rule][0]
        return decay if decay is not None else (self.score_decay or DEFAULT_SCORE_DECAY)

    @property
    def eviction_rank(self) -> str:
        """The rank of :func:`~sinklora_ext.paged.select_evictions`: ``h2o``, ``mean`` or ``streaming``."""
        return SCORE_RULES[self.rule][1] if self.scored else "streaming"

    @property
    def selection_window(self) -> int:
        """Prompt queries whose attention chooses the prompt's keys (0: the rule's own scores)."""
        return SNAPKV_WINDOW if self.name.startswith(_SELECTING) else 0

    @property
    def pyramid(self) -> bool:
        """The layers keep different budgets (:meth:`layer_budgets`)."""
        return self.name.startswith("pyramidkv-")

    def layer_budgets(self, num_layers: int) -> tuple[int, ...] | None:
        """Tokens each layer keeps per (sequence, kv head); they sum to ``num_layers * budget``. The
        pyramidkv policies step linearly from :attr:`peak_budget` (layer 0) down to
        ``max(budget // 20, sinks + recent)`` (the last layer); every other policy keeps ``budget``
        in every layer. None for ``full``."""
        if not self.evicts:
            return None
        if not self.pyramid or num_layers == 1:
            return (self.budget,) * num_layers
        low, high = self._pyramid_floor, self.peak_budget
        exact = [high - (high - low) * layer / (num_layers - 1) for layer in range(num_layers)]
        budgets = [math.floor(x) for x in exact]
        short = num_layers * self.budget - sum(budgets)  # the rounding, given to the largest remainders
        for layer in sorted(range(num_layers), key=lambda i: budgets[i] - exact[i])[:short]:
            budgets[layer] += 1
        return tuple(budgets)

    @property
    def _pyramid_floor(self) -> int:
        return max(self.budget // PYRAMID_BETA, self.num_sinks + self.recent_tokens)

    @property
    def peak_budget(self) -> int | None:
        """The most tokens any layer keeps: ``budget``, or for pyramidkv ``2 * budget - `` the last
        layer's budget (a sequence holds blocks for this many in every layer). None for ``full``."""
        if not self.evicts:
            return None
        return 2 * self.budget - self._pyramid_floor if self.pyramid else self.budget

    @property
    def recent_tokens(self) -> int:
        if self.name == "streaming":
            return (self.budget or 0) - self.num_sinks
        return self.recent if self.recent is not None else default_recent(self.name, self.budget or 0)

    @property
    def evicts(self) -> bool:
        return self.name != "full"

    def slots_per_sequence(self, max_tokens: int, max_prompt: int | None = None) -> int:
        """Cache slots one sequence needs for ``max_tokens`` tokens in all (prompt + new), of which
        a prompt is at most ``max_prompt`` (default ``max_tokens``). An evicting policy keeps
        ``peak_budget + 1`` slots, but a prompt is written whole before it is cut to the budget."""
        max_prompt = max_tokens if max_prompt is None else max_prompt
        return max(min(max_tokens, self.peak_budget + 1), max_prompt) if self.evicts else max_tokens

    def resident_blocks(self, block_size: int) -> int | None:
        """Blocks a sequence holds once its prompt is cut to the budget (None: no bound, ``full``)."""
        return -(-(self.peak_budget + 1) // block_size) if self.evicts else None


def pooled_selection(selection: torch.Tensor, positions: torch.Tensor, width: int = SNAPKV_POOL) -> torch.Tensor:
    """SnapKV's pooling: each key's window score averaged with its neighbours in position order
    (``width`` positions, fewer at the ends), per kv head. ``selection, positions [n, Hkv]``."""
    order = positions.argsort(dim=0)
    s = selection.gather(0, order).T[:, None].float()  # [Hkv, 1, n]
    pooled = torch.nn.functional.avg_pool1d(s, width, 1, width // 2, count_include_pad=False)[:, 0].T
    return torch.empty_like(pooled).scatter_(0, order, pooled)


def seen_weight(seen: torch.Tensor, decay: float) -> torch.Tensor:
    """What the ``mean`` rank divides a key's score by: the (decayed) count of the ``seen`` queries
    that have attended it, ``seen`` or ``(1 - decay ** seen) / (1 - decay)``."""
    return seen if decay == 1.0 else (1 - torch.tensor(decay, dtype=seen.dtype) ** seen) / (1 - decay)


def kept_slots(scores: torch.Tensor, positions: torch.Tensor, policy: CachePolicy, budget: int,
               selection: torch.Tensor | None = None) -> torch.Tensor:
    """The slots a compaction to ``budget`` keeps, per kv head: of ``n`` cached slots with
    ``scores, positions [n, Hkv]``, the sinks, the last ``recent`` positions and the best-ranked
    others (:attr:`CachePolicy.eviction_rank`; ``mean`` divides by the queries that saw the key) or
    (streaming) the newest others. ``selection [n, Hkv]`` (snapkv policies: the observation
    window's scores) replaces the rank, pooled. Returns logical slots ``[budget, Hkv]``, sorted."""
    newest = positions.max(dim=0, keepdim=True).values
    sinks = positions < policy.num_sinks
    protected = sinks | (positions > newest - policy.recent_tokens)
    if policy.scored:
        if selection is not None:
            rank = pooled_selection(selection, positions)
        elif policy.eviction_rank == "mean":
            rank = scores / seen_weight((newest - positions + 1).float(), policy.decay_factor)
        else:
            rank = scores
        rank = torch.where(protected, torch.full_like(rank, float("inf")), rank)
    else:
        rank = torch.where(sinks, torch.full_like(scores, float("inf")), positions.float())
    # best first; among equal ranks the newer is kept (the older goes, as in eviction)
    by_pos = torch.argsort(positions, dim=0, descending=True, stable=True)
    order = by_pos.gather(0, torch.argsort(rank.gather(0, by_pos), dim=0, descending=True, stable=True))
    return order[:budget].sort(dim=0).values


def prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None,
                     policy: CachePolicy, cu_seqlens: torch.Tensor | None = None, max_seqlen: int = 0):
    """Causal attention over prompts (``[B, N, H, D]``, or packed with ``cu_seqlens``) and what
    ``policy`` keeps of them: ``(out, scores, selection)``, the scores weighted by its decay (None
    when it ranks none) and the snapkv policies' observation-window scores (else None)."""
    result = causal_prefill(q, k, v, softmax_scale, policy.scored, cu_seqlens, max_seqlen,
                            score_decay=policy.decay_factor, selection_window=policy.selection_window)
    return result if len(result) == 3 else (*result, None)


def decayed_scores(scores: torch.Tensor, decay: float) -> torch.Tensor:
    """``scores * decay`` with denormals flushed to 0, as the eviction kernel decays them."""
    out = scores * decay
    return torch.where(out.abs() < torch.finfo(torch.float32).tiny, torch.zeros_like(out), out)


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
        # per-layer budgets (pyramidkv): each layer's length per sequence, on the host; ``lengths``
        # is then the longest layer's (the slots the sequence's blocks hold)
        self.layer_budgets = self.policy.layer_budgets(num_layers)
        per_layer = self.layer_budgets is not None and len(set(self.layer_budgets)) > 1
        self._layer_lengths = torch.zeros(num_layers, max_seqs, dtype=torch.int32) if per_layer else None
        if per_layer:
            self._budget_column = torch.tensor(self.layer_budgets, dtype=torch.int32)[:, None]  # [L, 1], host
            self._budget_column_device = self._budget_column.to(self.device)  # what each step's `over` compares
        self._owned: list[list[int]] = [[] for _ in range(max_seqs)]
        self._active = [False] * max_seqs
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 is handed out first
        self._static: dict[str, torch.Tensor] | None = None
        self._step: _Step | None = None  # the decode step begun last
        self._prefill = None
        self._selection: list[torch.Tensor | None] | None = None  # snapkv: a prefill's window scores per layer
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
        if self._layer_lengths is not None:
            self._layer_lengths[:, seq] = n

    def _set_layer_lengths(self, seq: int, lengths: list[int]) -> None:
        if self._layer_lengths is None:
            self._set_length(seq, lengths[0])
            return
        self._layer_lengths[:, seq] = torch.tensor(lengths, dtype=torch.int32)
        self.lengths[seq] = max(lengths)
        self.seq_lens[seq] = self.lengths[seq]

    def layer_length(self, layer: int, seq: int) -> int:
        """Slots the sequence holds in ``layer`` (its length, unless the layers' budgets differ)."""
        return self.lengths[seq] if self._layer_lengths is None else int(self._layer_lengths[layer, seq])

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
        if self._layer_lengths is not None:
            undo["layer_lengths"] = self._layer_lengths.clone()
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
        if undo.layer_lengths is not None:
            self._layer_lengths.copy_(undo.layer_lengths)
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
            # each layer continues after its own slots ([L, n]; one row when the layers agree)
            starts = [self.lengths[seq]] if self._layer_lengths is None else self._layer_lengths[:, seq].tolist()
            logical = torch.stack([torch.arange(s, s + n, dtype=torch.int32) for s in starts]).to(self.device)
            slots.append(physical_slots(self.block_tables[seq : seq + 1], logical[None], self.block_size)[0])
            positions.append(torch.arange(self.tokens_seen[seq], self.tokens_seen[seq] + n, dtype=torch.int32,
                                          device=self.device))
            parts.append((seq, self.lengths[seq], n))
        slots = torch.cat(slots, dim=1)[..., None].expand(-1, -1, self.num_kv_heads)
        slots = (slots[0] if self._layer_lengths is None else slots).contiguous()  # [P, Hkv] or [L, P, Hkv]
        # validated once for every layer's write
        self._prefill = (parts, slots, torch.cat(positions), plan_paged(self.k[0], slots=slots))
        self._selection = [None] * self.num_layers

    def write_prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor | None = None,
                      selection: torch.Tensor | None = None) -> None:
        """Write one layer's prompt K/V ``[P, Hkv, D]`` (post-RoPE; several prompts packed) and
        their scores ``[P, Hkv]`` (the column sums weighted by the policy's decay:
        :func:`~sinklora_ext.paged.causal_prefill`); ``selection [P, Hkv]``, the snapkv policies'
        observation-window scores, chooses the keys the compaction keeps."""
        _, slots, positions, plan = self._prefill
        slots = slots[layer] if slots.dim() == 3 else slots
        paged_write_(k, v, self.k[layer], self.v[layer], slots, self.scores[layer],
                     None if scores is None else scores.float().contiguous(), self.positions[layer], positions,
                     plan=plan)
        self._selection[layer] = selection

    def finish_prefill(self) -> None:
        """After every layer was written: evict down to the budget and free whole blocks."""
        parts = self._prefill[0]
        budgets, decay = self.layer_budgets, self.policy.decay_factor
        row = 0
        for seq, start, length in parts:
            ends = [self.layer_length(layer, seq) + length for layer in range(self.num_layers)]
            self._set_layer_lengths(seq, ends)
            self.tokens_seen[seq] += length
            if budgets is not None and any(n > b for n, b in zip(ends, budgets)):
                for layer, budget in enumerate(budgets):
                    if ends[layer] <= budget:
                        continue
                    selection = self._selection[layer]
                    if selection is not None and start == 0:
                        selection = selection[row : row + length]
                    else:
                        selection = None
                    self._compact(layer, seq, budget, selection)
                    ends[layer] = budget
                self._set_layer_lengths(seq, ends)
                self._shrink(seq, self.lengths[seq] + 1)
            if decay != 1.0:  # the prompt's scores decay once before the first decode step adds its mass
                for layer in range(self.num_layers):
                    phys = self._physical(seq, layer)
                    flat = self.scores[layer].view(-1, self.num_kv_heads)
                    flat[phys] = decayed_scores(flat[phys], decay)
            row += length
        self._prefill = self._undo = None
        self._selection = None

    def _physical(self, seq: int, layer: int = 0) -> torch.Tensor:
        """Physical slot ids of the sequence's slots ``0 .. length - 1`` in ``layer``."""
        t = torch.arange(self.layer_length(layer, seq), device=self.device)
        return self.block_tables[seq].long()[t // self.block_size] * self.block_size + t % self.block_size

    def _compact(self, layer: int, seq: int, budget: int, selection: torch.Tensor | None = None) -> None:
        hkv = self.num_kv_heads
        phys = self._physical(seq, layer)  # [n]
        keep = kept_slots(self.scores[layer].view(-1, hkv)[phys], self.positions[layer].view(-1, hkv)[phys],
                          self.policy, budget, selection)
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
        evicts, peak = self.policy.evicts, self.policy.peak_budget
        growing = {seq: self.lengths[seq] + 1 for seq in seqs if not evicts or self.lengths[seq] <= peak}
        self._undo = self._checkpoint(seqs, decode=True)
        try:
            self.reserve(growing)
            return self._stage_decode_step(seqs, growing, static)
        except BaseException:
            self.rollback()
            raise

    def _stage_decode_step(self, seqs: list[int], growing: dict[int, int], static: bool) -> torch.Tensor:
        evicts, budget = self.policy.evicts, self.policy.budget
        if self._layer_lengths is not None:
            return self._stage_layered_decode_step(seqs, static)
        if growing:  # the new token goes into the next slot of every layer and head
            rows = list(growing)
            slots = torch.tensor([self.lengths[s] for s in rows], dtype=torch.int32)
            self.next_slots[:, rows, :] = slots.to(self.device)[None, :, None]
            for seq in rows:
                self.lengths[seq] += 1
            self.seq_lens.copy_(torch.tensor(self.lengths, dtype=torch.int32))
        if static:
            positions = self._begin_static_step(seqs, self.seq_lens, budget)
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

    def _stage_layered_decode_step(self, seqs: list[int], static: bool) -> torch.Tensor:
        """:meth:`_stage_decode_step` when the layers' budgets differ: each layer takes the new token
        in its next slot until it holds its own budget, then in the slot its heads freed."""
        rows = torch.tensor(seqs, dtype=torch.long)
        before = self._layer_lengths[:, rows]  # [L, B]
        grows = before <= self._budget_column
        if bool(grows.any()):
            dev_rows = rows.to(self.device)
            fresh = before.to(self.device)[..., None].expand(-1, -1, self.num_kv_heads)
            self.next_slots[:, dev_rows] = torch.where(grows.to(self.device)[..., None], fresh,
                                                       self.next_slots[:, dev_rows])
        after = before + grows
        self._layer_lengths[:, rows] = after
        for i, seq in enumerate(seqs):
            self.lengths[seq] = int(after[:, i].max())
        self.seq_lens.copy_(torch.tensor(self.lengths, dtype=torch.int32))
        if static:
            positions = self._begin_static_step(seqs, self._layer_lengths.to(self.device),
                                                self._budget_column_device)
        else:
            idx = torch.tensor(seqs, device=self.device)
            positions = torch.tensor([self.tokens_seen[s] for s in seqs], dtype=torch.int32, device=self.device)
            lens = after.to(self.device)
            tables = self.block_tables[idx]
            slots = self._write_slots(tables, idx)
            self._step = _Step(idx, tables, lens, positions, lens > self._budget_column_device,
                               bool((after > self._budget_column).any()), slots, self._plan(tables, lens, slots))
        for seq in seqs:
            self.tokens_seen[seq] += 1
        return positions

    def _begin_static_step(self, seqs: list[int], seq_lens: torch.Tensor, budget) -> torch.Tensor:
        """The static step's tensors; ``seq_lens [max_seqs]`` (or per layer ``[L, max_seqs]``, with
        ``budget`` a column of the layers' budgets) are every row's lengths."""
        if self._static is None:
            n, shape = self.max_seqs, seq_lens.shape
            self._static = dict(idx=torch.arange(n, device=self.device),
                                lens=torch.zeros(shape, dtype=torch.int32, device=self.device),
                                positions=torch.zeros(n, dtype=torch.int32, device=self.device),
                                over=torch.zeros(shape, dtype=torch.bool, device=self.device),
                                writes=torch.zeros(n, dtype=torch.bool, device=self.device),
                                slots=torch.zeros(self.num_layers, n, self.num_kv_heads, dtype=torch.int32,
                                                  device=self.device))
        buf = self._static
        writes = torch.zeros(self.max_seqs, dtype=torch.bool)
        writes[seqs] = True
        buf["writes"].copy_(writes)
        buf["lens"].copy_(torch.where(buf["writes"], seq_lens, 0))
        buf["positions"].copy_(torch.tensor(self.tokens_seen, dtype=torch.int32))
        if self.policy.evicts:
            buf["over"].copy_(buf["writes"] & (seq_lens > budget))
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
        policy = self.policy
        scores = self.scores[layer] if policy.scored else None
        lens, over = (step.lens, step.over) if step.lens.dim() == 1 else (step.lens[layer], step.over[layer])
        paged_write_(k, v, self.k[layer], self.v[layer], step.slots[layer], scores, None, self.positions[layer],
                     step.positions, plan=plan)
        out = paged_decode(q, self.k[layer], self.v[layer], step.tables, lens, softmax_scale, scores, plan=plan)
        # a decaying rule decays every step, also while a sequence is under its budget
        if step.any_evicts or policy.decay_factor != 1.0:
            victims = select_evictions(self.scores[layer], self.positions[layer], step.tables, lens,
                                       policy.num_sinks, policy.recent_tokens, policy.eviction_rank,
                                       policy.decay_factor, plan=plan)
        if step.any_evicts:
            current = self.next_slots[layer, step.idx]
            self.next_slots[layer, step.idx] = torch.where(over[:, None] & (victims >= 0), victims, current)
        return out

    # -- inspection -------------------------------------------------------------------------------
    def kept_positions(self, layer: int, seq: int) -> list[list[int]]:
        """Per kv head, the sorted positions of the tokens that stay after this step's eviction."""
        n, bs = self.layer_length(layer, seq), self.block_size
        t = torch.arange(n, device=self.device)
        phys = self.block_tables[seq].long()[t // bs] * bs + t % bs
        pos = self.positions[layer].view(-1, self.num_kv_heads)[phys]
        out = []
        for h in range(self.num_kv_heads):
            keep = torch.ones(n, dtype=torch.bool)
            if self.policy.evicts and n > self.layer_budgets[layer]:
                keep[int(self.next_slots[layer, seq, h])] = False
            out.append(sorted(pos[keep.to(pos.device), h].tolist()))
        return out
