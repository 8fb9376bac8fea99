"""vLLM's own CPU backend against the SINKLORA backend (SPEC 8) in the same run and the same KV memory.

One long-prompt workload (default: 64 requests, 2048-token prompts cut from real text, 128 greedy new
tokens, ``ignore_eos``) goes through one vLLM engine per backend: ``vllm`` (vLLM's default attention
backend, CPU_ATTN on the CPU, full cache) and SINKLORA under ``h2o`` (default), ``streaming`` or
``full``. The KV pool is fixed in blocks with ``num_gpu_blocks_override``: by default sized so that
the full cache fits ``--fit-requests`` (16) requests, ``ceil((prompt + new) / block_size) * 16``
blocks plus vLLM's null block. SINKLORA keeps a float32 score and an int32 position per (slot,
kv head) outside vLLM's pool (8 bytes against the ``2 * D * itemsize`` of K and V), so it gets
``floor(blocks * 2D*itemsize / (2D*itemsize + 8))`` blocks: the same bytes in all.

Per backend: the most requests running at once (vLLM's scheduler stats, recorded every engine step;
the ``vllm:num_requests_running`` gauge of ``LLM.get_metrics()`` holds only the last value),
preemptions, wall time of ``LLM.generate``, output and total tokens/s, mean time per output token
(per request ``(last token - first token) / (n - 1)`` from ``RequestOutput.metrics``) and time to the
first token; then every backend's continuation is scored by the full model (vLLM's backend,
``prompt_logprobs`` over prompt + continuation, the continuation tokens only): its perplexity, and
the fraction of its tokens equal to the full backend's at the same position.

Each engine runs in its own process (a fresh interpreter that loads this file; its ``__main__`` is
``-c``, so vLLM's spawned engine core and worker re-import nothing), with
``VLLM_CPU_KVCACHE_SPACE`` sized to the pool, ``VLLM_CPU_OMP_THREADS_BIND=nobind`` and
``HF_HUB_OFFLINE=1`` unless set; its memory is freed when it exits.

Needs vLLM: ``make vllm``, then ``.venv-vllm/bin/python -m sinklora_ext.bench.vllm [--json]`` (or
``.venv-vllm/bin/sinklora bench vllm``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..cli.options import Config, option
from ..usage import UsageError, check_block_size, check_model_dir

BACKENDS = ("vllm", "full", "h2o", "streaming")
SIDE_BYTES = 8  # SINKLORA's float32 score + int32 position per (slot, kv head), outside vLLM's pool
NEEDS_VLLM = ("sinklora bench vllm needs vLLM, which this environment ({python}) does not have: run `make vllm` "
              "and use `.venv-vllm/bin/python -m sinklora_ext.bench.vllm` (or `.venv-vllm/bin/sinklora bench vllm`)")


@dataclass(kw_only=True)
class VllmBenchConfig(Config):
    """`sinklora bench vllm`."""

    model: str | None = option(None, help="Hugging Face checkpoint directory or .gguf file (default: the embedded "
                                           "SmolLM2-135M-Instruct)")
    text: list[str] = option(["debian-reference", "gnu-standards", "bash-reference"],
                             help="text files or corpus names the prompts are cut from, in order")
    requests: int = option(64, minimum=1)
    prompt_tokens: int = option(2048, minimum=2)
    new_tokens: int = option(128, minimum=2, help="greedy tokens per request (ignore_eos)")
    backends: str = option("vllm,h2o", help="comma-separated: vllm (its own backend), full, h2o, streaming "
                                            "(SINKLORA policies)")
    budget_frac: float = option(0.2, unit_interval=True, help="h2o / streaming budget as a share of prompt + new "
                                                              "tokens")
    kv_budget: int | None = option(None, minimum=1, help="tokens kept per (layer, kv head); overrides --budget-frac")
    sinks: int = option(4, minimum=0)
    recent: int | None = option(None, minimum=0, help="h2o recent tokens (default: budget / 2)")
    block_size: int = option(128, help="tokens per KV block (a multiple of 32)")
    fit_requests: int = option(16, minimum=1, help="size the pool so the full cache fits this many requests")
    kv_blocks: int | None = option(None, minimum=2, help="vLLM backend's pool in blocks (overrides --fit-requests)")
    dtype: str = option("float32", choices=("float32", "bfloat16"))
    threads: int | None = option(None, minimum=1, help="OMP_NUM_THREADS of the engines (default: vLLM's)")
    no_score: bool = option(False, help="skip scoring the continuations with the full model")
    engine_timeout: int = option(7200, minimum=1, help="seconds one engine may run")
    output: str | None = option(None, help="also write the JSON result to this file")

    @property
    def backend_names(self) -> list[str]:
        return [b.strip() for b in self.backends.split(",") if b.strip()]

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.new_tokens

    @property
    def budget(self) -> int:
        """The h2o / streaming budget in tokens."""
        if self.kv_budget is not None:
            return self.kv_budget
        return max(int(round(self.budget_frac * self.total_tokens)), self.sinks + 2)

    @property
    def recent_tokens(self) -> int:
        return self.recent if self.recent is not None else self.budget // 2

    def full_blocks(self) -> int:
        """The vLLM backend's pool in blocks: ``--kv-blocks``, or what ``--fit-requests`` full caches
        need plus the null block vLLM's pool holds back."""
        if self.kv_blocks is not None:
            return self.kv_blocks
        return -(-self.total_tokens // self.block_size) * self.fit_requests + 1

    def check(self) -> None:
        super().check()
        check_block_size(self)
        if self.block_size % 32:
            raise UsageError(f"--block-size must be a multiple of 32 (vLLM's CPU attention), got {self.block_size}")
        names = self.backend_names
        if not names or any(b not in BACKENDS for b in names) or len(set(names)) != len(names):
            raise UsageError(f"--backends: each once, from {list(BACKENDS)}, got {self.backends!r}")
        if "h2o" in names and self.budget < self.sinks + self.recent_tokens:
            raise UsageError(f"--kv-budget ({self.budget}) must be >= --sinks ({self.sinks}) + --recent "
                             f"({self.recent_tokens})")
        if "streaming" in names and self.budget <= self.sinks:
            raise UsageError(f"--kv-budget ({self.budget}) must be > --sinks ({self.sinks})")


@dataclass
class Row:
    backend: str                 # vllm, or the SINKLORA policy
    attention_backend: str       # what the engine was asked for
    kv_budget: int | None
    kv_blocks: int               # the engine's pool (num_gpu_blocks, set by num_gpu_blocks_override)
    kv_bytes: int                # pool + SINKLORA's side tensors
    engine_start_s: float
    wall_s: float
    max_running: int             # most requests running in one engine step (scheduler stats)
    mean_running: float          # over the steps that ran a request
    preemptions: int
    output_tokens: int
    output_tokens_per_s: float
    total_tokens_per_s: float    # prompt + output tokens over the wall time
    mean_tpot_ms: float          # per request (last token - first token) / (n - 1), averaged
    mean_ttft_s: float           # queued -> first token, averaged
    ppl: float | None = None     # of the continuation under the full model
    match_vs_vllm: float | None = None   # fraction of continuation tokens equal to vllm's
    speedup_vs_vllm: float | None = None     # output tokens/s over vllm's
    running_vs_vllm: float | None = None     # max_running over vllm's
    tpot_vs_vllm: float | None = None        # mean_tpot_ms over vllm's
    error: str | None = None


# ----------------------------------------------------------------------------------------------
# the parent: prompts, one child process per engine, the table
# ----------------------------------------------------------------------------------------------


def require_vllm(config: VllmBenchConfig) -> None:
    """vLLM importable here, and the SINKLORA plugin when a SINKLORA backend is asked for."""
    if importlib.util.find_spec("vllm") is None:
        raise UsageError(NEEDS_VLLM.format(python=sys.executable))
    if set(config.backend_names) - {"vllm"} and not has_sinklora_plugin():
        raise UsageError("--backends: the SINKLORA backend (sinklora_ext.vllm) is not in this installation; "
                         "run `make vllm` once it exists, or use --backends vllm")


def has_sinklora_plugin() -> bool:
    try:
        return importlib.util.find_spec("sinklora_ext.vllm") is not None
    except ModuleNotFoundError:
        return False


def model_shape(model_dir: str) -> dict:
    c = json.loads((Path(model_dir) / "config.json").read_text())
    heads = c["num_attention_heads"]
    return dict(layers=c["num_hidden_layers"], heads_q=heads, heads_kv=c.get("num_key_value_heads", heads),
                head_dim=c.get("head_dim") or c["hidden_size"] // heads)


def make_prompts(model_dir: str, config: VllmBenchConfig) -> tuple[list[list[int]], int]:
    """``requests`` windows of ``prompt_tokens`` tokens of the texts (their tokens one after the other),
    consecutive when there are enough tokens, else evenly spread (overlapping); returns them and the
    stride."""
    from transformers import AutoTokenizer

    from ..data import resolve_text_path, tokenize_file

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = [t for text in config.text for t in tokenize_file(tokenizer, resolve_text_path(text)).tolist()]
    n, p = config.requests, config.prompt_tokens
    if len(tokens) < p:
        raise UsageError(f"--text has {len(tokens)} tokens, fewer than --prompt-tokens ({p})")
    stride = p if len(tokens) >= n * p else (len(tokens) - p) // max(n - 1, 1)
    return [tokens[i * stride:i * stride + p] for i in range(n)], stride


def _child(spec: dict, workdir: Path, timeout: int, env: dict) -> dict:
    name = spec["name"]
    spec_path, out_path, log_path = (workdir / f"{name}.{ext}" for ext in ("spec.json", "out.json", "log"))
    spec_path.write_text(json.dumps(spec))
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('sinklora_ext.bench.vllm', "
            "sys.argv[1]); m = importlib.util.module_from_spec(s); sys.modules[s.name] = m; "
            "s.loader.exec_module(m); m.child_main(sys.argv[2], sys.argv[3])")
    started = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve()), str(spec_path),
                                 str(out_path)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {timeout} s"
    if rc == 0 and out_path.is_file():
        result = json.loads(out_path.read_text())
        result["process_s"] = time.perf_counter() - started
        return result
    tail = log_path.read_text(errors="replace").strip().splitlines()[-25:]
    return {"error": f"engine {name} failed ({rc}); log {log_path}:\n" + "\n".join(tail)}


def _child_env(config: VllmBenchConfig, kv_bytes: int) -> dict:
    env = dict(os.environ)
    # the pool in whole GiB, at least 1 (num_gpu_blocks_override sets the blocks)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(kv_bytes / 2**30)))
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if config.threads is not None:
        env["OMP_NUM_THREADS"] = str(config.threads)
    return env


def _log(msg: str) -> None:
    print(f"sinklora bench vllm: {msg}", file=sys.stderr, flush=True)


def run(config: VllmBenchConfig) -> dict:
    """Every backend on the same prompts and KV memory, one engine process each; returns
    ``{"config", "rows"}``."""
    require_vllm(config)
    if config.model is not None:
        check_model_dir(config.model)
    from ..hf.models import _resolve_model_dir

    model_dir = _resolve_model_dir(config.model)
    shape = model_shape(model_dir)
    itemsize = 4 if config.dtype == "float32" else 2
    kv_token_bytes = 2 * shape["head_dim"] * itemsize  # K and V of one (slot, kv head)
    block_bytes = shape["layers"] * config.block_size * shape["heads_kv"] * kv_token_bytes
    full_blocks = config.full_blocks()
    pool_bytes = full_blocks * block_bytes
    sink_blocks = full_blocks * kv_token_bytes // (kv_token_bytes + SIDE_BYTES)
    side_block_bytes = shape["layers"] * config.block_size * shape["heads_kv"] * SIDE_BYTES
    prompts, stride = make_prompts(model_dir, config)
    names = config.backend_names
    common = dict(model=model_dir, dtype=config.dtype, block_size=config.block_size,
                  max_model_len=config.total_tokens + 1, new_tokens=config.new_tokens, prompts=prompts)
    rows, continuations = {}, {}
    workdir = Path(tempfile.mkdtemp(prefix="sinklora-bench-vllm-"))  # the engines' specs, results and logs
    # SINKLORA engines first; vLLM's own engine last, which then scores every continuation
    order = [n for n in names if n != "vllm"] + ["vllm"]
    for name in order:
        sinklora = name != "vllm"
        blocks = sink_blocks if sinklora else full_blocks
        kv_bytes = blocks * (block_bytes + (side_block_bytes if sinklora else 0))
        spec = dict(common, name=name, kv_blocks=blocks, generate=name in names)
        if not sinklora and not spec["generate"] and (config.no_score or not continuations):
            break  # vLLM's own engine would only score, and there is nothing to score
        if sinklora:
            spec["sinklora"] = dict(policy=name, kv_budget=None if name == "full" else config.budget,
                                    num_sinks=config.sinks,
                                    **({"recent": config.recent_tokens} if name == "h2o" else {}))
        else:
            spec["score"] = None if config.no_score else {k: v for k, v in continuations.items()}
        what = "generating" if spec["generate"] else "scoring"
        _log(f"{what} with {name} ({'SINKLORA' if sinklora else 'vLLM default backend'}), {blocks} blocks of "
             f"{config.block_size}, {config.requests} requests x {config.prompt_tokens} + {config.new_tokens} "
             "tokens...")
        out = _child(spec, workdir, config.engine_timeout, _child_env(config, kv_bytes))
        if "error" in out:
            _log(out["error"])
        elif spec["generate"]:
            continuations[name] = out["continuations"]
        rows[name] = (out, blocks, kv_bytes)
    if any("error" in out for out, _, _ in rows.values()):
        _log(f"the engines' logs are kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    vllm_out = rows.get("vllm", ({}, 0, 0))[0]
    scores = vllm_out.get("scores", {})
    reference = continuations.get("vllm")
    result_rows = []
    for name in names:
        out, blocks, kv_bytes = rows[name]
        sinklora = name != "vllm"
        budget = None if name in ("vllm", "full") else config.budget
        if "error" in out:
            result_rows.append(Row(name, "SINKLORA" if sinklora else "default", budget, blocks, kv_bytes, 0.0, 0.0,
                                   0, 0.0, 0, 0, 0.0, 0.0, 0.0, 0.0, error=out["error"]))
            continue
        # the pool the engine reports (num_gpu_blocks), which the override should have made ``blocks``
        row = Row(name, "SINKLORA" if sinklora else "default", budget, out.get("kv_blocks") or blocks, kv_bytes,
                  out["engine_start_s"],
                  out["wall_s"], out["max_running"], out["mean_running"], out["preemptions"], out["output_tokens"],
                  out["output_tokens"] / out["wall_s"], (out["prompt_tokens"] + out["output_tokens"]) / out["wall_s"],
                  out["mean_tpot_ms"], out["mean_ttft_s"])
        if name in scores.get("ppl", {}):
            row.ppl = scores["ppl"][name]
        if reference is not None:
            same = sum(a == b for ca, cb in zip(out["continuations"], reference) for a, b in zip(ca, cb))
            row.match_vs_vllm = same / max(1, sum(len(c) for c in reference))
        result_rows.append(row)
    base = next((r for r in result_rows if r.backend == "vllm" and r.error is None), None)
    if base is not None:
        for r in result_rows:
            if r.error is None:
                r.speedup_vs_vllm = r.output_tokens_per_s / base.output_tokens_per_s
                r.running_vs_vllm = r.max_running / base.max_running if base.max_running else None
                r.tpot_vs_vllm = r.mean_tpot_ms / base.mean_tpot_ms if base.mean_tpot_ms else None
    engine = next((out for out, _, _ in rows.values() if "error" not in out), {})
    setup = dict(model=config.model or "default", model_dir=model_dir, **shape, dtype=config.dtype,
                 vllm=engine.get("vllm_version"), torch=engine.get("torch_version"), threads=config.threads,
                 cpu_count=os.cpu_count(), requests=config.requests, prompt_tokens=config.prompt_tokens,
                 new_tokens=config.new_tokens, text=config.text, prompt_stride=stride, block_size=config.block_size,
                 kv_budget=config.budget, sinks=config.sinks, recent=config.recent_tokens,
                 fit_requests=None if config.kv_blocks is not None else config.fit_requests,
                 kv_blocks_vllm=full_blocks, kv_blocks_sinklora=sink_blocks, block_bytes=block_bytes,
                 side_block_bytes=side_block_bytes, kv_pool_bytes=pool_bytes,
                 max_num_seqs=engine.get("max_num_seqs"), max_num_batched_tokens=engine.get("max_num_batched_tokens"),
                 enforce_eager=True, scoring_s=scores.get("seconds"))
    result = {"config": setup, "rows": [asdict(r) for r in result_rows]}
    if config.output is not None:
        path = Path(config.output).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result) + "\n")
    return result


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [
        f"vLLM {c['vllm']} on the CPU ({c['cpu_count']} cores), {c['model']} ({c['dtype']}): {c['requests']} requests "
        f"x {c['prompt_tokens']} prompt tokens of {'+'.join(c['text'])} + {c['new_tokens']} greedy tokens, block {c['block_size']}",
        f"same KV memory: {c['kv_pool_bytes'] / 2**20:.0f} MiB = {c['kv_blocks_vllm']} blocks for vLLM's backend"
        + (f" (a full cache for {c['fit_requests']} requests + the null block)" if c["fit_requests"] else "")
        + f"; SINKLORA {c['kv_blocks_sinklora']} blocks + its score/position side tensors (8 bytes per token and kv "
        f"head, outside vLLM's pool); h2o/streaming budget {c['kv_budget']} tokens (sinks {c['sinks']}, recent "
        f"{c['recent']})",
        f"{'backend':<20}{'blocks':>7}{'max run':>8}{'preempt':>8}{'wall s':>9}{'out tok/s':>10}{'tot tok/s':>10}"
        f"{'TPOT ms':>9}{'TTFT s':>8}{'ppl':>8}{'match':>7}{'x tok/s':>8}{'x run':>7}{'x TPOT':>7}",
    ]

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    for r in result["rows"]:
        label = "vllm (default)" if r["backend"] == "vllm" else f"SINKLORA {r['backend']}"
        if r["error"] is not None:
            lines.append(f"{label:<20}{r['kv_blocks']:>7}  failed: {r['error'].splitlines()[0]}")
            continue
        lines.append(f"{label:<20}{r['kv_blocks']:>7}{r['max_running']:>8}{r['preemptions']:>8}{r['wall_s']:>9.1f}"
                     f"{r['output_tokens_per_s']:>10.1f}{r['total_tokens_per_s']:>10.1f}{r['mean_tpot_ms']:>9.1f}"
                     f"{r['mean_ttft_s']:>8.2f}{f(r['ppl'], '.3f'):>8}{f(r['match_vs_vllm'], '.1%'):>7}"
                     f"{f(r['speedup_vs_vllm'], '.2f'):>8}{f(r['running_vs_vllm'], '.2f'):>7}"
                     f"{f(r['tpot_vs_vllm'], '.2f'):>7}")
    lines.append("max run: most requests running in one engine step; ppl: of the continuation under the full model; "
                 "match: continuation tokens equal to vllm's; x: ratio to vllm's backend")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# the child: one engine
# ----------------------------------------------------------------------------------------------


def child_main(spec_path: str, out_path: str) -> None:
    """Run one engine as ``spec`` says (generate the prompts and/or score sequences) and write the
    measurements as JSON to ``out_path``."""
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(Path(spec_path).read_text())
    prompts, new = spec["prompts"], spec["new_tokens"]
    kwargs = dict(dtype=spec["dtype"], enable_prefix_caching=False, block_size=spec["block_size"],
                  num_gpu_blocks_override=spec["kv_blocks"], max_model_len=spec["max_model_len"], enforce_eager=True,
                  disable_log_stats=False, seed=0)
    if spec.get("sinklora"):
        kwargs.update(attention_backend="SINKLORA", additional_config={"sinklora": spec["sinklora"]})
    started = time.perf_counter()
    llm = LLM(spec["model"], **kwargs)
    engine_start = time.perf_counter() - started
    engine = llm.llm_engine
    out = dict(engine_start_s=engine_start, vllm_version=vllm.__version__, torch_version=torch.__version__,
               kv_blocks=engine.vllm_config.cache_config.num_gpu_blocks,
               max_num_seqs=engine.vllm_config.scheduler_config.max_num_seqs,
               max_num_batched_tokens=engine.vllm_config.scheduler_config.max_num_batched_tokens)

    # the scheduler's stats of every engine step (LLMEngine.step -> logger_manager.record)
    steps: list[tuple[int, int]] = []
    manager = engine.logger_manager
    record = manager.record

    def recording(*args, **kw):
        stats = kw.get("scheduler_stats", args[0] if args else None)
        if stats is not None:
            steps.append((stats.num_running_reqs, stats.num_waiting_reqs))
        return record(*args, **kw)

    manager.record = recording
    greedy = SamplingParams(temperature=0.0, max_tokens=new, min_tokens=new, ignore_eos=True, detokenize=False)
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0][:16])], SamplingParams(temperature=0.0, max_tokens=2),
                 use_tqdm=False)  # warm-up, untimed
    preempted_before = _counter(llm, "vllm:num_preemptions")
    if spec["generate"]:
        steps.clear()
        started = time.perf_counter()
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], greedy, use_tqdm=False)
        wall = time.perf_counter() - started
        conts = [list(o.outputs[0].token_ids) for o in outputs]
        tpot, ttft = [], []
        for o, c in zip(outputs, conts):
            m = o.metrics
            if m is not None and len(c) > 1 and m.last_token_ts > m.first_token_ts > 0:
                tpot.append((m.last_token_ts - m.first_token_ts) / (len(c) - 1))
                ttft.append(m.first_token_ts - m.queued_ts)
        running = [r for r, _ in steps if r > 0]
        out.update(wall_s=wall, continuations=conts, prompt_tokens=sum(map(len, prompts)),
                   output_tokens=sum(map(len, conts)), max_running=max(running, default=0),
                   mean_running=sum(running) / max(1, len(running)), engine_steps=len(steps),
                   preemptions=int(_counter(llm, "vllm:num_preemptions") - preempted_before),
                   mean_tpot_ms=1e3 * sum(tpot) / max(1, len(tpot)), mean_ttft_s=sum(ttft) / max(1, len(ttft)),
                   timed_requests=len(tpot))
    if spec.get("score") is not None:
        to_score = dict(spec["score"])
        if spec["generate"]:
            to_score[spec["name"]] = out["continuations"]
        out["scores"] = score_continuations(llm, prompts, to_score)
    Path(out_path).write_text(json.dumps(out))


def _counter(llm, name: str) -> float:
    """A counter of ``LLM.get_metrics()`` summed over its label sets (0 when absent)."""
    total = 0.0
    for metric in llm.get_metrics():
        if metric.name == name and hasattr(metric, "value"):
            total += metric.value
    return total


def score_continuations(llm, prompts: list[list[int]], continuations: dict[str, list[list[int]]]) -> dict:
    """Perplexity of each backend's continuations under this engine's model: ``prompt_logprobs`` of
    prompt + continuation, the continuation tokens only; ``{"ppl": {backend: ppl}, "tokens": {backend:
    scored tokens}, "seconds"}``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
    names = list(continuations)
    seqs = [p + c for name in names for p, c in zip(prompts, continuations[name])]
    started = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=False)
    seconds = time.perf_counter() - started
    ppl, tokens, i = {}, {}, 0
    for name in names:
        nll, count = 0.0, 0
        for p, c in zip(prompts, continuations[name]):
            seq, logprobs = seqs[i], outputs[i].prompt_logprobs
            i += 1
            for t in range(len(p), len(seq)):
                nll -= logprobs[t][seq[t]].logprob
                count += 1
        ppl[name], tokens[name] = math.exp(nll / max(1, count)), count
    return dict(ppl=ppl, tokens=tokens, seconds=seconds)


if __name__ == "__main__":
    from ..cli import main

    sys.exit(main(["bench", "vllm", *sys.argv[1:]]))
