"""``qeq-info``: what qeq-ase will run on this machine.

    qeq-info                           the CPU, its ISA, threads and the C++ kernels' build state
    qeq-info aspirin_int8 --build      also what that potential runs (int8 GEMM, edge kernel),
                                       compiling the kernels now if they are not built yet

The int8 GEMM is chosen per CPU (:func:`qeq_ase.quant.int8_kernels.resolve_gemm`): oneDNN's brgemm
micro-kernel where oneDNN may use AMX-INT8, ``torch._int_mm`` where it is exact (VNNI), and
exact int8 products from fp32 GEMMs on CPUs without VNNI (AVX2), where ``torch._int_mm`` saturates.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from ..kernels import cpp_extension, edge_kernel, node_update  # noqa: F401  (registers the kernels)
from ..kernels.cpu_features import describe, int_mm_is_exact
from ..quant import int8_kernels
from .args import ArgumentParser, user_errors

GEMM_NAMES = {"int_mm": "torch._int_mm (oneDNN VNNI GEMM)", "brgemm": "oneDNN brgemm micro-kernel (AMX-INT8)",
              "onednn": "oneDNN int8 linear (AMX-INT8)",
              "int_mm via float": "exact int8 products from fp32 GEMMs (no VNNI: torch._int_mm would saturate)"}


def gemm_name(gemm: str) -> str:
    """What the int8 GEMM ``gemm`` is on this CPU."""
    return GEMM_NAMES["int_mm via float" if gemm == "int_mm" and not int_mm_is_exact() else gemm]


def machine_report(build: bool = False) -> dict:
    """The CPU, torch's threads and ISA, the int8 GEMM ``"auto"`` picks, and each C++ kernel's state
    (``build=True`` compiles the kernels that are not built yet)."""
    kernels = {}
    for ext in cpp_extension.package_kernels().values():
        if build:
            try:
                ext.load()
            except RuntimeError:
                pass  # status() reports the failure
        kernels[ext.name] = ext.status()
    return {**describe(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "int8_gemm": int8_kernels.resolve_gemm("auto"), "kernels": kernels}


def potential_report(name: str) -> dict:
    """What the potential ``name`` runs here: precision, int8 GEMM, edge kernel, GEMM layer counts.
    Builds the C++ kernels if needed (the report asks each layer which kernel it runs)."""
    from ..quant.int8_model import int8_gemm, int8_kernel_report, is_int8_model
    from ..io.registry import load_model

    model, metadata = load_model(name)
    report = int8_kernel_report(model)
    row = {"potential": name, "precision": "int8" if is_int8_model(model) else "fp32",
           "edge_messages": report["edge_messages"], "int8_gemm_layers": report["int8_gemm_layers"],
           "float_gemm_layers": report["float_gemm_layers"]}
    if row["precision"] == "int8":
        row["int8_gemm"] = gemm_name(int8_gemm(model))
        row["activation_limbs"] = metadata["quantization"].get("activation_limbs", 1)
        row["test_errors_recorded_with"] = metadata.get("test_errors", {}).get("int8_gemm", "int_mm")
    return row


def format_report(machine: dict, potentials: list[dict]) -> str:
    lines = [f"CPU           {machine['cpu']} ({' '.join(machine['isa_flags'])})",
             f"torch         {machine['torch']}, ISA {machine['torch_capability']}, {machine['threads']} threads "
             f"on {machine['cores']} cores",
             f"oneDNN        ISA limit {machine['onednn_isa_limit']}, AMX-INT8 {'yes' if machine['amx_int8_usable'] else 'no'}",
             f"int8 GEMM     {gemm_name(machine['int8_gemm'])}",
             f"C++ kernels   -march={machine['kernel_march']}: "
             + ", ".join(f"{name} {state}" for name, state in machine["kernels"].items())]
    for row in potentials:
        lines.append(f"{row['potential']:13s} {row['precision']}, edge work: {row['edge_messages']}, "
                     f"{row['int8_gemm_layers']} int8 / {row['float_gemm_layers']} float GEMM layers")
        if row["precision"] == "int8":
            lines.append(f"{'':13s} int8 GEMM {row['int8_gemm']}, {row['activation_limbs']} activation limb(s); "
                         f"test errors recorded with {row['test_errors_recorded_with']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="qeq-info", description=__doc__.split("\n\n")[0])
    parser.add_argument("potentials", nargs="*", help="shipped potential names or potential files to describe")
    parser.add_argument("--build", action="store_true", help="compile the C++ kernels now if they are not built")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    with user_errors("qeq-info"):
        potentials = [potential_report(name) for name in args.potentials]
    machine = machine_report(build=args.build)
    if args.json:
        print(json.dumps({"machine": machine, "potentials": potentials}, indent=2))
    else:
        print(format_report(machine, potentials))
    return 0


if __name__ == "__main__":
    sys.exit(main())
