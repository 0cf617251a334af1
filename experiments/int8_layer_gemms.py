"""Each int8 layer of one attention layer, forward, with each int8 GEMM, against its fp32 twin.

    PYTHONPATH=. python experiments/int8_layer_gemms.py [--threads 1 2] [--copies 64]

Layer 1 of the shipped ``aspirin_int8`` and ``aspirin_fp32`` on the shapes of a call on
``--copies`` aspirin molecules (64: 1,344 atoms, 18,688 edges): ``qkv``, ``out`` and the
feed-forward layers on N rows, ``vector_mix`` on N x 3 vectors, ``edge_filter`` on E rows.
Inputs are random (scale 0.3), two-limb int8 inputs as shipped; no autograd. Median
milliseconds of 30 calls, and whether brgemm's output equals ``_int_mm``'s bit for bit.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qeq_ase.kernels.glibc_malloc import keep_large_allocations
from qeq_ase.quant.int8_kernels import gemm_available
from qeq_ase.quant.int8_model import set_int8_gemm
from qeq_ase.io.registry import load_model

LAYERS = ("qkv", "vector_mix", "out", "ffn_hidden", "ffn_out", "edge_filter")
GEMMS = ("int_mm", "onednn", "brgemm")


def median_ms(fn, n: int = 30) -> float:
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--copies", type=int, default=64)
    args = parser.parse_args()
    if not gemm_available("brgemm"):
        parser.exit(2, "int8_layer_gemms.py compares the AMX-INT8 GEMMs; this CPU has no usable AMX-INT8\n")
    keep_large_allocations()
    fp32 = load_model("aspirin_fp32")[0].layers[1]
    int8 = {gemm: set_int8_gemm(load_model("aspirin_int8")[0], gemm).layers[1] for gemm in GEMMS}
    n_atoms, n_edges = 21 * args.copies, 292 * args.copies  # aspirin frame 0: 292 edges within 5 Å
    torch.manual_seed(0)
    print("| layer | rows | threads | fp32 (ms) | " + " | ".join(f"int8 {g} (ms)" for g in GEMMS)
          + " | brgemm / fp32 speed-up | brgemm == _int_mm |")
    print("|---" * (5 + len(GEMMS) + 1) + "|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name in LAYERS:
            width = getattr(fp32, name).weight.shape[1]
            shape = {"vector_mix": (n_atoms, 3, width), "edge_filter": (n_edges, width)}.get(name, (n_atoms, width))
            x = torch.randn(*shape) * 0.3
            with torch.no_grad():
                t_fp32 = median_ms(lambda: getattr(fp32, name)(x))
                t_int8 = {g: median_ms(lambda: getattr(layer, name)(x)) for g, layer in int8.items()}
                same = torch.equal(getattr(int8["brgemm"], name)(x), getattr(int8["int_mm"], name)(x))
            print(f"| {name} | {x.numel() // width:,} | {threads} | {t_fp32:.3f} | "
                  + " | ".join(f"{t_int8[g]:.3f}" for g in GEMMS)
                  + f" | {t_fp32 / t_int8['brgemm']:.2f}x | {same} |", flush=True)


if __name__ == "__main__":
    main()
