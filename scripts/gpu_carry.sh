#!/usr/bin/env bash
# Stage what the device's `extension` stage needs but the device lacks: the `gguf` wheel and the
# default model's GGUF file (96 MB, over one call's 64 MiB carry), split in two halves that travel
# in two calls on the same warm machine:
#   scripts/gpu_carry.sh                 # here: writes .gpu_carry/a (wheel + first half) and .gpu_carry/b
#   device call 1: carry [".gpu_carry/a"], command: bash scripts/gpu_check.sh build test ...
#   device call 2: carry [".gpu_carry/b"], command: bash scripts/gpu_check.sh extension
# (.gpu_carry/a stays on the warm machine between the calls: ignored files are kept there.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
gguf=$($PY -c "from sinklora_ext.hf.models import default_gguf_path; print(default_gguf_path())")
rm -rf .gpu_carry && mkdir -p .gpu_carry/a .gpu_carry/b
$PY -m pip download -q --no-deps --only-binary=:all: -d .gpu_carry/a gguf==0.19.0
size=$(stat -c %s "$gguf")
half=$(((size + 1) / 2))
head -c "$half" "$gguf" >.gpu_carry/a/model.part
tail -c "+$((half + 1))" "$gguf" >.gpu_carry/b/model.part
sha256sum "$gguf" | cut -d' ' -f1 >.gpu_carry/a/model.sha256
basename "$gguf" >.gpu_carry/a/model.name
# the device has no Debian documentation packages: the corpora travel as text
mkdir -p .gpu_carry/a/text
$PY - <<'PY'
import shutil
from sinklora_ext.data import CORPORA, debian_text_file
for name in CORPORA:
    shutil.copy(debian_text_file(name), f".gpu_carry/a/text/{name}.txt")
PY
du -sh .gpu_carry/a .gpu_carry/b
