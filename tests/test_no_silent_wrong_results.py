"""Paths that used to give wrong answers without a word: each now gives the right one or refuses.

(The refusal of a re-fit on other data is in ``test_fit.py``, next to the fitted files.)
"""

import pickle

import h5py
import numpy as np
import pytest
import torch

from qeq_ase.calculator import QEqCalculator
from qeq_ase.io.checkpoint import PotentialFileError, pack_state_dict, read_potential_file, save_potential
from qeq_ase.data.local_frame import OverlappingAtomsError
from qeq_ase.md.driver import main as md_main
from qeq_ase.md.driver import run_md
from qeq_ase.md.trajectory import TrajectoryError, read_trajectory
from qeq_ase.train.trainer import TrainConfig, Trainer
from conftest import build_tiny_model


# --- qeq-md --resume: the model, dtype and activation limbs of the file ---------------------------

def _md(path, model, rmd17_dir, **kwargs):
    options = dict(steps=3, trajectory=path, flush_every=2, seed=1, data_dir=rmd17_dir, progress=False)
    return run_md(None if kwargs.get("resume") else "rmd17:aspirin:0", model, **{**options, **kwargs})


def test_resume_without_a_model_uses_the_recorded_one(tmp_path, tiny_potential_path, rmd17_dir):
    """Resumed without naming the model (CLI: no --model, no --dtype), the run continues with
    the file's potential and dtype: identical to the uninterrupted run."""
    _md(tmp_path / "full.h5", tiny_potential_path, rmd17_dir, steps=6, dtype="float64")
    _md(tmp_path / "part.h5", tiny_potential_path, rmd17_dir, steps=3, dtype="float64")
    md_main(["--resume", "--trajectory", str(tmp_path / "part.h5"), "--steps", "6", "--no-progress"])
    full, part = read_trajectory(tmp_path / "full.h5"), read_trajectory(tmp_path / "part.h5")
    assert part["attrs"]["model"] == str(tiny_potential_path) and part["attrs"]["dtype"] == "float64"
    np.testing.assert_array_equal(part["step"], np.arange(7))
    np.testing.assert_allclose(part["total_energy"], full["total_energy"], atol=1e-9)


def test_resume_with_another_model_or_dtype_is_refused(tmp_path, tiny_potential_path, rmd17_dir):
    path = tmp_path / "md.h5"
    _md(path, tiny_potential_path, rmd17_dir, dtype="float64")
    other = save_potential(tmp_path / "other.pt", build_tiny_model(seed=1), {})
    with pytest.raises(TrajectoryError, match=r"tiny\.pt.*not .*other\.pt"):
        _md(path, other, rmd17_dir, steps=6, resume=True, dtype="float64")
    with pytest.raises(TrajectoryError, match=r"float64.*float32.*differs in dtype"):
        _md(path, tiny_potential_path, rmd17_dir, steps=6, resume=True, dtype="float32")
    with pytest.raises(TrajectoryError, match="aspirin_fp32"):
        _md(path, "aspirin_fp32", rmd17_dir, steps=6, resume=True)
    assert len(read_trajectory(path)["step"]) == 4  # nothing was appended
    # the same weights under another path are the same model
    same = tmp_path / "copy.pt"
    same.write_bytes(tiny_potential_path.read_bytes())
    summary = _md(path, same, rmd17_dir, steps=5, resume=True)
    assert summary.final_step == 5


def test_resume_with_other_activation_limbs_is_refused(tmp_path, rmd17_dir):
    path = tmp_path / "int8.h5"
    _md(path, "aspirin_int8", rmd17_dir, steps=1)
    assert read_trajectory(path)["attrs"]["activation_limbs"] == 2
    with pytest.raises(TrajectoryError, match="activation_limbs 2.*activation_limbs 1"):
        _md(path, None, rmd17_dir, steps=2, resume=True, activation_limbs=1)
    assert _md(path, None, rmd17_dir, steps=2, resume=True).final_step == 2


def test_resume_of_an_object_model_needs_it_again(tmp_path, rmd17_dir):
    path = tmp_path / "md.h5"
    model = build_tiny_model().double()
    _md(path, model, rmd17_dir, steps=2)
    with pytest.raises(TrajectoryError, match="Python object"):
        _md(path, None, rmd17_dir, steps=3, resume=True)
    with pytest.raises(TrajectoryError, match="differs in model_weights_sha256"):
        _md(path, build_tiny_model(seed=2).double(), rmd17_dir, steps=3, resume=True)
    assert _md(path, model, rmd17_dir, steps=3, resume=True).final_step == 3


def test_damaged_trajectory_is_left_untouched(tmp_path, tiny_potential_path, rmd17_dir):
    path = tmp_path / "md.h5"
    _md(path, tiny_potential_path, rmd17_dir)
    damaged = path.read_bytes()[:2000]
    path.write_bytes(damaged)
    with pytest.raises(TrajectoryError, match="HDF5"):
        _md(path, None, rmd17_dir, steps=6, resume=True)
    assert path.read_bytes() == damaged


# --- qeq-train: an existing run folder ----------------------------------------------------------

def _train_config(tmp_path, rmd17_dir, **overrides) -> TrainConfig:
    options = {"train_file": str(rmd17_dir / "rmd17_ethanol_train_01.npz"), "output_dir": str(tmp_path / "run"),
               "n_val": 8, "n_train": 16, "batch_size": 16, "max_epochs": 1,
               "model": {"num_features": 16, "num_layers": 1, "num_heads": 2, "num_radial": 8}}
    return TrainConfig(**{**options, **overrides})


def test_train_refuses_a_folder_holding_a_run(tmp_path, rmd17_dir):
    cfg = _train_config(tmp_path, rmd17_dir)
    Trainer(cfg).run()
    run = tmp_path / "run"
    before = {name: (run / name).read_bytes() for name in ("last.pt", "best.pt", "final.pt", "log.csv")}
    with pytest.raises(FileExistsError, match="--resume .* --overwrite"):
        Trainer(cfg)
    assert {name: (run / name).read_bytes() for name in before} == before  # nothing replaced or appended
    with pytest.raises(ValueError, match="n_train"):  # a bad config leaves the old run as it was
        Trainer(_train_config(tmp_path, rmd17_dir, n_train=100000), overwrite=True)
    assert (run / "last.pt").read_bytes() == before["last.pt"]
    Trainer(cfg, overwrite=True).run()
    with open(run / "log.csv") as f:
        assert [line.split(",")[0] for line in f.read().splitlines()] == ["epoch", "1"]  # a new log


def test_budgets_that_meant_no_limit_are_refused():
    for options in ({"time_budget_min": 0}, {"time_budget_min": -5}, {"n_val": 0}, {"max_epochs": 0},
                    {"lr": "fast"}):
        with pytest.raises(ValueError, match=next(iter(options))):
            TrainConfig(train_file="x.npz", **options)
    assert TrainConfig(train_file="x.npz", lr="1e-3").lr == 1e-3  # YAML 1.1 reads 1e-3 as a string


# --- the calculator: translation, overlapping atoms, pickling -------------------------------------

@pytest.mark.parametrize("shift", [1e4, 1e6])
def test_translation_does_not_change_float32_forces(tiny_potential_path, aspirin, shift):
    calc = QEqCalculator(tiny_potential_path)
    aspirin.calc = calc
    forces, energy = aspirin.get_forces(), aspirin.get_potential_energy()
    moved = aspirin.copy()
    moved.positions += np.array([shift, -0.7 * shift, 0.3 * shift])
    moved.calc = calc
    assert np.abs(moved.get_forces() - forces).max() < 1e-4  # 0.05 and 3 eV/Å before
    assert moved.get_potential_energy() == pytest.approx(energy, abs=1e-4)


def test_unwrapped_periodic_coordinates_give_the_wrapped_forces(tiny_potential_path, aspirin):
    calc = QEqCalculator(tiny_potential_path)
    boxed = aspirin.copy()
    boxed.cell, boxed.pbc = [[9.0, 0.0, 0.0], [1.0, 10.0, 0.0], [0.5, 0.0, 11.0]], True  # images interact
    boxed.calc = calc
    forces = boxed.get_forces()
    unwrapped = boxed.copy()
    rng = np.random.default_rng(0)
    unwrapped.positions += rng.integers(-3, 4, size=(len(boxed), 3)) @ boxed.cell[:] + 1e6
    unwrapped.calc = calc
    assert np.abs(unwrapped.get_forces() - forces).max() < 1e-4


def test_slab_with_a_zero_third_cell_vector(tiny_potential_path, aspirin):
    """pbc [True, True, False] needs no third vector; a wide slab is the isolated molecule."""
    calc = QEqCalculator(tiny_potential_path, dtype="float64")
    aspirin.calc = calc
    slab = aspirin.copy()
    slab.cell, slab.pbc = [[40.0, 0, 0], [0, 40.0, 0], [0, 0, 0]], [True, True, False]
    slab.positions[:, 2] += 100.0  # far outside the (empty) third direction
    slab.calc = calc
    assert slab.get_potential_energy() == pytest.approx(aspirin.get_potential_energy(), abs=1e-9)
    np.testing.assert_allclose(slab.get_forces(), aspirin.get_forces(), atol=1e-9)


def test_coincident_atoms_raise_instead_of_nan_forces(tiny_potential_path, aspirin, tmp_path):
    aspirin.calc = QEqCalculator(tiny_potential_path)
    aspirin.positions[7] = aspirin.positions[3]
    with pytest.raises(OverlappingAtomsError, match=r"atoms 3 and 7 are 0 Å apart.*repulsion"):
        aspirin.get_forces()
    with pytest.raises(OverlappingAtomsError, match="atoms 3 and 7"):  # MD stops on it, before writing a file
        run_md(aspirin, tiny_potential_path, steps=2, trajectory=tmp_path / "md.h5", progress=False)
    assert not (tmp_path / "md.h5").exists()


def test_non_finite_model_output_is_an_error(tiny_potential_path, aspirin, monkeypatch):
    calc = QEqCalculator(tiny_potential_path)
    original = calc.model.energy_and_forces

    def poisoned(*args, **kwargs):
        out = dict(original(*args, **kwargs))
        out["forces"] = out["forces"].clone()
        out["forces"][2, 1] = float("nan")
        return out

    monkeypatch.setattr(calc.model, "energy_and_forces", poisoned)
    aspirin.calc = calc
    with pytest.raises(ValueError, match=r"non-finite energy or forces \(atoms \[2\]\)"):
        aspirin.get_forces()


@pytest.mark.parametrize("name", ["aspirin_fp32", "aspirin_int8"])
def test_calculator_pickles(name, aspirin):
    calc = QEqCalculator(name)
    aspirin.calc = calc
    energy, forces = aspirin.get_potential_energy(), aspirin.get_forces()
    copy = pickle.loads(pickle.dumps(calc))
    again = aspirin.copy()
    again.calc = copy
    assert again.get_potential_energy() == pytest.approx(energy, abs=1e-6)
    np.testing.assert_allclose(again.get_forces(), forces, atol=1e-6)


# --- potential files: float weights where int8 belongs -------------------------------------------

def test_int8_file_with_float_weights_is_refused_on_save_and_load(tmp_path):
    from qeq_ase.io.registry import load_model

    model, metadata = load_model("aspirin_int8")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k in state if k.endswith("weight_int8"))
    state[key] = state[key].float()
    with pytest.raises(ValueError, match=f"{key} must be torch.int8"):
        save_potential(tmp_path / "bad.pt", model, metadata, precision="int8", state_dict=state)
    assert not (tmp_path / "bad.pt").exists()
    good = save_potential(tmp_path / "good.pt", model, metadata, precision="int8")
    payload = torch.load(good, weights_only=True)
    payload["tensors"] = pack_state_dict(state)
    torch.save(payload, tmp_path / "bad.pt")
    assert read_potential_file(tmp_path / "bad.pt")["precision"] == "int8"
    with pytest.raises(PotentialFileError, match="must be torch.int8"):
        QEqCalculator(tmp_path / "bad.pt")


# --- qeq-check: the potential's own molecule ------------------------------------------------------

def test_check_defaults_to_the_molecule_of_the_potential(rmd17_dir, capsys, monkeypatch):
    import json

    from qeq_ase.cli.check import main, recorded_molecule

    assert recorded_molecule("benzene_fp32") == "benzene" and recorded_molecule("ethanol_int8") == "ethanol"
    monkeypatch.setenv("QEQ_RMD17_DIR", str(rmd17_dir))
    main(["equivariance", "benzene_fp32", "--frames", "1", "--rotations", "1", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["molecule"] == "benzene" and report["lee_mean_meV_per_A"] < 1.0  # benzene has no oxygen
    main(["nve", "benzene_int8", "--time-ps", "0.002", "--warmup-fs", "1", "--json"])
    assert json.loads(capsys.readouterr().out)["start"] == "rmd17:benzene:0"


def test_trajectory_records_the_model(tmp_path, tiny_potential_path, rmd17_dir):
    path = tmp_path / "md.h5"
    _md(path, tiny_potential_path, rmd17_dir, steps=1)
    with h5py.File(path, "r") as h5:
        assert h5.attrs["dtype"] == "float32" and h5.attrs["activation_limbs"] == 0
        assert len(h5.attrs["model_weights_sha256"]) == 64
