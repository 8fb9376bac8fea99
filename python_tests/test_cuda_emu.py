"""The CUDA kernels on the CPU: the emulator build (csrc/emu/, python_tests/cuda_emu.py) against the
float64 references, and the emulator itself against CUTLASS/CuTe's fragment layouts.

``torch.ops.sinklora_cuda_emu.*`` are the ops of ``torch.ops.sinklora_ext`` with CPU tensors running
the project's CUDA code: the host side of csrc/cuda/*.cu (dispatch, launch configuration, split
plans, workspaces) and the unmodified kernels, every thread of a block a fiber. Every launch also
fails on a shared-memory race, a read of shared memory no thread wrote, a touch of a cp.async
destination before its wait, a shared-memory access out of bounds, two blocks writing one global
byte, a plain access racing an atomic, barrier or warp divergence, or a launch over the kernel's
shared-memory limit. Outputs are poisoned (NaN) before the kernels run, inputs hold poison where
no kernel may read.

The CI grid runs in a few minutes; SINKLORA_EMU_LONG=1 adds a longer one.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from contextlib import contextmanager

import pytest
import torch

from sinklora_ext.paged import query_weights_lse
from sinklora_ext.reference import (attention_ref, causal_column_scores_ref, query_weights_ref, select_evictions_ref,
                                    sf_visibility_mask)

import cuda_emu
from conftest import BWD_FACTOR, FWD_FACTOR, assert_flash_close, dtype_id, randn
from test_msa_conv_cuda import check_msa_conv
from test_paged_ops import (
    PACKED_LAYOUTS,
    VLLM_LAYOUTS,
    Paged,
    check_decode,
    check_decode_layout,
    check_step_layout,
    check_victims,
    check_write_layout,
    layout_lens,
    make_evict_case,
)

LONG = os.environ.get("SINKLORA_EMU_LONG", "0").lower() in ("1", "true", "yes", "on")
HALF = (torch.float16, torch.bfloat16)
ALL = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_DEVICE = dict(sm_count=132, major=9, ptx_version=90)  # the emulated H100/H200


@pytest.fixture(scope="module")
def emu():
    ops = cuda_emu.load()
    ops.emu_stats(True)
    yield ops
    names, counts = ops.emu_kernel_launches()
    report = {"kernels": dict(sorted(zip(names, counts))), "stats": dict(zip(STAT_NAMES, ops.emu_stats(False).tolist()))}
    (cuda_emu.BUILD_DIR / "coverage.json").write_text(json.dumps(report, indent=1))


STAT_NAMES = ("launches", "blocks", "threads", "barriers", "collectives", "mma", "ldmatrix", "cp_async",
              "smem_accesses", "global_accesses", "faults")


@contextmanager
def emulated_device(ops, **props):
    """The emulated GPU's SM count, compute capability (major; < 8 takes the generic kernels) and
    kernels' ptxVersion (< 80: a binary without the sm_80 bodies), for the duration."""
    cfg = {**DEFAULT_DEVICE, **props}
    ops.emu_configure(cfg["sm_count"], cfg["major"], cfg["ptx_version"])
    try:
        yield
    finally:
        ops.emu_configure(DEFAULT_DEVICE["sm_count"], DEFAULT_DEVICE["major"], DEFAULT_DEVICE["ptx_version"])


# --------------------------------------------------------------------------------------------------
# 1. The emulator against CuTe's layouts (include/cute/atom/mma_traits_sm80.hpp, copy_traits_sm75.hpp)


def cute_index(shape, stride, coord: int) -> int:
    """CuTe's layout function of one (possibly nested) mode: the colexicographic decomposition of
    ``coord`` over ``shape``, dotted with ``stride``."""
    if isinstance(shape, int):
        return coord * stride
    index = 0
    for sh, st in zip(shape, stride):
        size = math.prod(sh) if isinstance(sh, tuple) else sh
        index += cute_index(sh, st, coord % size)
        coord //= size
    return index


def cute_tv(layout, thread: int, value: int) -> int:
    (tshape, vshape), (tstride, vstride) = layout
    return cute_index(tshape, tstride, thread) + cute_index(vshape, vstride, value)


# (thread, value) -> element index of the column-major operand, as CuTe writes them for
# SM80_16x8x16_F32F16F16F32_TN (and its bf16 twin).
CUTE_MMA_A = (((4, 8), (2, 2, 2)), ((32, 1), (16, 8, 128)))  # into M16 x K16
CUTE_MMA_B = (((4, 8), (2, 2)), ((16, 1), (8, 64)))          # into N8 x K16
CUTE_MMA_C = (((4, 8), (2, 2)), ((32, 1), (16, 8)))          # SM80_16x8_Row, into M16 x N8
# (thread, value) -> bit of the 32 source rows of 128 bits (SM75_U32x4_LDSM_N, SM75_U16x8_LDSM_T).
CUTE_LDSM_N = ((32, (32, 4)), (32, (1, 1024)))
CUTE_LDSM_T = (((4, 8), (16, 2, 4)), ((256, 16), (1, 128, 1024)))


def cute_mma_coords():
    a = [[divmod(cute_tv(CUTE_MMA_A, t, v), 16)[::-1] for v in range(8)] for t in range(32)]  # (m, k)
    b = [[divmod(cute_tv(CUTE_MMA_B, t, v), 8) for v in range(4)] for t in range(32)]  # (k, n)
    c = [[divmod(cute_tv(CUTE_MMA_C, t, v), 16)[::-1] for v in range(4)] for t in range(32)]  # (m, n)
    return torch.tensor(a), torch.tensor(b), torch.tensor(c)


def cute_ldsm_sources(trans: bool):
    """[32, 4, 2, 2]: (source row, 16-bit element) of half h of register r of each lane."""
    out = torch.empty(32, 4, 2, 2, dtype=torch.int32)
    for t, r, h in itertools.product(range(32), range(4), range(2)):
        value = 16 * h + 32 * r  # first bit of that half in the (bit, half, register) value order
        bit = cute_tv(CUTE_LDSM_T if trans else CUTE_LDSM_N, t, value)
        out[t, r, h] = torch.tensor([bit // 128, (bit % 128) // 16])
    return out


def test_mma_fragment_layouts_match_cute(emu):
    a, b, c = emu.emu_mma_layouts()
    ca, cb, cc = cute_mma_coords()
    assert torch.equal(a, ca.int()), "A fragment layout differs from CuTe's SM80_16x8x16 ALayout"
    assert torch.equal(b, cb.int()), "B fragment layout differs from CuTe's SM80_16x8x16 BLayout"
    assert torch.equal(c, cc.int()), "C/D fragment layout differs from CuTe's SM80_16x8_Row"


@pytest.mark.parametrize("trans", [False, True], ids=["ldsm_n", "ldsm_t"])
def test_ldmatrix_layouts_match_cute(emu, trans):
    assert torch.equal(emu.emu_ldmatrix_layout(trans), cute_ldsm_sources(trans))


def bits16(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF


@pytest.mark.parametrize("dtype", HALF, ids=dtype_id)
def test_mma_probe_computes_a_times_b_plus_c(emu, dtype):
    """One warp's mma.m16n8k16 on fragments packed by CuTe's layouts (not the emulator's)."""
    a, b, c = randn(16, 16, dtype=dtype), randn(16, 8, dtype=dtype), randn(16, 8)
    ca, cb, cc = cute_mma_coords()
    av = bits16(a)[ca[..., 0], ca[..., 1]]  # [32, 8] 16-bit elements in register order
    bv = bits16(b)[cb[..., 0], cb[..., 1]]  # [32, 4]
    pack = lambda v: (v[..., 0::2] | (v[..., 1::2] << 16)).to(torch.int32)  # noqa: E731
    cv = c[cc[..., 0], cc[..., 1]].contiguous()
    d = emu.emu_mma_probe(pack(av).contiguous(), pack(bv).contiguous(), cv, dtype == torch.bfloat16)
    expect = a.double() @ b.double() + c.double()
    got = torch.empty(16, 8, dtype=torch.float64)
    got[cc[..., 0], cc[..., 1]] = d.double()
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("trans", [False, True], ids=["ldsm_n", "ldsm_t"])
def test_ldmatrix_probe_moves_the_right_halves(emu, trans):
    rows = torch.randint(-30000, 30000, (32, 8), dtype=torch.int16)
    regs = emu.emu_ldmatrix_probe(rows, trans)
    src = cute_ldsm_sources(trans)
    vals = rows.to(torch.int32) & 0xFFFF
    expect = vals[src[..., 0], src[..., 1]]  # [32, 4, 2]
    expect = (expect[..., 0] | (expect[..., 1] << 16)).to(torch.int32)
    assert torch.equal(regs, expect)


def test_cp_async_groups_and_zero_fill(emu):
    src = torch.randint(1, 1 << 20, (128, 4), dtype=torch.int32)
    out = emu.emu_cp_async_probe(src)
    assert torch.equal(out[:64], src[:64].flip(0))
    second = src[64:].clone()
    second[1::2] = 0  # copies with a false predicate zero-fill their destination
    assert torch.equal(out[64:], second.flip(0))


def test_shuffles(emu):
    x = randn(32)
    out = emu.emu_shfl_probe(x)
    lane = torch.arange(32)
    assert torch.equal(out[:32], x[lane ^ 5]) and torch.equal(out[32:], x[(lane * 7) % 32])


FAULTS = {  # case -> what the report must say
    "missing_barrier": "shared memory",
    "missing_barrier_before_overwrite": "race",
    "uninitialised_smem": "never written",
    "cp_async_no_wait": "before cp.async.wait",
    "smem_out_of_bounds": "outside the launch's dynamic shared memory",
    "blocks_overlap": "two blocks write the same byte",
    "divergent_barrier": "barrier divergence",
    "divergent_shuffle": "deadlock",
    "atomic_then_plain": "a plain access and an atomic update",
    "smem_over_default_limit": "bytes of dynamic shared memory",
}


@pytest.mark.parametrize("case", list(FAULTS))
def test_planted_faults_are_caught(emu, case):
    emu.emu_fault_case(case, False)  # the correct kernel passes
    with pytest.raises(RuntimeError, match=FAULTS[case]):
        emu.emu_fault_case(case, True)


# --------------------------------------------------------------------------------------------------
# 2. SF-Attn: forward (lse), backward, column scores


def ref_segments(q, k, v, segments, g, s, shift, scale, upcast):
    """Output [rows, Hq, D], lse [Hq, rows] and column scores [rows, Hkv] of every sequence
    (rows [a, b) of the flat layout) on its own."""
    hq, hkv = q.shape[1], k.shape[1]
    outs, lses, cols = [], [], []
    for a, b in segments:
        n = b - a
        if n == 0:
            continue
        mask = sf_visibility_mask(n, g, s, shift, hq)
        out, lse = attention_ref(q[None, a:b], k[None, a:b], v[None, a:b], mask, scale, upcast)
        outs.append(out[0])
        lses.append(lse[0])
        kk = k[a:b].to(lse.dtype).repeat_interleave(hq // hkv, dim=1)
        sc = torch.einsum("ihd,jhd->hij", q[a:b].to(lse.dtype) * scale, kk).masked_fill(~mask, float("-inf"))
        p = torch.exp(sc - lse[0][..., None])  # [Hq, n, n]
        cols.append(p.sum(1).reshape(hkv, hq // hkv, n).sum(1).T)
    return torch.cat(outs), torch.cat(lses, dim=1), torch.cat(cols)


def check_sf_emulated(emu, q, k, v, cu, max_seqlen, g, s, shift, scale=None):
    """Emulated forward, backward and column scores of one problem against float64 (2x / 3x rule)."""
    dtype = q.dtype
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    fixed = cu is None
    if fixed:
        bsz, n = q.shape[:2]
        segments = [(i * n, (i + 1) * n) for i in range(bsz)]
        flat = lambda t: t.reshape(-1, *t.shape[2:])  # noqa: E731
    else:
        bounds = cu.tolist()
        segments = list(zip(bounds[:-1], bounds[1:]))
        flat = lambda t: t  # noqa: E731

    out, lse = emu.sf_attention_fwd(q, k, v, cu, max_seqlen, g, s, shift, scale)
    dout = randn(*q.shape, dtype=dtype)
    dq, dk, dv = emu.sf_attention_bwd(dout, q, k, v, out, lse, cu, max_seqlen, g, s, shift, scale)
    cols = emu.column_scores(q, k, lse, cu, max_seqlen, g, s, shift, scale)

    def reference(cast, upcast):
        ts = [flat(t).detach().to(cast).requires_grad_() for t in (q, k, v)]
        o, l_, c = ref_segments(*ts, segments, g, s, shift, scale, upcast)
        o.backward(flat(dout).to(cast))
        return o.detach(), l_.detach(), c.detach(), [t.grad for t in ts]

    o64, lse64, cols64, g64 = reference(torch.float64, True)
    opt, _, _, gpt = reference(dtype, False)
    assert_flash_close("out", flat(out), o64, opt, dtype, FWD_FACTOR)
    assert torch.isfinite(lse).all(), "lse: NaN/inf (unwritten rows?)"
    torch.testing.assert_close(lse.double(), lse64, rtol=0, atol=2e-5 * max(1.0, lse64.abs().max().item()))
    grad_scale = max(1.0, *(t.abs().max().item() for t in g64))
    for name, got, r64, rpt in zip(("dq", "dk", "dv"), (dq, dk, dv), g64, gpt):
        assert_flash_close(name, flat(got), r64, rpt, dtype, BWD_FACTOR, scale=grad_scale)
    # Column scores are float32 sums of probabilities formed from the kernel's own lse.
    col_tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert torch.isfinite(cols).all(), "column scores: NaN/inf"
    torch.testing.assert_close(cols.double(), cols64, rtol=col_tol, atol=col_tol * max(1.0, cols64.abs().max().item()))


# (B, N, Hq, Hkv, D, G, S, shift): lengths around the 64-row tiles, sinks from 0 to past a tile,
# GQA 1/2/4, head dims of the tensor-core kernels (64, 128) and of the generic one (17, 40).
SF_CASES = {
    "n1-d64": (1, 1, 2, 1, 64, 4, 4, "none"),
    "n63-d64-nowrap": (1, 63, 2, 2, 64, 16, 1, "nowrap"),
    "n64-d64-roll": (1, 64, 4, 2, 64, 16, 4, "roll"),
    "n65-d64-s0": (2, 65, 2, 1, 64, 32, 0, "nowrap"),
    "n130-d64-sinks70": (1, 130, 2, 1, 64, 16, 70, "nowrap"),
    "n128-d64-roll-s0-gqa4": (1, 128, 4, 1, 64, 32, 0, "roll"),
    "n200-d64-bigg": (1, 200, 2, 2, 64, 96, 4, "none"),
    "n70-d128": (1, 70, 2, 1, 128, 16, 4, "nowrap"),
    "n128-d128-roll": (1, 128, 2, 2, 128, 64, 2, "roll"),
    "n33-d17": (2, 33, 2, 1, 17, 8, 4, "nowrap"),
    "n100-d40-roll": (1, 100, 4, 2, 40, 20, 4, "roll"),
}


@pytest.mark.parametrize("dtype", ALL, ids=dtype_id)
@pytest.mark.parametrize("case", list(SF_CASES))
def test_sf_attention_emulated(emu, case, dtype):
    b, n, hq, hkv, d, g, s, shift = SF_CASES[case]
    q, k, v = (randn(b, n, h, d, dtype=dtype) for h in (hq, hkv, hkv))
    check_sf_emulated(emu, q, k, v, None, n, g, s, shift)


VARLEN_CASES = {  # seqlens, Hq, Hkv, D, G, S, shift
    "mixed-d64": ([1, 63, 65, 130], 2, 1, 64, 16, 4, "nowrap"),
    "with-empty-d128": ([64, 0, 64], 4, 2, 128, 32, 0, "roll"),
    "d40": ([5, 70, 9], 2, 2, 40, 8, 70, "none"),
}


@pytest.mark.parametrize("dtype", ALL, ids=dtype_id)
@pytest.mark.parametrize("case", list(VARLEN_CASES))
def test_sf_attention_varlen_emulated(emu, case, dtype):
    seqlens, hq, hkv, d, g, s, shift = VARLEN_CASES[case]
    total = sum(seqlens)
    cu = torch.tensor([0, *itertools.accumulate(seqlens)], dtype=torch.int32)
    q, k, v = (randn(total, h, d, dtype=dtype) for h in (hq, hkv, hkv))
    check_sf_emulated(emu, q, k, v, cu, max(seqlens), g, s, shift)


@pytest.mark.parametrize("device", [dict(major=7), dict(ptx_version=75)], ids=["sm70", "ptx75"])
@pytest.mark.parametrize("dtype", HALF, ids=dtype_id)
def test_sf_attention_generic_kernels_on_older_devices(emu, device, dtype):
    """fp16/bf16 at D = 64/128 take the generic kernels on devices (or binaries) without sm_80 code."""
    q, k, v = (randn(1, 96, h, 64, dtype=dtype) for h in (4, 2, 2))
    mma = STAT_NAMES.index("mma")
    with emulated_device(emu, **device):
        before = emu.emu_stats(False)[mma]
        check_sf_emulated(emu, q, k, v, None, 96, 32, 4, "nowrap")
        assert emu.emu_stats(False)[mma] == before, "a tensor-core kernel ran"


def test_sf_attention_strided_inputs_emulated(emu):
    """Sliced q/k/v (row and head strides that are not the dense ones) through the mma kernels."""
    base = randn(1, 80, 6, 64, dtype=torch.float16)
    q, k, v = base[:, :, 0:2], base[:, :, 2:3], base[:, :, 4:5]
    check_sf_emulated(emu, q, k, v, None, 80, 16, 4, "nowrap")


def launched_by(emu, fn) -> set[str]:
    """Names of the kernels ``fn`` launches (the emulator counts launches per kernel)."""
    before = dict(zip(*emu.emu_kernel_launches()))
    fn()
    return {name for name, count in zip(*emu.emu_kernel_launches()) if count > before.get(name, 0)}


def run_op(emu, op, dtype, d, heads_per_kv):
    """One small call of ``op`` with dense inputs."""
    if op == "paged_decode":
        pc = Paged([9, 40], 16, 2, d, dtype, "cpu")
        q = randn(2, 2 * heads_per_kv, d, dtype=dtype)
        return lambda: emu.paged_decode(q, pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens, d**-0.5, None)
    q, k, v = (randn(1, 40, h, d, dtype=dtype) for h in (2, 1, 1))
    args = (None, 40, 16, 2, "nowrap", d**-0.5)
    out, lse = emu.sf_attention_fwd(q, k, v, *args)
    return {
        "sf_attention_fwd": lambda: emu.sf_attention_fwd(q, k, v, *args),
        "sf_attention_bwd": lambda: emu.sf_attention_bwd(torch.ones_like(out), q, k, v, out, lse, *args),
        "column_scores": lambda: emu.column_scores(q, k, lse, *args),
    }[op]


KERNEL_STEMS = {"sf_attention_fwd": "fwd", "sf_attention_bwd": "bwd", "column_scores": "column_scores",
                "paged_decode": "decode"}
KERNEL_CASES = {  # emulated device, dtype, head_dim, query heads per kv head -> the kernel
    "sm90-fp16-d64": ({}, torch.float16, 64, 1, "mma"),
    "sm90-bf16-d128": ({}, torch.bfloat16, 128, 2, "mma"),
    "sm70-fp16-d64": (dict(major=7), torch.float16, 64, 1, "generic"),
    "ptx75-bf16-d64": (dict(ptx_version=75), torch.bfloat16, 64, 1, "generic"),
    "sm90-fp32-d64": ({}, torch.float32, 64, 1, "generic"),
    "sm90-fp16-d40": ({}, torch.float16, 40, 1, "generic"),
}


@pytest.mark.parametrize("op", list(KERNEL_STEMS))
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernel_for_names_the_kernel_that_runs(emu, op, case):
    """kernel_for answers with the rule the ops dispatch by: the kernel it names is the one launched."""
    device, dtype, d, heads, want = KERNEL_CASES[case]
    with emulated_device(emu, **device):
        assert emu.kernel_for(torch.empty(0, dtype=dtype), op, d, heads) == want
        names = launched_by(emu, run_op(emu, op, dtype, d, heads))
    stem = KERNEL_STEMS[op]
    other = "generic" if want == "mma" else "mma"
    assert any(f"{stem}_{want}_kernel" in n for n in names), names
    assert not any(f"{stem}_{other}_kernel" in n for n in names), names


def test_kernel_for_decode_group_limit(emu):
    """The tensor-core decode serves at most 16 query heads per kv head."""
    half = torch.empty(0, dtype=torch.float16)
    assert emu.kernel_for(half, "paged_decode", 64, 16) == "mma"
    assert emu.kernel_for(half, "paged_decode", 64, 17) == "generic"
    assert emu.kernel_for(half, "sf_attention_fwd", 64, 17) == "mma"  # no such limit there
    names = launched_by(emu, run_op(emu, "paged_decode", torch.float16, 64, 17))
    assert any("decode_generic_kernel" in n for n in names) and not any("decode_mma_kernel" in n for n in names)
    assert emu.kernel_for(half, "paged_write_", 64, 1) == "generic"
    with pytest.raises(ValueError, match="unknown op"):
        emu.kernel_for(half, "prefill_scores", 64, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("sm_count", [1, 132])
def test_plan_split_sizes_emulated(emu, dtype, sm_count):
    """The plan computes the split-KV sizes once (here with the emulated SM count); a decode run with
    it equals one that sizes its own splits, bit for bit, and the split path is exercised."""
    with emulated_device(emu, sm_count=sm_count):
        pc = Paged([511, 512, 513, 1025], 16, 2, 64, dtype, "cpu")
        plan = emu.plan_paged(pc.k_cache, pc.tables, pc.seq_lens, None, 4)
        splits, partition = int(plan[14]), int(plan[15])
        assert splits >= 1 and partition % 64 == 0 and splits * partition >= pc.max_blocks * pc.bs
        q = randn(4, 4, 64, dtype=dtype)
        s1, s2 = (torch.zeros(pc.num_blocks, pc.bs, 2) for _ in range(2))
        with_plan = emu.paged_decode(q, pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens, 0.125, s1, plan)
        without = emu.paged_decode(q, pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens, 0.125, s2)
    assert torch.equal(with_plan, without) and torch.equal(s1, s2)
    if sm_count == 132:
        assert splits > 1  # few (sequence, kv head) pairs for many SMs: split


def test_plan_of_per_layer_lengths_emulated(emu):
    """One CUDA plan of per-layer lengths ``seq_lens [L, B]`` (pyramidkv): every layer's decode and
    eviction with its row and the plan equal the unplanned calls, bit for bit."""
    with emulated_device(emu, sm_count=132):
        pc = Paged([40, 300, 17], 16, 2, 64, torch.float32, "cpu")
        lens = torch.stack([pc.seq_lens, (pc.seq_lens * 2) // 3, pc.seq_lens // 4]).contiguous()
        plan = emu.plan_paged(pc.k_cache, pc.tables, lens, None, 4)
        q = randn(3, 4, 64)
        for row in lens:
            s1, s2 = (torch.rand(pc.num_blocks, pc.bs, 2, generator=torch.Generator().manual_seed(1)) for _ in range(2))
            with_plan = emu.paged_decode(q, pc.k_cache, pc.v_cache, pc.tables, row, 0.125, s1, plan)
            without = emu.paged_decode(q, pc.k_cache, pc.v_cache, pc.tables, row, 0.125, s2)
            assert torch.equal(with_plan, without) and torch.equal(s1, s2)
            positions = torch.randint(0, 400, (pc.num_blocks, pc.bs, 2), dtype=torch.int32,
                                      generator=torch.Generator().manual_seed(2))
            v1 = emu.select_evictions(s1, positions, pc.tables, row, 4, 8, "mean", 0.99, plan)
            v2 = emu.select_evictions(s2, positions, pc.tables, row, 4, 8, "mean", 0.99)
            assert torch.equal(v1, v2) and torch.equal(s1, s2)


# The long grids are defined only with SINKLORA_EMU_LONG=1 (a normal run skips nothing).
LONG_SF = list(itertools.product([1, 64, 127, 192], [64, 128, 24], [0, 1, 65], ["none", "nowrap", "roll"], ALL))


if LONG:

    @pytest.mark.parametrize("n,d,num_sinks,shift,dtype", LONG_SF)
    def test_sf_attention_emulated_long_grid(emu, n, d, num_sinks, shift, dtype):
        g = 32
        if shift == "roll" and n % g:
            n = (n // g + 1) * g
        q, k, v = (randn(2, n, h, d, dtype=dtype) for h in (4, 2, 2))
        check_sf_emulated(emu, q, k, v, None, n, g, num_sinks, shift)


# --------------------------------------------------------------------------------------------------
# 3. Paged decode (generic, tensor-core, split-KV merge), cache writes, eviction

def check_decode_emulated(emu, pc: Paged, hq: int):
    """test_paged_ops' check with the emulated op (CUDA tolerances), with and without scores."""

    def decode(q, k_cache, v_cache, tables, seq_lens, scale, scores):
        return emu.paged_decode(q, k_cache, v_cache, tables, seq_lens, pc.d**-0.5 if scale is None else scale, scores)

    for check_scores in (True, False):
        check_decode(pc, hq, check_scores=check_scores, decode=decode, kernels="cuda")


DECODE_CASES = {  # lens, block size, Hq, Hkv, D
    "gqa1-d64": ([1, 15, 16, 17, 53], 16, 2, 2, 64),
    "gqa4-d128": ([1, 33, 64, 100], 16, 8, 2, 128),
    "gqa8-d40": ([7, 31, 2], 8, 16, 2, 40),
    "bs1-d64": ([1, 5, 9], 1, 4, 1, 64),
    "gqa3-d16-empty": ([0, 12, 40], 4, 6, 2, 16),
    "gqa2-d17-scalar": ([3, 20], 4, 4, 2, 17),  # rows not a whole number of 16-byte vectors
}


@pytest.mark.parametrize("dtype", ALL, ids=dtype_id)
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_paged_decode_emulated(emu, case, dtype):
    lens, bs, hq, hkv, d = DECODE_CASES[case]
    check_decode_emulated(emu, Paged(lens, bs, hkv, d, dtype, "cpu"), hq)


@pytest.mark.parametrize("dtype", ALL, ids=dtype_id)
@pytest.mark.parametrize("sm_count", [1, 132])
def test_paged_decode_split_kv_emulated(emu, dtype, sm_count):
    """Lengths at the split-KV partition edges; the SM count changes the plan (splits, slots)."""
    with emulated_device(emu, sm_count=sm_count):
        check_decode_emulated(emu, Paged([511, 512, 513, 1025], 16, 2, 64, dtype, "cpu"), 4)


@pytest.mark.parametrize("major", [7, 9])
@pytest.mark.parametrize("dtype", HALF, ids=dtype_id)
def test_paged_decode_generic_and_mma_agree(emu, major, dtype):
    with emulated_device(emu, major=major):
        check_decode_emulated(emu, Paged([40, 130], 16, 2, 64, dtype, "cpu"), 4)


@pytest.mark.parametrize("d", [24, 17], ids=["vector", "scalar"])
@pytest.mark.parametrize("dtype", ALL, ids=dtype_id)
def test_paged_write_emulated(emu, dtype, d):
    nb, bs, hkv, rows = 8, 4, 3, 9
    k_cache = torch.full((nb, bs, hkv, d), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    scores = torch.rand(nb, bs, hkv)
    positions = torch.randint(0, 50, (nb, bs, hkv), dtype=torch.int32)
    slots = torch.randperm(nb * bs)[: rows * hkv].reshape(rows, hkv).to(torch.int32)
    slots[2, 1] = -1
    k, v = randn(rows, hkv, d, dtype=dtype), randn(rows, hkv, d, dtype=dtype)
    new_scores = torch.rand(rows, hkv)
    token_positions = torch.arange(100, 100 + rows, dtype=torch.int32)
    emulated = [t.clone() for t in (k_cache, v_cache, scores, positions)]
    expected = [t.clone() for t in (k_cache, v_cache, scores, positions)]
    emu.paged_write_(k, v, emulated[0], emulated[1], slots, emulated[2], new_scores, emulated[3], token_positions)
    for r, h in itertools.product(range(rows), range(hkv)):
        slot = int(slots[r, h])
        if slot < 0:
            continue
        blk, off = divmod(slot, bs)
        expected[0][blk, off, h] = k[r, h]
        expected[1][blk, off, h] = v[r, h]
        expected[2][blk, off, h] = new_scores[r, h]
        expected[3][blk, off, h] = token_positions[r]
    for name, got, want in zip(("k_cache", "v_cache", "scores", "positions"), emulated, expected):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name


@pytest.mark.parametrize("policy,decay", [("h2o", 1.0), ("streaming", 1.0), ("mean", 1.0), ("mean", 0.9),
                                          ("h2o", 0.0), ("h2o", 0.5)])
@pytest.mark.parametrize("num_sinks,recent", [(4, 0), (0, 0), (4, 3), (1, 10)])
def test_select_evictions_emulated(emu, policy, decay, num_sinks, recent):
    """The warp-per-head kernel: every rank (h2o, mean, streaming) and the in-place decay of the
    sequences' scores equal the reference, bit for bit, and no other slot is written."""
    lens = [0, 1, 4, 5, 7, 8, 9, 23, 40, 70]
    args = make_evict_case(lens, 8, 3, "cpu")
    before, want = args[0].clone(), args[0].clone()
    victims = emu.select_evictions(*args, num_sinks, recent, policy, decay)
    ref = select_evictions_ref(want, *args[1:], num_sinks, recent, policy, decay)
    assert torch.equal(victims, ref), f"\n{victims}\nvs reference\n{ref}"
    check_victims(victims, before, *args[1:], num_sinks, recent, policy, decay)
    assert torch.equal(args[0].view(torch.int32), want.view(torch.int32)), "decayed scores"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("decay,window", [(0.0, 0), (0.9, 0), (1.0, 8), (0.95, 5)])
def test_column_scores_query_weights_emulated(emu, dtype, decay, window):
    """Query weights enter the column-score kernels (generic for float32, tensor cores for bf16 at
    D 64) through the lse (+inf for weight 0): the weighted sums equal float64's."""
    lens = [70, 5, 33]
    hq, hkv, d = 4, 2, 64
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
    q, k, v = (randn(sum(lens), h, d, dtype=dtype) for h in (hq, hkv, hkv))
    _, lse = emu.sf_attention_fwd(q, k, v, cu, max(lens), max(lens), 0, "none", d**-0.5)
    weighted = query_weights_lse(lse, cu, 0, decay, window)
    cols = emu.column_scores(q, k, weighted, cu, max(lens), max(lens), 0, "none", d**-0.5)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = causal_column_scores_ref(q[None, a:b], k[None, a:b], decay=decay, window=window)[0]
        torch.testing.assert_close(cols[a:b].double(), ref, rtol=2e-2 if dtype != torch.float32 else 1e-4,
                                   atol=5e-3 if dtype != torch.float32 else 1e-5)
        mass = query_weights_ref(b - a, decay, window).sum() * hq
        torch.testing.assert_close(cols[a:b].double().sum(), mass, rtol=1e-3, atol=1e-5)


def test_table_checks_follow_the_cuda_rules(emu):
    """A block id outside the pool is refused on the host, by the call or by the plan of its step."""
    pc = Paged([5, 9], 4, 1, 16, torch.float32, "cpu")
    q = randn(2, 2, 16)
    pc.tables[1, 0] = pc.num_blocks + 3
    with pytest.raises(ValueError, match="paged_decode: block_tables.* is not a block of the pool"):
        emu.paged_decode(q, pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens, 0.25, None)
    with pytest.raises(ValueError, match="plan_paged: block_tables.* is not a block of the pool"):
        emu.plan_paged(pc.k_cache, pc.tables, pc.seq_lens, None, 2)


def test_varlen_offsets_are_always_checked(emu):
    """cu_seqlens ending at 5 of q's 8 rows is refused (no switch skips the check any more)."""
    q = torch.randn(8, 2, 16)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] \(5\) must equal the number of tokens in q \(8\)"):
        emu.sf_attention_fwd(q, q[:, :1], q[:, :1], cu, 5, 4, 1, "none", 0.25)


# The caches as views of vLLM's kv tensor (test_paged_ops section 8): the kernels take them as they
# are. (layout, dtype, block size, head_dim) -> the decode kernel that must run: the tensor-core one
# wherever the dense layout would take it (16-byte aligned rows at 16-byte strides), the generic one
# (vector or scalar loads) otherwise.
EMU_LAYOUT_CASES = {
    **{f"{layout}-{dtype_id(dt)}-bs16-d64": (layout, dt, 16, 64) for layout in VLLM_LAYOUTS for dt in ALL},
    **{f"{layout}-{dtype_id(dt)}-bs17-d17": (layout, dt, 17, 17) for layout in PACKED_LAYOUTS for dt in ALL[:2]},
    "hnd_packed-float16-bs128-d64": ("hnd_packed", torch.float16, 128, 64),
    "nhd_packed-float32-bs128-d64": ("nhd_packed", torch.float32, 128, 64),
    "vllm_cpu_attn-bfloat16-bs32-d40": ("vllm_cpu_attn", torch.bfloat16, 32, 40),
    "nhd_packed-float16-bs24-d40": ("nhd_packed", torch.float16, 24, 40),
}


@pytest.mark.parametrize("case", list(EMU_LAYOUT_CASES))
def test_paged_decode_vllm_layouts_emulated(emu, case):
    layout, dtype, bs, d = EMU_LAYOUT_CASES[case]
    pc = Paged(layout_lens(bs), bs, 2, d, dtype, "cpu", layout=layout, k_poison="nan", v_poison="nan")
    want = "mma" if dtype in HALF and d in (64, 128) else "generic"
    names = launched_by(emu, lambda: check_decode_layout(emu, pc, 4, kernels="cuda"))
    assert any(f"decode_{want}_kernel" in n for n in names), names
    assert not any(f"decode_{'generic' if want == 'mma' else 'mma'}_kernel" in n for n in names), names


@pytest.mark.parametrize("bs,d,planned", [(16, 64, False), (17, 17, True), (32, 40, True)])
@pytest.mark.parametrize("dtype", ALL, ids=dtype_id)
@pytest.mark.parametrize("layout", VLLM_LAYOUTS)
def test_paged_write_vllm_layouts_emulated(emu, layout, dtype, bs, d, planned):
    check_write_layout(emu, Paged(layout_lens(bs), bs, 3, d, dtype, "cpu", layout=layout), planned)


@pytest.mark.parametrize("dtype,bs,d", [(torch.float16, 16, 64), (torch.bfloat16, 24, 17), (torch.float32, 16, 64)],
                         ids=["float16-bs16-d64", "bfloat16-bs24-d17", "float32-bs16-d64"])
@pytest.mark.parametrize("layout", PACKED_LAYOUTS)
def test_planned_step_vllm_layouts_emulated(emu, layout, dtype, bs, d):
    lens = layout_lens(bs)
    pc = Paged(lens, bs, 2, d, dtype, "cpu", layout=layout, capacity=[n + 1 for n in lens])
    check_step_layout(emu, pc, 4, kernels="cuda")


def test_cache_last_dim_must_be_dense_emulated(emu):
    kv = torch.zeros(3, 2, 4, 16, 2)
    k_cache, v_cache = kv[..., 0].permute(0, 2, 1, 3), kv[..., 1].permute(0, 2, 1, 3)
    tables = torch.tensor([[0, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"last dimension of k_cache and v_cache must be dense \(stride 1\)"):
        emu.paged_decode(randn(1, 2, 16), k_cache, v_cache, tables, torch.tensor([5], dtype=torch.int32), 0.25, None)
    with pytest.raises(ValueError, match=r"last dimension of k_cache and v_cache must be dense \(stride 1\)"):
        k = randn(1, 2, 16)
        emu.paged_write_(k, k, k_cache, v_cache, torch.tensor([[0, 1]], dtype=torch.int32), None, None, None, None,
                         None)


LONG_DECODE = list(itertools.product([1, 16, 5], [(2, 2), (8, 2), (12, 1)], [64, 128, 48], ALL))


if LONG:

    @pytest.mark.parametrize("bs,heads,d,dtype", LONG_DECODE)
    def test_paged_decode_emulated_long_grid(emu, bs, heads, d, dtype):
        hq, hkv = heads
        lens = [1, bs, bs + 1, 3 * bs + 2, 257]
        check_decode_emulated(emu, Paged(lens, bs, hkv, d, dtype, "cpu"), hq)


# --------------------------------------------------------------------------------------------------
# 4. MSA-Conv: forward (lse), backward (delta + dQ per query, dK/dV per key)

# (B, H, W, heads, D, kernel_size, dilation, padding, kv_shift): odd sizes, maps smaller than the
# window, the three paddings, clamp windows that fill the map, dilations, negative and oversized
# shifts, and the head dims of each kernel variant (32, 64 and the generic one).
MSA_CASES = {
    "d16-zero-odd": (1, 5, 7, 2, 16, (3, 3), (1, 1), "zero", None),
    "d1-zero-map-under-window": (2, 2, 3, 1, 1, (5, 7), (1, 1), "zero", [(-3, 4)]),
    "d32-mask-map-under-window": (1, 3, 2, 2, 32, (5, 5), (2, 1), "mask", [(1, -1), (-4, 7)]),
    "d64-clamp-dil2": (1, 7, 6, 2, 64, (3, 3), (2, 2), "clamp", [(3, -2), (0, 5)]),
    "d48-clamp-whole-map": (1, 5, 5, 1, 48, (5, 5), (1, 1), "clamp", None),
    "d128-zero-shift": (1, 4, 5, 1, 128, (3, 3), (1, 2), "zero", [(-7, 9)]),
    "d64-mask-rect-dil3": (2, 6, 4, 1, 64, (1, 3), (1, 3), "mask", None),
    "d32-k1": (1, 3, 4, 2, 32, (1, 1), (1, 1), "zero", [(1, 1), (2, 3)]),
}


@pytest.mark.parametrize("dtype", ALL, ids=dtype_id)
@pytest.mark.parametrize("case", list(MSA_CASES))
def test_msa_conv2d_emulated(emu, case, dtype):
    b, h, w, heads, d, ks, dil, padding, shift = MSA_CASES[case]
    q, k, v = (randn(b, h, w, heads, d, dtype=dtype) for _ in range(3))
    check_msa_conv(emu, q, k, v, ks, dil, padding, shift)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_msa_conv2d_strided_inputs_emulated(emu, dtype):
    """q, k, v sliced out of one tensor, and a k whose last dimension is not contiguous."""
    base = randn(1, 5, 6, 5, 32, dtype=dtype)
    q, v = base[:, :, :, 0:2], base[:, :, :, 3:5]
    k = randn(32, 1, 5, 6, 2, dtype=dtype).permute(1, 2, 3, 4, 0)
    check_msa_conv(emu, q, k, v, (3, 5), (1, 1), "mask", [(2, -3), (-5, 9)])


def test_msa_conv2d_many_heads_emulated(emu):
    """More heads than the kernels' arguments carry: the shift table is read from device memory."""
    heads = 66
    q, k, v = (randn(1, 2, 3, heads, 1) for _ in range(3))
    check_msa_conv(emu, q, k, v, (3, 3), (1, 1), "zero", [(h, 5 - h) for h in range(heads)])


def test_msa_conv2d_backward_is_deterministic_emulated(emu):
    q, k, v = (randn(1, 6, 5, 1, 32, dtype=torch.bfloat16) for _ in range(3))
    args = ([3, 3], [2, 1], "clamp", [1, -2], 0.3)
    out, lse = emu.msa_conv2d_fwd(q, k, v, *args)
    dout = randn(*q.shape, dtype=torch.bfloat16)
    first = emu.msa_conv2d_bwd(dout, q, k, v, out, lse, *args)
    second = emu.msa_conv2d_bwd(dout, q, k, v, out, lse, *args)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("device", [{}, dict(major=7)], ids=["sm90", "sm70"])
@pytest.mark.parametrize("dtype,d", [(torch.float16, 64), (torch.float32, 32), (torch.bfloat16, 40)])
def test_msa_conv2d_kernel_for_names_the_kernel_that_runs(emu, device, dtype, d):
    q, k, v = (randn(1, 3, 3, 1, d, dtype=dtype) for _ in range(3))
    args = ([3, 3], [1, 1], "zero", None, d**-0.5)
    with emulated_device(emu, **device):
        out, lse = emu.msa_conv2d_fwd(q, k, v, *args)
        launches = {
            "msa_conv2d_fwd": (lambda: emu.msa_conv2d_fwd(q, k, v, *args), {"msa_fwd"}),
            "msa_conv2d_bwd": (
                lambda: emu.msa_conv2d_bwd(out, q, k, v, out, lse, *args),
                {"msa_bwd_dq", "msa_bwd_dkdv"},
            ),
        }
        for op, (fn, stems) in launches.items():
            want = emu.kernel_for(torch.empty(0, dtype=dtype), op, d, 1)
            assert want == "generic"
            names = {n for n in launched_by(emu, fn) if "msa_" in n}
            assert {stem for stem in stems if any(f"{stem}_{want}_kernel" in n for n in names)} == stems, names
            assert all(f"_{want}_kernel" in n for n in names), names
