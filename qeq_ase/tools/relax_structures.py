"""Write the start structures shipped in ``qeq_ase/structures/``: each rMD17 molecule relaxed
with its own float32 potential, so that MD and the quick start run without the rMD17 files.

    python -m qeq_ase.tools.relax_structures [MOLECULE ...] [--data-dir ../shared/rmd17]

Frame 0 of ``rmd17_<molecule>_train_01.npz`` is relaxed with ASE's BFGS to a largest force
component of 5 meV/Å; only the relaxed positions are written (extended XYZ, Å), never an
rMD17 frame.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import ase.io
from ase import Atoms
from ase.optimize import BFGS

from qeq_ase import QEqCalculator
from qeq_ase.data.dataset import RMD17_MOLECULES, load_rmd17, rmd17_path
from qeq_ase.md.driver import default_rmd17_dir

OUT = Path(__file__).resolve().parents[1] / "structures"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("molecules", nargs="*", metavar="MOLECULE",
                        help=f"molecules to relax (default: all of {', '.join(RMD17_MOLECULES)})")
    parser.add_argument("--data-dir", default=None, help="rMD17 folder (default $QEQ_RMD17_DIR or ../shared/rmd17)")
    args = parser.parse_args()
    unknown = sorted(set(args.molecules) - set(RMD17_MOLECULES))
    if unknown:
        parser.error(f"unknown molecule(s) {', '.join(unknown)}; choose from {', '.join(RMD17_MOLECULES)}")
    OUT.mkdir(exist_ok=True)
    for molecule in args.molecules or RMD17_MOLECULES:
        frames = load_rmd17(rmd17_path(molecule, "train", Path(args.data_dir or default_rmd17_dir())))
        atoms = Atoms(numbers=frames.numbers, positions=frames.positions[0])
        atoms.positions -= atoms.positions.mean(axis=0)
        atoms.calc = QEqCalculator(f"{molecule}_fp32")
        BFGS(atoms, logfile=None).run(fmax=0.005, steps=2000)
        fmax = abs(atoms.get_forces()).max()
        relaxed = Atoms(numbers=atoms.numbers, positions=atoms.positions)
        relaxed.info["comment"] = f"{molecule} relaxed with {molecule}_fp32 (BFGS, largest force {fmax * 1e3:.1f} meV/A)"
        ase.io.write(OUT / f"{molecule}.xyz", relaxed, format="extxyz")
        print(f"{molecule}: {len(atoms)} atoms, largest force {fmax * 1e3:.2f} meV/Å -> {OUT / f'{molecule}.xyz'}")


if __name__ == "__main__":
    main()
