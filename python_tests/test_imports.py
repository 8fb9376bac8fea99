"""Importing sinklora_ext and its modules changes nothing in the process, and ``import sinklora_ext``
stays light (no transformers, no peft). Each check runs in a fresh interpreter."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import sinklora_ext

PACKAGE = Path(sinklora_ext.__file__).parent
# what the issue names; every other module found below is checked too
REQUIRED = ("sinklora_ext.hf.attention", "sinklora_ext.hf.cache", "sinklora_ext.hf.lora", "sinklora_ext.hf.models",
            "sinklora_ext.data", "sinklora_ext.train", "sinklora_ext.evaluate", "sinklora_ext.engine",
            "sinklora_ext.cli", "sinklora_ext.bench.attention", "sinklora_ext.bench.decode",
            "sinklora_ext.bench.extension", "sinklora_ext.bench.generate")

STATE = """
import json, logging, os, sys, warnings
import torch

def state():
    return {"environ": dict(os.environ), "filters": [repr(f) for f in warnings.filters],
            "default_dtype": str(torch.get_default_dtype()), "path": list(sys.path),
            "levels": {name: logging.getLogger(name).level for name in ("", "transformers", "peft", "torch")}}
"""


# the modules vLLM loads by class path import vLLM (sinklora_ext.vllm itself and its config do not)
NEEDS_VLLM = tuple(f"sinklora_ext.vllm.{m}" for m in ("names", "spec", "metadata", "backend", "impl"))
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def modules() -> list[str]:
    """Every module of the package, found in its files (importing nothing); ``__main__`` modules
    run a command when imported, so they are left out, and so are those that need vLLM where it
    is not installed."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__main__.py":
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if HAS_VLLM or name not in NEEDS_VLLM:
            names.append(name)
    return names


def test_the_vllm_modules_are_known():
    found = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts) for p in (PACKAGE / "vllm").glob("*.py")}
    assert set(NEEDS_VLLM) <= found
    assert found - set(NEEDS_VLLM) == {"sinklora_ext.vllm.__init__", "sinklora_ext.vllm.config"}


def run(code: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # so that setting it would show
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=PACKAGE.parent, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_module_list_is_complete():
    assert set(REQUIRED) <= set(modules())


def test_importing_every_module_changes_nothing():
    """torch, transformers and peft are imported first (what they do on import is theirs); then every
    sinklora_ext module: the environment, warning filters, default dtype, logging levels and
    ``sys.path`` are as they were."""
    result = run(STATE + f"""
import transformers, peft
before = state()
import importlib
for name in {modules()!r}:
    importlib.import_module(name)
after = state()
print(json.dumps({{key: [before[key], after[key]] for key in before if before[key] != after[key]}}))
""")
    assert result == {}


def test_import_sinklora_ext_is_light():
    result = run("""
import json, sys
import sinklora_ext
light = sorted(m for m in ("transformers", "peft") if m in sys.modules)
import sinklora_ext.hf, sinklora_ext.hf.models
print(json.dumps([light, sorted(m for m in ("transformers", "peft") if m in sys.modules)]))
""")
    assert result == [[], []]


def test_hf_reexports_are_the_modules_names():
    result = run("""
import importlib, json
import sinklora_ext.hf as hf
print(json.dumps({name: getattr(hf, name) is getattr(importlib.import_module("sinklora_ext.hf." + module), name)
                  for module, names in hf._EXPORTS.items() for name in names}))
""")
    assert result and all(result.values()), result
