"""The CUDA kernels on the CPU: builds and loads the emulator build of the extension (csrc/emu/).

The build compiles the project's own CUDA sources (csrc/cuda/**/*.cu, the kernel headers and the CUDA
entry points csrc/cuda/*.cpp, unmodified) as host C++ against the emulated CUDA of csrc/emu/, with the
device-agnostic API files (csrc/*.cpp) and without the CPU kernels (csrc/cpu/), and registers the CUDA
entry points under ``torch.ops.sinklora_cuda_emu`` (its CPU key) with the schemas of
``torch.ops.sinklora_ext``: CPU tensors in, the CUDA kernels run by the emulator. Kernel code is compiled with -fsanitize=thread so that the
emulator's tracker sees every load and store (ThreadSanitizer's own runtime is not linked).
"""

from __future__ import annotations

import functools
import glob
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BUILD_DIR = ROOT / "build" / "cuda_emu"
NAME = "sinklora_cuda_emu"


def _sources() -> list[str]:
    wrappers = BUILD_DIR / "src"
    wrappers.mkdir(parents=True, exist_ok=True)
    sources = []
    for cu in sorted(glob.glob(str(ROOT / "csrc" / "cuda" / "**" / "*.cu"), recursive=True)):
        # cpp_extension compiles .cu files with nvcc; a one-line C++ unit includes each instead.
        wrapper = wrappers / (Path(cu).stem + ".cpp")
        text = f'#include "{cu}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        sources.append(str(wrapper))
    sources += sorted(glob.glob(str(ROOT / "csrc" / "cuda" / "*.cpp")))
    sources += sorted(glob.glob(str(ROOT / "csrc" / "*.cpp")))
    sources += sorted(glob.glob(str(ROOT / "csrc" / "emu" / "*.cpp")))
    return sources


@functools.cache
def load():
    """Builds (incrementally, with ninja) and imports the emulator build; returns its op namespace."""
    from torch.utils import cpp_extension

    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", "2")
    cpp_extension.load(
        name=NAME,
        sources=_sources(),
        extra_include_paths=[str(ROOT / "csrc" / "emu" / "include"), str(ROOT / "csrc")],
        extra_cflags=[
            "-O2",
            "-std=c++20",
            "-DSINKLORA_WITH_CUDA",
            "-DSINKLORA_CUDA_EMULATION",
            "-fsanitize=thread",
            "--param=tsan-instrument-func-entry-exit=0",
            "-Wno-unused-function",
        ],
        build_directory=str(BUILD_DIR),
        verbose=os.environ.get("SINKLORA_EMU_VERBOSE", "0") == "1",
    )
    return getattr(torch.ops, NAME)


if __name__ == "__main__":
    load()
    print("built", BUILD_DIR)
