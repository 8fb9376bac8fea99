"""What the benchmark commands share: timing, the device line of a result, printing."""

from __future__ import annotations

import json
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


def device_config(device: torch.device, dtype: torch.dtype, **fields) -> dict:
    """The ``config`` of a result: device, its name, CPU threads, dtype, torch, then ``fields``."""
    return dict(device=str(device),
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                threads=torch.get_num_threads(), dtype=str(dtype).removeprefix("torch."), torch=torch.__version__,
                **fields)


def report(result: dict, format_table: Callable[[dict], str], as_json: bool) -> dict:
    """Print the table; with ``as_json`` the result as one JSON object on the last stdout line."""
    print(format_table(result))
    if as_json:
        print(json.dumps(result))
    return result
