"""Errors of the user's making, and the checks that find them before any model loads.

A :class:`UsageError` names the argument and the rule it breaks, on one line (docs/errors.md).
``sinklora`` (``sinklora_ext.cli``) prints it as ``sinklora: error: ...`` and exits with code 2, as
argparse does for its own checks; any other exception is a bug and keeps its traceback. Python callers see a plain
``ValueError`` (:class:`MissingInput`: also a ``FileNotFoundError``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

INT32_MAX = 2**31 - 1  # the kernels index tokens, groups and slots with int32
MAX_BLOCK_SIZE = 1024
LLAMA_MODEL_TYPES = ("llama",)
CHECKPOINT_MARKER = "sinklora_checkpoint.json"  # `sinklora train` writes it into a checkpoint once it is complete


class UsageError(ValueError):
    """Bad input from the user: the message names the argument and the rule (folded to one line)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class MissingInput(UsageError, FileNotFoundError):
    """A file or directory the user named does not exist (or a corpus is not installed)."""


def flag(name: str) -> str:
    """``kv_budget`` -> ``--kv-budget``."""
    return "--" + name.replace("_", "-")


def at_least(config, minimum: int, *names: str) -> None:
    """Each of ``config.<name>`` that is set is an integer >= ``minimum`` (and fits int32)."""
    for name in names:
        value = getattr(config, name)
        if value is None:
            continue
        if value < minimum:
            raise UsageError(f"{flag(name)} must be >= {minimum}, got {value}")
        if value > INT32_MAX:
            raise UsageError(f"{flag(name)} must be <= {INT32_MAX} (2**31 - 1), got {value}")


def in_unit_interval(config, *names: str) -> None:
    """Each of ``config.<name>`` that is set lies in (0, 1]."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not 0 < value <= 1:
            raise UsageError(f"{flag(name)} must be in (0, 1], got {value}")


def positive_finite(config, *names: str) -> None:
    """Each of ``config.<name>`` that is set is a finite number > 0."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"{flag(name)} must be a finite number > 0, got {value}")


def check_block_size(config) -> None:
    """``config.block_size`` (tokens per KV block) in [1, MAX_BLOCK_SIZE]."""
    block_size = config.block_size
    if block_size is not None and not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise UsageError(f"--block-size must be in [1, {MAX_BLOCK_SIZE}], got {block_size}")


def check_device(device) -> None:
    """``cpu``, ``cuda`` or ``cuda:N`` of a GPU that is there (``None``/``auto``: the default)."""
    import torch

    if device is None or device == "auto":
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is available (use --device cpu)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices")


def read_text_file(path, argument: str) -> str:
    """The contents of a UTF-8 text file; a missing file, a directory, an empty, binary or non-UTF-8
    file is refused with the rule."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"{argument}: {path} is a directory, not a text file")
    if not p.exists():
        raise MissingInput(f"{argument}: no such file: {path}")
    if not p.is_file():
        raise UsageError(f"{argument}: {path} is not a regular file (a device, socket or pipe?)")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise UsageError(f"{argument}: cannot read {path}: {e.strerror}") from None
    if not raw.strip():
        raise UsageError(f"{argument}: {path} is empty")
    if b"\0" in raw:
        raise UsageError(f"{argument}: {path} is a binary file (it contains NUL bytes), not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{argument}: {path} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") \
            from None


def read_json_file(path, argument: str):
    text = read_text_file(path, argument)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{argument}: {path} is not valid JSON ({e})") from None


def check_output_dir(path, argument: str = "--output") -> None:
    """An output directory: absent (it is created) or a directory, never a file."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UsageError(f"{argument}: {path} exists and is not a directory")
    parent = next((a for a in p.absolute().parents if a.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"{argument}: {parent} is not a directory")


def check_model_dir(path, argument: str = "--model") -> None:
    """A local LLaMA-architecture Hugging Face checkpoint directory or a .gguf file (``None``: the
    default model)."""
    if path is None:
        return
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return
    if not p.is_dir():
        raise MissingInput(
            f"{argument}: {path!r} is not a local directory (nothing is fetched from a hub); give a "
            "Hugging Face checkpoint directory, a .gguf file, or leave it out for the default model")
    if not (p / "config.json").is_file():
        hint = " (it looks like a LoRA adapter: pass it as --adapter)" if (p / "adapter_config.json").is_file() else ""
        raise MissingInput(f"{argument}: {p} has no config.json{hint}")
    config = read_json_file(p / "config.json", argument)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in LLAMA_MODEL_TYPES:
        raise UsageError(f"{argument}: {p} holds a {model_type!r} model; sinklora needs a LLaMA-architecture "
                         f"checkpoint (model_type {' or '.join(map(repr, LLAMA_MODEL_TYPES))})")


def check_adapter_dir(path, argument: str = "--adapter") -> None:
    """A peft adapter directory (``adapter_config.json`` + readable weights); its `sinklora train`
    metadata is read by :func:`sinklora_ext.train.read_checkpoint_meta`."""
    p = Path(path).expanduser()
    if not p.is_dir():
        if p.exists():
            raise UsageError(f"{argument}: {path} is a file; an adapter is a directory")
        raise MissingInput(f"{argument}: no such directory: {path}")
    if p.parent.name.endswith(".checkpoints") and p.name.startswith("checkpoint-") \
            and not (p / CHECKPOINT_MARKER).is_file():
        raise UsageError(f"{argument}: {p} is an incomplete `sinklora train` checkpoint (no {CHECKPOINT_MARKER}: "
                         "its run was killed while writing it)")
    if not (p / "adapter_config.json").is_file():
        raise MissingInput(f"{argument}: {p} has no adapter_config.json (not a peft adapter)")
    config = read_json_file(p / "adapter_config.json", argument)
    if not isinstance(config, dict) or "peft_type" not in config:
        raise UsageError(f"{argument}: {p / 'adapter_config.json'} is not a peft adapter config (no peft_type)")
    weights = p / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(weights), "pt") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise UsageError(f"{argument}: {weights} is not a readable safetensors file ({e})") from None
    elif not (p / "adapter_model.bin").is_file():
        raise MissingInput(f"{argument}: {p} has no adapter_model.safetensors (nor adapter_model.bin)")


def available_memory(device) -> int:
    """Bytes free for new tensors on ``device``: the GPU's free memory, or the host's MemAvailable."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(nbytes: int, device, what: str) -> None:
    """Refuse work whose tensors alone would not fit (rather than being killed by the OOM killer)."""
    free = available_memory(device)
    if nbytes > free:
        raise UsageError(f"{what} needs at least {nbytes / 2**30:.1f} GiB on {device}, more than the "
                         f"{free / 2**30:.1f} GiB available")
