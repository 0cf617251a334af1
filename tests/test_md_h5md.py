"""qeq-md trajectories as H5MD 1.1: the tree, MDAnalysis reading it, reading while qeq-md writes
(SWMR), resuming after a kill, and files of the earlier layout."""

import shutil
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from ase import units

import qeq_ase
from qeq_ase.md.driver import main, run_md
from qeq_ase.md.trajectory import FRAME_FIELDS, TrajectoryError, read_trajectory
from qeq_ase.md.trajectory_writer import TrajectoryWriter, convert_trajectory
from test_md import _start_cli, _wait_for_frames

OLD_FILE = Path(__file__).parent / "data" / "md_format_v1.h5"  # 5 frames written by the format-1 writer
#: kJ/mol per eV from CODATA 2018 (e * N_A / 1000), independent of ase.units.
KJ_PER_MOL_PER_EV = 96.48533212


def _run(atoms, potential, path, **kwargs):
    options = dict(steps=5, trajectory=path, flush_every=2, seed=2, dtype="float64", progress=False)
    return run_md(atoms, potential, **{**options, **kwargs})


def _boxed(aspirin):
    aspirin.cell = [20.0, 21.0, 22.0]
    aspirin.pbc = True
    aspirin.center()
    return aspirin


def test_h5md_tree(tmp_path, tiny_potential_path, aspirin):
    path = tmp_path / "md.h5"
    _run(aspirin, tiny_potential_path, path)
    with h5py.File(path, "r") as h5:
        assert list(h5["h5md"].attrs["version"]) == [1, 1]
        assert h5["h5md/author"].attrs["name"]
        assert h5["h5md/creator"].attrs["name"] == b"qeq-ase"
        assert h5["h5md/creator"].attrs["version"] == qeq_ase.__version__.encode()
        group = h5["particles/all"]
        clock = group["position"]
        np.testing.assert_array_equal(clock["step"][()], np.arange(6))
        np.testing.assert_allclose(clock["time"][()], 0.5 * np.arange(6))
        assert clock["time"].attrs["unit"] == "fs"
        units_of = {"position": "Angstrom", "velocity": "Angstrom fs-1", "force": "kJ mol-1 Angstrom-1"}
        for name, unit in units_of.items():
            assert group[name]["value"].shape == (6, 21, 3) and group[name]["value"].attrs["unit"] == unit
            assert group[name]["step"] == clock["step"] and group[name]["time"] == clock["time"]  # hard links
        np.testing.assert_array_equal(group["species"][()], aspirin.numbers)
        np.testing.assert_allclose(group["mass"][()], aspirin.get_masses())
        assert group["mass"].attrs["unit"] == "u"
        assert group["box"].attrs["dimension"] == 3 and list(group["box"].attrs["boundary"]) == [b"none"] * 3
        assert "edges" not in group["box"]
        observables = {"potential_energy": "eV", "kinetic_energy": "eV", "total_energy": "eV", "temperature": "K"}
        assert set(h5["observables"]) == set(observables)
        for name, unit in observables.items():
            assert h5["observables"][name]["value"].shape == (6,)
            assert h5["observables"][name]["value"].attrs["unit"] == unit
            assert h5["observables"][name]["step"] == clock["step"]
        assert h5["parameters/n_frames"][()] == 6
        data = read_trajectory(path)
        np.testing.assert_allclose(group["force"]["value"][()], data["forces"] * KJ_PER_MOL_PER_EV, rtol=1e-8)
        np.testing.assert_array_equal(group["position"]["value"][()], data["positions"])


def test_periodic_cell_is_an_h5md_box(tmp_path, tiny_potential_path, aspirin):
    atoms = _boxed(aspirin)
    path = tmp_path / "md.h5"
    _run(atoms, tiny_potential_path, path, steps=3)
    with h5py.File(path, "r") as h5:
        box = h5["particles/all/box"]
        assert list(box.attrs["boundary"]) == [b"periodic"] * 3
        np.testing.assert_array_equal(box["edges/value"][()], np.broadcast_to(atoms.cell[:], (4, 3, 3)))
        assert box["edges/value"].attrs["unit"] == "Angstrom"
        assert box["edges/step"] == h5["particles/all/position/step"]
    data = read_trajectory(path)
    np.testing.assert_array_equal(data["cell"], atoms.cell[:])
    assert list(data["attrs"]["pbc"]) == [True] * 3


@pytest.mark.parametrize("periodic", [False, True])
def test_mdanalysis_reads_positions_velocities_forces(tmp_path, tiny_potential_path, aspirin, periodic):
    mda = pytest.importorskip("MDAnalysis")
    atoms = _boxed(aspirin) if periodic else aspirin
    path = tmp_path / "md.h5"
    _run(atoms, tiny_potential_path, path)
    ours = read_trajectory(path)
    universe = mda.Universe.empty(len(atoms), trajectory=True)
    universe.load_new(str(path), format="H5MD")
    assert len(universe.trajectory) == 6
    for k, ts in enumerate(universe.trajectory):  # MDAnalysis units: Å, Å/ps, kJ/(mol Å), ps (float32)
        np.testing.assert_allclose(ts.positions, ours["positions"][k], rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(ts.velocities, ours["velocities"][k] * 1000.0, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(ts.forces, ours["forces"][k] * KJ_PER_MOL_PER_EV, rtol=1e-6, atol=1e-4)
        assert ts.time == pytest.approx(ours["time"][k] / 1000.0)
        assert ts.data["step"] == ours["step"][k]
        assert ts.data["potential_energy"] == pytest.approx(ours["potential_energy"][k], rel=1e-12)
        if periodic:
            np.testing.assert_allclose(ts.dimensions, [20.0, 21.0, 22.0, 90.0, 90.0, 90.0], rtol=1e-6)
        else:
            assert ts.dimensions is None


def test_a_running_qeq_md_is_read_and_a_killed_one_resumed(tmp_path, tiny_potential_path, rmd17_dir):
    """A reader follows the file while qeq-md appends; resuming is refused while it runs and,
    after a SIGKILL, continues the complete frames."""
    path = tmp_path / "md.h5"
    proc = _start_cli(tmp_path, tiny_potential_path, rmd17_dir, path)
    try:
        _wait_for_frames(proc, path, 10)
        with h5py.File(path, "r", swmr=True) as h5:  # one handle, held open as a user watching a run would
            n_frames, positions = h5["parameters/n_frames"], h5["particles/all/position/value"]
            first = int(n_frames[()])
            seen = positions[:first]
            deadline = time.monotonic() + 60
            while int(n_frames[()]) < first + 10 and time.monotonic() < deadline:
                time.sleep(0.1)
                n_frames.refresh()
            positions.refresh()
            later = positions[:int(n_frames[()])]
        assert len(later) >= first + 10 and proc.poll() is None
        np.testing.assert_array_equal(later[:first], seen)
        during = read_trajectory(path)
        np.testing.assert_array_equal(during["step"], np.arange(len(during["step"])))
        with pytest.raises(TrajectoryError, match="open in another process"):
            run_md(None, tiny_potential_path, steps=100, trajectory=path, resume=True, dtype="float64",
                   flush_every=5, progress=False)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    killed = read_trajectory(path)
    np.testing.assert_array_equal(killed["positions"][:len(during["step"])], during["positions"])
    n = len(killed["step"])
    run_md(None, tiny_potential_path, steps=n + 3, trajectory=path, resume=True, dtype="float64", flush_every=5,
           progress=False)
    with h5py.File(path, "r") as h5:  # closed cleanly: no longer marked as open for writing
        np.testing.assert_array_equal(h5["particles/all/position/step"][()], np.arange(n + 4))
        np.testing.assert_array_equal(h5["particles/all/position/value"][:n], killed["positions"])


def test_format_1_file_is_read_and_converted(tmp_path, capsys):
    old = read_trajectory(OLD_FILE)
    assert old["attrs"]["format_version"] == 1 and len(old["step"]) == 5
    # the units of that layout: E_kin from Å/fs velocities and amu masses
    v = old["velocities"] / units.fs
    kinetic = 0.5 * np.sum(old["masses"][None, :, None] * v ** 2, axis=(1, 2))
    np.testing.assert_allclose(kinetic, old["kinetic_energy"], rtol=1e-12)
    assert old["attrs"]["rng_state"]["bit_generator"] == "PCG64"

    new_path = tmp_path / "new.h5"
    main(["convert", str(OLD_FILE), str(new_path)])
    assert "wrote 5 frames" in capsys.readouterr().out
    new = read_trajectory(new_path)
    assert new["attrs"]["format_version"] == 2
    for name in FRAME_FIELDS:
        np.testing.assert_allclose(new[name], old[name], rtol=1e-14, atol=0, err_msg=name)
    for name in ("numbers", "masses", "cell"):
        np.testing.assert_array_equal(new[name], old[name])
    for key, value in old["attrs"].items():
        if key != "format_version":
            np.testing.assert_equal(new["attrs"][key], value, err_msg=key)
    with h5py.File(new_path, "r") as h5:
        np.testing.assert_allclose(h5["particles/all/force/value"][()], old["forces"] * KJ_PER_MOL_PER_EV, rtol=1e-8)

    with pytest.raises(ValueError, match="every frame"):
        convert_trajectory(OLD_FILE, tmp_path / "thin.h5", every=2)
    with pytest.raises(ValueError, match="input file"):
        convert_trajectory(new_path, new_path)


def test_format_1_file_is_not_appended_to(tmp_path):
    path = tmp_path / "old.h5"
    shutil.copy(OLD_FILE, path)
    before = path.read_bytes()
    with pytest.raises(TrajectoryError, match=r"qeq-md convert .*old\.h5 NEW\.h5"):
        TrajectoryWriter.append_to(path, flush_every=5)
    assert path.read_bytes() == before


def test_sigterm_leaves_a_file_mdanalysis_opens(tmp_path, tiny_potential_path, rmd17_dir):
    mda = pytest.importorskip("MDAnalysis")
    path = tmp_path / "md.h5"
    proc = _start_cli(tmp_path, tiny_potential_path, rmd17_dir, path)
    try:
        _wait_for_frames(proc, path, 5)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    data = read_trajectory(path)
    universe = mda.Universe.empty(21, trajectory=True)
    universe.load_new(str(path), format="H5MD")
    assert len(universe.trajectory) == len(data["step"]) >= 5
    np.testing.assert_allclose(universe.trajectory[-1].positions, data["positions"][-1], rtol=1e-6, atol=1e-5)
