"""``qeq-check``: physics checks of a potential from the command line.

    qeq-check equivariance aspirin_fp32 --frames 10 --rotations 8 --dtype float64
    qeq-check nve aspirin_fp32 --time-ps 50 --timestep-fs 0.5 --plot nve.png

Both print a summary (``--json`` for machine-readable output) and exit with status 1 when
a bound given with ``--max-lee-meV-per-A`` or ``--max-drift-meV-per-atom-per-ps`` is exceeded.
Both run on the rMD17 molecule the potential file says it was trained on (aspirin if it
records none) unless ``--molecule`` / ``--start`` says otherwise.
Defaults are short so that a check finishes in minutes on a CPU: equivariance on 10 frames
x 8 rotations, NVE for 2 ps after a 0.2 ps Langevin warm-up at 300 K.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import numpy as np

from ..kernels.glibc_malloc import keep_large_allocations
from .args import (ArgumentParser, non_negative_float, non_negative_int, positive_float, positive_int,
                   torch_device, user_errors)

#: Molecule of a potential that records no rMD17 training file.
DEFAULT_MOLECULE = "aspirin"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="shipped potential name (e.g. aspirin_fp32) or path to a potential file")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", type=torch_device, default="cpu")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--data-dir", default=None, help="rMD17 folder (default $QEQ_RMD17_DIR or ../shared/rmd17)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--activation-limbs", type=int, choices=(1, 2), default=None,
                        help="INT8 potentials: 1 (W8A8) or 2 (two-limb inputs); default: the file's")


def _model(args):
    """The name or path, or (``--activation-limbs``) the loaded model with that input encoding."""
    if args.activation_limbs is None:
        return args.model
    from ..calculator import QEqCalculator

    return QEqCalculator(args.model, device=args.device, dtype=args.dtype,
                         activation_limbs=args.activation_limbs).model


def recorded_molecule(model: str) -> str | None:
    """The rMD17 molecule a potential file (name or path) was trained on, from its metadata."""
    from ..io.checkpoint import read_potential_file
    from ..data.dataset import RMD17_MOLECULES
    from ..io.registry import resolve_potential

    metadata = read_potential_file(resolve_potential(model))["metadata"]
    for record in (metadata.get("training_data"), metadata.get("test_errors")):
        found = re.match(r"rmd17_([a-z]+)_", str((record or {}).get("file", "")))
        if found and found.group(1) in RMD17_MOLECULES:
            return found.group(1)
    return None


def _molecule(args) -> str:
    """``--molecule``, else the potential's own molecule, else :data:`DEFAULT_MOLECULE`."""
    return args.molecule or recorded_molecule(args.model) or DEFAULT_MOLECULE


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="qeq-check", description="Physics checks of a qeq-ase potential.")
    sub = parser.add_subparsers(dest="check", required=True)
    eq = sub.add_parser("equivariance", help="rotation (LEE), translation and permutation errors on rMD17 frames")
    _common(eq)
    eq.add_argument("--molecule", default=None, help="rMD17 molecule (test split 01; default: the one the "
                    f"potential was trained on, else {DEFAULT_MOLECULE})")
    eq.add_argument("--frames", type=positive_int, default=10, help="random test frames (default 10)")
    eq.add_argument("--rotations", type=positive_int, default=8, help="Haar-random rotations per frame (default 8)")
    eq.add_argument("--max-lee-meV-per-A", type=non_negative_float, default=None,
                    help="fail if the mean LEE exceeds this")
    nve = sub.add_parser("nve", help="energy drift of NVE (velocity Verlet) after a Langevin warm-up")
    _common(nve)
    nve.add_argument("--start", default=None, help="start structure (default rmd17:MOLECULE:0)")
    nve.add_argument("--molecule", default=None, help="rMD17 molecule of the default start (default: the one "
                     f"the potential was trained on, else {DEFAULT_MOLECULE})")
    nve.add_argument("--time-ps", type=positive_float, default=2.0, help="NVE length in ps, > 0 (default 2)")
    nve.add_argument("--timestep-fs", type=positive_float, default=0.5, help="time step in fs, > 0 (default 0.5)")
    nve.add_argument("--warmup-fs", type=non_negative_float, default=200.0,
                     help="Langevin warm-up in fs, >= 0 (default 200)")
    nve.add_argument("--temperature-K", type=non_negative_float, default=300.0)
    nve.add_argument("--friction-per-fs", type=non_negative_float, default=0.01)
    nve.add_argument("--plot", default=None, help="PNG of total/potential/kinetic energy (needs matplotlib)")
    nve.add_argument("--max-drift-meV-per-atom-per-ps", type=non_negative_float, default=None,
                     help="fail if |drift| exceeds this")
    return parser


def _equivariance(args) -> tuple[dict, bool]:
    from ..data.dataset import load_rmd17, rmd17_path
    from ..checks.equivariance import check_equivariance
    from ..md.driver import default_rmd17_dir

    molecule = _molecule(args)
    path = rmd17_path(molecule, "test", args.data_dir or default_rmd17_dir())
    if not path.is_file():
        raise FileNotFoundError(f"rMD17 file not found: {path} (set --data-dir or $QEQ_RMD17_DIR)")
    frames = load_rmd17(path)
    rng = np.random.default_rng(args.seed)
    index = np.sort(rng.choice(len(frames), size=min(args.frames, len(frames)), replace=False))
    result = check_equivariance(_model(args), frames.numbers, frames.positions[index], n_rotations=args.rotations,
                                seed=args.seed, dtype=args.dtype, device=args.device)
    report = {"model": args.model, "molecule": molecule, **result.to_dict()}
    ok = args.max_lee_meV_per_A is None or result.lee_mean_meV_per_A <= args.max_lee_meV_per_A
    return report, ok


def _nve(args) -> tuple[dict, bool]:
    from ..checks.conservation import check_energy_conservation, plot_energies

    start = args.start or f"rmd17:{_molecule(args)}:0"
    result = check_energy_conservation(
        _model(args), start, time_ps=args.time_ps, timestep_fs=args.timestep_fs, warmup_fs=args.warmup_fs,
        temperature_K=args.temperature_K, friction_per_fs=args.friction_per_fs, seed=args.seed,
        device=args.device, dtype=args.dtype, data_dir=args.data_dir,
    )
    if args.plot:
        plot_energies({args.model: result}, args.plot)
    report = {"model": args.model, "start": start, "dtype": args.dtype, "activation_limbs": args.activation_limbs,
              **result.summary()}
    bound = args.max_drift_meV_per_atom_per_ps
    return report, bound is None or abs(result.drift_meV_per_atom_per_ps) <= bound


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    keep_large_allocations()  # this command's own process (docs/speed.md)
    with user_errors("qeq-check"):
        report, ok = (_equivariance if args.check == "equivariance" else _nve)(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        width = max(len(k) for k in report)
        for key, value in report.items():
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            print(f"{key:<{width}}  {text}")
    if args.check == "nve" and args.plot:
        print(f"plot written to {args.plot}", file=sys.stderr)
    if not ok:
        print("qeq-check: FAILED: bound exceeded", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
