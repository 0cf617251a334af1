"""How much error int8 itself adds: post-training quantization (no fine-tuning) of a float
potential, beside the float potential and a quantization-aware one, on the same test frames.

    python experiments/int8_ptq.py --fp32 aspirin_fp32 --int8 aspirin_int8 --frames 1000

The float model gets the full scheme's quantizers, activation steps calibrated on 8 float
batches of 8 training frames (as ``qeq-train`` does before QAT; the largest input of all
batches), widened by each ``--step-margins`` factor, and is converted to the real int8 model,
which is evaluated with one and with two activation limbs.
"""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import torch

from qeq_ase.data.dataset import load_rmd17, rmd17_path, train_val_split
from qeq_ase.train.evaluate import evaluate
from qeq_ase.data.graph import molecules_to_graph
from qeq_ase.quant.int8_model import convert_to_int8, set_activation_limbs
from qeq_ase.md.driver import default_rmd17_dir
from qeq_ase.quant.qat import calibration, convert_to_qat, set_quantization, widen_activation_steps
from qeq_ase.io.registry import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp32", default="aspirin_fp32")
    parser.add_argument("--int8", default="aspirin_int8", help="a QAT int8 potential to compare with")
    parser.add_argument("--molecule", default="aspirin")
    parser.add_argument("--frames", type=int, default=1000, help="first N test frames")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--step-margins", type=float, nargs="+", default=[1.0, 2.0],
                        help="calibrated activation steps times these (qat.widen_activation_steps)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = args.data_dir or default_rmd17_dir()
    train = load_rmd17(rmd17_path(args.molecule, "train", data))
    test = load_rmd17(rmd17_path(args.molecule, "test", data))
    test = test.subset(np.arange(min(args.frames, len(test))))

    fp32, _ = load_model(args.fp32)
    qat = convert_to_qat(fp32, "full", scalar=False, vector=False)
    rng = np.random.default_rng(0)
    train_index, _ = train_val_split(len(train), 50, 0)
    with calibration(qat):
        for _ in range(8):
            index = rng.choice(train_index, 8, replace=False)
            g = molecules_to_graph([train.numbers] * 8, list(train.positions[index]), qat.config.cutoff)
            qat.energy_and_forces(g.positions, qat.species_index(g.numbers), g.edge_index, g.batch, g.num_graphs)
    set_quantization(qat, scalar=True, vector=True)
    rows = {"fp32": evaluate(fp32, test)}
    for margin in args.step_margins:
        calibrated = copy.deepcopy(qat)
        widen_activation_steps(calibrated, margin)
        int8 = convert_to_int8(calibrated)
        for limbs in (2, 1):
            rows[f"PTQ int8, {limbs} limb(s), step margin {margin:g}"] = evaluate(set_activation_limbs(int8, limbs), test)
    qat_int8, meta = load_model(args.int8)
    rows[f"{args.int8} (QAT, {meta['quantization'].get('activation_limbs', 1)} limb(s))"] = evaluate(qat_int8, test)
    print(json.dumps(rows, indent=1))
    print(f"\n| model | energy MAE (meV) | force MAE (meV/Å) | force / fp32 |  ({len(test)} test frames)")
    print("|---|---|---|---|")
    for name, r in rows.items():
        ratio = r["forces_mae_meV_per_A"] / rows["fp32"]["forces_mae_meV_per_A"]
        print(f"| {name} | {r['energy_mae_meV']:.2f} | {r['forces_mae_meV_per_A']:.2f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
