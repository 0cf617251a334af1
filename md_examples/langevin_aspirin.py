"""Langevin MD of aspirin at 300 K with a qeq-ase potential, written to an HDF5 trajectory.

Starts from frame 0 of the rMD17 aspirin test split, draws Maxwell-Boltzmann velocities,
and runs ``--steps`` steps of ASE's Langevin integrator (0.5 fs, friction 0.01/fs) through
:func:`qeq_ase.md.driver.run_md`. Run from the repository root (the rMD17 files are expected in
``../shared/rmd17``, or set ``--data-dir`` / ``$QEQ_RMD17_DIR``)::

    python md_examples/langevin_aspirin.py                      # aspirin_int8, 2000 steps (1 ps)
    python md_examples/langevin_aspirin.py --model aspirin_fp32 --steps 20000 --trajectory aspirin_fp32.h5
    qeq-md convert aspirin_md.h5 aspirin_md.extxyz              # view with: ase gui aspirin_md.extxyz

The same run from the shell: ``qeq-md rmd17:aspirin:0 --model aspirin_int8 --steps 2000``.
Interrupted runs continue with ``--resume``.
"""

from __future__ import annotations

import argparse

from qeq_ase.md.driver import run_md


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="aspirin_int8", help="shipped potential name or path")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--temperature-K", type=float, default=300.0)
    parser.add_argument("--timestep-fs", type=float, default=0.5)
    parser.add_argument("--trajectory", default="aspirin_md.h5")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = run_md("rmd17:aspirin:0", args.model, ensemble="langevin", temperature_K=args.temperature_K,
                     friction_per_fs=0.01, timestep_fs=args.timestep_fs, steps=args.steps,
                     trajectory=args.trajectory, resume=args.resume, overwrite=not args.resume, seed=args.seed,
                     data_dir=args.data_dir)
    print(f"{summary.final_step} steps ({summary.final_step * args.timestep_fs / 1e3:.2f} ps) at "
          f"{summary.steps_per_s:.1f} steps/s; T = {summary.temperature_mean_K:.1f} +- "
          f"{summary.temperature_std_K:.1f} K; trajectory: {summary.trajectory}")


if __name__ == "__main__":
    main()
