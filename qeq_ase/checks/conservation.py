"""Energy conservation in NVE: drift of the total energy under velocity Verlet.

With exact forces ``F = -dE/dx`` of a smooth potential, velocity Verlet conserves a
shadow Hamiltonian: the total energy ``E_pot + E_kin`` fluctuates by ``O(dt^2)`` around a
constant but does not drift. A systematic drift therefore points at forces that are not
the gradient of the energy (or not smooth): a cutoff with a discontinuous derivative,
noisy low-precision arithmetic, or a time step too long for the fastest vibration
(C-H stretches, ~11 fs period, in aspirin).

The check thermalises a structure with Langevin dynamics (``warmup_fs``), then runs NVE
for ``time_ps`` and reports

* ``drift_meV_per_atom_per_ps``: slope of a least-squares line through the total energy
  per atom against time (signed);
* ``end_start_over_kinetic_std``: ``|E(end) - E(start)| / std(E_kin)``, the change of the
  total energy in units of the kinetic-energy fluctuations it should be small against;
* ``total_energy_std_meV``: standard deviation of the total energy (whole system).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms
from ase.constraints import FixCom

from ..md.driver import as_calculator, initialize_velocities, load_start_structure
from ..md.integrators import INTEGRATORS


@dataclass
class ConservationResult:
    """Outcome of :func:`check_energy_conservation`; arrays are per recorded NVE step."""

    drift_meV_per_atom_per_ps: float
    end_start_over_kinetic_std: float
    total_energy_std_meV: float
    temperature_mean_K: float
    n_atoms: int
    timestep_fs: float
    time_ps: float
    warmup_fs: float
    wall_s: float
    steps_per_s: float
    time_fs: np.ndarray = field(repr=False)
    potential_energy_eV: np.ndarray = field(repr=False)
    kinetic_energy_eV: np.ndarray = field(repr=False)

    @property
    def total_energy_eV(self) -> np.ndarray:
        return self.potential_energy_eV + self.kinetic_energy_eV

    def summary(self) -> dict:
        """The scalar results (no arrays), e.g. for JSON."""
        return {k: v for k, v in self.__dict__.items() if not isinstance(v, np.ndarray)}


def drift_per_atom_per_ps(time_fs: np.ndarray, total_energy_eV: np.ndarray, n_atoms: int) -> float:
    """Slope (meV/atom/ps) of a least-squares line through the total energy per atom vs time."""
    slope_eV_per_fs = np.polyfit(time_fs, total_energy_eV, 1)[0]
    return float(slope_eV_per_fs * 1e3 / n_atoms * 1e3)


def check_energy_conservation(model="aspirin_fp32", atoms: Atoms | str | None = None, *, time_ps: float = 5.0,
                              timestep_fs: float = 0.5, warmup_fs: float = 200.0, temperature_K: float = 300.0,
                              friction_per_fs: float = 0.01, record_every: int = 1, seed: int = 0,
                              device: str = "cpu", dtype: str | None = None,
                              data_dir: str | os.PathLike | None = None,
                              progress: bool | None = None) -> ConservationResult:
    """Langevin warm-up, then ``time_ps`` of velocity-Verlet NVE; see the module docstring.

    Args:
        model: shipped potential name, path, built model or ASE calculator.
        atoms: start structure (Atoms, file or ``rmd17:<molecule>:<frame>``); default
            ``rmd17:aspirin:0``.
        time_ps: NVE length.
        timestep_fs: time step of warm-up and NVE.
        warmup_fs: Langevin warm-up at ``temperature_K`` with ``friction_per_fs`` (0: none,
            velocities only drawn from Maxwell-Boltzmann).
        record_every: NVE steps between recorded energies.
        seed: seeds the velocities and the Langevin noise (a private generator).
        device, dtype: see :class:`~qeq_ase.calculator.QEqCalculator`.
    """
    from tqdm.auto import tqdm

    for name, value, strict in (("time_ps", time_ps, True), ("timestep_fs", timestep_fs, True),
                                ("warmup_fs", warmup_fs, False), ("temperature_K", temperature_K, False),
                                ("friction_per_fs", friction_per_fs, False)):
        if not np.isfinite(value) or value < 0 or (strict and value == 0):
            raise ValueError(f"{name} must be {'>' if strict else '>='} 0, got {value}")
    if record_every < 1 or time_ps * 1e3 < 2 * timestep_fs * record_every:
        raise ValueError(f"time_ps={time_ps} must span at least two recorded NVE steps of {timestep_fs} fs "
                         f"(record_every={record_every}) to fit a drift")
    atoms = load_start_structure("rmd17:aspirin:0" if atoms is None else atoms, data_dir)
    rng = np.random.default_rng(seed)
    initialize_velocities(atoms, temperature_K, rng)
    atoms.set_constraint(FixCom())
    atoms.calc = as_calculator(model, device, dtype)
    n_warmup = int(round(warmup_fs / timestep_fs))
    n_steps = int(round(time_ps * 1e3 / timestep_fs))
    show = sys.stderr.isatty() if progress is None else progress
    t0 = time.perf_counter()
    with tqdm(total=n_warmup + n_steps, unit="step", disable=not show, dynamic_ncols=True) as bar:
        settings = {"timestep_fs": timestep_fs, "temperature_K": temperature_K, "friction_per_fs": friction_per_fs}
        warmup = INTEGRATORS["langevin"].build(atoms, settings, rng)
        for _ in range(n_warmup):
            warmup.step()
            bar.update(1)
        nve = INTEGRATORS["nve"].build(atoms, settings, rng)
        steps, potential, kinetic, temperature = [0], [atoms.get_potential_energy()], [atoms.get_kinetic_energy()], []
        for step in range(1, n_steps + 1):
            nve.step()
            if step % record_every == 0:
                steps.append(step)
                potential.append(atoms.get_potential_energy())
                kinetic.append(atoms.get_kinetic_energy())
                temperature.append(atoms.get_temperature())
            bar.update(1)
    wall_s = time.perf_counter() - t0
    time_fs = np.asarray(steps, dtype=np.float64) * timestep_fs
    potential, kinetic = np.asarray(potential), np.asarray(kinetic)
    total = potential + kinetic
    return ConservationResult(
        drift_meV_per_atom_per_ps=drift_per_atom_per_ps(time_fs, total, len(atoms)),
        end_start_over_kinetic_std=float(abs(total[-1] - total[0]) / np.std(kinetic)),
        total_energy_std_meV=1e3 * float(np.std(total)),
        temperature_mean_K=float(np.mean(temperature)) if temperature else float("nan"),
        n_atoms=len(atoms), timestep_fs=float(timestep_fs), time_ps=float(time_ps), warmup_fs=float(warmup_fs),
        wall_s=wall_s, steps_per_s=(n_warmup + n_steps) / wall_s,
        time_fs=time_fs, potential_energy_eV=potential, kinetic_energy_eV=kinetic,
    )


def plot_energies(results: dict[str, ConservationResult] | ConservationResult, path: str | os.PathLike,
                  title: str | None = None) -> None:
    """PNG of total, potential and kinetic energy (meV, relative to their start) vs time (ps).

    ``results`` maps labels (e.g. model names) to results; one result is labelled "model".
    Needs matplotlib (``pip install qeq-ase[plot]``); uses the non-interactive Agg backend
    through a Figure object, so pyplot's global state is untouched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(results, ConservationResult):
        results = {"model": results}
    fig = Figure(figsize=(7, 7), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True)
    for label, result in results.items():
        t_ps = result.time_fs / 1e3
        for ax, energy in zip(axes, (result.total_energy_eV, result.potential_energy_eV, result.kinetic_energy_eV)):
            ax.plot(t_ps, 1e3 * (energy - energy[0]), lw=0.8,
                    label=f"{label} (drift {result.drift_meV_per_atom_per_ps:.3g} meV/atom/ps)"
                    if ax is axes[0] else label)
    for ax, name in zip(axes, ("total", "potential", "kinetic")):
        ax.set_ylabel(f"{name} - start (meV)")
    axes[0].legend(fontsize="small")
    axes[-1].set_xlabel("time (ps)")
    fig.suptitle(title or "NVE energy conservation")
    fig.savefig(path, dpi=120)
