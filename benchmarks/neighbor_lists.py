"""Time the neighbour-list methods of ``qeq_ase.data.neighbors`` against each other.

Systems (cutoff 5 Å by default, the model's):

* ``molecules``: copies of aspirin (different rMD17 frames) on a grid 20 Å apart, one
  system with no batch vector (1 copy = 21 atoms, 64 = 1,344, 480 = 10,080);
* ``batch``: rMD17 frames at their own coordinates (overlapping in space) with a batch
  vector, as ``graph.molecules_to_graph`` builds a training batch;
* ``periodic``: a liquid-like random periodic box (0.1 atoms/Å^3) through matscipy.

Molecule systems are timed with ``brute_force``, ``torch_cluster`` and ``matscipy``
(no periodic boundaries); every method must return the same number of edges.
Prints a table of median times (ms) and each method's time over the fastest one's.

    OMP_NUM_THREADS=1 python benchmarks/neighbor_lists.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qeq_ase.data import neighbors  # noqa: E402
from qeq_ase.data.dataset import load_rmd17  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "rmd17" / "rmd17_aspirin_test_01.npz"


def median_time(fn, repeats: int, min_repeat_s: float, budget_s: float) -> float:
    """Median seconds per call over ``repeats`` timings, each looping ``fn`` for at least
    ``min_repeat_s``; fewer repeats (at least 3) when a call is slow, to stay within ``budget_s``."""
    fn()  # warm-up (first-call allocations, lazy imports)
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    loops = max(1, int(min_repeat_s / max(once, 1e-9)))
    repeats = max(3, min(repeats, int(budget_s / max(once * loops, 1e-9))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        times.append((time.perf_counter() - start) / loops)
    return statistics.median(times)


def aspirin_grid(frames, copies: int, spacing: float = 20.0) -> np.ndarray:
    """``copies`` aspirin frames centred on a cubic grid ``spacing`` Å apart."""
    side = int(np.ceil(copies ** (1 / 3)))
    grid = np.array([(a, b, c) for a in range(side) for b in range(side) for c in range(side)][:copies], float)
    pos = frames.positions[np.arange(copies) % len(frames)]
    pos = pos - pos.mean(axis=1, keepdims=True) + spacing * grid[:, None, :]
    return pos.reshape(-1, 3)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="rMD17 aspirin .npz")
    parser.add_argument("--cutoff", type=float, default=5.0, help="Å (default: 5.0)")
    parser.add_argument("--copies", default="1,4,8,12,16,32,64,480",
                        help="aspirin copies for the 'molecules' systems (default: %(default)s)")
    parser.add_argument("--batches", default="8,64,480",
                        help="frames per batch for the 'batch' systems (default: %(default)s)")
    parser.add_argument("--periodic-atoms", default="21,1344,10080", help="atoms in the periodic boxes")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default: 1)")
    parser.add_argument("--repeats", type=int, default=7, help="timings per median (default: 7)")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per measurement, roughly")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    frames = load_rmd17(args.data)
    methods = ["brute_force", "matscipy"] + (["torch_cluster"] if neighbors.HAVE_TORCH_CLUSTER else [])

    cases = []  # (system, atoms, {method: callable})
    for k in map(int, args.copies.split(",")):
        pos = torch.as_tensor(aspirin_grid(frames, k), dtype=dtype)
        cases.append((f"molecules x{k}", len(pos), {
            m: (lambda m=m, pos=pos: neighbors.molecule_edges(pos, args.cutoff, method=m)) for m in methods}))
    for k in map(int, args.batches.split(",")):
        pos = torch.as_tensor(frames.positions[np.arange(k) % len(frames)].reshape(-1, 3), dtype=dtype)
        batch = torch.repeat_interleave(torch.arange(k), frames.n_atoms)
        cases.append((f"batch x{k}", len(pos), {
            m: (lambda m=m, pos=pos, batch=batch: neighbors.molecule_edges(pos, args.cutoff, batch, method=m))
            for m in methods}))
    rng = np.random.default_rng(0)
    for n in map(int, args.periodic_atoms.split(",")):
        length = (n / 0.1) ** (1 / 3)
        pos = rng.uniform(0.0, length, size=(n, 3))
        cell = length * np.eye(3)
        cases.append((f"periodic box {length:.1f} Å", n, {
            "matscipy": lambda pos=pos, cell=cell: neighbors.periodic_edges(pos, cell, True, args.cutoff)}))

    print(f"# python {platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, cutoff {args.cutoff} Å, {args.dtype}")
    header = f"| {'system':<22} | {'atoms':>6} | {'edges':>8} | {'method':<13} | {'median ms':>10} | {'x fastest':>9} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for system, n_atoms, fns in cases:
        results = {}
        for method, fn in fns.items():
            out = fn()
            edges = (out[0] if isinstance(out, tuple) else out).shape[1]
            results[method] = (edges, median_time(fn, args.repeats, 0.02, args.budget))
        if len({e for e, _ in results.values()}) != 1:
            raise RuntimeError(f"{system}: methods disagree on the number of edges: {results}")
        fastest = min(t for _, t in results.values())
        for method, (edges, t) in results.items():
            print(f"| {system:<22} | {n_atoms:>6} | {edges:>8} | {method:<13} | {1e3 * t:>10.3f} "
                  f"| {t / fastest:>9.2f} |", flush=True)


if __name__ == "__main__":
    main()
