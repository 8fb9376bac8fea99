"""The attention presets of docs/attention.md and how they turn into (group_size, num_sinks, shift)."""

from __future__ import annotations

from dataclasses import dataclass

SHIFTS = ("none", "nowrap", "roll")


@dataclass(frozen=True)
class AttentionPattern:
    """Concrete arguments of :func:`sinklora_ext.sf_attention` for one sequence length."""

    group_size: int
    num_sinks: int
    shift: str


@dataclass(frozen=True)
class Preset:
    name: str
    shift: str
    num_sinks: int
    description: str


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("full", "none", 0, "plain causal attention (used at inference)"),
        Preset("sf", "none", 4, "SinkLoRA SF-Attn: fixed groups plus global sink tokens"),
        Preset("sf_nowrap", "nowrap", 4, "SF-Attn with shifted segments on half the heads"),
        Preset("s2", "roll", 0, "LongLoRA S²-Attn as in its paper (cyclic roll)"),
        Preset("s2_nowrap", "nowrap", 0, "LongLoRA's leak-free S²-Attn"),
    )
}


def group_size_for(seqlen: int, group_ratio: float = 0.25) -> int:
    if not 0.0 < group_ratio <= 1.0:
        raise ValueError(f"group_ratio must be in (0, 1], got {group_ratio}")
    return max(1, int(seqlen * group_ratio))


def resolve_pattern(preset: str, seqlen: int, group_ratio: float = 0.25, num_sinks: int | None = None,
                    group_size: int | None = None) -> AttentionPattern:
    """Arguments for ``preset`` at ``seqlen`` tokens (group = seqlen * group_ratio, or ``group_size``
    when given, e.g. fixed by the training context).

    ``num_sinks`` overrides the preset's sink count (ignored by ``full``).
    """
    if preset not in PRESETS:
        raise ValueError(f"attention preset must be one of {sorted(PRESETS)}, got {preset!r}")
    p = PRESETS[preset]
    if p.name == "full":
        return AttentionPattern(max(1, seqlen), 0, "none")
    sinks = p.num_sinks if num_sinks is None else num_sinks
    if sinks < 0:
        raise ValueError(f"num_sinks must be >= 0, got {sinks}")
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return AttentionPattern(group_size or group_size_for(seqlen, group_ratio), sinks, p.shift)
