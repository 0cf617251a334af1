"""Energy + forces with the edge filters computed once per pair of edges, against once per edge.

An edge and its reverse have the same length, so the fused inference path computes the radial
features and the edge-filter GEMM (the largest product of a call) once per atom pair
(``edge_kernel.EdgePairs``). This times the shipped fp32 and INT8 calculators on copies of rMD17
aspirin (as in ``inference_speed.py``) with pairs and with per-edge filters
(``edge_kernel.edge_pairs`` answering None), alternated call by call, and prints the median ms per
call.

    PYTHONPATH=.:benchmarks python experiments/edge_pairs.py [--systems 1 64] [--threads 1] [--calls 300 12]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from inference_speed import copies_of_aspirin, cpu_name, one_call
from qeq_ase.calculator import QEqCalculator
from qeq_ase.kernels import edge_kernel
from qeq_ase.kernels.glibc_malloc import keep_large_allocations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", type=int, nargs="+", default=[1, 64], help="numbers of aspirin copies")
    parser.add_argument("--calls", type=int, nargs="+", default=[300, 12], help="timed calls per system and mode")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=["aspirin_fp32", "aspirin_int8"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_large_allocations()
    pairs_of = edge_kernel.edge_pairs
    modes = {"per pair": pairs_of, "per edge": lambda *graph: None}
    print(f"CPU {cpu_name()}, torch {torch.__version__}, {args.threads} thread(s)")
    print("| atoms | model | per edge (ms) | per pair (ms) | speed-up |\n|---|---|---|---|---|")
    for n_copies, calls in zip(args.systems, args.calls):
        atoms, rng = copies_of_aspirin(n_copies), np.random.default_rng(0)
        for model in args.models:
            calc = QEqCalculator(model)
            times = {mode: [] for mode in modes}
            for _ in range(3):
                one_call(calc, atoms, rng, False)
            for _ in range(calls):
                for mode, pairs in modes.items():
                    edge_kernel.edge_pairs = pairs
                    t0 = time.perf_counter()
                    one_call(calc, atoms, rng, False)
                    times[mode].append(time.perf_counter() - t0)
            edge_kernel.edge_pairs = pairs_of
            edge, pair = (statistics.median(times[m]) * 1e3 for m in ("per edge", "per pair"))
            print(f"| {len(atoms)} | {model} | {edge:.2f} | {pair:.2f} | {edge / pair:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
