"""Outputs that are never half-written: a directory is written into a temporary sibling, fsynced
and renamed into place (``atomic_directory``), so a reader (or a resumed run) sees the previous
complete output or the new one, never a mix.

Test hook: ``SINKLORA_TEST_SAVE_PAUSE=SECONDS`` sleeps inside every save window (files written, not
yet renamed into place) after printing a line to stderr, so that a test can kill the process there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["SAVE_PAUSE_ENV", "atomic_directory", "fsync", "fsync_tree", "pause_for_tests"]

SAVE_PAUSE_ENV = "SINKLORA_TEST_SAVE_PAUSE"


def fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            fsync(os.path.join(root, name))
        fsync(root)


def pause_for_tests(path) -> None:
    seconds = float(os.environ.get(SAVE_PAUSE_ENV) or 0)
    if seconds > 0:
        print(f"sinklora: {SAVE_PAUSE_ENV}: pausing {seconds:g} s before {path} is complete", file=sys.stderr,
              flush=True)
        time.sleep(seconds)


@contextlib.contextmanager
def atomic_directory(output: Path):
    """Yields an empty temporary sibling of ``output`` to write into; when the block ends, fsyncs
    it and moves it into place (replacing ``output``); when the block raises, removes it. The
    temporary directories of killed runs are removed first."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in output.parent.glob(output.name + ".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=output.name + ".tmp-", dir=output.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        pause_for_tests(output)
        if output.exists():
            backup = output.with_name(output.name + ".old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(output, backup)
            os.replace(tmp, output)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, output)
        fsync(output.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
