"""Named, shipped potentials: ``load_model("aspirin_fp32")`` or a path to a potential file."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch

from ..model.network import QEqModel
from .checkpoint import PotentialFileError, load_potential_file, read_potential_file

POTENTIAL_SUFFIX = ".pt"


def potentials_dir() -> Path:
    """Folder of the shipped potential files.

    Installed (``pip install .``), ``potentials/`` is the package data ``qeq_ase.potentials``;
    in a source checkout used without installing, it is ``<checkout>/potentials``.
    """
    try:
        return Path(str(resources.files("qeq_ase.potentials")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "potentials"


def shipped_names() -> list[str]:
    """Names of the potentials shipped with this installation, e.g. ``["aspirin_fp32"]``."""
    return sorted(p.stem for p in potentials_dir().glob(f"*{POTENTIAL_SUFFIX}"))


def resolve_potential(name_or_path: str | os.PathLike) -> Path:
    """Path of a shipped potential name, or the given path if it is one."""
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    if candidate.suffix == POTENTIAL_SUFFIX or os.sep in text or candidate.exists():
        if not candidate.is_file():
            raise PotentialFileError(f"potential file not found: {candidate}")
        return candidate
    path = potentials_dir() / f"{text}{POTENTIAL_SUFFIX}"
    if not path.is_file():
        known = ", ".join(shipped_names()) or "none"
        raise ValueError(f"unknown potential {text!r}; shipped potentials: {known} (or pass a path to a .pt file)")
    return path


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[QEqModel, dict]:
    """Load a shipped potential by name, or a potential file by path: ``(model, metadata)``."""
    return load_potential_file(resolve_potential(name_or_path), device=device, dtype=dtype)


def list_potentials() -> list[dict]:
    """Shipped potentials with their metadata (species, cutoff, precision, test errors, size)."""
    rows = []
    for name in shipped_names():
        path = potentials_dir() / f"{name}{POTENTIAL_SUFFIX}"
        payload = read_potential_file(path)
        meta = payload["metadata"]
        rows.append({
            "name": name, "precision": payload["precision"], "species": meta.get("species"),
            "cutoff": meta.get("cutoff"), "test_errors": meta.get("test_errors"),
            "num_parameters": meta.get("num_parameters"), "size_bytes": path.stat().st_size, "path": str(path),
        })
    return rows
