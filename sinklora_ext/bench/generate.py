"""End-to-end decode latency of a LLaMA-architecture model: the paged engine under `full`, `h2o` and
`streaming` against transformers' own greedy ``generate`` (SDPA; its default dynamic cache and its
static cache), in the same run.

The model is a named shape with random weights (``llama-7b``, the default on a GPU; ``tiny`` for
smoke runs) or a checkpoint (``--model PATH`` or ``--model default``, the embedded SmolLM2). Every
method gets the same ``batch`` random prompts of ``context`` tokens. Per method: time to the first
token (the prompt's prefill), then ``--steps`` greedy decode steps over the whole batch, timed after
``--warmup`` steps; a step's time is the median over the timed steps. A step of the engine is a
static-shape step (a CUDA-graph replay on a GPU, unless ``--eager``). transformers' steps are timed
inside its own ``generate`` by a logits processor that stamps each step.
Run: ``sinklora bench generate [--json]`` or ``python -m sinklora_ext.bench.generate``.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from ..cli.options import DeviceOptions, option
from ..hf.attention import use_attention
from ..kv_cache import POLICIES
from ..usage import UsageError, check_block_size, check_memory, check_model_dir
from .common import device_config

SHAPES = {
    # LLaMA-2-7B: 32 layers, 32 query and 32 kv heads of 128, MLP 11008, vocabulary 32000
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
    # LLaMA-3-8B: grouped-query attention (8 kv heads)
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}


@dataclass
class Row:
    method: str
    kv_budget: int | None
    ttft_ms: float           # time to first token per prompt: the prefill, over the batch
    ms_per_step: float       # one token for every sequence of the batch
    tokens_per_s: float
    kv_blocks: int | None    # held by the batch after the timed steps (None: dense cache)
    speedup_vs_full: float = 0.0
    speedup_vs_hf: float = 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def random_model(shape: str, context: int, dtype: torch.dtype, device: torch.device):
    """A ``LlamaForCausalLM`` of a named shape with random weights, made directly on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"--shape must be one of {sorted(SHAPES)}, got {shape!r}")
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(context * 2, 4096), tie_word_embeddings=False)
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.dtype = dtype
    return model.eval()


def _engine_row(model, prompts: torch.Tensor, policy, config, device) -> Row:
    from ..engine import PagedLlama, StaticDecoder

    batch, context = prompts.shape
    total = context + config.warmup + config.steps + 1
    cache = PagedLlama.make_cache(model, policy, policy.slots_per_sequence(total, context), batch, config.block_size)
    runner = PagedLlama(model, cache)
    seqs = [cache.add_sequence() for _ in range(batch)]
    _sync(device)
    start = time.perf_counter()
    first = [logits[-1].argmax() for logits in runner.prefill_batch(seqs, list(prompts), last_only=True)]
    _sync(device)
    ttft = (time.perf_counter() - start) / batch
    # a prompt's slots beyond the budget went back to the pool at the end of its prefill
    blocks_per_seq = policy.resident_blocks(config.block_size)
    decoder = runner.decode if config.eager else StaticDecoder(runner)
    tokens = torch.stack(first)
    times = []
    with torch.no_grad():
        for step in range(config.warmup + config.steps):
            start = time.perf_counter()
            tokens = decoder(seqs, tokens).argmax(-1)
            _sync(device)
            if step >= config.warmup:
                times.append(time.perf_counter() - start)
    ms = statistics.median(times) * 1e3
    blocks = sum(len(cache.blocks_of(s)) for s in seqs)
    if blocks_per_seq is not None and blocks > blocks_per_seq * batch:
        raise AssertionError(f"{policy.name} holds {blocks} blocks, more than its budget allows")
    name = f"sinklora_ext paged, {policy.name}" + ("" if config.eager else " (static)")
    del cache, runner, decoder
    return Row(name, policy.budget, ttft * 1e3, ms, batch / ms * 1e3, blocks)


def _hf_row(model, prompts: torch.Tensor, config, device, cache_implementation: str | None = None) -> Row:
    """transformers' greedy generate with SDPA attention and its default dynamic cache (or
    ``cache_implementation="static"``: preallocated, no copy per step); a logits processor stamps
    the time of every step (the prompt's forward first)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores):
            _sync(device)
            self.stamps.append(time.perf_counter())
            return scores

    new_tokens = 1 + config.warmup + config.steps
    clock = StepClock()
    common = dict(do_sample=False, pad_token_id=0, cache_implementation=cache_implementation)
    with use_attention(model, "sdpa"), torch.no_grad():
        warm = prompts[:, :16]
        model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=2, **common)
        _sync(device)
        start = time.perf_counter()
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, logits_processor=LogitsProcessorList([clock]), **common)
    assert out.shape[1] == prompts.shape[1] + new_tokens and len(clock.stamps) == new_tokens
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])][config.warmup:]
    ms = statistics.median(steps) * 1e3
    batch = prompts.shape[0]
    name = f"transformers generate ({cache_implementation or 'dynamic'} cache)"
    return Row(name, None, (clock.stamps[0] - start) / batch * 1e3, ms, batch / ms * 1e3, None)


@dataclass(kw_only=True)
class GenerateBenchConfig(DeviceOptions):
    """`sinklora bench generate`; the shape and context left out default by device (filled in when
    built)."""

    shape: str | None = option(None, choices=sorted(SHAPES),
                               help="random-weight model shape (default: llama-7b on a GPU, tiny on the CPU)")
    model: str | None = option(None, help="a checkpoint instead of a random shape ('default': SmolLM2)")
    batch: int = option(4, minimum=1)
    context: int | None = option(None, minimum=1, help="prompt tokens (default 16384 on a GPU, 512 on CPU)")
    budget_frac: float = option(0.2, unit_interval=True, help="h2o / streaming KV budget as a share of context")
    sinks: int = option(4, minimum=0)
    policies: str = option("full,h2o,streaming")
    steps: int = option(32, minimum=1, help="timed decode steps")
    warmup: int = option(3, minimum=0, help="untimed decode steps first (graph capture included)")
    block_size: int = option(16)
    eager: bool = option(False, help="dynamic decode steps instead of static (CUDA-graph) ones")
    no_hf: bool = option(False, help="skip transformers' generate")

    def fill_defaults(self) -> None:
        gpu = self.on_gpu()
        if self.model is None and self.shape is None:
            self.shape = "llama-7b" if gpu else "tiny"
        if self.context is None:
            self.context = 16384 if gpu else 512

    @property
    def policy_names(self) -> list[str]:
        return [p.strip() for p in self.policies.split(",") if p.strip()]

    @property
    def budget(self) -> int:
        """The h2o / streaming budget in tokens."""
        return max(int(round(self.budget_frac * self.context)), self.sinks + 2)

    def check(self) -> None:
        super().check()
        check_block_size(self)
        policies = self.policy_names
        if not policies or any(p not in POLICIES for p in policies):
            raise UsageError(f"--policies: each must be one of {list(POLICIES)}, got {self.policies!r}")
        if "h2o" in policies and self.budget < self.sinks + self.budget // 2:
            raise UsageError(f"--budget-frac x --context gives a kv budget of {self.budget}, less than --sinks "
                             f"({self.sinks}) + the recent half of it; raise --budget-frac or --context")


def check_inputs(config: GenerateBenchConfig) -> None:
    """A --model checkpoint on disk, or the memory of a random shape, before anything loads."""
    if config.model is not None:
        if config.model != "default":
            check_model_dir(config.model)
        return
    shape = SHAPES[config.shape]
    h, layers, kv_dim = shape["hidden_size"], shape["num_hidden_layers"], \
        shape["hidden_size"] // shape["num_attention_heads"] * shape["num_key_value_heads"]
    params = 2 * shape["vocab_size"] * h + layers * (2 * h * h + 2 * h * kv_dim + 3 * h * shape["intermediate_size"])
    tokens = config.batch * (config.context + config.warmup + config.steps + 1)
    check_memory((params + 2 * layers * kv_dim * tokens) * config.resolved_dtype().itemsize,
                 config.resolved_device(), f"--shape {config.shape} with --batch x --context")


def run(config: GenerateBenchConfig) -> dict:
    """Time every method on one model and batch; returns ``{"config", "rows"}``."""
    from ..kv_cache import CachePolicy

    check_inputs(config)
    device, dtype = config.resolved_device(), config.resolved_dtype()
    if config.model is not None:
        from ..hf.models import load_model

        model, _ = load_model(None if config.model == "default" else config.model, dtype=dtype, device=device)
        model_name = config.model
    else:
        model = random_model(config.shape, config.context, dtype, device)
        model_name = f"{config.shape} (random weights)"
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, vocab, (config.batch, config.context), generator=generator).to(device)
    budget = config.budget
    rows = []
    for name in config.policy_names:
        policy = CachePolicy(name, None if name == "full" else budget, config.sinks)
        rows.append(_engine_row(model, prompts, policy, config, device))
        _release(device)
    for cache_implementation in () if config.no_hf else (None, "static"):
        rows.append(_hf_row(model, prompts, config, device, cache_implementation))
        _release(device)
    full = next((r for r in rows if r.method.startswith("sinklora_ext paged, full")), None)
    hf = next((r for r in rows if r.method.startswith("transformers")), None)  # the dynamic cache: the default
    for r in rows:
        r.speedup_vs_full = full.ms_per_step / r.ms_per_step if full else 0.0
        r.speedup_vs_hf = hf.ms_per_step / r.ms_per_step if hf else 0.0
    setup = device_config(device, dtype, model=model_name,
                  layers=model.config.num_hidden_layers, heads_q=model.config.num_attention_heads,
                  heads_kv=model.config.num_key_value_heads, batch=config.batch, context=config.context,
                  kv_budget=budget, steps=config.steps, block_size=config.block_size, static=not config.eager)
    if device.type == "cuda":
        setup["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return {"config": setup, "rows": [asdict(r) for r in rows]}


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [
        f"Decode of {c['model']} on {c['device_name']} ({c['threads']} threads), {c['dtype']}: batch {c['batch']}, "
        f"context {c['context']}, h2o/streaming budget {c['kv_budget']} tokens, {c['steps']} timed steps, "
        f"torch {c['torch']}",
        f"{'method':<44}{'prefill ms':>11}{'ms/step':>10}{'tokens/s':>10}{'KV blocks':>11}{'vs full':>9}{'vs HF':>8}",
    ]
    for r in result["rows"]:
        blocks = "dense" if r["kv_blocks"] is None else str(r["kv_blocks"])
        lines.append(f"{r['method']:<44}{r['ttft_ms']:>11.1f}{r['ms_per_step']:>10.2f}{r['tokens_per_s']:>10.1f}"
                     f"{blocks:>11}{r['speedup_vs_full']:>9.2f}{r['speedup_vs_hf']:>8.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    from ..cli import main

    sys.exit(main(["bench", "generate", *sys.argv[1:]]))
