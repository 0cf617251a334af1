"""The shipped potentials: present, complete metadata, and their recorded test errors reproduce."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qeq_ase.data.dataset import load_rmd17
from qeq_ase.train.evaluate import error_metrics, predict_frames
from qeq_ase.quant.int8_kernels import gemm_available, resolve_gemm
from qeq_ase.quant.int8_model import is_int8_model, set_int8_gemm
from qeq_ase.model.network import ModelConfig
from qeq_ase.io.registry import list_potentials, load_model, potentials_dir, shipped_names

RMD17_DIR = Path(__file__).resolve().parents[2] / "shared" / "rmd17"
REQUIRED_METADATA = ("units", "species", "cutoff", "training_data", "test_errors", "epochs", "num_parameters",
                     "quantization")
#: How closely an INT8 file's recorded test errors reproduce with another int8 GEMM than the one
#: that recorded them (another CPU kind): the GEMMs round the scaled outputs differently, which
#: moves fine-grid input codes that sit on a rounding boundary. Measured: up to 0.3% on the
#: energy MAE, and on benzene_int8 (MAE 0.49 meV) 9 µeV = 1.8%, hence the absolute floor.
REPRODUCE_OTHER_GEMM = {"forces_rel": 1e-2, "energy_rel": 1e-2, "energy_abs_meV": 0.02}


def test_aspirin_fp32_is_shipped_with_complete_metadata():
    assert "aspirin_fp32" in shipped_names()
    row = next(r for r in list_potentials() if r["name"] == "aspirin_fp32")
    assert row["precision"] == "fp32" and row["cutoff"] == 5.0 and row["species"] == [1, 6, 8]
    payload = torch.load(row["path"], weights_only=True)
    assert payload["format_version"] == 2
    for key in REQUIRED_METADATA:
        assert key in payload["metadata"], key
    data = payload["metadata"]["training_data"]
    assert data["file"] == "rmd17_aspirin_train_01.npz" and len(data["sha256"]) == 64
    errors = payload["metadata"]["test_errors"]
    assert errors["file"] == "rmd17_aspirin_test_01.npz" and errors["n_frames"] == 1000
    # Regression guard at the shipped file's measured test errors (28.5 meV/Å, 10.0 meV,
    # docs/training.md). The project's bar (15 meV/Å, 5 meV) is not reached yet: a better
    # potential must lower these bounds, never raise them.
    assert errors["forces_mae_meV_per_A"] <= 28.6 and errors["energy_mae_meV"] <= 10.1


def test_aspirin_int8_is_shipped_real_int8_and_small():
    from qeq_ase.quant.int8_model import int8_kernel_report

    rows = {r["name"]: r for r in list_potentials()}
    assert rows["aspirin_int8"]["precision"] == "int8" and rows["aspirin_int8"]["species"] == [1, 6, 8]
    payload = torch.load(rows["aspirin_int8"]["path"], weights_only=True)
    for key in REQUIRED_METADATA:
        assert key in payload["metadata"], key
    quant = payload["metadata"]["quantization"]
    assert quant["scheme"] == "full" and quant["vector"].startswith("MDDQ")
    fp32_config = torch.load(rows["aspirin_fp32"]["path"], weights_only=True)["model_config"]
    # the same architecture (a file written before a config option existed lacks its key: default)
    assert ModelConfig.from_dict(payload["model_config"]) == ModelConfig.from_dict(fp32_config)
    assert quant["activation_limbs"] == 2  # smooth energy for MD (docs/quantization.md, "Smoothness")
    # the size bar: int8 file <= 0.27 x the fp32 file
    assert os.path.getsize(rows["aspirin_int8"]["path"]) <= 0.27 * os.path.getsize(rows["aspirin_fp32"]["path"])
    model, _ = load_model("aspirin_int8")
    report = int8_kernel_report(model)
    assert report["int8_gemm_layers"] == 6 * model.config.num_layers + 3 and report["float_gemm_layers"] == 2
    assert report["edge_messages"].startswith("fused C++")


@pytest.mark.parametrize("name", shipped_names())
def test_shipped_potential_reproduces_recorded_test_errors(name):
    model, metadata = load_model(name)
    path = RMD17_DIR / metadata["test_errors"]["file"]
    if not path.is_file():
        pytest.skip(f"rMD17 data not found at {RMD17_DIR}")
    recorded = metadata["test_errors"]["first_frames"]
    frames = load_rmd17(path)
    assert metadata["test_errors"]["sha256"] == frames.sha256
    # the batches qeq-export used (32 frames from frame 0): a different batch shape changes the
    # float rounding, and an int8 input code near a rounding boundary can flip with it
    n = recorded["n_frames"]

    def errors() -> dict:
        energy, forces = predict_frames(model, frames.subset(np.arange(-(-n // 32) * 32)), batch_size=32)
        return error_metrics(frames.subset(np.arange(n)), energy[:n], forces[:n])

    # int8: the GEMM that recorded the errors where this CPU runs it (files older than the
    # oneDNN path: _int_mm); elsewhere the GEMM this CPU runs, within REPRODUCE_OTHER_GEMM
    recorded_gemm = metadata["test_errors"].get("int8_gemm", "int_mm")
    same_gemm = not is_int8_model(model) or gemm_available(recorded_gemm)
    if is_int8_model(model):
        set_int8_gemm(model, recorded_gemm if same_gemm else "auto")
    measured = errors()
    if same_gemm:
        assert measured["forces_mae_meV_per_A"] == pytest.approx(recorded["forces_mae_meV_per_A"], rel=1e-3)
        # int8 energies: the float GEMMs around the int8 layers round differently on another CPU
        # (oneDNN picks its fp32 kernels by microarchitecture), which flips fine-grid input codes on
        # rounding boundaries: measured up to 0.5% on the energy MAE of three files on a second
        # machine of this project's kind (the forces stayed within 1e-3), and on benzene_int8
        # (MAE 0.49 meV) 8 µeV = 1.7% with AVX2 float kernels: the same floor as for another GEMM
        energy_rel, energy_abs = ((REPRODUCE_OTHER_GEMM["energy_rel"], REPRODUCE_OTHER_GEMM["energy_abs_meV"])
                                  if is_int8_model(model) else (1e-3, 1e-3))
        assert measured["energy_mae_meV"] == pytest.approx(recorded["energy_mae_meV"], rel=energy_rel, abs=energy_abs)
    if is_int8_model(model) and resolve_gemm("auto") != recorded_gemm:
        set_int8_gemm(model, "auto")
        other = measured if not same_gemm else errors()
        assert other["forces_mae_meV_per_A"] == pytest.approx(recorded["forces_mae_meV_per_A"],
                                                               rel=REPRODUCE_OTHER_GEMM["forces_rel"])
        assert other["energy_mae_meV"] == pytest.approx(recorded["energy_mae_meV"], rel=REPRODUCE_OTHER_GEMM["energy_rel"],
                                                        abs=REPRODUCE_OTHER_GEMM["energy_abs_meV"])


def shipped_molecules() -> list[str]:
    return sorted({n.rsplit("_", 1)[0] for n in shipped_names()})


def shipped_metadata(molecule: str) -> dict:
    rows = {r["name"]: r for r in list_potentials()}
    return {kind: torch.load(rows[f"{molecule}_{kind}"]["path"], weights_only=True)["metadata"]
            for kind in ("fp32", "int8")}


@pytest.mark.parametrize("molecule", shipped_molecules())
def test_every_shipped_molecule_has_both_files_and_the_int8_size_bar(molecule):
    """Every molecule: both files, full metadata, tested on all 1,000 test frames; INT8 file <= 0.27 x fp32."""
    rows = {r["name"]: r for r in list_potentials()}
    fp32, int8 = rows.get(f"{molecule}_fp32"), rows.get(f"{molecule}_int8")
    assert fp32 is not None and int8 is not None, f"{molecule}: ship both _fp32 and _int8"
    for m in shipped_metadata(molecule).values():
        assert all(key in m for key in REQUIRED_METADATA)
        assert m["test_errors"]["n_frames"] == 1000 and m["test_errors"]["file"] == f"rmd17_{molecule}_test_01.npz"
    assert os.path.getsize(int8["path"]) <= 0.27 * os.path.getsize(fp32["path"])


@pytest.mark.parametrize("molecule", shipped_molecules())
def test_every_shipped_molecule_meets_the_int8_force_bar(molecule):
    """Issue bar for every molecule: INT8 force MAE <= 1.10 x fp32."""
    meta = shipped_metadata(molecule)
    ratio = meta["int8"]["test_errors"]["forces_mae_meV_per_A"] / meta["fp32"]["test_errors"]["forces_mae_meV_per_A"]
    assert ratio <= 1.10


def test_unknown_potential_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="shipped potentials: .*aspirin_fp32"):
        load_model("aspirin_fp33")


def test_installed_package_finds_potentials_from_any_directory(tmp_path):
    """With ``pip install .`` the potentials travel as package data (skipped for a source-only checkout)."""
    code = "import qeq_ase, qeq_ase.io.registry as r; print(qeq_ase.__file__); print(r.shipped_names())"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    if result.returncode != 0 and "No module named 'qeq_ase'" in result.stderr:
        pytest.skip("qeq-ase is not installed in this environment")
    assert result.returncode == 0, result.stderr
    location, names = result.stdout.splitlines()
    assert "aspirin_fp32" in names, (location, names)
    assert potentials_dir().is_dir()
