"""Smoke runs of the benchmark commands on tiny problems (speed goals live in bench/, not here)."""

import json
from pathlib import Path

import pytest

from sinklora_ext import cli


def bench_script_module(name: str):
    """bench/<name>.py, loaded as a module (a script, not part of the package)."""
    import importlib.util
    import sys

    script = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def plot_results_module():
    pytest.importorskip("matplotlib")
    return bench_script_module("plot_results")


def run(argv, capsys):
    args = cli.build_parser().parse_args(argv)
    args.func(args)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_attention(capsys):
    result = run(["bench", "attention", "--seqlen", "256", "--heads-q", "4", "--heads-kv", "2", "--head-dim", "32",
                  "--repeats", "1", "--json"], capsys)
    methods = {(r["method"], r["pattern"]) for r in result["rows"]}
    assert ("torch SDPA", "full causal") in methods and ("sinklora_ext", "sf") in methods
    assert all(r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 for r in result["rows"])


def test_bench_decode(capsys):
    result = run(["bench", "decode", "--batch", "2", "--context", "128", "--heads-q", "4", "--heads-kv", "2",
                  "--head-dim", "32", "--prefill", "64", "--repeats", "1", "--json"], capsys)
    assert [r["method"] for r in result["rows"]][:3] == ["torch SDPA, dense cache", "paged_decode + H2O scores",
                                                        "paged_decode, no scores"]
    assert result["copy_peak_gbps"] > 0 and result["evict_ms"] > 0


def test_bench_generate(capsys):
    result = run(["bench", "generate", "--shape", "tiny", "--batch", "2", "--context", "96", "--steps", "3",
                  "--warmup", "2", "--budget-frac", "0.25", "--json"], capsys)
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"sinklora_ext paged, full (static)", "sinklora_ext paged, h2o (static)",
                         "sinklora_ext paged, streaming (static)", "transformers generate (dynamic cache)",
                         "transformers generate (static cache)"}
    assert all(r["ms_per_step"] > 0 and r["ttft_ms"] > 0 for r in rows.values())
    # the evicting caches hold budget + 1 slots per sequence: 25 slots = 2 blocks of 16, against 7 for full
    assert rows["sinklora_ext paged, h2o (static)"]["kv_blocks"] == 2 * 2
    assert rows["sinklora_ext paged, full (static)"]["kv_blocks"] == 2 * 7


def test_bench_extension(capsys, tmp_path, tiny_model_dir):
    """The experiment's whole pipeline on a tiny random LLaMA: base eval, one LoRA+ run per pattern,
    full-attention evals of the reloaded adapters, recovery ratios; the perplexities and ratios
    against recomputations."""
    from sinklora_ext.data import debian_text_file, tokenize_file
    from sinklora_ext.evaluate import eval_ppl, load_for_eval
    from sinklora_ext.hf.lora import extend_context
    from sinklora_ext.hf.models import load_model

    tiny = Path(tiny_model_dir)
    _, tokenizer = load_model(str(tiny), device="cpu")
    text = debian_text_file()
    result = run(["bench", "extension", "--model", str(tiny), "--context", "128", "--original-context",
                  "64", "--patterns", "full,sf", "--steps", "2", "--lr", "1e-3", "--train-text", str(text),
                  "--eval-text", str(text), "--eval-windows", "2", "--max-windows", "4", "--device", "cpu",
                  "--output", str(tmp_path / "runs"), "--no-progress", "--json"], capsys)
    assert result["config"]["rope_factor"] == 2.0
    rows = {r["pattern"]: r for r in result["rows"]}
    assert set(rows) == {"full", "sf"} and rows["full"]["recovery"] == 1.0
    assert all(r["ppl"] > 1 and r["ppl"] != result["base_ppl"] for r in rows.values())
    base, _ = load_model(str(tiny), device="cpu")
    extend_context(base, 128, 64)
    eval_ids = tokenize_file(tokenizer, text)
    assert result["base_ppl"] == pytest.approx(eval_ppl(base, None, eval_ids, 128, 2, progress=False)["ppl"], rel=1e-9)
    tuned, _ = load_for_eval(str(tiny), tmp_path / "runs" / "sf")
    assert rows["sf"]["ppl"] == pytest.approx(eval_ppl(tuned, None, eval_ids, 128, 2, progress=False)["ppl"], rel=1e-6)
    gap = result["base_ppl"] - rows["full"]["ppl"]
    assert rows["sf"]["recovery"] == pytest.approx((result["base_ppl"] - rows["sf"]["ppl"]) / gap, rel=1e-12)
    meta = json.loads((tmp_path / "runs" / "sf" / "sinklora.json").read_text())
    assert meta["attn"] == "sf" and meta["original_context"] == 64 and meta["rope_factor"] == 2.0


def test_bench_msa_conv(capsys):
    """One tiny problem per dilation, Flex left out (its compile takes seconds): ours and the unfold
    reference both timed and checked against each other, ratios against ours."""
    result = run(["bench", "msa-conv", "--sizes", "6", "--batches", "2", "--dilations", "1", "2", "--heads", "2",
                  "--head-dim", "8", "--kernel-size", "3", "--repeats", "1", "--no-flex", "--json"], capsys)
    rows = {(r["method"], r["padding"], r["dilation"]): r for r in result["rows"]}
    for dilation in (1, 2):
        ours, unfold = rows[("sinklora_ext", "zero", dilation)], rows[("unfold (released layer)", "zero", dilation)]
        assert ours["fwd_ratio"] == 1.0 and ours["fwdbwd_ratio"] == 1.0
        assert unfold["fwd_ratio"] == pytest.approx(unfold["fwd_ms"] / ours["fwd_ms"])
        assert unfold["fwdbwd_ratio"] == pytest.approx(unfold["fwdbwd_ms"] / ours["fwdbwd_ms"])
        assert 0 <= unfold["max_err"] < 1e-4 and unfold["compile_s"] is None
    assert all(r["batch"] == 2 and r["size"] == 6 for r in result["rows"])
    assert not any(r["method"].startswith("FlexAttention") for r in result["rows"])
    natten = [r for r in result["rows"] if r["method"] == "NATTEN na2d"]
    assert len(natten) == 2 and all(r["fwd_ms"] is None or r["padding"] == "clamp" for r in natten)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_msa_conv_bench_peers_equal_the_reference():
    """The unfold reference and the Flex formulation (one zero key with +log(n_pad)) are MSA-Conv with
    zero padding: both equal the float64 reference on a non-square map, dilation 2, a window wider
    than the map (Flex run eagerly here: the same mask and score functions, no compile)."""
    import torch

    from sinklora_ext.bench.msa_conv import make_flex, padded_taps, unfold_msa_conv2d
    from sinklora_ext.reference import msa_conv2d_ref

    assert padded_taps(5, 3, 2).tolist() == [1, 1, 0, 1, 1]
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 5, 7, 3, 4) for _ in range(3))
    for kernel, dilation in ((3, 1), (3, 2), (7, 1)):
        expected = msa_conv2d_ref(q, k, v, kernel, dilation, "zero")
        assert torch.allclose(unfold_msa_conv2d(q, k, v, kernel, dilation).double(), expected, atol=1e-5)
    flex = make_flex(5, 7, 3, 2, "cpu", compile=False)
    assert torch.allclose(flex(q, k, v).double(), msa_conv2d_ref(q, k, v, 3, 2, "zero"), atol=1e-5)


def test_plot_results_draws_every_recorded_result(tmp_path):
    """bench/plot_results.py turns the recorded JSON results into one PNG each (kvpress's results
    are drawn on the kv-quality plot of the same prompt length)."""
    module = plot_results_module()
    script = Path(module.__file__)
    written = module.main(["--out", str(tmp_path)])
    results = sorted((script.parent / "results").glob("*.json"))
    # one plot per result, except repeats of an extension experiment with other seeds, which share one
    experiments = {module._same_experiment(json.loads(p.read_text())["config"]) for p in results
                   if p.stem.startswith("extension")}
    others = [p for p in results if not p.stem.startswith(("extension", "kv_quality_kvpress"))]
    assert len(written) == len(others) + len(experiments) and len(others) >= 2 and experiments
    assert all(p.stat().st_size > 10_000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


def test_bench_tic(capsys, tmp_path):
    """TiC's experiment on a real Fashion-MNIST subset: two variants, two seeds, two resolutions."""
    result = run(["bench", "tic", "--variants", "tic,cnn-micro", "--seeds", "0,1", "--epochs", "1", "--limit-train",
                  "256", "--limit-test", "64", "--test-resolutions", "28,42", "--output", str(tmp_path),
                  "--no-progress", "--json"], capsys)
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"tic", "tic fixed-windows", "cnn-micro"}
    for row in rows.values():
        assert [run["seed"] for run in row["runs"]] == [0, 1] and row["params"] > 0
        assert set(row["accuracy"]) == {"28", "42"} and set(row["drop"]) == {"42"}
        assert all(0.0 <= a <= 1.0 for a in row["accuracy"].values())
    assert rows["tic"]["shift"] == "cross" and rows["tic"]["inter_pool"] is True
    assert rows["tic"]["windows"] == "scaled" and rows["tic fixed-windows"]["windows"] == "fixed"
    assert rows["cnn-micro"]["windows"] is None
    # the same weights: the same accuracy at the training resolution, windows apart
    assert rows["tic"]["accuracy"]["28"] == rows["tic fixed-windows"]["accuracy"]["28"]
    assert (tmp_path / "cnn-micro-seed1" / "tic.json").is_file()
    # rerun into the same --output: every run's checkpoint is complete, so nothing trains again
    again = run(["bench", "tic", "--variants", "cnn-micro", "--seeds", "1", "--epochs", "1", "--limit-train", "256",
                 "--limit-test", "64", "--test-resolutions", "28,42", "--output", str(tmp_path), "--no-progress",
                 "--json"], capsys)
    assert again["rows"][0]["runs"][0]["accuracy"] == rows["cnn-micro"]["runs"][1]["accuracy"]


def test_bench_vllm_config_and_the_error_without_vllm(capsys):
    """`sinklora bench vllm`: the defaults (budget 20% of prompt + new tokens, a pool for 16 full
    caches, SINKLORA's share of the same bytes), the rules on flags, and without vLLM one usage error
    that says how to get it."""
    import importlib.util

    from sinklora_ext.bench.vllm import VllmBenchConfig, require_vllm
    from sinklora_ext.usage import UsageError

    config = cli.parse(["bench", "vllm"])
    assert type(config) is VllmBenchConfig
    assert (config.requests, config.prompt_tokens, config.new_tokens, config.block_size) == (64, 2048, 128, 128)
    assert config.backend_names == ["vllm", "h2o"] and config.budget == 435 and config.recent_tokens == 217
    assert config.full_blocks() == 17 * 16 + 1  # 16 full caches of 2176 tokens + vLLM's null block
    assert VllmBenchConfig(kv_blocks=40).full_blocks() == 40
    for argv, message in ((["--backends", "vllm,lru"], "--backends"), (["--backends", "h2o,h2o"], "--backends"),
                          (["--block-size", "48"], "multiple of 32"),
                          (["--kv-budget", "10", "--recent", "8"], r"--kv-budget \(10\) must be >= --sinks")):
        with pytest.raises(UsageError, match=message):
            cli.parse(["bench", "vllm", *argv])
    if importlib.util.find_spec("vllm") is not None:
        require_vllm(VllmBenchConfig(backends="vllm"))
        return
    assert cli.main(["bench", "vllm", "--requests", "2"]) == 2
    err = capsys.readouterr().err
    assert "needs vLLM" in err and "make vllm" in err and ".venv-vllm/bin/python -m sinklora_ext.bench.vllm" in err


def test_plot_vllm(tmp_path):
    """bench/plot_results.py draws a `bench vllm` result (a made-up one: the recorded run may be absent)."""
    module = plot_results_module()
    config = dict(model="default", vllm="0.32.0", cpu_count=2, dtype="float32", requests=4, prompt_tokens=64,
                  new_tokens=8, block_size=128, kv_budget=14, kv_pool_bytes=2**20, kv_blocks_vllm=17,
                  kv_blocks_sinklora=16)
    rows = [dict(backend=b, max_running=m, output_tokens_per_s=t, mean_tpot_ms=p, ppl=q, error=None)
            for b, m, t, p, q in (("vllm", 4, 50.0, 20.0, 3.0), ("h2o", 4, 60.0, 18.0, 3.5))]
    rows.append(dict(backend="streaming", error="engine streaming failed"))
    path = module.plot_vllm({"config": config, "rows": rows}, tmp_path / "vllm_cpu.png", module._pyplot())
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_bench_vllm_tiny_run(capsys):
    """A real vLLM run at a tiny size (only where vLLM is installed: `make vllm`): vLLM's own backend,
    and SINKLORA under `full` where the plugin is installed, which must give the same tokens."""
    pytest.importorskip("vllm")
    from sinklora_ext.bench.vllm import has_sinklora_plugin

    backends = "vllm,full" if has_sinklora_plugin() else "vllm"
    # one OpenMP thread per engine: a second one only slows a busy two-core machine down
    result = run(["bench", "vllm", "--requests", "3", "--prompt-tokens", "64", "--new-tokens", "8", "--backends",
                  backends, "--threads", "1", "--json"], capsys)
    rows = {r["backend"]: r for r in result["rows"]}
    assert list(rows) == backends.split(",")
    for row in rows.values():
        assert row["error"] is None, row["error"]
        assert row["output_tokens"] == 3 * 8 and 1 <= row["max_running"] <= 3 and row["wall_s"] > 0
        assert row["mean_tpot_ms"] > 0 and 1.0 < row["ppl"] < 1e4 and row["match_vs_vllm"] == 1.0
    assert rows["vllm"]["speedup_vs_vllm"] == 1.0 and rows["vllm"]["kv_blocks"] == result["config"]["kv_blocks_vllm"]
    assert result["config"]["kv_blocks_vllm"] == 16 + 1


def test_bench_kv_quality(capsys, tmp_path):
    """Every cell against a recomputation: the full cache's perplexity equals dense teacher forcing of
    the same windows, each row's vs_full is its ratio, an evicting row equals its own recomputation."""
    import math

    import torch

    from sinklora_ext.bench.kv_quality import continuation_nll
    from sinklora_ext.data import resolve_text_path, tokenize_file
    from sinklora_ext.evaluate import load_for_eval
    from sinklora_ext.kv_cache import CachePolicy

    out = tmp_path / "kvq.json"
    result = run(["bench", "kv-quality", "--text", "debian-reference", "gnu-standards", "--prompt-tokens", "96",
                  "--new-tokens", "6", "--budgets", "0.25,0.99", "--policies", "h2o,ema", "--passkey-trials", "0",
                  "--threads", "1", "--output", str(out), "--json"], capsys)
    assert json.loads(out.read_text()) == result
    rows = {(r["policy"], r["budget_share"]): r for r in result["rows"]}
    assert set(rows) == {("full", None), ("h2o", 0.25), ("ema", 0.25), ("h2o", 0.99), ("ema", 0.99)}
    assert rows[("h2o", 0.25)]["kv_budget"] == 24 and rows[("ema", 0.25)]["recent"] == 12
    model, tokenizer = load_for_eval(None)
    windows = torch.stack([tokenize_file(tokenizer, resolve_text_path(t))[:102]
                           for t in ("debian-reference", "gnu-standards")])
    with torch.no_grad():
        logits = model(windows).logits[:, 95:101].float()
    dense = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 96:].flatten())
    assert rows[("full", None)]["ppl"] == pytest.approx(math.exp(float(dense)), rel=1e-4)
    for r in rows.values():
        assert r["vs_full"] == pytest.approx(r["ppl"] / rows[("full", None)]["ppl"], rel=1e-12)
    nll = continuation_nll(model, windows, 96, CachePolicy("ema", 24, 4), 16)
    assert rows[("ema", 0.25)]["ppl"] == pytest.approx(math.exp(float(nll.double().mean())), rel=1e-9)


def test_kv_quality_windows_export_for_kvpress(tmp_path):
    """export_windows writes the bench's very windows (the kvpress baseline's input, read in its own
    environment with plain torch.load) and the model directory transformers loads them with."""
    import torch

    from sinklora_ext.bench.kv_quality import KvQualityBenchConfig, _windows, export_windows
    from sinklora_ext.evaluate import load_for_eval

    config = KvQualityBenchConfig(text=["debian-reference", "gnu-standards"], prompt_tokens="96,128", new_tokens=8,
                                  first_window=1, budgets="0.25,0.5")
    config.check()
    export_windows(config, tmp_path / "w.pt")
    spec = torch.load(tmp_path / "w.pt")
    _, tokenizer = load_for_eval(None)
    for prompt in (96, 128):
        ids, names = _windows(config, tokenizer, prompt)
        assert torch.equal(spec["rows"][prompt], ids) and spec["names"][prompt] == names
        assert ids.shape == (2, prompt + 8)
    assert (Path(spec["model"]) / "config.json").is_file() and spec["model_name"] == "default"
    assert spec["budgets"] == [0.25, 0.5] and not (tmp_path / "w.pt.tmp").exists()


def test_plot_kv_quality(tmp_path):
    """bench/plot_results.py draws a `bench kv-quality` result (made up: the recorded one may be absent)."""
    module = plot_results_module()
    config = dict(model="default", device_name="cpu", threads=2, texts=["a", "b"], windows=1, new_tokens=8,
                  prompt_tokens=[64], recommended="ema")
    rows = [dict(policy="full", prompt_tokens=64, budget_share=None, ppl=10.0, vs_full=1.0, passkey=1.0)]
    rows += [dict(policy=p, prompt_tokens=64, budget_share=s, ppl=10 + d / s, vs_full=1 + d / s / 10, passkey=0.5)
             for p, d in (("h2o", 0.1), ("ema", 0.05)) for s in (0.1, 0.25)]
    path = module.plot_kv_quality({"config": config, "rows": rows}, tmp_path / "kv_quality_cpu.png", module._pyplot())
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # kvpress's presses on the same windows, one far off the axis (cut at its edge)
    peers = [dict(policy=f"kvpress-{p}", prompt_tokens=64, budget_share=s, ppl=0.0, vs_full=v, passkey=None)
             for p, v in (("tova", 1.02), ("knorm", 20.0)) for s in (0.1, 0.25)]
    path = module.plot_kv_quality({"config": config, "rows": rows}, tmp_path / "kv_quality_cpu_64.png",
                                  module._pyplot(), peers={"rows": peers})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kv_policy_sim_matches_the_engine():
    """bench/kv_policy_sim.py (the dense float64 simulator the policy exploration in bench/RESULTS.md
    ran) gives the paged engine's perplexity under each rule; its oracle with room for every token
    is the full cache, and its lookahead is the suffix sum of the full cache's attention."""
    import torch

    from sinklora_ext.bench.kv_quality import continuation_nll
    from sinklora_ext.data import resolve_text_path, tokenize_file
    from sinklora_ext.evaluate import load_for_eval
    from sinklora_ext.kv_cache import CachePolicy

    sim = bench_script_module("kv_policy_sim")
    model, tokenizer = load_for_eval(None, dtype=torch.float32)
    rows = torch.stack([tokenize_file(tokenizer, resolve_text_path(t))[200:296]
                        for t in ("debian-reference", "gnu-standards")])
    prompt = 80
    names = ("h2o", "tova", "ema", "mean")
    runs = [sim.SimRun.parse({"policy": name, "share": 0.3}, prompt) for name in names]
    runs.append(sim.SimRun.parse({"policy": "oracle", "budget": 96}, prompt))
    result = sim.simulate(model, rows, prompt, runs)
    with torch.no_grad():
        logits = model(rows).logits
    full = torch.nn.functional.cross_entropy(logits[:, prompt - 1:-1].flatten(0, 1).float(),
                                             rows[:, prompt:].flatten())
    assert result[0]["ppl"] == pytest.approx(float(full.exp()), rel=1e-4)
    for name, row in zip(names, result[1:]):
        nll = continuation_nll(model, rows, prompt, CachePolicy(name, 24, 4), 16).double()
        assert row["ppl"] == pytest.approx(float(nll.mean().exp()), rel=1e-4), name
        assert row["vs_full"] > 1.0
    assert result[-1]["ppl"] == pytest.approx(result[0]["ppl"], rel=1e-9)
    future = sim.lookahead(model, rows, prompt)
    assert len(future) == model.config.num_hidden_layers and future[0].shape == (2, 3, 17, 96)
    assert torch.all(future[3][:, :, -1] == 0) and torch.all(future[3][:, :, :-1] >= future[3][:, :, 1:] - 1e-6)
    assert future[3][:, :, 0].sum(-1).allclose(torch.full((2, 3), 3.0 * 15), rtol=1e-4)  # 15 steps, 3 q heads
