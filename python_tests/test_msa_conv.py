"""Tests of sinklora_ext.msa_conv2d (docs/msa_conv.md): against the float64 reference (outputs and
the gradients of q, k and v, conftest's tolerance rule), and tic.md section 6's invariants
checked on the op itself. CPU only; the CUDA kernels join through test_properties' backends.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import sinklora_ext
from sinklora_ext.reference import msa_conv2d_ref

from conftest import DTYPES, check_against_reference, dtype_id, randn

msa_conv2d = sinklora_ext.msa_conv2d
fwd_op = torch.ops.sinklora_ext.msa_conv2d_fwd
bwd_op = torch.ops.sinklora_ext.msa_conv2d_bwd
PADDINGS = ("zero", "mask", "clamp")


def qkv(b, h, w, heads, d, dtype=torch.float32):
    return tuple(randn(b, h, w, heads, d, dtype=dtype) for _ in range(3))


def check_msa(q, k, v, kernel_size, dilation=1, padding="zero", kv_shift=None, softmax_scale=None,
              check_grad=True):
    def op(q, k, v):
        return msa_conv2d(q, k, v, kernel_size, dilation, padding, kv_shift, softmax_scale)

    def ref(q, k, v, upcast):
        return msa_conv2d_ref(q, k, v, kernel_size, dilation, padding, kv_shift, softmax_scale, upcast=upcast)

    return check_against_reference(op, ref, (q, k, v), check_grad)


def op_lse(q, k, v, kernel_size, dilation=1, padding="zero", kv_shift=None):
    ks = [kernel_size] * 2 if isinstance(kernel_size, int) else list(kernel_size)
    dil = [dilation] * 2 if isinstance(dilation, int) else list(dilation)
    shift = None if kv_shift is None else [int(x) for row in kv_shift for x in row]
    return fwd_op(q, k, v, ks, dil, padding, shift, q.shape[-1] ** -0.5)


# ---------------------------------------------------------------------------------------------
# Against the reference
# ---------------------------------------------------------------------------------------------

# (B, H, W, heads, D), kernel_size, dilation, padding, kv_shift
GRID = [
    ((2, 9, 13, 2, 32), 3, 1, "zero", None),
    ((1, 7, 5, 3, 64), (3, 5), (2, 1), "mask", [[1, -2], [30, 4], [-7, 0]]),
    ((1, 10, 8, 2, 16), (5, 3), 2, "clamp", [[-1, 2], [13, -25]]),
    ((1, 2, 3, 1, 32), 7, 1, "zero", None),
    ((1, 1, 1, 2, 48), 5, 2, "mask", [[3, -4], [0, 1]]),
    ((1, 8, 15, 1, 3), (1, 7), (2, 3), "zero", [[5, 7]]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", range(len(GRID)))
def test_grid_vs_reference(case, dtype):
    shape, ks, dil, pad, shift = GRID[case]
    check_msa(*qkv(*shape, dtype=dtype), ks, dil, pad, shift)


KERNELS = (1, 3, 5, 7, (3, 5), (1, 7))
DILATIONS = (1, 2, (2, 3))


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dilation", DILATIONS, ids=str)
@pytest.mark.parametrize("kernel_size", KERNELS, ids=str)
def test_kernels_dilations_paddings(kernel_size, dilation, padding):
    # 14 x 21: a 7-tap window dilated by (2, 3) just fits (clamp)
    check_msa(*qkv(1, 14, 21, 1, 4), kernel_size, dilation, padding, [[4, -9]])


@pytest.mark.parametrize("head_dim", [1, 3, 16, 32, 48, 64, 128])
def test_head_dims(head_dim):
    check_msa(*qkv(1, 6, 7, 2, head_dim), 3, 1, "zero", [[1, 2], [-3, 0]])


@pytest.mark.parametrize("heads", range(1, 9))
def test_heads(heads):
    shift = torch.randint(-20, 20, (heads, 2)).tolist()
    check_msa(*qkv(1, 5, 6, heads, 4), 3, 1, "mask", shift)


@pytest.mark.parametrize("padding", ["zero", "mask"])
@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (3, 1), (1, 6)], ids=str)
def test_maps_smaller_than_the_window(hw, padding):
    check_msa(*qkv(2, *hw, 2, 16), 7, 2, padding, [[-1, 5], [2, 2]])


@pytest.mark.parametrize("shift", ["none", "zeros", "random", "negative", "beyond_the_map"])
@pytest.mark.parametrize("padding", PADDINGS)
def test_kv_shift(shift, padding):
    h, w, heads = 9, 10, 4
    kv_shift = {
        "none": None,
        "zeros": [[0, 0]] * heads,
        "random": torch.randint(0, 10, (heads, 2)).tolist(),
        "negative": (-torch.randint(1, 10, (heads, 2))).tolist(),
        "beyond_the_map": [[h, -w], [3 * h + 1, 2], [-5 * h - 2, 7 * w + 3], [100, -100]],
    }[shift]
    check_msa(*qkv(1, h, w, heads, 8), 3, (1, 2), padding, kv_shift)


def test_kv_shift_as_tensor():
    q, k, v = qkv(1, 6, 8, 2, 8)
    shift = [[2, -3], [9, 1]]
    torch.testing.assert_close(msa_conv2d(q, k, v, 3, kv_shift=torch.tensor(shift)),
                               msa_conv2d(q, k, v, 3, kv_shift=shift), rtol=0, atol=0)


@pytest.mark.parametrize("softmax_scale", [None, 0.05, 1.7])
def test_softmax_scale(softmax_scale):
    check_msa(*qkv(1, 7, 6, 2, 16), 5, 1, "zero", softmax_scale=softmax_scale)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = qkv(1, 5, 5, 2, 16)
    torch.testing.assert_close(msa_conv2d(q, k, v, 3), msa_conv2d(q, k, v, 3, softmax_scale=0.25), rtol=0, atol=0)


@pytest.mark.parametrize("padding", PADDINGS)
def test_lse_matches_reference(padding):
    q, k, v = qkv(2, 7, 8, 2, 16)
    shift = [[1, 3], [-2, 0]]
    _, lse = op_lse(q, k, v, (3, 5), 1, padding, shift)
    _, lse64 = msa_conv2d_ref(q, k, v, (3, 5), 1, padding, shift, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (2, 7, 8, 2)
    torch.testing.assert_close(lse.double(), lse64, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_every_element_is_written(dtype):
    q, k, v = (t.requires_grad_() for t in qkv(2, 9, 11, 3, 20, dtype))
    out, lse = op_lse(q, k, v, 5, 2, "mask", [[1, 1], [0, -3], [12, 4]])
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    grads = bwd_op(torch.randn_like(out), q, k, v, out, lse, [5, 5], [2, 2], "mask", [1, 1, 0, -3, 12, 4], 20 ** -0.5)
    assert all(torch.isfinite(g).all() for g in grads)


def packed_qkv(b, h, w, heads, d, dtype=torch.float32):
    """q, k, v as slices of one [B, H, W, 3, heads, D] tensor: only the last dimension is contiguous."""
    qkv_packed = randn(b, h, w, 3, heads, d, dtype=dtype)
    return qkv_packed[:, :, :, 0], qkv_packed[:, :, :, 1], qkv_packed[:, :, :, 2]


@pytest.mark.parametrize("layout,dtype", [("packed_qkv", torch.float32), ("packed_qkv", torch.bfloat16),
                                          ("strided_batch_and_columns", torch.float32),
                                          ("heads_first_view", torch.float32)])
def test_noncontiguous_inputs(layout, dtype):
    b, h, w, heads, d = 2, 5, 7, 3, 32
    if layout == "packed_qkv":
        q, k, v = packed_qkv(b, h, w, heads, d, dtype)
    elif layout == "strided_batch_and_columns":
        q, k, v = (randn(2 * b, h, 2 * w, heads, d, dtype=dtype)[::2, :, ::2] for _ in range(3))
    else:
        q, k, v = (randn(b, heads, h, w, d, dtype=dtype).permute(0, 2, 3, 1, 4) for _ in range(3))
    assert not q.is_contiguous() and q.stride(-1) == 1
    shift = [[1, -1], [0, 4], [-3, 2]]
    result = check_msa(q, k, v, 3, (2, 1), "zero", shift)
    dense = tuple(t.contiguous().requires_grad_() for t in (q, k, v))
    out = msa_conv2d(*dense, 3, (2, 1), "zero", shift)
    out.backward(result["dout"])
    for name, dense_value in (("out", out), ("dq", dense[0].grad), ("dk", dense[1].grad), ("dv", dense[2].grad)):
        torch.testing.assert_close(result[name], dense_value.detach(), rtol=0, atol=0, msg=name)


def test_noncontiguous_last_dim_is_copied():
    q, k, v = (randn(1, 5, 6, 2, 16)[..., ::2] for _ in range(3))
    check_msa(q, k, v, 3)


@pytest.mark.parametrize("empty", ["batch", "height", "heads"])
def test_empty(empty):
    shape = {"batch": (0, 5, 6, 2, 8), "height": (1, 0, 6, 2, 8), "heads": (1, 5, 6, 0, 8)}[empty]
    q, k, v = (t.requires_grad_() for t in qkv(*shape))
    out = msa_conv2d(q, k, v, 3, padding="mask")
    assert out.shape == shape
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == shape


# ---------------------------------------------------------------------------------------------
# Invariants (tic.md section 6)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dilation", [1, 3])
def test_kernel_one_gives_v(padding, dilation):
    q, k, v = qkv(2, 5, 7, 3, 16)
    shift = [[1, 2], [0, 0], [-4, 9]]
    expected = torch.stack([v[:, :, :, h].roll((-sy, -sx), dims=(1, 2)) for h, (sy, sx) in enumerate(shift)], 3)
    torch.testing.assert_close(msa_conv2d(q, k, v, 1, dilation, padding, shift), expected, rtol=0, atol=0)


def axis_inside(n, k, d):
    """[n]: how many of query i's taps along one axis are inside the map (zero and mask padding)."""
    r = (k - 1) // 2
    i = torch.arange(n)[:, None]
    y = i + (torch.arange(k)[None, :] - r) * d
    return ((y >= 0) & (y < n)).sum(1)


def test_zero_is_mask_plus_zero_sinks():
    """Zero padding == mask padding plus n_pad extra keys of logit 0 and value 0 (sinks)."""
    q, k, v = qkv(2, 6, 9, 2, 16)
    ks, dil, shift = (5, 3), (1, 2), [[2, -1], [7, 3]]
    out_mask, lse_mask = op_lse(q, k, v, ks, dil, "mask", shift)
    out_zero, lse_zero = op_lse(q, k, v, ks, dil, "zero", shift)
    n_pad = ks[0] * ks[1] - axis_inside(6, ks[0], dil[0])[:, None] * axis_inside(9, ks[1], dil[1])[None, :]
    n_pad = n_pad[None, :, :, None].double()
    lse_expected = torch.logaddexp(lse_mask.double(), n_pad.log())
    out_expected = out_mask.double() * torch.exp(lse_mask.double() - lse_expected)[..., None]
    torch.testing.assert_close(lse_zero.double(), lse_expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_zero.double(), out_expected, rtol=1e-5, atol=1e-6)


def global_attention(q, k, v):
    """Every pixel over every pixel of its head, float64."""
    b, h, w, heads, d = q.shape
    flat = lambda t: t.double().reshape(b, h * w, heads, d).transpose(1, 2)  # noqa: E731
    p = torch.softmax(flat(q) @ flat(k).transpose(-1, -2) * d ** -0.5, dim=-1)
    return (p @ flat(v)).transpose(1, 2).reshape(b, h, w, heads, d)


def test_mask_with_a_window_over_the_whole_map_is_global_attention():
    q, k, v = qkv(1, 4, 5, 2, 8)
    torch.testing.assert_close(msa_conv2d(q, k, v, (7, 9), padding="mask").double(), global_attention(q, k, v),
                               rtol=1e-5, atol=1e-6)


def test_clamp_with_the_kernel_of_the_map_is_global_attention():
    q, k, v = qkv(2, 5, 7, 2, 8)
    torch.testing.assert_close(msa_conv2d(q, k, v, (5, 7), padding="clamp").double(), global_attention(q, k, v),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("padding", PADDINGS)
def test_dilation_decomposes_into_undilated_subgrids(padding):
    """op(x, d) == op(x[a::dh, c::dw], 1) interleaved; the map is not a multiple of d."""
    dh, dw = 2, 3
    q, k, v = qkv(1, 11, 16, 2, 8)
    out = msa_conv2d(q, k, v, 3, (dh, dw), padding)
    for a, c in itertools.product(range(dh), range(dw)):
        sub = [t[:, a::dh, c::dw] for t in (q, k, v)]
        torch.testing.assert_close(out[:, a::dh, c::dw], msa_conv2d(*sub, 3, 1, padding), rtol=1e-6, atol=1e-6)


def test_the_three_paddings_agree_inside():
    ks, dil = (5, 3), (2, 3)
    q, k, v = qkv(1, 13, 17, 2, 8)
    outs = [msa_conv2d(q, k, v, ks, dil, p) for p in PADDINGS]
    rh, rw = (ks[0] - 1) // 2 * dil[0], (ks[1] - 1) // 2 * dil[1]
    inner = (slice(None), slice(rh, 13 - rh), slice(rw, 17 - rw))
    for o in outs[1:]:
        torch.testing.assert_close(o[inner], outs[0][inner], rtol=0, atol=0)
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


@pytest.mark.parametrize("padding", PADDINGS)
def test_kv_shift_is_rolling_k_and_v(padding):
    """Head h with kv_shift (sy, sx) reads k'[y, x] = k[(y + sy) mod H, (x + sx) mod W]."""
    q, k, v = (t.requires_grad_() for t in qkv(1, 7, 9, 3, 8))
    shift = [[2, 0], [-3, 5], [15, -11]]
    rolled = lambda t: torch.stack(  # noqa: E731
        [t[:, :, :, h].roll((-sy, -sx), dims=(1, 2)) for h, (sy, sx) in enumerate(shift)], 3)
    out = msa_conv2d(q, k, v, (3, 5), 1, padding, shift)
    expected = msa_conv2d(q, rolled(k), rolled(v), (3, 5), 1, padding)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected_grads = torch.autograd.grad(expected, (q, k, v), dout)
    for name, g, e in zip("qkv", grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6, msg=f"d{name}")


def test_heads_are_independent():
    q, k, v = qkv(2, 6, 7, 4, 8)
    shift = [[0, 1], [2, 2], [-1, 0], [5, -6]]
    out = msa_conv2d(q, k, v, 3, 2, "zero", shift)
    for h in range(4):
        one = [t[:, :, :, h:h + 1] for t in (q, k, v)]
        torch.testing.assert_close(out[:, :, :, h:h + 1], msa_conv2d(*one, 3, 2, "zero", [shift[h]]), rtol=0, atol=0)


def test_zero_padding_output_is_inside_the_values_hull():
    """|out| <= max |v| per (batch, head, channel): a convex combination of values and zeros."""
    q, k, v = qkv(2, 8, 9, 3, 16)
    q = q * 4  # peaked attention
    out = msa_conv2d(q, k, v, 5, 1, "zero")
    bound = v.abs().amax(dim=(1, 2), keepdim=True)
    assert (out.abs() <= bound * (1 + 1e-6)).all()


# ---------------------------------------------------------------------------------------------
# torch.library / torch.compile integration
# ---------------------------------------------------------------------------------------------


def test_opcheck_fwd():
    q, k, v = (t.requires_grad_() for t in qkv(1, 3, 4, 2, 4))
    torch.library.opcheck(fwd_op.default, (q, k, v, [3, 5], [1, 2], "zero", [1, -2, 0, 3], 0.3))


def test_opcheck_bwd():
    q, k, v = qkv(2, 6, 6, 2, 8)
    args = ([3, 3], [2, 1], "clamp", None, 0.3)
    out, lse = fwd_op(q, k, v, *args)
    torch.library.opcheck(bwd_op.default, (torch.randn_like(out), q, k, v, out, lse, *args))


def test_compile_fullgraph():
    q, k, v = (t.requires_grad_() for t in qkv(1, 6, 7, 2, 8))

    def fn(q, k, v):
        return msa_conv2d(q, k, v, 3, 2, "mask", [[1, 0], [0, -1]]).relu() * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    dout = torch.randn(1, 6, 7, 2, 8)
    got = compiled(q, k, v)
    got_grads = torch.autograd.grad(got, (q, k, v), dout)
    expected = fn(q, k, v)
    expected_grads = torch.autograd.grad(expected, (q, k, v), dout)
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e)
