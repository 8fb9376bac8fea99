#!/usr/bin/env bash
# Make .venv-kvpress at the repository root: NVIDIA kvpress (pinned) with the transformers it
# requires (< 5.3, older than this package's) and the CPU torch, for the kvpress baselines of
# `sinklora bench kv-quality` (bench/kvpress_baseline.py; bench/RESULTS.md). This package is not
# installed there: the baseline reads the bench's token windows from a file the main venv writes.
#
#   scripts/install_kvpress_env.sh           # idempotent
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${KVPRESS_VENV:-$ROOT/.venv-kvpress}
KVPRESS_VERSION=0.5.5
PY=$VENV/bin/python

if [ ! -f "$VENV/.installed" ]; then
    echo "install_kvpress_env: creating $VENV (kvpress==$KVPRESS_VERSION, torch==2.13.0 CPU)" >&2
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q "torch==2.13.0"
    "$PY" -m pip install -q "kvpress==$KVPRESS_VERSION" "transformers>=4.56,<5.3" tqdm
    touch "$VENV/.installed"
fi
"$PY" -c "import kvpress, transformers, torch; print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '$KVPRESS_VERSION', 'transformers', transformers.__version__, 'torch', torch.__version__)"
