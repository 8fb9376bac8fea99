"""MSA-Conv's CUDA kernels on a GPU (skips without CUDA): forward, lse and the three gradients of
``torch.ops.sinklora_ext.msa_conv2d_*`` against the float64 reference, under flash-attention's rule
(conftest), on shapes larger than the emulator's (test_cuda_emu.py runs the same check on the CPU
with small ones); determinism of the backward; a CUDA graph capture of the forward; the kernel
``kernel_for`` names."""

from __future__ import annotations

import pytest
import torch
from conftest import BWD_FACTOR, DTYPES, FWD_FACTOR, assert_flash_close, dtype_id, randn, requires_cuda

from sinklora_ext.reference import msa_conv2d_ref


def flat_shift(kv_shift):
    return None if kv_shift is None else [int(x) for row in kv_shift for x in row]


def check_msa_conv(ops, q, k, v, kernel_size, dilation, padding, kv_shift=None, scale=None):
    """``ops.msa_conv2d_fwd`` / ``_bwd`` on q, k, v against float64: out (2x PyTorch's error in the
    dtype), lse, and dq, dk, dv (3x). Returns the outputs."""
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    args = (list(kernel_size), list(dilation), padding, flat_shift(kv_shift), scale)
    out, lse = ops.msa_conv2d_fwd(q, k, v, *args)
    dout = randn(*q.shape, dtype=dtype, device=q.device)
    dq, dk, dv = ops.msa_conv2d_bwd(dout, q, k, v, out, lse, *args)

    def reference(cast, fn):
        ts = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        o = fn(*ts)
        o.backward(dout.to(cast))
        return o.detach(), [t.grad for t in ts]

    o64, g64 = reference(torch.float64, lambda *t: msa_conv2d_ref(*t, kernel_size, dilation, padding, kv_shift, scale))
    opt, gpt = reference(dtype, lambda *t: msa_conv2d_ref(*t, kernel_size, dilation, padding, kv_shift, scale, upcast=False))
    _, lse64 = msa_conv2d_ref(q, k, v, kernel_size, dilation, padding, kv_shift, scale, return_lse=True)
    assert_flash_close("out", out, o64, opt, dtype, FWD_FACTOR)
    assert lse.dtype == torch.float32 and torch.isfinite(lse).all(), "lse: not float32, or NaN/inf (unwritten?)"
    torch.testing.assert_close(lse.double(), lse64, rtol=0, atol=2e-5 * max(1.0, lse64.abs().max().item()))
    grad_scale = max(1.0, *(t.abs().max().item() for t in g64))
    for name, got, r64, rpt in zip(("dq", "dk", "dv"), (dq, dk, dv), g64, gpt):
        assert_flash_close(name, got, r64, rpt, dtype, BWD_FACTOR, scale=grad_scale)
    return out, lse, dq, dk, dv


# (B, H, W, heads, D, kernel_size, dilation, padding, kv_shift)
GPU_CASES = {
    "d32-zero-k7": (2, 31, 29, 4, 32, (7, 7), (1, 1), "zero", None),
    "d64-mask-dil2-shift": (1, 24, 33, 2, 64, (5, 3), (2, 3), "mask", [(6, -8), (-25, 40)]),
    "d64-clamp-dil": (2, 20, 17, 2, 64, (5, 5), (2, 3), "clamp", [(3, 3), (-1, 16)]),
    "d48-zero-small-map": (3, 3, 5, 3, 48, (9, 7), (1, 2), "zero", [(1, 0), (0, -1), (7, 7)]),
    "d128-clamp-whole-map": (1, 9, 11, 1, 128, (9, 11), (1, 1), "clamp", None),
    "d16-mask-rect": (2, 17, 40, 8, 16, (3, 9), (4, 1), "mask", None),
    "d1-zero-depthwise": (1, 14, 15, 16, 1, (5, 5), (1, 1), "zero", [(h, -h) for h in range(16)]),
    "d256-zero": (1, 6, 7, 1, 256, (3, 3), (1, 1), "zero", None),
}


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_msa_conv2d_cuda(case, dtype):
    b, h, w, heads, d, ks, dil, padding, shift = GPU_CASES[case]
    q, k, v = (randn(b, h, w, heads, d, dtype=dtype, device="cuda") for _ in range(3))
    check_msa_conv(torch.ops.sinklora_ext, q, k, v, ks, dil, padding, shift)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_msa_conv2d_cuda_strided_inputs(dtype):
    """q, k, v sliced out of one tensor (head and pixel strides that are not the dense ones)."""
    base = randn(2, 13, 18, 5, 64, dtype=dtype, device="cuda")
    q, k, v = base[:, :, :, 0:2], base[:, :, :, 1:3], base[:, :, :, 3:5]
    check_msa_conv(torch.ops.sinklora_ext, q, k, v, (5, 5), (1, 2), "zero", [(2, -3), (-5, 9)])


@requires_cuda
def test_msa_conv2d_cuda_many_heads_read_the_shift_from_device_memory():
    """More heads than the kernel arguments carry: the shift table is copied to the device."""
    heads = 70
    q, k, v = (randn(1, 6, 5, heads, 32, device="cuda") for _ in range(3))
    check_msa_conv(torch.ops.sinklora_ext, q, k, v, (3, 3), (1, 1), "mask", [(h, 2 * h - 9) for h in range(heads)])


@requires_cuda
def test_msa_conv2d_cuda_backward_is_deterministic():
    ops = torch.ops.sinklora_ext
    q, k, v = (randn(2, 19, 23, 2, 64, dtype=torch.float16, device="cuda") for _ in range(3))
    args = ([7, 5], [1, 2], "clamp", [3, -1, 0, 4], 0.125)
    out, lse = ops.msa_conv2d_fwd(q, k, v, *args)
    dout = randn(*q.shape, dtype=torch.float16, device="cuda")
    first = ops.msa_conv2d_bwd(dout, q, k, v, out, lse, *args)
    second = ops.msa_conv2d_bwd(dout, q, k, v, out, lse, *args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@requires_cuda
@pytest.mark.parametrize("kv_shift", [None, [1, -2, 5, 3]], ids=["no-shift", "shift"])
def test_msa_conv2d_cuda_graph_capture_of_the_forward(kv_shift):
    """The forward captured into a CUDA graph replays on new inputs like an eager call."""
    ops = torch.ops.sinklora_ext
    q, k, v = (randn(2, 12, 14, 2, 32, dtype=torch.float16, device="cuda") for _ in range(3))
    args = ([5, 5], [1, 1], "zero", kv_shift, 32**-0.5)
    ops.msa_conv2d_fwd(q, k, v, *args)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = ops.msa_conv2d_fwd(q, k, v, *args)
    for t in (q, k, v):
        t.copy_(randn(*t.shape, dtype=t.dtype, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    eager_out, eager_lse = ops.msa_conv2d_fwd(q, k, v, *args)
    assert torch.equal(out, eager_out) and torch.equal(lse, eager_lse)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_msa_conv2d_cuda_kernel_for(dtype):
    like = torch.empty(0, dtype=dtype, device="cuda")
    for op in ("msa_conv2d_fwd", "msa_conv2d_bwd"):
        for d in (1, 32, 64, 128):
            assert torch.ops.sinklora_ext.kernel_for(like, op, d, 1) == "generic"
