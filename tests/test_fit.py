"""``qeq-fit`` and ``qeq-report``: float32 then INT8 from a user's extended XYZ files (resumable,
loadable by path), and the generated results report built from such files."""

import json

import numpy as np
import pytest
from ase import Atoms

from qeq_ase.calculator import QEqCalculator
from qeq_ase.io.checkpoint import read_potential_file
from qeq_ase.data.dataset import load_rmd17, write_extxyz
from qeq_ase.train.fit import fit_potential
from qeq_ase.train.fit_record import FitMismatchError, check_or_reset
from qeq_ase.tools.published_rmd17 import PUBLISHED_RMD17
from qeq_ase.tools.report import default_settings, write_report

FP32 = {"model": {"num_features": 16, "num_layers": 1, "num_heads": 2, "num_radial": 8},
        "n_val": 10, "n_train": 64, "batch_size": 32, "max_epochs": 1, "compile": False}
QAT = {"n_val": 10, "n_train": 64, "batch_size": 32, "max_epochs": 2,
       "quantization": {"vector_start_epoch": 1, "calibration_batches": 1}}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, rmd17_dir):
    """Ethanol from rMD17 as a user would bring it (extended XYZ, eV), fitted by ``fit_potential``."""
    folder = tmp_path_factory.mktemp("fit")
    train = load_rmd17(rmd17_dir / "rmd17_ethanol_train_01.npz").subset(np.arange(100))
    test = load_rmd17(rmd17_dir / "rmd17_ethanol_test_01.npz").subset(np.arange(20))
    args = (str(write_extxyz(train, folder / "train.extxyz")), str(write_extxyz(test, folder / "test.extxyz")),
            "ethanol", folder / "out", folder / "work")
    files = fit_potential(*args, fp32_options=FP32, int8_options=QAT)
    return files, args, test


def test_fit_writes_fp32_and_int8_files_that_load_by_path(fitted):
    files, _, test = fitted
    fp32, int8 = read_potential_file(files["fp32"]), read_potential_file(files["int8"])
    assert (fp32["precision"], int8["precision"]) == ("fp32", "int8")
    for payload in (fp32, int8):
        meta = payload["metadata"]
        assert meta["training_data"]["file"] == "train.extxyz"
        assert meta["test_errors"]["file"] == "test.extxyz" and meta["test_errors"]["n_frames"] == 20
    assert int8["metadata"]["training_config"]["init_from"] == str(files["fp32"])
    assert int8["metadata"]["initialised_from"]["name"] == "ethanol_fp32"
    quantization = int8["metadata"]["quantization"]
    assert quantization["activation_limbs"] == 2 and quantization["qat_activation_limbs"] == 2
    molecule = Atoms(numbers=test.numbers, positions=test.positions[0])
    for path in files.values():
        molecule.calc = QEqCalculator(str(path))
        # per-element reference energies fitted on the user's data put even a 1-epoch model
        # within a few eV of a -4,200 eV total (without them it would be off by thousands)
        assert abs(molecule.get_potential_energy() - test.energy[0]) < 10.0
        assert np.isfinite(molecule.get_forces()).all()


def test_fit_again_resumes_finished_stages_without_retraining(fitted):
    files, args, _ = fitted
    mtimes = {k: p.stat().st_mtime_ns for k, p in files.items()}
    fit_potential(*args, fp32_options=FP32, int8_options=QAT)
    assert {k: p.stat().st_mtime_ns for k, p in files.items()} == mtimes


def test_fit_on_other_inputs_is_refused_not_reused(fitted):
    """A second fit whose data or options differ must not return the first fit's files."""
    files, (train, test, name, out, work), _ = fitted
    mtimes = {k: p.stat().st_mtime_ns for k, p in files.items()}
    with pytest.raises(FitMismatchError, match=r"train_sha256 differ.*--redo"):
        fit_potential(test, test, name, out, work, fp32_options=FP32, int8_options=QAT)
    with pytest.raises(FitMismatchError, match="fp32_minutes"):
        fit_potential(train, test, name, out, work, fp32_minutes=30, fp32_options=FP32, int8_options=QAT)
    with pytest.raises(FitMismatchError, match="fp32_options"):
        fit_potential(train, test, name, out, work, fp32_options={**FP32, "lr": 0.5}, int8_options=QAT)
    assert {k: p.stat().st_mtime_ns for k, p in files.items()} == mtimes
    # the device does not change the weights: the same fit on another device is the same fit
    fit_potential(train, test, name, out, work, fp32_options={**FP32, "device": "cpu"}, int8_options=QAT)
    assert {k: p.stat().st_mtime_ns for k, p in files.items()} == mtimes


def test_redo_replaces_the_files_of_another_fit(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work" / "m"
    guarded = [(out / "m_fit.json", [out / "m_fp32.pt", out / "m_int8.pt"]), (work / "fit.json", [work])]
    check_or_reset({"train_sha256": "a"}, guarded, redo=False)
    (out / "m_fp32.pt").write_bytes(b"old")
    (work / "fp32").mkdir()
    check_or_reset({"train_sha256": "a"}, guarded, redo=False)  # same inputs: resumed as it is
    assert (out / "m_fp32.pt").exists() and (work / "fp32").exists()
    with pytest.raises(FitMismatchError, match="train_sha256"):
        check_or_reset({"train_sha256": "b"}, guarded, redo=False)
    check_or_reset({"train_sha256": "b"}, guarded, redo=True)
    assert not (out / "m_fp32.pt").exists() and not (work / "fp32").exists()
    assert json.loads((out / "m_fit.json").read_text()) == {"train_sha256": "b"}
    (out / "m_int8.pt").write_bytes(b"made by hand")
    (out / "m_fit.json").unlink()
    with pytest.raises(FitMismatchError, match="no record"):
        check_or_reset({"train_sha256": "b"}, guarded, redo=False)


def test_fit_name_stays_inside_the_output_folder(tmp_path):
    for name in ("../../x", "a/b", "..", "", "-x"):
        with pytest.raises(ValueError, match="plain file name"):
            fit_potential("t.extxyz", "t.extxyz", name, tmp_path / "out", tmp_path / "work")
    with pytest.raises(ValueError, match="fp32_minutes"):
        fit_potential("t.extxyz", "t.extxyz", "ok", tmp_path / "out", tmp_path / "work", fp32_minutes=0)
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_fit_rejects_unreadable_data_before_training(tmp_path):
    (tmp_path / "bad.extxyz").write_text("not an xyz file\n")
    with pytest.raises(Exception, match="bad.extxyz"):
        fit_potential(str(tmp_path / "bad.extxyz"), str(tmp_path / "bad.extxyz"), "x", tmp_path / "out",
                      tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_report_tables_the_files_and_reuses_unchanged_measurements(fitted, rmd17_dir, tmp_path):
    files, _, _ = fitted
    settings = {**default_settings(), "lee_frames": 2, "lee_rotations": 2, "nve_ps": 0.005, "nve_warmup_fs": 2.0,
                "speed_calls": 3}
    output, measured = tmp_path / "docs" / "results.md", []
    output.parent.mkdir()
    results = write_report(output, rmd17_dir, settings, files["fp32"].parent, log=measured.append)
    assert measured == ["measuring ethanol_fp32 ...", "measuring ethanol_int8 ..."]
    fp32, int8 = results["ethanol_fp32"], results["ethanol_int8"]
    recorded = read_potential_file(files["int8"])["metadata"]["test_errors"]
    assert int8["forces_mae_meV_per_A"] == recorded["forces_mae_meV_per_A"]
    assert int8["size_bytes"] < fp32["size_bytes"] and int8["lee_mean_meV_per_A"] >= 0  # tiny: metadata weighs
    text = output.read_text()
    ratio = int8["forces_mae_meV_per_A"] / fp32["forces_mae_meV_per_A"]
    row = next(line for line in text.splitlines() if line.startswith("| ethanol |"))
    assert f"| {ratio:.2f} |" in row and "{} / {}".format(*PUBLISHED_RMD17["MACE"]["ethanol"]) in row
    assert "Not shipped yet" in text and "aspirin" in text.split("Not shipped yet")[1]
    assert (output.parent / "figures" / "results_forces.png").stat().st_size > 0
    assert json.loads(output.with_suffix(".json").read_text())["potentials"]["ethanol_int8"]["sha256"]
    measured.clear()
    write_report(output, rmd17_dir, settings, files["fp32"].parent, log=measured.append)
    assert measured == []  # same files, same settings: nothing measured again
    again = write_report(output, rmd17_dir, settings, files["fp32"].parent, log=measured.append, retime=True)
    assert measured == ["timing ethanol_fp32 ...", "timing ethanol_int8 ..."]  # only the calculator timed again
    assert again["ethanol_int8"]["lee_mean_meV_per_A"] == int8["lee_mean_meV_per_A"]
    assert again["ethanol_int8"]["ms_per_call"] > 0
    # a new INT8 file is measured; its unchanged fp32 partner is timed again in the same run
    cache = json.loads(output.with_suffix(".json").read_text())
    cache["potentials"]["ethanol_int8"]["sha256"] = "0" * 64
    output.with_suffix(".json").write_text(json.dumps(cache))
    measured.clear()
    write_report(output, rmd17_dir, settings, files["fp32"].parent, log=measured.append)
    assert measured == ["measuring ethanol_int8 ...", "timing ethanol_fp32 ..."]


def test_training_totals_follow_float_restarts_but_not_into_qat():
    from qeq_ase.tools.report import training_totals

    first = {"epochs": 139, "training_minutes": 100.1, "initialised_from": None}
    restart = {"epochs": 160, "training_minutes": 95.0, "training_config": {"quantization": None},
               "initialised_from": first}
    assert training_totals(restart) == {"epochs": 299, "training_minutes": 195.1}
    qat = {"epochs": 25, "training_minutes": 20.0, "training_config": {"quantization": {"scheme": "full"}},
           "initialised_from": {**restart, "initialised_from": first}}
    assert training_totals(qat) == {"epochs": 25, "training_minutes": 20.0}
