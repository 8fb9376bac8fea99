"""Paged decoding of the real default model: engine, eval-kv, generate."""

import json
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from sinklora_ext import cli
from sinklora_ext.data import debian_text_file, tokenize_file
from sinklora_ext.engine import DecodeEngine, PagedLlama, Request, teacher_forced_nll
from sinklora_ext.kv_cache import BlockPoolExhausted, CachePolicy
from sinklora_ext.hf.models import load_model


@pytest.fixture(scope="module")
def model_and_tokenizer():
    model, tokenizer = load_model(device="cpu")
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def text_ids(model_and_tokenizer):
    return tokenize_file(model_and_tokenizer[1], debian_text_file())


def tiny_llama(vocab_size=97, logit_scale=1.0):
    """A random 2-layer GQA LLaMA; ``logit_scale`` spreads its next-token distribution."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return model


@pytest.fixture(scope="module")
def tiny_model_dir(model_and_tokenizer, tmp_path_factory):
    """A tiny random LLaMA with the default model's tokenizer, for the command line (``--model``)."""
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(vocab_size=len(model_and_tokenizer[1])).save_pretrained(path)
    model_and_tokenizer[1].save_pretrained(path)
    return str(path)


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


def run_cli(argv, capsys):
    """A subcommand in this process → (its result, its stdout)."""
    args = cli.build_parser().parse_args(argv)
    result = args.func(args)
    return result, capsys.readouterr().out


def test_cli_eval_kv_and_generate(tiny_model_dir, capsys):
    """eval-kv and a batch of prompts through generate: the library's numbers for the same policy."""
    tiny, tokenizer = load_model(tiny_model_dir, device="cpu")
    _, out = run_cli(["eval-kv", "--text", "debian-reference", "--context", "96", "--policy", "streaming",
                      "--kv-budget", "32", "--model", tiny_model_dir, "--json", "--no-progress"], capsys)
    result = json.loads(out.strip().splitlines()[-1])
    ids = tokenize_file(tokenizer, debian_text_file())[:96]
    nll, _ = teacher_forced_nll(tiny, ids, CachePolicy("streaming", 32, 4), prefill=32, progress=False)
    assert result["ppl"] == pytest.approx(math.exp(nll.double().mean()), rel=1e-9)
    assert (result["tokens"], result["prefill"], result["recent"], result["kv_slots"], result["kv_blocks"],
            result["full_cache_blocks"]) == (95, 32, 28, 33, 3, 6)

    prompts = ["Debian is", "APT"]
    _, out = run_cli(["generate", "--prompt", prompts[0], "--prompt", prompts[1], "--policy", "h2o", "--kv-budget",
                      "16", "--max-new-tokens", "5", "--model", tiny_model_dir, "--json"], capsys)
    result = json.loads(out.strip().splitlines()[-1])
    requests = [Request(tokenizer(p).input_ids, 5, stop_ids=(tokenizer.eos_token_id,)) for p in prompts]
    DecodeEngine(tiny, CachePolicy("h2o", 16, 4), max_seqs=2, max_tokens=32).run(requests)
    assert result["outputs"] == [tokenizer.decode(r.output_ids, skip_special_tokens=True) for r in requests]
    assert result["tokens"] == 10
    args = cli.build_parser().parse_args(["eval-kv", "--text", "x", "--context", "8", "--policy", "h2o"])
    with pytest.raises(ValueError, match="--kv-budget"):
        args.func(args)


def test_cli_generate_samples_by_seed_and_streams_a_single_prompt(tiny_model_dir, capsys):
    """--temperature/--top-p/--seed/--static reach the engine's sampler; one prompt without --json
    streams token by token."""
    tiny, tokenizer = load_model(tiny_model_dir, device="cpu")
    common = ["generate", "--prompt", "Debian is", "--max-new-tokens", "12", "--temperature", "0.8", "--top-p", "0.9",
              "--policy", "h2o", "--kv-budget", "8", "--model", tiny_model_dir]
    result, out = run_cli(common + ["--seed", "5", "--static"], capsys)
    request = Request(tokenizer("Debian is").input_ids, 12, 0.8, 0.9, (tokenizer.eos_token_id,))
    DecodeEngine(tiny, CachePolicy("h2o", 8, 4), max_seqs=1, max_tokens=16, seed=5, static=True).run([request])
    assert len(request.output_ids) == 12
    assert out == "".join(tokenizer.decode([t]) for t in request.output_ids) + "\n"
    assert result["outputs"] == [tokenizer.decode(request.output_ids, skip_special_tokens=True)]
    assert run_cli(common + ["--seed", "5"], capsys)[0]["outputs"] == result["outputs"]  # dynamic steps, same draws
    assert run_cli(common + ["--seed", "6"], capsys)[0]["outputs"] != result["outputs"]


@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (1.3, 0.6)])
def test_sampling_draws_from_the_tempered_nucleus(temperature, top_p):
    """First tokens of 1200 identical requests: only nucleus tokens, each at its renormalised
    softmax(logits / T) probability (within 4 standard deviations, and 4 draws for rare tokens)."""
    model = tiny_llama(vocab_size=16, logit_scale=6.0)
    prompt = [3, 1, 4, 1, 5, 9]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].double()
    probs = torch.softmax(logits / temperature, dim=0)
    sorted_p, order = probs.sort(descending=True)
    nucleus = order[sorted_p.cumsum(0) - sorted_p < top_p]
    expected = torch.zeros_like(probs)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    assert 1 < len(nucleus) <= 16 and (top_p == 1.0) == (len(nucleus) == 16)
    n = 1200
    engine = DecodeEngine(model, CachePolicy("full"), max_seqs=200, max_tokens=8, seed=0)
    counts = Counter(r.output_ids[0] for r in engine.run([Request(prompt, 1, temperature, top_p) for _ in range(n)]))
    assert set(counts) <= set(nucleus.tolist())
    for token, p in enumerate(expected.tolist()):
        assert abs(counts[token] - n * p) <= 4 * math.sqrt(n * p * (1 - p)) + 4, (token, counts[token], n * p)


def test_sampling_is_reproducible_per_seed():
    model = tiny_llama(logit_scale=6.0)

    def run(seed):
        requests = [Request([1, 2, 3], 12, 1.0, 0.9), Request([4, 5], 10, 0.5)]
        DecodeEngine(model, CachePolicy("h2o", 8, 2), max_seqs=2, max_tokens=32, seed=seed).run(requests)
        return [r.output_ids for r in requests]

    first = run(3)
    assert run(3) == first and run(4) != first
    greedy = [Request([1, 2, 3], 12), Request([4, 5], 10)]
    DecodeEngine(model, CachePolicy("h2o", 8, 2), max_seqs=2, max_tokens=32, seed=3).run(greedy)
    assert [r.output_ids for r in greedy] != first  # temperature 0 draws nothing


def test_demo_runs_end_to_end(model_and_tokenizer, text_ids, tmp_path, capsys):
    """The demo's numbers against recomputations: the base model's dense perplexity of the held-out
    window, the fine-tuned one's through the full cache, blocks of budget + 1 slots for the others."""
    from sinklora_ext.evaluate import load_for_eval, window_nll

    args = cli.build_parser().parse_args(["demo", "--context", "128", "--steps", "2", "--output",
                                          str(tmp_path / "adapter"), "--json"])
    args.func(args)
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    held_out = text_ids[-128:]
    base_nll = float(window_nll(model_and_tokenizer[0], held_out[None])[0]) / 127
    assert report["base_ppl"] == pytest.approx(math.exp(base_nll), rel=1e-6)
    tuned, _ = load_for_eval(None, tmp_path / "adapter", device="cpu")
    tuned_ppl = math.exp(float(window_nll(tuned, held_out[None])[0]) / 127)
    assert [r["policy"] for r in report["kv"]] == ["full", "h2o", "streaming", "ema"]  # ema: the recommended
    assert report["kv"][0]["ppl"] == pytest.approx(tuned_ppl, rel=5e-3)
    assert [r["kv_blocks"] for r in report["kv"]] == [8, 3, 3, 3]  # 128 slots; budget 32 + 1 slots
    assert report["kv_budget"] == 32 and report["train"]["steps"] == 2
    assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in report["kv"])


def test_transformers_generate_with_paged_cache(model_and_tokenizer):
    from sinklora_ext.hf.cache import PagedH2OCache, cache_kwarg, generate_with_policy

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


def test_paged_h2o_cache_reset_starts_over():
    """After reset() the same cache generates as a fresh one, and both as the engine does."""
    from sinklora_ext.hf.cache import PagedH2OCache, cache_kwarg

    model = tiny_llama(logit_scale=6.0)
    ids = torch.randint(0, 97, (1, 21), generator=torch.Generator().manual_seed(1))
    policy = CachePolicy("h2o", 8, 2)
    cache = PagedH2OCache(model, policy, max_tokens=64, max_prompt=21)
    kwargs = {cache_kwarg(model): cache, "max_new_tokens": 6, "do_sample": False}
    first = model.generate(ids, **kwargs)
    cache.reset()
    assert cache.tokens_seen == 0 and cache.paged.free_blocks == cache.paged.num_blocks
    assert cache.paged.lengths[cache.seq] == 0
    assert torch.equal(model.generate(ids, **kwargs), first)
    (req,) = DecodeEngine(model, policy, max_seqs=1, max_tokens=64).run([Request(ids[0].tolist(), 6)])
    assert first[0, 21:].tolist() == req.output_ids


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
    prompt = torch.tensor(tokenizer("APT is").input_ids)
    runner = PagedLlama(model, PagedLlama.make_cache(model, CachePolicy("full"), 32, 2, 16))
    idle, seq = runner.cache.add_sequence(), runner.cache.add_sequence()  # row 0 takes no step
    first = int(runner.prefill(seq, prompt)[-1].argmax())
    logits = StaticDecoder(runner)([seq], torch.tensor([first], dtype=torch.int32))
    eager = PagedLlama(model, PagedLlama.make_cache(model, CachePolicy("full"), 32, 1, 16))
    alone = eager.cache.add_sequence()
    eager.prefill(alone, prompt)
    torch.testing.assert_close(logits, eager.decode([alone], torch.tensor([first])), rtol=1e-4, atol=1e-4)
    assert runner.cache.lengths[idle] == 0

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    dynamic = LlamaForCausalLM(cfg)
    runner = PagedLlama(dynamic, PagedLlama.make_cache(dynamic, CachePolicy("full"), 32, 1, 16))
    with pytest.raises(ValueError, match="cuda_graph: rope_type 'dynamic'"):
        StaticDecoder(runner, cuda_graph=True)
    assert not StaticDecoder(runner).cuda_graph
