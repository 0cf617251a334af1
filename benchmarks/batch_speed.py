"""64 aspirin structures: one batched call against 64 sequential calculator calls.

    PYTHONPATH=. python benchmarks/batch_speed.py [--structures 64] [--threads 1 2] [--rounds 5]

Structures are the first ``--structures`` frames of the rMD17 aspirin test split (different
geometries, 21 atoms each). "sequential" is ``calc.get_potential_energy(atoms)`` plus
``calc.get_forces(atoms)`` for each in turn, as an ASE loop over replicas does;
"batched" is ``calc.calculate_batch(structures)`` (:func:`qeq_ase.md.batch.evaluate_batch`).
Both include their neighbour lists. Both run once to warm up, then ``--rounds`` times
interleaved; the fastest round of each is printed (the one least disturbed by other load on
a shared machine), with sequential / batched as the speed-up. The largest
differences from the sequential results are printed as a check. This script sets torch's
thread count and glibc's malloc thresholds (``qeq_ase.kernels.glibc_malloc``) for its own process.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from qeq_ase.calculator import QEqCalculator
from qeq_ase.data.dataset import load_rmd17
from qeq_ase.kernels.glibc_malloc import keep_large_allocations

RMD17 = Path(__file__).resolve().parents[2] / "shared" / "rmd17" / "rmd17_aspirin_test_01.npz"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def sequential(calc: QEqCalculator, structures: list[Atoms]) -> list[tuple[float, np.ndarray]]:
    return [(calc.get_potential_energy(a), calc.get_forces(a)) for a in structures]


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(RMD17), help="rMD17 .npz file of the structures")
    parser.add_argument("--structures", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=["aspirin_fp32", "aspirin_int8"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    keep_large_allocations()
    frames = load_rmd17(args.data)
    structures = [Atoms(numbers=frames.numbers, positions=p) for p in frames.positions[:args.structures]]
    print(f"{len(structures)} structures of {len(structures[0])} atoms; CPU: {cpu_name()}; torch {torch.__version__}")
    print(f"{'model':<14} {'threads':>7} {'sequential ms':>14} {'batched ms':>11} {'speed-up':>9} "
          f"{'max |dE| meV':>13} {'max |dF| meV/A':>15}")
    for name in args.models:
        calc = QEqCalculator(name)
        for threads in args.threads:
            torch.set_num_threads(threads)
            calc.reset()
            sequential(calc, structures)
            calc.calculate_batch(structures)
            seq_times, batch_times = [], []
            for _ in range(args.rounds):
                calc.reset()
                t, reference = timed(sequential, calc, structures)
                seq_times.append(t)
                t, batched = timed(calc.calculate_batch, structures)
                batch_times.append(t)
            de = max(abs(e - r[0]) for (e, _), r in zip(batched, reference))
            df = max(np.abs(f - r[1]).max() for (_, f), r in zip(batched, reference))
            seq, bat = min(seq_times), min(batch_times)
            print(f"{name:<14} {threads:>7} {1e3 * seq:>14.1f} {1e3 * bat:>11.1f} {seq / bat:>8.2f}x "
                  f"{1e3 * de:>13.4f} {1e3 * df:>15.4f}", flush=True)


if __name__ == "__main__":
    main()
