"""`sinklora demo`: the attention patterns drawn, the op checked against the float64 reference, and
a quick benchmark against torch SDPA on this machine."""

from __future__ import annotations

import argparse
import json

import torch

from .attention import sf_attention
from .patterns import PRESETS, resolve_pattern
from .reference import sf_attention_ref, sf_visibility_mask


def draw(mask: torch.Tensor) -> str:
    return "\n".join("".join("#" if x else "." for x in row.tolist()) for row in mask)


def main(args) -> dict:
    n, heads = 16, 2
    print(f"Visibility for N={n} (group ratio 1/4 -> G=4, rows = queries, # = visible key); "
          "left: unshifted heads, right: shifted heads\n")
    for name in PRESETS:
        pat = resolve_pattern(name, n, num_sinks=2 if PRESETS[name].num_sinks else None)
        mask = sf_visibility_mask(n, pat.group_size, pat.num_sinks, pat.shift, heads)
        print(f"{name}: G={pat.group_size} sinks={pat.num_sinks} shift={pat.shift}")
        for left, right in zip(draw(mask[0]).splitlines(), draw(mask[1]).splitlines()):
            print(f"  {left}   {right}")
        print()

    torch.manual_seed(0)
    report = {"max_abs_err": {}}
    q = torch.randn(2, 300, 8, 64, dtype=torch.float64)
    k = torch.randn(2, 300, 2, 64, dtype=torch.float64)
    v = torch.randn(2, 300, 2, 64, dtype=torch.float64)
    print("Op vs float64 reference (B=2, N=300, Hq=8, Hkv=2, D=64, float32):")
    for name in PRESETS:
        pat = resolve_pattern(name, 300 if name != "s2" else 300, group_ratio=0.25)
        out = sf_attention(q.float(), k.float(), v.float(), pat.group_size, pat.num_sinks, pat.shift)
        ref = sf_attention_ref(q, k, v, pat.group_size, pat.num_sinks, pat.shift)
        err = (out.double() - ref).abs().max().item()
        report["max_abs_err"][name] = err
        print(f"  {name:<10} max |err| = {err:.2e}")
    print()

    from . import bench_attention

    bench_args = argparse.Namespace(device="auto", dtype=None, batch=1, seqlen=None, heads_q=None, heads_kv=None,
                                    head_dim=None, group_ratio=0.25, sinks=4, repeats=3, flex=False, quick=False,
                                    json=False)
    report["bench"] = bench_attention.main(bench_args)
    if getattr(args, "json", False):
        print(json.dumps(report))
    return report
