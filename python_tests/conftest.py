"""Shared helpers for the sinklora_ext tests.

Tolerance rule (flash-attention's): the kernel's error against a float64 reference must be at most
``factor`` times the error that plain PyTorch makes in the same dtype (``attention_ref(...,
upcast=False)`` on the same inputs), plus a small floor. ``factor`` is 2 for outputs and 3 for
gradients.
"""

from __future__ import annotations

import os
import random
from typing import Callable

import pytest
import torch

import sinklora_ext
from sinklora_ext.reference import sf_attention_ref, sf_attention_varlen_ref

HAS_CUDA = torch.cuda.is_available()
EXTENDED = os.environ.get("SINKLORA_RUN_EXTENDED_TESTS", "0").lower() in ("1", "true", "yes", "on")

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
extended = pytest.mark.skipif(not EXTENDED, reason="set SINKLORA_RUN_EXTENDED_TESTS=1 to run")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHIFTS = ("none", "nowrap", "roll")

# Absolute floor of the tolerance, relative to max(1, max |reference|). It only matters where
# PyTorch itself is (nearly) exact, e.g. rows that see a single key.
ATOL_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
FWD_FACTOR = 2.0
BWD_FACTOR = 3.0


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    random.seed(0)
    if HAS_CUDA:
        torch.cuda.manual_seed_all(0)
    yield


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def randn(*shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Random normal data (never zeros), generated in float32 on the CPU for reproducibility."""
    return torch.randn(*shape, dtype=torch.float32).to(device=device, dtype=dtype)


def make_qkv(b, n, hq, hkv, d, dtype=torch.float32, device="cpu"):
    return (
        randn(b, n, hq, d, dtype=dtype, device=device),
        randn(b, n, hkv, d, dtype=dtype, device=device),
        randn(b, n, hkv, d, dtype=dtype, device=device),
    )


def make_qkv_varlen(seqlens, hq, hkv, d, dtype=torch.float32, device="cpu"):
    total = sum(seqlens)
    cu = torch.tensor([0] + list(_cumsum(seqlens)), dtype=torch.int32, device=device)
    q = randn(total, hq, d, dtype=dtype, device=device)
    k = randn(total, hkv, d, dtype=dtype, device=device)
    v = randn(total, hkv, d, dtype=dtype, device=device)
    return q, k, v, cu, max(seqlens, default=0)


def _cumsum(xs):
    acc = 0
    for x in xs:
        acc += x
        yield acc


def max_abs_err(actual: torch.Tensor, ref: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return (actual.double().cpu() - ref.double().cpu()).abs().max().item()


def assert_flash_close(
    name: str,
    actual: torch.Tensor,
    ref64: torch.Tensor,
    baseline: torch.Tensor,
    dtype: torch.dtype,
    factor: float,
    floor: float | None = None,
    scale: float | None = None,
) -> None:
    """``|actual - ref64| <= factor * |baseline - ref64| + floor * scale`` (max norms), and no
    NaN/inf. ``scale`` defaults to ``max(1, max |ref64|)``."""
    assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}, expected {dtype}"
    assert torch.isfinite(actual).all(), f"{name}: contains NaN/inf"
    if actual.numel() == 0:
        return
    err = max_abs_err(actual, ref64)
    base = max_abs_err(baseline, ref64)
    if scale is None:
        scale = max(1.0, ref64.abs().max().item())
    tol = factor * base + (ATOL_FLOOR[dtype] if floor is None else floor) * scale
    assert err <= tol, (
        f"{name}: max error {err:.3e} vs float64 reference exceeds {factor} x PyTorch-{dtype_id(dtype)} "
        f"error {base:.3e} + floor ({tol:.3e} in all)"
    )


def check_against_reference(
    op: Callable,
    ref: Callable,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    check_grad: bool = True,
) -> dict:
    """Run ``op(q, k, v)`` and compare output (2x rule) and dq/dk/dv (3x rule) with
    ``ref(q, k, v, upcast=True)`` on float64 copies, using ``ref(..., upcast=False)`` in the
    inputs' dtype as the PyTorch baseline. Returns the op's output and gradients."""
    q, k, v = inputs
    dtype = q.dtype

    def run(fn, cast, **kw):
        ts = [t.detach().to(cast).requires_grad_(check_grad) for t in (q, k, v)]
        out = fn(*ts, **kw)
        return ts, out

    (q1, k1, v1), out = run(op, dtype)
    (q64, k64, v64), out64 = run(ref, torch.float64, upcast=True)
    (qpt, kpt, vpt), outpt = run(ref, dtype, upcast=False)
    assert out64.dtype == torch.float64
    assert_flash_close("out", out, out64, outpt, dtype, FWD_FACTOR)
    result = {"out": out.detach()}
    if not check_grad:
        return result
    dout = torch.randn(out.shape, dtype=torch.float32).to(device=out.device, dtype=dtype)
    out.backward(dout)
    out64.backward(dout.double())
    outpt.backward(dout)
    # One magnitude for the three gradients: dq (or dk) can be exactly zero in exact arithmetic
    # (a row that sees one key) while the kernel computes it as a difference of O(1) terms.
    grad_scale = max(1.0, *(t.grad.abs().max().item() for t in (q64, k64, v64) if t.numel()))
    for name, a, r, b in (
        ("dq", q1, q64, qpt),
        ("dk", k1, k64, kpt),
        ("dv", v1, v64, vpt),
    ):
        assert a.grad is not None, f"{name}: no gradient"
        assert_flash_close(name, a.grad, r.grad, b.grad, dtype, BWD_FACTOR, scale=grad_scale)
        result[name] = a.grad.detach()
    result["dout"] = dout
    return result


def check_sf_attention(q, k, v, group_size, num_sinks, shift, softmax_scale=None, check_grad=True):
    def op(q, k, v):
        return sinklora_ext.sf_attention(q, k, v, group_size, num_sinks, shift, softmax_scale)

    def ref(q, k, v, upcast):
        return sf_attention_ref(q, k, v, group_size, num_sinks, shift, softmax_scale, upcast=upcast)

    return check_against_reference(op, ref, (q, k, v), check_grad)


def check_sf_attention_varlen(
    q, k, v, cu_seqlens, max_seqlen, group_size, num_sinks, shift, softmax_scale=None, check_grad=True
):
    def op(q, k, v):
        return sinklora_ext.sf_attention_varlen(
            q, k, v, cu_seqlens, max_seqlen, group_size, num_sinks, shift, softmax_scale
        )

    def ref(q, k, v, upcast):
        return sf_attention_varlen_ref(
            q, k, v, cu_seqlens, max_seqlen, group_size, num_sinks, shift, softmax_scale, upcast=upcast
        )

    return check_against_reference(op, ref, (q, k, v), check_grad)


def reference_attention(preset, group_ratio=0.25, num_sinks=None):
    """An eager transformers attention function with the pattern's mask (docs/attention.md) from the
    float64-capable reference; cached decoding steps (fewer queries than keys) see every cached key,
    as docs/training.md has it. Shared by test_hf_integration and test_evaluate."""
    from sinklora_ext.patterns import resolve_pattern
    from sinklora_ext.reference import attention_ref, sf_visibility_mask

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        q_len, kv_len = query.shape[2], key.shape[2]
        if q_len == kv_len:
            pat = resolve_pattern(preset, q_len, group_ratio, num_sinks)
            mask = sf_visibility_mask(q_len, pat.group_size, pat.num_sinks, pat.shift, query.shape[1], query.device)
        else:
            rows = torch.arange(kv_len - q_len, kv_len)[:, None]
            mask = (torch.arange(kv_len)[None, :] <= rows).expand(query.shape[1], q_len, kv_len)
        out, _ = attention_ref(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mask, scaling)
        return out, None

    return attention


def save_tiny_llama(path, tokenizer, hidden: int = 64, layers: int = 2) -> str:
    """A tiny random LLaMA (seed 0, context 128) with ``tokenizer``, saved at ``path``: the ``--model``
    of fast command-line tests. Returns the path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """:func:`save_tiny_llama` with the default model's tokenizer (its pad token set as load_model sets
    it). Test modules with a fixture of this name use their own."""
    from transformers import AutoTokenizer

    from sinklora_ext.hf.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), tokenizer)
