"""The decode engine and its paged KV cache under load and faults (issue 10, item 3).

A soak drives one :class:`DecodeEngine` per policy through thousands of events: requests of random
prompt lengths arrive at random times (often more than the pool holds, so arrivals are refused
again and again), leave when they reach their length or stop token or are cancelled, and faults are
injected in the middle of steps (a layer's forward, the attention kernels, the cache writes, the
eviction of a decode step or of a prefill, the LM head). After every event the allocator's
invariants hold, every head keeps its policy's budget exactly, and every resident request's logits
and greedy tokens equal those of the same prompt decoded alone in a fresh engine.

``SINKLORA_SOAK_STEPS`` runs longer soaks (CI runs 1000 steps per policy).
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sinklora_ext import kv_cache as kv_cache_module
from sinklora_ext.engine import DecodeEngine, Request
from sinklora_ext.hf.cache import generate_with_policy
from sinklora_ext.kv_cache import BlockPoolExhausted, CachePolicy

SOAK_STEPS = max(1000, int(os.environ.get("SINKLORA_SOAK_STEPS", "1000")))  # fewer would not reach every fault site
BLOCK = 4
MAX_SEQS = 5
MAX_PROMPT = 40
MAX_NEW = 40
LOGIT_ATOL = 1e-5  # batched and alone differ by ~2e-7 here (CPU GEMMs sum in another order for other batch sizes)
TIE = 10 * LOGIT_ATOL  # a reference whose best two tokens are this close may pick either

POLICIES = {
    "full": CachePolicy("full"),
    "h2o": CachePolicy("h2o", 12, 2, 4),
    "streaming": CachePolicy("streaming", 10, 3),
    "pyramidkv-h2o": CachePolicy("pyramidkv-h2o", 12, 2, 4),  # layer budgets 18 and 6
}
# small pools: a full-policy sequence grows to 20 blocks, an evicting one holds 3-4 after its prompt
# (pyramidkv-h2o: 5, for its first layer's 18)
NUM_BLOCKS = {"full": 24, "h2o": 18, "streaming": 15, "pyramidkv-h2o": 24}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model's matrices are tiny: threads only add overhead on the two CI cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
                      pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


class Recorder:
    """Keeps the logits of the engine's last prefill or decode step (what it sampled from)."""

    def __init__(self, engine: DecodeEngine):
        self.logits = None
        prefill_batch, decode = engine.runner.prefill_batch, engine.decode

        def recorded_prefill(*args, **kwargs):
            out = prefill_batch(*args, **kwargs)
            self.logits = torch.cat([rows[-1:] for rows in out])
            return out

        def recorded_decode(seqs, tokens):
            self.logits = decode(seqs, tokens)
            return self.logits

        engine.runner.prefill_batch, engine.decode = recorded_prefill, recorded_decode


@dataclass
class Reference:
    tokens: list[int]
    logits: torch.Tensor  # [max_new, vocab]


def decode_alone(model, policy: CachePolicy, prompt: list[int], max_new: int = MAX_NEW) -> Reference:
    engine = DecodeEngine(model, policy, max_seqs=1, max_tokens=len(prompt) + max_new, block_size=BLOCK)
    recorder, req = Recorder(engine), Request(prompt, max_new)
    engine.admit([req])
    logits = [recorder.logits[0]]
    while engine.active:
        engine.step()
        logits.append(recorder.logits[0])
    return Reference(req.output_ids, torch.stack(logits))


def prompt_bank(rng: random.Random, policy: CachePolicy) -> list[list[int]]:
    """Prompts of random lengths, plus the edges: one token, a block, the budget and one past it, the longest."""
    edges = [1, BLOCK, MAX_PROMPT] + ([policy.budget, policy.budget + 1, policy.peak_budget + 1] if policy.evicts
                                      else [BLOCK + 1])
    lengths = edges + [rng.randint(1, MAX_PROMPT) for _ in range(7)]
    return [[rng.randrange(97) for _ in range(n)] for n in lengths]


class InjectedFault(RuntimeError):
    pass


class FaultSites:
    """Wraps functions the engine calls inside a step; :meth:`arm` makes one raise on its ``k``-th
    call from now, once."""

    def __init__(self, monkeypatch, engine: DecodeEngine, policy: CachePolicy):
        layers = engine.runner.model.layers
        sites = {
            "layer forward (last layer's MLP)": (layers[-1].mlp, "forward"),
            "prefill attention": (kv_cache_module, "causal_prefill"),
            "paged decode kernel": (kv_cache_module, "paged_decode"),
            "cache write": (kv_cache_module, "paged_write_"),
            "LM head": (engine.runner.lm_head, "forward"),
        }
        if policy.evicts:
            sites["decode eviction"] = (kv_cache_module, "select_evictions")
            sites["prefill eviction (compaction)"] = (engine.cache, "_compact")
        self.countdown: dict[str, int | None] = dict.fromkeys(sites)
        self.fired = Counter()
        for name, (target, attr) in sites.items():
            monkeypatch.setattr(target, attr, self._wrap(name, getattr(target, attr)))

    def _wrap(self, name, fn):
        def maybe_raise(*args, **kwargs):
            if self.countdown[name] is not None:
                self.countdown[name] -= 1
                if self.countdown[name] == 0:
                    self.countdown[name] = None
                    self.fired[name] += 1
                    raise InjectedFault(name)
            return fn(*args, **kwargs)

        return maybe_raise

    def arm(self, name: str, k: int) -> None:
        self.countdown[name] = k

    @property
    def armed(self) -> bool:
        return any(c is not None for c in self.countdown.values())


def bookkeeping(cache) -> tuple:
    layers = [[cache.layer_length(layer, s) for layer in range(cache.num_layers)] for s in range(cache.max_seqs)]
    return (list(cache._free), [list(o) for o in cache._owned], list(cache._active), (list(cache.lengths), layers),
            list(cache.tokens_seen), cache.seq_lens.tolist(), cache.next_slots.clone(),
            [cache.block_tables[s, : len(o)].tolist() for s, o in enumerate(cache._owned)])


def readable(cache) -> list[torch.Tensor]:
    """Per active sequence and layer: K, V, score and position of every slot a later step reads (the
    slot each head's next token overwrites is not read)."""
    bs, hkv, policy = cache.block_size, cache.num_kv_heads, cache.policy
    out = []
    for seq in range(cache.max_seqs):
        if not cache._active[seq] or cache.lengths[seq] == 0:
            continue
        for layer in range(cache.num_layers):
            n = cache.layer_length(layer, seq)
            t = torch.arange(n)
            phys = cache.block_tables[seq].long()[t // bs] * bs + t % bs
            mask = torch.ones(n, hkv, dtype=torch.bool)
            if policy.evicts and n > cache.layer_budgets[layer]:
                mask[cache.next_slots[layer, seq].long(), torch.arange(hkv)] = False
            for store in (cache.k[layer], cache.v[layer], cache.scores[layer], cache.positions[layer]):
                out.append(store.view(-1, *store.shape[2:])[phys][mask])
    return out


def everything(cache) -> list[torch.Tensor]:
    return [t.clone() for t in (*cache.k, *cache.v, *cache.positions, cache._all_scores)]


def assert_same(before: list[torch.Tensor], after: list[torch.Tensor], what: str) -> None:
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after)), what


def assert_bookkeeping_same(before: tuple, after: tuple, what: str) -> None:
    assert before[:6] == after[:6] and torch.equal(before[6], after[6]) and before[7] == after[7], what


def kept_positions(cache, seq: int, layer: int) -> torch.Tensor:
    """Sorted positions each kv head of ``seq`` keeps in ``layer`` after its step: ``[kept, Hkv]``."""
    n, bs, policy = cache.layer_length(layer, seq), cache.block_size, cache.policy
    t = torch.arange(n)
    phys = cache.block_tables[seq].long()[t // bs] * bs + t % bs
    pos = cache.positions[layer].view(-1, cache.num_kv_heads)[phys]  # [n, Hkv]
    if policy.evicts and n > cache.layer_budgets[layer]:  # the slot the next token of each head overwrites is gone
        pos.scatter_(0, cache.next_slots[layer, seq, None, :].long(), -1)
        return pos.sort(dim=0).values[1:]
    return pos.sort(dim=0).values


def check_invariants(engine: DecodeEngine, decoded: dict[Request, bool]) -> None:
    """Allocator: every block free or owned by exactly one sequence, tables list the owned blocks,
    lengths within the blocks and the table; policy: every layer's length and every head's kept
    positions exact (pyramidkv: at that layer's budget)."""
    cache, policy, bs = engine.cache, engine.cache.policy, engine.cache.block_size
    owned = [b for blocks in cache._owned for b in blocks]
    assert sorted(cache._free + owned) == list(range(cache.num_blocks)), "a block is lost or owned twice"
    assert cache.seq_lens.tolist() == cache.lengths
    rows = [r.seq for r in engine.active]
    assert sorted(rows) == [s for s in range(cache.max_seqs) if cache._active[s]], "rows and requests disagree"
    for seq in range(cache.max_seqs):
        if seq not in rows:
            assert cache._owned[seq] == [] and cache.lengths[seq] == 0, f"row {seq} is free but holds blocks"
    for req in engine.active:
        seq, blocks = req.seq, cache._owned[req.seq]
        assert cache.block_tables[seq, : len(blocks)].tolist() == blocks
        assert len(blocks) <= cache.max_blocks_per_seq
        seen = len(req.prompt_ids) + len(req.output_ids) - 1
        assert cache.tokens_seen[seq] == seen
        length = cache.lengths[seq]
        if not policy.evicts:
            assert length == seen and len(blocks) == math.ceil(length / bs)
        else:
            peak = policy.peak_budget
            assert length == min(seen, peak + 1 if decoded[req] else peak)
            assert len(blocks) == math.ceil((length if seen <= peak else peak + 1) / bs)
        for layer in range(cache.num_layers):
            budget = cache.layer_budgets[layer] if policy.evicts else None
            kept = kept_positions(cache, seq, layer)
            if policy.evicts:
                assert cache.layer_length(layer, seq) == min(seen, budget + 1 if decoded[req] else budget)
            if not policy.evicts or seen <= budget:
                expected = torch.arange(seen)
            elif policy.name == "streaming":
                expected = torch.cat([torch.arange(policy.num_sinks), torch.arange(seen - policy.recent_tokens, seen)])
            else:  # h2o: the budget of distinct positions seen, sinks and the recent ones among them
                assert kept.shape[0] == budget and (kept.diff(dim=0) > 0).all() and (kept < seen).all()
                assert (kept[: policy.num_sinks] == torch.arange(policy.num_sinks)[:, None]).all()
                recent = torch.arange(seen - policy.recent_tokens, seen)[:, None]
                assert (kept[kept.shape[0] - policy.recent_tokens :] == recent).all(), f"seq {seq}: {kept}"
                continue
            assert torch.equal(kept, expected[:, None].expand_as(kept).to(kept.dtype)), f"seq {seq}: {kept}"


class Soak:
    def __init__(self, model, name: str, seed: int, monkeypatch, static: bool = False):
        self.rng = random.Random(seed)
        self.policy = POLICIES[name]
        self.bank = prompt_bank(self.rng, self.policy)
        self.refs = [decode_alone(model, self.policy, p) for p in self.bank]  # before any fault is installed
        self.engine = DecodeEngine(model, self.policy, max_seqs=MAX_SEQS, max_tokens=MAX_PROMPT + MAX_NEW,
                                   block_size=BLOCK, num_blocks=NUM_BLOCKS[name], static=static)
        self.recorder = Recorder(self.engine)
        self.faults = FaultSites(monkeypatch, self.engine, self.policy)
        self.origin: dict[Request, int] = {}  # its prompt in the bank
        self.decoded: dict[Request, bool] = {}  # had a decode step
        self.compared: dict[Request, bool] = {}  # still on its reference's tokens
        self.stats = Counter()

    def new_request(self) -> Request:
        b = self.rng.randrange(len(self.bank))
        ref = self.refs[b].tokens
        stop = (ref[self.rng.randrange(MAX_NEW)],) if self.rng.random() < 0.3 else ()
        req = Request(list(self.bank[b]), self.rng.randint(1, MAX_NEW), stop_ids=stop)
        self.origin[req], self.decoded[req], self.compared[req] = b, False, True
        return req

    def check_outputs(self, requests: list[Request], logits: torch.Tensor) -> None:
        for req, row in zip(requests, logits):
            if not self.compared[req]:
                continue
            ref, i = self.refs[self.origin[req]], len(req.output_ids) - 1
            err = (row - ref.logits[i]).abs().max().item()
            assert err <= LOGIT_ATOL, f"token {i} of prompt {self.origin[req]}: logits differ by {err:.2e}"
            token = req.output_ids[-1]
            if token != ref.tokens[i]:  # a tie in float32: from here on the request follows other tokens
                assert ref.logits[i].max() - ref.logits[i][token] <= TIE, f"token {i}: {token} != {ref.tokens[i]}"
                self.compared[req] = False
                self.stats["ties"] += 1
            stops = token in req.stop_ids or len(req.output_ids) == req.max_new_tokens
            assert req.done == stops

    def arrive(self) -> None:
        batch = [self.new_request() for _ in range(self.rng.choice((1, 1, 2, 3)))]
        books, tensors = bookkeeping(self.engine.cache), everything(self.engine.cache)
        readable_before = readable(self.engine.cache) if self.faults.armed else None
        try:
            self.engine.admit(batch)
        except BlockPoolExhausted as e:
            assert "KV block pool exhausted" in str(e) or "sequences; all are in use" in str(e), str(e)
            assert_bookkeeping_same(books, bookkeeping(self.engine.cache), "a refused arrival changed the cache")
            assert_same(tensors, everything(self.engine.cache), "a refused arrival wrote into the cache")
            self.stats["arrivals refused"] += 1
        except InjectedFault:
            assert_bookkeeping_same(books, bookkeeping(self.engine.cache), "a failed prefill changed the cache")
            assert_same(readable_before, readable(self.engine.cache), "a failed prefill changed what others read")
            assert all(r.seq is None and not r.output_ids for r in batch)
            self.stats["faults in prefill"] += 1
        else:
            self.check_outputs(batch, self.recorder.logits)
            self.stats["admitted"] += len(batch)

    def decode(self) -> None:
        requests, armed = list(self.engine.active), self.faults.armed
        books = bookkeeping(self.engine.cache)
        before = readable(self.engine.cache) if armed else everything(self.engine.cache)
        outputs = [list(r.output_ids) for r in requests]
        try:
            self.engine.step()
        except (BlockPoolExhausted, InjectedFault) as e:
            assert_bookkeeping_same(books, bookkeeping(self.engine.cache), f"a failed step changed the cache ({e})")
            after = readable(self.engine.cache) if armed else everything(self.engine.cache)
            assert_same(before, after, f"a failed step changed what is read ({e})")
            assert [r.output_ids for r in requests] == outputs
            assert self.engine.active == requests
            if isinstance(e, BlockPoolExhausted):  # preempt the request holding the most blocks, then go on
                assert "KV block pool exhausted" in str(e)
                self.engine.cancel(max(requests, key=lambda r: len(self.engine.cache.blocks_of(r.seq))))
                self.stats["steps refused, preempted"] += 1
            else:
                self.stats["faults in decode"] += 1
        else:
            for req in requests:
                self.decoded[req] = True
            self.check_outputs(requests, self.recorder.logits)
            self.stats["decode steps"] += 1

    def run(self, steps: int) -> Counter:
        sites = list(self.faults.countdown)
        for _ in range(steps):
            if self.rng.random() < 0.4:
                self.arrive()
                check_invariants(self.engine, self.decoded)
            if self.engine.active and self.rng.random() < 0.03:
                self.engine.cancel(self.rng.choice(self.engine.active))
                self.stats["cancelled"] += 1
                check_invariants(self.engine, self.decoded)
            if not self.faults.armed and self.rng.random() < 0.06:
                self.faults.arm(self.rng.choice(sites), self.rng.randint(1, 4))
            if self.engine.active:
                self.decode()
                check_invariants(self.engine, self.decoded)
        while self.engine.active:
            self.engine.cancel(self.engine.active[0])
        assert self.engine.cache.free_blocks == self.engine.cache.num_blocks
        self.stats.update({f"fault: {k}": v for k, v in self.faults.fired.items()})
        return self.stats


@pytest.mark.parametrize("name", list(POLICIES))
def test_soak_random_arrivals_exhaustion_and_faults(model, name, monkeypatch):
    stats = Soak(model, name, seed=len(name), monkeypatch=monkeypatch).run(SOAK_STEPS)
    print(name, dict(stats))
    assert stats["decode steps"] >= SOAK_STEPS // 2
    assert stats["arrivals refused"] >= SOAK_STEPS // 50, "the pool was not driven to exhaustion often"
    assert stats["faults in decode"] >= 5 and stats["faults in prefill"] >= 2
    for site in ("layer forward (last layer's MLP)", "paged decode kernel", "cache write", "prefill attention"):
        assert stats[f"fault: {site}"] >= 1, f"no fault was injected in the {site}"
    if name == "full":
        assert stats["steps refused, preempted"] >= 3, "decode growth never exhausted the pool"
    else:
        assert stats["fault: decode eviction"] >= 1 and stats["fault: prefill eviction (compaction)"] >= 1
    assert stats["ties"] <= 2


def test_soak_static_steps(model, monkeypatch):
    """Fixed-shape steps over every row (the CUDA-graph path) under the same load and faults."""
    stats = Soak(model, "h2o", seed=7, monkeypatch=monkeypatch, static=True).run(SOAK_STEPS // 4)
    assert stats["decode steps"] >= 25 and stats["faults in decode"] >= 1 and stats["arrivals refused"] >= 1


def test_run_waits_for_room_and_equals_each_alone(model):
    """``run`` with more requests than rows and blocks: they wait for room (none is refused), and
    each decodes exactly as alone."""
    rng = random.Random(3)
    for name, policy in POLICIES.items():
        prompts = [[rng.randrange(97) for _ in range(rng.randint(1, MAX_PROMPT))] for _ in range(8)]
        lengths = [rng.randint(1, 24) for _ in prompts]
        engine = DecodeEngine(model, policy, max_seqs=3, max_tokens=MAX_PROMPT + 24, block_size=BLOCK,
                              num_blocks=NUM_BLOCKS[name])
        done = engine.run([Request(p, n) for p, n in zip(prompts, lengths)])
        assert len(done) == len(prompts) and engine.cache.free_blocks == engine.cache.num_blocks
        for req in done:
            assert req.output_ids == decode_alone(model, policy, req.prompt_ids, req.max_new_tokens).tokens, name


def test_run_that_raises_cancels_its_requests(model, monkeypatch):
    engine = DecodeEngine(model, POLICIES["h2o"], max_seqs=2, max_tokens=64, block_size=BLOCK)
    evict, calls = kv_cache_module.select_evictions, Counter()

    def failing_eviction(*args, **kwargs):
        calls["evict"] += 1
        if calls["evict"] == 7:
            raise InjectedFault("eviction")
        return evict(*args, **kwargs)

    monkeypatch.setattr(kv_cache_module, "select_evictions", failing_eviction)
    with pytest.raises(InjectedFault):
        engine.run([Request(list(range(30)), 20), Request(list(range(5, 20)), 20)])
    assert not engine.active and engine.cache.free_blocks == engine.cache.num_blocks
    (req,) = engine.run([Request(list(range(30)), 5)])  # the engine still works
    assert req.output_ids == decode_alone(model, POLICIES["h2o"], list(range(30)), 5).tokens


def test_fault_in_the_compaction_of_a_packed_prefill_restores_the_pool(model, monkeypatch):
    """Two prompts over the budget prefilled together: the first is compacted (its spare blocks go back
    to the pool), then the second's compaction raises. Pool, tables and the resident sequence are
    exactly as before, and it decodes on as alone."""
    policy = POLICIES["h2o"]
    engine = DecodeEngine(model, policy, max_seqs=3, max_tokens=MAX_PROMPT, block_size=BLOCK)
    resident = Request(list(range(30)), 20)
    engine.admit([resident])
    for _ in range(3):
        engine.step()
    compact, calls = engine.cache._compact, Counter()

    def compaction_failing_on_the_second_prompt(*args):
        calls["compact"] += 1
        if calls["compact"] == engine.cache.num_layers + 1:
            raise InjectedFault("compaction")
        return compact(*args)

    monkeypatch.setattr(engine.cache, "_compact", compaction_failing_on_the_second_prompt)
    books, before = bookkeeping(engine.cache), readable(engine.cache)
    with pytest.raises(InjectedFault):
        engine.admit([Request(list(range(40, 70)), 5), Request(list(range(60, 95)), 5)])
    assert_bookkeeping_same(books, bookkeeping(engine.cache), "the failed prefill changed the pool")
    assert_same(before, readable(engine.cache), "the failed prefill changed what the resident reads")
    check_invariants(engine, {resident: True})
    while engine.active:
        engine.step()
    assert resident.output_ids == decode_alone(model, policy, resident.prompt_ids, 20).tokens


def test_admit_and_cancel_refuse_requests_they_do_not_own(model):
    engine = DecodeEngine(model, POLICIES["h2o"], max_seqs=3, max_tokens=64, block_size=BLOCK)
    req = Request([3, 1, 4, 1, 5], 8)
    with pytest.raises(ValueError, match="admit takes new requests, each once"):
        engine.admit([req, req])
    engine.admit([req])
    with pytest.raises(ValueError, match="admit takes new requests, each once"):
        engine.admit([req])  # active: a second row would leak the first
    engine.cancel(req)
    with pytest.raises(ValueError, match="cancel takes an active request"):
        engine.cancel(req)
    assert not engine.active and engine.cache.free_blocks == engine.cache.num_blocks and engine.cache.free_rows == 3


def test_sampling_and_streaming_faults(model, monkeypatch):
    """NaN logits make sampling raise: the admission or step is undone (cache and random generator)
    and runs again as if it had never failed. An ``on_token`` that raises finds its step complete."""
    prompts = [[5, 7, 11, 13, 2, 3], list(range(20, 37))]

    def sampled_requests():
        return [Request(p, 12, temperature=0.8, top_p=0.9) for p in prompts]

    expected = sampled_requests()
    DecodeEngine(model, POLICIES["h2o"], max_seqs=2, max_tokens=64, block_size=BLOCK, seed=5).run(expected)
    engine = DecodeEngine(model, POLICIES["h2o"], max_seqs=2, max_tokens=64, block_size=BLOCK, seed=5)
    lm_head, calls = model.lm_head.forward, Counter()

    def nan_logits_twice(hidden):
        calls["lm_head"] += 1
        logits = lm_head(hidden)
        return logits.fill_(float("nan")) if calls["lm_head"] in (1, 4) else logits

    monkeypatch.setattr(model.lm_head, "forward", nan_logits_twice)
    requests, streamed, failed = sampled_requests(), [], Counter()
    with pytest.raises(RuntimeError):
        engine.admit(requests)
    assert not engine.active and engine.cache.free_blocks == engine.cache.num_blocks
    engine.admit(requests)

    def stream(req, token):
        streamed.append(token)
        if len(streamed) == 5:
            raise InjectedFault("on_token")

    while engine.active:
        books, outputs = bookkeeping(engine.cache), [list(r.output_ids) for r in requests]
        try:
            engine.step(stream)
        except InjectedFault:
            assert [len(r.output_ids) for r in requests] == [len(o) + 1 for o in outputs]  # complete
            failed["on_token"] += 1
        except RuntimeError:
            assert_bookkeeping_same(books, bookkeeping(engine.cache), "a failed sampling left the step")
            assert [r.output_ids for r in requests] == outputs
            failed["sampling"] += 1
        check_invariants(engine, dict.fromkeys(requests, True))
    assert failed == {"on_token": 1, "sampling": 1}
    assert [r.output_ids for r in requests] == [r.output_ids for r in expected]


@pytest.mark.parametrize("name", list(POLICIES))
def test_transformers_generate_with_paged_cache_random_lengths(model, name):
    """``PagedH2OCache`` under ``model.generate`` over prompts of random lengths: the tokens and logits
    of the engine decoding each alone."""
    rng, policy = random.Random(11), POLICIES[name]
    for prompt in prompt_bank(rng, policy)[::2]:
        ref = decode_alone(model, policy, prompt, 12)
        ids = torch.tensor([prompt])  # token 0 is the pad token: the mask says it is not padding here
        out = generate_with_policy(model, ids, policy, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                   do_sample=False, output_logits=True, return_dict_in_generate=True)
        assert out.sequences[0, len(prompt):].tolist() == ref.tokens
        torch.testing.assert_close(torch.cat(out.logits), ref.logits, rtol=0, atol=LOGIT_ATOL)
