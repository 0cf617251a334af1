"""NVE energy conservation of aspirin for one or more qeq-ase potentials, with a plot.

For each model: 100 fs of Langevin warm-up at 300 K from rMD17 aspirin frame 0, then
``--time-ps`` of velocity-Verlet NVE (:func:`qeq_ase.checks.conservation.check_energy_conservation`).
Prints the drift (meV/atom/ps), |E_end - E_start| / std(E_kin) and std(E_total), and
plots total, potential and kinetic energy of all models into one PNG::

    python md_examples/nve_conservation.py                                  # aspirin_fp32 and aspirin_int8, 0.5 ps each (~1 min)
    python md_examples/nve_conservation.py --models aspirin_int8 --time-ps 50 --plot nve_int8.png

Same seed for every model, so all start from the same thermalised velocities draw.
"""

from __future__ import annotations

import argparse

from qeq_ase.checks.conservation import check_energy_conservation, plot_energies


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", "--model", nargs="+", default=["aspirin_fp32", "aspirin_int8"],
                        help="shipped potential names or paths")
    parser.add_argument("--time-ps", type=float, default=0.5)
    parser.add_argument("--timestep-fs", type=float, default=0.5)
    parser.add_argument("--warmup-fs", type=float, default=100.0)
    parser.add_argument("--plot", default="nve.png", help="PNG output ('' for none)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = {}
    for model in args.models:
        result = check_energy_conservation(model, "rmd17:aspirin:0", time_ps=args.time_ps,
                                           timestep_fs=args.timestep_fs, warmup_fs=args.warmup_fs,
                                           seed=args.seed, data_dir=args.data_dir)
        results[model] = result
        print(f"{model}: drift {result.drift_meV_per_atom_per_ps:+.4f} meV/atom/ps, "
              f"|dE|/std(KE) {result.end_start_over_kinetic_std:.4f}, std(E_total) "
              f"{result.total_energy_std_meV:.3f} meV, <T> {result.temperature_mean_K:.0f} K, "
              f"{result.steps_per_s:.0f} steps/s")
    if args.plot:
        plot_energies(results, args.plot, title=f"aspirin NVE, {args.timestep_fs} fs time step")
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
