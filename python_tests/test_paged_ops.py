"""Paged KV cache ops (docs/paged_kv.md, docs/errors.md; research/h2o_paged.md §6): paged_decode with fused H2O score
accumulation, paged_write_, causal prefill scores, select_evictions, their op registrations and argument
errors. Oracles: ``sinklora_ext.reference`` (float64).

Every CPU test has a CUDA twin (skipped without a device). Data-dependent table/slot validation is
host-side on both devices (``check_tables`` in csrc/paged_kv_api.cpp; on CUDA a copy to the host), once
per call, or once per step with a plan (``plan_paged``) that every layer's calls then reuse.
"""

from __future__ import annotations

import math

import pytest
import torch

import sinklora_ext
from sinklora_ext.paged import physical_slots
from sinklora_ext.reference import (
    causal_column_scores_ref,
    eviction_rank_ref,
    gather_paged,
    query_weights_ref,
    select_evictions_ref,
    paged_decode_ref,
    prefix_chunk_attention_ref,
    sf_attention_ref,
)

from conftest import (
    DTYPES,
    FWD_FACTOR,
    assert_flash_close,
    dtype_id,
    randn,
    requires_cuda,
)

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
OPS = torch.ops.sinklora_ext

# Tolerance of accumulated scores (float32) against the float64 reference, per device. Probabilities
# are computed in float32 from inputs in the cache dtype, so the dtype matters only through the
# kernel's internal precision: float32 throughout on the CPU (errors ~3e-8 abs, ~3e-7 rel in every
# dtype); a half-precision P on the GPU is allowed more.
SCORE_TOL = {
    "cpu": {dtype: dict(rtol=2e-6, atol=2e-7) for dtype in DTYPES},
    "cuda": {
        torch.float32: dict(rtol=1e-5, atol=1e-6),
        torch.float16: dict(rtol=2e-3, atol=2e-4),
        torch.bfloat16: dict(rtol=1e-2, atol=1e-3),
    },
}


# --------------------------------------------------------------------------------------------------
# helpers


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern view (so NaN == NaN and -0.0 != 0.0 in comparisons)."""
    t = t.detach().contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, what
    diff = (bits(a) != bits(b)).nonzero()
    assert diff.numel() == 0, f"{what}: {diff.shape[0]} elements changed, first at {diff[:4].tolist()}"


def poison_value(dtype: torch.dtype, kind: str) -> float:
    return float("nan") if kind == "nan" else torch.finfo(dtype).max


# Physical layouts of a pool (``Paged(layout=...)``). Besides two separate tensors, the caches are views of one
# buffer, as an attention backend of vLLM gets them (one ``kv [num_blocks, Hkv, block_size, 2 D]`` per layer,
# K || V per token): k = kv[..., :D].permute(0, 2, 1, 3), v = kv[..., D:].permute(0, 2, 1, 3).
LAYOUTS = ("separate", "stacked", "hnd_packed", "nhd_packed", "vllm_cpu_attn")
PACKED_LAYOUTS = ("hnd_packed", "nhd_packed", "vllm_cpu_attn")


def layout_storage(layout, nb, bs, hkv, d, dtype, device="cpu"):
    """The contiguous buffer(s) a pool of ``layout`` lives in (a tuple: two for "separate")."""
    shape = {
        "separate": (nb, bs, hkv, d),
        "stacked": (nb, 2, bs, hkv, d),       # [NB, 2, bs, Hkv, D]
        "hnd_packed": (nb, hkv, bs, 2 * d),   # vLLM LBHNC: kv contiguous
        "nhd_packed": (nb, bs, hkv, 2 * d),   # vLLM LBNHC: kv = storage.permute(0, 2, 1, 3)
        "vllm_cpu_attn": (nb, hkv, bs, 2 * d),  # vLLM CPU_ATTN: page [Hkv, 2 bs, D], K rows then V rows
    }[layout]
    n = 2 if layout == "separate" else 1
    return tuple(torch.empty(shape, dtype=dtype, device=device) for _ in range(n))


def layout_views(layout, storage, d):
    """(kv, k_cache, v_cache) of ``storage`` (from :func:`layout_storage`): views, never copies; kv is the
    logical vLLM tensor [NB, Hkv, bs, 2 D] of the packed layouts (None otherwise)."""
    if layout == "separate":
        return None, storage[0], storage[1]
    (buf,) = storage
    if layout == "stacked":
        return None, buf[:, 0], buf[:, 1]
    if layout == "hnd_packed":
        kv = buf
    elif layout == "nhd_packed":
        kv = buf.permute(0, 2, 1, 3)
    elif layout == "vllm_cpu_attn":
        nb, hkv, bs, _ = buf.shape
        page = buf.view(nb, hkv, 2 * bs, d)
        return buf, page[:, :, :bs].permute(0, 2, 1, 3), page[:, :, bs:].permute(0, 2, 1, 3)
    else:
        raise ValueError(layout)
    return kv, kv[..., :d].permute(0, 2, 1, 3), kv[..., d:].permute(0, 2, 1, 3)


class Paged:
    """A shuffled paged cache holding ``lens[b]`` tokens per sequence; everything else (unused
    blocks, the tail of each last block, table padding) is poison or foreign. ``layout`` (LAYOUTS) is
    the physical layout of the caches; ``kv_strided=True`` is the "stacked" one. ``storage`` holds the
    buffer(s) the caches are views of."""

    def __init__(self, lens, bs, hkv, d, dtype, device, extra_blocks=3, spare_cols=1,
                 k_poison="nan", v_poison="huge", pad="mixed", capacity=None, kv_strided=False, layout=None):
        self.lens, self.bs, self.hkv, self.d, self.dtype, self.device = list(lens), bs, hkv, d, dtype, device
        self.layout = layout or ("stacked" if kv_strided else "separate")
        cap = capacity or lens
        need = [max(1, math.ceil(c / bs)) for c in cap]
        self.max_blocks = max(need) + spare_cols
        nb = sum(need) + extra_blocks
        perm = torch.randperm(nb).tolist()
        storage = layout_storage(self.layout, nb, bs, hkv, d, dtype)
        _, k_cache, v_cache = layout_views(self.layout, storage, d)
        # k and v cover every element of the storage: all of it is poison until written
        k_cache.fill_(poison_value(dtype, k_poison))
        v_cache.fill_(poison_value(dtype, v_poison))
        tables = torch.full((len(lens), self.max_blocks), -1, dtype=torch.int32)
        self.owned = []
        i = 0
        for b, n in enumerate(need):
            ids = perm[i:i + n]
            i += n
            tables[b, :n] = torch.tensor(ids, dtype=torch.int32)
            self.owned.append(ids)
        self.free = perm[i:]
        for b in range(len(lens)):  # padding past the used blocks: -1 or someone else's block
            for c in range(need[b], self.max_blocks):
                if pad == "neg" or (pad == "mixed" and b % 2 == 0):
                    continue
                tables[b, c] = perm[(b * 7 + c) % nb]
        for b, n in enumerate(lens):
            k = randn(n, hkv, d, dtype=dtype)
            v = randn(n, hkv, d, dtype=dtype)
            t = torch.arange(n)
            blk = tables[b].long()[t // bs]
            k_cache[blk, t % bs] = k
            v_cache[blk, t % bs] = v
        if device != "cpu":
            storage = tuple(s.to(device) for s in storage)
        self.storage = storage
        self.kv, self.k_cache, self.v_cache = layout_views(self.layout, storage, d)
        self.tables = tables.to(device)
        self.seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
        self.num_blocks = nb

    def attended_mask(self) -> torch.Tensor:
        """Bool [NB, bs] (same for every kv head): slots some sequence attends."""
        m = torch.zeros(self.num_blocks, self.bs, dtype=torch.bool)
        tables = self.tables.cpu().long()
        for b, n in enumerate(self.seq_lens.tolist()):
            t = torch.arange(n)
            m[tables[b][t // self.bs], t % self.bs] = True
        return m


def decode_plain(q, k_cache, v_cache, tables, seq_lens, scale):
    """Plain PyTorch gather + softmax in q's dtype (flash-attention's baseline)."""
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    out = torch.zeros_like(q)
    for i in range(b):
        n = int(seq_lens[i])
        if n == 0:
            continue
        k = gather_paged(k_cache, tables[i], n).repeat_interleave(hq // hkv, dim=1)
        v = gather_paged(v_cache, tables[i], n).repeat_interleave(hq // hkv, dim=1)
        p = torch.softmax(torch.einsum("hd,thd->ht", q[i] * scale, k), dim=-1)
        out[i] = torch.einsum("ht,thd->hd", p, v)
    return out


def check_decode(pc: Paged, hq: int, scale=None, q=None, check_scores=True, decode=sinklora_ext.paged_decode,
                 kernels=None):
    """Decode once on ``pc`` with ``decode`` (paged_decode's arguments) and a canary-filled score
    buffer, and check the output (2x rule), the attended slots' scores (fp64 reference, with the
    tolerance of ``kernels``' device: ``pc.device`` unless given), everything else bitwise untouched."""
    dtype, device = pc.dtype, pc.device
    b = len(pc.lens)
    if q is None:
        q = randn(b, hq, pc.d, dtype=dtype, device=device)
    eff_scale = pc.d ** -0.5 if scale is None else scale
    scores0 = torch.rand(pc.num_blocks, pc.bs, pc.hkv, dtype=torch.float32, device=device) * 3
    scores = scores0.clone() if check_scores else None
    before = [t.clone() for t in (q, pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens)]

    out = decode(q, pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens, scale, scores)

    # inputs untouched (the caches hold poison: compare bit patterns)
    for name, t0, t1 in zip(("q", "k_cache", "v_cache", "block_tables", "seq_lens"), before,
                            (q, pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens)):
        assert_bitwise_equal(t1.cpu(), t0.cpu(), f"paged_decode modified {name}")

    qc, kc, vc, tc, lc = (t.cpu() for t in (q, pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens))
    scores64 = scores0.cpu().double().clone()
    ref64 = paged_decode_ref(qc.double(), kc.double(), vc.double(), tc, lc, eff_scale, scores64)
    base = decode_plain(qc, kc, vc, tc, lc, eff_scale)
    assert_flash_close("paged_decode out", out.cpu(), ref64, base, dtype, FWD_FACTOR)
    if check_scores:
        s = scores.cpu()
        att = pc.attended_mask()
        assert torch.isfinite(s).all(), "scores: NaN/inf (poison leaked)"
        torch.testing.assert_close(s[att].double(), scores64[att], **SCORE_TOL[kernels or device][dtype],
                                   msg=lambda m: f"accumulated scores: {m}")
        assert_bitwise_equal(s[~att], scores0.cpu()[~att], "scores of slots nobody attends")
    return out, scores


# --------------------------------------------------------------------------------------------------
# 1. paged_decode vs the float64 reference


DECODE_CFGS = [  # (Hq, Hkv, D, K poison, V poison)
    pytest.param(2, 2, 64, "nan", "huge", id="gqa1-d64"),
    pytest.param(4, 1, 128, "huge", "nan", id="gqa4-d128"),
    pytest.param(16, 2, 40, "nan", "nan", id="gqa8-d40"),
]


def edge_lens(bs):
    lens = [1, max(bs - 1, 1), bs, bs + 1, 3 * bs + 5 if bs > 1 else 7]
    return lens


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bs", [1, 8, 16, 32])
@pytest.mark.parametrize("hq,hkv,d,kp,vp", DECODE_CFGS)
def test_decode_matches_reference(device, dtype, bs, hq, hkv, d, kp, vp):
    pc = Paged(edge_lens(bs), bs, hkv, d, dtype, device, k_poison=kp, v_poison=vp)
    check_decode(pc, hq)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_decode_long_split_edges(device, dtype):
    """Lengths around split-KV partition edges (511/512/513, 1025) and a tiny batch neighbour."""
    pc = Paged([511, 512, 513, 1025, 2], 16, 2, 64, dtype, device, k_poison="huge", v_poison="nan")
    check_decode(pc, 8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lens", [[1025], [700, 3], [257, 0, 1300]], ids=str)
def test_decode_few_long_sequences(device, lens):
    """Few sequences, many slots: the sequence is split across workers and merged (scores too)."""
    pc = Paged(lens, 16, 2, 64, torch.float32, device, k_poison="nan", v_poison="huge")
    check_decode(pc, 6)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_scale_strides_and_padding(device):
    """Custom softmax_scale, q as a strided slice of a fused projection, caches as views of one
    [NB, 2, bs, Hkv, D] buffer, table padding that is all -1 or all foreign blocks."""
    for pad in ("neg", "foreign"):
        pc = Paged([9, 1, 24, 17], 8, 2, 64, torch.float32, device, pad=pad, kv_strided=True)
        assert not pc.k_cache.is_contiguous()
        fused = randn(4, 8 + 2 * 2, 64, device=device)
        q = fused[:, :8]
        assert not q.is_contiguous()
        check_decode(pc, 8, scale=0.3, q=q)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_decode_empty_sequence(device, dtype):
    """seq_lens[b] == 0: the reference's zeros, no score touched for anyone; neighbours unaffected."""
    pc = Paged([0, 5, 0], 4, 1, 64, dtype, device)
    out, _ = check_decode(pc, 2)
    assert (out[0] == 0).all() and (out[2] == 0).all()


# --------------------------------------------------------------------------------------------------
# 2. scores over several steps, scores=None, batch isolation


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_scores_accumulate_over_steps(device, dtype):
    """paged_write_ the new token (fresh score 0) then decode with scores, 6 steps; the scores equal the
    dense float64 sums and each output matches the reference."""
    steps, bs, hq, hkv, d = 6, 8, 8, 2, 64
    lens = [5, 8, 13]
    pc = Paged(lens, bs, hkv, d, dtype, device, capacity=[n + steps for n in lens])
    b = len(lens)
    scores = torch.zeros(pc.num_blocks, pc.bs, hkv, dtype=torch.float32, device=device)
    scores64 = scores.cpu().double()
    seq_lens = pc.seq_lens.clone()
    for step in range(steps):
        k = randn(b, hkv, d, dtype=dtype, device=device)
        v = randn(b, hkv, d, dtype=dtype, device=device)
        logical = seq_lens.long()[:, None].expand(b, hkv)
        slots = physical_slots(pc.tables, logical, bs)
        sinklora_ext.paged_write_(k, v, pc.k_cache, pc.v_cache, slots, scores)
        scores64.view(-1, hkv)[slots.cpu().long(), torch.arange(hkv)] = 0.0
        seq_lens += 1
        q = randn(b, hq, d, dtype=dtype, device=device)
        out = sinklora_ext.paged_decode(q, pc.k_cache, pc.v_cache, pc.tables, seq_lens, scores=scores)
        qc, kc, vc, tc, lc = (t.cpu() for t in (q, pc.k_cache, pc.v_cache, pc.tables, seq_lens))
        ref64 = paged_decode_ref(qc.double(), kc.double(), vc.double(), tc, lc, None, scores64)
        base = decode_plain(qc, kc, vc, tc, lc, d ** -0.5)
        assert_flash_close(f"step {step} out", out.cpu(), ref64, base, dtype, FWD_FACTOR)
    torch.testing.assert_close(scores.cpu().double(), scores64, **SCORE_TOL[device][dtype])
    # each step distributes mass Hq/Hkv per kv head over a sequence's slots
    for i in range(b):
        t = torch.arange(int(seq_lens[i]))
        per_head = scores.cpu()[pc.tables.cpu()[i].long()[t // bs], t % bs].double().sum(0)
        torch.testing.assert_close(per_head, torch.full((hkv,), steps * hq / hkv, dtype=torch.float64),
                                   rtol=1e-4, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_scores_none_same_output(device, dtype):
    pc = Paged([7, 33, 16], 16, 2, 128, dtype, device)
    q = randn(3, 8, 128, dtype=dtype, device=device)
    scores = torch.zeros(pc.num_blocks, 16, 2, device=device)
    with_s = sinklora_ext.paged_decode(q, pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens, scores=scores)
    without = sinklora_ext.paged_decode(q, pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens)
    assert_bitwise_equal(without.cpu(), with_s.cpu(), "output with scores=None vs with scores")
    again = sinklora_ext.paged_decode(q, pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens)
    assert_bitwise_equal(again.cpu(), without.cpu(), "run-to-run determinism")


@pytest.mark.parametrize("device", DEVICES)
def test_batch_isolation(device):
    bs, hq, hkv, d = 8, 4, 2, 64
    lens = [11, 20, 6]
    pc = Paged(lens, bs, hkv, d, torch.float32, device)
    q = randn(3, hq, d, device=device)
    s1 = torch.zeros(pc.num_blocks, bs, hkv, device=device)
    out1 = sinklora_ext.paged_decode(q, pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens, scores=s1)

    # change everything of sequence 1 (cache contents and query), same lengths
    mine = torch.tensor(pc.owned[1], device=device)
    pc.k_cache[mine] = randn(len(pc.owned[1]), bs, hkv, d, device=device) * 3
    pc.v_cache[mine] = randn(len(pc.owned[1]), bs, hkv, d, device=device) * 3
    q2 = q.clone()
    q2[1] = randn(hq, d, device=device)
    s2 = torch.zeros_like(s1)
    out2 = sinklora_ext.paged_decode(q2, pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens, scores=s2)
    for i in (0, 2):
        assert_bitwise_equal(out2[i].cpu(), out1[i].cpu(), f"sequence {i} output after sequence 1 changed")
    ob = torch.tensor(pc.owned[0] + pc.owned[2], device=device)
    assert_bitwise_equal(s2[ob].cpu(), s1[ob].cpu(), "scores of sequences 0/2 after sequence 1 changed")
    assert not torch.equal(out2[1], out1[1])

    # different length for sequence 1: others still match (tolerance: split heuristics may move)
    lens3 = pc.seq_lens.clone()
    lens3[1] = 3
    s3 = torch.zeros_like(s1)
    out3 = sinklora_ext.paged_decode(q2, pc.k_cache, pc.v_cache, pc.tables, lens3, scores=s3)
    for i in (0, 2):
        torch.testing.assert_close(out3[i], out1[i], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s3[ob], s1[ob], rtol=1e-5, atol=1e-6)

    # decode sequence 0 alone: sequence 1's and 2's blocks (and the free ones) keep their canary scores
    canary = torch.full_like(s1, -3.5)
    sinklora_ext.paged_decode(q[:1].contiguous(), pc.k_cache, pc.v_cache, pc.tables[:1].contiguous(),
                              pc.seq_lens[:1].contiguous(), scores=canary)
    foreign = torch.tensor(pc.owned[1] + pc.owned[2] + pc.free, device=device)
    assert (canary[foreign] == -3.5).all(), "decode of sequence 0 touched blocks it does not own"
    t = torch.arange(lens[0])
    blk = torch.tensor(pc.owned[0])[t // bs]
    assert (canary.cpu()[blk, t % bs] > -3.5).all()


# --------------------------------------------------------------------------------------------------
# 3. paged_write_


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("with_new_scores", [False, True])
def test_paged_write_exact_slots(device, dtype, with_new_scores):
    nb, bs, hkv, d, rows = 6, 4, 3, 40, 5
    num_slots = nb * bs
    k_cache = torch.full((nb, bs, hkv, d), -7.0, dtype=dtype, device=device)
    v_cache = torch.full((nb, bs, hkv, d), 11.0, dtype=dtype, device=device)
    scores = torch.full((nb, bs, hkv), 5.5, device=device)
    positions = torch.full((nb, bs, hkv), -9, dtype=torch.int32, device=device)
    # distinct slots per head (different per head), with some -1 skips
    slots = torch.stack([torch.randperm(num_slots)[:rows] for _ in range(hkv)], dim=1).to(torch.int32)
    slots[1, 0] = -1
    slots[3, 2] = -1
    slots[4, :] = -1
    slots = slots.to(device)
    big = randn(rows, hkv, d + 8, dtype=dtype, device=device)
    k = big[:, :, :d]  # strided rows, last dim contiguous
    v = randn(rows, hkv, d, dtype=dtype, device=device)
    new_scores = torch.rand(rows, hkv, device=device) if with_new_scores else None
    token_positions = torch.tensor([100, 101, 7, 250, 3], dtype=torch.int32, device=device)
    sinklora_ext.paged_write_(k, v, k_cache, v_cache, slots, scores, new_scores, positions, token_positions)

    kc, vc, sc, pc = (t.cpu().reshape(num_slots, hkv, *t.shape[3:]) for t in (k_cache, v_cache, scores, positions))
    written = torch.zeros(num_slots, hkv, dtype=torch.bool)
    for r in range(rows):
        for h in range(hkv):
            s = int(slots[r, h])
            if s < 0:
                continue
            written[s, h] = True
            assert torch.equal(kc[s, h], k[r, h].cpu()), (r, h)
            assert torch.equal(vc[s, h], v[r, h].cpu()), (r, h)
            assert sc[s, h].item() == (new_scores[r, h].item() if with_new_scores else 0.0), (r, h)
            assert pc[s, h].item() == int(token_positions[r]), (r, h)
    assert (kc[~written] == -7.0).all() and (vc[~written] == 11.0).all(), "paged_write_ touched other cache slots"
    assert (sc[~written] == 5.5).all() and (pc[~written] == -9).all(), "paged_write_ touched other score/position slots"


@pytest.mark.parametrize("device", DEVICES)
def test_paged_write_optional_metadata(device):
    """Without scores/positions only K/V change; with scores but no new_scores the score is reset to 0;
    token_positions without positions is ignored."""
    nb, bs, hkv, d = 3, 2, 2, 64
    k_cache = torch.zeros(nb, bs, hkv, d, device=device)
    v_cache = torch.zeros_like(k_cache)
    scores = torch.full((nb, bs, hkv), 2.0, device=device)
    slots = torch.tensor([[0, 5], [3, -1]], dtype=torch.int32, device=device)
    k = randn(2, hkv, d, device=device)
    v = randn(2, hkv, d, device=device)
    sinklora_ext.paged_write_(k, v, k_cache, v_cache, slots)
    flat = k_cache.view(-1, hkv, d)
    assert torch.equal(flat[0, 0], k[0, 0]) and torch.equal(flat[5, 1], k[0, 1]) and torch.equal(flat[3, 0], k[1, 0])
    assert (flat[3, 1] == 0).all()
    sinklora_ext.paged_write_(k, v, k_cache, v_cache, slots, scores,
                           token_positions=torch.tensor([1, 2], dtype=torch.int32, device=device))
    s = scores.view(-1, hkv).cpu()
    assert s[0, 0] == 0 and s[5, 1] == 0 and s[3, 0] == 0 and s[3, 1] == 2.0
    assert (s[[1, 2, 4]] == 2.0).all() and s[0, 1] == 2.0 and s[5, 0] == 2.0
    # zero rows: a no-op
    before = [t.clone() for t in (k_cache, v_cache, scores)]
    sinklora_ext.paged_write_(k[:0], v[:0], k_cache, v_cache, slots[:0], scores)
    for name, t0, t1 in zip(("k_cache", "v_cache", "scores"), before, (k_cache, v_cache, scores)):
        assert_bitwise_equal(t1.cpu(), t0.cpu(), f"a zero-row write changed {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_decode_sees_written_token(device, dtype):
    """Write the new token at logical slot n (different physical slot per head via a per-head
    logical slot), then decode with seq_len n+1: matches the reference over the updated cache."""
    bs, hq, hkv, d = 8, 4, 2, 64
    lens = [9, 16]
    pc = Paged(lens, bs, hkv, d, dtype, device, capacity=[n + 1 for n in lens])
    # sequence 0 reuses evicted slots (a different one per head, length unchanged); sequence 1 appends
    logical = torch.tensor([[5, 2], [16, 16]], device=device)
    slots = physical_slots(pc.tables, logical, bs)
    k = randn(2, hkv, d, dtype=dtype, device=device) * 2
    v = randn(2, hkv, d, dtype=dtype, device=device) * 2
    sinklora_ext.paged_write_(k, v, pc.k_cache, pc.v_cache, slots)
    pc.seq_lens = pc.seq_lens + torch.tensor([0, 1], dtype=torch.int32, device=device)
    pc.lens = [9, 17]
    out, _ = check_decode(pc, hq)
    for b in range(2):
        for h in range(hkv):
            t = int(logical[b, h])
            blk = int(pc.tables[b, t // bs])
            assert torch.equal(pc.k_cache[blk, t % bs, h], k[b, h])
            assert torch.equal(pc.v_cache[blk, t % bs, h], v[b, h])


def test_physical_slots():
    tables = torch.tensor([[5, 2, 9], [1, 0, 7]], dtype=torch.int32)
    logical = torch.tensor([[0, 3, 4, 11], [-1, 8, 5, 4]])
    phys = physical_slots(tables, logical, 4)
    assert phys.dtype == torch.int32
    assert phys.tolist() == [[20, 23, 8, 39], [-1, 28, 1, 0]]


# --------------------------------------------------------------------------------------------------
# 4. prefill scores

# (rtol, atol) of prefill scores against the float64 reference, per device (see SCORE_TOL)
PREFILL_TOL = {
    "cpu": {dtype: (2e-6, 2e-7) for dtype in DTYPES},
    "cuda": {torch.float32: (1e-4, 1e-5), torch.float16: (5e-3, 1e-3), torch.bfloat16: (2e-2, 5e-3)},
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("b,n,hq,hkv,d", [(2, 37, 4, 2, 64), (1, 1, 8, 1, 128), (3, 20, 8, 1, 40), (1, 64, 2, 2, 128)])
def test_causal_prefill_scores(device, dtype, b, n, hq, hkv, d):
    q = randn(b, n, hq, d, dtype=dtype, device=device)
    k = randn(b, n, hkv, d, dtype=dtype, device=device)
    v = randn(b, n, hkv, d, dtype=dtype, device=device)
    out, scores = sinklora_ext.causal_prefill(q, k, v)
    assert scores.shape == (b, n, hkv) and scores.dtype == torch.float32
    ref = causal_column_scores_ref(q.cpu(), k.cpu())
    rtol, atol = PREFILL_TOL[device][dtype]
    torch.testing.assert_close(scores.cpu().double(), ref, rtol=rtol, atol=atol * max(1, n / 16))
    # every query row is a distribution: total mass N * Hq, per kv head N * Hq / Hkv
    torch.testing.assert_close(scores.double().sum().cpu(), torch.tensor(float(b * n * hq), dtype=torch.float64),
                               rtol=1e-4, atol=0)
    torch.testing.assert_close(scores.double().sum(1).cpu(),
                               torch.full((b, hkv), n * hq / hkv, dtype=torch.float64), rtol=1e-4, atol=0)
    out64 = sf_attention_ref(q.cpu().double(), k.cpu().double(), v.cpu().double(), max(n, 1), 0, "none")
    outpt = sf_attention_ref(q.cpu(), k.cpu(), v.cpu(), max(n, 1), 0, "none", upcast=False)
    assert_flash_close("causal_prefill out", out.cpu(), out64, outpt, dtype, FWD_FACTOR)
    out2, none = sinklora_ext.causal_prefill(q, k, v, with_scores=False)
    assert none is None
    assert_bitwise_equal(out2.cpu(), out.cpu(), "causal_prefill out with/without scores")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_column_scores_varlen(device, dtype):
    lens = [5, 1, 33, 17]
    hq, hkv, d = 4, 2, 64
    total = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = randn(total, hq, d, dtype=dtype, device=device)
    k = randn(total, hkv, d, dtype=dtype, device=device)
    v = randn(total, hkv, d, dtype=dtype, device=device)
    mx = max(lens)
    _, lse = OPS.sf_attention_fwd(q, k, v, cu, mx, mx, 0, "none", d ** -0.5)
    scores = sinklora_ext.column_scores(q, k, lse, cu, mx)
    assert scores.shape == (total, hkv) and scores.dtype == torch.float32
    rtol, atol = PREFILL_TOL[device][dtype]
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        _, one = sinklora_ext.causal_prefill(q[None, s:e], k[None, s:e], v[None, s:e])
        torch.testing.assert_close(scores[s:e], one[0], rtol=1e-5, atol=1e-6, msg=lambda m: f"seq {i}: {m}")
        ref = causal_column_scores_ref(q[None, s:e].cpu(), k[None, s:e].cpu())[0]
        torch.testing.assert_close(scores[s:e].cpu().double(), ref, rtol=rtol, atol=atol * 3)
    # batched [B, N] form: lse from the batched forward
    qb, kb = q[None, :5], k[None, :5]
    _, lse_b = OPS.sf_attention_fwd(qb, kb, v[None, :5], None, 0, 5, 0, "none", d ** -0.5)
    torch.testing.assert_close(sinklora_ext.column_scores(qb, kb, lse_b), scores[:5], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("decay,window", [(0.0, 0), (0.9, 0), (1.0, 8), (0.95, 5), (0.5, 40)])
def test_column_scores_weigh_the_queries(device, dtype, decay, window):
    """Query i of a sequence of n weighs decay ** (n - 1 - i), and 0 before the last ``window``
    queries: TOVA's last-query scores, the decay rule's prompt scores, SnapKV's observation window."""
    lens = [5, 1, 33, 17]
    hq, hkv, d = 4, 2, 64
    total, mx = sum(lens), max(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = randn(total, hq, d, dtype=dtype, device=device)
    k = randn(total, hkv, d, dtype=dtype, device=device)
    v = randn(total, hkv, d, dtype=dtype, device=device)
    _, lse = OPS.sf_attention_fwd(q, k, v, cu, mx, mx, 0, "none", d ** -0.5)
    scores = sinklora_ext.column_scores(q, k, lse, cu, mx, decay=decay, window=window)
    rtol, atol = PREFILL_TOL[device][dtype]
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        ref = causal_column_scores_ref(q[None, s:e].cpu(), k[None, s:e].cpu(), decay=decay, window=window)[0]
        torch.testing.assert_close(scores[s:e].cpu().double(), ref, rtol=rtol, atol=atol * 3,
                                   msg=lambda m: f"seq {i}: {m}")
        # the weights sum to the mass: each weighted query row is a distribution times its weight
        w = query_weights_ref(e - s, decay, window)
        torch.testing.assert_close(scores[s:e].double().sum().cpu(), w.sum() * hq, rtol=1e-4, atol=1e-6)
    _, sc, sel = sinklora_ext.causal_prefill(q[None, :33], k[None, :33], v[None, :33], score_decay=decay,
                                             selection_window=window or 4)
    ref = causal_column_scores_ref(q[None, :33].cpu(), k[None, :33].cpu(), decay=decay)
    torch.testing.assert_close(sc.cpu().double(), ref, rtol=rtol, atol=atol * 3)
    ref = causal_column_scores_ref(q[None, :33].cpu(), k[None, :33].cpu(), window=window or 4)
    torch.testing.assert_close(sel.cpu().double(), ref, rtol=rtol, atol=atol * 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("prefix,n,hq,hkv,d,decay", [
    (0, 9, 4, 2, 64, 1.0), (1, 1, 8, 1, 128, 1.0), (37, 20, 6, 3, 64, 0.9), (200, 3, 4, 4, 40, 0.0),
    (5, 700, 4, 2, 64, 0.99),  # more query rows than one piece (_PREFIX_ROWS)
])
def test_prefix_chunk_attention(device, dtype, prefix, n, hq, hkv, d, decay):
    """A prompt chunk after a cached prefix (chunked prefill) against the float64 reference: the
    output, the chunk keys' and the prefix keys' column sums under the softmax over both."""
    q = randn(n, hq, d, dtype=dtype, device=device)
    k, v = randn(n, hkv, d, dtype=dtype, device=device), randn(n, hkv, d, dtype=dtype, device=device)
    kp, vp = randn(prefix, hkv, d, dtype=dtype, device=device), randn(prefix, hkv, d, dtype=dtype, device=device)
    out, chunk, pre = sinklora_ext.paged.prefix_chunk_attention(q, k, v, kp, vp, score_decay=decay)
    args = [t.cpu() for t in (q, k, v, kp, vp)]
    out64, chunk64, pre64 = prefix_chunk_attention_ref(*[t.double() for t in args], decay=decay)
    outpt, chunkpt, prept = prefix_chunk_attention_ref(*args, decay=decay, upcast=False)
    assert out.dtype == dtype and out.shape == (n, hq, d)
    assert_flash_close("prefix_chunk_attention out", out.cpu(), out64, outpt, dtype, FWD_FACTOR)
    assert chunk.shape == (n, hkv) and pre.shape == (prefix, hkv) and chunk.dtype == pre.dtype == torch.float32
    rtol, atol = PREFILL_TOL[device][dtype]
    torch.testing.assert_close(chunk.cpu().double(), chunk64, rtol=rtol, atol=atol * max(1, n / 16))
    torch.testing.assert_close(pre.cpu().double(), pre64, rtol=rtol, atol=atol * max(1, n / 16))
    # each weighted query row is a distribution over prefix and chunk: the mass is the weights' sum
    total = query_weights_ref(n, decay).sum() * hq
    torch.testing.assert_close(chunk.double().sum().cpu() + pre.double().sum().cpu(), total, rtol=1e-4, atol=1e-6)
    out2, none, none2 = sinklora_ext.paged.prefix_chunk_attention(q, k, v, kp, vp, with_scores=False)
    assert none is None and none2 is None
    assert_bitwise_equal(out2.cpu(), out.cpu(), "prefix_chunk_attention out with/without scores")
    if prefix == 0:  # no prefix: the causal prefill itself
        o, sc = sinklora_ext.causal_prefill(q[None], k[None], v[None], score_decay=decay)
        assert_bitwise_equal(out.cpu(), o[0].cpu(), "prefix_chunk_attention without a prefix = causal_prefill")
        torch.testing.assert_close(chunk, sc[0], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# 5. select_evictions


def make_evict_case(lens, bs, hkv, device, num_distinct=3, extra_blocks=2, gaps=True):
    """Scores with many exact ties; positions a per-head permutation of a gappy increasing
    sequence (what survives evictions) starting with the sinks; poison in unused slots."""
    need = [max(1, math.ceil(n / bs)) for n in lens]
    nb = sum(need) + extra_blocks
    perm = torch.randperm(nb).tolist()
    scores = torch.full((nb, bs, hkv), float("nan"))
    positions = torch.full((nb, bs, hkv), -123, dtype=torch.int32)
    tables = torch.full((len(lens), max(need) + 1), -1, dtype=torch.int32)
    i = 0
    for b, n in enumerate(lens):
        tables[b, :need[b]] = torch.tensor(perm[i:i + need[b]], dtype=torch.int32)
        i += need[b]
        t = torch.arange(n)
        blk, off = tables[b].long()[t // bs], t % bs
        for h in range(hkv):
            if gaps:
                pos = torch.arange(n) + torch.cat([torch.zeros(min(n, 4), dtype=torch.long),
                                                   torch.randint(0, 3, (max(n - 4, 0),)).cumsum(0)])
            else:
                pos = torch.arange(n)
            pos = pos[torch.randperm(n)]  # slot order != position order
            positions[blk, off, h] = pos.to(torch.int32)
            scores[blk, off, h] = torch.randint(0, num_distinct, (n,)).float() * 0.25
    sl = torch.tensor(lens, dtype=torch.int32)
    return scores.to(device), positions.to(device), tables.to(device), sl.to(device)


def check_victims(victims, scores, positions, tables, seq_lens, num_sinks, recent, policy, decay=1.0):
    """Property check independent of the reference."""
    bs = scores.shape[1]
    sc, pos, tab = scores.cpu(), positions.cpu(), tables.cpu()
    for b, n in enumerate(seq_lens.tolist()):
        t = torch.arange(n)
        blk, off = tab[b].long()[t // bs], t % bs
        for h in range(scores.shape[2]):
            p = pos[blk, off, h].long()
            s = sc[blk, off, h]
            v = int(victims[b, h])
            newest = int(p.max()) if n else 0
            eligible = (p >= num_sinks) & (p <= newest - recent)
            if not eligible.any():
                assert v == -1, (b, h)
                continue
            assert 0 <= v < n, (b, h, v)
            assert eligible[v], f"victim at position {int(p[v])} is a sink or recent"
            key = torch.tensor([eviction_rank_ref(policy, float(x), int(y), newest, decay) for x, y in zip(s, p)])
            best = key[eligible].min()
            assert key[v] == best
            assert p[v] == p[eligible & (key == best)].min(), "ties must evict the oldest"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["h2o", "streaming"])
@pytest.mark.parametrize("num_sinks,recent", [(4, 0), (0, 0), (4, 3), (1, 10)])
def test_select_evictions_matches_reference(device, policy, num_sinks, recent):
    lens = [0, 1, 4, 5, 7, 8, 9, 23, 40]
    args = make_evict_case(lens, 8, 3, device)
    victims = sinklora_ext.select_evictions(*args, num_sinks=num_sinks, recent=recent, policy=policy)
    assert victims.dtype == torch.int32 and victims.shape == (len(lens), 3)
    ref = select_evictions_ref(*(a.cpu() for a in args), num_sinks, recent, policy)
    assert torch.equal(victims.cpu(), ref), f"\n{victims.cpu()}\nvs reference\n{ref}"
    check_victims(victims.cpu(), *args, num_sinks, recent, policy)
    assert (victims[0] == -1).all()  # empty sequence


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy,decay", [("mean", 1.0), ("mean", 0.9), ("h2o", 0.0), ("h2o", 0.5), ("mean", 0.0),
                                          ("streaming", 0.25)])
@pytest.mark.parametrize("num_sinks,recent", [(4, 0), (1, 10)])
def test_select_evictions_ranks_and_decays_match_reference(device, policy, decay, num_sinks, recent):
    """``mean`` ranks by score per query seen (decayed: per decayed query count); after the choice
    every score of the sequences' slots is multiplied by ``score_decay``, in the same launch, and
    no other slot is touched (the poison in unused slots stays)."""
    lens = [0, 1, 4, 5, 7, 8, 9, 23, 40]
    args = make_evict_case(lens, 8, 3, device)
    before = args[0].cpu().clone()
    victims = sinklora_ext.select_evictions(*args, num_sinks=num_sinks, recent=recent, policy=policy,
                                            score_decay=decay)
    want = before.clone()
    ref = select_evictions_ref(want, *(a.cpu() for a in args[1:]), num_sinks, recent, policy, decay)
    assert torch.equal(victims.cpu(), ref), f"\n{victims.cpu()}\nvs reference\n{ref}"
    check_victims(victims.cpu(), before, *(a.cpu() for a in args[1:]), num_sinks, recent, policy, decay)
    assert torch.equal(args[0].cpu().view(torch.int32), want.view(torch.int32)), "decayed scores"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spread", [2, 10_000])
def test_decaying_mean_rank_over_old_and_young_keys(device, spread):
    """The CPU kernel takes a decaying mean rank's weights from one table of ages per launch, no
    longer than the launch has slots, and computes older keys' weights directly: ranks over ages
    within and far past the table give the reference's victims."""
    g = torch.Generator().manual_seed(spread)
    lens = [3, 17, 40]
    args = list(make_evict_case(lens, 8, 2, "cpu", num_distinct=1000))
    positions = args[1]
    for b, n in enumerate(lens):  # stretch each sequence's positions: ages up to spread x its length
        t = torch.arange(n)
        blk, off = args[2][b].long()[t // 8], t % 8
        for h in range(2):
            pos = positions[blk, off, h].long()
            positions[blk, off, h] = torch.where(pos < 4, pos, 4 + (pos - 4) * spread +
                                                 torch.randint(0, spread, pos.shape, generator=g)).int()
    args = [a.to(device) for a in args]
    before = args[0].cpu().clone()
    victims = sinklora_ext.select_evictions(*args, num_sinks=4, recent=2, policy="mean", score_decay=0.99)
    want = before.clone()
    ref = select_evictions_ref(want, *(a.cpu() for a in args[1:]), 4, 2, "mean", 0.99)
    assert torch.equal(victims.cpu(), ref), f"\n{victims.cpu()}\nvs reference\n{ref}"


@pytest.mark.parametrize("device", DEVICES)
def test_select_evictions_decay_flushes_denormals(device):
    """Decayed scores below float32's smallest normal become 0, as under CUDA's flush-to-zero."""
    scores, positions, tables, sl = make_evict_case([12], 4, 2, device, gaps=False)
    scores.fill_(2e-38)
    sinklora_ext.select_evictions(scores, positions, tables, sl, num_sinks=4, recent=2, score_decay=0.5)
    pos = gather_paged(positions.cpu(), tables[0].cpu(), 12)
    assert (gather_paged(scores.cpu(), tables[0].cpu(), 12) == 0).all() and pos.shape[0] == 12


@pytest.mark.parametrize("device", DEVICES)
def test_select_evictions_edge_cases(device):
    bs, hkv = 4, 2
    # all ties: the oldest non-sink, non-recent goes, whatever the slot order
    scores, positions, tables, sl = make_evict_case([12], bs, hkv, device, num_distinct=1, gaps=False)
    v = sinklora_ext.select_evictions(scores, positions, tables, sl, num_sinks=4, recent=2)
    pos = gather_paged(positions.cpu(), tables[0].cpu(), 12)
    assert [int(pos[int(v[0, h]), h]) for h in range(hkv)] == [4, 4]
    # streaming ignores scores: oldest non-sink even when it has the highest score
    scores2 = scores.clone()
    t = (pos[:, 0] == 4).nonzero().item()
    scores2[tables[0, t // bs], t % bs, 0] = 1e9
    vs = sinklora_ext.select_evictions(scores2, positions, tables, sl, num_sinks=4, policy="streaming")
    assert int(pos[int(vs[0, 0]), 0]) == 4
    vh = sinklora_ext.select_evictions(scores2, positions, tables, sl, num_sinks=4, policy="h2o")
    assert int(pos[int(vh[0, 0]), 0]) == 5
    # nothing evictable: only sinks / everything recent / empty
    for lens, ns, rc in (([4], 4, 0), ([12], 4, 8), ([12], 20, 0), ([0], 0, 0)):
        args = make_evict_case(lens, bs, hkv, device, gaps=False)
        v = sinklora_ext.select_evictions(*args, num_sinks=ns, recent=rc)
        assert (v == -1).all(), (lens, ns, rc, v)
    # recent = 1 protects exactly the newest token: a 5-token head with 4 sinks has nothing left
    args = make_evict_case([5], bs, hkv, device, gaps=False)
    assert (sinklora_ext.select_evictions(*args, num_sinks=4, recent=1) == -1).all()
    assert (sinklora_ext.select_evictions(*args, num_sinks=4, recent=0) >= 0).all()
    # the lowest score, strictly, wins over older ties
    scores, positions, tables, sl = make_evict_case([16], bs, 1, device, num_distinct=1, gaps=False)
    pos = gather_paged(positions.cpu(), tables[0].cpu(), 16)[:, 0]
    t = (pos == 11).nonzero().item()
    scores[tables[0, t // bs], t % bs, 0] = -0.5
    v = sinklora_ext.select_evictions(scores, positions, tables, sl, num_sinks=4, recent=2)
    assert int(v[0, 0]) == t


# --------------------------------------------------------------------------------------------------
# 6. op registrations


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    pc = Paged([5, 9], 4, 2, 32, torch.float32, device, k_poison="huge", v_poison="huge")
    q = randn(2, 4, 32, device=device)
    scores = torch.zeros(pc.num_blocks, 4, 2, device=device)
    _opcheck(OPS.paged_decode.default, (q, pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens, 0.2, None))
    _opcheck(OPS.paged_decode.default, (q, pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens, 0.2, scores))

    k = randn(2, 2, 32, device=device)
    slots = torch.tensor([[0, 3], [-1, 7]], dtype=torch.int32, device=device)
    positions = torch.zeros(pc.num_blocks, 4, 2, dtype=torch.int32, device=device)
    tok = torch.tensor([5, 6], dtype=torch.int32, device=device)
    new_scores = torch.rand(2, 2, device=device)
    _opcheck(OPS.paged_write_.default,
             (k, k.clone(), pc.k_cache.clone(), pc.v_cache.clone(), slots, scores, new_scores, positions, tok))
    _opcheck(OPS.paged_write_.default, (k, k.clone(), pc.k_cache.clone(), pc.v_cache.clone(), slots,
                                           None, None, None, None))

    ev = make_evict_case([6, 11], 4, 2, device)
    _opcheck(OPS.select_evictions.default, (*ev, 2, 1, "h2o"))

    qq = randn(1, 9, 4, 32, device=device)
    kk = randn(1, 9, 2, 32, device=device)
    _, lse = OPS.sf_attention_fwd(qq, kk, kk, None, 0, 9, 0, "none", 0.2)
    _opcheck(OPS.column_scores.default, (qq, kk, lse, None, 0, 9, 0, "none", 0.2))

    # with a plan: it names the very tensors it validated, and opcheck runs the op on copies (which a
    # plan refuses), so the ops that take one are checked through their fake impls directly
    torch.library.opcheck(OPS.plan_paged.default, (pc.k_cache, pc.tables, pc.seq_lens, slots, 4),
                          test_utils=("test_schema", "test_faketensor"))  # its output holds addresses
    plan = OPS.plan_paged(pc.k_cache, pc.tables, pc.seq_lens, slots, 4)
    sc, po, tb, sl = ev
    eplan = OPS.plan_paged(torch.empty(*sc.shape, 1, device=device), tb, sl, None, 0)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        f = mode.from_tensor
        out = OPS.paged_decode(f(q), f(pc.k_cache), f(pc.v_cache), f(pc.tables), f(pc.seq_lens), 0.2, f(scores),
                               f(plan))
        assert out.shape == q.shape and out.dtype == q.dtype
        OPS.paged_write_(f(k), f(k), f(pc.k_cache), f(pc.v_cache), f(slots), None, None, None, None, f(plan))
        assert OPS.select_evictions(*map(f, ev), 2, 1, "h2o", 1.0, f(eplan)).shape == (2, 2)
    assert torch.equal(OPS.paged_decode(q, pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens, 0.2, None, plan),
                       OPS.paged_decode(q, pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens, 0.2, None))


# --------------------------------------------------------------------------------------------------
# 7. errors


def _decode_args(device="cpu", dtype=torch.float32):
    pc = Paged([5, 9], 4, 2, 32, dtype, device)
    q = randn(2, 4, 32, dtype=dtype, device=device)
    return dict(q=q, k_cache=pc.k_cache, v_cache=pc.v_cache, block_tables=pc.tables, seq_lens=pc.seq_lens), pc


def _decode(a, **over):
    a = {**a, **over}
    return sinklora_ext.paged_decode(a["q"], a["k_cache"], a["v_cache"], a["block_tables"], a["seq_lens"],
                                     scores=a.get("scores"))


@pytest.mark.parametrize("device", DEVICES)
def test_decode_errors(device):
    a, pc = _decode_args(device)
    nb = pc.num_blocks
    with pytest.raises(ValueError, match="block_tables must be int32"):
        _decode(a, block_tables=a["block_tables"].long())
    with pytest.raises(ValueError, match="seq_lens must be int32"):
        _decode(a, seq_lens=a["seq_lens"].long())
    wide = torch.zeros(2, 2 * pc.max_blocks, dtype=torch.int32, device=device)
    wide[:, ::2] = a["block_tables"]
    with pytest.raises(ValueError, match="block_tables must be contiguous"):
        _decode(a, block_tables=wide[:, ::2])
    with pytest.raises(ValueError, match="multiple of the number of kv heads"):
        _decode(a, q=randn(2, 3, 32, device=device))
    with pytest.raises(ValueError, match="q dtype"):
        _decode(a, q=a["q"].half())
    with pytest.raises(ValueError, match="head_dim"):
        _decode(a, q=randn(2, 4, 16, device=device))
    with pytest.raises(ValueError, match="v_cache"):
        _decode(a, v_cache=a["v_cache"].half())
    with pytest.raises(ValueError, match="scores must be"):
        _decode(a, scores=torch.zeros(nb, 4, 1, device=device))
    with pytest.raises(ValueError, match="scores must be"):
        _decode(a, scores=torch.zeros(nb, 4, 2, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="scores must be"):
        _decode(a, scores=torch.zeros(nb, 2, 4, device=device).transpose(1, 2))
    with pytest.raises(ValueError, match="batch"):
        _decode(a, seq_lens=a["seq_lens"][:1].contiguous())
    with pytest.raises(ValueError, match="k_cache must be"):
        _decode(a, k_cache=a["k_cache"][0], v_cache=a["v_cache"][0])
    with pytest.raises(ValueError, match=r"the number of query heads \(0\)"):
        _decode(a, q=randn(2, 0, 32, device=device))
    for empty in (a["k_cache"][:, :, :0], a["k_cache"][:, :0]):  # no kv heads; blocks of no slot
        with pytest.raises(ValueError, match=r"block_size and num_kv_heads \(k_cache dims 1 and 2\) must be >= 1"):
            _decode(a, k_cache=empty, v_cache=empty)


@pytest.mark.parametrize("device", DEVICES)
def test_plan_is_reused_by_every_layer(device):
    """One plan of a step's tables, lengths and write slots; two layers (two pools of the same shape)
    write, decode and evict with it, exactly as without a plan."""
    pc = Paged([5, 9], 4, 2, 32, torch.float32, device)
    layers = [(pc.k_cache, pc.v_cache), (pc.k_cache * 0.5, pc.v_cache * 2)]  # one table for every layer
    slots = torch.tensor([[[3, 4], [9, 10]], [[1, 2], [-1, 6]]], dtype=torch.int32, device=device)  # [L, B, Hkv]
    plan = sinklora_ext.plan_paged(pc.k_cache, pc.tables, pc.seq_lens, slots, num_heads_q=4)
    assert plan.num_heads_q == 4
    scores = [torch.rand(pc.num_blocks, 4, 2, device=device) for _ in layers]
    positions = [torch.randint(0, 50, (pc.num_blocks, 4, 2), dtype=torch.int32, device=device) for _ in layers]
    k = randn(2, 2, 32, device=device)
    tok = torch.tensor([5, 9], dtype=torch.int32, device=device)
    for layer, (kc, vc) in enumerate(layers):
        q = randn(2, 4, 32, device=device)
        sc, po = scores[layer], positions[layer]
        want = [t.clone() for t in (kc, vc, sc, po)]
        sinklora_ext.paged_write_(k, k, want[0], want[1], slots[layer], want[2], None, want[3], tok)
        sinklora_ext.paged_write_(k, k, kc, vc, slots[layer], sc, None, po, tok, plan=plan)
        for got, ref in zip((kc, vc, sc, po), want):
            assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))  # poison (NaN) included
        out_ref = sinklora_ext.paged_decode(q, want[0], want[1], pc.tables, pc.seq_lens, scores=want[2])
        out = sinklora_ext.paged_decode(q, kc, vc, pc.tables, pc.seq_lens, scores=sc, plan=plan)
        assert torch.equal(out, out_ref) and torch.equal(sc, want[2])
        v_ref = sinklora_ext.select_evictions(want[2], want[3], pc.tables, pc.seq_lens, 1, 2)
        assert torch.equal(sinklora_ext.select_evictions(sc, po, pc.tables, pc.seq_lens, 1, 2, plan=plan), v_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_plan_of_per_layer_lengths(device):
    """Layers that attend different lengths (per-layer budgets) share one plan of ``seq_lens [L, B]``:
    each call passes its layer's row and runs exactly as unplanned; a row of another tensor, a
    non-row view or lengths written since are refused, and every row is validated."""
    pc = Paged([5, 9], 4, 2, 32, torch.float32, device)
    lens = torch.tensor([[5, 9], [3, 7], [1, 2]], dtype=torch.int32, device=device)
    plan = sinklora_ext.plan_paged(pc.k_cache, pc.tables, lens, num_heads_q=4)
    q = randn(2, 4, 32, device=device)
    for row in lens:
        want = sinklora_ext.paged_decode(q, pc.k_cache, pc.v_cache, pc.tables, row)
        assert torch.equal(sinklora_ext.paged_decode(q, pc.k_cache, pc.v_cache, pc.tables, row, plan=plan), want)
    scores = torch.rand(pc.num_blocks, pc.bs, 2, device=device)
    positions = torch.randint(0, 50, (pc.num_blocks, pc.bs, 2), dtype=torch.int32, device=device)
    v_ref = sinklora_ext.select_evictions(scores.clone(), positions, pc.tables, lens[1], 1, 1)
    assert torch.equal(sinklora_ext.select_evictions(scores, positions, pc.tables, lens[1], 1, 1, plan=plan), v_ref)
    with pytest.raises(ValueError, match="the plan was made for other seq_lens"):
        sinklora_ext.paged_decode(q, pc.k_cache, pc.v_cache, pc.tables, lens[1].clone(), plan=plan)
    with pytest.raises(ValueError, match="seq_lens must be contiguous"):
        sinklora_ext.paged_decode(q, pc.k_cache, pc.v_cache, pc.tables, lens[:, 0], plan=plan)
    with pytest.raises(ValueError, match="the plan was made for other seq_lens"):  # across two rows
        sinklora_ext.paged_decode(q, pc.k_cache, pc.v_cache, pc.tables, lens.view(-1)[1:3], plan=plan)
    lens[2, 0] = 2
    with pytest.raises(ValueError, match="seq_lens changed since the plan was made"):
        sinklora_ext.paged_decode(q, pc.k_cache, pc.v_cache, pc.tables, lens[0], plan=plan)
    cap = pc.max_blocks * pc.bs
    bad = torch.tensor([[5, 9], [3, cap + 1]], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=rf"plan_paged: seq_lens\[1\] = {cap + 1} is outside"):
        sinklora_ext.plan_paged(pc.k_cache, pc.tables, bad)
    with pytest.raises(ValueError, match=r"seq_lens must be \[batch\] or \[rows, batch\]"):
        sinklora_ext.plan_paged(pc.k_cache, pc.tables, lens[None])


@pytest.mark.parametrize("device", DEVICES)
def test_stale_or_foreign_plans_are_refused(device):
    a, pc = _decode_args(device)
    plan = sinklora_ext.plan_paged(pc.k_cache, pc.tables, pc.seq_lens, num_heads_q=4)
    sinklora_ext.paged_decode(a["q"], pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens, plan=plan)
    with pytest.raises(ValueError, match="the plan was made for other block_tables"):
        sinklora_ext.paged_decode(a["q"], pc.k_cache, pc.v_cache, pc.tables.clone(), pc.seq_lens, plan=plan)
    with pytest.raises(ValueError, match="the plan was made for 4 query heads, q has 2"):
        sinklora_ext.paged_decode(a["q"][:, :2].contiguous(), pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens,
                                  plan=plan)
    with pytest.raises(ValueError, match="the plan was made for a pool of"):
        sinklora_ext.paged_decode(a["q"], pc.k_cache[:-1], pc.v_cache[:-1], pc.tables, pc.seq_lens, plan=plan)
    pc.seq_lens.add_(1)  # written after the plan: the plan no longer vouches for it
    with pytest.raises(ValueError, match="seq_lens changed since the plan was made"):
        sinklora_ext.paged_decode(a["q"], pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens, plan=plan)
    scores = torch.zeros(pc.num_blocks, pc.bs, 2, device=device)
    positions = torch.zeros(pc.num_blocks, pc.bs, 2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="seq_lens changed since the plan was made"):
        sinklora_ext.select_evictions(scores, positions, pc.tables, pc.seq_lens, plan=plan)
    k = randn(2, 2, 32, device=device)
    slots = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="the plan does not cover slots"):
        sinklora_ext.paged_write_(k, k, pc.k_cache, pc.v_cache, slots, plan=plan)
    write_plan = sinklora_ext.plan_paged(pc.k_cache, slots=slots)
    sinklora_ext.paged_write_(k[:1], k[:1], pc.k_cache, pc.v_cache, slots[1:], plan=write_plan)  # a view
    with pytest.raises(ValueError, match="the plan does not cover block_tables and seq_lens"):
        sinklora_ext.paged_decode(a["q"], pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens, plan=write_plan)
    with pytest.raises(ValueError, match="the plan was made for other slots"):
        sinklora_ext.paged_write_(k, k, pc.k_cache, pc.v_cache, slots.clone(), plan=write_plan)
    slots[0, 0] = 5
    with pytest.raises(ValueError, match="slots changed since the plan was made"):
        sinklora_ext.paged_write_(k, k, pc.k_cache, pc.v_cache, slots, plan=write_plan)
    with pytest.raises(ValueError, match="plan is not a plan"):
        sinklora_ext.paged_decode(a["q"], pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens,
                                  plan=sinklora_ext.PagedPlan(torch.zeros(16, dtype=torch.int64)))
    with pytest.raises(TypeError, match="plan must be a PagedPlan"):
        sinklora_ext.paged_decode(a["q"], pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens, plan=plan.tensor)


@pytest.mark.parametrize("device", DEVICES)
def test_plan_refuses_bad_tables_as_the_ops_do(device):
    """plan_paged validates what the ops would, with the same messages."""
    _, pc = _decode_args(device)
    cap = pc.max_blocks * pc.bs
    plan = sinklora_ext.plan_paged
    with pytest.raises(ValueError, match=rf"plan_paged: seq_lens\[1\] = {cap + 1} is outside \[0, {cap}\]"):
        plan(pc.k_cache, pc.tables, torch.tensor([5, cap + 1], dtype=torch.int32, device=device))
    t = pc.tables.clone()
    t[1, 2] = pc.num_blocks
    with pytest.raises(ValueError, match=rf"plan_paged: block_tables\[1, 2\] = {pc.num_blocks} is not a block"):
        plan(pc.k_cache, t, pc.seq_lens)
    nslots = pc.num_blocks * pc.bs
    bad = torch.tensor([[0, 1], [nslots, 2]], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=rf"plan_paged: slots\[1, 0\] = {nslots} is outside the pool's slots"):
        plan(pc.k_cache, slots=bad)
    with pytest.raises(ValueError, match="block_tables and seq_lens are planned together"):
        plan(pc.k_cache, pc.tables)
    with pytest.raises(ValueError, match="block_tables must be int32"):
        plan(pc.k_cache, pc.tables.long(), pc.seq_lens)
    with pytest.raises(ValueError, match="num_heads_q"):
        plan(pc.k_cache, pc.tables, pc.seq_lens, num_heads_q=3)


@requires_cuda
def test_kernel_for_on_cuda():
    want = "mma" if torch.cuda.get_device_capability()[0] >= 8 else "generic"
    for op in ("sf_attention_fwd", "sf_attention_bwd", "column_scores", "paged_decode"):
        assert sinklora_ext.kernel_for(op, torch.float16, 64, "cuda") == want
        assert sinklora_ext.kernel_for(op, torch.float32, 64, "cuda") == "generic"
    assert sinklora_ext.kernel_for("paged_decode", torch.bfloat16, 128, "cuda", heads_per_kv=17) == "generic"


@requires_cuda
def test_cuda_graph_capture_takes_the_plan():
    """A captured decode replays with the plan made before the capture; without one the call refuses
    (its tables cannot be checked on the host while capturing)."""
    a, pc = _decode_args("cuda")
    plan = sinklora_ext.plan_paged(pc.k_cache, pc.tables, pc.seq_lens, num_heads_q=4)
    args = (a["q"], pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens)
    want = sinklora_ext.paged_decode(*args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        sinklora_ext.paged_decode(*args, plan=plan)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sinklora_ext.paged_decode(*args, plan=plan)
    graph.replay()
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="needs a plan"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            sinklora_ext.paged_decode(*args)


def test_kernel_for_on_the_cpu():
    for op in ("sf_attention_fwd", "sf_attention_bwd", "column_scores", "paged_decode", "paged_write_",
               "select_evictions"):
        assert sinklora_ext.kernel_for(op, torch.float16, 64, "cpu") == "cpu"
    with pytest.raises(ValueError, match="kernel_for: unknown op 'h2o_evict'"):
        sinklora_ext.kernel_for("h2o_evict", torch.float32, 64, "cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_decode_table_errors(device):
    a, pc = _decode_args(device)
    cap = pc.max_blocks * pc.bs
    with pytest.raises(ValueError, match=rf"seq_lens\[1\] = {cap + 1} is outside \[0, {cap}\]"):
        _decode(a, seq_lens=torch.tensor([5, cap + 1], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"seq_lens\[0\] = -1"):
        _decode(a, seq_lens=torch.tensor([-1, 9], dtype=torch.int32, device=device))
    for bad in (pc.num_blocks, -1):
        t = a["block_tables"].clone()
        t[1, 2] = bad  # third block of the 9-token sequence (bs 4)
        with pytest.raises(ValueError, match=rf"block_tables\[1, 2\] = {bad} is not a block of the pool"):
            _decode(a, block_tables=t)
    # a bad id past the used blocks is fine (never read)
    t = a["block_tables"].clone()
    t[0, -1] = 10 ** 6
    _decode(a, block_tables=t)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_write_errors(device):
    nb, bs, hkv, d = 3, 4, 2, 16
    kc = torch.zeros(nb, bs, hkv, d, device=device)
    vc = torch.zeros_like(kc)
    k = randn(2, hkv, d, device=device)
    slots = torch.zeros(2, hkv, dtype=torch.int32, device=device)
    w = sinklora_ext.paged_write_
    with pytest.raises(ValueError, match="slots must be int32"):
        w(k, k, kc, vc, slots.long())
    with pytest.raises(ValueError, match="slots must be"):
        w(k, k, kc, vc, slots[:, :1].contiguous())
    with pytest.raises(ValueError, match="k and v must have the cache dtype"):
        w(k.half(), k.half(), kc, vc, slots)
    with pytest.raises(ValueError, match="head_dim"):
        w(k[:, :, :8], k[:, :, :8], kc, vc, slots)
    with pytest.raises(ValueError, match="scores must be"):
        w(k, k, kc, vc, slots, torch.zeros(nb, bs, hkv, dtype=torch.float16, device=device))
    scores = torch.zeros(nb, bs, hkv, device=device)
    with pytest.raises(ValueError, match="new_scores needs scores"):
        w(k, k, kc, vc, slots, None, torch.zeros(2, hkv, device=device))
    with pytest.raises(ValueError, match="new_scores must be"):
        w(k, k, kc, vc, slots, scores, torch.zeros(2, 1, device=device))
    positions = torch.zeros(nb, bs, hkv, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="token_positions is required"):
        w(k, k, kc, vc, slots, scores, None, positions)
    with pytest.raises(ValueError, match="positions must be"):
        w(k, k, kc, vc, slots, scores, None, positions.float(), torch.zeros(2, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="token_positions must be"):
        w(k, k, kc, vc, slots, scores, None, positions, torch.zeros(3, dtype=torch.int32, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_paged_write_slot_range(device):
    nb, bs, hkv, d = 3, 4, 2, 16
    kc = torch.zeros(nb, bs, hkv, d, device=device)
    vc = torch.zeros_like(kc)
    k = randn(2, hkv, d, device=device)
    for bad in (nb * bs, -2):
        slots = torch.tensor([[0, 1], [2, bad]], dtype=torch.int32, device=device)
        with pytest.raises(ValueError, match=rf"slots\[1, 1\] = {bad} is outside the pool's slots \[0, {nb * bs}\)"):
            sinklora_ext.paged_write_(k, k, kc, vc, slots)
        assert (kc == 0).all(), "a rejected write must not write anything"


@pytest.mark.parametrize("device", DEVICES)
def test_evict_errors(device):
    scores, positions, tables, sl = make_evict_case([6, 9], 4, 2, device)
    ev = sinklora_ext.select_evictions
    with pytest.raises(ValueError, match="policy must be 'h2o', 'mean' or 'streaming'"):
        ev(scores, positions, tables, sl, policy="lru")
    with pytest.raises(ValueError, match="num_sinks and recent must be >= 0"):
        ev(scores, positions, tables, sl, num_sinks=-1)
    with pytest.raises(ValueError, match="num_sinks and recent must be >= 0"):
        ev(scores, positions, tables, sl, recent=-2)
    with pytest.raises(ValueError, match="scores must be"):
        ev(scores.double(), positions, tables, sl)
    with pytest.raises(ValueError, match="positions must be"):
        ev(scores, positions.long(), tables, sl)
    with pytest.raises(ValueError, match="positions must be"):
        ev(scores, positions[:, :2].contiguous(), tables, sl)
    with pytest.raises(ValueError, match="block_tables must be int32"):
        ev(scores, positions, tables.long(), sl)
    with pytest.raises(ValueError, match="seq_lens must be int32"):
        ev(scores, positions, tables, sl.long())
    with pytest.raises(ValueError, match="block_tables must be contiguous"):
        ev(scores, positions, tables.t().contiguous().t(), sl)
    empty = scores[:, :, :0].contiguous()
    with pytest.raises(ValueError, match=r"block_size and num_kv_heads \(scores dims 1 and 2\) must be >= 1"):
        ev(empty, positions[:, :, :0].contiguous(), tables, sl)


@pytest.mark.parametrize("device", DEVICES)
def test_evict_table_errors(device):
    scores, positions, tables, sl = make_evict_case([6, 9], 4, 2, device)
    cap = tables.shape[1] * 4
    with pytest.raises(ValueError, match=rf"seq_lens\[0\] = {cap + 3} is outside"):
        sinklora_ext.select_evictions(scores, positions, tables, torch.tensor([cap + 3, 9], dtype=torch.int32, device=device))
    t = tables.clone()
    t[1, 0] = scores.shape[0] + 5
    with pytest.raises(ValueError, match=r"block_tables\[1, 0\] = .* is not a block of the pool"):
        sinklora_ext.select_evictions(scores, positions, t, sl)


@requires_cuda
def test_device_mismatch_errors():
    a, pc = _decode_args("cuda")
    with pytest.raises(ValueError, match="q is on"):
        _decode(a, q=a["q"].cpu())
    with pytest.raises(ValueError, match="block_tables is on"):
        _decode(a, block_tables=a["block_tables"].cpu())
    with pytest.raises(ValueError, match="scores must be on the cache's device"):
        _decode(a, scores=torch.zeros(pc.num_blocks, 4, 2))


# --------------------------------------------------------------------------------------------------
# 8. the caches as vLLM hands them to a backend: views of one kv tensor per layer (LAYOUTS), used as
# they are (no copy) by every op. The helpers take an op namespace (OPS, or the emulator's) and call
# the ops by their schemas.

VLLM_LAYOUTS = ("stacked", *PACKED_LAYOUTS)
# (block size, head_dim): vLLM's block sizes 16, 32, 128 and odd ones; D 64 and odd ones (17: rows
# that are no whole number of 16-byte vectors, and a V half that is not 16-byte aligned)
LAYOUT_GEOMS = [(16, 64), (32, 17), (128, 64), (17, 64)]


def layout_lens(bs):
    """A short, a just-past-one-block and a three-block sequence."""
    return [1, bs + 1, 2 * bs + 3]


def layout_plan(ops, pc: Paged, seq_lens=None, slots=None, num_heads_q=0):
    return ops.plan_paged(pc.k_cache, None if seq_lens is None else pc.tables, seq_lens, slots, num_heads_q)


def check_decode_layout(ops, pc: Paged, hq: int, kernels=None):
    """check_decode (with and without scores) through ``ops``; the output does not depend on the
    layout (bitwise equal to the decode of contiguous copies of the caches) nor on a plan."""
    scale = pc.d ** -0.5
    q = randn(len(pc.lens), hq, pc.d, dtype=pc.dtype, device=pc.device)

    def decode(q, k_cache, v_cache, tables, seq_lens, s, scores, plan=None):
        return ops.paged_decode(q, k_cache, v_cache, tables, seq_lens, scale if s is None else s, scores, plan)

    check_decode(pc, hq, q=q, decode=decode, kernels=kernels)
    out, _ = check_decode(pc, hq, q=q, check_scores=False, decode=decode, kernels=kernels)
    dense = decode(q, pc.k_cache.contiguous(), pc.v_cache.contiguous(), pc.tables, pc.seq_lens, None, None)
    assert_bitwise_equal(out.cpu(), dense.cpu(), f"{pc.layout} decode vs the decode of contiguous caches")
    plan = layout_plan(ops, pc, pc.seq_lens, num_heads_q=hq)
    planned = decode(q, pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens, None, None, plan)
    assert_bitwise_equal(planned.cpu(), out.cpu(), f"{pc.layout} decode with a plan")


def check_write_layout(ops, pc: Paged, planned: bool, rows: int = 5):
    """paged_write_ of ``rows`` tokens (distinct slots per head, some -1) into the views of
    ``pc.storage``: the buffer itself changes (no copy), at exactly the requested (slot, head) rows of
    K and of V; every other element (the other half of a packed K || V row, the neighbouring heads
    and slots, the unused blocks' poison) keeps its bits; scores and positions likewise."""
    nb, bs, hkv, d, dtype, device = pc.num_blocks, pc.bs, pc.hkv, pc.d, pc.dtype, pc.device
    slots = torch.stack([torch.randperm(nb * bs)[:rows] for _ in range(hkv)], dim=1).to(torch.int32)
    slots[1, 0] = -1
    slots[rows - 1, :] = -1
    k = randn(rows, hkv, d, dtype=dtype)
    v = randn(rows, hkv, d, dtype=dtype)
    scores = torch.rand(nb, bs, hkv)
    positions = torch.randint(0, 1000, (nb, bs, hkv), dtype=torch.int32)
    new_scores = torch.rand(rows, hkv)
    tok = torch.arange(100, 100 + rows, dtype=torch.int32)

    want_storage = tuple(s.cpu().clone() for s in pc.storage)
    _, want_k, want_v = layout_views(pc.layout, want_storage, d)
    want_scores, want_positions = scores.clone(), positions.clone()
    written = []
    for r in range(rows):
        for h in range(hkv):
            s = int(slots[r, h])
            if s < 0:
                continue
            blk, off = divmod(s, bs)
            want_k[blk, off, h] = k[r, h]
            want_v[blk, off, h] = v[r, h]
            want_scores[blk, off, h] = new_scores[r, h]
            want_positions[blk, off, h] = tok[r]
            written.append((blk, off, h, r))

    k, v, slots, scores, positions, new_scores, tok = (
        t.to(device) for t in (k, v, slots, scores, positions, new_scores, tok))
    plan = layout_plan(ops, pc, slots=slots) if planned else None
    ptrs = [s.data_ptr() for s in pc.storage]
    ops.paged_write_(k, v, pc.k_cache, pc.v_cache, slots, scores, new_scores, positions, tok, plan)

    assert [s.data_ptr() for s in pc.storage] == ptrs
    for i, (got, want) in enumerate(zip(pc.storage, want_storage)):
        assert_bitwise_equal(got.cpu(), want, f"{pc.layout} buffer {i} after paged_write_")
    assert_bitwise_equal(scores.cpu(), want_scores, "scores after paged_write_")
    assert_bitwise_equal(positions.cpu(), want_positions, "positions after paged_write_")
    if pc.kv is not None:  # read back through vLLM's own tensor [NB, Hkv, bs, 2D]
        page = pc.kv.view(nb, hkv, 2 * bs, d) if pc.layout == "vllm_cpu_attn" else None
        for blk, off, h, r in written:
            if page is None:
                got_k, got_v = pc.kv[blk, h, off, :d], pc.kv[blk, h, off, d:]
            else:
                got_k, got_v = page[blk, h, off], page[blk, h, bs + off]
            assert torch.equal(got_k, k[r, h]) and torch.equal(got_v, v[r, h]), (blk, off, h)


def check_step_layout(ops, pc: Paged, hq: int, kernels=None):
    """One decode step with one plan (tables, new lengths, write slots), as a vLLM backend runs it:
    write the new token (sequence 0 into an evicted slot, a different one per head; the others
    append), decode over it, pick the evictions; each equals its unplanned twin and the references."""
    b, hkv, bs = len(pc.lens), pc.hkv, pc.bs
    logical = torch.tensor([[n] * hkv for n in pc.lens], device=pc.device)
    logical[0] = torch.arange(hkv) % pc.lens[0]
    slots = physical_slots(pc.tables, logical, bs)
    pc.lens = [pc.lens[0]] + [n + 1 for n in pc.lens[1:]]
    pc.seq_lens = torch.tensor(pc.lens, dtype=torch.int32, device=pc.device)
    plan = layout_plan(ops, pc, pc.seq_lens, slots, hq)
    k = randn(b, hkv, pc.d, dtype=pc.dtype, device=pc.device) * 2
    v = randn(b, hkv, pc.d, dtype=pc.dtype, device=pc.device) * 2
    ops.paged_write_(k, v, pc.k_cache, pc.v_cache, slots, None, None, None, None, plan)
    for i in range(b):
        for h in range(hkv):
            t = int(logical[i, h])
            blk = int(pc.tables[i, t // bs])
            assert torch.equal(pc.k_cache[blk, t % bs, h], k[i, h]) and torch.equal(pc.v_cache[blk, t % bs, h], v[i, h])

    scale = pc.d ** -0.5

    def decode(q, k_cache, v_cache, tables, seq_lens, s, scores):
        return ops.paged_decode(q, k_cache, v_cache, tables, seq_lens, scale if s is None else s, scores, plan)

    q = randn(b, hq, pc.d, dtype=pc.dtype, device=pc.device)
    out, scores = check_decode(pc, hq, q=q, decode=decode, kernels=kernels)
    unplanned = ops.paged_decode(q, pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens, scale, None, None)
    assert_bitwise_equal(out.cpu(), unplanned.cpu(), "planned vs unplanned decode")

    positions = torch.randint(0, 500, (pc.num_blocks, bs, hkv), dtype=torch.int32, device=pc.device)
    victims = ops.select_evictions(scores, positions, pc.tables, pc.seq_lens, 1, 2, "h2o", 1.0, plan)
    ref = select_evictions_ref(scores.cpu(), positions.cpu(), pc.tables.cpu(), pc.seq_lens.cpu(), 1, 2, "h2o")
    assert torch.equal(victims.cpu(), ref)
    assert torch.equal(ops.select_evictions(scores, positions, pc.tables, pc.seq_lens, 1, 2, "h2o", 1.0, None), victims)


def test_layout_views_are_vllms():
    """The views are vLLM's: shapes, strides, the shared buffer, and k, v tiling it exactly."""
    nb, bs, hkv, d = 3, 5, 2, 7
    cases = {  # k (= v) strides, v's offset in the buffer (elements)
        "stacked": ((2 * bs * hkv * d, hkv * d, d, 1), bs * hkv * d),
        "hnd_packed": ((hkv * bs * 2 * d, 2 * d, bs * 2 * d, 1), d),
        "nhd_packed": ((bs * hkv * 2 * d, hkv * 2 * d, 2 * d, 1), d),
        "vllm_cpu_attn": ((hkv * 2 * bs * d, d, 2 * bs * d, 1), bs * d),
    }
    for layout, (strides, v_offset) in cases.items():
        storage = layout_storage(layout, nb, bs, hkv, d, torch.float16)
        kv, k, v = layout_views(layout, storage, d)
        assert k.shape == v.shape == (nb, bs, hkv, d), layout
        assert k.stride() == v.stride() == strides, layout
        assert k.data_ptr() == storage[0].data_ptr(), layout
        assert v.data_ptr() - k.data_ptr() == v_offset * 2, layout
        if layout in PACKED_LAYOUTS:
            assert kv.shape == (nb, hkv, bs, 2 * d), layout
        storage[0].zero_()
        k.add_(1)
        v.add_(1)
        assert (storage[0] == 1).all(), f"{layout}: k and v do not tile the buffer"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bs,d", LAYOUT_GEOMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", PACKED_LAYOUTS)  # "stacked": test_decode_scale_strides_and_padding
def test_decode_vllm_layouts(device, layout, dtype, bs, d):
    pc = Paged(layout_lens(bs), bs, 2, d, dtype, device, layout=layout, k_poison="nan", v_poison="nan")
    assert not pc.k_cache.is_contiguous() and pc.k_cache.data_ptr() == pc.storage[0].data_ptr()
    check_decode_layout(OPS, pc, 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bs,d,planned", [(16, 64, False), (17, 17, True), (128, 40, True), (32, 17, False)])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", VLLM_LAYOUTS)
def test_paged_write_vllm_layouts(device, layout, dtype, bs, d, planned):
    pc = Paged(layout_lens(bs), bs, 3, d, dtype, device, layout=layout)
    check_write_layout(OPS, pc, planned)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bs,d", [(16, 64), (24, 17)])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", PACKED_LAYOUTS)
def test_planned_step_vllm_layouts(device, layout, dtype, bs, d):
    lens = layout_lens(bs)
    pc = Paged(lens, bs, 2, d, dtype, device, layout=layout, capacity=[n + 1 for n in lens])
    check_step_layout(OPS, pc, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_cache_last_dim_must_be_dense(device):
    """K and V interleaved element by element (last stride 2) are refused, by every op that reads or
    writes the caches, with the strides in the message."""
    nb, bs, hkv, d = 3, 4, 2, 16
    kv = torch.zeros(nb, hkv, bs, d, 2, device=device)
    k_cache, v_cache = kv[..., 0].permute(0, 2, 1, 3), kv[..., 1].permute(0, 2, 1, 3)
    tables = torch.tensor([[0, 1]], dtype=torch.int32, device=device)
    lens = torch.tensor([5], dtype=torch.int32, device=device)
    q = randn(1, 2, d, device=device)
    k = randn(1, hkv, d, device=device)
    slots = torch.tensor([[0, 1]], dtype=torch.int32, device=device)
    msg = r"the last dimension of k_cache and v_cache must be dense \(stride 1\), got strides"
    with pytest.raises(ValueError, match=msg):
        sinklora_ext.paged_decode(q, k_cache, v_cache, tables, lens)
    with pytest.raises(ValueError, match=msg):
        sinklora_ext.paged_write_(k, k, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match=msg):  # one of the two is enough
        sinklora_ext.paged_decode(q, k_cache.contiguous(), v_cache, tables, lens)
    assert (kv == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_vllm_layout(device):
    """The registrations hold for K/V views of one buffer (two mutable arguments that share a storage)."""
    pc = Paged([5, 9], 4, 2, 32, torch.float32, device, layout="hnd_packed", k_poison="huge", v_poison="huge")
    q = randn(2, 4, 32, device=device)
    _opcheck(OPS.paged_decode.default, (q, pc.k_cache, pc.v_cache, pc.tables, pc.seq_lens, 0.2, None))
    (storage,) = (s.clone() for s in pc.storage)
    _, k_cache, v_cache = layout_views(pc.layout, (storage,), 32)
    k = randn(2, 2, 32, device=device)
    slots = torch.tensor([[0, 3], [-1, 7]], dtype=torch.int32, device=device)
    _opcheck(OPS.paged_write_.default, (k, k.clone(), k_cache, v_cache, slots, None, None, None, None))
