"""Benchmark of the SF-Attn op against the attention users would otherwise pick.

Peers, in the same run: torch SDPA with full causal attention, LongLoRA's S²-Attn (roll + reshape
into groups + SDPA), and FlexAttention with the same block mask (CUDA). Times forward and
forward+backward; throughput counts only visible (query, key) pairs; ratios are against SDPA.
Run: ``sinklora bench attention [--quick] [--json]`` or ``python -m sinklora_ext.bench.attention``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..attention import sf_attention
from ..cli.options import DeviceOptions, option
from ..patterns import group_size_for
from ..reference import sf_visibility_mask
from ..usage import UsageError, check_memory
from .common import device_config, forward_closures, time_fn

MAX_HEAD_DIM = 256  # the largest head dim the SF-Attn kernels take


def visible_pairs(seqlen: int, group_size: int, num_sinks: int, shift: str, num_heads: int) -> int:
    """Number of visible (query, key) pairs over all heads, from the segment arithmetic of docs/attention.md."""
    n, g, s = seqlen, group_size, group_size // 2
    i = torch.arange(n, dtype=torch.int64)

    def count(seg_start: torch.Tensor) -> torch.Tensor:
        return (i + 1 - seg_start) + torch.clamp(seg_start, max=num_sinks)

    unshifted = count((i // g) * g)
    if shift == "none":
        shifted = unshifted
    elif shift == "nowrap":
        shifted = count(torch.clamp((i + s) // g * g - s, min=0))
    else:
        wrapped = i < s
        start = torch.where(wrapped, torch.zeros_like(i), (i - s).div(g, rounding_mode="floor") * g + s)
        shifted = torch.where(wrapped, i + 1 + (g - s), count(start))
    half = num_heads // 2 if shift != "none" else num_heads
    return int(unshifted.sum()) * half + int(shifted.sum()) * (num_heads - half)


def longlora_s2_attention(q, k, v, group_size: int, shift: bool = True):
    """LongLoRA's S²-Attn as its reference code runs it: roll half the heads by -G/2, reshape the
    sequence into groups, causal SDPA inside each group, reshape and roll back (needs N % G == 0)."""
    b, n, hq, d = q.shape
    rep = hq // k.shape[2]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    g, half = group_size, hq // 2

    def group(t):
        if shift:
            t = torch.cat((t[:, :, :half], t[:, :, half:].roll(-(g // 2), dims=1)), dim=2)
        return t.reshape(b * n // g, g, hq, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(group(q), group(k), group(v), is_causal=True)
    out = out.transpose(1, 2).reshape(b, n, hq, d)
    if shift:
        out = torch.cat((out[:, :, :half], out[:, :, half:].roll(g // 2, dims=1)), dim=2)
    return out


def sdpa_causal(q, k, v):
    """Full causal SDPA on its fastest path: enable_gqa on CUDA; on the CPU the fused kernel does not
    take GQA, so K/V are repeated (and the repeat is timed)."""
    rep = q.shape[2] // k.shape[2]
    if rep > 1 and q.device.type == "cpu":
        k, v, rep = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2), 1
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=rep > 1).transpose(1, 2)


def make_flex(seqlen: int, group_size: int, num_sinks: int, shift: str, heads: int, device):
    """FlexAttention with the same pattern as a block mask (compiled); None where unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    mask = sf_visibility_mask(seqlen, group_size, num_sinks, shift, heads, device)

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[h, q_idx, kv_idx]

    block_mask = create_block_mask(mask_mod, None, heads, seqlen, seqlen, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v):
        rep = q.shape[2] // k.shape[2]
        out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                       enable_gqa=rep > 1)
        return out.transpose(1, 2)

    return run


@dataclass
class Row:
    method: str
    pattern: str
    fwd_ms: float
    fwdbwd_ms: float
    fwd_tflops: float
    fwdbwd_tflops: float
    fwd_speedup: float
    fwdbwd_speedup: float
    peak_mem_mb: float | None


@dataclass(kw_only=True)
class AttentionBenchConfig(DeviceOptions):
    """`sinklora bench attention`; sizes left out default by device (filled in when built)."""

    batch: int = option(1, minimum=1)
    seqlen: int | None = option(None, minimum=1, help="default 4096 on CPU, 16384 on GPU")
    heads_q: int | None = option(None, minimum=1, help="default 8 on CPU, 32 on GPU")
    heads_kv: int | None = option(None, minimum=1, help="default = heads-q on CPU, 8 on GPU")
    head_dim: int | None = option(None, minimum=1, help="default 64 on CPU, 128 on GPU")
    group_ratio: float = option(0.25, unit_interval=True)
    sinks: int = option(4, minimum=0)
    repeats: int = option(5, minimum=1)
    flex: bool = option(False, help="also run FlexAttention on the CPU (slow compile)")
    quick: bool = option(False, help="a small problem, for a smoke run")

    def fill_defaults(self) -> None:
        if self.quick:
            defaults = dict(seqlen=1024, heads_q=4, heads_kv=2, head_dim=64)
            self.repeats = min(self.repeats, 3)
        elif self.on_gpu():
            defaults = dict(seqlen=16384, heads_q=32, heads_kv=8, head_dim=128)
        else:
            defaults = dict(seqlen=4096, heads_q=8, heads_kv=None, head_dim=64)
        for key, value in defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.heads_kv is None:
            self.heads_kv = self.heads_q

    def check(self) -> None:
        super().check()
        if self.head_dim > MAX_HEAD_DIM:
            raise UsageError(f"--head-dim must be <= {MAX_HEAD_DIM}, got {self.head_dim}")
        if self.heads_q % self.heads_kv:
            raise UsageError(f"--heads-q ({self.heads_q}) must be a multiple of --heads-kv ({self.heads_kv})")


def check_memory_for(config: AttentionBenchConfig) -> None:
    """Refuse a problem whose tensors would not fit, before anything is allocated."""
    # q, dout, out, dq and k, v, dk, dv, each twice (the inputs' copies that take gradients)
    nbytes = 2 * 4 * config.batch * config.seqlen * (config.heads_q + config.heads_kv) * config.head_dim \
        * config.resolved_dtype().itemsize
    check_memory(nbytes, config.resolved_device(), "--batch x --seqlen x heads x --head-dim")


def run(config: AttentionBenchConfig) -> dict:
    """Time every method on one problem; returns ``{"config", "rows"}``."""
    check_memory_for(config)
    device, dtype = config.resolved_device(), config.resolved_dtype()
    b, n, hq, hkv, d = config.batch, config.seqlen, config.heads_q, config.heads_kv, config.head_dim
    g = group_size_for(n, config.group_ratio)
    torch.manual_seed(0)
    q = torch.randn(b, n, hq, d, device=device, dtype=dtype)
    k = torch.randn(b, n, hkv, d, device=device, dtype=dtype)
    v = torch.randn(b, n, hkv, d, device=device, dtype=dtype)
    dout = torch.randn_like(q)

    full_pairs = visible_pairs(n, n, 0, "none", hq) * b
    methods: list[tuple[str, str, int, Callable]] = [
        ("torch SDPA", "full causal", full_pairs, sdpa_causal),
        ("sinklora_ext", "sf", visible_pairs(n, g, config.sinks, "none", hq) * b,
         lambda q, k, v: sf_attention(q, k, v, g, config.sinks, "none")),
        ("sinklora_ext", "s2 (roll)", visible_pairs(n, g, 0, "roll", hq) * b,
         lambda q, k, v: sf_attention(q, k, v, g, 0, "roll")),
        ("sinklora_ext", "s2_nowrap", visible_pairs(n, g, 0, "nowrap", hq) * b,
         lambda q, k, v: sf_attention(q, k, v, g, 0, "nowrap")),
        ("LongLoRA reshape+SDPA", "s2 (roll)", visible_pairs(n, g, 0, "roll", hq) * b,
         lambda q, k, v: longlora_s2_attention(q, k, v, g)),
    ]
    if device.type == "cuda" or config.flex:
        for name, sinks, shift in (("sf", config.sinks, "none"), ("s2 (roll)", 0, "roll")):
            flex = make_flex(n, g, sinks, shift, hq, device)
            if flex is not None:
                methods.append(("FlexAttention", name, visible_pairs(n, g, sinks, shift, hq) * b, flex))

    rows: list[Row] = []
    baseline = None
    for name, pattern, pairs, fn in methods:
        fwd, fwdbwd = forward_closures(fn, q, k, v, dout)

        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t_f = time_fn(fwd, device, config.repeats)
        t_fb = time_fn(fwdbwd, device, config.repeats)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        flops = 4.0 * pairs * d
        if baseline is None:
            baseline = (t_f, t_fb)
        rows.append(Row(name, pattern, t_f * 1e3, t_fb * 1e3, flops / t_f / 1e12, 3.5 * flops / t_fb / 1e12,
                        baseline[0] / t_f, baseline[1] / t_fb, peak))

    setup = device_config(device, dtype, batch=b, seqlen=n, heads_q=hq, heads_kv=hkv, head_dim=d, group_size=g,
                           sinks=config.sinks)
    return {"config": setup, "rows": [asdict(r) for r in rows]}


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [
        f"SF-Attn benchmark on {c['device_name']} ({c['threads']} threads), {c['dtype']}, B={c['batch']} "
        f"N={c['seqlen']} Hq={c['heads_q']} Hkv={c['heads_kv']} D={c['head_dim']} G={c['group_size']} "
        f"sinks={c['sinks']}, torch {c['torch']}",
        f"{'method':<24}{'pattern':<14}{'fwd ms':>9}{'fwd+bwd ms':>12}{'fwd TF/s':>10}{'f+b TF/s':>10}"
        f"{'fwd x':>8}{'f+b x':>8}{'peak MB':>9}",
    ]
    for r in result["rows"]:
        mem = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else "-"
        lines.append(
            f"{r['method']:<24}{r['pattern']:<14}{r['fwd_ms']:>9.2f}{r['fwdbwd_ms']:>12.2f}{r['fwd_tflops']:>10.3f}"
            f"{r['fwdbwd_tflops']:>10.3f}{r['fwd_speedup']:>8.2f}{r['fwdbwd_speedup']:>8.2f}{mem:>9}")
    lines.append("x = speedup over torch SDPA full causal in the same run; TF/s counts visible pairs only.")
    return "\n".join(lines)


if __name__ == "__main__":
    from ..cli import main

    sys.exit(main(["bench", "attention", *sys.argv[1:]]))
