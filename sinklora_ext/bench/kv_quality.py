"""What a KV budget costs in quality: every eviction policy of :data:`~sinklora_ext.kv_cache.POLICIES`
at budgets that are shares of the context, on real text, against the full cache, in the same run.

Perplexity: for each text (Debian corpora by default), each prompt length ``P`` and each window
``w`` (tokens ``w * (P + N) ..`` of the text), the paged engine prefills the ``P``-token prompt with
full attention, cuts it to the budget under the policy, then teacher-forces the next ``N`` tokens
one at a time, the cache held at the budget throughout (every head evicts one key per step). The
NLL of those ``N`` tokens gives the perplexity; a row's ``vs_full`` is its perplexity over the full
cache's on the same windows. The texts' windows decode as one batch.

Passkey: ``--passkey-trials`` prompts of about ``P`` tokens hide a 5-digit key at depths spread
over (0, 1); the prompt is prefilled whole, cut to the budget, and the answer is greedy-decoded under
the policy; a trial is correct when the first number of the answer is the key.

Budgets count tokens per (sequence, layer, kv head): ``round(share * P)``. Run:
``sinklora bench kv-quality [--json]`` or ``python -m sinklora_ext.bench.kv_quality``.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cli.options import Config, option
from ..kv_cache import POLICIES, RECOMMENDED_POLICY, CachePolicy
from ..usage import UsageError, check_model_dir
from .common import device_config

DEFAULT_POLICIES = "h2o,streaming,tova,decay,mean,ema,snapkv-h2o,snapkv-ema"


@dataclass(kw_only=True)
class KvQualityBenchConfig(Config):
    """`sinklora bench kv-quality`."""

    model: str | None = option(None, help="Hugging Face checkpoint directory or .gguf file (default: the embedded "
                                           "SmolLM2-135M-Instruct)")
    text: list[str] = option(["debian-reference", "gnu-standards", "bash-reference"],
                             help="text files or corpus names, one batch row each")
    prompt_tokens: str = option("1024,2048", help="comma-separated prompt lengths P")
    new_tokens: int = option(512, minimum=2, help="teacher-forced tokens N after each prompt")
    windows: int = option(1, minimum=1, help="windows of P + N tokens per text")
    first_window: int = option(0, minimum=0, help="index of the first window of each text")
    budgets: str = option("0.1,0.2,0.25", help="comma-separated budgets as shares of P")
    policies: str = option(DEFAULT_POLICIES, help="comma-separated policies besides full")
    sinks: int = option(4, minimum=0)
    recent_frac: float | None = option(None, unit_interval=True,
                                       help="recent tokens as a share of the budget (default: each policy's own, "
                                            "half the budget)")
    passkey_trials: int = option(4, minimum=0, help="passkey prompts per length (0: skip)")
    block_size: int = option(16)
    threads: int | None = option(None, minimum=1, help="torch threads (default: torch's)")
    output: str | None = option(None, help="also write the JSON result to this file")

    @staticmethod
    def _list(text: str, kind, name: str) -> list:
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--{name}: comma-separated {kind.__name__} values, got {text!r}") from None
        if not values:
            raise UsageError(f"--{name} is empty")
        return values

    @property
    def prompt_lengths(self) -> list[int]:
        return self._list(self.prompt_tokens, int, "prompt-tokens")

    @property
    def budget_shares(self) -> list[float]:
        return self._list(self.budgets, float, "budgets")

    @property
    def policy_names(self) -> list[str]:
        return [p.strip() for p in self.policies.split(",") if p.strip()]

    def policy(self, name: str, prompt: int, share: float) -> CachePolicy:
        budget = max(int(round(share * prompt)), self.sinks + 2)
        recent = None if self.recent_frac is None or name == "streaming" else int(self.recent_frac * budget)
        return CachePolicy(name, budget, self.sinks, recent)

    def check(self) -> None:
        super().check()
        bad = [p for p in self.policy_names if p not in POLICIES or p == "full"]
        if bad or not self.policy_names:
            raise UsageError(f"--policies: each must be one of {[p for p in POLICIES if p != 'full']}, got "
                             f"{self.policies!r}")
        if any(p < 16 for p in self.prompt_lengths):
            raise UsageError(f"--prompt-tokens: each must be >= 16, got {self.prompt_tokens!r}")
        if any(not 0.0 < s < 1.0 for s in self.budget_shares):
            raise UsageError(f"--budgets: each must be in (0, 1), got {self.budgets!r}")
        for prompt in self.prompt_lengths:
            for share in self.budget_shares:
                for name in self.policy_names:
                    try:
                        self.policy(name, prompt, share)
                    except ValueError as e:
                        raise UsageError(f"--budgets {share} of --prompt-tokens {prompt} under {name}: {e}") from None


@torch.no_grad()
def continuation_nll(model, rows: torch.Tensor, prompt: int, policy: CachePolicy, block_size: int) -> torch.Tensor:
    """NLL ``[B, N]`` of tokens ``prompt .. prompt + N - 1`` of ``rows [B, prompt + N]``: the prompt
    prefilled (and cut to the budget), then teacher-forced one token at a time under ``policy``."""
    from ..engine import PagedLlama

    batch, total = rows.shape
    cache = PagedLlama.make_cache(model, policy, policy.slots_per_sequence(total, prompt), batch, block_size)
    runner = PagedLlama(model, cache)
    seqs = [cache.add_sequence() for _ in range(batch)]
    logits = [torch.cat(runner.prefill_batch(seqs, list(rows[:, :prompt]), last_only=True)).float()]
    for t in range(prompt, total - 1):
        logits.append(runner.decode(seqs, rows[:, t]).float())
    logits = torch.stack(logits, dim=1)  # [B, N, vocab]
    return F.cross_entropy(logits.flatten(0, 1), rows[:, prompt:].flatten(), reduction="none").view(batch, -1)


@torch.no_grad()
def passkey_accuracy(model, tokenizer, length: int, policy: CachePolicy, trials: int, block_size: int,
                     seed: int = 0) -> float:
    """Share of ``trials`` passkey prompts of about ``length`` tokens answered right under ``policy``."""
    from ..engine import PagedLlama
    from ..evaluate import _fit_filler, passkey_prompt

    rng = random.Random(seed)
    depths = [(i + 0.5) / trials for i in range(trials)]
    keys = [rng.randint(10000, 99999) for _ in depths]
    prompts = []
    for key, depth in zip(keys, depths):
        text = passkey_prompt(key, _fit_filler(tokenizer, length, depth), depth)
        prompts.append(tokenizer(text, return_tensors="pt", verbose=False).input_ids[0])
    new = 8
    longest = max(p.shape[0] for p in prompts)
    cache = PagedLlama.make_cache(model, policy, policy.slots_per_sequence(longest + new, longest), len(prompts),
                                  block_size)
    runner = PagedLlama(model, cache)
    seqs = [cache.add_sequence() for _ in prompts]
    device = next(model.parameters()).device
    logits = torch.cat(runner.prefill_batch(seqs, [p.to(device) for p in prompts], last_only=True))
    answers = [[] for _ in prompts]
    for _ in range(new):
        tokens = logits.argmax(-1)
        for a, t in zip(answers, tokens.tolist()):
            a.append(t)
        logits = runner.decode(seqs, tokens)
    correct = 0
    for key, answer in zip(keys, answers):
        found = re.search(r"\d+", tokenizer.decode(answer, skip_special_tokens=True))
        correct += found is not None and found.group(0) == str(key)
    return correct / len(prompts)


def _windows(config: KvQualityBenchConfig, tokenizer, prompt: int) -> tuple[torch.Tensor, list[str]]:
    from ..data import resolve_text_path, tokenize_file

    size = prompt + config.new_tokens
    rows, names = [], []
    for text in config.text:
        ids = tokenize_file(tokenizer, resolve_text_path(text))
        for w in range(config.first_window, config.first_window + config.windows):
            if ids.shape[0] < (w + 1) * size:
                raise UsageError(f"--text {text}: {ids.shape[0]} tokens, fewer than window {w} of {size} needs")
            rows.append(ids[w * size : (w + 1) * size])
            names.append(f"{text}#{w}")
    return torch.stack(rows), names


def run(config: KvQualityBenchConfig) -> dict:
    """Perplexity (and passkey accuracy) of every policy and budget against the full cache."""
    from tqdm.auto import tqdm

    from ..evaluate import load_for_eval

    if config.model is not None:
        check_model_dir(config.model)
    if config.threads:
        torch.set_num_threads(config.threads)
    model, tokenizer = load_for_eval(config.model, dtype=torch.float32)
    device = next(model.parameters()).device
    cells = [(p, s, name) for p in config.prompt_lengths for s in [None] + config.budget_shares
             for name in (["full"] if s is None else config.policy_names)]
    rows = []
    started = time.perf_counter()
    bar = tqdm(cells, desc="bench kv-quality", unit="run", file=sys.stderr)
    windows = {}
    full = {}
    for prompt, share, name in bar:
        bar.set_postfix_str(f"P={prompt} {name} {share or ''}")
        if prompt not in windows:
            windows[prompt] = _windows(config, tokenizer, prompt)
        ids, names = windows[prompt]
        policy = CachePolicy("full") if share is None else config.policy(name, prompt, share)
        t0 = time.perf_counter()
        nll = continuation_nll(model, ids.to(device), prompt, policy, config.block_size).double()
        per_text = [math.exp(float(x)) for x in nll.mean(dim=1)]
        ppl = math.exp(float(nll.mean()))
        accuracy = None
        if config.passkey_trials:
            accuracy = passkey_accuracy(model, tokenizer, prompt, policy, config.passkey_trials, config.block_size)
        if share is None:
            full[prompt] = (ppl, per_text)
        row = dict(policy=name, prompt_tokens=prompt, budget_share=share, kv_budget=policy.budget,
                   recent=policy.recent_tokens if policy.evicts else None, ppl=ppl, per_text=dict(zip(names, per_text)),
                   passkey=accuracy, seconds=round(time.perf_counter() - t0, 1))
        row["vs_full"] = ppl / full[prompt][0]
        rows.append(row)
    setup = device_config(device, torch.float32, model=config.model or "default", recommended=RECOMMENDED_POLICY,
                          texts=config.text,
                          windows=config.windows, first_window=config.first_window, new_tokens=config.new_tokens,
                          prompt_tokens=config.prompt_lengths, budgets=config.budget_shares, sinks=config.sinks,
                          recent_frac=config.recent_frac, passkey_trials=config.passkey_trials,
                          block_size=config.block_size, seconds=round(time.perf_counter() - started, 1))
    result = {"config": setup, "rows": rows}
    if config.output is not None:
        path = Path(config.output).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result) + "\n")
        tmp.replace(path)  # never a half-written result
    return result


def export_windows(config: KvQualityBenchConfig, path: str | Path) -> dict:
    """The bench's token windows at each prompt length and the model they are for, written to
    ``path`` (a ``torch.save`` of plain tensors, lists and strings) for the kvpress baselines,
    which run in their own environment (bench/kvpress_baseline.py)."""
    from ..evaluate import load_for_eval
    from ..hf.models import default_model_path

    if config.model is not None:
        check_model_dir(config.model)
    _, tokenizer = load_for_eval(config.model, dtype=torch.float32)
    windows = {prompt: _windows(config, tokenizer, prompt) for prompt in config.prompt_lengths}
    out = dict(model=config.model or default_model_path(), model_name=config.model or "default",
               texts=config.text, windows=config.windows, first_window=config.first_window,
               new_tokens=config.new_tokens, budgets=config.budget_shares, sinks=config.sinks,
               rows={p: ids for p, (ids, _) in windows.items()}, names={p: names for p, (_, names) in windows.items()})
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(out, tmp)
    tmp.replace(path)
    return out


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [f"KV budget vs quality, {c['model']} on {c['device_name']} ({c['threads']} threads): "
             f"{len(c['texts']) * c['windows']} windows, prompt + {c['new_tokens']} teacher-forced tokens"]
    for prompt in c["prompt_tokens"]:
        rows = [r for r in result["rows"] if r["prompt_tokens"] == prompt]
        full = next(r for r in rows if r["policy"] == "full")
        lines.append(f"P = {prompt}: full ppl {full['ppl']:.3f}"
                     + ("" if full["passkey"] is None else f", passkey {full['passkey']:.2f}"))
        shares = sorted({r["budget_share"] for r in rows if r["budget_share"] is not None})
        head = f"{'policy':<14}" + "".join(f"{f'{s:.0%} ppl':>11}{'vs full':>9}{'key':>6}" for s in shares)
        lines.append(head)
        for name in dict.fromkeys(r["policy"] for r in rows if r["policy"] != "full"):
            cells = ""
            for s in shares:
                r = next(x for x in rows if x["policy"] == name and x["budget_share"] == s)
                key = "" if r["passkey"] is None else f"{r['passkey']:.2f}"
                cells += f"{r['ppl']:>11.3f}{r['vs_full']:>9.3f}{key:>6}"
            lines.append(f"{name:<14}{cells}")
    return "\n".join(lines)


if __name__ == "__main__":
    from ..cli import main

    sys.exit(main(["bench", "kv-quality", *sys.argv[1:]]))
