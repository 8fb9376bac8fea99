"""SF-Attn as a transformers attention backend (docs/training.md), and attention switching.

Importing this module registers one attention function per preset with transformers' attention
interface, under the names ``sinklora_full``, ``sinklora_sf``, ``sinklora_sf_nowrap``,
``sinklora_s2`` and ``sinklora_s2_nowrap``, together with flash-attention's mask function (so
padding reaches the attention as the 2-D mask and right-padded batches run through the varlen op):

>>> model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sinklora_sf")  # doctest: +SKIP
>>> set_attention(model, "sf", group_ratio=0.25)   # or switch a loaded model       # doctest: +SKIP
>>> with use_attention(model, "sf", during="always"):  # or only for a block        # doctest: +SKIP
...     model(input_ids)

Training (``module.training``) uses the pattern; evaluation and inference use full causal attention,
as LongLoRA and SinkLoRA do, unless ``set_attention(..., during="always")``. Settings live in the
model config (``sinklora_group_ratio``, ``sinklora_group_size``, ``sinklora_sinks``,
``sinklora_during``) so a saved model reloads with them.

:func:`set_attention` switches for good (training selects its pattern so); :func:`use_attention`
switches for a ``with`` block and gives the model back its implementation and those settings on
exit, also on error (evaluation, benchmarks, the paged cache's forward calls).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F

from ..attention import sf_attention, sf_attention_varlen
from ..patterns import PRESETS, resolve_pattern
from .models import base_model

ATTN_PREFIX = "sinklora_"
DURING = ("train", "always")
SETTINGS = ("sinklora_group_ratio", "sinklora_sinks", "sinklora_during", "sinklora_group_size")
_CHECKED = weakref.WeakKeyDictionary()  # model -> implementations a switch of its config alone sets


def implementation_name(preset: str) -> str:
    if preset not in PRESETS:
        raise ValueError(f"attention preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return ATTN_PREFIX + preset


def _pattern(module, preset: str, seqlen: int):
    config = module.config
    during = getattr(config, "sinklora_during", "train")
    use = preset if (module.training or during == "always") else "full"
    return resolve_pattern(use, seqlen, getattr(config, "sinklora_group_ratio", 0.25),
                           getattr(config, "sinklora_sinks", None), getattr(config, "sinklora_group_size", None))


def _bottom_right_attention(query, key, value, mask2d, scaling):
    """Causal attention of q_len queries over kv_len >= q_len keys (the last queries), with padding.
    Used for cached decoding steps, where the pattern is always full causal attention."""
    q_len, kv_len = query.shape[2], key.shape[2]
    rows = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
    cols = torch.arange(kv_len, device=query.device)[None, :]
    mask = (cols <= rows)[None, None]
    if mask2d is not None:
        mask = mask & mask2d[:, None, None, -kv_len:].bool()
    rep = query.shape[1] // key.shape[1]
    if rep > 1:
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)


def _make_attention(preset: str):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query [B, Hq, q_len, D]; key, value [B, Hkv, kv_len, D] after RoPE; K/V are not repeated.
        if dropout:
            raise ValueError(f"{ATTN_PREFIX}{preset} attention has no dropout; got dropout={dropout}")
        q_len, kv_len = query.shape[2], key.shape[2]
        if q_len != kv_len:
            return _bottom_right_attention(query, key, value, attention_mask, scaling), None

        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [B, N, H, D] views

        cu_seqlens = kwargs.get("cu_seq_lens_q")
        if cu_seqlens is not None:  # padding-free packed batch (B == 1)
            cu_seqlens = cu_seqlens.to(torch.int32)
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            max_len = int(kwargs.get("max_length_q") or lengths.max())
            pat = _pattern(module, preset, max_len)
            out = sf_attention_varlen(q[0], k[0], v[0], cu_seqlens, max_len, pat.group_size, pat.num_sinks,
                                      pat.shift, scaling)
            return out[None], None

        if attention_mask is None:
            pat = _pattern(module, preset, q_len)
            return sf_attention(q, k, v, pat.group_size, pat.num_sinks, pat.shift, scaling), None

        # Padded batch: each sequence on its own, through the varlen op. Without a fixed group size
        # the groups are sized from the longest sequence, the same for every sequence of the batch.
        mask2d = attention_mask[:, -kv_len:].bool()
        b, n = mask2d.shape
        lengths = mask2d.sum(dim=1, dtype=torch.int32)
        cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        keep = mask2d.reshape(-1).nonzero().squeeze(1)
        max_len = int(lengths.max())
        pat = _pattern(module, preset, max_len)
        flat = lambda t: t.reshape(b * n, t.shape[2], t.shape[3]).index_select(0, keep)  # noqa: E731
        out_unpadded = sf_attention_varlen(flat(q), flat(k), flat(v), cu_seqlens, max_len, pat.group_size,
                                           pat.num_sinks, pat.shift, scaling)
        out = out_unpadded.new_zeros(b * n, *out_unpadded.shape[1:])
        out.index_copy_(0, keep, out_unpadded)
        return out.reshape(b, n, *out.shape[1:]), None

    attention.__name__ = f"{ATTN_PREFIX}{preset}_attention"
    return attention


def register() -> None:
    """Register every preset with transformers (idempotent; done on import)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask

    for preset in PRESETS:
        AttentionInterface.register(implementation_name(preset), _make_attention(preset))
        AttentionMaskInterface.register(implementation_name(preset), flash_attention_mask)


def set_attention(model, preset: str, group_ratio: float = 0.25, num_sinks: int | None = None,
                  during: str = "train", group_size: int | None = None) -> None:
    """Switch a loaded model (peft-wrapped or not) to ``preset``, for good (:func:`use_attention`:
    for a block).

    Groups are ``group_ratio`` of each batch's length, or ``group_size`` tokens when given (the
    training CLI fixes it to context * ratio, so a padded batch equals its sequences run alone).
    ``num_sinks`` overrides the preset's sinks; ``during="train"`` applies the pattern only in
    training mode (full causal attention in eval), ``"always"`` in both.
    """
    if during not in DURING:
        raise ValueError(f"during must be one of {DURING}, got {during!r}")
    if not 0.0 < group_ratio <= 1.0:
        raise ValueError(f"group_ratio must be in (0, 1], got {group_ratio}")
    if num_sinks is not None and num_sinks < 0:
        raise ValueError(f"num_sinks must be >= 0, got {num_sinks}")
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    name = implementation_name(preset)
    base = base_model(model)
    config = base.config
    config.sinklora_group_ratio = group_ratio
    config.sinklora_sinks = num_sinks
    config.sinklora_during = during
    config.sinklora_group_size = group_size
    base.set_attn_implementation(name)


def _set_implementation(base, name: str) -> None:
    """``base.set_attn_implementation(name)``. That walks every module (about a millisecond for a
    30-layer model); the paged cache switches at every forward call, so once a name has been checked
    on a model whose submodels share its config (LLaMA), the switch of the config it comes down to
    is all that is done."""
    checked = _CHECKED.get(base)
    if checked is not None and name in checked:
        base.config._attn_implementation = name
        return
    base.set_attn_implementation(name)
    from transformers import PreTrainedModel

    if all(m.config is base.config for m in base.modules() if isinstance(m, PreTrainedModel)):
        _CHECKED.setdefault(base, set()).add(name)


@contextlib.contextmanager
def use_attention(model, name: str, **pattern):
    """Run ``model`` (peft-wrapped or not) with another attention inside a ``with`` block; on exit,
    also on error, it gets back its implementation and pattern settings (those it lacked are removed).

    ``name`` is a preset (``"sf"``, ``"s2_nowrap"``, ...; ``pattern`` takes :func:`set_attention`'s
    keywords) or any registered implementation name (``"sdpa"``, ``"eager"``, ``"sinklora_paged"``).
    Yields the model.
    """
    if pattern and name not in PRESETS:
        raise ValueError(f"pattern settings {sorted(pattern)} apply to a preset ({sorted(PRESETS)}), not {name!r}")
    base = base_model(model)
    config = base.config
    implementation = config._attn_implementation
    settings = {key: getattr(config, key) for key in SETTINGS if hasattr(config, key)}
    try:
        if name in PRESETS:
            set_attention(base, name, **pattern)
        else:
            _set_implementation(base, name)
        yield model
    finally:
        for key in SETTINGS:
            if key in settings:
                setattr(config, key, settings[key])
            elif hasattr(config, key):
                delattr(config, key)
        if config._attn_implementation != implementation:
            _set_implementation(base, implementation)


register()
