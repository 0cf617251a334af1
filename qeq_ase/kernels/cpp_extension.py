"""Lazy builds of the project's C++ kernels (``qeq_ase/kernels/csrc``) with torch's cpp_extension.

A kernel is compiled on its first use, never at import (30-60 s once, with a one-line
message on stderr), for the CPU target :func:`qeq_ase.kernels.cpu_features.kernel_march` picks, and
cached in a folder of its own per Python environment, torch version, compiler flags, CPU and
source folder (``~/.cache/torch_extensions/qeq_ase/<name>-<key>``): two environments, two
checkouts, or one home folder seen from two kinds of CPU, never rebuild or load each other's
kernels. A failed build is
remembered and reported with what it needs.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import warnings
from pathlib import Path

from .cpu_features import cpu_flags, cpu_model_name, kernel_march

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


def build_key(cflags: list[str]) -> str:
    """12 hex digits that change with the Python environment, torch, the flags, the CPU, the
    source folder and the shared headers."""
    import torch

    headers = [path.read_bytes() for path in sorted(CSRC.glob("*.h"))]  # torch rebuilds on .cpp changes only
    # The source folder is part of torch's build arguments (the include path): two checkouts in
    # one environment sharing a folder would each find the other's build stale and rebuild it.
    parts = [sys.prefix, torch.__version__, " ".join(cflags), cpu_model_name(), " ".join(sorted(cpu_flags())),
             str(CSRC), hashlib.sha256(b"".join(headers)).hexdigest()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def build_directory(name: str, cflags: list[str] = ()) -> Path:
    """Where ``name`` is built: ``$TORCH_EXTENSIONS_DIR`` or torch's cache root, ``/qeq_ase/<name>-<key>``."""
    from torch.utils.cpp_extension import get_default_build_root
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / "qeq_ase" / f"{name}-{build_key(list(cflags))}"


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


#: Every LazyExtension made in this process, in order (see :func:`package_kernels`).
EXTENSIONS: list["LazyExtension"] = []


def package_kernels() -> dict[str, "LazyExtension"]:
    """The package's own kernels (sources in ``qeq_ase/kernels/csrc``) by name, as their modules made them."""
    return {ext.name: ext for ext in EXTENSIONS if ext.source.parent == CSRC}


class LazyExtension:
    """One C++ source file built into a Python module on the first :meth:`load` (``cflags``
    without ``-march``: the target is added from :func:`qeq_ase.kernels.cpu_features.kernel_march`)."""

    def __init__(self, name: str, source: Path, cflags: list[str], what: str, hint: str = "",
                 ldflags: list[str] | None = None):
        self.name, self.source, self.cflags, self.what, self.hint = name, Path(source), list(cflags), what, hint
        self.ldflags = list(ldflags or [])
        self.module = None
        self.error: str | None = None
        EXTENSIONS.append(self)

    def target_cflags(self) -> list[str]:
        """The compiler flags with this CPU's target."""
        return [*self.cflags, f"-march={kernel_march()}"]

    def is_built(self) -> bool:
        """Whether a build for this environment and CPU is in the cache (it may still be stale)."""
        return (build_directory(self.name, self.target_cflags()) / f"{self.name}.so").is_file()

    def status(self) -> str:
        """``"loaded"``, ``"built"`` (cached, not loaded), ``"not built"`` or ``"failed: ..."``."""
        if self.module is not None:
            return "loaded"
        if self.error is not None:
            return f"failed: {self.error}"
        return "built" if self.is_built() else "not built"

    def load(self):
        """The built module; raise RuntimeError (naming the missing tool) if it cannot be built."""
        if self.module is not None:
            return self.module
        if self.error is not None:
            raise RuntimeError(self.error)
        try:
            from torch.utils.cpp_extension import load
            cflags = self.target_cflags()
            directory = build_directory(self.name, cflags)
            directory.mkdir(parents=True, exist_ok=True)
            clear_stale_lock(directory)
            if not self.is_built():
                print(f"qeq-ase: compiling {self.what} for this environment and CPU (once, 30-60 s) in {directory}",
                      file=sys.stderr, flush=True)
            self.module = load(name=self.name, sources=[str(self.source)], extra_cflags=cflags,
                               extra_include_paths=[str(CSRC)],
                               extra_ldflags=self.ldflags, build_directory=str(directory), verbose=False)
        except Exception as err:  # no compiler, no ninja, missing headers, missing source, ...
            last = str(err).strip().splitlines()[-1] if str(err).strip() else ""
            self.error = (f"could not build {self.what} from {self.source} ({type(err).__name__}: {last}). "
                          f"They need a C++17 compiler (g++/clang++) and ninja (pip install ninja){self.hint}.")
            raise RuntimeError(self.error) from err
        return self.module
