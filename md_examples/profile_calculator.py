"""Calls per second of QEqCalculator (energy + forces) on one aspirin molecule.

Each call moves the atoms by a small random displacement, so ASE's cache never answers
and every call runs the neighbour list, the network and the backward pass. For comparison
the script also times ``model.energy_and_forces`` alone on a prepared graph: the
difference is the calculator's per-call overhead (ASE bookkeeping, tensor conversion,
neighbour list).

    OMP_NUM_THREADS=1 python md_examples/profile_calculator.py --model aspirin_fp32 --threads 1
    python md_examples/profile_calculator.py --model random   # untrained model, architecture of aspirin_fp32

``--model random`` builds ``QEqModel(ModelConfig())`` (128 features, 4 layers, 8 heads:
the architecture of ``configs/aspirin_fp32.yaml``) for timing before a trained file exists.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from qeq_ase.calculator import QEqCalculator
from qeq_ase.checkpoint import save_potential
from qeq_ase.dataset import load_rmd17
from qeq_ase.model import ModelConfig, QEqModel
from qeq_ase.neighbors import molecule_edges


def aspirin_atoms(data_dir: Path) -> Atoms:
    frames = load_rmd17(data_dir / "rmd17_aspirin_test_01.npz")
    return Atoms(numbers=frames.numbers, positions=frames.positions[0])


def time_calls(function, calls: int, warmup: int = 5) -> float:
    """Calls per second of ``function()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        function()
    t0 = time.perf_counter()
    for _ in range(calls):
        function()
    return calls / (time.perf_counter() - t0)


def main() -> None:
    default_dir = os.environ.get("QEQ_RMD17_DIR", str(Path.cwd().parent / "shared" / "rmd17"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="aspirin_fp32", help="shipped name, path, or 'random'")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    parser.add_argument("--data-dir", default=default_dir)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model == "random":  # saved and loaded like a shipped potential
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = save_potential(Path(tmp) / "random.pt", QEqModel(ModelConfig()), {})
        calc = QEqCalculator(model, device=args.device, dtype=args.dtype)
    atoms = aspirin_atoms(Path(args.data_dir))
    atoms.calc = calc
    rng = np.random.default_rng(0)
    start = atoms.positions.copy()

    def calculator_call():
        atoms.positions = start + rng.normal(scale=1e-3, size=start.shape)
        atoms.get_forces()

    positions = torch.as_tensor(start, dtype=calc.dtype, device=calc.device)
    species = calc.model.species_index(torch.as_tensor(atoms.numbers, device=calc.device))
    batch = torch.zeros(len(atoms), dtype=torch.long, device=calc.device)
    edge_index = molecule_edges(positions, calc.cutoff_A)

    def model_call():
        calc.model.energy_and_forces(positions, species, edge_index, batch, 1)

    calls_per_s = time_calls(calculator_call, args.calls)
    model_calls_per_s = time_calls(model_call, args.calls)
    print(f"model {args.model} ({args.dtype}, {args.device}, {torch.get_num_threads()} thread(s)), "
          f"{len(atoms)} atoms: calculator {calls_per_s:.1f} calls/s ({1e3 / calls_per_s:.2f} ms/call); "
          f"model alone {model_calls_per_s:.1f} calls/s ({1e3 / model_calls_per_s:.2f} ms/call)")

if __name__ == "__main__":
    main()
