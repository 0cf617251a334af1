"""rMD17 loading: units, HDF5 cache, split, and errors for bad files."""

from pathlib import Path

import numpy as np
import pytest

from qeq_ase.dataset import DatasetError, load_rmd17, read_rmd17_npz, rmd17_path, train_val_split
from qeq_ase.units import KCAL_PER_MOL_IN_EV

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
