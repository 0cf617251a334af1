"""Calls per second of QEqCalculator (energy + forces) on one aspirin molecule.

Each call moves the atoms by a small random displacement, so ASE's cache never answers
and every call runs the neighbour list, the network and the backward pass. For comparison
the script also times ``model.energy_and_forces`` alone on a prepared graph: the
difference is the calculator's per-call overhead (ASE bookkeeping, tensor conversion,
neighbour list), and a call that ASE answers from its cache (the atoms did not move, as for
the second and later force requests of an MD step): its cost is the calculator's state check,
timed with :meth:`QEqCalculator.check_state` and with ASE's own.

    OMP_NUM_THREADS=1 python md_examples/profile_calculator.py --model aspirin_fp32 --threads 1
    python md_examples/profile_calculator.py --model aspirin_int8 --threads 1 --profile   # where the time goes
    python md_examples/profile_calculator.py --model random   # untrained model, architecture of aspirin_fp32

``--model random`` builds ``QEqModel(ModelConfig())`` (128 features, 4 layers, 8 heads:
the architecture of ``configs/recipes/aspirin/fp32.yaml``) for timing before a trained file exists.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator

from qeq_ase.calculator import QEqCalculator
from qeq_ase.io.checkpoint import save_potential
from qeq_ase.data.dataset import load_rmd17
from qeq_ase.model.network import ModelConfig, QEqModel
from qeq_ase.data.neighbors import molecule_edges


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
    parser.add_argument("--profile", action="store_true",
                        help="also print where a calculator call spends its time (torch.profiler, by op group)")
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
    cached_us = 1e6 / time_calls(atoms.get_forces, 20 * args.calls)
    calc.check_state = types.MethodType(Calculator.check_state, calc)  # ASE's compare_atoms
    ase_cached_us = 1e6 / time_calls(atoms.get_forces, 20 * args.calls)
    del calc.check_state
    print(f"model {args.model} ({args.dtype}, {args.device}, {torch.get_num_threads()} thread(s)), "
          f"{len(atoms)} atoms: calculator {calls_per_s:.1f} calls/s ({1e3 / calls_per_s:.2f} ms/call); "
          f"model alone {model_calls_per_s:.1f} calls/s ({1e3 / model_calls_per_s:.2f} ms/call); "
          f"answered from the cache {cached_us:.1f} us/call ({ase_cached_us:.1f} us with ASE's state check)")
    if args.profile:
        print_profile(calculator_call, min(args.calls, 50))


#: torch op name fragments -> group, first match wins
OP_GROUPS = (("GEMM", ("mm", "linear", "int8_linear", "qeq_int8")),
             ("gather/scatter", ("index", "scatter", "gather", "embedding")),
             ("neighbour list", ("cdist", "nonzero", "radius", "topk", "sort")))


def print_profile(call, calls: int) -> None:
    """Self CPU time per op group over ``calls`` calls; the rest of the wall time is Python and ASE."""
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            call()
    wall_us = (time.perf_counter() - t0) * 1e6
    groups: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key.lower()
        group = next((g for g, keys in OP_GROUPS if any(k in name for k in keys)), "element-wise and other torch ops")
        groups[group] = groups.get(group, 0.0) + event.self_cpu_time_total
    torch_us = sum(groups.values())
    groups["outside torch ops (Python, ASE, autograd engine)"] = max(wall_us - torch_us, 0.0)
    print(f"where a calculator call's time goes ({calls} calls under the profiler, {wall_us / calls / 1e3:.2f} ms/call):")
    for group, us in sorted(groups.items(), key=lambda item: -item[1]):
        print(f"  {group:50s} {us / calls / 1e3:7.2f} ms  {us / wall_us:6.1%}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))

if __name__ == "__main__":
    main()
