"""Integrator specs: every registered integrator resumes exactly, its settings are checked on
resume, files without an integrator state still resume, and a new integrator needs one registration."""

import h5py
import numpy as np
import pytest
from ase import units
from ase.md.verlet import VelocityVerlet

from qeq_ase.md.driver import main, run_md
from qeq_ase.md.integrators import INTEGRATORS, IntegratorSpec, Setting, register_integrator
from qeq_ase.md.trajectory import TrajectoryError, read_trajectory
from qeq_ase.md.trajectory_writer import convert_trajectory

#: Settings that make each integrator's own state matter within a few steps.
STRONG = {"langevin": {"friction_per_fs": 0.1}, "nose-hoover": {"tdamp_fs": 10.0}}


def _run(path, potential, **kwargs):
    options = dict(model=potential, trajectory=path, flush_every=5, seed=3, dtype="float64", progress=False)
    return run_md(kwargs.pop("source", "aspirin"), **{**options, **kwargs})


def _resume(path, potential, **kwargs):
    return _run(path, potential, source=None, resume=True, **kwargs)


@pytest.mark.parametrize("ensemble", sorted(INTEGRATORS))
def test_interrupted_run_resumes_exactly(tmp_path, tiny_potential_path, ensemble):
    """20 steps, then resumed to 40: the same positions, velocities and integrator state as 40 steps at once."""
    settings = {"ensemble": ensemble, **STRONG.get(ensemble, {})}
    _run(tmp_path / "full.h5", tiny_potential_path, steps=40, **settings)
    _run(tmp_path / "part.h5", tiny_potential_path, steps=20, **settings)
    summary = _resume(tmp_path / "part.h5", tiny_potential_path, steps=40, **settings)
    assert summary.start_step == 20 and summary.final_step == 40
    full, part = read_trajectory(tmp_path / "full.h5"), read_trajectory(tmp_path / "part.h5")
    np.testing.assert_array_equal(part["step"], np.arange(41))
    np.testing.assert_allclose(part["positions"], full["positions"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(part["velocities"], full["velocities"], rtol=0, atol=1e-10)
    state = full["attrs"]["integrator_state"]
    assert state.keys() == part["attrs"]["integrator_state"].keys()
    for key, value in state.items():
        np.testing.assert_allclose(part["attrs"]["integrator_state"][key], value, rtol=1e-10, err_msg=key)


def test_nose_hoover_settings_are_recorded_and_checked_on_resume(tmp_path, tiny_potential_path):
    path = tmp_path / "nhc.h5"
    _run(path, tiny_potential_path, steps=3, ensemble="nose-hoover", tdamp_fs=50.0, tchain=2)
    data = read_trajectory(path)
    assert data["attrs"]["tdamp_fs"] == 50.0 and data["attrs"]["tchain"] == 2
    assert len(data["attrs"]["integrator_state"]["p_eta"]) == 2
    assert "friction_per_fs" not in data["attrs"]
    convert_trajectory(path, tmp_path / "copy.h5")  # as resuming a killed run rewrites the file
    assert read_trajectory(tmp_path / "copy.h5")["attrs"]["integrator_state"] == data["attrs"]["integrator_state"]
    for changed, message in (({"tdamp_fs": 100.0, "tchain": 2}, "tdamp_fs: file 50.0 vs now 100.0"),
                             ({"tdamp_fs": 50.0, "tchain": 4}, "tchain: file 2 vs now 4"),
                             ({"tdamp_fs": 50.0, "tchain": 2, "temperature_K": 250.0},
                              "temperature_K: file 300.0 vs now 250.0")):
        with pytest.raises(TrajectoryError, match=f"settings differ \\({message}\\)"):
            _resume(path, tiny_potential_path, steps=6, ensemble="nose-hoover", **changed)
    with pytest.raises(TrajectoryError, match=r"settings differ \(ensemble: file 'nose-hoover' vs now 'langevin'\)"):
        _resume(path, tiny_potential_path, steps=6)


def test_settings_an_integrator_does_not_take_are_refused(tmp_path, tiny_potential_path):
    with pytest.raises(ValueError, match=r"ensemble 'nve' takes no friction_per_fs"):
        _run(tmp_path / "a.h5", tiny_potential_path, steps=2, ensemble="nve", friction_per_fs=0.1)
    with pytest.raises(ValueError, match="tchain must be an integer"):
        _run(tmp_path / "b.h5", tiny_potential_path, steps=2, ensemble="nose-hoover", tchain=2.5)
    with pytest.raises(ValueError, match="nose-hoover needs temperature_K > 0"):
        _run(tmp_path / "c.h5", tiny_potential_path, steps=2, ensemble="nose-hoover", temperature_K=0.0)
    with pytest.raises(ValueError, match="unknown ensemble 'npt'"):
        _run(tmp_path / "d.h5", tiny_potential_path, steps=2, ensemble="npt")
    assert not any(tmp_path.iterdir())


def _drop_integrator_state(path) -> None:
    with h5py.File(path, "r+") as h5:
        del h5["parameters/integrator_state"]


def test_files_without_integrator_state(tmp_path, tiny_potential_path):
    """Langevin files without the dataset resume as before; a Nose-Hoover file without it is refused."""
    _run(tmp_path / "full.h5", tiny_potential_path, steps=12)
    path = tmp_path / "old.h5"
    _run(path, tiny_potential_path, steps=6)
    _drop_integrator_state(path)
    assert "integrator_state" not in read_trajectory(path)["attrs"]
    _resume(path, tiny_potential_path, steps=12)
    np.testing.assert_allclose(read_trajectory(path)["positions"], read_trajectory(tmp_path / "full.h5")["positions"],
                               rtol=0, atol=1e-10)
    assert read_trajectory(path)["attrs"]["integrator_state"] == {}  # added on resume

    nhc = tmp_path / "nhc.h5"
    _run(nhc, tiny_potential_path, steps=3, ensemble="nose-hoover")
    _drop_integrator_state(nhc)
    with pytest.raises(TrajectoryError, match="holds no nose-hoover integrator state"):
        _resume(nhc, tiny_potential_path, steps=6, ensemble="nose-hoover")


class KickedVerlet(VelocityVerlet):
    """Velocity Verlet that adds ``kick`` Å/fs along x to atom 0 every step and counts its steps."""

    def __init__(self, atoms, timestep, kick):
        super().__init__(atoms, timestep)
        self.kick, self.count = kick, 0

    def step(self, forces=None):
        super().step(forces)
        velocities = self.atoms.get_velocities()
        velocities[0, 0] += self.kick / units.fs
        self.atoms.set_velocities(velocities)
        self.count += 1


@pytest.fixture
def kicked_verlet():
    spec = register_integrator(IntegratorSpec(
        "kicked-verlet", "velocity Verlet with a kick (test)",
        lambda atoms, settings, rng: KickedVerlet(atoms, settings["timestep_fs"] * units.fs, settings["kick"]),
        settings=(Setting("kick", 0.0, "Å/fs per step"),),
        state=lambda dyn: {"count": dyn.count}, restore=lambda dyn, state: setattr(dyn, "count", state["count"])))
    yield spec
    del INTEGRATORS[spec.name]


def test_a_registered_integrator_runs_through_the_cli(tmp_path, tiny_potential_path, kicked_verlet, capsys):
    path = tmp_path / "kicked.h5"
    args = ["--model", str(tiny_potential_path), "--trajectory", str(path), "--ensemble", "kicked-verlet",
            "--kick", "1e-3", "--dtype", "float64", "--no-progress"]
    main(["aspirin", "--steps", "4", *args])
    main(["--steps", "6", "--resume", *args])
    assert "kicked-verlet: steps 4 -> 6" in capsys.readouterr().out
    data = read_trajectory(path)
    assert data["attrs"]["kick"] == 1e-3 and data["attrs"]["integrator_state"] == {"count": 6}
    with pytest.raises(TrajectoryError, match="kick: file 0.001 vs now 0.002"):
        run_md(None, tiny_potential_path, ensemble="kicked-verlet", kick=2e-3, steps=8, trajectory=path,
               resume=True, dtype="float64", progress=False)


def test_a_setting_must_mean_the_same_for_every_integrator(kicked_verlet):
    with pytest.raises(ValueError, match="is registered already"):
        register_integrator(kicked_verlet)
    other = IntegratorSpec("other", "test", kicked_verlet.build, settings=(Setting("kick", 1.0, "another kick"),))
    with pytest.raises(ValueError, match="setting 'kick' of 'other' differs"):
        register_integrator(other)
    assert "other" not in INTEGRATORS
