"""One layer's edge-kernel backward: float filter gradient against int8 gradient codes.

Times ``edge_kernel.load_edge_kernel().backward`` on one block of edges (F = 128, 8 heads):
the 5 Å graph of 64 copies of rMD17 aspirin frame 0 (1,344 atoms, 18,688 edges; ``--graph
aspirin``, the default) or a random graph of 1,344 receivers with 14 random senders each
(``--graph random``, no locality at all), writing the ``[E, 4F]`` filter
gradient as floats (the fp32 model, and INT8 with ``backward="float"``) or as two-limb
int8 codes with one scale per edge (INT8 with ``backward="auto"``), and, for comparison, the
separate per-row quantization pass that the codes replace (``quantize_per_row_limbs``).

    PYTHONPATH=. python experiments/edge_filter_gradient.py [--graph aspirin|random] [--threads 2] [--repeats 10]

Median ms per call; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qeq_ase.kernels.edge_kernel import EdgeCSR, load_edge_kernel, receiver_order
from qeq_ase.quant.int8_kernels import load_cpp_kernels
from qeq_ase.quant.quantizers import TINY


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def edges(graph: str, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """Receiver-sorted ``edge_index [2, E]`` and the number of nodes."""
    if graph == "random":
        N, degree = 1344, 14
        sender = torch.randint(0, N, (N * degree,), generator=gen)
        return torch.stack([sender, torch.arange(N).repeat_interleave(degree)]), N
    from inference_speed import copies_of_aspirin  # benchmarks/ is on sys.path when run as a script
    from qeq_ase.data.neighbors import molecule_edges

    atoms = copies_of_aspirin(64)
    edge_index = molecule_edges(torch.as_tensor(atoms.positions), 5.0)
    order = receiver_order(edge_index)
    return (edge_index if order is None else edge_index[:, order]), len(atoms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--graph", choices=["aspirin", "random"], default="aspirin")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    edge_index, N = edges(args.graph, gen)
    F, H, E = 128, 8, edge_index.shape[1]
    csr = EdgeCSR.from_sorted_edges(edge_index, N)
    graph = (csr.rowptr, csr.sender, csr.receiver, csr.colptr, csr.sender_order)
    qkv, vin = torch.randn(N, 5 * F, generator=gen), torch.randn(N, 3, F, generator=gen)
    filt, envelope = torch.randn(E, 4 * F, generator=gen), torch.rand(E, generator=gen)
    unit = torch.nn.functional.normalize(torch.randn(E, 3, generator=gen), dim=-1)
    scale = torch.full((H,), 5.0)
    kernel = load_edge_kernel()
    _, _, *saved = kernel.forward(qkv, vin, filt, envelope, unit, scale, *graph, True)
    grads = (torch.randn(N, F, generator=gen), torch.randn(N, 3, F, generator=gen))
    col_scale = torch.rand(4 * F, generator=gen) + 0.5
    inputs = (*grads, qkv, vin, filt, envelope, unit, scale, *saved, *graph, True)
    dfilt = kernel.backward(*inputs)[2]
    quantize = load_cpp_kernels().quantize_per_row_limbs
    rows = {
        "backward, float [E, 4F] filter gradient": lambda: kernel.backward(*inputs),
        "backward, int8 gradient codes": lambda: kernel.backward(*inputs, filt_col_scale=col_scale, tiny=TINY,
                                                                  planar=True),
        "separate per-row quantization of the float gradient": lambda: quantize(dfilt, col_scale, 127, TINY, 2, True),
    }
    print(f"{args.graph} graph, {N} nodes, {E} edges, F = {F}, {args.threads} thread(s), median of {args.repeats}")
    for name, fn in rows.items():
        print(f"{name:55s} {median_ms(fn, args.repeats):8.2f} ms")


if __name__ == "__main__":
    main()
