"""Is the INT8 energy a smooth function of the positions? fp32 vs W8A8 vs two-limb INT8.

    PYTHONPATH=. python experiments/int8_smoothness.py [--fp32 aspirin_fp32] [--int8 aspirin_int8] [--per-layer]

Along a straight path of 0.04 Å (81 points, a random unit direction in the 63-dimensional
configuration space of rMD17 aspirin frame 0) it compares the energy change with the work
of the forces, ``max_t |E(t) - E(0) - integral of -F . dx|``: zero (up to the trapezoid
rule) when the forces are the gradient of the energy, as MD's energy conservation needs.
It also prints the largest change of any force component for displacements of 1e-5,
1e-4 and 1e-3 Å (a smooth surface changes linearly; a step function jumps).

``--per-layer`` quantizes the activations of one INT8 layer at a time (W8A8; every other
layer computes in float with its dequantized int8 weights) to show where the steps come from.
"""

from __future__ import annotations

import argparse
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qeq_ase.calculator import QEqCalculator
from qeq_ase.quant.int8_linear import Int8VectorLinear, _Int8LinearBase
from qeq_ase.md.driver import load_start_structure
from qeq_ase.quant.quantizers import LSQQuantizer, MDDQQuantizer

RMD17 = Path(__file__).resolve().parents[2] / "shared" / "rmd17"


def path_check(calc: QEqCalculator, data_dir: Path, seed: int = 0) -> tuple[float, list[float]]:
    """(max |E - E0 - W| in meV, max force change in meV/Å at 1e-5, 1e-4, 1e-3 Å)."""
    atoms = load_start_structure("rmd17:aspirin:0", data_dir)
    atoms.calc = calc
    direction = np.random.default_rng(seed).normal(size=atoms.positions.shape)
    direction /= np.linalg.norm(direction)
    x0 = atoms.positions.copy()
    ts = np.linspace(-0.02, 0.02, 81)
    energy, slope = [], []
    for t in ts:
        atoms.positions = x0 + t * direction
        energy.append(atoms.get_potential_energy())
        slope.append(-(atoms.get_forces() * direction).sum())
    energy, slope = np.array(energy), np.array(slope)
    work = np.concatenate([[0.0], np.cumsum(0.5 * (slope[1:] + slope[:-1]) * np.diff(ts))])
    jumps = []
    for t in (1e-5, 1e-4, 1e-3):
        atoms.positions = x0
        f0 = atoms.get_forces()
        atoms.positions = x0 + t * direction
        jumps.append(1e3 * float(np.abs(atoms.get_forces() - f0).max()))
    return 1e3 * float(np.abs(energy - energy[0] - work).max()), jumps


def _float_linear(layer: _Int8LinearBase, x: torch.Tensor) -> torch.Tensor:
    bias = None if isinstance(layer, Int8VectorLinear) else layer.bias
    return nn.functional.linear(x, layer.dequantized_weight(), bias)


def quantize_only(calc: QEqCalculator, keep: str) -> QEqCalculator:
    """Every INT8 layer and float quantizer except ``keep`` computes in float (in place)."""
    for name, module in calc.model.named_modules():
        if name == keep or name.startswith(keep + "."):
            continue
        if isinstance(module, _Int8LinearBase):
            if isinstance(module, Int8VectorLinear):
                module.mddq = None
            module._apply_int8 = types.MethodType(_float_linear, module)
        elif isinstance(module, (LSQQuantizer, MDDQQuantizer)):
            module.forward = types.MethodType(lambda self, x: x, module)
    return calc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp32", default="aspirin_fp32")
    parser.add_argument("--int8", default="aspirin_int8")
    parser.add_argument("--data-dir", type=Path, default=RMD17)
    parser.add_argument("--per-layer", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | max \\|E - E0 - W\\| (meV) | max \\|dF\\| at 1e-5 / 1e-4 / 1e-3 Å (meV/Å) |")
    print("|---|---|---|")
    runs = [(f"{args.fp32}", QEqCalculator(args.fp32)),
            (f"{args.int8}, W8A8", QEqCalculator(args.int8, activation_limbs=1)),
            (f"{args.int8}, two limbs", QEqCalculator(args.int8, activation_limbs=2))]
    if args.per_layer:
        names = [name for name, m in QEqCalculator(args.int8, activation_limbs=1).model.named_modules()
                 if isinstance(m, (_Int8LinearBase, LSQQuantizer, MDDQQuantizer)) and not name.endswith(".magnitude")]
        runs += [(f"W8A8 {name} only", quantize_only(QEqCalculator(args.int8, activation_limbs=1), name))
                 for name in names]
    for label, calc in runs:
        inconsistency, jumps = path_check(calc, args.data_dir)
        print(f"| {label} | {inconsistency:.3f} | " + " / ".join(f"{j:.2f}" for j in jumps) + " |", flush=True)


if __name__ == "__main__":
    main()
