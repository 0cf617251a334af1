"""Is ``torch._int_mm`` exact on this CPU, and what does the exact fallback cost?

    python benchmarks/int_mm_exactness.py
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/int_mm_exactness.py   # an AVX2 CPU

For random int8 codes in [-127, 127], prints per shape how many int32 entries of
``torch._int_mm`` differ from the int64 product and by how much, and the median time of
``torch._int_mm``, of the exact fallback ``qeq_ase.quant.int8_kernels.int_mm`` (an fp32 GEMM of the
codes where ``_int_mm`` is inexact) and of the fp32 GEMM of the same shape.
"""

from __future__ import annotations

import statistics
import time

import torch

from qeq_ase.kernels.cpu_features import cpu_model_name, int_mm_is_exact, onednn_isa_limit
from qeq_ase.quant.int8_kernels import int_mm


def median_us(fn, repeats: int = 30) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main() -> None:
    print(f"{cpu_model_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"ONEDNN_MAX_CPU_ISA={onednn_isa_limit() or 'unset'}, _int_mm exact: {int_mm_is_exact()}")
    print("M x K x N | wrong entries | max abs error | _int_mm us | exact int_mm us | fp32 us")
    gen = torch.Generator().manual_seed(0)
    for m, k, n in ((21, 128, 128), (400, 128, 128), (5000, 128, 128), (5000, 512, 128)):
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)
        b = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=gen)
        error = (torch._int_mm(a, b).long() - a.long() @ b.long()).abs()
        af, bf = a.float(), b.float()
        print(f"{m} x {k} x {n} | {int((error > 0).sum())} of {m * n} | {int(error.max())} | "
              f"{median_us(lambda: torch._int_mm(a, b)):.0f} | {median_us(lambda: int_mm(a, b)):.0f} | "
              f"{median_us(lambda: af @ bf):.0f}")


if __name__ == "__main__":
    main()
