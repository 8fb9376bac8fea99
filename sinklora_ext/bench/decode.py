"""Benchmark of paged decode with fused H2O scores against the peers, in the same run.

Rows: our paged decode with scores, the same kernel without scores, torch SDPA over the same keys in
a dense (already gathered) cache, FlashInfer's paged decode where it is installed (GPU). Achieved
bandwidth counts the K/V bytes each step must read, against a measured device copy peak. Eviction
(one select_evictions launch per layer) and prefill scores are reported as a fraction of a decode step.
Run: ``sinklora bench decode [--json]`` or ``python -m sinklora_ext.bench.decode``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..cli.options import DeviceOptions, option
from ..paged import causal_prefill, paged_decode, paged_write_, select_evictions
from ..usage import UsageError, check_block_size, check_memory
from .common import device_config, time_fn


@dataclass
class Row:
    method: str
    ms: float
    gbps: float
    frac_of_copy_peak: float
    vs_sdpa: float


def copy_peak_gbps(device, nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / t / 1e9  # read + write


@dataclass(kw_only=True)
class DecodeBenchConfig(DeviceOptions):
    """`sinklora bench decode`; sizes left out default by device (filled in when built)."""

    batch: int | None = option(None, minimum=1, help="default 8 on CPU, 32 on GPU")
    context: int | None = option(None, minimum=1, help="default 2048 on CPU, 8192 on GPU")
    heads_q: int = option(32, minimum=1)
    heads_kv: int = option(8, minimum=1)
    head_dim: int = option(128, minimum=1)
    block_size: int = option(16)
    prefill: int = option(1024, minimum=1, help="prompt tokens for the prefill-score cost")
    repeats: int = option(10, minimum=1)

    def fill_defaults(self) -> None:
        gpu = self.on_gpu()
        if self.batch is None:
            self.batch = 32 if gpu else 8
        if self.context is None:
            self.context = 8192 if gpu else 2048

    def check(self) -> None:
        super().check()
        check_block_size(self)
        if self.heads_q % self.heads_kv:
            raise UsageError(f"--heads-q ({self.heads_q}) must be a multiple of --heads-kv ({self.heads_kv})")


def check_memory_for(config: DecodeBenchConfig) -> None:
    """Refuse a problem whose tensors would not fit, before anything is allocated."""
    device = config.resolved_device()
    # paged K/V and their dense copies (repeated to the query heads for SDPA on the CPU)
    dense_heads = config.heads_q if device.type == "cpu" else config.heads_kv
    nbytes = 2 * config.batch * config.context * (config.heads_kv + dense_heads) * config.head_dim \
        * config.resolved_dtype().itemsize
    check_memory(nbytes, device, "--batch x --context x heads x --head-dim")


def run(config: DecodeBenchConfig) -> dict:
    """Time every method on one problem; returns ``{"config", "rows", ...}``."""
    check_memory_for(config)
    device, dtype = config.resolved_device(), config.resolved_dtype()
    b, n, bs = config.batch, config.context, config.block_size
    hq, hkv, d = config.heads_q, config.heads_kv, config.head_dim
    blocks_per_seq = -(-n // bs)
    num_blocks = b * blocks_per_seq + 8
    torch.manual_seed(0)
    k_cache = torch.randn(num_blocks, bs, hkv, d, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    scores = torch.zeros(num_blocks, bs, hkv, device=device, dtype=torch.float32)
    tables = torch.randperm(num_blocks, device=device)[: b * blocks_per_seq].view(b, blocks_per_seq).int()
    lens = torch.full((b,), n, device=device, dtype=torch.int32)
    # as a cache holds them: slot t of every sequence and kv head has seen position t
    positions = torch.zeros(num_blocks, bs, hkv, device=device, dtype=torch.int32)
    slot = torch.arange(n, device=device)
    positions[tables.long()[:, slot // bs], slot % bs] = slot.int()[None, :, None].expand(b, n, hkv)
    q = torch.randn(b, hq, d, device=device, dtype=dtype)
    # the same keys gathered into a dense [B, Hkv, N, D] cache, as a dense HF decode would hold them
    t = torch.arange(n, device=device)
    k_dense = k_cache[tables.long()[:, t // bs], t % bs].permute(0, 2, 1, 3).contiguous()
    v_dense = v_cache[tables.long()[:, t // bs], t % bs].permute(0, 2, 1, 3).contiguous()

    kv_bytes = 2 * b * n * hkv * d * k_cache.element_size()
    peak = copy_peak_gbps(device, max(kv_bytes, 1 << 26), config.repeats)
    rep = hq // hkv

    # SDPA gets its best case: on CUDA enable_gqa; on the CPU (no fused GQA) K/V repeated ahead of time
    if device.type == "cpu" and rep > 1:
        k_dense, v_dense = k_dense.repeat_interleave(rep, 1), v_dense.repeat_interleave(rep, 1)

    def sdpa():
        return F.scaled_dot_product_attention(q[:, :, None], k_dense, v_dense,
                                              enable_gqa=device.type == "cuda" and rep > 1)

    methods = [
        ("torch SDPA, dense cache", sdpa),
        ("paged_decode + H2O scores", lambda: paged_decode(q, k_cache, v_cache, tables, lens, scores=scores)),
        ("paged_decode, no scores", lambda: paged_decode(q, k_cache, v_cache, tables, lens)),
    ]
    flashinfer = _flashinfer_decode(q, k_cache, v_cache, tables, lens) if device.type == "cuda" else None
    if flashinfer is not None:
        methods.append(("FlashInfer paged decode", flashinfer))
    rows, base = [], None
    with torch.no_grad():
        for name, fn in methods:
            ms = time_fn(fn, device, config.repeats, warmup=2) * 1e3
            base = base or ms
            gbps = kv_bytes / (ms / 1e3) / 1e9
            rows.append(Row(name, ms, gbps, gbps / peak, base / ms))
        decode_ms = rows[1].ms
        evict_ms = time_fn(lambda: select_evictions(scores, positions, tables, lens, 4, n // 2), device, config.repeats) * 1e3
        # the ema rule: the rank over the decayed query count, then every score decays in place
        ema_scores = scores.clone()
        evict_ema_ms = time_fn(lambda: select_evictions(ema_scores, positions, tables, lens, 4, 50, "mean", 0.99),
                               device, config.repeats) * 1e3
        k_new = torch.randn(b, hkv, d, device=device, dtype=dtype)
        slots = (tables[:, -1:].long() * bs).expand(b, hkv).contiguous().int()
        write_ms = time_fn(lambda: paged_write_(k_new, k_new, k_cache, v_cache, slots, scores, None, positions, lens),
                           device, config.repeats) * 1e3
        p = min(n, config.prefill)
        qp = torch.randn(1, p, hq, d, device=device, dtype=dtype)
        kp = torch.randn(1, p, hkv, d, device=device, dtype=dtype)
        attn_ms = time_fn(lambda: causal_prefill(qp, kp, kp, with_scores=False), device, 3) * 1e3
        attn_scores_ms = time_fn(lambda: causal_prefill(qp, kp, kp), device, 3) * 1e3

    setup = device_config(device, dtype, batch=b, context=n, heads_q=hq, heads_kv=hkv, head_dim=d, block_size=bs)
    extra = dict(copy_peak_gbps=peak, kv_bytes=kv_bytes, scores_overhead=rows[1].ms / rows[2].ms - 1,
                 evict_ms=evict_ms, evict_frac_of_step=evict_ms / decode_ms, evict_ema_ms=evict_ema_ms,
                 ema_step_vs_h2o=(decode_ms + evict_ema_ms) / (decode_ms + evict_ms) - 1, write_ms=write_ms,
                 write_frac_of_step=write_ms / decode_ms, prefill_tokens=p,
                 prefill_attention_ms=attn_ms, prefill_scores_ms=attn_scores_ms - attn_ms,
                 prefill_scores_frac_of_prefill=(attn_scores_ms - attn_ms) / attn_ms)
    return {"config": setup, "rows": [asdict(r) for r in rows], **extra}


def _flashinfer_decode(q, k_cache, v_cache, tables, lens):
    try:
        import flashinfer
    except ImportError:
        return None
    b, bs = tables.shape[0], k_cache.shape[1]
    blocks = -(-lens.long() // bs)
    indptr = torch.cat([blocks.new_zeros(1), blocks.cumsum(0)]).int()
    indices = torch.cat([tables[i, : blocks[i]] for i in range(b)]).int()
    last = (lens - (blocks - 1) * bs).int()
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=q.device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
    wrapper.plan(indptr, indices, last, q.shape[1], k_cache.shape[2], q.shape[2], bs, q_data_type=q.dtype,
                 kv_data_type=k_cache.dtype)
    return lambda: wrapper.run(q, (k_cache, v_cache))


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [
        f"Paged decode on {c['device_name']} ({c['threads']} threads), {c['dtype']}, B={c['batch']} "
        f"context={c['context']} Hq={c['heads_q']} Hkv={c['heads_kv']} D={c['head_dim']} block={c['block_size']}, "
        f"torch {c['torch']}; copy peak {result['copy_peak_gbps']:.1f} GB/s",
        f"{'method':<28}{'ms/step':>10}{'GB/s':>9}{'of peak':>9}{'vs SDPA':>9}",
    ]
    for r in result["rows"]:
        lines.append(f"{r['method']:<28}{r['ms']:>10.3f}{r['gbps']:>9.1f}{r['frac_of_copy_peak']:>9.0%}"
                     f"{r['vs_sdpa']:>9.2f}")
    lines.append(f"fused scores overhead: {result['scores_overhead']:+.1%}; eviction (one launch per layer): "
                 f"{result['evict_ms']:.3f} ms = {result['evict_frac_of_step']:.1%} of a step (ema rule: "
                 f"{result['evict_ema_ms']:.3f} ms, step {result['ema_step_vs_h2o']:+.1%} vs h2o); cache write "
                 f"{result['write_ms']:.3f} ms = {result['write_frac_of_step']:.1%}; prefill scores for "
                 f"{result['prefill_tokens']} tokens: +{result['prefill_scores_frac_of_prefill']:.0%} of the prefill "
                 "attention")
    return "\n".join(lines)


if __name__ == "__main__":
    from ..cli import main

    sys.exit(main(["bench", "decode", *sys.argv[1:]]))
