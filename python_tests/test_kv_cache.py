"""The paged KV cache with H2O / StreamingLLM eviction and the other scored rules (tova, decay, mean,
ema, snapkv-*), against a dense float64 simulation of each rule."""

import math

import pytest
import torch
from conftest import requires_cuda

from sinklora_ext import causal_prefill
from sinklora_ext.engine import PagedLlama
from sinklora_ext.kv_cache import SNAPKV_POOL, BlockPoolExhausted, CachePolicy, PagedKVCache
from sinklora_ext.reference import causal_column_scores_ref

HQ, HKV, D = 4, 2, 32
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def make_inputs(prompt_len, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt = [torch.randn(prompt_len, h, D, generator=g) for h in (HQ, HKV, HKV)]
    decode = [[torch.randn(h, D, generator=g) for h in (HQ, HKV, HKV)] for _ in range(steps)]
    return prompt, decode


class DenseH2O:
    """Dense float64 H2O (and every scored rule) of one attention layer over explicit per-kv-head
    token lists ``{position: [k, v, score]}``: the behaviour docs/paged_kv.md describes. A rule's
    score follows ``s <- decay * s + mass`` per query; ``mean`` / ``ema`` rank by the score over
    the (decayed) count of queries that saw the key; snapkv-* choose the prompt's keys by the
    pooled attention of its last queries."""

    def __init__(self, policy: CachePolicy, hq: int, hkv: int, scale: float, budget: int | None = None):
        self.policy, self.group, self.hkv, self.scale = policy, hq // hkv, hkv, scale
        self.budget = policy.budget if budget is None else budget  # a layer's own (pyramidkv)
        self.heads = [{} for _ in range(hkv)]

    def prefill(self, q, k, v, scores=None):
        """Causal attention of a prompt ``q [P, Hq, D]``, ``k, v [P, Hkv, D]`` → ``[P, Hq, D]``; the
        prompt's column scores (or ``scores [P, Hkv]``) rank it for the compaction to the budget."""
        q, k, v = q.double(), k.double(), v.double()
        p_len = q.shape[0]
        kk = k.repeat_interleave(self.group, dim=1)
        logits = torch.einsum("ihd,jhd->hij", q * self.scale, kk)
        causal = torch.ones(p_len, p_len, dtype=torch.bool).tril()
        prob = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)  # [Hq, P, P]
        out = torch.einsum("hij,jhd->ihd", prob, v.repeat_interleave(self.group, dim=1))
        decay = self.policy.decay_factor
        if scores is None:
            scores = causal_column_scores_ref(q[None], k[None], self.scale, decay=decay)[0]  # [P, Hkv]
        selection = None
        if self.policy.selection_window:
            window = causal_column_scores_ref(q[None], k[None], self.scale, window=self.policy.selection_window)[0]
            selection = torch.nn.functional.avg_pool1d(window.T[:, None], SNAPKV_POOL, 1, SNAPKV_POOL // 2,
                                                       count_include_pad=False)[:, 0].T  # [P, Hkv]
        for h in range(self.hkv):
            self.heads[h] = {pos: [k[pos, h], v[pos, h], float(scores[pos, h])] for pos in range(p_len)}
        if self.policy.evicts and p_len > self.budget:
            for h in range(self.hkv):
                sel = None if selection is None else selection[:, h]
                kept = self._keep_best(self.heads[h], p_len - 1, sel)
                self.heads[h] = {pos: self.heads[h][pos] for pos in kept}
        self._decay()
        return out

    def _rank(self, tokens, p, newest):
        policy = self.policy
        if policy.eviction_rank != "mean":
            return tokens[p][2]
        seen, decay = newest - p + 1, policy.decay_factor
        return tokens[p][2] / (seen if decay == 1.0 else (1 - decay**seen) / (1 - decay))

    def _decay(self):
        for tokens in self.heads:
            for entry in tokens.values():
                entry[2] *= self.policy.decay_factor

    def _keep_best(self, tokens, newest, selection=None):
        policy = self.policy
        protected = {p for p in tokens if p < policy.num_sinks or p > newest - policy.recent_tokens}
        if policy.scored:  # ties: the newer token is kept
            score = (lambda p: float(selection[p])) if selection is not None else \
                (lambda p: self._rank(tokens, p, newest))
            rank = {p: (math.inf if p in protected else score(p), p) for p in tokens}
        else:
            rank = {p: (math.inf if p < policy.num_sinks else p, p) for p in tokens}
        return set(sorted(tokens, key=lambda p: rank[p], reverse=True)[: self.budget])

    def step(self, pos, q, k, v):
        """The token at ``pos`` (``q [Hq, D]``, ``k, v [Hkv, D]``) attends the kept tokens and itself,
        scores accumulate, then each head over the budget evicts its lowest-scored unprotected token
        (the oldest among ties). → ``[Hq, D]``."""
        policy, out = self.policy, torch.zeros(q.shape, dtype=torch.float64)
        for h in range(self.hkv):
            tokens = self.heads[h]
            tokens[pos] = [k[h].double(), v[h].double(), 0.0]
            order = sorted(tokens)
            kk = torch.stack([tokens[p][0] for p in order])
            vv = torch.stack([tokens[p][1] for p in order])
            for qh in range(h * self.group, (h + 1) * self.group):
                prob = torch.softmax(kk @ q[qh].double() * self.scale, dim=0)
                out[qh] = prob @ vv
                for p, pr in zip(order, prob.tolist()):
                    tokens[p][2] += pr
            if policy.evicts and len(tokens) > self.budget:
                candidates = [p for p in tokens if policy.num_sinks <= p <= pos - policy.recent_tokens]
                victim = min(candidates, key=lambda p: (self._rank(tokens, p, pos) if policy.scored else 0.0, p))
                del tokens[victim]
        self._decay()
        return out

    def kept(self):
        return [sorted(tokens) for tokens in self.heads]


def simulate_h2o(prompt, decode, policy: CachePolicy, prompt_scores=None):
    """One layer of :class:`DenseH2O`: the prompt, then one token per decode step."""
    dense = DenseH2O(policy, HQ, HKV, D**-0.5)
    dense.prefill(*prompt, scores=prompt_scores)
    outputs, kept_sets = [], []
    for step, (qs, ks, vs) in enumerate(decode):
        outputs.append(dense.step(prompt[0].shape[0] + step, qs, ks, vs))
        kept_sets.append(dense.kept())
    return outputs, kept_sets


def run_cache(prompt, decode, policy, block_size=4, num_blocks=64, device="cpu", prompt_scores=None):
    cache = PagedKVCache(1, HKV, D, num_blocks, block_size, max_seqs=2, policy=policy, device=device)
    seq = cache.add_sequence()
    q, k, v = (t.to(device) for t in prompt)
    _, scores, selection = causal_prefill(q[None], k[None], v[None], score_decay=policy.decay_factor,
                                          selection_window=policy.selection_window or 1)
    cache.begin_prefill(seq, q.shape[0])
    cache.write_prefill(0, k, v, scores[0] if prompt_scores is None else prompt_scores.to(device),
                        selection[0] if policy.selection_window else None)
    cache.finish_prefill()
    outputs, kept = [], []
    for qs, ks, vs in decode:
        cache.begin_decode_step([seq])
        outputs.append(cache.decode_layer(0, qs[None].to(device), ks[None].to(device), vs[None].to(device))[0].cpu())
        kept.append(cache.kept_positions(0, seq))
    return cache, seq, outputs, kept


RULE_POLICIES = [CachePolicy(name, 12, 2, 4) for name in ("tova", "decay", "mean", "ema", "snapkv-h2o",
                                                          "snapkv-tova", "snapkv-mean", "snapkv-ema")] + [
    CachePolicy("decay", 10, 1, 3, score_decay=0.8), CachePolicy("ema", 10, 1, 3, score_decay=0.9)]


@pytest.mark.parametrize("policy", [CachePolicy("h2o", 12, 2, 4), CachePolicy("h2o", 9, 0, 0),
                                    CachePolicy("streaming", 10, 3), CachePolicy("h2o", 16, 4, 8), *RULE_POLICIES],
                         ids=lambda p: f"{p.name}-{p.budget}-{p.num_sinks}-{p.recent}-{p.score_decay}")
@pytest.mark.parametrize("prompt_len", [5, 23, 48])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_dense_h2o_simulation(policy, prompt_len, device):
    prompt, decode = make_inputs(prompt_len, 14, seed=prompt_len)
    ref_out, ref_kept = simulate_h2o(prompt, decode, policy)
    cache, seq, out, kept = run_cache(prompt, decode, policy, device=device)
    for step in range(len(decode)):
        assert kept[step] == ref_kept[step], f"step {step}"
        torch.testing.assert_close(out[step].double(), ref_out[step], rtol=1e-4, atol=1e-5)
        for h in range(HKV):  # exact budget per head, sinks and recent never evicted
            assert len(kept[step][h]) == min(prompt_len + step + 1, policy.budget)
            newest = prompt_len + step
            for p in range(min(policy.num_sinks, newest + 1)):
                assert p in kept[step][h]
            for p in range(max(0, newest - policy.recent_tokens + 1), newest + 1):
                assert p in kept[step][h]


@pytest.mark.parametrize("name", ["pyramidkv-h2o", "pyramidkv-ema"])
@pytest.mark.parametrize("prompt_lens", [(9, 30), (48, 5), (14, 14)])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_pyramid_layers_match_dense_simulation(name, prompt_lens, static, device):
    """pyramidkv: each layer holds its own budget (they sum to layers x budget, the first layer the
    most). Two sequences decode in one batch; in every layer, at every step, each one's kept sets
    and outputs equal the dense simulation of that layer at that layer's budget, and its blocks
    hold the largest layer's budget + 1."""
    layers, steps, policy = 4, 14, CachePolicy(name, 12, 2, 4)
    budgets = policy.layer_budgets(layers)
    assert budgets == (18, 14, 10, 6) and policy.peak_budget == 18
    cache = PagedKVCache(layers, HKV, D, 64, 4, max_seqs=3, policy=policy, device=device)
    seqs = [cache.add_sequence() for _ in prompt_lens]
    inputs = {(s, layer): make_inputs(n, steps, seed=10 * n + layer) for s, n in zip(seqs, prompt_lens)
              for layer in range(layers)}
    dense = {key: DenseH2O(policy, HQ, HKV, D**-0.5, budgets[key[1]]) for key in inputs}
    cache.begin_prefills(dict(zip(seqs, prompt_lens)))
    for layer in range(layers):
        packed = [[], [], [], []]
        for s in seqs:
            q, k, v = (t.to(device) for t in inputs[s, layer][0])
            _, scores, selection = causal_prefill(q[None], k[None], v[None], score_decay=policy.decay_factor,
                                                  selection_window=policy.selection_window)
            for part, t in zip(packed, (k, v, scores[0], selection[0])):
                part.append(t)
            dense[s, layer].prefill(*inputs[s, layer][0])
        cache.write_prefill(layer, *(torch.cat(part) for part in packed))
    cache.finish_prefill()
    for step in range(steps):
        cache.begin_decode_step(seqs, static=static)
        for layer in range(layers):
            rows = [inputs[s, layer][1][step] for s in seqs]
            q, k, v = (torch.stack([r[i] for r in rows]).to(device) for i in range(3))
            if static:  # every cache row takes part; the idle row's inputs are ignored
                q, k, v = (torch.cat([t, t[:1]]) for t in (q, k, v))
            out = cache.decode_layer(layer, q, k, v).cpu()
            for i, (s, n) in enumerate(zip(seqs, prompt_lens)):
                ref = dense[s, layer].step(n + step, *rows[i])
                kept = cache.kept_positions(layer, s)
                assert kept == dense[s, layer].kept(), f"step {step}, layer {layer}, seq {s}"
                assert all(len(head) == min(n + step + 1, budgets[layer]) for head in kept)
                torch.testing.assert_close(out[seqs.index(s)].double(), ref, rtol=1e-4, atol=1e-5)
    for s, n in zip(seqs, prompt_lens):  # every sequence here has seen more than the largest budget
        assert cache.lengths[s] == budgets[0] + 1 and len(cache.blocks_of(s)) == policy.resident_blocks(4)


def test_pyramid_budgets_sum_to_the_uniform_total():
    for budget, sinks, recent, layers in [(205, 4, None, 30), (512, 4, 50, 30), (12, 2, 4, 7), (64, 4, 8, 1)]:
        policy = CachePolicy("pyramidkv-ema", budget, sinks, recent)
        budgets = policy.layer_budgets(layers)
        assert sum(budgets) == layers * budget and list(budgets) == sorted(budgets, reverse=True)
        assert budgets[0] == policy.peak_budget or layers == 1
        assert min(budgets) >= sinks + policy.recent_tokens
    assert CachePolicy("snapkv-ema", 100).layer_budgets(3) == (100, 100, 100)
    assert CachePolicy("full").layer_budgets(3) is None


def test_budget_at_least_length_equals_full():
    prompt, decode = make_inputs(10, 6, seed=3)
    _, _, full_out, _ = run_cache(prompt, decode, CachePolicy("full"))
    _, _, h2o_out, kept = run_cache(prompt, decode, CachePolicy("h2o", 64, 4, 8))
    for a, b in zip(full_out, h2o_out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert kept[-1][0] == list(range(16))


def test_compaction_frees_blocks_and_release_returns_all():
    policy = CachePolicy("h2o", 8, 2, 2)
    prompt, decode = make_inputs(40, 3)
    cache, seq, _, _ = run_cache(prompt, decode, policy, block_size=4, num_blocks=32)
    assert int(cache.seq_lens[seq]) == policy.budget + 1
    assert len(cache.blocks_of(seq)) == math.ceil((policy.budget + 1) / 4)
    assert cache.free_blocks == 32 - len(cache.blocks_of(seq))
    cache.release(seq)
    assert cache.free_blocks == 32


def test_pool_exhaustion_leaves_resident_sequences_untouched():
    cache = PagedKVCache(2, HKV, D, num_blocks=6, block_size=4, max_seqs=3)
    a = cache.add_sequence()
    prompt, _ = make_inputs(10, 0)
    cache.begin_prefill(a, 10)
    for layer in range(2):
        cache.write_prefill(layer, prompt[1], prompt[2])
    cache.finish_prefill()
    before = ([t.clone() for t in cache.k], cache.block_tables.clone(), cache.seq_lens.clone(), cache.free_blocks)
    b = cache.add_sequence()
    with pytest.raises(BlockPoolExhausted, match="pool exhausted"):
        cache.begin_prefill(b, 20)
    assert all(torch.equal(x, y) for x, y in zip(before[0], cache.k))
    assert torch.equal(before[1], cache.block_tables) and torch.equal(before[2], cache.seq_lens)
    assert cache.free_blocks == before[3]
    cache.begin_prefill(b, 12)  # what fits still works
    assert cache.free_blocks == 0


@pytest.mark.parametrize("device", DEVICES)
def test_batch_of_different_lengths_equals_each_alone(device):
    policy = CachePolicy("h2o", 10, 2, 3)
    prompts = [[t.to(device) for t in make_inputs(n, 0, seed=n)[0]] for n in (3, 17)]
    steps = [[[t.to(device) for t in step] for step in make_inputs(1, 8, seed=100 + i)[1]] for i in range(2)]
    cache = PagedKVCache(1, HKV, D, 64, 4, max_seqs=2, policy=policy, device=device)
    seqs = []
    for prompt in prompts:
        seq = cache.add_sequence()
        _, scores = causal_prefill(prompt[0][None], prompt[1][None], prompt[2][None])
        cache.begin_prefill(seq, prompt[0].shape[0])
        cache.write_prefill(0, prompt[1], prompt[2], scores[0])
        cache.finish_prefill()
        seqs.append(seq)
    batched = []
    for t in range(8):
        cache.begin_decode_step(seqs)
        q = torch.stack([steps[i][t][0] for i in range(2)])
        k = torch.stack([steps[i][t][1] for i in range(2)])
        v = torch.stack([steps[i][t][2] for i in range(2)])
        batched.append(cache.decode_layer(0, q, k, v).cpu())
    for i in range(2):
        _, _, alone, _ = run_cache(prompts[i], steps[i], policy, device=device)
        for t in range(8):
            torch.testing.assert_close(batched[t][i], alone[t], rtol=1e-6, atol=1e-6)




@pytest.mark.parametrize("device", DEVICES)
def test_prefill_compaction_keeps_the_newer_of_tied_scores(device):
    """Tied prompt scores: the compaction keeps the newest of the tied tokens (as the decode-time
    eviction drops the oldest), then decoding goes on as in the dense simulation."""
    policy = CachePolicy("h2o", 6, 1, 2)  # protected: position 0 and the two newest
    prompt, decode = make_inputs(12, 5, seed=7)
    tied = torch.ones(12, HKV)  # head 0: all tied
    tied[:, 1] = torch.tensor([3.0, 1, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1])  # head 1: two 2s, then ties at 1
    cache = PagedKVCache(1, HKV, D, 16, 4, max_seqs=1, policy=policy, device=device)
    seq = cache.add_sequence()
    cache.begin_prefill(seq, 12)
    cache.write_prefill(0, prompt[1].to(device), prompt[2].to(device), tied.to(device))
    cache.finish_prefill()
    assert cache.kept_positions(0, seq) == [[0, 7, 8, 9, 10, 11], [0, 3, 6, 9, 10, 11]]
    ref_out, ref_kept = simulate_h2o(prompt, decode, policy, prompt_scores=tied)
    _, _, out, kept = run_cache(prompt, decode, policy, device=device, prompt_scores=tied)
    assert kept == ref_kept
    for step in range(len(decode)):
        torch.testing.assert_close(out[step].double(), ref_out[step], rtol=1e-5, atol=1e-6)


def test_cache_limits_and_unknown_sequences_are_clear_errors():
    cache = PagedKVCache(1, HKV, D, num_blocks=8, block_size=4, max_seqs=2, max_blocks_per_seq=2)
    a, b = cache.add_sequence(), cache.add_sequence()
    with pytest.raises(BlockPoolExhausted, match="at most 2 sequences; all are in use"):
        cache.add_sequence()
    with pytest.raises(BlockPoolExhausted, match=r"needs 9 slots, more than a block table holds \(2 blocks of 4\)"):
        cache.begin_prefill(a, 9)
    assert cache.free_blocks == 8 and cache.lengths == [0, 0] and cache.blocks_of(a) == []
    cache.begin_prefill(a, 8)  # exactly a full table
    cache.write_prefill(0, *make_inputs(8, 0)[0][1:])
    cache.finish_prefill()
    with pytest.raises(BlockPoolExhausted, match="more than a block table holds"):
        cache.begin_decode_step([a])  # the ninth token of a full policy does not fit the table
    cache.release(b)
    for call in (lambda: cache.begin_prefill(b, 2), lambda: cache.begin_decode_step([a, b]),
                 lambda: cache.release(b), lambda: cache.release(2), lambda: cache.begin_decode_step([-1])):
        with pytest.raises(ValueError, match=r"sequence -?\d is not in the cache"):
            call()
    assert cache.lengths == [8, 0] and cache.free_blocks == 6
    assert cache.add_sequence() == b  # a released row is handed out again


def test_policy_validation():
    with pytest.raises(ValueError, match="budget"):
        CachePolicy("h2o", 6, num_sinks=4, recent=4)
    with pytest.raises(ValueError, match="policy"):
        CachePolicy("lru", 8)
    with pytest.raises(ValueError, match="budget"):
        CachePolicy("streaming", None)
    with pytest.raises(ValueError, match="kv budget must be >= 1"):
        CachePolicy("h2o", 0)
    with pytest.raises(ValueError, match="num_sinks must be >= 0, got -1"):
        CachePolicy("h2o", 8, num_sinks=-1)
    with pytest.raises(ValueError, match="num_sinks must be >= 0, got -2"):
        CachePolicy("streaming", 8, num_sinks=-2)
    with pytest.raises(ValueError, match="recent must be >= 0, got -1"):
        CachePolicy("h2o", 8, recent=-1)
    with pytest.raises(ValueError, match=r"kv budget \(4\) must be >= sinks \(6\)"):
        CachePolicy("streaming", 4, num_sinks=6)
    assert CachePolicy("h2o", 10).recent_tokens == 5
    assert CachePolicy("streaming", 10, 4).recent_tokens == 6
    assert CachePolicy("full", None, num_sinks=-1).evicts is False  # full never reads them


def tiny_llama():
    """A random 2-layer GQA LLaMA with peaked attention (a wide init), so eviction choices are far
    from ties."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def dense_h2o_llama(model, prompt, steps, policy):
    """The model's logits for ``prompt`` then each of ``steps`` (teacher forced), in float64, with
    every layer's attention through :class:`DenseH2O`. Returns (logits per call, kept per step)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg, inner = model.config, model.model
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    budgets = policy.layer_budgets(len(inner.layers)) or [None] * len(inner.layers)
    layers = [DenseH2O(policy, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim**-0.5, budget)
              for budget in budgets]

    def forward(ids, start):
        hidden = inner.embed_tokens(ids)[None]
        cos, sin = inner.rotary_emb(hidden, torch.arange(start, start + len(ids))[None])
        for layer, dense in zip(inner.layers, layers):
            attn, x = layer.self_attn, layer.input_layernorm(hidden)
            q, k, v = (proj(x).view(1, len(ids), -1, head_dim).transpose(1, 2)
                       for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            q, k, v = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)  # [T, H, D]
            out = dense.prefill(q, k, v) if start == 0 else dense.step(start, q[0], k[0], v[0])[None]
            hidden = hidden + attn.o_proj(out.reshape(1, len(ids), -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return model.lm_head(inner.norm(hidden))[0]

    logits, kept = [forward(prompt, 0)], []
    for i, token in enumerate(steps):
        logits.append(forward(token[None], len(prompt) + i))
        kept.append([dense.kept() for dense in layers])
    return logits, kept


@pytest.mark.parametrize("policy", [CachePolicy("h2o", 10, 2, 3), CachePolicy("streaming", 8, 2),
                                    CachePolicy("tova", 10, 2, 3), CachePolicy("ema", 10, 2, 3, score_decay=0.9),
                                    CachePolicy("snapkv-mean", 10, 2, 3), CachePolicy("pyramidkv-ema", 10, 2, 3)],
                         ids=lambda p: p.name)
@pytest.mark.parametrize("prompt_len", [6, 19])
def test_model_decoding_matches_dense_h2o_simulation(policy, prompt_len):
    """The engine's paged prefill and decode steps of a whole model (every layer evicting on its own
    scores) against the float64 model whose attention is the dense H2O simulation: the same logits
    at every step and the same kept tokens in every layer and kv head."""
    import copy

    model = tiny_llama()
    g = torch.Generator().manual_seed(prompt_len)
    prompt, steps = torch.randint(0, 97, (prompt_len,), generator=g), torch.randint(0, 97, (10,), generator=g)
    ref_logits, ref_kept = dense_h2o_llama(copy.deepcopy(model).double(), prompt, steps, policy)
    runner = PagedLlama(model, PagedLlama.make_cache(model, policy, 32, 1, block_size=4))
    seq = runner.cache.add_sequence()
    logits = [runner.prefill(seq, prompt)]
    for i, token in enumerate(steps):
        logits.append(runner.decode([seq], token[None]))
        assert [runner.cache.kept_positions(layer, seq) for layer in range(2)] == ref_kept[i], f"step {i}"
    for i, (ours, ref) in enumerate(zip(logits, ref_logits)):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"call {i}: {m}")
