"""Lazy builds of the project's C++ kernels (``qeq_ase/csrc``) with torch's cpp_extension.

A kernel is compiled on its first use, never at import (30-50 s once, then cached in
``~/.cache/torch_extensions``); a failed build is remembered and reported with what it needs.
"""

from __future__ import annotations

from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"


class LazyExtension:
    """One C++ source file built into a Python module on the first :meth:`load`."""

    def __init__(self, name: str, source: Path, cflags: list[str], what: str, hint: str = ""):
        self.name, self.source, self.cflags, self.what, self.hint = name, Path(source), list(cflags), what, hint
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
            self.module = load(name=self.name, sources=[str(self.source)], extra_cflags=self.cflags, verbose=False)
        except Exception as err:  # no compiler, no ninja, missing headers, missing source, ...
            last = str(err).strip().splitlines()[-1] if str(err).strip() else ""
            self.error = (f"could not build {self.what} from {self.source} ({type(err).__name__}: {last}). "
                          f"They need a C++17 compiler (g++/clang++) and ninja (pip install ninja){self.hint}.")
            raise RuntimeError(self.error) from err
        return self.module
