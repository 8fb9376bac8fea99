"""Benchmark of the MSA-Conv op (``sinklora_ext.msa_conv2d``) against what users would otherwise run.

Peers, in the same run and on the same random inputs: the unfold reference (the released
MSA-Conv layer's method: ``F.unfold`` of K and V per head, logits, softmax over the taps with
the zero-padded ones included, weighted sum; autograd for the backward), ``torch.compile``'d
FlexAttention with the window as a block mask over the flattened ``H * W`` tokens (zero padding
made exact by one extra zero key whose logit gets ``+log(n_pad)``), and NATTEN's ``na2d``
(clamped windows, against our ``padding="clamp"``) where ``import natten`` works. Every method's
output (and gradients, where it has a backward) is checked against ours before it is timed;
ratios are the method's time over ours (> 1: ours is faster). Flex's compile time is reported
apart and not timed. Run: ``sinklora bench msa-conv [--json]`` or ``python -m sinklora_ext.bench.msa_conv``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..cli.options import DeviceOptions, option
from ..msa_conv import msa_conv2d
from ..usage import UsageError, available_memory
from .common import device_config, forward_closures, time_fn

# max |method - sinklora_ext| allowed before timing, per dtype (outputs and gradients)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def unfold_msa_conv2d(q, k, v, kernel_size: int, dilation: int):
    """MSA-Conv as the released layer computes it (zero padding), on ``[B, H, W, heads, D]``.

    Per head, K and V are unfolded to ``[B, D * K * K, H * W]`` columns (a tap outside the map is
    a zero column), the logits are the channel sums of ``q * k_columns``, the softmax runs over the
    ``K * K`` taps (the zero-padded ones included: logit 0) and the output is the softmax-weighted
    sum of the V columns. Autograd gives the backward."""
    b, h, w, heads, d = q.shape
    taps = kernel_size * kernel_size

    def per_head(t):  # [B, H, W, heads, D] -> [B * heads, D, H, W]
        return t.permute(0, 3, 4, 1, 2).reshape(b * heads, d, h, w)

    def columns(t):  # -> [B * heads, D, K * K, H * W]
        unfolded = F.unfold(per_head(t), kernel_size, dilation=dilation, padding=dilation * (kernel_size - 1) // 2)
        return unfolded.view(b * heads, d, taps, h * w)

    query = per_head(q).reshape(b * heads, d, 1, h * w)
    logits = (query * columns(k)).sum(dim=1) * d ** -0.5  # [B * heads, K * K, H * W]
    attn = torch.softmax(logits.float(), dim=1).to(q.dtype)
    out = (attn.unsqueeze(1) * columns(v)).sum(dim=2)  # [B * heads, D, H * W]
    return out.view(b, heads, d, h, w).permute(0, 3, 4, 1, 2)


def padded_taps(size: int, kernel_size: int, dilation: int) -> torch.Tensor:
    """Per position along one axis of length ``size``: how many of the ``kernel_size`` taps fall outside."""
    radius = (kernel_size - 1) // 2
    pos = torch.arange(size)[:, None] + (torch.arange(kernel_size)[None, :] - radius) * dilation
    return ((pos < 0) | (pos >= size)).sum(dim=1)


def make_flex(height: int, width: int, kernel_size: int, dilation: int, device, compile: bool = True):
    """FlexAttention (``torch.compile``'d unless ``compile=False``) computing MSA-Conv with zero
    padding, or None without Flex.

    The ``H * W`` tokens are flattened row-major; key ``H * W`` is one extra zero key and value
    standing for all the query's zero-padded taps: its logit (0) gets ``+log(n_pad)`` through the
    score_mod, so it weighs in the softmax as ``n_pad`` zero keys would (it is masked out where
    ``n_pad = 0``)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    tokens, reach = height * width, dilation * ((kernel_size - 1) // 2)
    rows_in = kernel_size - padded_taps(height, kernel_size, dilation)
    cols_in = kernel_size - padded_taps(width, kernel_size, dilation)
    n_pad = (kernel_size * kernel_size - rows_in[:, None] * cols_in[None, :]).flatten().to(device)
    log_n_pad = torch.log(n_pad.clamp(min=1).to(torch.float32))

    def mask_mod(b, h, q_idx, kv_idx):
        dy = kv_idx // width - q_idx // width
        dx = kv_idx % width - q_idx % width
        in_window = (dy >= -reach) & (dy <= reach) & (dx >= -reach) & (dx <= reach) \
            & (dy % dilation == 0) & (dx % dilation == 0) & (kv_idx < tokens)
        return in_window | ((kv_idx == tokens) & (n_pad[q_idx] > 0))

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(kv_idx == tokens, score + log_n_pad[q_idx], score)

    # compiled, the [H * W, H * W + 1] mask is never materialised
    block_mask = create_block_mask(mask_mod, None, None, tokens, tokens + 1, device=device, _compile=compile)
    attention = torch.compile(flex_attention, dynamic=False) if compile else flex_attention

    def run(q, k, v):
        b, _, _, heads, d = q.shape

        def flat(t, extra_zero_token):  # [B, H, W, heads, D] -> [B, heads, tokens (+1), D]
            t = t.reshape(b, tokens, heads, d).transpose(1, 2)
            return torch.cat((t, t.new_zeros(b, heads, 1, d)), dim=2) if extra_zero_token else t

        out = attention(flat(q, False), flat(k, True), flat(v, True), score_mod=score_mod, block_mask=block_mask)
        return out.transpose(1, 2).reshape(q.shape)

    return run


def load_natten():
    """The ``natten`` module, or None where it does not import."""
    try:
        import natten
    except Exception:  # an install without its extension fails in several ways; any of them means "not here"
        return None
    return natten


@dataclass
class Row:
    batch: int
    size: int
    dilation: int
    method: str
    padding: str
    fwd_ms: float | None
    fwdbwd_ms: float | None
    fwd_ratio: float | None
    fwdbwd_ratio: float | None
    max_err: float | None
    compile_s: float | None
    note: str


@dataclass(kw_only=True)
class MsaConvBenchConfig(DeviceOptions):
    """`sinklora bench msa-conv`: every (size, batch, dilation) of the grid is one problem."""

    sizes: list[int] = option([56, 112], help="square map sides H = W")
    batches: list[int] = option([1, 8])
    dilations: list[int] = option([1, 2])
    heads: int = option(4, minimum=1)
    head_dim: int = option(32, minimum=1)
    kernel_size: int = option(7, minimum=1)
    repeats: int = option(5, minimum=1, help="timed repeats (median)")
    no_flex: bool = option(False, help="skip FlexAttention (its compile takes seconds per problem)")
    no_natten: bool = option(False, help="skip NATTEN even where it imports")

    def check(self) -> None:
        super().check()
        for name in ("sizes", "batches", "dilations"):
            for value in getattr(self, name):
                if value < 1:
                    raise UsageError(f"--{name} must be >= 1, got {value}")
        if self.kernel_size % 2 == 0:
            raise UsageError(f"--kernel-size must be odd, got {self.kernel_size}")


def load_average() -> float | None:
    """The 1-minute load average of the machine (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def max_abs_err(outputs, expected) -> float:
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(outputs, expected))


def run_problem(config: MsaConvBenchConfig, batch: int, size: int, dilation: int) -> list[Row]:
    """Check and time every method on one ``[batch, size, size, heads, head_dim]`` problem."""
    device, dtype = config.resolved_device(), config.resolved_dtype()
    kernel, heads, d = config.kernel_size, config.heads, config.head_dim
    shape = (batch, size, size, heads, d)
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    dout = torch.randn_like(q)
    tolerance = TOLERANCE[dtype]
    clamp_fits = kernel * dilation <= size

    def ours(padding):
        return lambda q, k, v: msa_conv2d(q, k, v, kernel, dilation, padding)

    def outputs_and_grads(fn, backward: bool):
        qg, kg, vg = (t.detach().clone().requires_grad_(backward) for t in (q, k, v))
        out = fn(qg, kg, vg)
        if not backward:
            return [out.detach()]
        out.backward(dout)
        return [out.detach(), qg.grad, kg.grad, vg.grad]

    rows: list[Row] = []
    baselines: dict[str, tuple[float, float]] = {}
    expected: dict[str, list[torch.Tensor]] = {}

    def measure(name: str, padding: str, fn: Callable, has_backward: bool = True, setup_s: float | None = None,
                note: str = "") -> None:
        compile_s = None
        if setup_s is not None:  # the first calls compile the forward+backward and the forward graphs; not timed
            start = time.perf_counter() - setup_s
            try:
                outputs_and_grads(fn, True)
            except NotImplementedError as e:  # Flex has no backward on the CPU: reported, not fatal
                has_backward, note = False, f"backward n/a: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
                torch._dynamo.reset()  # else the failed frame would run eagerly from now on
            outputs_and_grads(fn, False)
            compile_s = time.perf_counter() - start
        got = outputs_and_grads(fn, has_backward)
        err = max_abs_err(got, expected[padding])
        if err > tolerance:
            raise RuntimeError(f"bench msa-conv: {name} differs from sinklora_ext (padding={padding}) by {err:.3g} "
                               f"> {tolerance:g} on {list(shape)}, dilation {dilation}")

        fwd, fwdbwd = forward_closures(fn, q, k, v, dout)

        t_f = time_fn(fwd, device, config.repeats)
        t_fb = time_fn(fwdbwd, device, config.repeats) if has_backward else None
        if name == "sinklora_ext":
            baselines[padding] = (t_f, t_fb)
        base_f, base_fb = baselines[padding]
        rows.append(Row(batch, size, dilation, name, padding, t_f * 1e3, t_fb * 1e3 if t_fb else None,
                        t_f / base_f, t_fb / base_fb if t_fb else None, err, compile_s, note))

    def not_run(name: str, padding: str, note: str) -> None:
        rows.append(Row(batch, size, dilation, name, padding, None, None, None, None, None, None, note))

    natten = None if config.no_natten else load_natten()
    paddings = ["zero"] + (["clamp"] if natten is not None and clamp_fits else [])
    for padding in paddings:
        expected[padding] = outputs_and_grads(ours(padding), True)
        measure("sinklora_ext", padding, ours(padding))

    # the unfold columns of K and V, their products and their gradients: about six [B*heads, D, K*K, H*W] buffers
    unfold_bytes = 6 * batch * heads * d * kernel * kernel * size * size * dtype.itemsize
    if unfold_bytes > available_memory(device) // 2:
        not_run("unfold (released layer)", "zero",
                f"skipped: needs ~{unfold_bytes / 2**30:.1f} GiB, over half the free memory")
    else:
        measure("unfold (released layer)", "zero", lambda q, k, v: unfold_msa_conv2d(q, k, v, kernel, dilation))

    if not config.no_flex:
        torch._dynamo.reset()  # each problem compiles afresh (the recompile limit is per function)
        start = time.perf_counter()
        flex = make_flex(size, size, kernel, dilation, device)
        if flex is None:
            not_run("FlexAttention (compiled)", "zero", "not available in this torch")
        else:
            measure("FlexAttention (compiled)", "zero", flex, setup_s=time.perf_counter() - start)

    # natten's CPU backend (flex-fna, not compiled) builds the scores and their softmax over all H*W keys
    natten_cpu_bytes = 2 * batch * heads * (size * size) ** 2 * 4
    if not config.no_natten:
        if natten is None:
            not_run("NATTEN na2d", "clamp", "not installed")
        elif not clamp_fits:
            not_run("NATTEN na2d", "clamp", f"window {kernel}x dilation {dilation} larger than the map")
        elif device.type == "cpu" and natten_cpu_bytes > available_memory(device) // 2:
            not_run("NATTEN na2d", "clamp", f"skipped: its CPU backend builds the full score matrix, "
                                            f"~{natten_cpu_bytes / 2**30:.1f} GiB, over half the free memory")
        else:
            natten_fn = lambda q, k, v: natten.na2d(q, k, v, kernel_size=kernel, dilation=dilation)  # noqa: E731
            measure("NATTEN na2d", "clamp", natten_fn, has_backward=device.type == "cuda",
                    note="" if device.type == "cuda" else f"natten {natten.__version__}; forward only on the CPU")
    return rows


def run(config: MsaConvBenchConfig) -> dict:
    """Every problem of the grid; returns ``{"config", "rows"}``."""
    device, dtype = config.resolved_device(), config.resolved_dtype()
    load_before = load_average()
    rows = [row for size in config.sizes for batch in config.batches for dilation in config.dilations
            for row in run_problem(config, batch, size, dilation)]
    setup = device_config(device, dtype, heads=config.heads, head_dim=config.head_dim,
                          kernel_size=config.kernel_size, repeats=config.repeats, load_before=load_before,
                          load_after=load_average())
    return {"config": setup, "rows": [asdict(r) for r in rows]}


def _cell(value, fmt: str) -> str:
    return format(value, fmt) if value is not None else "n/a"


def format_table(result: dict) -> str:
    c = result["config"]
    load = "" if c["load_before"] is None else f", load {c['load_before']:.2f} -> {c['load_after']:.2f}"
    lines = [
        f"MSA-Conv benchmark on {c['device_name']} ({c['threads']} threads{load}), {c['dtype']}, heads={c['heads']} "
        f"D={c['head_dim']} K={c['kernel_size']}, torch {c['torch']}",
        f"{'B':>3}{'HxW':>9}{'dil':>4}  {'method':<26}{'padding':<8}{'fwd ms':>10}{'fwd+bwd ms':>12}{'fwd x':>8}"
        f"{'f+b x':>8}{'compile s':>10}  note",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['batch']:>3}{r['size']:>5}x{r['size']:<3}{r['dilation']:>4}  {r['method']:<26}{r['padding']:<8}"
            f"{_cell(r['fwd_ms'], '.2f'):>10}{_cell(r['fwdbwd_ms'], '.2f'):>12}{_cell(r['fwd_ratio'], '.2f'):>8}"
            f"{_cell(r['fwdbwd_ratio'], '.2f'):>8}{_cell(r['compile_s'], '.1f'):>10}  {r['note']}")
    lines.append("x = the method's time over sinklora_ext's with the same padding, same run (> 1: sinklora_ext is "
                 "faster); every method was checked against sinklora_ext before timing.")
    return "\n".join(lines)


if __name__ == "__main__":
    from ..cli import main

    sys.exit(main(["bench", "msa-conv", *sys.argv[1:]]))
