"""MD driver: HDF5 layout, interruption and resumption without lost or duplicated frames, conversion, CLI."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from ase import Atoms
from ase.io import read, write

from qeq_ase.calculator import QEqCalculator
from qeq_ase.md.driver import load_start_structure, main, run_md
from qeq_ase.md.trajectory import FRAME_FIELDS, TrajectoryError, read_trajectory

REPO = Path(__file__).resolve().parents[1]


def run(path, potential, rmd17_dir, **kwargs):
    source = kwargs.pop("source", "rmd17:aspirin:0")
    settings = dict(model=potential, steps=12, trajectory=path, flush_every=5, seed=3, data_dir=rmd17_dir,
                    progress=False, dtype="float64")
    return run_md(source, **{**settings, **kwargs})


def test_trajectory_layout_and_units(tmp_path, tiny_potential_path, rmd17_dir):
    path = tmp_path / "runs" / "md.h5"  # a folder that does not exist yet is created
    summary = run(path, tiny_potential_path, rmd17_dir, write_every=2)
    assert summary.final_step == 12 and summary.n_frames == 7
    with h5py.File(path, "r") as h5:
        for name, field in FRAME_FIELDS.items():
            assert h5[field.path].attrs.get("unit") == field.unit and h5[field.path].maxshape[0] is None
            assert h5[field.path].shape[0] == 7
        assert h5.attrs["ensemble"] == "langevin" and h5.attrs["timestep_fs"] == 0.5
        assert h5.attrs["temperature_K"] == 300.0 and h5.attrs["seed"] == 3
        assert h5["particles/all/species"].shape == (21,) and h5.attrs["cell"].shape == (3, 3)
    data = read_trajectory(path)
    np.testing.assert_array_equal(data["step"], np.arange(0, 13, 2))
    np.testing.assert_allclose(data["time"], data["step"] * 0.5)
    np.testing.assert_allclose(data["total_energy"], data["potential_energy"] + data["kinetic_energy"])
    # stored forces and energies are the calculator's at the stored positions
    atoms = Atoms(numbers=data["numbers"], positions=data["positions"][-1])
    atoms.calc = QEqCalculator(tiny_potential_path, dtype="float64")
    assert atoms.get_potential_energy() == pytest.approx(data["potential_energy"][-1], abs=1e-9)
    np.testing.assert_allclose(atoms.get_forces(), data["forces"][-1], atol=1e-9)
    # kinetic energy from the stored velocities (Å/fs) and masses (amu)
    from ase import units
    v = data["velocities"][-1] / units.fs
    assert 0.5 * np.sum(data["masses"][:, None] * v ** 2) == pytest.approx(data["kinetic_energy"][-1], rel=1e-12)


def test_resume_continues_the_same_trajectory(tmp_path, tiny_potential_path, rmd17_dir):
    """Run 12 steps, resume to 30: identical to 30 uninterrupted steps (positions, RNG stream)."""
    run(tmp_path / "full.h5", tiny_potential_path, rmd17_dir, steps=30)
    run(tmp_path / "part.h5", tiny_potential_path, rmd17_dir, steps=12)
    summary = run(tmp_path / "part.h5", tiny_potential_path, rmd17_dir, steps=30, resume=True, source=None)
    assert summary.resumed and summary.start_step == 12 and summary.final_step == 30
    full, part = read_trajectory(tmp_path / "full.h5"), read_trajectory(tmp_path / "part.h5")
    np.testing.assert_array_equal(part["step"], np.arange(31))
    np.testing.assert_allclose(part["positions"], full["positions"], atol=1e-8)
    np.testing.assert_allclose(part["velocities"], full["velocities"], atol=1e-8)


def test_existing_file_and_changed_settings_are_refused(tmp_path, tiny_potential_path, rmd17_dir):
    path = tmp_path / "md.h5"
    run(path, tiny_potential_path, rmd17_dir, steps=3)
    with pytest.raises(FileExistsError, match="resume"):
        run(path, tiny_potential_path, rmd17_dir, steps=3)
    with pytest.raises(TrajectoryError, match=r"timestep_fs: file 0.5 vs now 1.0"):
        run(path, tiny_potential_path, rmd17_dir, steps=6, timestep_fs=1.0, resume=True)
    with pytest.raises(TrajectoryError, match="not found"):
        run(tmp_path / "missing.h5", tiny_potential_path, rmd17_dir, resume=True)


def _frames_on_disk(path: Path) -> int:
    try:
        return len(read_trajectory(path, fields=("step",))["step"])
    except TrajectoryError:
        return 0


def _start_cli(tmp_path, potential, rmd17_dir, trajectory) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "qeq_ase.md.driver", "rmd17:aspirin:0", "--model", str(potential), "--steps", "100000",
           "--flush-every", "5", "--trajectory", str(trajectory), "--data-dir", str(rmd17_dir), "--seed", "3",
           "--dtype", "float64", "--no-progress"]
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_frames(proc, path, n_frames, timeout_s=90):
    deadline = time.monotonic() + timeout_s
    while _frames_on_disk(path) < n_frames:
        if proc.poll() is not None:
            pytest.fail(f"qeq-md exited early: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("qeq-md wrote too few frames in time")
        time.sleep(0.1)


def test_killed_run_resumes_without_lost_or_duplicated_frames(tmp_path, tiny_potential_path, rmd17_dir):
    path = tmp_path / "md.h5"
    proc = _start_cli(tmp_path, tiny_potential_path, rmd17_dir, path)
    try:
        _wait_for_frames(proc, path, 20)
    finally:
        proc.kill()  # SIGKILL: no chance to write pending frames
        proc.wait()
    killed = read_trajectory(path)
    n = len(killed["step"])
    assert n >= 20 and n % 5 == 0  # only whole blocks of flush_every frames reach the disk
    np.testing.assert_array_equal(killed["step"], np.arange(n))
    final_step = n + 7
    run(path, tiny_potential_path, rmd17_dir, steps=final_step, resume=True, source=None)
    resumed = read_trajectory(path)
    np.testing.assert_array_equal(resumed["step"], np.arange(final_step + 1))
    np.testing.assert_array_equal(resumed["positions"][:n], killed["positions"])
    run(tmp_path / "ref.h5", tiny_potential_path, rmd17_dir, steps=final_step)
    reference = read_trajectory(tmp_path / "ref.h5")
    np.testing.assert_allclose(resumed["positions"], reference["positions"], atol=1e-8)


def test_sigterm_writes_pending_frames(tmp_path, tiny_potential_path, rmd17_dir):
    path = tmp_path / "md.h5"
    proc = _start_cli(tmp_path, tiny_potential_path, rmd17_dir, path)
    try:
        _wait_for_frames(proc, path, 10)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "--resume" in stderr
    data = read_trajectory(path)
    np.testing.assert_array_equal(data["step"], np.arange(len(data["step"])))


def test_convert_to_extxyz_and_traj(tmp_path, tiny_potential_path, rmd17_dir, capsys):
    path = tmp_path / "md.h5"
    run(path, tiny_potential_path, rmd17_dir, steps=6)
    main(["convert", str(path), str(tmp_path / "md.extxyz")])
    main(["convert", str(path), str(tmp_path / "md.traj"), "--every", "2"])
    assert "wrote 7 frames" in capsys.readouterr().out
    data = read_trajectory(path)
    images = read(tmp_path / "md.extxyz", ":")
    assert len(images) == 7 and len(read(tmp_path / "md.traj", ":")) == 4
    assert images[-1].info["step"] == 6
    assert images[-1].get_potential_energy() == pytest.approx(data["potential_energy"][-1], abs=1e-6)
    np.testing.assert_allclose(images[-1].get_forces(), data["forces"][-1], atol=1e-6)
    np.testing.assert_allclose(images[-1].positions, data["positions"][-1], atol=1e-6)


def test_cli_run_from_file_nve_with_export(tmp_path, tiny_potential_path, aspirin, capsys):
    write(tmp_path / "start.xyz", aspirin)
    main([str(tmp_path / "start.xyz"), "--model", str(tiny_potential_path), "--ensemble", "nve", "--steps", "8",
          "--trajectory", str(tmp_path / "nve.h5"), "--export", str(tmp_path / "nve.extxyz"), "--no-progress"])
    out = capsys.readouterr().out
    assert "nve: steps 0 -> 8" in out and "wrote 9 frames" in out
    data = read_trajectory(tmp_path / "nve.h5")
    assert np.ptp(data["total_energy"]) < 0.05 * np.ptp(data["potential_energy"]) + 1e-3
    with pytest.raises(SystemExit):
        main(["--model", str(tiny_potential_path)])  # neither a start structure nor --resume


def test_start_structures(tmp_path, rmd17_dir, aspirin_frames):
    atoms = load_start_structure("rmd17:aspirin:2", rmd17_dir)
    np.testing.assert_array_equal(atoms.positions, aspirin_frames.positions[2])
    assert load_start_structure("rmd17:aspirin:0:train", rmd17_dir).get_chemical_formula() == "C9H8O4"
    with pytest.raises(ValueError, match="unknown rMD17 molecule 'aspirine'"):
        load_start_structure("rmd17:aspirine:0", rmd17_dir)
    with pytest.raises(IndexError, match="out of range"):
        load_start_structure("rmd17:aspirin:99999", rmd17_dir)
    with pytest.raises(FileNotFoundError, match="start structure not found"):
        load_start_structure(tmp_path / "nothing.xyz")
    given = Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]])
    copy = load_start_structure(given)
    copy.positions += 1.0
    assert given.positions[0, 0] == 0.0  # the caller's atoms are never modified


@pytest.mark.parametrize("script, args", [
    ("langevin_aspirin.py", ["--steps", "10", "--trajectory", "x.h5"]),
    ("nve_conservation.py", ["--time-ps", "0.005", "--warmup-fs", "2", "--plot", "nve.png"]),
    ("optimize_and_vibrate.py", ["--fmax", "1.0"]),
])
def test_examples_run(tmp_path, tiny_potential_path, rmd17_dir, script, args):
    if script == "nve_conservation.py":
        pytest.importorskip("matplotlib")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QEQ_RMD17_DIR": str(rmd17_dir),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(REPO / "md_examples" / script), "--model", str(tiny_potential_path),
                             *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert str(tiny_potential_path) in result.stdout or "steps" in result.stdout


def test_bad_start_fails_before_a_file_is_written(tmp_path, tiny_potential_path):
    atoms = Atoms("NH3", positions=[[0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    with pytest.raises(ValueError, match=r"N \(Z=7\)"):
        run_md(atoms, tiny_potential_path, steps=2, trajectory=tmp_path / "md.h5", progress=False)
    assert not (tmp_path / "md.h5").exists()


def test_shipped_structures_load_by_name_without_data_files(tmp_path, monkeypatch):
    from qeq_ase.data.dataset import RMD17_MOLECULES
    from qeq_ase.md.driver import load_start_structure, shipped_structures

    monkeypatch.chdir(tmp_path)  # no ../shared here
    assert shipped_structures() == sorted(RMD17_MOLECULES)
    atoms = load_start_structure("aspirin")
    assert atoms.get_chemical_formula() == "C9H8O4" and not atoms.pbc.any()
    assert load_start_structure("ethanol").get_chemical_formula() == "C2H6O"
