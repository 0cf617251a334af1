"""Saving and loading potentials: one versioned, ``weights_only``-safe file format.

A potential file is a ``torch.save`` of a plain dict (tensors, numbers, strings, lists)::

    {"format": "qeq-ase-potential", "format_version": 1,
     "precision": "fp32",                     # or "int8" (quantized export)
     "model_config": {...},                   # ModelConfig.to_dict()
     "state_dict": {...},                     # weights (EMA weights for trained models)
     "metadata": {"units": {...}, "species": [...], "cutoff": 5.0,
                  "training_data": {...}, "test_errors": {...}, ...}}

It loads with ``torch.load(weights_only=True)``: no pickled classes, no code execution.
Bump ``FORMAT_VERSION`` when the layout of this dict or the meaning of a key changes,
and teach :func:`load_potential_file` to read the old layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .model import ModelConfig, QEqModel

FORMAT_NAME = "qeq-ase-potential"
FORMAT_VERSION = 1
UNITS = {"energy": "eV", "forces": "eV/Angstrom", "length": "Angstrom"}


class PotentialFileError(ValueError):
    """A potential file is missing, corrupt or incompatible with this version of qeq-ase."""


def save_potential(path: str | os.PathLike, model: QEqModel, metadata: dict, precision: str = "fp32",
                   state_dict: dict | None = None) -> Path:
    """Write ``model`` (or an explicit ``state_dict``) with its metadata; atomic on POSIX."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"units": dict(UNITS), "species": list(model.config.species), "cutoff": model.config.cutoff}
    meta.update(metadata)
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "precision": precision,
        "model_config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in (state_dict or model.state_dict()).items()},
        "metadata": meta,
    }
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_potential_file(path: str | os.PathLike) -> dict:
    """Load and validate the raw dict of a potential file (no model is built)."""
    path = Path(path)
    if not path.is_file():
        raise PotentialFileError(f"potential file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated/garbage files
        raise PotentialFileError(f"{path} is corrupt or not a qeq-ase potential ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise PotentialFileError(f"{path} is not a qeq-ase potential file (no '{FORMAT_NAME}' header)")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise PotentialFileError(
            f"{path} has format version {version}; this qeq-ase reads version {FORMAT_VERSION}: "
            "upgrade qeq-ase or re-export the potential"
        )
    for key in ("precision", "model_config", "state_dict", "metadata"):
        if key not in payload:
            raise PotentialFileError(f"{path} is incomplete: missing '{key}'")
    return payload


def load_potential_file(path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> tuple[QEqModel, dict]:
    """Build the model stored in a float potential file; returns ``(model, metadata)``."""
    payload = read_potential_file(path)
    if payload["precision"] != "fp32":
        raise PotentialFileError(f"{path} holds a {payload['precision']} potential; load it with the INT8 loader")
    try:
        with torch.random.fork_rng(devices=[]):  # the random initial weights must not touch the global RNG
            model = QEqModel(ModelConfig.from_dict(payload["model_config"]))
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, ValueError, TypeError) as err:
        raise PotentialFileError(f"{path} does not match this qeq-ase model ({err})") from err
    model = model.to(device=device, dtype=dtype)  # reference energies stay float64 (QEqModel._apply)
    model.eval()
    return model, payload["metadata"]
