"""Reference data: rMD17 units, HDF5 cache, split, extended XYZ, and errors for bad files."""

from pathlib import Path

import numpy as np
import pytest

from qeq_ase.data.dataset import (DatasetError, Frames, load_frames, load_rmd17, read_extxyz, read_rmd17_npz, rmd17_path,
                                  train_val_split, write_extxyz)
from qeq_ase.data.units import KCAL_PER_MOL_IN_EV

RMD17_DIR = Path(__file__).resolve().parents[2] / "shared" / "rmd17"
ASPIRIN_TEST = RMD17_DIR / "rmd17_aspirin_test_01.npz"
needs_rmd17 = pytest.mark.skipif(not ASPIRIN_TEST.is_file(), reason=f"rMD17 data not found at {RMD17_DIR}")


@needs_rmd17
def test_units_are_converted_to_ev(tmp_path):
    raw = np.load(ASPIRIN_TEST)
    frames = load_rmd17(ASPIRIN_TEST, cache_dir=tmp_path)
    assert KCAL_PER_MOL_IN_EV == pytest.approx(0.0433641, rel=1e-6)
    np.testing.assert_allclose(frames.energy, raw["energies"] * KCAL_PER_MOL_IN_EV)
    np.testing.assert_allclose(frames.forces, raw["forces"] * KCAL_PER_MOL_IN_EV)
    np.testing.assert_array_equal(frames.positions, raw["coords"])
    assert frames.numbers.tolist() == raw["nuclear_charges"].tolist()
    assert frames.energy.mean() == pytest.approx(-17618, abs=5)  # aspirin total energy in eV
    assert len(frames) == 1000 and frames.n_atoms == 21


@needs_rmd17
def test_hdf5_cache_is_written_and_reused(tmp_path):
    first = load_rmd17(ASPIRIN_TEST, cache_dir=tmp_path)
    caches = list(tmp_path.glob("*.h5"))
    assert len(caches) == 1
    second = load_rmd17(ASPIRIN_TEST, cache_dir=tmp_path)
    np.testing.assert_array_equal(first.forces, second.forces)
    assert first.sha256 == second.sha256 and len(first.sha256) == 64
    caches[0].write_bytes(b"garbage")  # a corrupt cache is rebuilt, not trusted
    third = load_rmd17(ASPIRIN_TEST, cache_dir=tmp_path)
    np.testing.assert_array_equal(first.energy, third.energy)


def test_split_is_reproducible_and_disjoint():
    train, val = train_val_split(1000, 50, seed=0)
    train2, val2 = train_val_split(1000, 50, seed=0)
    assert len(train) == 950 and len(val) == 50
    assert not set(train) & set(val)
    np.testing.assert_array_equal(val, val2)
    assert not np.array_equal(val, train_val_split(1000, 50, seed=1)[1])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        load_rmd17(tmp_path / "nothere.npz")


def test_missing_keys_and_bad_shapes_are_reported(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, coords=np.zeros((2, 3, 3)))
    with pytest.raises(DatasetError, match="missing key"):
        read_rmd17_npz(bad)
    np.savez(bad, nuclear_charges=np.array([1, 1, 8]), coords=np.zeros((2, 3, 3)),
             energies=np.zeros(2), forces=np.zeros((2, 4, 3)))
    with pytest.raises(DatasetError, match="forces has shape"):
        read_rmd17_npz(bad)
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(DatasetError, match="cannot be read"):
        read_rmd17_npz(tmp_path / "text.npz")


def test_rmd17_path_rejects_unknown_molecule():
    assert rmd17_path("aspirin", "train", "/d").name == "rmd17_aspirin_train_01.npz"
    with pytest.raises(ValueError, match="unknown rMD17 molecule 'asprin'"):
        rmd17_path("asprin", "train", "/d")


def _water_frames(n: int = 3) -> Frames:
    rng = np.random.default_rng(0)
    positions = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]]) + rng.normal(0, 0.02, (n, 3, 3))
    return Frames(np.array([8, 1, 1]), positions, rng.normal(-2080.0, 0.1, n), rng.normal(0, 1, (n, 3, 3)))


def test_extxyz_round_trip_keeps_ev_and_goes_through_the_cache(tmp_path):
    frames = _water_frames()
    path = write_extxyz(frames, tmp_path / "water.extxyz")
    read = load_frames(path, cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(read.energy, frames.energy, rtol=0, atol=1e-9)  # eV stays eV
    np.testing.assert_allclose(read.forces, frames.forces, rtol=0, atol=1e-7)  # %.8f text
    np.testing.assert_allclose(read.positions, frames.positions, rtol=0, atol=1e-7)
    assert read.numbers.tolist() == [8, 1, 1] and len(read.sha256) == 64
    assert len(list((tmp_path / "cache").glob("*.h5"))) == 1
    np.testing.assert_array_equal(load_frames(path, cache_dir=tmp_path / "cache").energy, read.energy)


def test_extxyz_custom_keys_like_mace(tmp_path):
    from ase import Atoms
    from ase.io import write

    frames = _water_frames(2)
    images = []
    for pos, e, f in zip(frames.positions, frames.energy, frames.forces):
        atoms = Atoms(numbers=frames.numbers, positions=pos)
        atoms.info["REF_energy"], atoms.arrays["REF_forces"] = float(e), f
        images.append(atoms)
    write(tmp_path / "ref.xyz", images, format="extxyz")
    with pytest.raises(DatasetError, match="no 'energy' or 'forces'.*REF_energy"):
        read_extxyz(tmp_path / "ref.xyz")
    read = read_extxyz(tmp_path / "ref.xyz", energy_key="REF_energy", forces_key="REF_forces")
    np.testing.assert_allclose(read.forces, frames.forces, atol=1e-7)


def test_extxyz_rejects_mixed_molecules_periodic_cells_and_nan(tmp_path):
    from ase.io import read, write

    path = write_extxyz(_water_frames(), tmp_path / "w.extxyz")
    images = read(path, index=":")
    images[1] = images[1][[1, 0, 2]]  # same atoms, other order
    write(tmp_path / "mixed.extxyz", images)
    with pytest.raises(DatasetError, match="frame 1 has other atoms"):
        read_extxyz(tmp_path / "mixed.extxyz")
    images = read(path, index=":")
    images[2].cell, images[2].pbc = np.eye(3) * 10, True
    write(tmp_path / "pbc.extxyz", images)
    with pytest.raises(DatasetError, match="frame 2 is periodic"):
        read_extxyz(tmp_path / "pbc.extxyz")
    frames = _water_frames()
    frames.positions[0, 1, 2] = np.nan
    write_extxyz(frames, tmp_path / "nan.extxyz")
    with pytest.raises(DatasetError, match="NaN"):
        read_extxyz(tmp_path / "nan.extxyz")


def test_load_frames_names_unknown_formats(tmp_path):
    (tmp_path / "data.csv").write_text("x")
    with pytest.raises(DatasetError, match="unknown data format '.csv'"):
        load_frames(tmp_path / "data.csv")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_frames(tmp_path / "absent.extxyz")
