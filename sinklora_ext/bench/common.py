"""What the benchmark commands share: timing and the device line of a result. Each benchmark is a
module of this package with a config dataclass (its flags), ``run(config) -> dict`` and
``format_table(result) -> str``; ``sinklora bench TARGET`` and ``python -m sinklora_ext.bench.TARGET``
print the table and, with ``--json``, the result (sinklora_ext.cli)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def time_fn(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds per call (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def forward_closures(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     dout: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(fwd, fwdbwd)`` to time ``fn(q, k, v)``: the forward without grad, and the forward plus
    the backward of ``dout`` through leaf copies of the inputs."""
    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))

    def fwdbwd():
        fn(qg, kg, vg).backward(dout)

    return fwd, fwdbwd


def device_config(device: torch.device, dtype: torch.dtype, **fields) -> dict:
    """The ``config`` of a result: device, its name, CPU threads, dtype, torch, then ``fields``."""
    return dict(device=str(device),
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                threads=torch.get_num_threads(), dtype=str(dtype).removeprefix("torch."), torch=torch.__version__,
                **fields)
