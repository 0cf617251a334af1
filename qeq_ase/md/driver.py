"""Molecular dynamics with a qeq-ase potential: :func:`run_md` and the ``qeq-md`` CLI.

Integrators are ASE's, one :class:`~qeq_ase.md.integrators.IntegratorSpec` per ensemble in
:data:`~qeq_ase.md.integrators.INTEGRATORS`: ``langevin`` (:class:`ase.md.langevin.Langevin`,
Vanden-Eijnden & Ciccotti, Chem. Phys. Lett. 429, 310 (2006), Eq. 23) and ``nose-hoover``
(:class:`ase.md.nose_hoover_chain.NoseHooverChainNVT`) for NVT, ``nve``
(:class:`ase.md.verlet.VelocityVerlet`) for NVE. Random numbers come from one
``np.random.default_rng(seed)`` per run (initial velocities and Langevin noise), never from
the global ``np.random``.

Frames go to an H5MD file (layout in :mod:`qeq_ase.md.trajectory`) every ``write_every``
steps and are flushed every ``flush_every`` frames: an interrupted run loses at most
``flush_every`` frames, and ``resume=True`` continues from the last complete frame
(positions, velocities, step, the RNG state and the integrator's own state, such as the
Nose-Hoover chain, all saved with every block) without duplicating or skipping frames.

CLI::

    qeq-md rmd17:aspirin:0 --model aspirin_fp32 --steps 2000 --trajectory md.h5
    qeq-md --steps 4000 --trajectory md.h5 --resume      # the model of the file
    qeq-md convert md.h5 md.extxyz
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.constraints import FixCom

from ..cli.args import (ArgumentParser, bounded, non_negative_float, non_negative_int, positive_float, positive_int,
                        torch_device, user_errors)
from ..kernels.glibc_malloc import keep_large_allocations
from .identity import OBJECT_LABELS, calculator_identity, check_same_model
from .integrators import INTEGRATORS, IntegratorSpec, all_settings, check_setting, get_integrator
from .trajectory import TrajectoryError, read_trajectory
from .trajectory_writer import TrajectoryWriter, convert_trajectory

#: Settings that must agree between a run and its resumption, whatever the integrator
#: (each integrator adds its own: :attr:`~qeq_ase.md.integrators.IntegratorSpec.resume_checked`).
RESUME_CHECKED = ("ensemble", "timestep_fs", "write_every", "fix_com")


def default_rmd17_dir() -> Path:
    """``$QEQ_RMD17_DIR``, else ``../shared/rmd17`` relative to the working directory."""
    env = os.environ.get("QEQ_RMD17_DIR")
    return Path(env) if env else Path.cwd().parent / "shared" / "rmd17"


#: Start structures shipped with the package (``qeq_ase/tools/relax_structures.py`` writes them).
STRUCTURES_DIR = Path(__file__).resolve().parents[1] / "structures"


def shipped_structures() -> list[str]:
    """Names of the shipped start structures: the ten rMD17 molecules.

    >>> shipped_structures()[:3]
    ['aspirin', 'azobenzene', 'benzene']
    >>> load_start_structure("aspirin").get_chemical_formula()
    'C9H8O4'
    """
    return sorted(path.stem for path in STRUCTURES_DIR.glob("*.xyz"))


def load_start_structure(source: str | os.PathLike | Atoms, data_dir: str | os.PathLike | None = None) -> Atoms:
    """A copy of ``source``: Atoms, a shipped structure's name, ``rmd17:<molecule>[:<frame>[:<split>]]``
    or any ASE-readable file.

    A name from :func:`shipped_structures` (``"aspirin"``) is that molecule relaxed with its own
    float32 potential, shipped with the package (no data files needed).
    ``rmd17:aspirin:0`` is frame 0 of ``rmd17_aspirin_test_01.npz`` in ``data_dir``
    (default :func:`default_rmd17_dir`); the split is ``test`` unless given. Files are read
    with ``ase.io.read`` (last image of a multi-image file).
    """
    if isinstance(source, Atoms):
        atoms = source.copy()
        atoms.calc = None
        return atoms
    text = str(source)
    if text in shipped_structures() and not Path(text).exists():
        from ase.io import read

        return read(STRUCTURES_DIR / f"{text}.xyz")
    if text.startswith("rmd17:"):
        from ..data.dataset import load_rmd17, rmd17_path

        parts = text.split(":")[1:]
        if not 1 <= len(parts) <= 3 or not parts[0] or (len(parts) > 1 and not _is_int(parts[1])):
            raise ValueError(f"bad rMD17 source {text!r}; use rmd17:<molecule>[:<frame>[:<split>]], "
                             "e.g. rmd17:aspirin:0")
        frame = int(parts[1]) if len(parts) > 1 else 0
        split = parts[2] if len(parts) > 2 else "test"
        path = rmd17_path(parts[0], split, data_dir or default_rmd17_dir())
        if not path.is_file():
            raise FileNotFoundError(f"rMD17 file not found: {path} (set --data-dir or $QEQ_RMD17_DIR)")
        frames = load_rmd17(path)
        if not -len(frames) <= frame < len(frames):
            raise IndexError(f"frame {frame} out of range: {path.name} has {len(frames)} frames")
        return Atoms(numbers=frames.numbers, positions=frames.positions[frame])
    from ase.io import read

    if not Path(text).is_file():
        raise FileNotFoundError(f"start structure not found: {text} (a file, a shipped structure: "
                                f"{', '.join(shipped_structures())}, or rmd17:<molecule>:<frame>)")
    try:
        atoms = read(text)
    except Exception as err:  # ASE raises many kinds of errors on files it cannot parse
        raise ValueError(f"cannot read start structure {text} ({type(err).__name__}: {err}); "
                         "give a file ASE reads (.xyz, .extxyz, .traj, ...) or rmd17:<molecule>:<frame>") from err
    if len(atoms) == 0:
        raise ValueError(f"start structure {text} has no atoms")
    return atoms


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def initialize_velocities(atoms: Atoms, temperature_K: float, rng: np.random.Generator) -> None:
    """Maxwell-Boltzmann momenta at ``temperature_K`` from ``rng``, then zero total (angular) momentum."""
    from ase.md.velocitydistribution import Stationary, ZeroRotation

    try:
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:  # ASE < 3.29
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    else:
        thermalize_momenta(atoms, temperature_K, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)


@dataclass
class MDSummary:
    """What one call of :func:`run_md` did (temperatures and energies over its own frames)."""

    trajectory: str
    ensemble: str
    start_step: int
    final_step: int
    n_frames: int
    wall_s: float
    steps_per_s: float
    temperature_mean_K: float
    temperature_std_K: float
    total_energy_std_meV: float
    resumed: bool

    def to_dict(self) -> dict:
        return asdict(self)


def as_calculator(model, device: str = "cpu", dtype: str | None = None,
                  activation_limbs: int | None = None) -> Calculator:
    """An ASE calculator as is, else a :class:`~qeq_ase.calculator.QEqCalculator` of ``model``."""
    if isinstance(model, Calculator):
        return model
    from ..calculator import QEqCalculator

    return QEqCalculator(model, device=device, dtype=dtype, activation_limbs=activation_limbs)


def _frame(atoms: Atoms, step: int, timestep_fs: float) -> dict:
    """One row of every dataset of :data:`qeq_ase.md.trajectory.FRAME_FIELDS` (from cached results)."""
    potential = atoms.get_potential_energy()
    kinetic = atoms.get_kinetic_energy()
    return {
        "step": step, "time": step * timestep_fs, "positions": atoms.get_positions(),
        "velocities": atoms.get_velocities() * units.fs, "forces": atoms.get_forces(apply_constraint=False),
        "potential_energy": potential, "kinetic_energy": kinetic, "total_energy": potential + kinetic,
        "temperature": atoms.get_temperature(),
    }


def _resume_state(trajectory: Path, settings: dict, spec: IntegratorSpec) -> tuple[Atoms, int, dict]:
    """Atoms (positions, velocities), step and file attributes (RNG and integrator state, model)
    of the last complete frame of ``trajectory``."""
    data = read_trajectory(trajectory, fields=("step", "positions", "velocities"))
    attrs = data["attrs"]
    checked = RESUME_CHECKED + spec.resume_checked if attrs.get("ensemble") == spec.name else ("ensemble",)
    mismatched = {key: (attrs.get(key), settings[key]) for key in checked if attrs.get(key) != settings[key]}
    if mismatched:
        text = ", ".join(f"{k}: file {old!r} vs now {new!r}" for k, (old, new) in mismatched.items())
        raise TrajectoryError(f"cannot resume {trajectory}: settings differ ({text})")
    if len(data["step"]) == 0:
        raise TrajectoryError(f"{trajectory} holds no complete frame to resume from; start a new run")
    atoms = Atoms(numbers=data["numbers"], positions=data["positions"][-1], cell=data["cell"], pbc=attrs["pbc"],
                  masses=data["masses"])
    atoms.set_velocities(data["velocities"][-1] / units.fs)
    return atoms, int(data["step"][-1]), attrs


def _resumed_calculator(trajectory: Path, attrs: dict, model, device: str, dtype: str | None,
                        activation_limbs: int | None) -> Calculator:
    """The calculator of a resumed run: the file's model, dtype and limbs unless given; refused
    (naming both) when what is given differs from what the file records."""
    if model is None:
        model = attrs.get("model")
        if model is None or model in OBJECT_LABELS:
            raise TrajectoryError(f"cannot resume {trajectory}: its model was passed as a Python object "
                                  f"({model!r}); pass the same model again")
    if dtype is None and isinstance(model, (str, os.PathLike)):
        dtype = attrs.get("dtype") or None
    if activation_limbs is None and attrs.get("activation_limbs") and isinstance(model, (str, os.PathLike)):
        activation_limbs = int(attrs["activation_limbs"])
    calc = as_calculator(model, device, dtype, activation_limbs)
    check_same_model(trajectory, attrs, calculator_identity(calc))
    return calc


def run_md(atoms_or_source: Atoms | str | os.PathLike | None, model=None, *, ensemble: str = "langevin",
           temperature_K: float = 300.0, timestep_fs: float = 0.5, steps: int = 1000,
           trajectory: str | os.PathLike = "md.h5", write_every: int = 1, flush_every: int = 10,
           resume: bool = False, overwrite: bool = False, seed: int = 0, fix_com: bool = True,
           device: str = "cpu", dtype: str | None = None, activation_limbs: int | None = None,
           data_dir: str | os.PathLike | None = None, progress: bool | None = None,
           **integrator_settings: float | int) -> MDSummary:
    """Run MD with a registered integrator (Langevin by default) and append the frames to an HDF5 file.

    Args:
        atoms_or_source: start structure (see :func:`load_start_structure`); ignored, and
            may be None, when resuming. Without velocities, velocities are drawn from a
            Maxwell-Boltzmann distribution at ``temperature_K`` (zero total momentum and
            angular momentum); velocities it carries are kept.
        model: shipped potential name, path, built model, or any ASE calculator. None:
            ``"aspirin_fp32"`` for a new run; when resuming, the model the file records.
        ensemble: a name in :data:`~qeq_ase.md.integrators.INTEGRATORS`: ``"langevin"``,
            ``"nose-hoover"`` or ``"nve"``.
        temperature_K: thermostat temperature (NVT) and initial-velocity temperature.
        timestep_fs: time step in fs.
        steps: total number of steps of the trajectory; a resumed run continues up to it.
        trajectory: HDF5 output file.
        write_every: steps between frames (frame 0 is the start structure).
        flush_every: frames per block written to disk (the most a crash can lose).
        resume: continue ``trajectory`` from its last complete frame.
        overwrite: replace an existing ``trajectory`` (otherwise that is an error).
        seed: seed of the run's ``np.random.default_rng`` (velocities, Langevin noise).
        fix_com: keep the centre of mass fixed (``ase.constraints.FixCom``); removes 3 degrees
            of freedom from the temperature.
        device, dtype, activation_limbs: see :class:`~qeq_ase.calculator.QEqCalculator`
            (dtype None: float32 for names and paths, the model's own dtype for a built
            model). When resuming, None means what the file records; a model, dtype or
            activation limbs other than the file's is refused (:class:`TrajectoryError`).
        data_dir: rMD17 folder for ``rmd17:`` sources.
        progress: tqdm progress bar on stderr; None shows it only on a terminal.
        integrator_settings: the integrator's own settings by name (its
            :attr:`~qeq_ase.md.integrators.IntegratorSpec.settings`, with defaults and ranges):
            ``friction_per_fs`` (Langevin, 1/fs); ``tdamp_fs`` and ``tchain`` (Nose-Hoover).
            A name the integrator does not take is a ValueError.
    """
    spec = get_integrator(ensemble)
    _check_run_settings(timestep_fs=timestep_fs, temperature_K=temperature_K,
                        steps=steps, write_every=write_every, flush_every=flush_every)
    trajectory = Path(trajectory)
    settings = {"ensemble": ensemble, "timestep_fs": float(timestep_fs), "temperature_K": float(temperature_K),
                "write_every": int(write_every), "fix_com": bool(fix_com), **spec.own_settings(integrator_settings)}
    spec.validate(settings)
    rng = np.random.default_rng(seed)
    if resume:
        atoms, start_step, attrs = _resume_state(trajectory, settings, spec)
        if attrs.get("rng_state") is not None:
            rng.bit_generator.state = attrs["rng_state"]
        calc = _resumed_calculator(trajectory, attrs, model, device, dtype, activation_limbs)
    else:
        if trajectory.exists() and not overwrite:
            raise FileExistsError(f"{trajectory} exists; pass resume to continue it or overwrite to replace it")
        if atoms_or_source is None:
            raise ValueError("a start structure is needed unless resuming")
        atoms = load_start_structure(atoms_or_source, data_dir)
        start_step = 0
        calc = as_calculator("aspirin_fp32" if model is None else model, device, dtype, activation_limbs)
        atoms.calc = calc
        atoms.get_forces()  # fail on unknown elements, overlapping atoms etc. before anything else
        if not atoms.get_momenta().any() and temperature_K > 0:
            initialize_velocities(atoms, temperature_K, rng)
    if fix_com:
        atoms.set_constraint(FixCom())
    atoms.calc = calc
    atoms.get_forces()  # fail before a file is written; cached for step 1
    dyn = spec.build(atoms, settings, rng)

    if resume:
        _restore_integrator(trajectory, spec, dyn, attrs.get("integrator_state"))
        writer = TrajectoryWriter.append_to(trajectory, flush_every, {"steps": int(steps)})
    else:
        meta = {**settings, "seed": int(seed), **calculator_identity(calc), "device": str(device),
                "source": str(atoms_or_source) if not isinstance(atoms_or_source, Atoms) else "<Atoms>",
                "steps": int(steps)}
        writer = TrajectoryWriter.create(trajectory, atoms.numbers, atoms.get_masses(), atoms.cell[:], atoms.pbc,
                                         meta, flush_every)
    temperatures, totals = [], []

    def record(step: int) -> None:
        frame = _frame(atoms, step, timestep_fs)
        temperatures.append(frame["temperature"])
        totals.append(frame["total_energy"])
        writer.add(frame, rng_state=json.dumps(rng.bit_generator.state), integrator_state=json.dumps(spec.state(dyn)))

    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    t0 = time.perf_counter()
    step = start_step
    with writer, tqdm(total=steps, initial=start_step, unit="step", disable=not show, dynamic_ncols=True) as bar:
        if not resume:
            record(0)
        for step in range(start_step + 1, steps + 1):
            dyn.step()
            if step % write_every == 0:
                record(step)
            bar.update(1)
        n_frames = writer.n_frames
    wall_s = time.perf_counter() - t0
    steps_run = max(step - start_step, 0)
    return MDSummary(
        trajectory=str(trajectory), ensemble=ensemble, start_step=start_step, final_step=step, n_frames=n_frames,
        wall_s=wall_s, steps_per_s=steps_run / wall_s if wall_s > 0 else float("nan"),
        temperature_mean_K=float(np.mean(temperatures)) if temperatures else float("nan"),
        temperature_std_K=float(np.std(temperatures)) if temperatures else float("nan"),
        total_energy_std_meV=1e3 * float(np.std(totals)) if totals else float("nan"), resumed=resume,
    )


def _check_run_settings(**values) -> None:
    """ValueError naming the first setting out of range (the CLI checks the same in argparse)."""
    for name, low, strict in (("timestep_fs", 0, True), ("temperature_K", 0, False), ("steps", 0, False),
                              ("write_every", 1, False), ("flush_every", 1, False)):
        check_setting(name, values[name], low, strict)


def _restore_integrator(trajectory: Path, spec: IntegratorSpec, dyn, saved: dict | None) -> None:
    """Put the integrator state saved in ``trajectory`` into ``dyn``; a file without one resumes
    only integrators that keep no state of their own."""
    if saved is not None:
        spec.restore(dyn, saved)
    elif spec.state(dyn):
        raise TrajectoryError(f"cannot resume {trajectory}: it holds no {spec.name} integrator state")


def _run_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="qeq-md", description="MD with a qeq-ase potential, written to an HDF5 trajectory. "
        "Convert a trajectory with: qeq-md convert md.h5 out.extxyz")
    parser.add_argument("start", nargs="?", help="start structure: a shipped molecule (aspirin, ethanol, ...), an ASE-readable file or rmd17:<molecule>:<frame> "
                        "(not needed with --resume)")
    parser.add_argument("--model", default=None, help="shipped potential name or path (default aspirin_fp32; "
                        "with --resume, the model the trajectory records)")
    parser.add_argument("--ensemble", default="langevin", choices=list(INTEGRATORS), help="; ".join(
        f"{spec.name}: {spec.description}" for spec in INTEGRATORS.values()) + " (default langevin)")
    parser.add_argument("--temperature-K", type=non_negative_float, default=300.0,
                        help="K, >= 0 (default 300): thermostat and initial velocities")
    for setting in all_settings().values():
        parser.add_argument(setting.option, type=bounded(int if setting.integer else float, setting.minimum,
                                                         setting.strict, setting.name),
                            default=None, help=f"{setting.help} (default {setting.default})")
    parser.add_argument("--timestep-fs", type=positive_float, default=0.5, help="fs, > 0 (default 0.5)")
    parser.add_argument("--steps", type=non_negative_int, default=1000,
                        help="total steps of the trajectory (default 1000)")
    parser.add_argument("--trajectory", default="md.h5", help="HDF5 output (default md.h5)")
    parser.add_argument("--write-every", type=positive_int, default=1, help="steps between frames (default 1)")
    parser.add_argument("--flush-every", type=positive_int, default=10, help="frames per disk write (default 10)")
    parser.add_argument("--resume", action="store_true", help="continue --trajectory from its last frame")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --trajectory")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--no-fix-com", dest="fix_com", action="store_false", help="let the centre of mass move")
    parser.add_argument("--device", type=torch_device, default="cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float64"],
                        help="default float32; with --resume, the trajectory's")
    parser.add_argument("--activation-limbs", type=int, choices=(1, 2), default=None,
                        help="INT8 potentials: 1 (W8A8) or 2; default the file's (with --resume, the trajectory's)")
    parser.add_argument("--data-dir", default=None, help="rMD17 folder (default $QEQ_RMD17_DIR or ../shared/rmd17)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--export", default=None, help="also write the trajectory to this file (extxyz, traj, ...)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    return parser


def _convert_main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="qeq-md convert", description="HDF5 trajectory -> any ASE format, or -> a "
                            "trajectory in the current H5MD layout (an .h5/.hdf5/.h5md output; migrates older files).")
    parser.add_argument("trajectory", help="HDF5 file written by qeq-md")
    parser.add_argument("output", help="output file; format from the extension (.extxyz, .traj, ..., .h5)")
    parser.add_argument("--every", type=positive_int, default=1, help="keep every n-th frame")
    parser.add_argument("--format", default=None, help="ASE format name if the extension is not enough")
    args = parser.parse_args(argv)
    with user_errors("qeq-md convert"):
        count = convert_trajectory(args.trajectory, args.output, args.every, args.format)
    print(f"wrote {count} frames to {args.output}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert"]:
        return _convert_main(argv[1:])
    args = _run_parser().parse_args(argv)
    if args.start is None and not args.resume:
        _run_parser().error("a start structure is needed unless --resume is given")
    given = {name: getattr(args, name) for name in all_settings() if getattr(args, name) is not None}
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    keep_large_allocations()  # this command's own process (docs/speed.md)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a scheduler's SIGTERM stops like Ctrl-C
    try:
        with user_errors("qeq-md"):
            summary = run_md(
                args.start, args.model, ensemble=args.ensemble, temperature_K=args.temperature_K,
                timestep_fs=args.timestep_fs, steps=args.steps,
                trajectory=args.trajectory, write_every=args.write_every, flush_every=args.flush_every,
                resume=args.resume, overwrite=args.overwrite, seed=args.seed, fix_com=args.fix_com,
                device=args.device, dtype=args.dtype, activation_limbs=args.activation_limbs,
                data_dir=args.data_dir, progress=args.progress, **given,
            )
    except KeyboardInterrupt:
        print(f"\ninterrupted: all frames written so far are in {args.trajectory}; continue with --resume",
              file=sys.stderr)
        sys.exit(130)
    print(f"{summary.ensemble}: steps {summary.start_step} -> {summary.final_step} in {summary.wall_s:.1f} s "
          f"({summary.steps_per_s:.1f} steps/s); {summary.n_frames} frames in {summary.trajectory}")
    print(f"temperature {summary.temperature_mean_K:.1f} +- {summary.temperature_std_K:.1f} K; "
          f"total energy std {summary.total_energy_std_meV:.2f} meV")
    if args.export:
        with user_errors("qeq-md"):
            count = convert_trajectory(args.trajectory, args.export)
        print(f"wrote {count} frames to {args.export}")


if __name__ == "__main__":
    main()
