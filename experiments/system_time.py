"""User and system CPU time per energy + forces call at 1,344 atoms: edge blocks and glibc malloc.

    PYTHONPATH=. python experiments/system_time.py [--calls 4]

System time is mostly page faults: glibc mmaps allocations above 32 MB and faults them in
again on every call. Three settings, each in a fresh process (malloc settings cannot be
undone): the fused path with the whole graph as one block and glibc's default malloc; with
the default edge blocks (``qeq_ase.kernels.edge_kernel``); and with the blocks plus
``qeq_ase.kernels.glibc_malloc.keep_large_allocations()``. 1 thread, ``os.times()`` around the calls.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

SETTINGS = {"one block, default malloc": ("one", "default"), "blocks, default malloc": ("blocks", "default"),
            "blocks, keep_large_allocations": ("blocks", "tuned")}


def measure(blocks: str, malloc: str, model: str, calls: int) -> tuple[float, float]:
    import torch

    from qeq_ase.kernels import edge_kernel
    from qeq_ase.calculator import QEqCalculator
    from qeq_ase.kernels.glibc_malloc import keep_large_allocations

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from inference_speed import copies_of_aspirin

    if malloc == "tuned":
        keep_large_allocations()
    if blocks == "one":
        edge_kernel.BLOCK_BYTES = 1 << 40
    torch.set_num_threads(1)
    atoms = copies_of_aspirin(64)
    atoms.calc = QEqCalculator(model)
    atoms.get_forces()
    start = os.times()
    for _ in range(calls):
        atoms.positions += 1e-4
        atoms.get_forces()
    end = os.times()
    return (end.user - start.user) / calls * 1e3, (end.system - start.system) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        user, system = measure(args.child[0], args.child[1], args.child[2], args.calls)
        print(f"{user:.0f} {system:.0f}")
        return
    print("| setting | model | user ms/call | system ms/call |")
    print("|---|---|---|---|")
    for label, (blocks, malloc) in SETTINGS.items():
        for model in ("aspirin_fp32", "aspirin_int8"):
            out = subprocess.run([sys.executable, __file__, "--calls", str(args.calls), "--child", blocks, malloc, model],
                                 capture_output=True, text=True, check=True).stdout.split()
            print(f"| {label} | {model} | {out[-2]} | {out[-1]} |", flush=True)


if __name__ == "__main__":
    main()
