"""``qeq-check``: physics checks of a potential from the command line.

    qeq-check equivariance aspirin_fp32 --frames 10 --rotations 8 --dtype float64
    qeq-check nve aspirin_fp32 --time-ps 50 --timestep-fs 0.5 --plot nve.png

Both print a summary (``--json`` for machine-readable output) and exit with status 1 when
a bound given with ``--max-lee-meV-per-A`` or ``--max-drift-meV-per-atom-per-ps`` is exceeded.
Defaults are short so that a check finishes in minutes on a CPU: equivariance on 10 frames
x 8 rotations, NVE for 2 ps after a 0.2 ps Langevin warm-up at 300 K.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from .glibc_malloc import keep_large_allocations


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="shipped potential name (e.g. aspirin_fp32) or path to a potential file")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="rMD17 folder (default $QEQ_RMD17_DIR or ../shared/rmd17)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--activation-limbs", type=int, choices=(1, 2), default=None,
                        help="INT8 potentials: 1 (W8A8) or 2 (two-limb inputs); default: the file's")


def _model(args):
    """The name or path, or (``--activation-limbs``) the loaded model with that input encoding."""
    if args.activation_limbs is None:
        return args.model
    from .calculator import QEqCalculator

    return QEqCalculator(args.model, device=args.device, dtype=args.dtype,
                         activation_limbs=args.activation_limbs).model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qeq-check", description="Physics checks of a qeq-ase potential.")
    sub = parser.add_subparsers(dest="check", required=True)
    eq = sub.add_parser("equivariance", help="rotation (LEE), translation and permutation errors on rMD17 frames")
    _common(eq)
    eq.add_argument("--molecule", default="aspirin", help="rMD17 molecule (test split 01; default aspirin)")
    eq.add_argument("--frames", type=int, default=10, help="random test frames (default 10)")
    eq.add_argument("--rotations", type=int, default=8, help="Haar-random rotations per frame (default 8)")
    eq.add_argument("--max-lee-meV-per-A", type=float, default=None, help="fail if the mean LEE exceeds this")
    nve = sub.add_parser("nve", help="energy drift of NVE (velocity Verlet) after a Langevin warm-up")
    _common(nve)
    nve.add_argument("--start", default="rmd17:aspirin:0", help="start structure (default rmd17:aspirin:0)")
    nve.add_argument("--time-ps", type=float, default=2.0, help="NVE length in ps (default 2)")
    nve.add_argument("--timestep-fs", type=float, default=0.5, help="time step in fs (default 0.5)")
    nve.add_argument("--warmup-fs", type=float, default=200.0, help="Langevin warm-up in fs (default 200)")
    nve.add_argument("--temperature-K", type=float, default=300.0)
    nve.add_argument("--friction-per-fs", type=float, default=0.01)
    nve.add_argument("--plot", default=None, help="PNG of total/potential/kinetic energy (needs matplotlib)")
    nve.add_argument("--max-drift-meV-per-atom-per-ps", type=float, default=None,
                     help="fail if |drift| exceeds this")
    return parser


def _equivariance(args) -> tuple[dict, bool]:
    from .dataset import load_rmd17, rmd17_path
    from .equivariance import check_equivariance
    from .md import default_rmd17_dir

    frames = load_rmd17(rmd17_path(args.molecule, "test", args.data_dir or default_rmd17_dir()))
    rng = np.random.default_rng(args.seed)
    index = np.sort(rng.choice(len(frames), size=min(args.frames, len(frames)), replace=False))
    result = check_equivariance(_model(args), frames.numbers, frames.positions[index], n_rotations=args.rotations,
                                seed=args.seed, dtype=args.dtype, device=args.device)
    report = {"model": args.model, "molecule": args.molecule, **result.to_dict()}
    ok = args.max_lee_meV_per_A is None or result.lee_mean_meV_per_A <= args.max_lee_meV_per_A
    return report, ok


def _nve(args) -> tuple[dict, bool]:
    from .conservation import check_energy_conservation, plot_energies

    result = check_energy_conservation(
        _model(args), args.start, time_ps=args.time_ps, timestep_fs=args.timestep_fs, warmup_fs=args.warmup_fs,
        temperature_K=args.temperature_K, friction_per_fs=args.friction_per_fs, seed=args.seed,
        device=args.device, dtype=args.dtype, data_dir=args.data_dir,
    )
    if args.plot:
        plot_energies({args.model: result}, args.plot)
    report = {"model": args.model, "dtype": args.dtype, "activation_limbs": args.activation_limbs, **result.summary()}
    bound = args.max_drift_meV_per_atom_per_ps
    return report, bound is None or abs(result.drift_meV_per_atom_per_ps) <= bound


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    keep_large_allocations()  # this command's own process (docs/speed.md)
    try:
        report, ok = (_equivariance if args.check == "equivariance" else _nve)(args)
    except (ValueError, FileNotFoundError, IndexError) as err:
        print(f"qeq-check: error: {err}", file=sys.stderr)
        sys.exit(2)
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
