"""Fit the shipped ``<molecule>_fp32`` and ``<molecule>_int8`` potentials of rMD17 split 01.

    python benchmarks/fit_rmd17.py ethanol malonaldehyde --threads 1     # resumable; rerun after a stop

Each molecule goes through :func:`qeq_ase.train.fit.fit_potential` (the recipe of the aspirin
potentials) on ``rmd17_<molecule>_train_01.npz`` and is tested on all of
``rmd17_<molecule>_test_01.npz``; the files land in ``potentials/``. Budgets grow with the
number of atoms because an epoch's cost grows with the number of edges (nearly all pairs lie
within 5 Å in these molecules); ``qeq-report`` lists the epochs each molecule got. Two
molecules at a time on one thread each keep both cores busy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qeq_ase.data.dataset import RMD17_MOLECULES, rmd17_path
from qeq_ase.train.fit import fit_potential
from qeq_ase.md.driver import default_rmd17_dir

ROOT = Path(__file__).resolve().parents[1]
#: float32 minutes per molecule (atoms in brackets); the INT8 fine-tune gets INT8_MINUTES.
FP32_MINUTES = {
    "ethanol": 30, "malonaldehyde": 30,           # 9
    "benzene": 30, "uracil": 30,                  # 12
    "toluene": 45, "salicylic": 45,               # 15, 16
    "naphthalene": 45, "paracetamol": 60,         # 18, 20
    "aspirin": 100, "azobenzene": 60,             # 21, 24
}
INT8_MINUTES = 15


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("molecules", nargs="+", choices=RMD17_MOLECULES)
    parser.add_argument("--data-dir", default=None, help="rMD17 folder (default $QEQ_RMD17_DIR or ../shared/rmd17)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every budget (e.g. 0.3 on a GPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data_dir or default_rmd17_dir())
    for molecule in args.molecules:
        files = fit_potential(
            str(rmd17_path(molecule, "train", data)), str(rmd17_path(molecule, "test", data)), molecule,
            output_dir=str(ROOT / "potentials"), work_dir=str(ROOT / "runs" / "fit"),
            fp32_minutes=FP32_MINUTES[molecule] * args.scale, int8_minutes=INT8_MINUTES * args.scale,
            fp32_options={"device": args.device}, int8_options={"device": args.device},
        )
        print(molecule, {k: str(v) for k, v in files.items()}, flush=True)


if __name__ == "__main__":
    main()
