"""MD trajectories in H5MD 1.1: appended in blocks, readable while written, safe to resume.

Layout of a file written by :class:`TrajectoryWriter` (``F`` frames, ``N`` atoms; the
``unit`` attributes are spelled as MDAnalysis's H5MD reader reads them)::

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

Every other ``step`` and ``time`` is a hard link to those of ``position``. Forces are stored
in kJ/(mol·Å) because MDAnalysis reads no eV-based force unit; :func:`read_trajectory`
returns them, like everything else, in ASE units (eV/Å).

A block of frames is written and flushed before ``n_frames`` counts it, so after a crash
the file holds exactly ``n_frames`` complete frames (longer datasets are cut back on
resume). Files are written in HDF5's single-writer/multiple-reader mode (SWMR), so
``h5py.File(path, "r", swmr=True)`` and :func:`read_trajectory` read a file while qeq-md
still writes it; a plain ``h5py.File(path, "r")`` is refused until the writer closes it.
A writer killed without closing leaves the file marked as open; HDF5 then opens it only
for SWMR reading, and :meth:`TrajectoryWriter.append_to` (``--resume``) first rewrites its
complete frames to a fresh file. Ctrl-C (and SIGTERM under ``qeq-md``) stop
:func:`qeq_ase.md.run_md` after it has written the pending frames.

Files of the earlier root-level layout (``format_version`` 1, :mod:`qeq_ase.md_trajectory_v1`)
are read by :func:`read_trajectory`; ``qeq-md convert old.h5 new.h5`` rewrites them in this one.
"""

from __future__ import annotations

import getpass
import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from ase import units

from .md_trajectory_v1 import read_v1

try:
    import fcntl
except ImportError:  # not POSIX: no check for a writer that is still running
    fcntl = None

FORMAT_NAME = "qeq-ase-md"
#: Bump when a dataset or attribute changes name, shape or meaning.
FORMAT_VERSION = 2
H5MD_VERSION = (1, 1)
#: HDF5 object formats: v110 is the oldest with SWMR, and the files open with any HDF5 >= 1.10.
LIBVER = ("v110", "v110")
#: eV -> kJ/mol.
KJ_PER_MOL_PER_EV = units.mol / units.kJ
RNG_STATE_BYTES = 4096
#: Suffixes for which :func:`convert_trajectory` writes this layout rather than an ASE format.
H5MD_SUFFIXES = (".h5", ".hdf5", ".h5md")
#: Root attributes that the writer itself keeps; the others are run settings.
_BOOKKEEPING = ("format", "format_version", "n_frames", "rng_state", "pbc", "cell")


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


def _frame_shape(spec: tuple, n_atoms: int) -> tuple[int, ...]:
    return tuple(n_atoms if d == "N" else d for d in spec)


def _frame_dataset(group: h5py.Group, name: str, shape: tuple, dtype, unit: str | None) -> h5py.Dataset:
    """An empty dataset that grows along its first axis, chunked to about 64 KB."""
    chunk_frames = max(1, min(1024, (1 << 16) // max(1, int(np.prod(shape)) * 8)))
    ds = group.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                              chunks=(chunk_frames, *shape))
    if unit is not None:
        _set_unit(ds, unit)
    return ds


def _set_unit(obj, unit: str) -> None:
    obj.attrs.create("unit", unit, dtype=h5py.string_dtype("ascii"))


def _fixed_string(text: str) -> np.bytes_:
    """H5MD wants fixed-length strings for its metadata attributes."""
    return np.bytes_(text.encode())


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _write_layout(h5: h5py.File, numbers, masses, cell, pbc, settings: dict, author: str | None) -> None:
    from . import __version__

    n_atoms = len(numbers)
    pbc = np.asarray(pbc, dtype=bool)
    h5.attrs["format"] = FORMAT_NAME
    h5.attrs["format_version"] = FORMAT_VERSION
    h5.attrs["pbc"] = pbc
    h5.attrs["cell"] = np.asarray(cell, dtype=np.float64)
    for key, value in settings.items():
        h5.attrs[key] = value
    meta = h5.create_group("h5md")
    meta.attrs["version"] = np.array(H5MD_VERSION, dtype=np.int32)
    meta.create_group("author").attrs["name"] = _fixed_string(author or _login_name())
    creator = meta.create_group("creator")
    creator.attrs["name"] = _fixed_string("qeq-ase")
    creator.attrs["version"] = _fixed_string(__version__)

    particles = h5.create_group("particles/all")
    clock = h5.create_group(CLOCK)
    _frame_dataset(clock, "step", (), np.int64, None)
    _frame_dataset(clock, "time", (), np.float64, FRAME_FIELDS["time"].unit)
    for name, field in FRAME_FIELDS.items():
        group_path, leaf = field.path.rsplit("/", 1)
        if leaf == "value":
            _time_dependent(h5, group_path, _frame_shape(field.shape, n_atoms), field.dtype, field.unit)
    particles.create_dataset("species", data=np.asarray(numbers, dtype=np.int64))
    _set_unit(particles.create_dataset("mass", data=np.asarray(masses, dtype=np.float64)), "u")
    box = particles.create_group("box")
    box.attrs["dimension"] = np.int32(3)
    box.attrs["boundary"] = np.array([b"periodic" if p else b"none" for p in pbc], dtype="S8")
    if pbc.any():
        _time_dependent(h5, EDGES, (3, 3), np.float64, "Angstrom")

    parameters = h5.create_group("parameters")
    parameters.create_dataset("n_frames", data=np.int64(0))
    parameters.create_dataset("rng_state", data=np.bytes_(b""), dtype=f"S{RNG_STATE_BYTES}")


def _time_dependent(h5: h5py.File, path: str, shape: tuple, dtype, unit: str) -> None:
    """An H5MD time-dependent element whose ``step`` and ``time`` are those of :data:`CLOCK`."""
    group = h5.require_group(path)
    _frame_dataset(group, "value", shape, dtype, unit)
    if path != CLOCK:
        group["step"] = h5[f"{CLOCK}/step"]
        group["time"] = h5[f"{CLOCK}/time"]


def _growing_datasets(h5: h5py.File) -> list[h5py.Dataset]:
    """Every dataset with a frame axis, each once (``step`` and ``time`` are shared)."""
    paths = [field.path for field in FRAME_FIELDS.values()]
    if EDGES in h5:
        paths.append(f"{EDGES}/value")
    return [h5[path] for path in paths]


class TrajectoryWriter:
    """Buffer frames in memory and append them to a trajectory file every ``flush_every`` frames.

    Use :meth:`create` for a new file and :meth:`append_to` to continue one. ``rng_state``
    given to :meth:`add` is stored with the block that ends at that frame. While the writer is
    open it holds a shared ``flock`` on the file, by which :meth:`append_to` tells a running
    writer from a killed one.
    """

    def __init__(self, h5: h5py.File, flush_every: int):
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.h5 = h5
        self.flush_every = flush_every
        self.n_atoms = int(h5["particles/all/species"].shape[0])
        self._cell = np.asarray(h5.attrs["cell"], dtype=np.float64)
        self._n_on_disk = int(h5["parameters/n_frames"][()])
        self._buffer: list[dict] = []
        self._rng_state: str | None = None
        h5.swmr_mode = True  # from here on readers may open the file; no new objects or attributes
        self._lock_fd = _hold_shared_lock(h5.filename)

    @classmethod
    def create(cls, path: str | os.PathLike, numbers: np.ndarray, masses: np.ndarray, cell: np.ndarray,
               pbc: np.ndarray, settings: dict, flush_every: int, author: str | None = None) -> "TrajectoryWriter":
        """A new file (replacing any); ``settings`` become root attributes; ``author``: default the login name."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        h5 = h5py.File(path, "w", libver=LIBVER)
        try:
            _write_layout(h5, numbers, masses, cell, pbc, settings, author)
            h5.flush()
            return cls(h5, flush_every)
        except Exception:
            h5.close()
            raise

    @classmethod
    def append_to(cls, path: str | os.PathLike, flush_every: int, attrs: dict | None = None) -> "TrajectoryWriter":
        """Open an existing trajectory for appending, cut back to its last complete frame;
        ``attrs`` are written to the root attributes first."""
        path = Path(path)
        with _open_read(path) as h5:
            if _check_format(h5, path) == 1:
                raise TrajectoryError(
                    f"{path} has the trajectory layout of an earlier qeq-ase (format 1), which is read but not "
                    f"appended to; convert it with 'qeq-md convert {path} NEW.h5' and resume NEW.h5")
        h5 = _open_for_append(path)
        try:
            n_frames = int(h5["parameters/n_frames"][()])
            for ds in _growing_datasets(h5):
                if ds.shape[0] != n_frames:
                    ds.resize(n_frames, axis=0)
            for key, value in (attrs or {}).items():
                h5.attrs[key] = value
            return cls(h5, flush_every)
        except (OSError, KeyError) as err:
            h5.close()
            raise TrajectoryError(f"{path} is damaged ({type(err).__name__}: {_one_line(err)})") from err
        except Exception:
            h5.close()
            raise

    def add(self, frame: dict, rng_state: str | None = None) -> None:
        """Queue one frame (keys of :data:`FRAME_FIELDS`, ASE units); write the block when it is full."""
        self._buffer.append(frame)
        if rng_state is not None:
            self._rng_state = rng_state
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Append the queued frames, then count them in ``n_frames``."""
        if not self._buffer:
            return
        block = {name: np.stack([np.asarray(frame[name]) for frame in self._buffer]) for name in FRAME_FIELDS}
        self.write_block(block, self._rng_state)
        self._buffer.clear()

    def write_block(self, block: dict[str, np.ndarray], rng_state: str | None = None) -> None:
        """Append frames given as arrays (one per :data:`FRAME_FIELDS` key, frames first)."""
        start = self._n_on_disk
        stop = start + len(block["step"])
        for name, field in FRAME_FIELDS.items():
            ds = self.h5[field.path]
            ds.resize(stop, axis=0)
            values = np.asarray(block[name])
            ds[start:stop] = values * field.scale if field.scale != 1.0 else values
        if EDGES in self.h5:
            ds = self.h5[f"{EDGES}/value"]
            ds.resize(stop, axis=0)
            ds[start:stop] = np.broadcast_to(self._cell, (stop - start, 3, 3))
        self.h5.flush()  # the frames are in the file before n_frames counts them
        if rng_state is not None:
            encoded = rng_state.encode()
            if len(encoded) > RNG_STATE_BYTES:
                raise ValueError(f"RNG state of {len(encoded)} bytes does not fit the file's {RNG_STATE_BYTES}")
            self.h5["parameters/rng_state"][()] = np.bytes_(encoded)
        self.h5["parameters/n_frames"][()] = stop
        self.h5.flush()
        self._n_on_disk = stop

    @property
    def n_frames(self) -> int:
        """Frames on disk plus frames queued."""
        return self._n_on_disk + len(self._buffer)

    def close(self) -> None:
        try:
            if self.h5.id.valid:
                self.flush()
        finally:
            if self.h5.id.valid:
                self.h5.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> "TrajectoryWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _hold_shared_lock(path) -> int | None:
    """A file descriptor holding a shared ``flock`` on ``path`` (None where locks are unavailable).

    HDF5 drops its own lock once SWMR writing starts; this one lets SWMR readers in (they
    take shared locks too) but shows :func:`_in_use` that the writer is alive.
    """
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _in_use(path: Path) -> bool:
    """Whether another process holds a lock on ``path`` (a running writer, or an open reader)."""
    if fcntl is None:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # a file system without locks
        return False
    finally:
        os.close(fd)
    return False


def _open_for_append(path: Path) -> h5py.File:
    """``path`` opened read-write; a file left open by a killed writer is rewritten first."""
    in_use = TrajectoryError(f"{path} is open in another process (a qeq-md run still writing it, or a reader); "
                             "resume it once that has closed it")
    try:
        return h5py.File(path, "r+", libver=LIBVER)
    except OSError as err:
        if "unable to lock file" in str(err):
            raise in_use from err
        if "already open for write" not in str(err):
            raise TrajectoryError(f"{path} is not a readable HDF5 trajectory (truncated or corrupt?): "
                                  f"{_one_line(err)}") from err
    if _in_use(path):
        raise in_use
    _rewrite(path)
    return h5py.File(path, "r+", libver=LIBVER)


def _rewrite(path: Path) -> None:
    """Replace ``path`` by a fresh file holding its complete frames (HDF5 cannot reopen a
    file for writing that a killed SWMR writer left marked as open)."""
    with _open_read(path) as h5:
        author = h5["h5md/author"].attrs["name"].decode()
    tmp = path.with_name(path.name + ".rewrite")
    write_h5md(read_trajectory(path), tmp, author=author)
    os.replace(tmp, path)


def read_trajectory(path: str | os.PathLike, fields: tuple[str, ...] | None = None) -> dict:
    """All complete frames and the attributes of a trajectory file (either layout), in ASE units.

    Returns a dict with the frame arrays (``fields``, default all of :data:`FRAME_FIELDS`),
    ``numbers``, ``masses``, ``cell`` and ``attrs`` (a plain dict of the root attributes plus
    ``n_frames`` and ``rng_state``, decoded from JSON). A file that qeq-md is still writing
    is opened in SWMR mode: the frames written so far.
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
    if attrs.get("rng_state"):
        attrs["rng_state"] = json.loads(attrs["rng_state"])
    else:
        attrs.pop("rng_state", None)
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
    attrs["rng_state"] = h5["parameters/rng_state"][()].decode()
    out["attrs"] = attrs
    return out


def write_h5md(data: dict, path: str | os.PathLike, author: str | None = None) -> int:
    """Write what :func:`read_trajectory` returned to a new file in the current layout; returns the frame count."""
    attrs = data["attrs"]
    settings = {key: value for key, value in attrs.items() if key not in _BOOKKEEPING}
    rng_state = json.dumps(attrs["rng_state"]) if attrs.get("rng_state") is not None else None
    n = len(data["step"])
    with TrajectoryWriter.create(path, data["numbers"], data["masses"], data["cell"], attrs["pbc"], settings,
                                 flush_every=max(n, 1), author=author) as writer:
        if n:
            writer.write_block({name: data[name] for name in FRAME_FIELDS}, rng_state)
    return n


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


def convert_trajectory(path: str | os.PathLike, out_path: str | os.PathLike, every: int = 1,
                       format: str | None = None) -> int:
    """Write the frames of a trajectory to any ASE format (extxyz, traj, ...); returns the count.

    An output ending in ``.h5``, ``.hdf5`` or ``.h5md`` (or ``format="h5md"``) is a
    trajectory file in the current layout with all frames and settings: the migration of a
    file of format 1, or a clean copy of a file whose writer was killed.
    """
    if format == "h5md" or (format is None and Path(out_path).suffix.lower() in H5MD_SUFFIXES):
        if every != 1:
            raise ValueError("an HDF5 trajectory copy keeps every frame; --every is for ASE formats")
        if Path(out_path).resolve() == Path(path).resolve():
            raise ValueError(f"{out_path} is the input file; give another output path")
        return write_h5md(read_trajectory(path), out_path)
    from ase.io import write

    images = trajectory_to_atoms(path, every)
    write(str(out_path), images, format=format)
    return len(images)
