"""Energy + forces through the ASE calculator: fp32, bf16 autocast and INT8 of one model.

INT8 runs six times: with two-limb inputs (``activation_limbs=2``, the shipped setting,
smooth energy; its backward is ``"auto"``: int8 input-gradient GEMMs in the edge filters,
whose gradient the fused edge kernel writes as int8 codes, fp32 GEMMs with the dequantized
weight elsewhere), as W8A8 (``activation_limbs=1``, one int8 code per input), with every
input-gradient GEMM in int8 ("int8-bwd", ``set_backward_kernel(model, "int8")``), with every
one in fp32 ("int8 float-bwd", ``set_backward_kernel(model, "float")``), and as the shipped
setting with ``torch._int_mm`` as its GEMM ("int8 _int_mm", ``QEqCalculator(...,
int8_gemm="int_mm")``) or, on AMX CPUs, oneDNN's int8 linear ("int8 qlinear", ``"onednn"``);
the others use the default GEMM, oneDNN's brgemm micro-kernel on AMX CPUs and ``_int_mm``
elsewhere (``qeq_ase.quant.int8_kernels``).

    PYTHONPATH=. python benchmarks/inference_speed.py [--fp32 aspirin_fp32] [--int8 aspirin_int8]
        [--threads 1 2] [--systems 1 64 476] [--seconds 3] [--op-table K] [--memory]

Systems are copies of rMD17 aspirin frame 0 on a cubic grid 20 Å apart (far beyond the 5 Å
cutoff, so every copy is an isolated molecule): 1 copy = 21 atoms, 64 = 1,344, 476 = 9,996.
Each call moves the atoms by a tiny random displacement, so the calculator recomputes
(neighbour list included) as it would in MD. The three precisions are timed interleaved,
round by round, and the median per call is reported; ratios are fp32 time / other time,
so > 1 means faster than fp32. A torch.profiler pass per system and precision gives the
share of self CPU time spent in matrix products (``aten::mm``/``addmm``/``bmm``/
``linear``/``_int_mm`` and the INT8 layers' own ops) — the part int8 can speed up.
``--memory`` adds the growth of the peak resident memory during one call on each system, for
fp32, bf16 and INT8, each in a fresh process after a one-copy warm-up (one thread).

fp32 and INT8 load the shipped files: the same architecture, the INT8 weights being the
quantization-aware fine-tune of the fp32 ones. bf16 is the fp32 model under
``torch.autocast("cpu", dtype=torch.bfloat16)``. All of them run the layers' per-edge work
in the fused C++ kernel (``qeq_ase/kernels/edge_kernel.py``); the column "fp32 eager edges" is the
fp32 model with ``edge_backend="eager"`` (the per-edge work as separate torch ops), and
"fused speed-up" is its time over fp32's. "edge share" is the fused kernel's share of the
fp32 profile. Run it on an idle machine; this script sets torch's thread count (a benchmark
may; the library never does), and keeps glibc from mmapping large tensors anew on every call like the qeq-ase commands do
(``qeq_ase.kernels.glibc_malloc``; ``--default-malloc`` leaves malloc as it is).
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from qeq_ase.calculator import QEqCalculator
from qeq_ase.data.dataset import load_rmd17
from qeq_ase.kernels.glibc_malloc import keep_large_allocations
from qeq_ase.quant.int8_kernels import gemm_available
from qeq_ase.quant.int8_linear import _Int8LinearBase
from qeq_ase.quant.int8_model import set_backward_kernel

RMD17 = Path(__file__).resolve().parents[2] / "shared" / "rmd17" / "rmd17_aspirin_test_01.npz"
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::_int_mm", "aten::matmul",
            "onednn::qlinear_pointwise")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def copies_of_aspirin(n_copies: int, spacing: float = 20.0) -> Atoms:
    frames = load_rmd17(RMD17)
    side = int(np.ceil(n_copies ** (1 / 3)))
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n_copies] * spacing
    positions = (frames.positions[0][None] + grid[:, None]).reshape(-1, 3)
    return Atoms(numbers=np.tile(frames.numbers, n_copies), positions=positions)


def backward_kernel(calc: QEqCalculator, kind: str) -> QEqCalculator:
    """The calculator with the input-gradient GEMMs of ``kind`` (``"int8"``: two-limb int8
    gradients; ``"float"``: fp32 GEMMs) in every int8 layer."""
    set_backward_kernel(calc.model, kind)
    return calc


def one_call(calc: QEqCalculator, atoms: Atoms, rng: np.random.Generator, autocast: bool):
    atoms.positions += rng.normal(scale=1e-4, size=atoms.positions.shape)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
    with context:
        calc.calculate(atoms, ["energy", "forces"])
    return calc.results["forces"]


def profile_shares(calc: QEqCalculator, atoms: Atoms, autocast: bool, top_ops: int = 0) -> tuple[float, float, list[tuple[str, float]]]:
    """Shares of self CPU time in matrix products and in the fused edge kernel, and the
    ``top_ops`` ops with the most self CPU time (ms per call)."""
    rng = np.random.default_rng(0)
    calls = 3
    one_call(calc, atoms, rng, autocast)
    with torch.profiler.profile() as prof:
        for _ in range(calls):
            one_call(calc, atoms, rng, autocast)
    total = gemm = edge = 0.0
    events = prof.key_averages()
    for event in events:
        total += event.self_cpu_time_total
        if event.key in GEMM_OPS or "int8_linear" in event.key or "qeq_int8" in event.key:
            gemm += event.self_cpu_time_total
        if event.key.startswith("_EdgeAttention"):
            edge += event.self_cpu_time_total
    ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top_ops]
    top = [(e.key, e.self_cpu_time_total / calls / 1e3) for e in ranked]
    if not total:
        return float("nan"), float("nan"), top
    return gemm / total, edge / total, top


def peak_rss_kb() -> int:
    """This process's peak resident memory in kB: ``VmHWM`` (Linux; reset by exec, unlike
    ``ru_maxrss``, which a child inherits from its parent), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_memory_mb(model: str, n_copies: int, autocast: bool, default_malloc: bool) -> float:
    """Growth of the peak resident memory (MB) of one energy + forces call on ``n_copies``
    aspirins, measured in a fresh process (the peak only grows) after a one-copy warm-up."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import inference_speed as b; "
            f"b.memory_child({model!r}, {n_copies}, {autocast}, {default_malloc})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory_child(model: str, n_copies: int, autocast: bool, default_malloc: bool) -> None:
    torch.set_num_threads(1)
    if not default_malloc:
        keep_large_allocations()
    calc, rng = QEqCalculator(model), np.random.default_rng(0)
    one_call(calc, copies_of_aspirin(1), rng, autocast)
    atoms = copies_of_aspirin(n_copies)
    before = peak_rss_kb()
    one_call(calc, atoms, rng, autocast)
    print((peak_rss_kb() - before) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp32", default="aspirin_fp32")
    parser.add_argument("--int8", default="aspirin_int8")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--systems", type=int, nargs="+", default=[1, 64, 476], help="numbers of aspirin copies")
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per system, precision and thread count")
    parser.add_argument("--default-malloc", action="store_true",
                        help="do not call qeq_ase.kernels.glibc_malloc.keep_large_allocations (large calls then page-fault)")
    parser.add_argument("--op-table", type=int, default=0, metavar="K",
                        help="also print the K ops with the most self CPU time (ms per call) of fp32 and int8")
    parser.add_argument("--memory", action="store_true",
                        help="also print the peak memory of one call per system (fp32, bf16, int8; fresh processes)")
    args = parser.parse_args()
    tuned = False if args.default_malloc else keep_large_allocations()

    # name: (calculator, bf16 autocast)
    two_limb = {"activation_limbs": 2}
    calcs = {"fp32": (QEqCalculator(args.fp32), False), "bf16": (QEqCalculator(args.fp32), True),
             "int8": (QEqCalculator(args.int8, **two_limb), False),
             "int8 W8A8": (QEqCalculator(args.int8, activation_limbs=1), False),
             "int8 int8-bwd": (backward_kernel(QEqCalculator(args.int8, **two_limb), "int8"), False),
             "int8 float-bwd": (backward_kernel(QEqCalculator(args.int8, **two_limb), "float"), False),
             "int8 _int_mm": (QEqCalculator(args.int8, int8_gemm="int_mm", **two_limb), False),
             "fp32 eager edges": (QEqCalculator(args.fp32, edge_backend="eager"), False)}
    if gemm_available("onednn"):  # AMX CPUs only (elsewhere a reference kernel ~1000x slower)
        calcs["int8 qlinear"] = (QEqCalculator(args.int8, int8_gemm="onednn", **two_limb), False)
    others = [name for name in calcs if name not in ("fp32", "fp32 eager edges")]
    gemm = next(m.gemm for m in calcs["int8"][0].model.modules() if isinstance(m, _Int8LinearBase))
    print(f"CPU {cpu_name()}, torch {torch.__version__}, glibc malloc "
          f"{'keeps large allocations' if tuned else 'default'}, int8 GEMM (default): {gemm}")
    print("| atoms | threads | " + " | ".join(f"{name} (ms)" for name in calcs) + " | "
          + " | ".join(f"{name} speed-up" for name in others)
          + " | fused speed-up | GEMM share fp32 | GEMM share int8 | edge share fp32 |")
    print("|---" * (2 + len(calcs) + len(others) + 4) + "|")
    for n_copies in args.systems:
        atoms = copies_of_aspirin(n_copies)
        for threads in args.threads:
            torch.set_num_threads(threads)
            rng = np.random.default_rng(1)
            for calc, autocast in calcs.values():  # warm-up: kernels built, caches filled
                one_call(calc, atoms, rng, autocast)
            times = {name: [] for name in calcs}
            start = time.perf_counter()
            while time.perf_counter() - start < args.seconds * len(calcs) or len(times["fp32"]) < 3:
                for name, (calc, autocast) in calcs.items():
                    t0 = time.perf_counter()
                    one_call(calc, atoms, rng, autocast)
                    times[name].append(time.perf_counter() - t0)
            median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            shares = {name: profile_shares(calcs[name][0], atoms, *calcs[name][1:], top_ops=args.op_table)
                      for name in ("fp32", "int8")}
            print(f"| {len(atoms)} | {threads} | " + " | ".join(f"{median[name]:.2f}" for name in calcs) + " | "
                  + " | ".join(f"{median['fp32'] / median[name]:.2f}" for name in others)
                  + f" | {median['fp32 eager edges'] / median['fp32']:.2f}"
                  + f" | {shares['fp32'][0]:.0%} | {shares['int8'][0]:.0%} | {shares['fp32'][1]:.0%} |", flush=True)
            for name in ("fp32", "int8") if args.op_table else ():
                print(f"  {len(atoms)} atoms, {threads} thread(s), {name}, self CPU ms per call: "
                      + ", ".join(f"{op} {ms:.1f}" for op, ms in shares[name][2]), flush=True)
    if args.memory:
        print("\n| atoms | growth of peak memory in one call, MB (kB per atom): fp32 | bf16 | int8 |\n|---|---|---|---|")
        for n_copies in args.systems:
            mb = [peak_memory_mb(model, n_copies, autocast, args.default_malloc)
                  for model, autocast in ((args.fp32, False), (args.fp32, True), (args.int8, False))]
            n_atoms = len(copies_of_aspirin(n_copies))
            print(f"| {n_atoms} | " + " | ".join(f"{m:.1f} ({1024 * m / n_atoms:.0f})" for m in mb) + " |", flush=True)


if __name__ == "__main__":
    main()
