"""Paged decoding of the real default model: engine, eval-kv, generate."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from sinklora_ext import cli
from sinklora_ext.data import debian_text_file, tokenize_file
from sinklora_ext.engine import DecodeEngine, PagedLlama, Request, teacher_forced_nll
from sinklora_ext.kv_cache import BlockPoolExhausted, CachePolicy
from sinklora_ext.models import load_model


@pytest.fixture(scope="module")
def model_and_tokenizer():
    model, tokenizer = load_model(device="cpu")
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def text_ids(model_and_tokenizer):
    return tokenize_file(model_and_tokenizer[1], debian_text_file())


def test_full_policy_reproduces_transformers_greedy_decoding(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer("The Debian project is").input_ids
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    ref_tokens = ref.sequences[0, len(prompt):].tolist()
    cache = PagedLlama.make_cache(model, CachePolicy("full"), 64, block_size=8)
    runner = PagedLlama(model, cache)
    seq = cache.add_sequence()
    logits = [runner.prefill(seq, torch.tensor(prompt))[-1]]
    tokens = [int(logits[-1].argmax())]
    for _ in range(15):
        logits.append(runner.decode([seq], torch.tensor(tokens[-1:]))[0])
        tokens.append(int(logits[-1].argmax()))
    assert tokens == ref_tokens
    for ours, theirs in zip(logits, ref.logits):
        torch.testing.assert_close(ours, theirs[0], rtol=1e-4, atol=1e-3)


def test_batch_of_different_prompts_equals_each_alone(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer(t).input_ids for t in ("To install a package, run", "APT is", "The kernel of Debian")]
    policy = CachePolicy("h2o", 12, 2, 4)

    def run(prompt_list, max_seqs):
        engine = DecodeEngine(model, policy, max_seqs=max_seqs, max_tokens=32, block_size=4)
        return {tuple(r.prompt_ids): r.output_ids for r in engine.run([Request(p, 10) for p in prompt_list])}

    together = run(prompts, 3)
    for p in prompts:
        assert together[tuple(p)] == run([p], 1)[tuple(p)]


def test_batched_prefill_equals_each_prompt_alone(model_and_tokenizer):
    """Prompts of different lengths packed into one prefill (varlen attention and prefill scores):
    each prompt's logits, kept keys and next step as when it is prefilled alone."""
    model, tokenizer = model_and_tokenizer
    prompts = [torch.tensor(tokenizer(t).input_ids) for t in ("APT is", "The kernel of Debian is a", "dpkg")]
    policy = CachePolicy("h2o", 5, 1, 2)  # the longer prompts are compacted at the end of the prefill

    def runner_for(max_seqs):
        cache = PagedLlama.make_cache(model, policy, 32, max_seqs=max_seqs, block_size=4)
        return PagedLlama(model, cache), cache

    runner, cache = runner_for(3)
    seqs = [cache.add_sequence() for _ in prompts]
    together = runner.prefill_batch(seqs, prompts)
    kept = [[cache.kept_positions(layer, seq) for layer in (0, 29)] for seq in seqs]
    step = runner.decode(seqs, torch.tensor([11, 12, 13]))
    for i, prompt in enumerate(prompts):
        alone_runner, alone_cache = runner_for(1)
        s = alone_cache.add_sequence()
        torch.testing.assert_close(together[i], alone_runner.prefill(s, prompt), rtol=1e-4, atol=1e-4)
        assert kept[i] == [alone_cache.kept_positions(layer, s) for layer in (0, 29)]
        torch.testing.assert_close(step[i], alone_runner.decode([s], torch.tensor([11 + i]))[0], rtol=1e-4, atol=1e-4)
    runner, cache = runner_for(3)
    last = runner.prefill_batch([cache.add_sequence()], prompts[1:2], last_only=True)
    torch.testing.assert_close(last[0], together[1][-1:], rtol=1e-4, atol=1e-4)


def test_engine_rejects_an_empty_prompt_and_keeps_the_cache_clean(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = DecodeEngine(model, CachePolicy("h2o", 8, 2), max_seqs=2, max_tokens=32)
    with pytest.raises(ValueError, match="non-empty prompt"):
        engine.run([Request(tokenizer("APT is").input_ids, 2), Request([], 2)])
    assert engine.cache.free_blocks == engine.cache.num_blocks and not any(engine.cache._active)
    (req,) = engine.run([Request(tokenizer("APT is").input_ids, 3)])  # still usable
    assert len(req.output_ids) == 3


def test_engine_pool_exhaustion_is_clear_and_keeps_others(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = DecodeEngine(model, CachePolicy("full"), max_seqs=3, max_tokens=64, block_size=8, num_blocks=5)
    runner, cache = engine.runner, engine.cache
    a = cache.add_sequence()
    prompt = torch.tensor(tokenizer("Debian is a free operating system").input_ids)
    runner.prefill(a, prompt)
    snapshot = (cache.block_tables[a].clone(), int(cache.seq_lens[a]), [t.clone() for t in cache.k[:2]])
    b = cache.add_sequence()
    with pytest.raises(BlockPoolExhausted, match="pool"):
        runner.prefill(b, torch.arange(40))
    c, free = cache.add_sequence(), cache.free_blocks
    with pytest.raises(BlockPoolExhausted, match="pool"):  # each prompt fits, the two together do not
        runner.prefill_batch([b, c], [torch.arange(20), torch.arange(20)])
    assert cache.free_blocks == free and cache.lengths[b] == cache.lengths[c] == 0
    assert torch.equal(cache.block_tables[a], snapshot[0]) and int(cache.seq_lens[a]) == snapshot[1]
    assert all(torch.equal(x, y) for x, y in zip(cache.k[:2], snapshot[2]))
    assert runner.decode([a], prompt[-1:]).shape[0] == 1  # the resident sequence still decodes


def test_eval_kv_full_equals_dense_teacher_forced_ppl(model_and_tokenizer, text_ids):
    model, _ = model_and_tokenizer
    ids = text_ids[:200]
    nll, _ = teacher_forced_nll(model, ids, CachePolicy("full"), prefill=64, progress=False)
    with torch.no_grad():
        dense = F.cross_entropy(model(ids[None]).logits[0, :-1].float(), ids[1:])
    assert math.exp(nll.mean()) == pytest.approx(math.exp(dense), rel=5e-3)


def test_h2o_beats_streaming_at_quarter_budget(model_and_tokenizer, text_ids):
    model, _ = model_and_tokenizer
    ids = text_ids[:384]
    ppl = {}
    for name in ("h2o", "streaming"):
        nll, stats = teacher_forced_nll(model, ids, CachePolicy(name, 96, 4), prefill=96, progress=False)
        ppl[name] = math.exp(nll.mean())
        assert stats["kv_slots"] == 97 and stats["kv_blocks"] == math.ceil(97 / 16)
    assert ppl["h2o"] < ppl["streaming"]


def test_cli_eval_kv_and_generate(capsys):
    args = cli.build_parser().parse_args(["eval-kv", "--text", "debian-reference", "--context", "96", "--policy",
                                          "streaming", "--kv-budget", "32", "--json", "--no-progress"])
    args.func(args)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tokens"] == 95 and result["policy"] == "streaming" and result["kv_blocks"] <= 3
    args = cli.build_parser().parse_args(["generate", "--prompt", "Debian is", "--prompt", "APT", "--policy", "h2o",
                                          "--kv-budget", "16", "--max-new-tokens", "5", "--json"])
    args.func(args)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(result["outputs"]) == 2 and result["tokens"] == 10
    args = cli.build_parser().parse_args(["eval-kv", "--text", "x", "--context", "8", "--policy", "h2o"])
    with pytest.raises(ValueError, match="--kv-budget"):
        args.func(args)


def test_demo_runs_end_to_end(capsys):
    args = cli.build_parser().parse_args(["demo", "--context", "128", "--steps", "2", "--json"])
    args.func(args)
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["policy"] for r in report["kv"]] == ["full", "h2o", "streaming"]
    assert report["kv"][1]["kv_blocks"] < report["kv"][0]["kv_blocks"]
    assert all(math.isfinite(r["ppl"]) for r in report["kv"])
    assert math.isfinite(report["base_ppl"])


def test_transformers_generate_with_paged_cache(model_and_tokenizer):
    from sinklora_ext.hf_cache import PagedH2OCache, cache_kwarg, generate_with_policy

    model, tokenizer = model_and_tokenizer
    ids = torch.tensor([tokenizer("The Debian project is a volunteer organisation that").input_ids])
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=10, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    full = generate_with_policy(model, ids, CachePolicy("full"), max_new_tokens=10, do_sample=False,
                                output_logits=True, return_dict_in_generate=True)
    assert torch.equal(full.sequences, ref.sequences)
    for ours, theirs in zip(full.logits, ref.logits):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)
    assert model.config._attn_implementation != "sinklora_paged"  # restored

    policy = CachePolicy("h2o", 8, 2)
    long_ids = torch.cat([ids] * 4, dim=1)  # a prompt of several blocks, far over the budget
    for prompt in (ids, long_ids):
        h2o = generate_with_policy(model, prompt, policy, max_new_tokens=10, do_sample=False)
        (req,) = DecodeEngine(model, policy, max_seqs=1, max_tokens=128).run([Request(prompt[0].tolist(), 10)])
        assert h2o[0, prompt.shape[1]:].tolist() == req.output_ids
    with pytest.raises(ValueError, match=r"max_prompt must be in \[1, max_tokens=64\], got 65"):
        PagedH2OCache(model, policy, max_tokens=64, max_prompt=65)
    cache = PagedH2OCache(model, policy, max_tokens=64, max_prompt=ids.shape[1])
    assert cache.paged.num_blocks == 1  # max(budget + 1, prompt) slots: one block of 16, not 64 slots
    model.generate(ids, **{cache_kwarg(model): cache}, max_new_tokens=6, do_sample=False)
    assert cache.tokens_seen == ids.shape[1] + 5  # positions count tokens seen, not cache slots
    assert int(cache.paged.seq_lens[cache.seq]) == policy.budget + 1
    model.set_attn_implementation("sdpa")


def test_static_decode_steps_equal_dynamic_ones(model_and_tokenizer):
    """Fixed-shape steps over every cache row (the CUDA-graph path) decode exactly like the
    per-active-row steps, with requests joining and leaving."""
    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer(t).input_ids for t in ("APT is", "The kernel of Debian is", "dpkg")]
    outputs = []
    for static in (False, True):
        engine = DecodeEngine(model, CachePolicy("h2o", 12, 2, 4), max_seqs=2, max_tokens=32, block_size=4,
                              static=static)
        outputs.append([r.output_ids for r in engine.run([Request(p, n) for p, n in zip(prompts, (9, 4, 6))])])
    assert outputs[0] == outputs[1]


def test_static_decoder_takes_int32_tokens_and_refuses_to_capture_dynamic_rope(model_and_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sinklora_ext.engine import PagedLlama, StaticDecoder

    model, tokenizer = model_and_tokenizer
    runner = PagedLlama(model, PagedLlama.make_cache(model, CachePolicy("full"), 32, 1, 16))
    seq = runner.cache.add_sequence()
    first = int(runner.prefill(seq, torch.tensor(tokenizer("APT is").input_ids))[-1].argmax())
    logits = StaticDecoder(runner)([seq], torch.tensor([first], dtype=torch.int32))
    assert logits.shape == (1, model.config.vocab_size) and torch.isfinite(logits).all()

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    dynamic = LlamaForCausalLM(cfg)
    runner = PagedLlama(dynamic, PagedLlama.make_cache(dynamic, CachePolicy("full"), 32, 1, 16))
    with pytest.raises(ValueError, match="cuda_graph: rope_type 'dynamic'"):
        StaticDecoder(runner, cuda_graph=True)
    assert not StaticDecoder(runner).cuda_graph
