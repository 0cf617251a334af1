"""Shared fixtures: a tiny random potential file and aspirin frames from rMD17."""

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms

from qeq_ase.io.checkpoint import save_potential
from qeq_ase.model.network import QEqModel
from qeq_ase.testing import tiny_model

RMD17_DIR = Path(__file__).resolve().parents[2] / "shared" / "rmd17"

def build_tiny_model(seed: int = 0) -> QEqModel:
    """A small random float32 model for H, C, O, with the architecture of the shipped potentials."""
    return tiny_model(torch.float32, seed, neighbor_embedding=True)


@pytest.fixture(scope="session")
def tiny_potential_path(tmp_path_factory) -> Path:
    """Path of a saved tiny random potential (float32 weights, format of ``save_potential``)."""
    path = tmp_path_factory.mktemp("potentials") / "tiny.pt"
    return save_potential(path, build_tiny_model(), {"description": "tiny random test potential"})


@pytest.fixture(scope="session")
def rmd17_dir() -> Path:
    if not (RMD17_DIR / "rmd17_aspirin_test_01.npz").is_file():
        pytest.skip(f"rMD17 data not found at {RMD17_DIR}")
    return RMD17_DIR


@pytest.fixture(scope="session")
def aspirin_frames(rmd17_dir):
    """First aspirin test frames of rMD17 split 01 (eV, Å)."""
    from qeq_ase.data.dataset import load_rmd17

    frames = load_rmd17(rmd17_dir / "rmd17_aspirin_test_01.npz")
    return frames.subset(np.arange(4))


@pytest.fixture
def aspirin(aspirin_frames) -> Atoms:
    """A fresh ASE Atoms of aspirin (frame 0), non-periodic."""
    return Atoms(numbers=aspirin_frames.numbers, positions=aspirin_frames.positions[0])


@pytest.fixture(autouse=True, scope="session")
def _private_data_cache(tmp_path_factory):
    """Tests write their HDF5 data caches to a temporary folder, not to ~/.cache."""
    import os

    previous = os.environ.get("QEQ_CACHE_DIR")
    os.environ["QEQ_CACHE_DIR"] = str(tmp_path_factory.mktemp("qeq_cache"))
    yield
    if previous is None:
        os.environ.pop("QEQ_CACHE_DIR", None)
    else:
        os.environ["QEQ_CACHE_DIR"] = previous


@pytest.fixture
def processes():
    """Processes a test starts; all are stopped at its end, whether it passed or not."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.terminate()
    for process in started:
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
