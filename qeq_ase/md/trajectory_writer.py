"""Writing qeq-md trajectories (the H5MD layout of :mod:`qeq_ase.md.trajectory`): new files,
appending to a file in blocks while readers watch it, resuming a file whose writer was killed,
and converting a trajectory to the current layout or to any ASE format.
"""

from __future__ import annotations

import getpass
import json
import os
from pathlib import Path

import h5py
import numpy as np

from .trajectory import (_BOOKKEEPING, BLOCK_STATES, CLOCK, EDGES, FORMAT_NAME, FORMAT_VERSION, FRAME_FIELDS,
                         H5MD_SUFFIXES, H5MD_VERSION, LIBVER, TrajectoryError, _check_format, _one_line, _open_read,
                         read_trajectory, trajectory_to_atoms)

try:
    import fcntl
except ImportError:  # not POSIX: no check for a writer that is still running
    fcntl = None


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
    from .. import __version__

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
    _add_block_states(parameters)


def _add_block_states(parameters: h5py.Group) -> None:
    """The empty fixed-length strings of :data:`BLOCK_STATES` that ``parameters`` lacks (SWMR
    writers cannot add them later, nor resize them)."""
    for name, size in BLOCK_STATES.items():
        if name not in parameters:
            parameters.create_dataset(name, data=np.bytes_(b""), dtype=f"S{size}")


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
    and ``integrator_state`` given to :meth:`add` are stored with the block that ends at that
    frame. While the writer is open it holds a shared ``flock`` on the file, by which
    :meth:`append_to` tells a running writer from a killed one.
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
        self._states: dict[str, str] = {}
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
            _add_block_states(h5["parameters"])
            return cls(h5, flush_every)
        except (OSError, KeyError) as err:
            h5.close()
            raise TrajectoryError(f"{path} is damaged ({type(err).__name__}: {_one_line(err)})") from err
        except Exception:
            h5.close()
            raise

    def add(self, frame: dict, rng_state: str | None = None, integrator_state: str | None = None) -> None:
        """Queue one frame (keys of :data:`FRAME_FIELDS`, ASE units) and the JSON states after it;
        write the block when it is full."""
        self._buffer.append(frame)
        self._states.update(_given(rng_state=rng_state, integrator_state=integrator_state))
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Append the queued frames, then count them in ``n_frames``."""
        if not self._buffer:
            return
        block = {name: np.stack([np.asarray(frame[name]) for frame in self._buffer]) for name in FRAME_FIELDS}
        self.write_block(block, **self._states)
        self._buffer.clear()

    def write_block(self, block: dict[str, np.ndarray], rng_state: str | None = None,
                    integrator_state: str | None = None) -> None:
        """Append frames given as arrays (one per :data:`FRAME_FIELDS` key, frames first) and
        the JSON states after the last of them."""
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
        for name, state in _given(rng_state=rng_state, integrator_state=integrator_state).items():
            encoded = state.encode()
            if len(encoded) > BLOCK_STATES[name]:
                raise ValueError(f"{name} of {len(encoded)} bytes does not fit the file's {BLOCK_STATES[name]}")
            self.h5["parameters"][name][()] = np.bytes_(encoded)
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


def _given(**states: str | None) -> dict[str, str]:
    return {name: state for name, state in states.items() if state is not None}


def _try_lock(path, exclusive: bool) -> tuple[int | None, bool]:
    """``(fd, True)`` with ``path`` locked (``flock``, shared or exclusive, never waiting);
    ``(None, False)`` where another process holds a conflicting lock; ``(None, None)`` where
    this system or file system has no locks."""
    if fcntl is None:
        return None, None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        return None, (False if isinstance(err, BlockingIOError) else None)
    return fd, True


def _hold_shared_lock(path) -> int | None:
    """A file descriptor holding a shared lock on ``path`` (None where it cannot be had).

    HDF5 drops its own lock once SWMR writing starts; this one lets SWMR readers in (they
    take shared locks too) but shows :func:`_in_use` that the writer is alive.
    """
    return _try_lock(path, exclusive=False)[0]


def _in_use(path: Path) -> bool:
    """Whether another process holds a lock on ``path`` (a running writer, or an open reader)."""
    fd, locked = _try_lock(path, exclusive=True)
    if fd is not None:
        os.close(fd)
    return locked is False


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


def write_h5md(data: dict, path: str | os.PathLike, author: str | None = None) -> int:
    """Write what :func:`read_trajectory` returned to a new file in the current layout; returns the frame count."""
    attrs = data["attrs"]
    settings = {key: value for key, value in attrs.items() if key not in _BOOKKEEPING}
    states = {name: json.dumps(attrs[name]) for name in BLOCK_STATES if attrs.get(name) is not None}
    n = len(data["step"])
    with TrajectoryWriter.create(path, data["numbers"], data["masses"], data["cell"], attrs["pbc"], settings,
                                 flush_every=max(n, 1), author=author) as writer:
        if n:
            writer.write_block({name: data[name] for name in FRAME_FIELDS}, **states)
    return n


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
