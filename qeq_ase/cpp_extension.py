"""Lazy builds of the project's C++ kernels (``qeq_ase/csrc``) with torch's cpp_extension.

A kernel is compiled on its first use, never at import (30-50 s once, then cached in
``~/.cache/torch_extensions/qeq_ase``); a failed build is remembered and reported with what it needs.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"

#: ``at::parallel_for`` (ATen/Parallel.h) is a header template: with torch's OpenMP backend it
#: splits the work over threads only in code compiled with ``-fopenmp``, and otherwise runs the
#: whole range on the calling thread. Linked with ``-fopenmp``, an extension uses the
#: ``libgomp.so.1`` torch has already loaded, so ``torch.set_num_threads`` governs its threads.
OPENMP_FLAGS = ["-fopenmp"]

#: A build lock older than this is left by an interrupted build (a build takes 20-60 s).
#: torch waits for a lock to disappear without a time limit, so such a lock would hang every
#: later first use of the kernel without a word.
STALE_LOCK_S = 600.0


def build_directory(name: str) -> Path:
    """Where ``name`` is built: ``$TORCH_EXTENSIONS_DIR`` or torch's cache root, ``/qeq_ase/<name>``."""
    from torch.utils.cpp_extension import get_default_build_root
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / "qeq_ase" / name


def clear_stale_lock(directory: Path, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove ``directory/lock`` if it is older than ``max_age_s`` (with a warning); True if removed."""
    lock = Path(directory) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < max_age_s:
        return False  # another process may be building right now: torch waits for it
    warnings.warn(f"removing {lock}, a build lock {age / 60:.0f} min old left by an interrupted build",
                  RuntimeWarning, stacklevel=3)
    lock.unlink(missing_ok=True)
    return True


class LazyExtension:
    """One C++ source file built into a Python module on the first :meth:`load`."""

    def __init__(self, name: str, source: Path, cflags: list[str], what: str, hint: str = "",
                 ldflags: list[str] | None = None):
        self.name, self.source, self.cflags, self.what, self.hint = name, Path(source), list(cflags), what, hint
        self.ldflags = list(ldflags or [])
        self.module = None
        self.error: str | None = None

    def load(self):
        """The built module; raise RuntimeError (naming the missing tool) if it cannot be built."""
        if self.module is not None:
            return self.module
        if self.error is not None:
            raise RuntimeError(self.error)
        try:
            from torch.utils.cpp_extension import load
            directory = build_directory(self.name)
            directory.mkdir(parents=True, exist_ok=True)
            clear_stale_lock(directory)
            self.module = load(name=self.name, sources=[str(self.source)], extra_cflags=self.cflags,
                               extra_ldflags=self.ldflags, build_directory=str(directory), verbose=False)
        except Exception as err:  # no compiler, no ninja, missing headers, missing source, ...
            last = str(err).strip().splitlines()[-1] if str(err).strip() else ""
            self.error = (f"could not build {self.what} from {self.source} ({type(err).__name__}: {last}). "
                          f"They need a C++17 compiler (g++/clang++) and ninja (pip install ninja){self.hint}.")
            raise RuntimeError(self.error) from err
        return self.module
