"""Opt-in glibc malloc setting that removes page-fault time from large energy + forces calls.

glibc serves every allocation above ``M_MMAP_THRESHOLD`` (at most 32 MB by default) with a
fresh ``mmap`` and returns it to the system on free, so each call of the model faults in
the pages of its large per-edge tensors again. ``experiments/system_time.py`` (64 aspirin
copies, 1 thread): 135-153 ms of system time per call with the whole graph as one block,
38-78 ms with the edge blocks, 2-3 ms with this setting; large systems (~10,000 atoms)
allocate per-edge tensors far above 32 MB even in blocks (``docs/speed.md``). Serving those from the heap
and keeping freed memory for the next call removes that time; the price is that the
process keeps its peak memory instead of giving it back.

This is process-wide state, so the library never sets it on import or in the calculator;
the qeq-ase commands (``qeq-md``, ``qeq-check``, ``qeq-eval``, ``qeq-report``) and the
benchmarks call :func:`keep_large_allocations` for their own process, and a Python user
may call it once at the start of a script.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_large_allocations(threshold_bytes: int = 1 << 30) -> bool:
    """Serve blocks up to ``threshold_bytes`` from the heap and keep freed memory.

    Returns True if glibc accepted the setting, False elsewhere (musl, macOS, Windows),
    where nothing changes.
    """
    if threshold_bytes <= 0:
        raise ValueError(f"threshold_bytes must be positive, got {threshold_bytes}")
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    threshold = min(int(threshold_bytes), 2**31 - 1)
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold))
