"""Typed configurations and the command line generated from them (vLLM's ``EngineArgs`` pattern).

A command's settings are one keyword-only dataclass derived from :class:`Config`; each field is
declared with :func:`option` and is its own flag (field ``kv_budget`` <-> ``--kv-budget``). From
the same fields :func:`add_cli_args` adds the argparse arguments, :func:`from_cli_args` builds the
config from parsed arguments and :func:`to_argv` writes a config back as arguments. The rules on
values (ranges, choices, rules between fields) run when a config is built, so a library caller
gets the :class:`~sinklora_ext.usage.UsageError` a command-line user gets (docs/errors.md).

The option groups several commands share are written here once: :class:`DeviceOptions`
(``--device``, ``--dtype``: one default, the GPU when there is one, float32 on the CPU and
bfloat16 on a GPU; docs/cli.md), :class:`ModelOptions` (``--model``, ``--adapter``,
``--no-progress``), :class:`AttentionOptions` (``--attn PRESET``, ``--group-ratio``, ``--sinks``) and
:class:`KVPolicyOptions` (``--policy``, ``--kv-budget``, ``--sinks``, ``--recent``, ``--block-size``).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass, fields

from ..kv_cache import POLICIES
from ..patterns import PRESETS
from ..usage import UsageError, at_least, check_block_size, check_device, flag, in_unit_interval, positive_finite

DTYPES = ("float32", "bfloat16", "float16")


def option(default=MISSING, *, help: str | None = None, choices=None, minimum: int | None = None,
           unit_interval: bool = False, positive: bool = False, action=None, metavar=None):
    """A config field and its flag. Without ``default`` the flag is required.

    ``minimum`` (an integer >= minimum, at most 2**31 - 1), ``unit_interval`` (in (0, 1]),
    ``positive`` (finite and > 0) and ``choices`` are checked when the config is built (unset
    ``None`` values pass). ``action`` (``"append"``: the flag repeats) and ``metavar`` go to
    argparse. The flag's type comes from the field's annotation (``bool``: a switch; ``list[str]``:
    one or more values).
    """
    metadata = dict(help=help, choices=tuple(choices) if choices is not None else None, minimum=minimum,
                    unit_interval=unit_interval, positive=positive, action=action, metavar=metavar)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_default(f: dataclasses.Field):
    """The default of a config field (``MISSING`` for a required one)."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _unwrap(annotation):
    """``int | None`` -> ``int``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


@dataclass(kw_only=True)
class Config:
    """Base of every command's configuration: checks its fields when built (see :func:`option`),
    after :meth:`fill_defaults`, then :meth:`check` the rules between fields."""

    def __post_init__(self):
        self.fill_defaults()
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None or not meta:
                continue
            if meta["choices"] is not None:
                values = value if isinstance(value, list) else [value]
                for v in values:
                    if v not in meta["choices"]:
                        raise UsageError(f"{flag(f.name)}: invalid choice: {v!r} (choose from "
                                         f"{', '.join(map(repr, meta['choices']))})")
            if meta["minimum"] is not None:
                at_least(self, meta["minimum"], f.name)
            if meta["unit_interval"]:
                in_unit_interval(self, f.name)
            if meta["positive"]:
                positive_finite(self, f.name)
        self.check()

    def fill_defaults(self) -> None:
        """Defaults that depend on other fields or on the machine (none here)."""

    def check(self) -> None:
        """Rules between fields (none here); subclasses call ``super().check()`` first."""

    @classmethod
    def from_cli_args(cls, namespace: argparse.Namespace):
        return from_cli_args(cls, namespace)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return add_cli_args(parser, cls)

    def to_argv(self) -> list[str]:
        return to_argv(self)


def add_cli_args(parser: argparse.ArgumentParser, cls: type[Config]) -> argparse.ArgumentParser:
    """One argparse argument per field of ``cls``, named after the field."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        meta, annotation = f.metadata, _unwrap(hints[f.name])
        kind = typing.get_origin(annotation) or annotation
        kwargs = dict(dest=f.name, help=meta.get("help"))
        if kind is bool:
            parser.add_argument(flag(f.name), action="store_true", **kwargs)
            continue
        default = field_default(f)
        required = default is MISSING
        kwargs.update(required=required, default=None if required else default)
        if meta.get("choices") is not None:
            kwargs["choices"] = list(meta["choices"])
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if meta.get("action"):
            kwargs["action"] = meta["action"]
            if not required:
                kwargs["default"] = None  # argparse appends to a given default list
        elif kind is list:
            kwargs["nargs"] = "+"
        if kind is list:
            kwargs["type"] = typing.get_args(annotation)[0]
        elif kind in (int, float, str):
            kwargs["type"] = kind
        parser.add_argument(flag(f.name), **kwargs)
    return parser


def from_cli_args(cls: type[Config], namespace: argparse.Namespace):
    """The config of parsed arguments (checked as it is built)."""
    values = vars(namespace)
    kwargs = {}
    for f in fields(cls):
        value = values[f.name]
        if value is None and f.metadata.get("action") and f.default_factory is not MISSING:
            value = f.default_factory()
        kwargs[f.name] = value
    return cls(**kwargs)


def to_argv(config: Config) -> list[str]:
    """``config`` as command-line arguments (fields at their default left out):
    ``from_cli_args(type(config), parser.parse_args(to_argv(config)))`` equals ``config``."""
    argv = []
    for f in fields(config):
        value = getattr(config, f.name)
        if value == field_default(f):
            continue
        if isinstance(value, bool):
            argv += [flag(f.name)] if value else []
        elif isinstance(value, (list, tuple)):
            if f.metadata.get("action") == "append":
                for v in value:
                    argv += [flag(f.name), str(v)]
            else:
                argv += [flag(f.name), *map(str, value)]
        elif value is not None:
            argv += [flag(f.name), repr(value) if isinstance(value, float) else str(value)]
    return argv


# ----------------------------------------------------------------------------------------------
# Option groups shared by several commands
# ----------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class DeviceOptions(Config):
    """``--device`` and ``--dtype``, with the one default rule of every command (docs/cli.md)."""

    dtype: str | None = option(None, choices=DTYPES, help="default: float32 on the CPU, bfloat16 on a GPU")
    device: str | None = option(None, help="cpu, cuda or cuda:N (default: cuda when there is a GPU, else cpu)")

    def check(self) -> None:
        super().check()
        check_device(self.device)

    def resolved_device(self):
        """The ``torch.device`` to run on (:func:`sinklora_ext.hf.models.resolve_device`)."""
        from ..hf.models import resolve_device

        return resolve_device(self.device)

    def resolved_dtype(self):
        """The ``torch.dtype`` to run in (:func:`sinklora_ext.hf.models.resolve_dtype`)."""
        from ..hf.models import resolve_dtype

        return resolve_dtype(self.dtype, self.device)

    def on_gpu(self) -> bool:
        return self.resolved_device().type == "cuda"


@dataclass(kw_only=True)
class ModelOptions(DeviceOptions):
    """The model an evaluation or generation runs: a checkpoint (or the default model), an adapter
    on top, where and in what dtype."""

    model: str | None = option(None, help="Hugging Face checkpoint directory or .gguf file "
                                           "(default: the embedded SmolLM2-135M-Instruct)")
    adapter: str | None = option(None, help="LoRA adapter directory (a `sinklora train` output or any peft "
                                            "adapter) loaded on top")
    no_progress: bool = option(False, help="no progress bar")

    def check_model_inputs(self):
        """``--model`` and ``--adapter`` checked on disk before anything loads; the adapter's
        checkpoint metadata (None without one)."""
        from ..evaluate import check_adapter_eval_inputs

        return check_adapter_eval_inputs(self.model, self.adapter)

    def load(self):
        """``(model, tokenizer)`` in eval mode, the adapter merged in (:func:`~sinklora_ext.evaluate.load_for_eval`)."""
        from ..evaluate import load_for_eval

        return load_for_eval(self.model, self.adapter, dtype=self.dtype, device=self.device)


@dataclass(kw_only=True)
class KVPolicyOptions(Config):
    """The paged cache's eviction policy (docs/paged_kv.md): ``policy``, ``kv_budget`` tokens per
    (layer, kv head), ``sinks``, ``recent`` (default: :func:`~sinklora_ext.kv_cache.default_recent`), ``block_size``."""

    policy: str = option("h2o", choices=POLICIES, help="KV cache policy (full never evicts)")
    kv_budget: int | None = option(None, minimum=1,
                                   help="tokens kept per (layer, kv head): sinks + recent + heavy hitters")
    sinks: int = option(4, minimum=0, help="sink tokens never evicted (default 4)")
    recent: int | None = option(None, minimum=0, help="recent tokens never evicted (default: budget / 2 for h2o, at "
                                                      "most 50 for the other scored policies)")
    score_decay: float | None = option(None, help="decay and ema policies: score decay per step, in (0, 1) "
                                                  "(default 0.99)")
    block_size: int = option(16, help="tokens per KV block (default 16)")

    def check(self) -> None:
        super().check()
        check_block_size(self)
        if self.policy == "full" and (self.kv_budget is not None or self.recent is not None):
            given = "--kv-budget" if self.kv_budget is not None else "--recent"
            raise UsageError(f"{given} applies to the evicting policies; --policy full keeps every token")
        if self.policy == "streaming" and self.recent is not None:
            raise UsageError("--recent applies to the scored policies; streaming keeps --kv-budget - --sinks recent "
                             "tokens")
        from ..kv_cache import default_recent, takes_score_decay

        if self.score_decay is not None:
            if not takes_score_decay(self.policy):
                raise UsageError(f"--score-decay applies to --policy decay or ema (and their snapkv- and pyramidkv-), not "
                                 f"{self.policy}")
            if not 0.0 < self.score_decay < 1.0:
                raise UsageError(f"--score-decay must be in (0, 1), got {self.score_decay}")
        if self.policy == "full":
            return
        if self.kv_budget is None:
            raise UsageError(f"--kv-budget is required with --policy {self.policy}")
        recent = self.recent
        if recent is None and self.policy != "streaming":
            recent = default_recent(self.policy, self.kv_budget)
        if self.policy != "streaming" and self.kv_budget < self.sinks + recent:
            raise UsageError(f"--kv-budget ({self.kv_budget}) must be >= --sinks ({self.sinks}) + --recent ({recent})")
        if self.policy == "streaming" and self.kv_budget < self.sinks:
            raise UsageError(f"--kv-budget ({self.kv_budget}) must be >= --sinks ({self.sinks})")

    def cache_policy(self):
        """The :class:`~sinklora_ext.kv_cache.CachePolicy` of these options."""
        from ..kv_cache import CachePolicy

        return CachePolicy(self.policy, self.kv_budget, self.sinks, self.recent, self.score_decay)


@dataclass(kw_only=True)
class AttentionOptions(Config):
    """The attention preset (a name of :data:`sinklora_ext.patterns.PRESETS`, docs/attention.md),
    its group ratio and sink count."""

    attn: str = option("full", choices=sorted(PRESETS), help="attention preset used during evaluation "
                                                             "(default: full)")
    group_ratio: float = option(0.25, unit_interval=True, help="group size / context (default 0.25)")
    sinks: int | None = option(None, minimum=0,
                               help="sink tokens (default: the preset's, 4 for sf and sf_nowrap, 0 for s2)")

    @property
    def num_sinks(self) -> int:
        """The sink count in effect (the preset's unless ``sinks`` is given; 0 for ``full``)."""
        if self.attn == "full":
            return 0
        return self.sinks if self.sinks is not None else PRESETS[self.attn].num_sinks

    def apply_attention(self, model) -> None:
        """Switch ``model`` to the preset for evaluation too (``full``: the model's own attention)."""
        if self.attn == "full":
            return
        from ..hf.attention import set_attention

        set_attention(model, self.attn, self.group_ratio, self.sinks, during="always")
