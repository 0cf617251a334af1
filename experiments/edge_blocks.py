"""Energy + forces at several edge-block sizes of the fused path (``edge_kernel.BLOCK_BYTES``).

The fused path cuts each layer's edges into blocks whose ``[E_block, 4F]`` float32 filters
stay under ``BLOCK_BYTES`` (but have at least ``MIN_BLOCK_EDGES_PER_NODE`` edges per node).
This times the shipped fp32 and INT8 calculators on copies of rMD17 aspirin (as in
``inference_speed.py``) for each block size, interleaved call by call, and prints the median
ms per call and the number of blocks per layer.

    PYTHONPATH=. python experiments/edge_blocks.py [--block-mb 8 1024] [--systems 64]
        [--threads 2] [--rounds 8] [--default-malloc]

``--default-malloc`` leaves glibc's malloc as a plain Python script has it (tensors over
32 MB mmapped and page-faulted anew on every call); otherwise large allocations are kept
(``qeq_ase.kernels.glibc_malloc.keep_large_allocations``, as the qeq-ase commands do).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from inference_speed import copies_of_aspirin, one_call
from qeq_ase.kernels import edge_kernel
from qeq_ase.calculator import QEqCalculator
from qeq_ase.kernels.glibc_malloc import keep_large_allocations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-mb", type=float, nargs="+", default=[8, 1024])
    parser.add_argument("--systems", type=int, nargs="+", default=[64], help="numbers of aspirin copies")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--default-malloc", action="store_true")
    args = parser.parse_args()
    if not args.default_malloc:
        keep_large_allocations()
    torch.set_num_threads(args.threads)
    calcs = {"fp32": QEqCalculator("aspirin_fp32"), "int8": QEqCalculator("aspirin_int8", activation_limbs=2)}
    rng = np.random.default_rng(0)
    config = calcs["fp32"].model.config
    row_bytes = 4 * config.num_features * 4
    print(f"{args.threads} thread(s), malloc {'default' if args.default_malloc else 'keeps large allocations'}, "
          f"floor {edge_kernel.MIN_BLOCK_EDGES_PER_NODE} edges per node")
    print("| atoms | block MB | blocks per layer | fp32 (ms) | int8 (ms) | int8 speed-up |")
    print("|---|---|---|---|---|---|")
    for n_copies in args.systems:
        atoms = copies_of_aspirin(n_copies)
        for block_mb in args.block_mb:
            edge_kernel.BLOCK_BYTES = int(block_mb * (1 << 20))
            times = {name: [] for name in calcs}
            for calc in calcs.values():
                one_call(calc, atoms, rng, False)
            for _ in range(args.rounds):
                for name, calc in calcs.items():
                    t0 = time.perf_counter()
                    one_call(calc, atoms, rng, False)
                    times[name].append(time.perf_counter() - t0)
            fp32, int8 = (1e3 * statistics.median(times[name]) for name in ("fp32", "int8"))
            print(f"| {len(atoms)} | {block_mb:g} | {blocks_per_layer(atoms, config.cutoff, row_bytes)} | {fp32:.1f} | {int8:.1f} | "
                  f"{fp32 / int8:.2f}x |")


def blocks_per_layer(atoms, cutoff: float, row_bytes: int) -> int:
    from qeq_ase.data.neighbors import molecule_edges

    edge_index = molecule_edges(torch.as_tensor(atoms.positions), cutoff)
    order = edge_kernel.receiver_order(edge_index)
    edge_index = edge_index if order is None else edge_index[:, order]
    return len(edge_kernel.edge_blocks(edge_index, len(atoms), row_bytes))


if __name__ == "__main__":
    main()
