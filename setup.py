"""Builds sinklora_ext._C with torch's cpp_extension and ninja.

CUDA is built when nvcc and a CUDA build of torch are present (or SINKLORA_FORCE_CUDA=1);
SINKLORA_FORCE_CPU=1 builds the CPU kernels only. TORCH_CUDA_ARCH_LIST picks the GPU archs
(default "8.0;9.0+PTX"); MAX_JOBS and NVCC_THREADS bound the build's parallelism.
"""

import glob
import os

from setuptools import setup

# torch guesses CUDA_HOME from nvcc on PATH; point it at the standard toolkit when it is not there.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils import cpp_extension  # noqa: E402


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def want_cuda() -> bool:
    if env_flag("SINKLORA_FORCE_CPU"):
        return False
    if env_flag("SINKLORA_FORCE_CUDA"):
        return True
    import torch

    return cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None


def extension():
    debug = env_flag("SINKLORA_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = opt + ["-std=c++20", "-fopenmp", "-fno-trapping-math", "-Wall", "-Wno-unused-function"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    kwargs = dict(include_dirs=[os.path.abspath("csrc")], extra_link_args=["-fopenmp"])
    if not want_cuda():
        return cpp_extension.CppExtension("sinklora_ext._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    nvcc = opt + [
        "-std=c++20",
        "--expt-relaxed-constexpr",
        "--use_fast_math",
        "-lineinfo",
        f"--threads={os.environ.get('NVCC_THREADS', '2')}",
        "-DSINKLORA_WITH_CUDA",
    ]
    # the CUDA entry points and their registration under the CUDA key exist only in this build
    sources += sorted(glob.glob("csrc/cuda/**/*.cu", recursive=True) + glob.glob("csrc/cuda/*.cpp"))
    return cpp_extension.CUDAExtension(
        "sinklora_ext._C",
        sources,
        extra_compile_args={"cxx": cxx + ["-DSINKLORA_WITH_CUDA"], "nvcc": nvcc},
        **kwargs,
    )


setup(
    # SINKLORA_SKIP_BUILD=1: register the package only (the Makefile builds in place, incrementally).
    ext_modules=[] if env_flag("SINKLORA_SKIP_BUILD") else [extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
