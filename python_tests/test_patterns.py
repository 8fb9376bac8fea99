"""Presets (the table of docs/attention.md) and properties of the reference visibility mask."""

from __future__ import annotations

import pytest
import torch

import sinklora_ext
from sinklora_ext.patterns import PRESETS, SHIFTS, AttentionPattern, group_size_for, resolve_pattern
from sinklora_ext.reference import sf_visibility_mask


def spec_visible(i: int, j: int, h: int, n: int, g: int, s_count: int, shift: str, hq: int) -> bool:
    """The table of docs/attention.md, transcribed independently of the reference (scalar Python)."""
    shifted = shift != "none" and h >= hq // 2
    s = g // 2
    if not shifted:
        return j <= i and (i // g == j // g or j < s_count)
    if shift == "nowrap":
        return j <= i and ((i + s) // g == (j + s) // g or j < s_count)
    p = lambda x: (x - s) % n  # noqa: E731
    return (p(i) // g == p(j) // g and p(j) <= p(i)) or (j < s_count and j <= i)


def tril(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


def test_preset_table():
    table = {name: (p.shift, p.num_sinks) for name, p in PRESETS.items()}
    assert table == {
        "full": ("none", 0),
        "sf": ("none", 4),
        "sf_nowrap": ("nowrap", 4),
        "s2": ("roll", 0),
        "s2_nowrap": ("nowrap", 0),
    }
    assert all(p.description for p in PRESETS.values())
    assert SHIFTS == ("none", "nowrap", "roll")
    assert sinklora_ext.PRESETS is PRESETS


@pytest.mark.parametrize("n", [1, 7, 64, 1000, 8192])
def test_resolve_full(n):
    pat = resolve_pattern("full", n)
    assert isinstance(pat, AttentionPattern)
    assert pat.group_size >= n and pat.num_sinks == 0 and pat.shift == "none"
    assert resolve_pattern("full", n, num_sinks=7).num_sinks == 0  # ignored by full


@pytest.mark.parametrize("preset", ["sf", "sf_nowrap", "s2", "s2_nowrap"])
@pytest.mark.parametrize("n,ratio,group", [(1024, 0.25, 256), (8192, 0.25, 2048), (100, 0.5, 50), (3, 0.25, 1), (64, 1.0, 64)])
def test_resolve_grouped(preset, n, ratio, group):
    pat = resolve_pattern(preset, n, group_ratio=ratio)
    assert pat == AttentionPattern(group, PRESETS[preset].num_sinks, PRESETS[preset].shift)
    assert resolve_pattern(preset, n, group_ratio=ratio, num_sinks=9).num_sinks == 9
    assert resolve_pattern(preset, n).group_size == max(1, int(n * 0.25))  # default ratio 1/4


def test_resolve_errors():
    with pytest.raises(ValueError, match="preset"):
        resolve_pattern("nope", 128)
    with pytest.raises(ValueError, match="group_ratio"):
        resolve_pattern("sf", 128, group_ratio=0.0)
    with pytest.raises(ValueError, match="group_ratio"):
        group_size_for(128, 1.5)
    with pytest.raises(ValueError, match="num_sinks"):
        resolve_pattern("sf", 128, num_sinks=-1)


# ---------------------------------------------------------------------------------------------
# The reference mask
# ---------------------------------------------------------------------------------------------

MASK_GRID = [
    (n, g, s, shift, hq)
    for shift in SHIFTS
    for n, g in [(1, 1), (1, 4), (12, 4), (13, 4), (16, 5), (15, 5), (20, 20), (9, 16), (24, 6), (18, 1)]
    for s in (0, 1, 4)
    for hq in (1, 4)
    if not (shift == "roll" and n % g)
]


@pytest.mark.parametrize("n,g,s,shift,hq", MASK_GRID)
def test_mask_matches_spec_table(n, g, s, shift, hq):
    mask = sf_visibility_mask(n, g, s, shift, hq)
    assert mask.shape == (hq, n, n) and mask.dtype == torch.bool
    want = torch.tensor(
        [[[spec_visible(i, j, h, n, g, s, shift, hq) for j in range(n)] for i in range(n)] for h in range(hq)],
        dtype=torch.bool,
    ).reshape(hq, n, n)
    assert torch.equal(mask, want)


@pytest.mark.parametrize("n,g,s,shift,hq", MASK_GRID)
def test_mask_invariants(n, g, s, shift, hq):
    mask = sf_visibility_mask(n, g, s, shift, hq)
    eye = torch.eye(n, dtype=torch.bool)
    assert (mask & eye).sum() == hq * n, "every row sees itself"
    # Sinks: row i sees every j < min(S, i + 1).
    sinks = tril(n) & (torch.arange(n)[None, :] < s)
    assert (mask | ~sinks).all()
    # Unshifted heads follow `none`; shifted heads (h >= Hq // 2) are all alike.
    none = sf_visibility_mask(n, g, s, "none", 1)[0]
    first_shifted = hq // 2 if shift != "none" else hq
    for h in range(first_shifted):
        assert torch.equal(mask[h], none)
    for h in range(first_shifted, hq):
        assert torch.equal(mask[h], mask[first_shifted])
    # Visible keys per row are bounded by one group plus the sinks.
    assert mask.sum(-1).max() <= g + s
    if shift != "roll":
        assert not (mask & ~tril(n)).any(), "none/nowrap must be causal"


def test_single_head_with_shift_is_shifted():
    """Hq = 1: Hq // 2 = 0, so the only head is a shifted one."""
    assert torch.equal(sf_visibility_mask(16, 8, 0, "nowrap", 1)[0], sf_visibility_mask(16, 8, 0, "nowrap", 2)[1])
    assert not torch.equal(sf_visibility_mask(16, 8, 0, "nowrap", 1)[0], sf_visibility_mask(16, 8, 0, "none", 1)[0])


@pytest.mark.parametrize("n", [1, 10, 64])
def test_full_preset_mask_is_causal(n):
    pat = resolve_pattern("full", n)
    mask = sf_visibility_mask(n, pat.group_size, pat.num_sinks, pat.shift, 4)
    assert torch.equal(mask, tril(n).expand(4, n, n))


@pytest.mark.parametrize("s", [0, 1, 4, 50])
def test_group_equal_seqlen_no_shift_is_causal(s):
    assert torch.equal(sf_visibility_mask(40, 40, s, "none", 2), tril(40).expand(2, 40, 40))


@pytest.mark.parametrize("n,g", [(16, 4), (17, 4), (30, 7), (5, 8)])
def test_no_sinks_none_is_block_diagonal_causal(n, g):
    i = torch.arange(n)
    block = (i[:, None] // g) == (i[None, :] // g)
    assert torch.equal(sf_visibility_mask(n, g, 0, "none", 3), (tril(n) & block).expand(3, n, n))


@pytest.mark.parametrize("s", [0, 1, 4])
@pytest.mark.parametrize("shift", SHIFTS)
def test_group_start_sees_only_sinks_and_itself(shift, s):
    n, g, hq = 64, 16, 4
    mask = sf_visibility_mask(n, g, s, shift, hq)
    for h in range(hq // 2):  # unshifted heads
        for kk in range(1, n // g):
            assert mask[h, kk * g].nonzero().flatten().tolist() == sorted(set(range(s)) | {kk * g})
    if shift == "nowrap":  # shifted groups start at kG - G/2
        for h in range(hq // 2, hq):
            for kk in range(1, n // g + 1):
                i = kk * g - g // 2
                assert mask[h, i].nonzero().flatten().tolist() == sorted(set(range(min(s, i + 1))) | {i})


def test_nowrap_first_shifted_group_is_short():
    """nowrap, shifted head: groups are [0, G - s), [G - s, 2G - s), ... with s = G // 2."""
    n, g = 30, 8
    s = g // 2
    mask = sf_visibility_mask(n, g, 0, "nowrap", 2)[1]
    starts = [0] + list(range(g - s, n, g))
    for a, b in zip(starts, starts[1:] + [n]):
        block = torch.zeros(n, n, dtype=torch.bool)
        block[a:b, a:b] = True
        assert torch.equal(mask[a:b], (tril(n) & block)[a:b])


@pytest.mark.parametrize("n,g", [(16, 4), (24, 8), (30, 5), (8, 8), (6, 2)])
def test_roll_is_conjugated_block_diagonal(n, g):
    """roll without sinks: shifted head's mask is block-diagonal causal in rolled coordinates."""
    s = g // 2
    mask = sf_visibility_mask(n, g, 0, "roll", 2)[1]
    p = (torch.arange(n) - s) % n  # rolled position of each token
    block = sf_visibility_mask(n, g, 0, "none", 1)[0]
    assert torch.equal(mask, block[p[:, None], p[None, :]])


@pytest.mark.parametrize("s", [0, 4])
def test_roll_leaks_exactly_last_half_group_to_first(s):
    n, g = 32, 8
    half = g // 2
    mask = sf_visibility_mask(n, g, s, "roll", 4)
    future = mask & ~tril(n)
    assert not future[:2].any(), "unshifted heads are causal"
    want = torch.zeros(n, n, dtype=torch.bool)
    want[:half, n - g + half :] = True  # rows < s see keys of the last rolled group's tail
    for h in (2, 3):
        assert torch.equal(future[h], want)


def test_work_fraction_of_sf_is_about_a_quarter():
    n = 1024
    pat = resolve_pattern("sf", n)
    visible = sf_visibility_mask(n, pat.group_size, pat.num_sinks, pat.shift, 1).sum().item()
    full = n * (n + 1) // 2
    assert 0.2 < visible / full < 0.3


def test_mask_errors():
    with pytest.raises(ValueError, match="shift"):
        sf_visibility_mask(8, 4, 0, "wrap", 2)
    with pytest.raises(ValueError, match="group_size"):
        sf_visibility_mask(8, 0, 0, "none", 2)
    with pytest.raises(ValueError, match="roll"):
        sf_visibility_mask(10, 4, 0, "roll", 2)

