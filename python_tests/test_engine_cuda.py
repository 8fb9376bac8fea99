"""The decode engine on a GPU (skips without CUDA): a small random LLaMA in float32, against
transformers on the same device; static steps captured in a CUDA graph against dynamic steps."""

import copy

import pytest
import torch
from conftest import requires_cuda

from sinklora_ext.engine import DecodeEngine, PagedLlama, Request, StaticDecoder
from sinklora_ext.kv_cache import CachePolicy

pytestmark = requires_cuda


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # a wide initialisation makes the logits peaked, so greedy choices are not near-ties
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                      initializer_range=0.2, attn_implementation="sdpa")
    torch.backends.cuda.matmul.allow_tf32 = False
    model = LlamaForCausalLM(cfg).cuda().eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early on token 2
    return model


def prompts(n, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 512, (length,), generator=g).tolist() for length in lengths[:n]]


def test_full_policy_matches_transformers_on_cuda(model):
    (prompt,) = prompts(1, [77])
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    cache = PagedLlama.make_cache(model, CachePolicy("full"), 128, block_size=16)
    runner = PagedLlama(model, cache)
    seq = cache.add_sequence()
    logits = [runner.prefill(seq, ids[0])[-1]]
    tokens = [int(logits[-1].argmax())]
    for _ in range(11):
        logits.append(runner.decode([seq], torch.tensor(tokens[-1:], device="cuda"))[0])
        tokens.append(int(logits[-1].argmax()))
    assert tokens == ref.sequences[0, ids.shape[1]:].tolist()
    for ours, theirs in zip(logits, ref.logits):
        torch.testing.assert_close(ours, theirs[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("policy", [CachePolicy("full"), CachePolicy("h2o", 24, 2, 8), CachePolicy("streaming", 24, 4)])
def test_cuda_graph_steps_equal_dynamic_steps(model, policy):
    """Requests of different lengths joining and leaving: graph replays decode exactly like eager
    per-active-row steps."""
    reqs = prompts(3, [5, 40, 70], seed=1)
    outputs = []
    for static in (False, True):
        engine = DecodeEngine(model, policy, max_seqs=2, max_tokens=128, block_size=16, static=static)
        outputs.append([r.output_ids for r in engine.run([Request(p, n) for p, n in zip(reqs, (20, 6, 12))])])
        if static:
            assert engine.decode.graph is not None  # the step was captured and replayed
    assert outputs[0] == outputs[1]


def test_cuda_graph_replay_follows_growing_lengths(model):
    """One captured graph serves every later step: lengths and tables change between replays."""
    policy = CachePolicy("h2o", 32, 2, 8)
    cache = PagedLlama.make_cache(model, policy, 64, max_seqs=2, block_size=16)
    runner = PagedLlama(model, cache)
    eager_cache = PagedLlama.make_cache(model, policy, 64, max_seqs=2, block_size=16)
    eager = PagedLlama(model, eager_cache)
    decoder = StaticDecoder(runner)
    seqs, eager_seqs, tokens = [], [], []
    for p in prompts(2, [9, 50], seed=2):
        seqs.append(s := cache.add_sequence())
        eager_seqs.append(e := eager_cache.add_sequence())
        ids = torch.tensor(p, device="cuda")
        runner.prefill(s, ids)
        tokens.append(int(eager.prefill(e, ids)[-1].argmax()))
    tokens = torch.tensor(tokens, device="cuda")
    for _ in range(40):  # past the budget for both sequences
        graph_logits = decoder(seqs, tokens)
        eager_logits = eager.decode(eager_seqs, tokens)
        torch.testing.assert_close(graph_logits, eager_logits, rtol=1e-5, atol=1e-5)
        tokens = eager_logits.argmax(-1)
    assert cache.lengths == eager_cache.lengths == [policy.budget + 1] * 2


def test_bf16_engine_runs_and_keeps_the_budget(model):
    bf16 = copy.deepcopy(model).to(torch.bfloat16)  # the shared fp32 model keeps its weights
    engine = DecodeEngine(bf16, CachePolicy("h2o", 32, 4), max_seqs=2, max_tokens=128, static=True)
    done = engine.run([Request(p, 16) for p in prompts(2, [100, 20], seed=3)])
    assert all(len(r.output_ids) == 16 for r in done)
    assert engine.cache.free_blocks == engine.cache.num_blocks  # all released


@pytest.mark.parametrize("policy", [CachePolicy("full"), CachePolicy("h2o", 24, 2, 8)])
def test_decode_layers_never_wait_for_the_device(model, policy):
    """Inside a step (every layer's write, attention, eviction) nothing synchronises with the GPU:
    the step's plan (made by begin_decode_step, one sync) validated its tables, lengths and write
    slots for every layer, so the ops check only that they are given the planned tensors."""
    cache = PagedLlama.make_cache(model, policy, 128, max_seqs=2, block_size=16)
    runner = PagedLlama(model, cache)
    seqs = []
    for p in prompts(2, [40, 9], seed=4):
        seqs.append(s := cache.add_sequence())
        runner.prefill(s, torch.tensor(p, device="cuda"))
    tokens = torch.tensor([1, 2], device="cuda")
    for _ in range(3):
        positions = cache.begin_decode_step(seqs)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            logits = runner.decode_rows(tokens, positions)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        tokens = logits.argmax(-1)
