"""What the INT8 backward kernel does to accuracy, equivariance and NVE energy conservation.

Loads an INT8 potential three times with different input-gradient GEMMs
(:func:`qeq_ase.quant.int8_model.set_backward_kernel`): ``float`` (fp32 GEMMs, exact for the
straight-through gradient), ``auto`` (the default: with two-limb inputs, int8 GEMMs in every
layer where the GEMM is brgemm or an exact ``_int_mm``, the edge filters' on the gradient codes the
edge kernel writes; elsewhere int8 only in the filters) and ``int8`` (every one int8), and
measures for each: force and energy MAE on the first test frames, LEE (as ``qeq-report``:
5 test frames x 4 random rotations) and the NVE drift of ``qeq-report`` (200 fs Langevin at
300 K, then velocity Verlet, 0.5 fs).

    PYTHONPATH=. python experiments/int8_backward_md.py [aspirin_int8] [--molecule aspirin]
        [--frames 200] [--nve-ps 1.0] [--threads 1]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from qeq_ase.checks.conservation import check_energy_conservation
from qeq_ase.data.dataset import RMD17_MOLECULES, load_rmd17, rmd17_path
from qeq_ase.checks.equivariance import check_equivariance
from qeq_ase.train.evaluate import evaluate
from qeq_ase.quant.int8_model import set_backward_kernel
from qeq_ase.md.driver import default_rmd17_dir
from qeq_ase.io.registry import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("potential", nargs="?", default="aspirin_int8")
    parser.add_argument("--molecule", default="aspirin", choices=RMD17_MOLECULES)
    parser.add_argument("--frames", type=int, default=200, help="test frames for the MAE")
    parser.add_argument("--nve-ps", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = args.data_dir or default_rmd17_dir()
    test = load_rmd17(rmd17_path(args.molecule, "test", data_dir))
    lee_index = np.linspace(0, len(test) - 1, 5).astype(int)
    print("| backward | force MAE (meV/Å) | energy MAE (meV) | LEE (meV/Å) | NVE drift (meV/atom/ps) | std E_total (meV) |")
    print("|---|---|---|---|---|---|")
    for kind in ("float", "auto", "int8"):
        model, _ = load_model(args.potential)
        set_backward_kernel(model, kind)
        errors = evaluate(model, test.subset(np.arange(min(args.frames, len(test)))))
        lee = check_equivariance(model, test.numbers, test.positions[lee_index], n_rotations=4)
        nve = check_energy_conservation(model, f"rmd17:{args.molecule}:0", time_ps=args.nve_ps, timestep_fs=0.5,
                                        warmup_fs=200.0, temperature_K=300.0, data_dir=data_dir, progress=False)
        print(f"| {kind} | {errors['forces_mae_meV_per_A']:.4f} | {errors['energy_mae_meV']:.4f} | "
              f"{lee.lee_mean_meV_per_A:.4f} | {nve.drift_meV_per_atom_per_ps:.4f} | {nve.total_energy_std_meV:.4f} |")


if __name__ == "__main__":
    main()
