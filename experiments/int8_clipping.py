"""Which activations an INT8 potential clips on test frames, and by how much.

    python experiments/int8_clipping.py benzene_int8 --molecule benzene --frames 1000

Every static activation step ``s`` of an int8 model covers ``|x| <= 127 s``; an input beyond
it is clipped, and its straight-through gradient is zero, so it drops out of the forces.
For each int8 layer with a static input step (and each float fake quantizer left in the
model) this prints the fraction of its inputs on the test frames that lie outside that range
and the largest ``|x|`` against the range.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from qeq_ase.data.dataset import RMD17_MOLECULES, load_rmd17, rmd17_path
from qeq_ase.train.evaluate import evaluate
from qeq_ase.quant.int8_linear import Int8ScalarLinear
from qeq_ase.md.driver import default_rmd17_dir
from qeq_ase.quant.quantizers import LSQQuantizer
from qeq_ase.io.registry import load_model


def _limit(module: torch.nn.Module) -> float:
    if isinstance(module, Int8ScalarLinear):
        return float(module.input_step) * module.input_qmax
    return module.effective_step() * module.qp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("potential", help="int8 potential name or file")
    parser.add_argument("--molecule", required=True, choices=RMD17_MOLECULES)
    parser.add_argument("--frames", type=int, default=1000, help="first N test frames")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.potential)
    test = load_rmd17(rmd17_path(args.molecule, "test", args.data_dir or default_rmd17_dir()))
    test = test.subset(np.arange(min(args.frames, len(test))))

    stats: dict[str, list] = {}  # name -> [clipped, total, max |x|, limit]

    def record(name: str, module: torch.nn.Module, inputs: tuple) -> None:
        x, limit = inputs[0].detach().abs(), _limit(module)
        s = stats.setdefault(name, [0, 0, 0.0, limit])
        s[0] += int((x > limit).sum())
        s[1] += x.numel()
        s[2] = max(s[2], float(x.max()))

    for name, module in model.named_modules():
        static = isinstance(module, Int8ScalarLinear) and module.input_mode == "static"
        if static or (isinstance(module, LSQQuantizer) and module.initialized):
            module.register_forward_pre_hook(lambda m, inputs, name=name: record(name, m, inputs))
    errors = evaluate(model, test)
    print(f"{args.potential} on {len(test)} test frames of {args.molecule}: "
          f"F MAE {errors['forces_mae_meV_per_A']:.2f} meV/Å, E MAE {errors['energy_mae_meV']:.2f} meV\n")
    print("| input of | clipped | max abs(x) / range |")
    print("|---|---|---|")
    for name, (clipped, total, largest, limit) in stats.items():
        print(f"| `{name}` | {clipped / total:.2e} | {largest / limit:.2f} |")


if __name__ == "__main__":
    main()
