"""HDF5 MD trajectories: append-only, flushed in blocks, safe to resume.

Layout of a file written by :class:`TrajectoryWriter` (units in each dataset's ``unit``
attribute; ``F`` frames, ``N`` atoms)::

    /step               [F]        int64   MD step of the frame (0 = start structure)
    /time               [F]        float64 fs
    /positions          [F, N, 3]  float64 Å
    /velocities         [F, N, 3]  float64 Å/fs
    /forces             [F, N, 3]  float64 eV/Å (unconstrained model forces)
    /potential_energy   [F]        float64 eV
    /kinetic_energy     [F]        float64 eV
    /total_energy       [F]        float64 eV
    /temperature        [F]        float64 K
    /numbers            [N]        int64   atomic numbers
    /masses             [N]        float64 amu
    /cell               [3, 3]     float64 Å
    attrs: format, format_version, pbc, n_frames, rng_state (JSON) and the run settings

Frame datasets are chunked and resizable along the first axis. ``n_frames`` is written
after the data of a block and the file is flushed, so after a crash between blocks the
file holds exactly ``n_frames`` complete frames; :func:`open_for_resume` cuts any longer
dataset back to it. A crash during the (millisecond) write of a block itself can still
damage an HDF5 file. Ctrl-C (and SIGTERM under ``qeq-md``) stops :func:`qeq_ase.md.run_md`
after it has written the pending frames, so nothing is lost.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

FORMAT_NAME = "qeq-ase-md"
#: Bump when a dataset or attribute changes name, shape or meaning.
FORMAT_VERSION = 1

#: Per-frame datasets: name -> (trailing shape with "N" for atoms, dtype, unit).
FRAME_FIELDS = {
    "step": ((), np.int64, "1"),
    "time": ((), np.float64, "fs"),
    "positions": (("N", 3), np.float64, "Angstrom"),
    "velocities": (("N", 3), np.float64, "Angstrom/fs"),
    "forces": (("N", 3), np.float64, "eV/Angstrom"),
    "potential_energy": ((), np.float64, "eV"),
    "kinetic_energy": ((), np.float64, "eV"),
    "total_energy": ((), np.float64, "eV"),
    "temperature": ((), np.float64, "K"),
}


class TrajectoryError(ValueError):
    """An MD trajectory file is missing, not ours, or inconsistent with the requested run."""


def _open(path: str | os.PathLike, mode: str) -> h5py.File:
    """``h5py.File``, with a missing, truncated or non-HDF5 file as one-line :class:`TrajectoryError`."""
    if not Path(path).is_file():
        raise TrajectoryError(f"trajectory file not found: {path}")
    try:
        return h5py.File(path, mode)
    except OSError as err:
        raise TrajectoryError(f"{path} is not a readable HDF5 trajectory (truncated or corrupt?): "
                              f"{' '.join(str(err).split())}") from err


def _shape(spec: tuple, n_atoms: int) -> tuple[int, ...]:
    return tuple(n_atoms if d == "N" else d for d in spec)


class TrajectoryWriter:
    """Buffer frames in memory and append them to an HDF5 file every ``flush_every`` frames.

    Use :meth:`create` for a new file and :meth:`append_to` to continue one. Each call of
    :meth:`add` may carry ``extra_attrs`` (e.g. the RNG state after that frame); the ones of
    the last frame of a block are written together with the block.
    """

    def __init__(self, h5: h5py.File, flush_every: int):
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.h5 = h5
        self.flush_every = flush_every
        self.n_atoms = int(h5["numbers"].shape[0])
        self._buffer: list[dict] = []
        self._attrs: dict = {}

    @classmethod
    def create(cls, path: str | os.PathLike, numbers: np.ndarray, masses: np.ndarray, cell: np.ndarray,
               pbc: np.ndarray, settings: dict, flush_every: int) -> "TrajectoryWriter":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        h5 = h5py.File(path, "w")
        h5.attrs["format"] = FORMAT_NAME
        h5.attrs["format_version"] = FORMAT_VERSION
        h5.attrs["pbc"] = np.asarray(pbc, dtype=bool)
        h5.attrs["n_frames"] = 0
        for key, value in settings.items():
            h5.attrs[key] = value
        n = len(numbers)
        h5.create_dataset("numbers", data=np.asarray(numbers, dtype=np.int64))
        h5.create_dataset("masses", data=np.asarray(masses, dtype=np.float64)).attrs["unit"] = "amu"
        h5.create_dataset("cell", data=np.asarray(cell, dtype=np.float64)).attrs["unit"] = "Angstrom"
        for name, (spec, dtype, unit) in FRAME_FIELDS.items():
            shape = _shape(spec, n)
            chunk_frames = max(1, min(1024, (1 << 16) // max(1, int(np.prod(shape)) * 8)))
            ds = h5.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                                   chunks=(chunk_frames, *shape))
            ds.attrs["unit"] = unit
        h5.flush()
        return cls(h5, flush_every)

    @classmethod
    def append_to(cls, path: str | os.PathLike, flush_every: int) -> "TrajectoryWriter":
        """Open an existing trajectory for appending, cut back to its last complete frame."""
        h5 = _open(path, "r+")
        try:
            _check_format(h5, path)
            n_frames = int(h5.attrs["n_frames"])
            for name in FRAME_FIELDS:
                if h5[name].shape[0] != n_frames:
                    h5[name].resize(n_frames, axis=0)
        except (OSError, KeyError) as err:
            h5.close()
            raise TrajectoryError(f"{path} is damaged ({type(err).__name__}: {' '.join(str(err).split())})") from err
        except Exception:
            h5.close()
            raise
        return cls(h5, flush_every)

    def add(self, frame: dict, extra_attrs: dict | None = None) -> None:
        """Queue one frame (keys of :data:`FRAME_FIELDS`); write the block when it is full."""
        self._buffer.append(frame)
        if extra_attrs:
            self._attrs = dict(extra_attrs)
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Append the queued frames, then update ``n_frames`` and flush the file to disk."""
        if not self._buffer:
            return
        start = int(self.h5.attrs["n_frames"])
        stop = start + len(self._buffer)
        for name in FRAME_FIELDS:
            ds = self.h5[name]
            ds.resize(stop, axis=0)
            ds[start:stop] = np.stack([np.asarray(frame[name]) for frame in self._buffer])
        for key, value in self._attrs.items():
            self.h5.attrs[key] = value
        self.h5.attrs["n_frames"] = stop
        self.h5.flush()
        self._buffer.clear()

    @property
    def n_frames(self) -> int:
        """Frames on disk plus frames queued."""
        return int(self.h5.attrs["n_frames"]) + len(self._buffer)

    def close(self) -> None:
        if self.h5.id.valid:
            self.flush()
            self.h5.close()

    def __enter__(self) -> "TrajectoryWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_format(h5: h5py.File, path) -> None:
    if h5.attrs.get("format") != FORMAT_NAME:
        raise TrajectoryError(f"{path} is not a qeq-ase MD trajectory (no '{FORMAT_NAME}' header)")
    if h5.attrs.get("format_version") != FORMAT_VERSION:
        raise TrajectoryError(f"{path} has trajectory format version {h5.attrs.get('format_version')}; "
                              f"this qeq-ase reads version {FORMAT_VERSION}")


def read_trajectory(path: str | os.PathLike, fields: tuple[str, ...] | None = None) -> dict:
    """All complete frames and the attributes of a trajectory file, as numpy arrays.

    Returns a dict with the frame datasets (``fields``, default all), ``numbers``,
    ``masses``, ``cell`` and ``attrs`` (a plain dict; ``rng_state`` decoded from JSON).
    """
    path = Path(path)
    with _open(path, "r") as h5:
        _check_format(h5, path)
        try:
            n = int(h5.attrs["n_frames"])
            out = {name: h5[name][:n] for name in (fields or FRAME_FIELDS)}
            for name in ("numbers", "masses", "cell"):
                out[name] = h5[name][()]
            attrs = {key: (value.item() if isinstance(value, np.generic) else value)
                     for key, value in h5.attrs.items()}
        except (OSError, KeyError) as err:
            raise TrajectoryError(f"{path} is damaged ({type(err).__name__}: {' '.join(str(err).split())})") from err
    if "rng_state" in attrs:
        attrs["rng_state"] = json.loads(attrs["rng_state"])
    out["attrs"] = attrs
    return out


def trajectory_to_atoms(path: str | os.PathLike, every: int = 1) -> list:
    """Frames of a trajectory as ASE Atoms carrying energy, forces and velocities."""
    from ase import Atoms, units
    from ase.calculators.singlepoint import SinglePointCalculator

    data = read_trajectory(path)
    attrs = data["attrs"]
    images = []
    for k in range(0, len(data["step"]), every):
        atoms = Atoms(numbers=data["numbers"], positions=data["positions"][k], cell=data["cell"],
                      pbc=attrs["pbc"], masses=data["masses"])
        atoms.set_velocities(data["velocities"][k] / units.fs)  # Å/fs -> ASE velocity units
        atoms.info.update(step=int(data["step"][k]), time_fs=float(data["time"][k]),
                          temperature_K=float(data["temperature"][k]))
        atoms.calc = SinglePointCalculator(atoms, energy=float(data["potential_energy"][k]),
                                           forces=data["forces"][k])
        images.append(atoms)
    return images


def convert_trajectory(path: str | os.PathLike, out_path: str | os.PathLike, every: int = 1,
                       format: str | None = None) -> int:
    """Write the frames of an HDF5 trajectory to any ASE format (extxyz, traj, ...); returns the count."""
    from ase.io import write

    images = trajectory_to_atoms(path, every)
    write(str(out_path), images, format=format)
    return len(images)
