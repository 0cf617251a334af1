"""Geometry optimisation (BFGS) and harmonic frequencies of aspirin for qeq-ase potentials.

For each model: BFGS from rMD17 aspirin frame 0 to ``--fmax`` (eV/Å), then
``ase.vibrations.Vibrations`` (central differences, 0.01 Å) at the minimum. Prints the
final energy, the number of imaginary modes beyond the six near-zero rigid-body modes,
the highest frequencies (cm^-1) and the zero-point energy, side by side for all models::

    python md_examples/optimize_and_vibrate.py                        # aspirin_fp32 and aspirin_int8
    python md_examples/optimize_and_vibrate.py --models aspirin_fp32 --dtype float32

Finite differences of forces need precise forces, so float potentials run in float64 by
default (``--dtype float32`` to see what the MD precision gives); INT8 potentials compute
in float32 around their integer kernels, whatever ``--dtype`` says.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from ase import units
from ase.optimize import BFGS
from ase.vibrations import Vibrations

from qeq_ase.calculator import QEqCalculator
from qeq_ase.quant.int8_model import is_int8_model
from qeq_ase.md.driver import load_start_structure


def optimize_and_vibrate(model: str, fmax: float, dtype: str, data_dir=None, max_steps: int = 1000) -> dict:
    atoms = load_start_structure("rmd17:aspirin:0", data_dir)
    calc = QEqCalculator(model)
    if not is_int8_model(calc.model):
        calc = QEqCalculator(model, dtype=dtype)
    atoms.calc = calc
    optimizer = BFGS(atoms, logfile=None)
    converged = optimizer.run(fmax=fmax, steps=max_steps)
    with tempfile.TemporaryDirectory() as cache:  # Vibrations caches displaced forces on disk
        vib = Vibrations(atoms, name=str(Path(cache) / "vib"), delta=0.01, nfree=2)
        vib.run()
        frequencies_cm = vib.get_frequencies()  # complex; imaginary for negative curvature
    internal = frequencies_cm[np.argsort(np.abs(frequencies_cm))[6:]]  # drop the 6 rigid-body modes
    return {
        "energy_eV": atoms.get_potential_energy(), "bfgs_steps": optimizer.nsteps, "converged": bool(converged),
        "imaginary_modes": int(np.sum(np.abs(internal.imag) > 1e-6)),
        "highest_cm": np.sort(internal.real)[-5:],
        "zpe_eV": 0.5 * float(np.sum(internal.real[internal.imag == 0])) * units.invcm,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", "--model", nargs="+", default=["aspirin_fp32", "aspirin_int8"],
                        help="shipped potential names or paths")
    parser.add_argument("--fmax", type=float, default=0.01, help="BFGS force criterion (eV/Å)")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"],
                        help="float potentials only; INT8 potentials compute in float32")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    for model in args.models:
        r = optimize_and_vibrate(model, args.fmax, args.dtype, args.data_dir)
        highest = ", ".join(f"{w:.0f}" for w in r["highest_cm"])
        print(f"{model}: E = {r['energy_eV']:.4f} eV after {r['bfgs_steps']} BFGS steps "
              f"(converged {r['converged']}); imaginary internal modes: {r['imaginary_modes']}; "
              f"highest: {highest} cm^-1; ZPE {r['zpe_eV']:.3f} eV")


if __name__ == "__main__":
    main()
