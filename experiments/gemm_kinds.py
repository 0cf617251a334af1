"""One matrix product of the model's shapes in fp32, bf16 (AMX), int8 ``_int_mm`` and oneDNN's int8 linear.

    PYTHONPATH=. python experiments/gemm_kinds.py [--threads 1]

Also times the two-limb per-row quantization of a gradient (the pass before an int8
backward GEMM). Minimum over repeats of the mean CPU time per call (``time.process_time``),
microseconds. ``qlinear_pointwise`` is skipped where oneDNN has no fast int8 path.
"""

from __future__ import annotations

import argparse
import time

import torch

from qeq_ase.quant.int8_kernels import load_cpp_kernels

# edge filter (one aspirin), qkv (64 aspirin), edge backward (64), readout backward (64: K = 1)
SHAPES = [(840, 128, 512), (1344, 128, 640), (18688, 512, 128), (1344, 1, 64)]


def cpu_us(fn, n: int = 20, repeats: int = 5) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - start) / n * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels = load_cpp_kernels()
    print("| M x K x N | fp32 | bf16 | int8 `_int_mm` | int8 `qlinear_pointwise` | two-limb quantize of an M x K gradient |")
    print("|---|---|---|---|---|---|")
    for M, K, N in SHAPES:
        gen = torch.Generator().manual_seed(0)
        x, w = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen)
        xb, wb = x.bfloat16(), w.bfloat16()
        xq = torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=gen)
        wq = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
        wq_t = wq.t().contiguous()
        scale = torch.rand(N, generator=gen) * 0.01 + 1e-3
        try:
            packed = torch.ops.onednn.qlinear_prepack(wq, [M, K])
            qlinear = lambda: torch.ops.onednn.qlinear_pointwise(  # noqa: E731
                xq, 0.01, 0, packed, scale, torch.zeros(N, dtype=torch.long), None, 1.0, 0, torch.float32, "none", [], "")
            q_us = f"{cpu_us(qlinear):.0f}"
        except (RuntimeError, AttributeError) as err:
            q_us = f"n/a ({type(err).__name__})"
        col = torch.rand(K, generator=gen)
        print(f"| {M} x {K} x {N} | {cpu_us(lambda: torch.nn.functional.linear(x, w)):.0f} "
              f"| {cpu_us(lambda: torch.nn.functional.linear(xb, wb)):.0f} | {cpu_us(lambda: torch._int_mm(xq, wq_t)):.0f} "
              f"| {q_us} | {cpu_us(lambda: kernels.quantize_per_row_limbs(x, col, 127, 1e-30, 2)):.0f} |", flush=True)


if __name__ == "__main__":
    main()
