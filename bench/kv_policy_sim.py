"""A dense float64 simulator of the eviction rules on the real model, beside the paged engine.

The model runs over one K/V buffer per layer that holds every token; each (layer, sequence, kv
head) masks the keys its policy has evicted, ranks them as the kernels do (docs/paged_kv.md) and
keeps exactly the budget. It reproduces `sinklora bench kv-quality` (``ema`` at 20% of a 1,024-token
prompt: 13.881 in both) and measures what the engine does not have: variants of a rule before they
are built into the kernels, and a lookahead oracle that ranks each key by the attention the full
cache's later queries give it, a bound for any rule that ranks keys by attention.

    .venv/bin/python bench/kv_policy_sim.py --prompt-tokens 1024 --first-window 1 --runs \\
        '[{"policy": "ema", "share": 0.2}, {"policy": "oracle", "share": 0.2, "sinks": 0, "recent": 0}]'

A run: ``policy`` (a scored name of POLICIES without a snapkv-/pyramidkv- prefix, or ``oracle``),
``share`` of the prompt (or ``budget`` in tokens), ``sinks``, ``recent``, ``score_decay``
(CachePolicy's defaults), and the variants: ``shared`` (one kept set per layer, ranks summed over
its kv heads), ``vnorm`` (rank times the value's norm), ``adakv`` (a layer's kv heads share its
budget: the lowest ranks across them go), ``oracle_at`` (``prefill`` or ``decode``: the oracle in
that phase only, the policy's rule in the other), ``max_score`` (a key's score is the largest
decayed attention one query gave it instead of the sum), ``dual`` (``mean``/``ema``: the larger of
the rule's rank and the undecayed mean, so a key stays if it is in either's favour). Prints a JSON line per run (perplexity of the
continuation, its ratio to the full cache's); ``--output`` writes them all.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

ATTENTION_NAME = "sinklora_kv_policy_sim"
VARIANTS = ("shared", "vnorm", "adakv", "oracle_at")


@dataclass
class SimRun:
    policy: str = "full"
    budget: int | None = None
    sinks: int = 4
    recent: int | None = None
    score_decay: float | None = None
    shared: bool = False
    vnorm: bool = False
    adakv: bool = False
    oracle_at: str | None = None
    max_score: bool = False
    dual: bool = False

    @classmethod
    def parse(cls, spec: dict, prompt: int) -> "SimRun":
        spec = dict(spec)
        share = spec.pop("share", None)
        if share is not None:
            spec["budget"] = max(int(round(share * prompt)), spec.get("sinks", 4) + 2)
        unknown = set(spec) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"--runs: unknown keys {sorted(unknown)}")
        run = cls(**spec)
        if run.oracle_at not in (None, "prefill", "decode"):
            raise ValueError(f"--runs: oracle_at must be prefill or decode, got {run.oracle_at!r}")
        return run

    @property
    def cache_policy(self):
        """The policy whose rule (decay, rank) and protections the run takes; an oracle run takes
        ``h2o``'s protections with its own ``recent``."""
        from sinklora_ext.kv_cache import CachePolicy

        name = "h2o" if self.policy == "oracle" else self.policy
        if name == "full":
            return CachePolicy("full")
        recent = self.recent if self.recent is not None or self.policy != "oracle" else 0
        return CachePolicy(name, self.budget, self.sinks, recent, self.score_decay)


@dataclass
class DenseEvictionSim:
    """The state of one run: per layer the K/V of every token, the scores and the kept mask."""

    run: SimRun
    prompt: int
    total: int
    future: list[torch.Tensor] | None = None  # per layer [B, Hkv, N + 1, total]: attention from queries >= j
    record: list[torch.Tensor] | None = None  # per layer [B, Hkv, N, total]: a full run's decode attention
    step: int | None = None  # position of the token being decoded (None in the prompt)
    layers: dict = field(default_factory=dict)

    def __post_init__(self):
        policy = self.run.cache_policy
        self.evicts = policy.evicts
        self.decay = policy.decay_factor
        self.rank_rule = policy.eviction_rank if policy.evicts else "h2o"
        self.num_sinks = policy.num_sinks if policy.evicts else 0
        self.recent = policy.recent_tokens if policy.evicts else 0

    # -- attention ----------------------------------------------------------------------------

    def attend(self, layer: int, query, key, value, scaling: float) -> torch.Tensor:
        b, hq, n, d = query.shape
        hkv = key.shape[1]
        g = hq // hkv
        if self.step is None:
            kv = torch.zeros(2, b, hkv, self.total, d, dtype=torch.float64)
            kv[0, :, :, :n], kv[1, :, :, :n] = key, value
            self.layers[layer] = st = dict(kv=kv, scores=torch.zeros(b, hkv, self.total, dtype=torch.float64),
                                           keep=torch.zeros(b, hkv, self.total, dtype=torch.bool))
            t = n
        else:
            st = self.layers[layer]
            t = self.step + 1
            st["kv"][0, :, :, t - 1], st["kv"][1, :, :, t - 1] = key[:, :, 0], value[:, :, 0]
        k, v = st["kv"][0, :, :, :t], st["kv"][1, :, :, :t]
        s = (query.double().reshape(b, hkv, g * n, d) @ k.transpose(-1, -2)).view(b, hkv, g, n, t) * scaling
        if self.step is None:
            s = s.masked_fill(~torch.ones(n, t, dtype=torch.bool).tril(), float("-inf"))
            p = torch.softmax(s, -1)
            weights = self.decay ** torch.arange(n - 1, -1, -1, dtype=torch.float64)  # 0 ** 0 = 1
            if self.run.max_score:
                st["scores"][..., :t] = (p.sum(2) * weights[:, None]).amax(2)
            else:
                st["scores"][..., :t] = torch.einsum("bkgij,i->bkj", p, weights)
            st["keep"][..., :t] = True
            if self.run.dual:
                st["long"] = torch.zeros_like(st["scores"])
                st["long"][..., :t] = p.sum((2, 3))
            if self.evicts and t > self.run.budget:
                self._compact(layer, st, t)
        else:
            st["keep"][..., t - 1] = True
            p = torch.softmax(s.masked_fill(~st["keep"][..., :t][:, :, None, None], float("-inf")), -1)
            cols = p.sum((2, 3))
            if self.record is not None:
                self.record[layer][:, :, self.step - self.prompt, :t] = cols.float()
            if self.run.dual:
                st["long"][..., :t] += cols
            if self.run.max_score:
                st["scores"][..., :t] = torch.maximum(st["scores"][..., :t] * self.decay, cols)
            else:
                st["scores"][..., :t] = st["scores"][..., :t] * self.decay + cols
            if self.evicts:
                self._evict(layer, st, t)
        out = (p.view(b, hkv, g * n, t) @ v).view(b, hq, n, d)
        return out.to(query.dtype).transpose(1, 2).contiguous()

    # -- ranks and eviction ---------------------------------------------------------------------

    def _rank(self, layer: int, st: dict, t: int) -> torch.Tensor:
        from sinklora_ext.kv_cache import seen_weight

        phase = "prefill" if self.step is None else "decode"
        if self.run.policy == "oracle" or self.run.oracle_at == phase:
            j = 0 if self.step is None else self.step - self.prompt + 1
            r = self.future[layer][:, :, j, :t].double().clone()
        else:
            r = st["scores"][..., :t].clone()
            if self.rank_rule == "mean":
                seen = t - torch.arange(t, dtype=torch.float64)
                r /= seen_weight(seen, self.decay)
                if self.run.dual:
                    r = torch.maximum(r, st["long"][..., :t] / seen)
        if self.run.vnorm:
            r *= st["kv"][1, :, :, :t].norm(dim=-1)
        if self.run.shared:
            r = (r * st["keep"][..., :t]).sum(1, keepdim=True).expand_as(r).clone()
        pos = torch.arange(t)
        return r.masked_fill((pos < self.num_sinks) | (pos > t - 1 - self.recent), float("inf"))

    def _compact(self, layer: int, st: dict, t: int) -> None:
        r = self._rank(layer, st, t)
        b, hkv, _ = r.shape
        keep = torch.zeros(b, hkv, t, dtype=torch.bool)
        if self.run.adakv:
            keep.view(b, -1).scatter_(-1, r.reshape(b, -1).topk(self.run.budget * hkv, -1).indices, True)
        else:
            keep.scatter_(-1, r.topk(self.run.budget, -1).indices, True)
        st["keep"][..., :t] = keep

    def _evict(self, layer: int, st: dict, t: int) -> None:
        keep = st["keep"][..., :t]
        r = self._rank(layer, st, t).masked_fill(~keep, float("inf"))
        b, hkv, _ = r.shape
        if self.run.adakv:
            for i in range(b):
                extra = int(keep[i].sum()) - self.run.budget * hkv
                if extra > 0:
                    gone = r[i].reshape(-1).topk(extra, largest=False).indices
                    st["keep"][i, gone // t, gone % t] = False
            return
        over = keep.sum(-1) > self.run.budget
        rows, heads = over.nonzero(as_tuple=True)
        st["keep"][rows, heads, r.argmin(-1)[rows, heads]] = False


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    return module.kv_policy_sim.attend(module.layer_idx, query, key, value, scaling), None


@torch.no_grad()
def continuation_nll(model, rows: torch.Tensor, sim: DenseEvictionSim) -> torch.Tensor:
    """NLL ``[B, N]`` of tokens ``prompt ..`` of ``rows``: the prompt in one pass, then one token at a time."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _attention)
    previous = model.config._attn_implementation
    attention = [layer.self_attn for layer in model.model.layers]
    model.config._attn_implementation = ATTENTION_NAME
    for a in attention:
        a.kv_policy_sim = sim
    try:
        batch, total = rows.shape
        sim.step = None
        logits = [model(input_ids=rows[:, :sim.prompt], use_cache=False, logits_to_keep=1).logits[:, -1].float()]
        for t in range(sim.prompt, total - 1):
            sim.step = t
            position = torch.full((batch, 1), t, dtype=torch.long)
            logits.append(model(input_ids=rows[:, t:t + 1], position_ids=position, use_cache=False).logits[:, -1].float())
    finally:
        model.config._attn_implementation = previous
        for a in attention:
            del a.kv_policy_sim
    logits = torch.stack(logits, 1)
    return F.cross_entropy(logits.flatten(0, 1), rows[:, sim.prompt:].flatten(), reduction="none").view(batch, -1)


def lookahead(model, rows: torch.Tensor, prompt: int) -> list[torch.Tensor]:
    """Per layer ``[B, Hkv, N, total]``: the attention each key gets from the continuation queries
    ``>= j`` under the full cache (``j = N``: none)."""
    cfg = model.config
    n = rows.shape[1] - prompt
    record = [torch.zeros(rows.shape[0], cfg.num_key_value_heads, n, rows.shape[1]) for _ in range(cfg.num_hidden_layers)]
    continuation_nll(model, rows, DenseEvictionSim(SimRun(), prompt, rows.shape[1], record=record))
    return [torch.cat([r.flip(2).cumsum(2).flip(2), torch.zeros_like(r[:, :, :1])], 2) for r in record]


def simulate(model, rows: torch.Tensor, prompt: int, runs: list[SimRun], progress=None) -> list[dict]:
    """Perplexity of every run (and of the full cache, first) on ``rows [B, prompt + N]``."""
    future = lookahead(model, rows, prompt) if any("oracle" in (r.policy, r.oracle_at) for r in runs) else None
    out, full = [], None
    for run in [SimRun(), *runs]:
        t0 = time.perf_counter()
        nll = continuation_nll(model, rows, DenseEvictionSim(run, prompt, rows.shape[1], future=future)).double()
        ppl = math.exp(float(nll.mean()))
        full = full or ppl
        row = dict(run={k: v for k, v in vars(run).items() if v not in (None, False)}, prompt_tokens=prompt,
                   ppl=ppl, vs_full=ppl / full, per_text=[math.exp(float(x)) for x in nll.mean(1)],
                   seconds=round(time.perf_counter() - t0, 1))
        out.append(row)
        if progress is not None:
            progress(row)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="a JSON list of runs (see above)")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--first-window", type=int, default=1)
    parser.add_argument("--text", nargs="+", default=None, help="as `bench kv-quality --text`")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    from sinklora_ext.bench.kv_quality import KvQualityBenchConfig, _windows
    from sinklora_ext.evaluate import load_for_eval

    if args.threads:
        torch.set_num_threads(args.threads)
    config = KvQualityBenchConfig(prompt_tokens=str(args.prompt_tokens), new_tokens=args.new_tokens,
                                  first_window=args.first_window, **({"text": args.text} if args.text else {}))
    config.check()
    runs = [SimRun.parse(r, args.prompt_tokens) for r in json.loads(args.runs)]
    model, tokenizer = load_for_eval(None, dtype=torch.float32)
    rows, names = _windows(config, tokenizer, args.prompt_tokens)
    result = simulate(model, rows, args.prompt_tokens, runs, progress=lambda r: print(json.dumps(r), flush=True))
    if args.output:
        path = Path(args.output)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(texts=names, new_tokens=args.new_tokens, rows=result), indent=1) + "\n")
        tmp.replace(path)
    return result


if __name__ == "__main__":
    main()
