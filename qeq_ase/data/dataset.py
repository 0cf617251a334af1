"""Reference data: rMD17 ``.npz`` files and extended XYZ files, in eV and Å, with an HDF5 cache.

A :class:`Frames` object holds one molecule's configurations in ASE units. rMD17 files
(the split files of ``shared/rmd17`` or the full 100,000-frame files a user downloads
from figshare) store kcal/mol and kcal/mol/Å; :func:`load_rmd17` converts them once
and caches the converted arrays in HDF5 so that later loads skip the conversion.
Extended XYZ files (what MACE and NequIP users have) are read through ASE and already
hold eV and eV/Å; :func:`load_frames` takes either kind of file.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .units import KCAL_PER_MOL_IN_EV

RMD17_KEYS = ("nuclear_charges", "coords", "energies", "forces")
RMD17_MOLECULES = (
    "aspirin", "azobenzene", "benzene", "ethanol", "malonaldehyde",
    "naphthalene", "paracetamol", "salicylic", "toluene", "uracil",
)
CACHE_FORMAT_VERSION = 1


class DatasetError(ValueError):
    """A data file is missing, incomplete or inconsistent."""


@dataclass
class Frames:
    """Configurations of one molecule, in ASE units.

    Attributes:
        numbers: atomic numbers, shape ``[n_atoms]``.
        positions: Å, shape ``[n_frames, n_atoms, 3]``.
        energy: total energies in eV, shape ``[n_frames]``.
        forces: eV/Å, shape ``[n_frames, n_atoms, 3]``.
        source: the file the frames came from.
        sha256: hash of that file (recorded in trained potentials).
    """

    numbers: np.ndarray
    positions: np.ndarray
    energy: np.ndarray
    forces: np.ndarray
    source: str = ""
    sha256: str = ""
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.positions.shape[0]

    @property
    def n_atoms(self) -> int:
        return self.numbers.shape[0]

    def subset(self, index: np.ndarray) -> "Frames":
        """Frames at ``index`` (a new object sharing nothing with this one)."""
        index = np.asarray(index)
        return Frames(
            self.numbers.copy(), self.positions[index].copy(), self.energy[index].copy(),
            self.forces[index].copy(), self.source, self.sha256, dict(self.info),
        )


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$QEQ_CACHE_DIR`` or ``~/.cache/qeq_ase``."""
    env = os.environ.get("QEQ_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "qeq_ase"


def _check_rmd17_arrays(path: Path, data) -> None:
    missing = [k for k in RMD17_KEYS if k not in data]
    if missing:
        raise DatasetError(
            f"{path}: not an rMD17 file, missing key(s) {missing}; found {sorted(data.keys())}"
        )
    z, r, e, f = (np.asarray(data[k]) for k in RMD17_KEYS)
    n_frames = r.shape[0] if r.ndim == 3 else -1
    problems = []
    if z.ndim != 1:
        problems.append(f"nuclear_charges has shape {z.shape}, expected (n_atoms,)")
    if r.ndim != 3 or r.shape[1:] != (z.shape[0], 3):
        problems.append(f"coords has shape {r.shape}, expected (n_frames, {z.shape[0]}, 3)")
    if f.shape != r.shape:
        problems.append(f"forces has shape {f.shape}, expected {r.shape}")
    if e.reshape(-1).shape[0] != n_frames:
        problems.append(f"energies has shape {e.shape}, expected ({n_frames},)")
    if problems:
        raise DatasetError(f"{path}: " + "; ".join(problems))


def read_rmd17_npz(path: str | os.PathLike) -> Frames:
    """Read an rMD17 ``.npz`` file and convert kcal/mol(/Å) to eV(/Å). No caching."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rMD17 file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # every .npz is a zip archive; np.load would guess "pickled data"
            raise DatasetError(f"{path}: cannot be read as an .npz file, it is not a zip archive; expected an "
                               f"rMD17 .npz or an extended XYZ .xyz/.extxyz file")
    try:
        with np.load(path) as data:
            _check_rmd17_arrays(path, data)
            numbers = np.asarray(data["nuclear_charges"], dtype=np.int64)
            positions = np.asarray(data["coords"], dtype=np.float64)
            energy = np.asarray(data["energies"], dtype=np.float64).reshape(-1) * KCAL_PER_MOL_IN_EV
            forces = np.asarray(data["forces"], dtype=np.float64) * KCAL_PER_MOL_IN_EV
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DatasetError(f"{path}: cannot be read as an .npz file ({type(err).__name__}: {err})") from err
    return Frames(numbers, positions, energy, forces, source=str(path))


def _extxyz_property(atoms, key: str, per_atom: bool):
    """``key`` of one ASE frame: from its calculator results (where ASE puts ``energy=`` and
    ``forces``) or else from ``atoms.info`` / ``atoms.arrays`` (e.g. MACE's ``REF_energy``)."""
    if atoms.calc is not None and key in getattr(atoms.calc, "results", {}):
        return atoms.calc.results[key]
    store = atoms.arrays if per_atom else atoms.info
    return store.get(key)


def read_extxyz(path: str | os.PathLike, energy_key: str = "energy", forces_key: str = "forces") -> Frames:
    """Read an extended XYZ file of one molecule (eV, eV/Å, as ASE writes it). No caching.

    Every frame must hold the same atoms in the same order (a molecule along a trajectory,
    like rMD17), carry an energy under ``energy_key`` and forces under ``forces_key``, and
    be non-periodic.
    """
    from ase.io import read

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"extended XYZ file not found: {path}")
    try:
        images = read(path, index=":", format="extxyz")
    except Exception as err:  # ASE raises many kinds of errors on malformed text
        raise DatasetError(f"{path}: cannot be read as extended XYZ ({type(err).__name__}: {err})") from err
    if not images:
        raise DatasetError(f"{path}: no frames")
    numbers = images[0].numbers.astype(np.int64)
    energy, forces = np.empty(len(images)), np.empty((len(images), len(numbers), 3))
    for i, atoms in enumerate(images):
        if not np.array_equal(atoms.numbers, numbers):
            raise DatasetError(f"{path}: frame {i} has other atoms than frame 0; a training file must hold "
                               f"one molecule with its atoms in the same order in every frame")
        if atoms.pbc.any():
            raise DatasetError(f"{path}: frame {i} is periodic (pbc={atoms.pbc.tolist()}); training on "
                               f"periodic cells is not supported, only molecules")
        e = _extxyz_property(atoms, energy_key, per_atom=False)
        f = _extxyz_property(atoms, forces_key, per_atom=True)
        if e is None or f is None:
            found = sorted(set(atoms.info) | set(atoms.arrays) | set(getattr(atoms.calc, "results", {}) or {}))
            missing = [k for k, v in ((energy_key, e), (forces_key, f)) if v is None]
            raise DatasetError(f"{path}: frame {i} has no {' or '.join(map(repr, missing))}; it holds {found} "
                               f"(choose the keys with energy_key= / forces_key=, "
                               f"on the command line --energy-key / --forces-key)")
        energy[i], forces[i] = float(np.asarray(e).reshape(())), np.asarray(f, dtype=np.float64)
    positions = np.stack([atoms.positions for atoms in images]).astype(np.float64)
    if not (np.isfinite(positions).all() and np.isfinite(energy).all() and np.isfinite(forces).all()):
        raise DatasetError(f"{path}: positions, energies or forces contain NaN or inf")
    return Frames(numbers, positions, energy, forces, source=str(path),
                  info={"energy_key": energy_key, "forces_key": forces_key})


def write_extxyz(frames: Frames, path: str | os.PathLike) -> Path:
    """Write ``frames`` as extended XYZ (eV, eV/Å, energies and forces as ASE stores them),
    e.g. to turn an rMD17 file into the format of a user's own data."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    images = []
    for pos, e, f in zip(frames.positions, frames.energy, frames.forces):
        atoms = Atoms(numbers=frames.numbers, positions=pos)
        atoms.calc = SinglePointCalculator(atoms, energy=float(e), forces=f)
        images.append(atoms)
    write(path, images, format="extxyz")
    return Path(path)


def is_extxyz(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in (".xyz", ".extxyz")


def load_frames(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                energy_key: str = "energy", forces_key: str = "forces") -> Frames:
    """Reference frames in eV and Å from an rMD17 ``.npz`` or an extended XYZ (``.xyz``,
    ``.extxyz``) file, through the HDF5 cache of :func:`load_rmd17`."""
    path = Path(path)
    if is_extxyz(path):
        reader = lambda p: read_extxyz(p, energy_key, forces_key)  # noqa: E731
        return _load_cached(path, reader, cache_dir, use_cache, tag=f"{energy_key}|{forces_key}")
    if path.suffix.lower() == ".npz":
        return load_rmd17(path, cache_dir, use_cache)
    raise DatasetError(f"{path}: unknown data format {path.suffix!r}; expected an rMD17 .npz or an "
                       f"extended XYZ .xyz/.extxyz file")


def load_rmd17(
    path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, use_cache: bool = True
) -> Frames:
    """Load an rMD17 ``.npz`` file in eV and Å, through an HDF5 cache.

    The cache file is keyed on the source's name, size and modification time; it stores
    the converted arrays and the source's SHA-256, so a second load neither converts
    nor hashes. Pass ``use_cache=False`` to bypass it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rMD17 file not found: {path.resolve()}")
    return _load_cached(path, read_rmd17_npz, cache_dir, use_cache)


def _load_cached(path: Path, reader, cache_dir, use_cache: bool, tag: str = "") -> Frames:
    path = path.resolve()
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if not use_cache:
        frames = reader(path)
        frames.sha256 = file_sha256(path)
        return frames
    stat = path.stat()
    key = hashlib.sha1(f"{path}|{stat.st_size}|{stat.st_mtime_ns}{tag}".encode()).hexdigest()[:16]
    cache = Path(cache_dir or default_cache_dir()) / f"{path.stem}-{key}.h5"
    if cache.is_file():
        try:
            return _read_cache(cache, path)
        except (OSError, KeyError):
            cache.unlink(missing_ok=True)  # a corrupt or stale cache is rebuilt
    frames = reader(path)
    frames.sha256 = file_sha256(path)
    _write_cache(cache, frames)
    return frames


def _write_cache(cache: Path, frames: Frames) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    with h5py.File(tmp, "w") as h5:
        h5.attrs["format_version"] = CACHE_FORMAT_VERSION
        h5.attrs["source"] = frames.source
        h5.attrs["sha256"] = frames.sha256
        h5.attrs["energy_unit"] = "eV"
        h5.attrs["length_unit"] = "Angstrom"
        h5["numbers"] = frames.numbers
        h5["positions"] = frames.positions
        h5["energy"] = frames.energy
        h5["forces"] = frames.forces
    os.replace(tmp, cache)  # atomic: a half-written cache is never read


def _read_cache(cache: Path, source: Path) -> Frames:
    with h5py.File(cache, "r") as h5:
        if h5.attrs.get("format_version") != CACHE_FORMAT_VERSION:
            raise KeyError("cache format")
        return Frames(
            h5["numbers"][()], h5["positions"][()], h5["energy"][()], h5["forces"][()],
            source=str(source), sha256=str(h5.attrs["sha256"]),
        )


def train_val_split(n_frames: int, n_val: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded permutation split of ``range(n_frames)`` into (train, validation) indices."""
    if not 0 < n_val < n_frames:
        raise ValueError(f"n_val={n_val} must lie in (0, {n_frames})")
    perm = np.random.default_rng(seed).permutation(n_frames)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def rmd17_path(molecule: str, split: str, data_dir: str | os.PathLike, index: int = 1) -> Path:
    """Path of ``rmd17_<molecule>_<split>_<index:02d>.npz`` in ``data_dir``."""
    if molecule not in RMD17_MOLECULES:
        raise ValueError(f"unknown rMD17 molecule {molecule!r}; known: {', '.join(RMD17_MOLECULES)}")
    return Path(data_dir) / f"rmd17_{molecule}_{split}_{index:02d}.npz"
