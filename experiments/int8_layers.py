"""Time fp32 ``F.linear`` against the real INT8 layers of ``qeq_ase.quant.int8_linear``.

    OMP_NUM_THREADS=1 PYTHONPATH=. python experiments/int8_layers.py [--threads 1] [--limbs 2] [--quick]

Forward alone and forward + backward (input gradient only, as for forces), for
``M x K -> N`` with M in {21, 1344, 9344} (one aspirin; the atoms of 64 aspirin copies;
one block of their edges), K = N = 128 and the model's real shapes (128 -> 640 qkv,
128 -> 512 edge filter, 256 -> 128 FFN out) plus the vector layer 128 -> 384 on
``[M, 3, F]`` (3M GEMM rows). Each INT8 case runs with both int8 GEMMs (oneDNN's int8
linear, AMX where present, and ``torch._int_mm``; ``qeq_ase.quant.int8_kernels.GEMMS``) and
``--limbs`` input limbs (2, the shipped setting, or 1, W8A8). Timings of the variants of one
shape are interleaved round by round and the median per call is reported, so drifting load
on a shared machine shifts them together. Ratios > 1 mean INT8 is faster.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from qeq_ase.kernels.glibc_malloc import keep_large_allocations
from qeq_ase.quant.int8_kernels import cpu_has_amx_int8, resolve_gemm
from qeq_ase.quant.int8_linear import ACTIVATION_LIMBS, Int8ScalarLinear, Int8VectorLinear


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench(fns: dict, seconds: float) -> dict:
    """Median seconds per call of each function, measured in interleaved rounds."""
    for fn in fns.values():  # warm-up (allocator, oneDNN primitive cache)
        fn(), fn()
    reps = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        reps[name] = max(1, int(seconds / 10 / max(time.perf_counter() - t0, 1e-7) / len(fns)))
    times = {name: [] for name in fns}
    for _ in range(10):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            times[name].append((time.perf_counter() - t0) / reps[name])
    return {name: statistics.median(ts) for name, ts in times.items()}


def random_layer(cls, K: int, N: int, limbs: int, gemm: str, **kwargs):
    layer = cls(K, N, gemm=gemm, **kwargs)
    codes = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    layer._set_weight(codes, torch.rand(N) * 0.02 / K ** 0.5, torch.randn(N) if layer.bias is not None else None)
    layer.input_step.fill_(4.0 / 127)
    layer.set_activation_limbs(limbs)  # also refreshes the derived tensors
    return layer


def case(M: int, K: int, N: int, vector: bool, limbs: int, gemm: str, seconds: float) -> dict:
    shape = (M, 3, K) if vector else (M, K)
    x = torch.randn(*shape)
    g = torch.randn(*shape[:-1], N)
    w, b = torch.randn(N, K) / K ** 0.5, None if vector else torch.randn(N)
    if vector:
        make = lambda backward: random_layer(Int8VectorLinear, K, N, limbs, gemm, input_mode="atom", backward=backward)
    else:
        make = lambda backward: random_layer(Int8ScalarLinear, K, N, limbs, gemm, backward=backward)
    int8_f, int8_i = make("float"), make("int8")
    xg = x.clone().requires_grad_(True)

    def fwd_bwd(fn):
        def run():
            xg.grad = None
            fn(xg).backward(g)
        return run

    with torch.no_grad():
        fwd = bench({"fp32": lambda: F.linear(x, w, b), "int8": lambda: int8_f(x)}, seconds)
    both = bench({"fp32": fwd_bwd(lambda t: F.linear(t, w, b)), "int8 (float bwd)": fwd_bwd(int8_f),
                  "int8 (int8 bwd)": fwd_bwd(int8_i)}, seconds)
    return {"fwd": fwd, "fwd+bwd": both}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limbs", type=int, default=2, choices=ACTIVATION_LIMBS)
    parser.add_argument("--quick", action="store_true", help="K=N=128 only, shorter timings")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_large_allocations()  # as the qeq-ase commands do: no page faults on large outputs
    seconds = 0.3 if args.quick else 0.8
    shapes = [(128, 128, False)]
    if not args.quick:
        shapes += [(128, 640, False), (128, 512, False), (256, 128, False), (128, 384, True)]
    gemms = ["onednn", "int_mm"] if resolve_gemm("auto") == "onednn" else ["int_mm"]
    print(f"CPU: {cpu_name()}; AMX-INT8: {cpu_has_amx_int8()}; torch {torch.__version__}; "
          f"threads {torch.get_num_threads()}; input limbs {args.limbs}")
    print("| layer | M | GEMM | fp32 fwd (us) | int8 fwd (us) | speed-up | fp32 fwd+bwd (us) | int8 fwd+bwd, "
          "float bwd (us) | speed-up | int8 fwd+bwd, int8 bwd (us) | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for K, N, vector in shapes:
        for M in (21, 1344, 9344):
            for gemm in gemms:
                r = case(M, K, N, vector, args.limbs, gemm, seconds)
                f, b = r["fwd"], r["fwd+bwd"]
                us = lambda s: f"{s * 1e6:,.1f}"
                name = f"vector {K}->{N} (3M rows)" if vector else f"scalar {K}->{N}"
                print(f"| {name} | {M} | {gemm} | {us(f['fp32'])} | {us(f['int8'])} | {f['fp32'] / f['int8']:.2f} | "
                      f"{us(b['fp32'])} | {us(b['int8 (float bwd)'])} | {b['fp32'] / b['int8 (float bwd)']:.2f} | "
                      f"{us(b['int8 (int8 bwd)'])} | {b['fp32'] / b['int8 (int8 bwd)']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
