"""Property-based tests (hypothesis) of every op against its float64 reference.

Ops: ``sf_attention_fwd`` (fixed and varlen) and ``sf_attention_bwd``, ``column_scores``,
``paged_decode`` (with and without scores), ``paged_write_``, ``select_evictions`` (both policies), and
the H2O decode loop the cache runs on them, and ``msa_conv2d_fwd``/``msa_conv2d_bwd`` (random maps,
kernels, dilations, paddings and ``kv_shift``, against ``msa_conv2d_ref``). Inputs: random shapes up to a few 64-row tiles, GQA,
groups, sinks (0 to past a tile), every shift, varlen splits with empty sequences, block sizes,
shuffled block tables, float32/float16/bfloat16, and extreme data (logits of +-1e4 after scaling,
all-equal keys, values of 1e4).

Every op is called through a :class:`Backend` (an op namespace with ``sinklora_ext``'s schemas and
the device of its tensors), so another implementation of the same ops joins every test by one line
in ``BACKENDS``.

Tolerances: conftest's rule (error vs float64 <= 2x, 3x for gradients, a baseline's error, plus a
floor). Outputs: plain PyTorch in the same dtype. Gradients: the larger of PyTorch's autograd and
the flash backward written in plain PyTorch (it recomputes P from a float32 lse and cancels dP
against D from the saved output, where autograd can be exact). Scores are float32: plain PyTorch at
the kernels' working precision (float32 on the CPU; CUDA kernels may round P to the input dtype).
Where logits reach 1e4 an ulp of a float32 logit decides which implementation is luckier, so the
floors also hold the first-order effect of that rounding (``logit_rounding_error`` and relatives).
Each tolerance was checked against planted bugs (a sink or group off by one, outputs or dk off by
0.1-0.3%, a dq row off by 1%, scores off by 1e-4, lost prompt scores or positions, eviction ties or
recency flipped): every one fails its tests.

Profiles: ``ci`` (the default) is deterministic (``derandomize``: the examples are fixed by the
test's source) and writes nothing; ``SINKLORA_HYPOTHESIS_PROFILE=long`` runs 25 times as many random
examples and keeps the failures it finds in ``hypothesis_db/`` (replayed first by the next long
run; pin one for CI with the ``@reproduce_failure`` line hypothesis prints, or an ``@example``).
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from sinklora_ext.paged import physical_slots
from sinklora_ext.reference import (
    attention_ref,
    causal_column_scores_ref,
    gather_paged,
    msa_conv2d_ref,
    select_evictions_ref,
    paged_decode_ref,
    sf_visibility_mask,
)

import cuda_emu
from conftest import (ATOL_FLOOR, BWD_FACTOR, DTYPES, FWD_FACTOR, HAS_CUDA, SHIFTS, assert_flash_close,
                      check_against_reference, dtype_id, max_abs_err, randn)
from test_paged_ops import SCORE_TOL, Paged, assert_bitwise_equal, check_victims, decode_plain, make_evict_case


@dataclass(frozen=True)
class Backend:
    ops: Any  # a torch.ops namespace holding sinklora_ext's op schemas
    device: str  # where its tensors live
    precision: str  # "cpu": probabilities in float32; "cuda": they may be rounded to the input dtype


BACKENDS = {
    "cpu": Backend(torch.ops.sinklora_ext, "cpu", "cpu"),
    # The CUDA kernels run by the CPU emulator (python_tests/cuda_emu.py).
    "cuda_emu": Backend(cuda_emu.load(), "cpu", "cuda"),
}
if HAS_CUDA:
    BACKENDS["cuda"] = Backend(torch.ops.sinklora_ext, "cuda", "cuda")

backends = pytest.mark.parametrize("backend", [pytest.param(b, id=name) for name, b in BACKENDS.items()])
by_dtype = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)  # every dtype its own examples

DB = DirectoryBasedExampleDatabase(Path(__file__).parent / "hypothesis_db")
_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                      HealthCheck.function_scoped_fixture])
settings.register_profile("ci", derandomize=True, database=None, **_COMMON)
settings.register_profile("long", database=DB, **_COMMON)
PROFILE = os.environ.get("SINKLORA_HYPOTHESIS_PROFILE", "ci")
EXAMPLES_SCALE = {"ci": 1, "long": 25}[PROFILE]


def examples(n: int) -> settings:
    """The active profile with ``n`` examples per test in ``ci`` (more in ``long``)."""
    return settings(settings.get_profile(PROFILE), max_examples=n * EXAMPLES_SCALE)


KINDS = ("normal", "peaked", "equal_keys", "huge_v")
HEAD_DIMS = (1, 8, 16, 40, 64, 128)
PEAK_LOGIT = 1e4
LARGE_LOGIT = 1e3  # from here an ulp of a float32 logit (6e-5) outweighs the baselines' luck
HUGE_V = 1e4


def seed_all(seed: int) -> None:
    """Every tensor of an example comes from torch's global generator (the shared test helpers use
    it), seeded by a value hypothesis drew: examples replay exactly."""
    torch.manual_seed(seed)


def make_extreme(kind: str, q, k, v, segments, softmax_scale: float) -> tuple:
    """Apply an input kind to q, k, v (``[rows, H, D]`` views, one segment per sequence) and return
    (q, k, v, softmax_scale). ``peaked``: the scale makes the largest |logit| 1e4; ``equal_keys``:
    every key of a sequence (and head) is the same vector; ``huge_v``: values of magnitude up to 1e4
    (clamped at 6 sigma so float16 holds them)."""
    dtype = q.dtype
    if kind == "huge_v":
        v = (v.float().clamp(-6, 6) * (HUGE_V / 6)).to(dtype)
    elif kind == "equal_keys":
        k = k.clone()
        for s, e in segments:
            if e > s:
                k[s:e] = k[s:s + 1]
    elif kind == "peaked":
        rep = q.shape[-2] // k.shape[-2]
        biggest = 0.0
        for s, e in segments:
            if e > s:
                kk = k[s:e].double().repeat_interleave(rep, dim=-2)
                biggest = max(biggest, torch.einsum("ihd,jhd->hij", q[s:e].double(), kk).abs().max().item())
        if biggest > 0:
            softmax_scale = PEAK_LOGIT / biggest
    return q, k, v, softmax_scale


# --------------------------------------------------------------------------------------------------
# strategies


@st.composite
def attention_shapes(draw, varlen: bool, dtype: torch.dtype):
    """(seqlens, batch, hq, hkv, d, group, sinks, shift, dtype, kind) in ``dtype``. Batched: ``batch``
    sequences of ``seqlens[0]`` tokens; varlen: one packed batch of ``seqlens`` (some may be empty)."""
    hkv = draw(st.integers(1, 3))
    hq = hkv * draw(st.sampled_from([1, 2, 3, 4]))
    d = draw(st.sampled_from(HEAD_DIMS))
    shift = draw(st.sampled_from(SHIFTS))
    length = st.one_of(st.sampled_from([1, 2, 63, 64, 65, 127, 128, 129, 200]), st.integers(1, 200))
    if shift == "roll":  # every length a multiple of the group
        g = draw(st.one_of(st.sampled_from([1, 2, 64, 65]), st.integers(1, 100)))
        multiple = st.integers(0 if varlen else 1, max(1, 200 // g))
        seqlens = [g * m for m in draw(st.lists(multiple, min_size=1, max_size=4 if varlen else 1))]
    else:
        if varlen:
            seqlens = draw(st.lists(st.one_of(st.just(0), length), min_size=1, max_size=4))
        else:
            seqlens = [draw(length)]
        top = max(max(seqlens), 1)
        # mostly groups shorter than the sequence, where sinks matter
        g = draw(st.one_of(st.sampled_from([1, 64, top, top + 1, 1000]), st.integers(1, max(1, top // 2)),
                           st.integers(1, 2 * top)))
    sinks = draw(st.one_of(st.sampled_from([0, 1, 4, 63, 64, 65]), st.integers(1, 8), st.integers(0, 80)))
    batch = 1 if varlen else draw(st.integers(1, 3))
    kind = draw(st.sampled_from(KINDS))
    # keep an example around a tile's worth of work per head
    assume(batch * sum(n * n for n in seqlens) * hq * max(d, 16) <= 1_000_000 * (1 if d < 128 else 2))
    return seqlens, batch, hq, hkv, d, g, sinks, shift, dtype, kind


class _BackendAttention(torch.autograd.Function):
    """The backend's forward and backward ops as one differentiable call."""

    @staticmethod
    def forward(ctx, q, k, v, backend, cu_seqlens, max_seqlen, group_size, num_sinks, shift, scale):
        out, lse = backend.ops.sf_attention_fwd(q, k, v, cu_seqlens, max_seqlen, group_size, num_sinks, shift, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (backend, cu_seqlens, max_seqlen, group_size, num_sinks, shift, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        backend, cu_seqlens, *args = ctx.args
        dq, dk, dv = backend.ops.sf_attention_bwd(dout.contiguous(), q, k, v, out, lse, cu_seqlens, *args)
        return dq, dk, dv, None, None, None, None, None, None, None


def pattern_masks(seqlens, g, sinks, shift, hq):
    return [sf_visibility_mask(n, g, sinks, shift, hq) for n in seqlens]


def attention_by_segment(q, k, v, segments, masks, scale, upcast):
    """:func:`attention_ref` over packed rows ``[rows, H, D]``, each segment its own sequence."""
    parts = [attention_ref(q[None, s:e], k[None, s:e], v[None, s:e], mask, scale, upcast)[0][0]
             for (s, e), mask in zip(segments, masks) if e > s]
    return torch.cat(parts)


def flash_probabilities(q, kk, mask, scale, lse, precision):
    """``P = exp(s - lse)`` as a flash kernel recomputes it from the saved float32 ``lse [Hq, N]``:
    logits of ``q [N, Hq, D]`` and keys ``kk`` (repeated to Hq heads) in float32 → ``[Hq, N, N]``
    float32 (rounded to the input dtype too under the ``cuda`` precision, as tensor cores take it)."""
    if precision == "cuda":
        # The CUDA kernels work in log2 units (exp2 with the scale folded in, FlashAttention-2's way)
        # and store lse in natural units: P = exp2(s * fl(scale log2 e) - fl(fl(lse2 ln 2) log2 e)).
        # At logits of 1e4 that round trip alone is off by an ulp of 1e4 (2e-3) where exp(s - lse)
        # in natural units is exact (a row that sees one key).
        log2e = torch.tensor(math.log2(math.e), dtype=torch.float32)
        lse_stored = (lse.float() * log2e) * torch.tensor(math.log(2.0), dtype=torch.float32)
        logits2 = torch.einsum("ihd,jhd->hij", q.float(), kk.float()) * (torch.tensor(scale, dtype=torch.float32) * log2e)
        p = torch.exp2(logits2 - (lse_stored * log2e)[:, :, None]).masked_fill(~mask, 0)
        return p.to(q.dtype).float()
    logits = torch.einsum("ihd,jhd->hij", q.float() * scale, kk.float())
    return torch.exp(logits - lse.float()[:, :, None]).masked_fill(~mask, 0)


def flash_backward_plain(q, k, v, masks, segments, scale, dout, out, lse, precision):
    """The flash backward in plain PyTorch at the kernel's working precision, from the state it
    saves (``out`` in the input dtype, ``lse`` in float32): ``dS = P * (dP - D)``, ``D_i = dO_i . O_i``.
    Its error is the second baseline of the gradients: plain PyTorch's autograd keeps exact P and
    cancels dP against itself, so it can be exact where this algorithm is not (a row that sees one
    key, equal keys, logits of 1e4 whose float32 lse is off by an ulp of 1e4). → dq, dk, dv float64."""
    rep = q.shape[1] // k.shape[1]
    low = (lambda t: t.to(q.dtype).float()) if precision == "cuda" else (lambda t: t)
    grads = [torch.zeros(t.shape, dtype=torch.float64) for t in (q, k, v)]
    for (s, e), mask in zip(segments, masks):
        if e == s:
            continue
        qs, dos = q[s:e].float(), dout[s:e].float()
        kk, vv = (t[s:e].float().repeat_interleave(rep, dim=1) for t in (k, v))
        p = flash_probabilities(q[s:e], kk.to(q.dtype), mask, scale, lse[:, s:e], precision)
        dp = torch.einsum("ihd,jhd->hij", dos, vv)
        ds = low(p * (dp - (dos * out[s:e].float()).sum(-1).T[:, :, None]))
        grads[0][s:e] = scale * torch.einsum("hij,jhd->ihd", ds, kk).to(q.dtype).double()
        for g, t in ((1, scale * torch.einsum("hij,ihd->jhd", ds, qs)), (2, torch.einsum("hij,ihd->jhd", p, dos))):
            grads[g][s:e] = t.reshape(e - s, -1, rep, q.shape[2]).sum(2).to(q.dtype).double()
    return grads


def logit_rounding_error(q, k, v, mask, scale, out):
    """What the output (max abs, float64) owes to float32 logits: each ``s_ij`` off by two roundings
    of ``|scale| * |q_i| . |k_j|`` moves ``out_i`` by ``P_ij * |v_j - out_i|``. Queries ``q [M, Hq, D]``,
    keys and values ``[N, Hkv, D]``, ``mask [Hq, M, N]``, ``out [M, Hq, D]``. Negligible for ordinary
    inputs; at logits of 1e4 an ulp is 1e-3 and decides between implementations, so PyTorch's own
    error there is luck, not a bound."""
    rep = q.shape[1] // k.shape[1]
    qs = q.double()
    kk, vv = (t.double().repeat_interleave(rep, dim=1) for t in (k, v))
    p = torch.softmax(torch.einsum("ihd,jhd->hij", qs * scale, kk).masked_fill(~mask, float("-inf")), dim=-1)
    ds = torch.finfo(torch.float32).eps * abs(scale) * torch.einsum("ihd,jhd->hij", qs.abs(), kk.abs())
    worst = 0.0
    for h in range(q.shape[1]):  # one head at a time: [i, j, D] spreads
        spread = (vv[None, :, h] - out[:, None, h].double()).abs()
        worst = max(worst, torch.einsum("ij,ijd->id", p[h] * ds[h], spread).max().item())
    return worst


def probability_rounding_error(q, k, scale):
    """The same float32 logit rounding as :func:`logit_rounding_error`, in the probabilities of one
    query ``q [Hq, D]`` over keys ``k [N, Hkv, D]``: ``dP_j = P_j (ds_j - sum_k P_k ds_k)``, so
    ``|dP_j| <= P_j ((1 - P_j) |ds_j| + sum_{k != j} P_k |ds_k|)``, summed over each kv head's query
    heads → ``[N, Hkv]`` float64."""
    hq, hkv = q.shape[0], k.shape[1]
    kk = k.double().repeat_interleave(hq // hkv, dim=1)
    p = torch.softmax(torch.einsum("hd,thd->ht", q.double() * scale, kk), dim=-1)
    ds = torch.finfo(torch.float32).eps * abs(scale) * torch.einsum("hd,thd->ht", q.double().abs(), kk.abs())
    moved = p * ((1 - p) * ds + (p * ds).sum(-1, keepdim=True) - p * ds)  # [Hq, N]
    return moved.reshape(hkv, hq // hkv, -1).sum(1).T


def logit_rounding_grad_error(q, k, v, mask, scale, dout):
    """:func:`logit_rounding_error` for the gradients of one sequence (``q [N, Hq, D]``, ``k, v
    [N, Hkv, D]``, ``mask [Hq, N, N]``): first order in the logit errors ``ds``, through
    ``dP_ij = P_ij (ds_ij - sum_k P_ik ds_ik)`` into ``dv = P^T dO`` and ``dS = P * (dP - D)``. At logits
    of 1e4 the scale multiplies what an ulp of 1e4 does to dS, and which of two summation orders is
    luckier decides PyTorch's own error. Only logits of at least ``LARGE_LOGIT`` count: below, the
    two baselines' own rounding is the measure (this worst case would be 3-10x theirs in float32).
    → (dq, dk, dv) max abs, float64."""
    hq, d = q.shape[1], q.shape[2]
    rep = hq // k.shape[1]
    qs, do = q.double(), dout.double()
    kk, vv = (t.double().repeat_interleave(rep, dim=1) for t in (k, v))
    logits = torch.einsum("ihd,jhd->hij", qs * scale, kk)
    p = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    ds = torch.finfo(torch.float32).eps * abs(scale) * torch.einsum("ihd,jhd->hij", qs.abs(), kk.abs())
    ds = ds.masked_fill(logits.abs() < LARGE_LOGIT, 0)
    p_err = p * ((1 - p) * ds + (p * ds).sum(-1, keepdim=True) - p * ds)  # |dP| [Hq, i, j]
    dp = torch.einsum("ihd,jhd->hij", do, vv)
    row = (p * dp).sum(-1, keepdim=True)  # D_i
    ds_err = p_err * (dp - row).abs() + p * (p_err * dp.abs()).sum(-1, keepdim=True)  # |d(dS)|
    dq = abs(scale) * torch.einsum("hij,jhd->ihd", ds_err, kk.abs())
    dk = abs(scale) * torch.einsum("hij,ihd->jhd", ds_err, qs.abs()).reshape(-1, k.shape[1], rep, d).sum(2)
    dv = torch.einsum("hij,ihd->jhd", p_err, do.abs()).reshape(-1, k.shape[1], rep, d).sum(2)
    return [t.max().item() for t in (dq, dk, dv)]


def cancellation_error(q, k, masks, segments, scale, dout, out):
    """The part of dq and dk (max abs, float64) that one float32 rounding of ``D_i = dO_i . O_i`` costs
    where ``dP - D`` cancels (a row that sees one key): the scale multiplies it, and a flash kernel
    and :func:`flash_backward_plain` may round D and dP apart in different orders. → (dq, dk, 0)."""
    rep = q.shape[1] // k.shape[1]
    u32 = torch.finfo(torch.float32).eps / 2
    worst = [0.0, 0.0, 0.0]
    for (s, e), mask in zip(segments, masks):
        if e == s:
            continue
        qs, kk = q[s:e].double(), k[s:e].double().repeat_interleave(rep, dim=1)
        p = torch.softmax(torch.einsum("ihd,jhd->hij", qs * scale, kk).masked_fill(~mask, float("-inf")), dim=-1)
        delta = abs(scale) * u32 * (dout[s:e].double() * out[s:e].double()).abs().sum(-1).T  # [Hq, rows]
        worst[0] = max(worst[0], torch.einsum("hij,hi,jhd->ihd", p, delta, kk.abs()).max().item())
        per_key = torch.einsum("hij,hi,ihd->jhd", p, delta, qs.abs()).reshape(e - s, -1, rep, q.shape[2]).sum(2)
        worst[1] = max(worst[1], per_key.max().item())
    return worst


def lse_by_segment(q, k, masks, segments, scale):
    """float64 log-sum-exp ``[Hq, rows]`` of the masked logits, each segment its own sequence."""
    lse = torch.zeros(q.shape[1], q.shape[0], dtype=torch.float64)
    rep = q.shape[1] // k.shape[1]
    for (s, e), mask in zip(segments, masks):
        if e > s:
            kk = k[s:e].double().repeat_interleave(rep, dim=1)
            logits = torch.einsum("ihd,jhd->hij", q[s:e].double() * scale, kk).masked_fill(~mask, float("-inf"))
            lse[:, s:e] = torch.logsumexp(logits, dim=-1)
    return lse


def check_attention(op, ref, q, k, v, masks, segments, scale, dout_scale, precision):
    """conftest's check_against_reference on packed rows ``[rows, H, D]``: the output by the 2x rule
    (at least :func:`logit_rounding_error`), dq/dk/dv by the 3x rule against the larger error of
    plain PyTorch's autograd and of :func:`flash_backward_plain` (at least :func:`cancellation_error`).
    The upstream gradient is scaled so float16 gradients of 1e4 values stay in range."""
    dtype = q.dtype

    def run(fn, cast):
        ts = [t.detach().cpu().to(cast).requires_grad_() for t in (q, k, v)]
        return ts, fn(*ts)

    ts_op = [t.detach().requires_grad_() for t in (q, k, v)]
    out = op(*ts_op)
    (q64, k64, v64), out64 = run(lambda *a: ref(*a, upcast=True), torch.float64)
    (qpt, kpt, vpt), outpt = run(lambda *a: ref(*a, upcast=False), dtype)
    if not torch.isfinite(outpt).all():  # q * scale overflowed the dtype: PyTorch at float32 instead
        (qpt, kpt, vpt), outpt = run(lambda *a: ref(*a, upcast=True), dtype)
    out_scale = max(1.0, out64.abs().max().item()) if out64.numel() else 1.0
    logits_cost = max([0.0, *(logit_rounding_error(q.cpu()[s:e], k.cpu()[s:e], v.cpu()[s:e], mask, scale, out64[s:e])
                              for (s, e), mask in zip(segments, masks) if e > s)])
    assert_flash_close("out", out.cpu(), out64, outpt, dtype, FWD_FACTOR,
                       floor=ATOL_FLOOR[dtype] + FWD_FACTOR * logits_cost / out_scale)
    dout = (randn(*out.shape) * dout_scale).to(dtype)
    out.backward(dout.to(out.device))
    out64.backward(dout.double())
    outpt.backward(dout)
    lse32 = lse_by_segment(q.cpu(), k.cpu(), masks, segments, scale).float()
    plain = flash_backward_plain(q.cpu(), k.cpu(), v.cpu(), masks, segments, scale, dout, out64.detach().to(dtype),
                                 lse32, precision)
    cancelling = cancellation_error(q.cpu(), k.cpu(), masks, segments, scale, dout, out64.detach())
    for (s, e), mask in zip(segments, masks):
        if e > s:
            costs = logit_rounding_grad_error(q.cpu()[s:e], k.cpu()[s:e], v.cpu()[s:e], mask, scale, dout[s:e])
            cancelling = [max(a, b) for a, b in zip(cancelling, costs)]
    grad_scale = max([1.0, *(t.grad.abs().max().item() for t in (q64, k64, v64) if t.numel())])
    for name, a, r, b, f, c in zip(("dq", "dk", "dv"), ts_op, (q64, k64, v64), (qpt, kpt, vpt), plain, cancelling):
        assert a.grad is not None, f"{name}: no gradient"
        baseline = b.grad if max_abs_err(b.grad, r.grad) >= max_abs_err(f, r.grad) else f
        floor = ATOL_FLOOR[dtype] + BWD_FACTOR * c / grad_scale
        assert_flash_close(name, a.grad.cpu(), r.grad, baseline, dtype, BWD_FACTOR, floor=floor, scale=grad_scale)


def dout_scale_for(kind, dtype):
    return 1e-3 if kind == "huge_v" and dtype == torch.float16 else 1.0


# --------------------------------------------------------------------------------------------------
# 1. sf_attention forward and backward


@backends
@by_dtype
@examples(12)
@given(data=st.data())
def test_sf_attention_matches_reference(backend, dtype, data):
    seqlens, b, hq, hkv, d, g, sinks, shift, dtype, kind = data.draw(attention_shapes(False, dtype))
    seed = data.draw(st.integers(0, 2**31 - 1))
    n = seqlens[0]
    seed_all(seed)
    q, k, v = (randn(b * n, h, d, dtype=dtype) for h in (hq, hkv, hkv))
    segments = [(i * n, (i + 1) * n) for i in range(b)]
    q, k, v, scale = make_extreme(kind, q, k, v, segments, d ** -0.5)
    note(f"scale {scale}")
    mask = sf_visibility_mask(n, g, sinks, shift, hq)
    batched = lambda t: t.reshape(b, n, *t.shape[1:])  # noqa: E731
    packed = lambda t: t.reshape(b * n, *t.shape[2:])  # noqa: E731

    def op(q, k, v):
        return packed(_BackendAttention.apply(batched(q), batched(k), batched(v), backend, None, 0, g, sinks, shift,
                                              scale))

    def ref(q, k, v, upcast):
        return packed(attention_ref(batched(q), batched(k), batched(v), mask, scale, upcast)[0])

    check_attention(op, ref, *(t.to(backend.device) for t in (q, k, v)), [mask] * b, segments, scale,
                    dout_scale_for(kind, dtype), backend.precision)


@backends
@by_dtype
@examples(10)
@given(data=st.data())
def test_sf_attention_varlen_matches_reference(backend, dtype, data):
    seqlens, _, hq, hkv, d, g, sinks, shift, dtype, kind = data.draw(attention_shapes(True, dtype))
    seed = data.draw(st.integers(0, 2**31 - 1))
    assume(sum(seqlens) > 0)  # no rows at all: test_sf_attention.py::test_empty_varlen
    seed_all(seed)
    total = sum(seqlens)
    bounds = [0, *itertools.accumulate(seqlens)]
    segments = list(zip(bounds[:-1], bounds[1:]))
    q, k, v = (randn(total, h, d, dtype=dtype) for h in (hq, hkv, hkv))
    q, k, v, scale = make_extreme(kind, q, k, v, segments, d ** -0.5)
    note(f"scale {scale}")
    cu = torch.tensor(bounds, dtype=torch.int32, device=backend.device)
    max_seqlen = max(seqlens)
    masks = pattern_masks(seqlens, g, sinks, shift, hq)

    def op(q, k, v):
        return _BackendAttention.apply(q, k, v, backend, cu, max_seqlen, g, sinks, shift, scale)

    def ref(q, k, v, upcast):
        return attention_by_segment(q, k, v, segments, masks, scale, upcast)

    check_attention(op, ref, *(t.to(backend.device) for t in (q, k, v)), masks, segments, scale,
                    dout_scale_for(kind, dtype), backend.precision)


# --------------------------------------------------------------------------------------------------
# 2. column scores (the H2O scores of a prefill)


def column_sums(q, k, mask, scale, work_dtype):
    """Column sums of the masked softmax, summed over each kv head's query heads, computed in
    ``work_dtype``: ``q [N, Hq, D]`` → ``[N, Hkv]`` float64."""
    hq, hkv = q.shape[1], k.shape[1]
    q, k = q.to(work_dtype), k.to(work_dtype).repeat_interleave(hq // hkv, dim=1)
    logits = torch.einsum("ihd,jhd->hij", q * scale, k).masked_fill(~mask, float("-inf"))
    p = torch.softmax(logits, dim=-1).double()
    return p.sum(1).reshape(hkv, hq // hkv, -1).sum(1).T


@backends
@by_dtype
@examples(10)
@given(data=st.data())
def test_column_scores_match_reference_and_sum_to_the_rows(backend, dtype, data):
    """Column sums against float64; every query row is a distribution, so a sequence's scores of
    kv head h sum to N * Hq / Hkv exactly (up to float32 rounding). Batched form: as many sequences,
    all of the first length (at least 1, or the group under roll)."""
    seqlens, _, hq, hkv, d, g, sinks, shift, dtype, kind = data.draw(attention_shapes(True, dtype))
    seed, batched = data.draw(st.integers(0, 2**31 - 1)), data.draw(st.booleans())
    if batched:
        n = max(seqlens[0], 1) if shift != "roll" else max(seqlens[0], g)
        seqlens = [n] * len(seqlens)
    seed_all(seed)
    bounds = [0, *itertools.accumulate(seqlens)]
    segments = list(zip(bounds[:-1], bounds[1:]))
    q, k, v = (randn(bounds[-1], h, d, dtype=dtype) for h in (hq, hkv, hkv))
    q, k, v, scale = make_extreme(kind, q, k, v, segments, d ** -0.5)
    ops, dev = backend.ops, backend.device
    qd, kd, vd = (t.to(dev) for t in (q, k, v))
    if batched:
        b, n = len(seqlens), seqlens[0]
        qb, kb, vb = (t.reshape(b, n, *t.shape[1:]) for t in (qd, kd, vd))
        _, lse = ops.sf_attention_fwd(qb, kb, vb, None, 0, g, sinks, shift, scale)
        scores = ops.column_scores(qb, kb, lse, None, 0, g, sinks, shift, scale)
    else:
        cu = torch.tensor(bounds, dtype=torch.int32, device=dev)
        mx = max(seqlens)
        _, lse = ops.sf_attention_fwd(qd, kd, vd, cu, mx, g, sinks, shift, scale)
        scores = ops.column_scores(qd, kd, lse, cu, mx, g, sinks, shift, scale)
    assert scores.shape == (bounds[-1], hkv) and scores.dtype == torch.float32
    scores = scores.cpu().double()
    assert torch.isfinite(scores).all()
    work = torch.float32 if backend.precision == "cpu" else dtype
    for (s, e), n in zip(segments, seqlens):
        if n == 0:
            continue
        mask = sf_visibility_mask(n, g, sinks, shift, hq)
        ref = column_sums(q[s:e].double(), k[s:e].double(), mask, scale, torch.float64)
        base = column_sums(q[s:e], k[s:e], mask, scale, work)
        lse = lse_by_segment(q[s:e], k[s:e], [mask], [(0, n)], scale).float()
        p = flash_probabilities(q[s:e], k[s:e].repeat_interleave(hq // hkv, dim=1), mask, scale, lse,
                                backend.precision).double()
        flash = p.sum(1).reshape(hkv, hq // hkv, n).sum(1).T
        # P = exp(logit - lse) from a float32 lse that the forward rounded (and the logit recomputed
        # here in another summation order): one float32 rounding of |lse| relative on the CPU, two
        # on CUDA (natural units stored, log2 units used), an ulp of 1e4 at logits of 1e4, even for
        # one key
        trip = (1 if backend.precision == "cpu" else 2) * torch.finfo(torch.float32).eps
        p64 = torch.softmax(torch.einsum("ihd,jhd->hij", q[s:e].double() * scale, k[s:e].double().repeat_interleave(
            hq // hkv, dim=1)).masked_fill(~mask, float("-inf")), dim=-1)
        round_trip = (p64 * trip * lse.double().abs()[:, :, None]).sum(1).reshape(hkv, hq // hkv, n).sum(1).T
        err = (scores[s:e] - ref).abs().max().item()
        base_err = max((base - ref).abs().max().item(), (flash - ref).abs().max().item(), round_trip.max().item())
        tol = FWD_FACTOR * base_err + 1e-6 * max(1.0, ref.abs().max().item())
        assert err <= tol, f"sequence [{s}, {e}): column-score error {err:.3e} > {tol:.3e}"
        mass = scores[s:e].sum(0)
        expected = torch.full((hkv,), n * hq / hkv, dtype=torch.float64)
        rtol = SCORE_TOL[backend.precision][dtype]["rtol"]
        allowed = rtol * expected + FWD_FACTOR * torch.maximum((flash.sum(0) - expected).abs(), round_trip.sum(0))
        assert ((mass - expected).abs() <= allowed).all(), (
            f"sequence [{s}, {e}): total attention mass per kv head {mass.tolist()}, expected {n * hq / hkv}")


# --------------------------------------------------------------------------------------------------
# 3. paged_decode


@st.composite
def paged_layouts(draw, max_len=200):
    """(lens, block size, hq, hkv, d, dtype, kind, pad, kv_strided)."""
    lens = draw(st.lists(st.one_of(st.just(0), st.sampled_from([1, 63, 64, 65, 128, 129]), st.integers(1, max_len)),
                         min_size=1, max_size=4))
    bs = draw(st.sampled_from([1, 2, 3, 4, 8, 16, 32, 64]))
    hkv = draw(st.integers(1, 3))
    hq = hkv * draw(st.sampled_from([1, 2, 3, 4, 8]))
    d = draw(st.sampled_from(HEAD_DIMS))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(KINDS))
    pad = draw(st.sampled_from(["neg", "foreign", "mixed"]))
    return lens, bs, hq, hkv, d, dtype, kind, pad, draw(st.booleans())


def attended_rows(pc: Paged):
    """(blocks, offsets) of every slot some sequence attends, per sequence."""
    tables = pc.tables.cpu().long()
    rows = []
    for b, n in enumerate(pc.lens):
        t = torch.arange(n)
        rows.append((tables[b][t // pc.bs], t % pc.bs))
    return rows


def extreme_paged(kind: str, pc: Paged, q: torch.Tensor, scale: float) -> float:
    """:func:`make_extreme` on the slots a paged cache's sequences hold (in place); → the scale."""
    peak_scales = []
    for b, (blk, off) in enumerate(attended_rows(pc)):
        if blk.numel() == 0:
            continue
        k = pc.k_cache[blk, off].cpu()
        v = pc.v_cache[blk, off].cpu()
        qq = q[b:b + 1].expand(k.shape[0], *q.shape[1:]).cpu()
        _, k2, v2, peak_scale = make_extreme(kind, qq, k, v, [(0, k.shape[0])], scale)
        pc.k_cache[blk, off] = k2.to(pc.device)
        pc.v_cache[blk, off] = v2.to(pc.device)
        peak_scales.append(peak_scale)
    return min(peak_scales) if kind == "peaked" and peak_scales else scale


def plain_gains(q, k_cache, tables, seq_lens, scale, work_dtype):
    """The score gains of one decode step by plain PyTorch in ``work_dtype`` (float64 result)."""
    b, hq, _ = q.shape
    nb, bs, hkv, _ = k_cache.shape
    gains = torch.zeros(nb, bs, hkv, dtype=torch.float64)
    for i in range(b):
        n = int(seq_lens[i])
        if n == 0:
            continue
        k = gather_paged(k_cache, tables[i], n).to(work_dtype).repeat_interleave(hq // hkv, dim=1)
        p = torch.softmax(torch.einsum("hd,thd->ht", q[i].to(work_dtype) * scale, k), dim=-1).double()
        t = torch.arange(n)
        gains[tables[i].long()[t // bs], t % bs] += p.reshape(hkv, hq // hkv, n).sum(1).T
    return gains


@backends
@examples(40)
@given(layout=paged_layouts(), seed=st.integers(0, 2**31 - 1), with_scores=st.booleans())
def test_paged_decode_matches_reference(backend, layout, seed, with_scores):
    """Output by the 2x rule (at least :func:`logit_rounding_error`); inputs untouched (bitwise); each
    attended slot gains its probability (summed over the kv head's query heads) and every other score
    keeps its bits; a sequence's gains of kv head h sum to Hq / Hkv (each query row is a distribution)."""
    lens, bs, hq, hkv, d, dtype, kind, pad, kv_strided = layout
    seed_all(seed)
    pc = Paged(lens, bs, hkv, d, dtype, backend.device, pad=pad, kv_strided=kv_strided,
               k_poison="nan", v_poison="huge")
    q = randn(len(lens), hq, d, dtype=dtype, device=backend.device)
    scale = extreme_paged(kind, pc, q, d ** -0.5)
    scores0 = torch.rand(pc.num_blocks, bs, hkv, device=backend.device) * 3
    scores = scores0.clone() if with_scores else None
    before = [t.clone() for t in (q, pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens)]

    out = backend.ops.paged_decode(q, pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens, scale, scores)

    for name, t0, t1 in zip(("q", "k_cache", "v_cache", "block_tables", "seq_lens"), before,
                            (q, pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens)):
        assert_bitwise_equal(t1.cpu(), t0.cpu(), f"paged_decode modified {name}")
    qc, kc, vc, tc, lc = (t.cpu() for t in (q, pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens))
    gained64 = torch.zeros(pc.num_blocks, bs, hkv, dtype=torch.float64)
    ref64 = paged_decode_ref(qc.double(), kc.double(), vc.double(), tc, lc, scale, gained64)
    base = decode_plain(qc, kc, vc, tc, lc, scale)
    if not torch.isfinite(base).all():  # q * scale overflowed the dtype: PyTorch at float32 instead
        base = decode_plain(qc.float(), kc.float(), vc.float(), tc, lc, scale).to(dtype)
    logits_cost = max([0.0, *(logit_rounding_error(qc[b:b + 1], gather_paged(kc, tc[b], n), gather_paged(vc, tc[b], n),
                                                   torch.ones(hq, 1, n, dtype=torch.bool), scale, ref64[b:b + 1])
                              for b, n in enumerate(lens) if n)])
    out_scale = max(1.0, ref64.abs().max().item())
    assert_flash_close("paged_decode out", out.cpu(), ref64, base, dtype, FWD_FACTOR,
                       floor=ATOL_FLOOR[dtype] + FWD_FACTOR * logits_cost / out_scale)
    if not with_scores:
        return
    base_gain = plain_gains(qc, kc, tc, lc, scale, torch.float32 if backend.precision == "cpu" else dtype)
    gained = scores.cpu().double() - scores0.cpu().double()
    att = pc.attended_mask()
    assert_bitwise_equal(scores.cpu()[~att], scores0.cpu()[~att], "scores of slots nobody attends")
    if not att.any():
        return
    err = (gained - gained64)[att].abs().max().item()
    rounding = 4 * torch.finfo(torch.float32).eps * (3 + hq / hkv)  # of a float32 score near 3 + gain
    logits_cost = max(probability_rounding_error(qc[b], gather_paged(kc, tc[b], n), scale).max().item()
                      for b, n in enumerate(lens) if n)
    tol = FWD_FACTOR * max((base_gain - gained64)[att].abs().max().item(), logits_cost) + rounding
    assert err <= tol, f"accumulated score error {err:.3e} > {tol:.3e}"
    for b, (blk, off) in enumerate(attended_rows(pc)):
        if blk.numel():
            mass = gained[blk, off].sum(0)
            torch.testing.assert_close(mass, torch.full((hkv,), hq / hkv, dtype=torch.float64), rtol=0,
                                       atol=blk.numel() * rounding + 1e-6 * hq / hkv,
                                       msg=lambda m: f"sequence {b}: probability mass per kv head: {m}")


# --------------------------------------------------------------------------------------------------
# 4. paged_write_


@backends
@examples(30)
@given(data=st.data())
def test_paged_write_writes_exactly_its_slots(backend, data):
    """K/V rows land bit-exactly in their per-head slots (-1 skips); the score becomes new_scores
    (or 0) and the position the token's, when those caches are given; nothing else changes."""
    draw = data.draw
    nb, bs, hkv = draw(st.integers(1, 6)), draw(st.sampled_from([1, 2, 3, 4, 8, 16])), draw(st.integers(1, 3))
    d, dtype = draw(st.sampled_from(HEAD_DIMS)), draw(st.sampled_from(DTYPES))
    num_slots = nb * bs
    rows = draw(st.integers(0, num_slots))
    seed_all(draw(st.integers(0, 2**31 - 1)))
    with_scores, with_new, with_positions = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    with_new = with_new and with_scores
    dev = backend.device
    slots = torch.stack([torch.randperm(num_slots)[:rows] for _ in range(hkv)], dim=1).reshape(rows, hkv)
    skips = torch.rand(rows, hkv) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    slots = torch.where(skips, torch.full_like(slots, -1), slots).to(torch.int32)
    k_cache = randn(nb, bs, hkv, d, dtype=dtype, device=dev)
    v_cache = randn(nb, bs, hkv, d, dtype=dtype, device=dev)
    scores = torch.rand(nb, bs, hkv, device=dev) + 5 if with_scores else None
    positions = torch.randint(-50, -1, (nb, bs, hkv), dtype=torch.int32, device=dev) if with_positions else None
    wide = randn(rows, hkv, d + draw(st.sampled_from([0, 8])), dtype=dtype, device=dev)
    k = wide[..., :d]  # rows strided when the width is larger; the last dim stays contiguous
    v = randn(rows, hkv, d, dtype=dtype, device=dev)
    new_scores = torch.rand(rows, hkv, device=dev) if with_new else None
    token_positions = torch.randperm(10_000)[:rows].to(torch.int32).to(dev) if with_positions else None
    before = [None if t is None else t.clone() for t in (k_cache, v_cache, scores, positions)]

    backend.ops.paged_write_(k, v, k_cache, v_cache, slots.to(dev), scores, new_scores, positions, token_positions)

    expect = [None if t is None else t.cpu().reshape(num_slots, hkv, *t.shape[3:]).clone() for t in before]
    for r in range(rows):
        for h in range(hkv):
            s = int(slots[r, h])
            if s < 0:
                continue
            expect[0][s, h], expect[1][s, h] = k[r, h].cpu(), v[r, h].cpu()
            if with_scores:
                expect[2][s, h] = new_scores[r, h].cpu() if with_new else 0.0
            if with_positions:
                expect[3][s, h] = token_positions[r].cpu()
    for name, actual, e in zip(("k_cache", "v_cache", "scores", "positions"), (k_cache, v_cache, scores, positions),
                               expect):
        if actual is not None:
            assert_bitwise_equal(actual.cpu().reshape(e.shape), e, f"{name} after the write")


# --------------------------------------------------------------------------------------------------
# 5. select_evictions


@backends
@examples(40)
@given(data=st.data())
def test_select_evictions_picks_the_argmin_of_the_evictable(backend, data):
    """Against the reference, and by the rule itself: the victim is neither a sink nor among the
    ``recent`` newest positions, has the lowest rank of those (h2o: the score; mean: the score per
    (decayed) query that has seen the key; streaming: none is lower), the oldest among ties; -1
    exactly when nothing is evictable. Then every held score is multiplied by ``score_decay``
    exactly as the reference does, and no other slot is touched. Scores full of exact ties,
    positions with gaps in any slot order, NaN in the slots nobody holds."""
    draw = data.draw
    lens = draw(st.lists(st.integers(0, 150), min_size=1, max_size=5))
    bs = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    hkv = draw(st.integers(1, 4))
    num_sinks = draw(st.one_of(st.sampled_from([0, 1, 4]), st.integers(0, 160)))
    recent = draw(st.one_of(st.sampled_from([0, 1]), st.integers(0, 160)))
    policy = draw(st.sampled_from(["h2o", "streaming", "mean"]))
    decay = draw(st.sampled_from([1.0, 1.0, 0.0, 0.5, 0.9, 0.99]))
    num_distinct = draw(st.sampled_from([1, 2, 3, 1000]))
    seed_all(draw(st.integers(0, 2**31 - 1)))
    args = make_evict_case(lens, bs, hkv, backend.device, num_distinct=num_distinct, gaps=draw(st.booleans()))
    before = args[0].cpu().clone()
    victims = backend.ops.select_evictions(*args, num_sinks, recent, policy, decay)
    assert victims.dtype == torch.int32 and victims.shape == (len(lens), hkv)
    decayed = before.clone()
    ref = select_evictions_ref(decayed, *(a.cpu() for a in args[1:]), num_sinks, recent, policy, decay)
    assert torch.equal(victims.cpu(), ref), f"\n{victims.cpu()}\nvs reference\n{ref}"
    check_victims(victims.cpu(), before, *args[1:], num_sinks, recent, policy, decay)
    assert_bitwise_equal(args[0].cpu(), decayed, "the decayed scores against the reference's")


# --------------------------------------------------------------------------------------------------
# 6. the H2O decode loop on the ops: budgets, sinks and recent tokens, victims


@backends
@examples(20)
@given(data=st.data())
def test_h2o_decode_loop_keeps_the_budget(backend, data):
    """The cache's decode step on the ops (docs/paged_kv.md): write the new token (fresh score 0) into the
    slot its head freed last, decode with scores over at most budget + 1 slots, evict one slot per
    kv head. After every step each head holds exactly min(tokens seen, budget) tokens, all sinks
    and the ``recent`` newest among them; the victim is the reference's over the kernel's scores;
    outputs match the float64 reference and scores its float64 accumulation (``s <- decay * s + mass``
    under a decaying rule, whose eviction decays the held scores after the choice)."""
    draw = data.draw
    policy = draw(st.sampled_from(["h2o", "streaming", "mean"]))
    decay = draw(st.sampled_from([1.0, 1.0, 0.9, 0.5]))
    sinks, heavy = draw(st.integers(0, 6)), draw(st.integers(0, 8))
    recent = draw(st.integers(0, 6)) if policy != "streaming" else None
    budget = sinks + heavy + (recent or 0)
    assume(budget >= 1)
    if policy == "streaming":
        recent = budget - sinks
    num_seqs = draw(st.integers(1, 3))
    prompts = draw(st.lists(st.integers(1, budget), min_size=num_seqs, max_size=num_seqs))
    steps = draw(st.integers(1, 14))
    bs = draw(st.sampled_from([1, 2, 3, 4, 8]))
    hkv = draw(st.integers(1, 2))
    hq, d = hkv * draw(st.sampled_from([1, 2, 3])), 16
    seed_all(draw(st.integers(0, 2**31 - 1)))
    dev, ops = backend.device, backend.ops
    cap_blocks = math.ceil((budget + 1) / bs)
    nb = num_seqs * cap_blocks + 2
    perm = torch.randperm(nb)
    tables = perm[: num_seqs * cap_blocks].reshape(num_seqs, cap_blocks).to(torch.int32).to(dev)
    k_cache = torch.full((nb, bs, hkv, d), float("nan"), device=dev)
    v_cache = torch.full_like(k_cache, float("nan"))
    scores = torch.full((nb, bs, hkv), float("nan"), device=dev)
    positions = torch.full((nb, bs, hkv), -1, dtype=torch.int32, device=dev)

    # the prompts: causal attention and their column scores, written to slots 0..P-1
    scores64 = torch.full((nb, bs, hkv), float("nan"), dtype=torch.float64)  # the float64 account
    for b, p in enumerate(prompts):
        q, k, v = randn(1, p, hq, d, device=dev), randn(1, p, hkv, d, device=dev), randn(1, p, hkv, d, device=dev)
        _, lse = ops.sf_attention_fwd(q, k, v, None, 0, p, 0, "none", d ** -0.5)
        prompt_scores = ops.column_scores(q, k, lse, None, 0, p, 0, "none", d ** -0.5)
        logical = torch.arange(p, device=dev)[None].expand(1, p)
        slots = physical_slots(tables[b:b + 1], logical, bs)[0][:, None].expand(p, hkv).contiguous()
        ops.paged_write_(k[0], v[0], k_cache, v_cache, slots, scores, prompt_scores.contiguous(), positions,
                            torch.arange(p, dtype=torch.int32, device=dev))
        scores64.view(-1, hkv)[slots.cpu().long(), torch.arange(hkv)] = causal_column_scores_ref(q.cpu(), k.cpu())[0]
    seq_lens = torch.tensor(prompts, dtype=torch.int32)
    next_slot = seq_lens.long()[:, None].repeat(1, hkv)  # where each head writes its next token
    seen = list(prompts)
    for step in range(steps):
        k, v = randn(num_seqs, hkv, d, device=dev), randn(num_seqs, hkv, d, device=dev)
        q = randn(num_seqs, hq, d, device=dev)
        slots = physical_slots(tables, next_slot.to(dev), bs)
        token_pos = torch.tensor(seen, dtype=torch.int32, device=dev)
        ops.paged_write_(k, v, k_cache, v_cache, slots, scores, None, positions, token_pos)
        scores64.view(-1, hkv)[slots.cpu().long(), torch.arange(hkv)] = 0.0
        seq_lens = torch.maximum(seq_lens, (next_slot.max(1).values + 1).to(torch.int32))
        seen = [n + 1 for n in seen]
        out = ops.paged_decode(q, k_cache, v_cache, tables, seq_lens.to(dev), d ** -0.5, scores)
        qc, kc, vc, tc = (t.cpu() for t in (q, k_cache, v_cache, tables))
        ref = paged_decode_ref(qc.double(), kc.double(), vc.double(), tc, seq_lens, None, scores64)
        base = decode_plain(qc, kc, vc, tc, seq_lens, d ** -0.5)
        assert_flash_close(f"step {step} out", out.cpu(), ref, base, torch.float32, FWD_FACTOR)
        torch.testing.assert_close([s.double() for s in gathered(scores, tc, seq_lens)],
                                   gathered(scores64, tc, seq_lens),
                                   rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step} scores: {m}")
        over = seq_lens > budget
        before = scores.cpu().clone()
        victims = ops.select_evictions(scores, positions, tables, seq_lens.to(dev), sinks, recent, policy,
                                       decay).cpu()
        ref_victims = select_evictions_ref(before.clone(), positions.cpu(), tc, seq_lens, sinks, recent, policy,
                                           decay)
        assert torch.equal(victims, ref_victims), f"step {step}: victims {victims} vs reference {ref_victims}"
        check_victims(victims, before, positions, tables, seq_lens, sinks, recent, policy, decay)
        if decay != 1.0:
            for b in range(num_seqs):
                t = torch.arange(int(seq_lens[b]))
                blocks = tc[b].long()[t // bs]
                scores64[blocks, t % bs] *= decay
        for b in range(num_seqs):
            if over[b]:
                assert (victims[b] >= 0).all(), f"step {step}: sequence {b} over the budget has nothing to evict"
                next_slot[b] = victims[b].long()
            else:
                next_slot[b] = int(seq_lens[b])
            held = gathered(positions, tc, seq_lens)[b]  # [n, Hkv]
            for h in range(hkv):
                kept = sorted(int(p) for t, p in enumerate(held[:, h]) if not (over[b] and t == victims[b, h]))
                assert len(kept) == min(seen[b], budget), f"step {step}: head {h} keeps {len(kept)}"
                assert len(set(kept)) == len(kept) and kept[-1] < seen[b]
                protected = set(range(min(sinks, seen[b]))) | set(range(max(seen[b] - recent, 0), seen[b]))
                assert protected <= set(kept), f"step {step}: head {h} lost {sorted(protected - set(kept))}"


def gathered(cache: torch.Tensor, tables: torch.Tensor, seq_lens: torch.Tensor) -> list[torch.Tensor]:
    """Each sequence's slots ``[n, Hkv]`` of a per-slot cache, on the CPU."""
    return [gather_paged(cache.cpu(), tables[b].cpu(), int(n)) for b, n in enumerate(seq_lens.tolist())]


# --------------------------------------------------------------------------------------------------
# 7. msa_conv2d forward and backward

MSA_BACKENDS = backends


class _BackendMsaConv(torch.autograd.Function):
    """The backend's msa_conv2d forward and backward ops as one differentiable call."""

    @staticmethod
    def forward(ctx, q, k, v, backend, kernel_size, dilation, padding, kv_shift, scale):
        out, lse = backend.ops.msa_conv2d_fwd(q, k, v, kernel_size, dilation, padding, kv_shift, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (backend, kernel_size, dilation, padding, kv_shift, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        backend, *args = ctx.args
        dq, dk, dv = backend.ops.msa_conv2d_bwd(dout, q, k, v, out, lse, *args)
        return dq, dk, dv, None, None, None, None, None, None


@examples(50)
@given(budget=st.integers(1, 4096), sinks=st.integers(0, 8), recent=st.one_of(st.none(), st.integers(0, 200)),
       layers=st.integers(1, 80), rule=st.sampled_from(["h2o", "tova", "decay", "mean", "ema"]))
def test_pyramid_layer_budgets_keep_the_total(budget, sinks, recent, layers, rule):
    """pyramidkv's budgets (docs/paged_kv.md): they sum to ``layers * budget``, never grow from one
    layer to the next, every layer keeps at least its sinks and recent tokens, the first keeps
    ``peak_budget`` and the slope is linear to within one token."""
    from sinklora_ext.kv_cache import CachePolicy

    try:
        policy = CachePolicy(f"pyramidkv-{rule}", budget, sinks, recent)
    except ValueError:
        assume(False)
    b = policy.layer_budgets(layers)
    assert len(b) == layers and sum(b) == layers * budget
    assert all(x >= y for x, y in zip(b, b[1:])) and min(b) >= sinks + policy.recent_tokens
    if layers > 1:
        assert b[0] == policy.peak_budget and b[-1] == 2 * budget - policy.peak_budget
        step = (b[0] - b[-1]) / (layers - 1)
        assert all(abs(x - (b[0] - step * i)) < 1 for i, x in enumerate(b))
    assert policy.slots_per_sequence(10**6, max_prompt=1) == policy.peak_budget + 1


@st.composite
def msa_conv_cases(draw):
    """(shape [B, H, W, heads, D], kernel_size, dilation, padding, kv_shift as [heads, 2] or None).
    Clamp maps are drawn at least as large as the dilated window; the others from 1x1 up."""
    padding = draw(st.sampled_from(["zero", "mask", "clamp"]))
    kernel_size = [draw(st.sampled_from([1, 3, 5, 7])) for _ in range(2)]
    dilation = [draw(st.integers(1, 3)) for _ in range(2)]
    low = [k * d if padding == "clamp" else 1 for k, d in zip(kernel_size, dilation)]
    hw = [draw(st.integers(lo, max(lo, 12))) for lo in low]
    heads = draw(st.integers(1, 4))
    d = draw(st.sampled_from([1, 3, 8, 16, 32, 64]))
    batch = draw(st.integers(1, 2))
    shift = draw(st.one_of(st.none(), st.lists(st.lists(st.integers(-40, 40), min_size=2, max_size=2),
                                               min_size=heads, max_size=heads)))
    # plain PyTorch's float16 einsum on the CPU (the baseline) is slow: a bound on the work
    assume(batch * hw[0] * hw[1] * heads * d * kernel_size[0] * kernel_size[1] <= 150_000)
    return [batch, *hw, heads, d], kernel_size, dilation, padding, shift


@MSA_BACKENDS
@by_dtype
@examples(12)
@given(case=msa_conv_cases(), seed=st.integers(0, 2**31 - 1), scale_factor=st.sampled_from([1.0, 0.3, 3.0]))
def test_msa_conv2d_matches_reference(backend, dtype, case, seed, scale_factor):
    shape, kernel_size, dilation, padding, shift = case
    seed_all(seed)
    q, k, v = (randn(*shape, dtype=dtype, device=backend.device) for _ in range(3))
    scale = shape[-1] ** -0.5 * scale_factor
    flat_shift = None if shift is None else [x for row in shift for x in row]

    def op(q, k, v):
        return _BackendMsaConv.apply(q, k, v, backend, kernel_size, dilation, padding, flat_shift, scale)

    def ref(q, k, v, upcast):
        return msa_conv2d_ref(q, k, v, kernel_size, dilation, padding, shift, scale, upcast=upcast)

    check_against_reference(op, ref, (q, k, v))
