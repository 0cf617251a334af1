"""MD trajectories in H5MD 1.1: appended in blocks, readable while written, safe to resume.

Layout of a file written by :class:`~qeq_ase.md.trajectory_writer.TrajectoryWriter` (``F`` frames,
``N`` atoms; the ``unit`` attributes are spelled as MDAnalysis's H5MD reader reads them)::

    /                                  attrs: format, format_version, pbc, cell [3, 3] Å, steps,
                                              the run settings and the model identity
    /h5md                              attrs: version [1, 1]
    /h5md/author                       attrs: name (login name of the user)
    /h5md/creator                      attrs: name "qeq-ase", version
    /particles/all/position/value      [F, N, 3] float64  Angstrom
    /particles/all/position/step       [F]       int64    MD step of the frame (0 = start structure)
    /particles/all/position/time       [F]       float64  fs
    /particles/all/velocity/value      [F, N, 3] float64  Angstrom fs-1
    /particles/all/force/value         [F, N, 3] float64  kJ mol-1 Angstrom-1 (unconstrained model forces)
    /particles/all/species             [N]       int64    atomic numbers
    /particles/all/mass                [N]       float64  u
    /particles/all/box                 attrs: dimension 3, boundary ("periodic" or "none" per axis)
    /particles/all/box/edges/value     [F, 3, 3] float64  Angstrom, cell vectors as rows (periodic cells only)
    /observables/potential_energy/value, kinetic_energy/value, total_energy/value  [F] float64  eV
    /observables/temperature/value     [F]       float64  K
    /parameters/n_frames               []        int64    complete frames
    /parameters/rng_state              []        string   JSON state of the run's numpy Generator after them
    /parameters/integrator_state       []        string   JSON state the integrator keeps besides positions and
                                                          velocities after them (e.g. the Nose-Hoover chain)

Every other ``step`` and ``time`` is a hard link to those of ``position``. A file without
``integrator_state`` resumes with integrators that keep no state of their own (Langevin, NVE);
:meth:`~qeq_ase.md.trajectory_writer.TrajectoryWriter.append_to` adds the dataset. Forces are
stored in kJ/(mol·Å) because MDAnalysis reads no eV-based force unit; :func:`read_trajectory`
returns them, like everything else, in ASE units (eV/Å).

A block of frames is written and flushed before ``n_frames`` counts it, so after a crash
the file holds exactly ``n_frames`` complete frames (longer datasets are cut back on
resume). Files are written in HDF5's single-writer/multiple-reader mode (SWMR), so
``h5py.File(path, "r", swmr=True)`` and :func:`read_trajectory` read a file while qeq-md
still writes it; a plain ``h5py.File(path, "r")`` is refused until the writer closes it.
A writer killed without closing leaves the file marked as open; HDF5 then opens it only
for SWMR reading, and :meth:`~qeq_ase.md.trajectory_writer.TrajectoryWriter.append_to`
(``--resume``) first rewrites its complete frames to a fresh file. Ctrl-C (and SIGTERM under ``qeq-md``) stop
:func:`qeq_ase.md.driver.run_md` after it has written the pending frames.

Files of the earlier root-level layout (``format_version`` 1, :mod:`qeq_ase.md.trajectory_v1`)
are read by :func:`read_trajectory`; ``qeq-md convert old.h5 new.h5`` rewrites them in this one.

This module holds the layout and the reader; :mod:`qeq_ase.md.trajectory_writer` writes, appends
and converts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from ase import units

from .trajectory_v1 import read_v1

FORMAT_NAME = "qeq-ase-md"
#: Bump when a dataset or attribute changes name, shape or meaning.
FORMAT_VERSION = 2
H5MD_VERSION = (1, 1)
#: HDF5 object formats: v110 is the oldest with SWMR, and the files open with any HDF5 >= 1.10.
LIBVER = ("v110", "v110")
#: eV -> kJ/mol.
KJ_PER_MOL_PER_EV = units.mol / units.kJ
#: JSON strings stored in ``/parameters`` with each block of frames: name -> fixed length in bytes.
BLOCK_STATES = {"rng_state": 4096, "integrator_state": 16384}
#: Suffixes for which :func:`~qeq_ase.md.trajectory_writer.convert_trajectory` writes this layout rather
#: than an ASE format.
H5MD_SUFFIXES = (".h5", ".hdf5", ".h5md")
#: Root attributes that the writer itself keeps; the others are run settings.
_BOOKKEEPING = ("format", "format_version", "n_frames", *BLOCK_STATES, "pbc", "cell")


@dataclass(frozen=True)
class Field:
    """Where a per-frame quantity lives in the file; the file holds ``scale`` times the ASE value."""

    path: str
    shape: tuple
    dtype: type
    unit: str | None
    scale: float = 1.0


#: Per-frame quantities as :func:`read_trajectory` returns them ("N": the number of atoms).
FRAME_FIELDS = {
    "step": Field("particles/all/position/step", (), np.int64, None),
    "time": Field("particles/all/position/time", (), np.float64, "fs"),
    "positions": Field("particles/all/position/value", ("N", 3), np.float64, "Angstrom"),
    "velocities": Field("particles/all/velocity/value", ("N", 3), np.float64, "Angstrom fs-1"),
    "forces": Field("particles/all/force/value", ("N", 3), np.float64, "kJ mol-1 Angstrom-1", KJ_PER_MOL_PER_EV),
    "potential_energy": Field("observables/potential_energy/value", (), np.float64, "eV"),
    "kinetic_energy": Field("observables/kinetic_energy/value", (), np.float64, "eV"),
    "total_energy": Field("observables/total_energy/value", (), np.float64, "eV"),
    "temperature": Field("observables/temperature/value", (), np.float64, "K"),
}
CLOCK = "particles/all/position"
EDGES = "particles/all/box/edges"


class TrajectoryError(ValueError):
    """An MD trajectory file is missing, not ours, or inconsistent with the requested run."""


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _open_read(path: Path) -> h5py.File:
    """The file opened for reading; in SWMR mode if a writer has it open (or was killed before closing it).

    SWMR mode is not the default because an SWMR reader retries failed metadata reads for
    minutes, which is what a truncated file gives.
    """
    if not path.is_file():
        raise TrajectoryError(f"trajectory file not found: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        error = err
    if "already open for write" in str(error):
        try:
            return h5py.File(path, "r", swmr=True)
        except OSError as err:
            error = err
    if "unable to lock file" in str(error):
        raise TrajectoryError(f"{path} is being created by another process; try again in a moment") from error
    raise TrajectoryError(f"{path} is not a readable HDF5 trajectory (truncated or corrupt?): "
                          f"{_one_line(error)}") from error


def _check_format(h5: h5py.File, path) -> int:
    """The layout version of a qeq-md file (1 or 2); TrajectoryError for any other file."""
    if h5.attrs.get("format") != FORMAT_NAME:
        raise TrajectoryError(f"{path} is not a qeq-ase MD trajectory (no '{FORMAT_NAME}' header)")
    version = h5.attrs.get("format_version")
    if version not in (1, FORMAT_VERSION):
        raise TrajectoryError(f"{path} has trajectory format version {version}; "
                              f"this qeq-ase reads versions 1 and {FORMAT_VERSION}")
    return int(version)


def read_trajectory(path: str | os.PathLike, fields: tuple[str, ...] | None = None) -> dict:
    """All complete frames and the attributes of a trajectory file (either layout), in ASE units.

    Returns a dict with the frame arrays (``fields``, default all of :data:`FRAME_FIELDS`),
    ``numbers``, ``masses``, ``cell`` and ``attrs`` (a plain dict of the root attributes plus
    ``n_frames``, ``rng_state`` and ``integrator_state``, decoded from JSON; the states only
    where the file holds them). A file that qeq-md is still writing is opened in SWMR mode:
    the frames written so far.
    """
    path = Path(path)
    fields = tuple(fields or FRAME_FIELDS)
    with _open_read(path) as h5:
        version = _check_format(h5, path)
        try:
            out = read_v1(h5, fields) if version == 1 else _read_v2(h5, fields)
        except (OSError, KeyError) as err:
            raise TrajectoryError(f"{path} is damaged ({type(err).__name__}: {_one_line(err)})") from err
    attrs = {key: (value.item() if isinstance(value, np.generic) else value) for key, value in out["attrs"].items()}
    for name in BLOCK_STATES:
        if attrs.get(name):
            attrs[name] = json.loads(attrs[name])
        else:
            attrs.pop(name, None)
    out["attrs"] = attrs
    return out


def _read_v2(h5: h5py.File, fields: tuple[str, ...]) -> dict:
    n = int(h5["parameters/n_frames"][()])
    out = {}
    for name in fields:
        field = FRAME_FIELDS[name]
        values = h5[field.path][:n]
        if len(values) < n:
            raise KeyError(f"{field.path} holds {len(values)} of {n} frames")
        out[name] = values / field.scale if field.scale != 1.0 else values
    out["numbers"] = h5["particles/all/species"][()]
    out["masses"] = h5["particles/all/mass"][()]
    out["cell"] = np.asarray(h5.attrs["cell"], dtype=np.float64)
    attrs = dict(h5.attrs)
    attrs["n_frames"] = n
    for name in BLOCK_STATES:
        if name in h5["parameters"]:
            attrs[name] = h5["parameters"][name][()].decode()
    out["attrs"] = attrs
    return out


def trajectory_to_atoms(path: str | os.PathLike, every: int = 1) -> list:
    """Frames of a trajectory as ASE Atoms carrying energy, forces and velocities."""
    from ase import Atoms
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
