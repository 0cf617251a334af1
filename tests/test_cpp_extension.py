"""Build-cache housekeeping of the lazily built C++ kernels (no compiler needed)."""

import os
import time
from pathlib import Path

import pytest

from qeq_ase.kernels import cpp_extension
from qeq_ase.kernels.cpp_extension import STALE_LOCK_S, build_directory, clear_stale_lock


def test_build_directory_follows_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    directory = build_directory("qeq_edge_attention", ["-O3", "-march=native"])
    assert directory.parent == tmp_path / "qeq_ase" and directory.name.startswith("qeq_edge_attention-")


def test_each_environment_flag_set_and_cpu_builds_in_its_own_directory(monkeypatch):
    """Two environments, two checkouts (or one home folder seen from two CPU kinds) never share a build."""
    here = build_directory("k", ["-march=native"])
    assert build_directory("k", ["-march=native"]) == here
    assert build_directory("k", ["-march=x86-64-v3"]) != here
    monkeypatch.setattr(cpp_extension.sys, "prefix", "/elsewhere/.venv")
    assert build_directory("k", ["-march=native"]) != here
    monkeypatch.undo()
    monkeypatch.setattr(cpp_extension, "cpu_flags", lambda: frozenset({"avx2"}))
    assert build_directory("k", ["-march=native"]) != here
    monkeypatch.undo()
    monkeypatch.setattr(cpp_extension, "CSRC", Path("/another/checkout/qeq_ase/kernels/csrc"))
    assert build_directory("k", ["-march=native"]) != here


def test_a_lock_left_by_an_interrupted_build_is_removed(tmp_path):
    # torch waits for a build lock to disappear with no time limit: a build killed half-way
    # used to hang every later first use of the kernel, silently.
    lock = tmp_path / "lock"
    lock.touch()
    old = time.time() - 2 * STALE_LOCK_S
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="interrupted build"):
        assert clear_stale_lock(tmp_path)
    assert not lock.exists()


def test_a_fresh_lock_is_left_to_the_build_that_holds_it(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    assert not clear_stale_lock(tmp_path)
    assert lock.exists()
    assert not clear_stale_lock(tmp_path / "never_built")
