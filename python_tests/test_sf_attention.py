"""Tests of sinklora_ext.sf_attention / sf_attention_varlen (docs/attention.md and docs/errors.md).

CPU tests run everywhere; CUDA tests are skipped without a GPU. Large sweeps run only with
SINKLORA_RUN_EXTENDED_TESTS=1.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import sinklora_ext
from sinklora_ext.patterns import PRESETS, resolve_pattern
from sinklora_ext.reference import attention_ref, sf_attention_ref, sf_visibility_mask

from conftest import (
    DTYPES,
    EXTENDED,
    SHIFTS,
    check_sf_attention,
    check_sf_attention_varlen,
    dtype_id,
    extended,
    make_qkv,
    make_qkv_varlen,
    randn,
    requires_cuda,
)

sf_attention = sinklora_ext.sf_attention
sf_attention_varlen = sinklora_ext.sf_attention_varlen
fwd_op = torch.ops.sinklora_ext.sf_attention_fwd
bwd_op = torch.ops.sinklora_ext.sf_attention_bwd

GQA = [(2, 2), (4, 2), (4, 1)]  # Hq/Hkv = 1, 2, 4
GQA_IDS = ["mha", "gqa2", "gqa4"]


def fwd_bwd(fn, q, k, v, dout, *args, **kwargs):
    """Output and (dq, dk, dv) of ``fn(q, k, v, *args)`` for the given upstream gradient. The
    inputs keep their strides (detach, not clone: clone would densify sliced tensors)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, *args, **kwargs)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def sdpa_causal(q, k, v, softmax_scale=None):
    """torch SDPA with is_causal=True in flash layout; GQA by repeating K/V (test only)."""
    rep = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=softmax_scale
    )
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Against the reference
# ---------------------------------------------------------------------------------------------

# sinks -> (group size, head dim). N = 85 (not divisible by any G below, > one 64-row tile) for
# none/nowrap, N = 84 (divisible by every G below) for roll.
GRID_SHAPES = {0: (12, 16), 1: (21, 40), 4: (7, 64)}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("hq,hkv", GQA, ids=GQA_IDS)
@pytest.mark.parametrize("num_sinks", [0, 1, 4])
@pytest.mark.parametrize("shift", SHIFTS)
def test_grid_vs_reference(shift, num_sinks, hq, hkv, dtype):
    g, d = GRID_SHAPES[num_sinks]
    n = 84 if shift == "roll" else 85
    q, k, v = make_qkv(2, n, hq, hkv, d, dtype)
    check_sf_attention(q, k, v, g, num_sinks, shift)


# (B, N, Hq, Hkv, D, G, S, shift)
EDGE_CASES = {
    "len1": (1, 1, 2, 1, 16, 4, 4, "none"),
    "len1-nowrap-b2": (2, 1, 4, 2, 40, 8, 1, "nowrap"),
    "len1-roll-g1": (1, 1, 2, 2, 16, 1, 0, "roll"),
    "n<g-nowrap": (2, 5, 4, 2, 40, 16, 4, "nowrap"),
    "n<g-none-s0": (1, 10, 2, 1, 64, 32, 0, "none"),
    "n<sinks": (1, 3, 2, 2, 16, 2, 8, "none"),
    "g1-nowrap": (2, 20, 4, 2, 16, 1, 2, "nowrap"),
    "g1-roll": (1, 16, 2, 1, 16, 1, 3, "roll"),
    "g2-roll": (1, 16, 2, 1, 16, 2, 0, "roll"),
    "g3-roll-b3": (3, 21, 4, 4, 16, 3, 1, "roll"),
    "g=n-nowrap": (2, 48, 4, 1, 64, 48, 4, "nowrap"),
    "g=n-roll": (1, 48, 4, 2, 64, 48, 4, "roll"),
    "g>n-none": (1, 40, 2, 1, 16, 1000, 4, "none"),
    "hq1-nowrap": (1, 40, 1, 1, 16, 8, 2, "nowrap"),
    "hq6-hkv2-roll": (1, 40, 6, 2, 16, 8, 2, "roll"),
    "b3-tiles-nowrap": (3, 150, 4, 2, 40, 50, 4, "nowrap"),
    "b2-tiles-roll": (2, 192, 2, 1, 32, 96, 1, "roll"),
    "big-g-none": (1, 130, 2, 2, 16, 70, 4, "none"),
    "sinks>tile-nowrap": (1, 200, 2, 1, 16, 16, 70, "nowrap"),
    "odd-g-roll": (2, 99, 4, 4, 24, 9, 4, "roll"),
    "d1": (2, 64, 4, 2, 1, 8, 1, "nowrap"),
    "d17": (2, 33, 2, 1, 17, 8, 4, "nowrap"),
    "d128": (1, 70, 2, 1, 128, 16, 4, "none"),
    "d256": (1, 70, 2, 1, 256, 32, 4, "nowrap"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_edge_shapes_vs_reference(case, dtype):
    b, n, hq, hkv, d, g, s, shift = EDGE_CASES[case]
    q, k, v = make_qkv(b, n, hq, hkv, d, dtype)
    check_sf_attention(q, k, v, g, s, shift)


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("softmax_scale", [0.05, 0.3, 1.0])
def test_softmax_scale(shift, softmax_scale):
    q, k, v = make_qkv(2, 48, 4, 2, 32, torch.float32)
    check_sf_attention(q, k, v, 12, 4, shift, softmax_scale=softmax_scale)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = make_qkv(1, 30, 2, 1, 40)
    a = sf_attention(q, k, v, 8, 4, "nowrap")
    b = sf_attention(q, k, v, 8, 4, "nowrap", softmax_scale=40**-0.5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("shift", SHIFTS)
def test_lse_matches_reference(shift):
    b, n, hq, hkv, d, g = 2, 72, 4, 2, 32, 12
    q, k, v = make_qkv(b, n, hq, hkv, d)
    out, lse = fwd_op(q, k, v, None, 0, g, 3, shift, d**-0.5)
    mask = sf_visibility_mask(n, g, 3, shift, hq)
    ref_out, ref_lse = attention_ref(q.double(), k.double(), v.double(), mask)
    assert lse.dtype == torch.float32 and lse.shape == (hq, b * n)
    torch.testing.assert_close(lse.double(), ref_lse.permute(1, 0, 2).reshape(hq, b * n), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=1e-5)


def test_varlen_lse_layout():
    q, k, v, cu, mx = make_qkv_varlen([7, 0, 20], 4, 2, 16)
    _, lse = fwd_op(q, k, v, cu, mx, 8, 2, "nowrap", 0.25)
    assert lse.shape == (4, 27)
    for start, end in ((0, 7), (7, 27)):
        _, ref_lse = attention_ref(
            q[None, start:end].double(), k[None, start:end].double(), v[None, start:end].double(),
            sf_visibility_mask(end - start, 8, 2, "nowrap", 4), softmax_scale=0.25,
        )
        torch.testing.assert_close(lse[:, start:end].double(), ref_lse[0], rtol=0, atol=1e-5)


@pytest.mark.skipif(not EXTENDED, reason="set SINKLORA_RUN_EXTENDED_TESTS=1 to run")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shift", SHIFTS)
def test_extended_sweep(shift, dtype):
    """Larger sweep (SINKLORA_RUN_EXTENDED_TESTS=1): every (N, G, S) below, with the head dim,
    GQA ratio and batch size cycling through their own lists."""
    dims, gqas, batches = (16, 40, 64, 96, 128, 256), GQA + [(6, 2)], (1, 2, 3)
    for idx, (n, g, s) in enumerate(
        itertools.product((1, 63, 64, 65, 128, 257), (1, 5, 16, 64, 100, 300), (0, 1, 4, 17))
    ):
        if shift == "roll" and n % g:
            continue
        hq, hkv = gqas[idx % len(gqas)]
        q, k, v = make_qkv(batches[idx % 3], n, hq, hkv, dims[idx % len(dims)], dtype)
        check_sf_attention(q, k, v, g, s, shift)


# ---------------------------------------------------------------------------------------------
# Varlen
# ---------------------------------------------------------------------------------------------

# (shift, seqlens, G, S): every case has several sequences including a zero-length one, and a
# length-1 one wherever the shift allows it.
VARLEN_CASES = {
    "none": ("none", [5, 1, 0, 37, 70], 8, 4),
    "nowrap": ("nowrap", [1, 0, 70, 13, 2], 12, 1),
    "nowrap-s0": ("nowrap", [0, 100, 1], 16, 0),
    "roll": ("roll", [24, 0, 8, 72], 8, 4),
    "roll-g1": ("roll", [1, 0, 3], 1, 2),
}


def per_sequence(q, k, v, cu, dout, g, s, shift):
    """Output and gradients of running each sequence alone through sf_attention."""
    outs = [torch.empty_like(t) for t in (q, q, k, v)]
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if start == end:
            continue
        sl = slice(start, end)
        res = fwd_bwd(sf_attention, q[None, sl], k[None, sl], v[None, sl], dout[None, sl], g, s, shift)
        for dst, src in zip(outs, res):
            dst[sl] = src[0]
    return outs


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("hq,hkv", [(4, 2), (2, 2)], ids=["gqa2", "mha"])
@pytest.mark.parametrize("case", list(VARLEN_CASES))
def test_varlen_vs_reference_and_per_sequence(case, hq, hkv, dtype):
    shift, seqlens, g, s = VARLEN_CASES[case]
    q, k, v, cu, mx = make_qkv_varlen(seqlens, hq, hkv, 40, dtype)
    res = check_sf_attention_varlen(q, k, v, cu, mx, g, s, shift)
    alone = per_sequence(q, k, v, cu, res["dout"], g, s, shift)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (res["out"], res["dq"], res["dk"], res["dv"]), alone):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name} differs from per-sequence call: {m}")


@pytest.mark.parametrize("shift", SHIFTS)
def test_varlen_single_sequence_equals_batch(shift):
    q, k, v = make_qkv(1, 48, 4, 2, 32)
    cu = torch.tensor([0, 48], dtype=torch.int32)
    dout = randn(1, 48, 4, 32)
    a = fwd_bwd(sf_attention, q, k, v, dout, 12, 4, shift)
    b = fwd_bwd(sf_attention_varlen, q[0], k[0], v[0], dout[0], cu, 48, 12, 4, shift)
    for x, y in zip(a, b):
        torch.testing.assert_close(x[0], y)


def test_varlen_larger_max_seqlen_is_harmless():
    q, k, v, cu, mx = make_qkv_varlen([9, 0, 30, 1], 4, 2, 16)
    dout = randn(*q.shape)
    a = fwd_bwd(sf_attention_varlen, q, k, v, dout, cu, mx, 8, 4, "nowrap")
    b = fwd_bwd(sf_attention_varlen, q, k, v, dout, cu, mx + 100, 8, 4, "nowrap")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_varlen_equal_lengths_equal_batch():
    """Packed sequences of equal length == the batched call with B = number of sequences."""
    b, n = 3, 40
    q, k, v = make_qkv(b, n, 4, 2, 16)
    dout = randn(b, n, 4, 16)
    cu = torch.arange(0, (b + 1) * n, n, dtype=torch.int32)
    flat = lambda t: t.reshape(b * n, *t.shape[2:])  # noqa: E731
    x = fwd_bwd(sf_attention, q, k, v, dout, 8, 4, "roll")
    y = fwd_bwd(sf_attention_varlen, flat(q), flat(k), flat(v), flat(dout), cu, n, 8, 4, "roll")
    for a, c in zip(x, y):
        torch.testing.assert_close(flat(a), c)


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------

GRADCHECK_CASES = {"none": (8, 4), "nowrap": (9, 4), "roll": (8, 4)}  # shift -> (N, G)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("shift", SHIFTS)
def test_gradcheck_fp32(shift):
    """Finite differences in float32 (the op has no float64 kernel): loose, tiny shapes. The
    precise gradient check is the comparison with float64 autograd in the reference tests."""
    n, g = GRADCHECK_CASES[shift]
    q, k, v = (0.5 * t for t in make_qkv(1, n, 2, 1, 4))
    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: sf_attention(q, k, v, g, 1, shift), inputs, eps=1e-3, atol=1e-2, rtol=1e-2
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_gradcheck_fp32_varlen():
    q, k, v, cu, mx = make_qkv_varlen([3, 0, 6, 1], 2, 1, 4)
    inputs = tuple((0.5 * t).requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: sf_attention_varlen(q, k, v, cu, mx, 4, 1, "nowrap"),
        inputs, eps=1e-3, atol=1e-2, rtol=1e-2,
    )


@pytest.mark.parametrize("which", ["q", "k", "v", "kv"])
def test_partial_requires_grad(which):
    q, k, v = make_qkv(1, 30, 4, 2, 16)
    ts = {"q": q, "k": k, "v": v}
    for name in which:
        ts[name].requires_grad_()
    out = sf_attention(ts["q"], ts["k"], ts["v"], 8, 4, "nowrap")
    out.square().sum().backward()
    ref = {n: t.detach().clone().requires_grad_() for n, t in (("q", q), ("k", k), ("v", v))}
    sf_attention_ref(ref["q"], ref["k"], ref["v"], 8, 4, "nowrap").square().sum().backward()
    for name in "qkv":
        if name in which:
            torch.testing.assert_close(ts[name].grad, ref[name].grad, rtol=1e-4, atol=1e-5)
        else:
            assert ts[name].grad is None


# ---------------------------------------------------------------------------------------------
# Causality (docs/attention.md: none/nowrap are causal; roll leaks the last half group to the first)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 41, 64])
@pytest.mark.parametrize("num_sinks", [0, 4])
@pytest.mark.parametrize("shift", ["none", "nowrap"])
def test_causal_no_leak(shift, num_sinks, t):
    b, n, hq, hkv, d, g = 2, 90, 4, 2, 16, 12
    q, k, v = make_qkv(b, n, hq, hkv, d)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, t:] += 3.0 * torch.randn_like(x[:, t:])
    dout = randn(b, n, hq, d)
    dout[:, t:] = 0  # the loss only reads outputs before t
    o1, dq1, dk1, dv1 = fwd_bwd(sf_attention, q, k, v, dout, g, num_sinks, shift)
    o2, dq2, dk2, dv2 = fwd_bwd(sf_attention, q2, k2, v2, dout, g, num_sinks, shift)
    assert torch.equal(o1[:, :t], o2[:, :t]), "an output before t depends on inputs at >= t"
    assert not torch.equal(o1[:, t:], o2[:, t:])
    for name, a, c in (("dq", dq1, dq2), ("dk", dk1, dk2), ("dv", dv1, dv2)):
        assert torch.equal(a[:, :t], c[:, :t]), f"{name} before t depends on inputs at >= t"
        assert torch.count_nonzero(a[:, t:]) == 0, f"{name} at >= t is non-zero for a loss on outputs < t"


@pytest.mark.parametrize("num_sinks", [0, 4])
def test_causal_no_leak_varlen(num_sinks):
    """Perturbing a later sequence, or later tokens of a sequence, changes nothing before them."""
    q, k, v, cu, mx = make_qkv_varlen([20, 1, 30], 4, 2, 16)
    t = 21 + 11  # 11 tokens into the third sequence
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[t:] += 3.0 * torch.randn_like(x[t:])
    o1 = sf_attention_varlen(q, k, v, cu, mx, 8, num_sinks, "nowrap")
    o2 = sf_attention_varlen(q2, k2, v2, cu, mx, 8, num_sinks, "nowrap")
    assert torch.equal(o1[:t], o2[:t])
    # Perturbing the first sequence leaves the others alone (no attention across sequences).
    q3, k3, v3 = (x.clone() for x in (q, k, v))
    for x in (q3, k3, v3):
        x[:20] += 3.0 * torch.randn_like(x[:20])
    o3 = sf_attention_varlen(q3, k3, v3, cu, mx, 8, num_sinks, "nowrap")
    assert torch.equal(o1[20:], o3[20:])


@pytest.mark.parametrize("num_sinks", [0, 4])
def test_roll_leaks_last_tokens_to_first_half_group(num_sinks):
    b, n, hq, hkv, d, g = 1, 32, 4, 2, 16, 8
    s = g // 2
    q, k, v = make_qkv(b, n, hq, hkv, d)
    k2, v2 = k.clone(), v.clone()
    k2[:, -1] += 3.0 * torch.randn_like(k2[:, -1])
    v2[:, -1] += 3.0 * torch.randn_like(v2[:, -1])
    o1 = sf_attention(q, k, v, g, num_sinks, "roll")
    o2 = sf_attention(q, k2, v2, g, num_sinks, "roll")
    changed = (o1 != o2).any(dim=-1)[0]  # [N, Hq]
    # Unshifted heads are causal.
    assert not changed[: n - 1, : hq // 2].any()
    # Shifted heads: exactly the first s queries (before n - 1) see the last token.
    expected = torch.zeros(n - 1, dtype=torch.bool)
    expected[:s] = True
    for h in range(hq // 2, hq):
        assert torch.equal(changed[: n - 1, h], expected), f"head {h}: {changed[:, h].tolist()}"
    # And the gradient flows backwards in time: a loss on the first s outputs of a shifted head
    # reaches the last key/value.
    dout = torch.zeros(b, n, hq, d)
    dout[:, :s, hq - 1] = randn(b, s, d)
    _, _, dk, dv = fwd_bwd(sf_attention, q, k, v, dout, g, num_sinks, "roll")
    assert dk[:, -1].abs().sum() > 0 and dv[:, -1].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Specific pattern facts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hq,hkv", GQA, ids=GQA_IDS)
@pytest.mark.parametrize("n", [1, 37, 130])
def test_full_preset_equals_sdpa_causal(n, hq, hkv):
    pat = resolve_pattern("full", n)
    assert (pat.num_sinks, pat.shift) == (0, "none") and pat.group_size >= n
    q, k, v = make_qkv(2, n, hq, hkv, 32)
    dout = randn(2, n, hq, 32)
    a = fwd_bwd(sf_attention, q, k, v, dout, pat.group_size, pat.num_sinks, pat.shift)
    b = fwd_bwd(sdpa_causal, q, k, v, dout)
    for name, x, y in zip(("out", "dq", "dk", "dv"), a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("num_sinks", [0, 1, 4, 100])
@pytest.mark.parametrize("g_over_n", [1, 3])
def test_group_at_least_seqlen_is_full_causal(num_sinks, g_over_n):
    n = 70
    q, k, v = make_qkv(2, n, 4, 2, 16)
    out = sf_attention(q, k, v, n * g_over_n, num_sinks, "none")
    torch.testing.assert_close(out, sdpa_causal(q, k, v), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n,g", [(50, 16), (128, 64), (13, 1)])
def test_no_sinks_is_block_diagonal_causal(n, g):
    q, k, v = make_qkv(2, n, 4, 2, 16)
    out = sf_attention(q, k, v, g, 0, "none")
    for start in range(0, n, g):
        sl = slice(start, min(n, start + g))
        torch.testing.assert_close(out[:, sl], sdpa_causal(q[:, sl], k[:, sl], v[:, sl]), rtol=1e-4, atol=1e-5)


def attention_over(q_row, k_rows, v_rows, scale):
    """softmax(scale * q k^T) v for one query over an explicit list of keys, in float64."""
    w = torch.softmax(scale * (k_rows.double() @ q_row.double()), dim=0)
    return w @ v_rows.double()


@pytest.mark.parametrize("shift", ["none", "nowrap", "roll"])
@pytest.mark.parametrize("num_sinks", [0, 1, 4])
def test_group_start_sees_sinks_and_itself(shift, num_sinks):
    """Query kG (k >= 1) of an unshifted head sees exactly {0..S-1} U {kG}; for nowrap, query
    kG - G/2 of a shifted head sees exactly {0..S-1} U {kG - G/2}."""
    b, n, hq, hkv, d, g = 1, 80, 4, 2, 16, 16
    q, k, v = make_qkv(b, n, hq, hkv, d)
    out = sf_attention(q, k, v, g, num_sinks, shift)
    mask = sf_visibility_mask(n, g, num_sinks, shift, hq)
    scale = d**-0.5
    rows = {h: [kk * g for kk in range(1, n // g)] for h in range(hq // 2)}
    if shift == "nowrap":
        rows.update({h: [kk * g - g // 2 for kk in range(1, n // g + 1)] for h in range(hq // 2, hq)})
    for h, rs in rows.items():
        hk = h // (hq // hkv)
        for i in rs:
            keys = sorted(set(range(min(num_sinks, i + 1))) | {i})
            assert mask[h, i].nonzero().flatten().tolist() == keys
            want = attention_over(q[0, i, h], k[0, keys, hk], v[0, keys, hk], scale)
            torch.testing.assert_close(out[0, i, h].double(), want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_run_and_match_reference(preset):
    n = 64
    pat = resolve_pattern(preset, n)
    q, k, v = make_qkv(1, n, 4, 2, 16)
    check_sf_attention(q, k, v, pat.group_size, pat.num_sinks, pat.shift)


# ---------------------------------------------------------------------------------------------
# Non-contiguous inputs
# ---------------------------------------------------------------------------------------------


def _noncontig_batch(kind, b, n, hq, hkv, d, dtype=torch.float32, device="cpu"):
    kw = dict(dtype=dtype, device=device)

    def make(h):
        if kind == "hf-transpose":  # [B, H, N, D] -> [B, N, H, D]
            return randn(b, h, n, d, **kw).transpose(1, 2)
        if kind == "head-dim-slice":
            return randn(b, n, h, d + 8, **kw)[..., 3 : 3 + d]
        if kind == "batch-stride":
            return randn(2 * b, n, h, d, **kw)[::2]
        if kind == "seq-stride":
            return randn(b, 2 * n, h, d, **kw)[:, ::2]
        if kind == "last-dim-strided":
            return randn(b, n, h, 2 * d, **kw)[..., ::2]
        raise AssertionError(kind)

    if kind == "packed-qkv":
        qkv = randn(b, n, hq + 2 * hkv, d, **kw)
        return qkv[:, :, :hq], qkv[:, :, hq : hq + hkv], qkv[:, :, hq + hkv :]
    return make(hq), make(hkv), make(hkv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize(
    "kind", ["hf-transpose", "head-dim-slice", "batch-stride", "seq-stride", "last-dim-strided", "packed-qkv"]
)
def test_noncontiguous_equals_contiguous(kind, dtype):
    b, n, hq, hkv, d = 2, 70, 4, 2, 16
    q, k, v = _noncontig_batch(kind, b, n, hq, hkv, d, dtype)
    assert not any(t.is_contiguous() for t in (q, k, v))
    dout = randn(b, hq, n, d, dtype=dtype).transpose(1, 2)  # non-contiguous upstream gradient too
    for shift in SHIFTS:
        x = fwd_bwd(sf_attention, q, k, v, dout, 14, 4, shift)
        y = fwd_bwd(sf_attention, *(t.contiguous() for t in (q, k, v, dout)), 14, 4, shift)
        for name, a, c in zip(("out", "dq", "dk", "dv"), x, y):
            torch.testing.assert_close(a, c, rtol=0, atol=0, msg=lambda m: f"{shift} {name}: {m}")


@pytest.mark.parametrize("kind", ["transpose", "packed-qkv"])
def test_noncontiguous_varlen(kind):
    seqlens, hq, hkv, d = [9, 0, 1, 40], 4, 2, 16
    total = sum(seqlens)
    cu = torch.tensor([0, 9, 9, 10, 50], dtype=torch.int32)
    if kind == "transpose":
        q, k, v = (randn(h, total, d).transpose(0, 1) for h in (hq, hkv, hkv))
    else:
        qkv = randn(total, hq + 2 * hkv, d)
        q, k, v = qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]
    dout = randn(hq, total, d).transpose(0, 1)
    x = fwd_bwd(sf_attention_varlen, q, k, v, dout, cu, 40, 8, 4, "nowrap")
    y = fwd_bwd(sf_attention_varlen, *(t.contiguous() for t in (q, k, v, dout)), cu, 40, 8, 4, "nowrap")
    for a, c in zip(x, y):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Empty inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("b,n", [(0, 16), (2, 0), (0, 0)])
def test_empty_batch(b, n, shift):
    q, k, v = (t.requires_grad_() for t in make_qkv(b, n, 4, 2, 16))
    out = sf_attention(q, k, v, 8, 4, shift)
    assert out.shape == (b, n, 4, 16) and out.dtype == q.dtype
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape


@pytest.mark.parametrize("seqlens", [[], [0], [0, 0, 0]])
def test_empty_varlen(seqlens):
    q, k, v, cu, mx = make_qkv_varlen(seqlens, 4, 2, 16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = sf_attention_varlen(q, k, v, cu, mx, 8, 4, "roll")
    assert out.shape == (0, 4, 16)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


# ---------------------------------------------------------------------------------------------
# torch.library / torch.compile integration
# ---------------------------------------------------------------------------------------------


def _opcheck_args(kind):
    if kind.startswith("batch"):
        shift = kind.split("-")[1]
        q, k, v = make_qkv(2, 24, 4, 2, 16)
        args = (q, k, v, None, 0, 8, 2, shift, 0.25)
    else:
        q, k, v, cu, mx = make_qkv_varlen([5, 0, 1, 18], 4, 2, 16)
        args = (q, k, v, cu, mx, 8, 2, "nowrap", 0.25)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    return args


@pytest.mark.parametrize("kind", ["batch-none", "batch-roll", "varlen"])
def test_opcheck_fwd(kind):
    torch.library.opcheck(fwd_op.default, _opcheck_args(kind))


@pytest.mark.parametrize("kind", ["batch-nowrap", "varlen"])
def test_opcheck_bwd(kind):
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in _opcheck_args(kind))
    q, k, v, cu, mx, g, s, shift, scale = args
    out, lse = fwd_op(q, k, v, cu, mx, g, s, shift, scale)
    torch.library.opcheck(bwd_op.default, (torch.randn_like(out), q, k, v, out, lse, cu, mx, g, s, shift, scale))


def _compile_check(fn, inputs, dout, backend):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    a = fwd_bwd(compiled, *inputs, dout)
    b = fwd_bwd(fn, *inputs, dout)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def _compile_cases():
    q, k, v = make_qkv(2, 40, 4, 2, 16)
    dout = randn(2, 40, 4, 16)
    qv, kv, vv, cu, mx = make_qkv_varlen([7, 0, 33], 4, 2, 16)
    doutv = randn(40, 4, 16)
    return {
        "batch": (lambda q, k, v: sf_attention(q, k, v, 8, 4, "nowrap") * 2.0, (q, k, v), dout),
        "varlen": (lambda q, k, v: sf_attention_varlen(q, k, v, cu, mx, 8, 4, "none").relu(), (qv, kv, vv), doutv),
    }


@pytest.mark.parametrize("case", ["batch", "varlen"])
def test_compile_fullgraph_aot_eager(case):
    fn, inputs, dout = _compile_cases()[case]
    _compile_check(fn, inputs, dout, "aot_eager")


@extended
@pytest.mark.parametrize("case", ["batch", "varlen"])
def test_compile_fullgraph_inductor(case):
    fn, inputs, dout = _compile_cases()[case]
    _compile_check(fn, inputs, dout, "inductor")


# ---------------------------------------------------------------------------------------------
# Errors (docs/errors.md): ValueError naming the argument and the rule
# ---------------------------------------------------------------------------------------------


def _batch_call(b=1, n=16, hq=4, hkv=2, d=16, g=8, s=4, shift="none", dtype=torch.float32, **over):
    q, k, v = make_qkv(b, n, hq, hkv, d, dtype)
    args = dict(q=q, k=k, v=v, group_size=g, num_sinks=s, shift=shift)
    args.update(over)
    return lambda: sf_attention(**args)


def _varlen_call(seqlens=(5, 0, 11), g=4, s=2, shift="none", **over):
    q, k, v, cu, mx = make_qkv_varlen(list(seqlens), 4, 2, 16)
    args = dict(q=q, k=k, v=v, cu_seqlens=cu, max_seqlen=mx, group_size=g, num_sinks=s, shift=shift)
    args.update({key: (val(args) if callable(val) else val) for key, val in over.items()})
    return lambda: sf_attention_varlen(**args)


ERROR_CASES = {
    "k-dtype": (lambda: _batch_call(k=randn(1, 16, 2, 16, dtype=torch.float16)), r"\bk has dtype"),
    "v-dtype": (lambda: _batch_call(v=randn(1, 16, 2, 16, dtype=torch.bfloat16)), r"\bv has dtype"),
    "q-float64": (lambda: _batch_call(dtype=torch.float64), r"\bq must be float32, float16 or bfloat16"),
    "q-int": (lambda: _batch_call(q=torch.ones(1, 16, 4, 16, dtype=torch.int32)), r"\bq must be float32"),
    "q-ndim": (lambda: _batch_call(q=randn(16, 4, 16)), r"\bq must be \[batch, seqlen, heads, head_dim\]"),
    "k-ndim": (lambda: _batch_call(k=randn(16, 2, 16)), r"\bk must be \[batch, seqlen, heads, head_dim\]"),
    "v-shape": (lambda: _batch_call(v=randn(1, 16, 4, 16)), r"\bv must have k's shape"),
    "seqlen-mismatch": (lambda: _batch_call(k=randn(1, 17, 2, 16), v=randn(1, 17, 2, 16)), r"\bk and q disagree in dimension 1"),
    "batch-mismatch": (lambda: _batch_call(k=randn(2, 16, 2, 16), v=randn(2, 16, 2, 16)), r"\bk and q disagree in dimension 0"),
    "heads-not-multiple": (lambda: _batch_call(hq=3, hkv=2), r"query heads \(3\) must be a multiple of the number of kv heads \(2\)"),
    "k-head-dim": (lambda: _batch_call(k=randn(1, 16, 2, 8), v=randn(1, 16, 2, 8)), r"\bk head_dim 8 must equal q head_dim 16"),
    "group-size-0": (lambda: _batch_call(g=0), r"group_size must be in \[1, 2\^31\), got 0"),
    "group-size-neg": (lambda: _batch_call(g=-4), r"group_size must be in \[1, 2\^31\), got -4"),
    "group-size-2^32": (lambda: _batch_call(g=2**32), r"group_size must be in \[1, 2\^31\), got 4294967296"),
    "num-sinks-neg": (lambda: _batch_call(s=-1), r"num_sinks must be in \[0, 2\^31\), got -1"),
    "num-sinks-2^31": (lambda: _batch_call(s=2**31), r"num_sinks must be in \[0, 2\^31\), got 2147483648"),
    "bad-shift": (lambda: _batch_call(shift="left"), r"shift must be one of 'none', 'nowrap', 'roll', got 'left'"),
    "shift-case": (lambda: _batch_call(shift="Roll"), r"shift must be one of"),
    "roll-indivisible": (lambda: _batch_call(n=18, g=8, shift="roll"), r"shift='roll' requires seqlen % group_size == 0, got seqlen 18 and group_size 8"),
    "head-dim-257": (lambda: _batch_call(d=257), r"head_dim must be in \[1, 256\], got 257"),
    "head-dim-512": (lambda: _batch_call(d=512), r"head_dim must be in \[1, 256\], got 512"),
    "varlen-cu-int64": (lambda: _varlen_call(cu_seqlens=lambda a: a["cu_seqlens"].long()), r"cu_seqlens must be int32"),
    "varlen-cu-float": (lambda: _varlen_call(cu_seqlens=lambda a: a["cu_seqlens"].float()), r"cu_seqlens must be int32"),
    "varlen-cu-2d": (lambda: _varlen_call(cu_seqlens=lambda a: a["cu_seqlens"][None]), r"cu_seqlens must be 1-D"),
    "varlen-cu-empty": (lambda: _varlen_call(cu_seqlens=torch.zeros(0, dtype=torch.int32)), r"cu_seqlens must be 1-D"),
    "varlen-cu-noncontig": (lambda: _varlen_call(cu_seqlens=torch.tensor([0, 0, 5, 0, 5, 0, 16, 0], dtype=torch.int32)[::2]), r"cu_seqlens must be contiguous"),
    "varlen-cu-start": (lambda: _varlen_call(cu_seqlens=torch.tensor([1, 5, 5, 16], dtype=torch.int32)), r"cu_seqlens\[0\] must be 0, got 1"),
    "varlen-cu-end-short": (lambda: _varlen_call(cu_seqlens=torch.tensor([0, 5, 5, 15], dtype=torch.int32)), r"cu_seqlens\[-1\] \(15\) must equal the number of tokens in q \(16\)"),
    "varlen-cu-end-long": (lambda: _varlen_call(cu_seqlens=torch.tensor([0, 5, 5, 17], dtype=torch.int32), max_seqlen=12), r"cu_seqlens\[-1\] \(17\) must equal"),
    "varlen-cu-decreasing": (lambda: _varlen_call(cu_seqlens=torch.tensor([0, 9, 5, 16], dtype=torch.int32)), r"cu_seqlens must be non-decreasing"),
    "varlen-len-gt-max": (lambda: _varlen_call(max_seqlen=10), r"sequence 2 has length 11 > max_seqlen 10"),
    "varlen-max-neg": (lambda: _varlen_call(max_seqlen=-1), r"max_seqlen must be >= 0"),
    "varlen-max-2^31": (lambda: _varlen_call(max_seqlen=2**31), r"max_seqlen must be < 2\^31"),
    "varlen-roll-indivisible": (lambda: _varlen_call(seqlens=(8, 0, 6), g=4, shift="roll"), r"shift='roll' requires every sequence length to be a multiple of group_size 4, but sequence 2 has length 6"),
    "varlen-q-ndim": (lambda: _varlen_call(q=lambda a: a["q"][None]), r"\bq must be \[total, heads, head_dim\]"),
    "varlen-k-tokens": (lambda: _varlen_call(k=lambda a: a["k"][:-1], v=lambda a: a["v"][:-1]), r"\bk and q disagree in dimension 0"),
    "varlen-heads": (lambda: _varlen_call(k=lambda a: a["k"][:, :1].expand(-1, 3, -1), v=lambda a: a["v"][:, :1].expand(-1, 3, -1)), r"multiple of the number of kv heads \(3\)"),
    "varlen-group-size-0": (lambda: _varlen_call(g=0), r"group_size must be in \[1, 2\^31\)"),
    "varlen-bad-shift": (lambda: _varlen_call(shift=""), r"shift must be one of"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors(case):
    make, match = ERROR_CASES[case]
    call = make()
    with pytest.raises(ValueError, match=match):
        call()


def test_error_is_value_error_from_op_directly():
    q, k, v = make_qkv(1, 8, 2, 1, 16)
    with pytest.raises(ValueError, match="group_size"):
        fwd_op(q, k, v, None, 0, 0, 0, "none", 0.25)


@requires_cuda
@pytest.mark.parametrize("which", ["k", "v"])
def test_error_device_mismatch(which):
    q, k, v = make_qkv(1, 16, 4, 2, 16)
    args = dict(q=q, k=k, v=v)
    args[which] = args[which].cuda()
    with pytest.raises(ValueError, match=rf"\b{which} is on cuda.* but q is on cpu"):
        sf_attention(args["q"], args["k"], args["v"], 8, 4, "none")


CUDA_BAD_OFFSETS = {
    "start": ([1, 5, 5, 16], 11, r"cu_seqlens\[0\] must be 0"),
    "end": ([0, 5, 5, 15], 11, r"cu_seqlens\[-1\] \(15\) must equal the number of tokens in q \(16\)"),
    "decreasing": ([0, 9, 5, 16], 11, r"cu_seqlens must be non-decreasing"),
    "max-seqlen": ([0, 5, 5, 16], 10, r"sequence 2 has length 11 > max_seqlen 10"),
}


@requires_cuda
@pytest.mark.parametrize("case", list(CUDA_BAD_OFFSETS))
def test_cuda_checks_varlen_offsets(case):
    """Bad offsets are refused on CUDA too (one host copy, on every call: varlen offsets take no plan)."""
    offsets, max_seqlen, match = CUDA_BAD_OFFSETS[case]
    q, k, v, _, _ = make_qkv_varlen([5, 0, 11], 4, 2, 16, device="cuda")
    cu = torch.tensor(offsets, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match=match):
        sf_attention_varlen(q, k, v, cu, max_seqlen, 4, 2, "none")


@requires_cuda
def test_error_cu_seqlens_device_mismatch():
    q, k, v, cu, mx = make_qkv_varlen([4, 12], 4, 2, 16)
    with pytest.raises(ValueError, match=r"cu_seqlens is on cuda"):
        sf_attention_varlen(q, k, v, cu.cuda(), mx, 4, 2, "none")


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ---------------------------------------------------------------------------------------------

CUDA_HEAD_DIMS = (64, 128, 40)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("d", CUDA_HEAD_DIMS)
@pytest.mark.parametrize("num_sinks", [0, 4])
@pytest.mark.parametrize("shift", SHIFTS)
def test_cuda_grid_vs_reference(shift, num_sinks, d, dtype):
    # 300 rows: several CUDA tiles; groups of 48 straddle tile boundaries; roll needs 288 = 6 * 48.
    n = 288 if shift == "roll" else 300
    hq, hkv = {0: (4, 4), 4: (8, 2)}[num_sinks]
    q, k, v = make_qkv(2, n, hq, hkv, d, dtype, device="cuda")
    check_sf_attention(q, k, v, 48, num_sinks, shift)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", ["len1", "n<g-nowrap", "g1-roll", "g=n-roll", "hq6-hkv2-roll", "sinks>tile-nowrap", "d17", "d256", "odd-g-roll"])
def test_cuda_edge_shapes_vs_reference(case, dtype):
    b, n, hq, hkv, d, g, s, shift = EDGE_CASES[case]
    q, k, v = make_qkv(b, n, hq, hkv, d, dtype, device="cuda")
    check_sf_attention(q, k, v, g, s, shift)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n,g", [(1000, 250), (2048, 512)])
def test_cuda_long_sf(n, g, dtype):
    q, k, v = make_qkv(1, n, 8, 2, 64, dtype, device="cuda")
    check_sf_attention(q, k, v, g, 4, "nowrap")


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", list(VARLEN_CASES) + ["long"])
def test_cuda_varlen_vs_reference(case, dtype):
    shift, seqlens, g, s = VARLEN_CASES.get(case, ("nowrap", [300, 1, 0, 257, 64], 64, 4))
    q, k, v, cu, mx = make_qkv_varlen(seqlens, 8, 2, 64, dtype, device="cuda")
    check_sf_attention_varlen(q, k, v, cu, mx, g, s, shift)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shift", SHIFTS)
def test_cuda_matches_cpu(shift, dtype):
    b, n, hq, hkv, d, g = 2, 192, 8, 2, 64, 48
    q, k, v = make_qkv(b, n, hq, hkv, d, dtype)
    dout = randn(b, n, hq, d, dtype=dtype)
    cpu = fwd_bwd(sf_attention, q, k, v, dout, g, 4, shift)
    gpu = fwd_bwd(sf_attention, *(t.cuda() for t in (q, k, v, dout)), g, 4, shift)
    tol = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}[dtype]
    for name, x, y in zip(("out", "dq", "dk", "dv"), cpu, gpu):
        assert y.is_cuda and torch.isfinite(y).all()
        torch.testing.assert_close(y.cpu(), x, rtol=tol[0], atol=tol[1], msg=lambda m: f"{name}: {m}")


@requires_cuda
def test_cuda_noncontiguous_and_empty():
    b, n, hq, hkv, d = 2, 130, 4, 2, 64
    q, k, v = _noncontig_batch("hf-transpose", b, n, hq, hkv, d, torch.bfloat16, "cuda")
    dout = randn(b, hq, n, d, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    x = fwd_bwd(sf_attention, q, k, v, dout, 32, 4, "nowrap")
    y = fwd_bwd(sf_attention, *(t.contiguous() for t in (q, k, v, dout)), 32, 4, "nowrap")
    for a, c in zip(x, y):
        torch.testing.assert_close(a, c)
    e = sf_attention(*make_qkv(0, 16, 4, 2, 64, torch.float16, "cuda"), 8)
    assert e.shape == (0, 16, 4, 64) and e.is_cuda


@requires_cuda
def test_cuda_causal_no_leak():
    b, n, hq, hkv, d, g, t = 1, 300, 4, 2, 64, 64, 150
    q, k, v = make_qkv(b, n, hq, hkv, d, torch.bfloat16, "cuda")
    k2, v2 = k.clone(), v.clone()
    k2[:, t:] += 1.0
    v2[:, t:] -= 1.0
    for shift in ("none", "nowrap"):
        assert torch.equal(sf_attention(q, k, v, g, 4, shift)[:, :t], sf_attention(q, k2, v2, g, 4, shift)[:, :t])


@requires_cuda
@pytest.mark.parametrize("kind", ["batch-roll", "varlen"])
def test_cuda_opcheck(kind):
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in _opcheck_args(kind))
    args = tuple(a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(fwd_op.default, args)
