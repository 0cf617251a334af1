"""The INT8 ablation of docs/quantization.md on one rMD17 molecule, from training to table.

    python experiments/int8_ablation.py ethanol --threads 1     # resumable: rerun after a stop

Rows, each ingredient added to the one before (arXiv:2601.02213's three ideas):

1. ``naive``: per-tensor int8 weights and activations, vector components on one grid, both
   branches quantized from the first epoch, on a float model *without* attention normalisation;
2. ``+mddq``: the full scheme (per-channel weights, LSQ scalars, MDDQ vectors), both
   branches from the first epoch, same float model;
3. ``+branch``: the vector branch switched on after a 3-epoch warm-up;
4. ``+attention_norm``: the same fine-tune of the shipped float model, which has cosine
   attention with a temperature.

The float model without attention normalisation is trained with the shipped float recipe
(:data:`qeq_ase.train.fit.FP32_RECIPE`) for as many epochs as the shipped one got (its learning
rate annealed over them; the shipped minutes cap it), so the two float models differ only
in the attention logits. Every row is a W8A8 fine-tune (the paper's
setting: learned LSQ steps, one activation limb) of the same length, exported to the real
int8 model and evaluated on every test frame with one and with two activation limbs, with
the local equivariance error LEE (:mod:`qeq_ase.checks.equivariance`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from qeq_ase.io.checkpoint import read_potential_file
from qeq_ase.data.dataset import RMD17_MOLECULES, load_rmd17, rmd17_path
from qeq_ase.checks.equivariance import check_equivariance
from qeq_ase.train.evaluate import evaluate
from qeq_ase.train.export import export_potential
from qeq_ase.train.fit import FP32_RECIPE, INT8_RECIPE, merge_options, train_stage
from qeq_ase.quant.int8_model import set_activation_limbs
from qeq_ase.md.driver import default_rmd17_dir
from qeq_ase.io.registry import load_model
from qeq_ase.train.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
#: row -> (float model, QAT scheme, vector branch start epoch)
ROWS = {
    "naive": ("no_attention_norm", "naive", 0),
    "+mddq": ("no_attention_norm", "full", 0),
    "+branch": ("no_attention_norm", "full", 3),
    "+attention_norm": ("shipped", "full", 3),
}


def _measure(path: Path, test, limbs: int | None, lee_frames: int, lee_rotations: int) -> dict:
    model, _ = load_model(path)
    if limbs is not None:
        set_activation_limbs(model, limbs)
    errors = evaluate(model, test)
    lee = check_equivariance(model, test.numbers, test.positions[:lee_frames], n_rotations=lee_rotations)
    return {"forces_mae_meV_per_A": errors["forces_mae_meV_per_A"], "energy_mae_meV": errors["energy_mae_meV"],
            "lee_meV_per_A": lee.lee_mean_meV_per_A}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("molecule", choices=RMD17_MOLECULES)
    parser.add_argument("--data-dir", default=None, help="rMD17 folder (default $QEQ_RMD17_DIR or ../shared/rmd17)")
    parser.add_argument("--qat-minutes", type=float, default=8.0, help="fine-tune budget of every row")
    parser.add_argument("--lee-frames", type=int, default=10)
    parser.add_argument("--lee-rotations", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data_dir or default_rmd17_dir())
    train_file, test_file = (str(rmd17_path(args.molecule, split, data)) for split in ("train", "test"))
    work = ROOT / "runs" / "int8_ablation" / args.molecule
    shipped = ROOT / "potentials" / f"{args.molecule}_fp32.pt"
    trained = read_potential_file(shipped)["metadata"]

    floats = {"shipped": shipped, "no_attention_norm": work / "fp32_no_attention_norm.pt"}
    if not floats["no_attention_norm"].is_file():
        cfg = merge_options(FP32_RECIPE, {
            "train_file": train_file, "output_dir": str(work / "fp32_no_attention_norm"),
            "max_epochs": trained["epochs"], "time_budget_min": trained["training_minutes"],
            "model": {"attention_normalization": False}})
        export_potential(str(train_stage(TrainConfig(**cfg))), test_file, str(floats["no_attention_norm"]))

    files = {}
    for row, (base, scheme, vector_start) in ROWS.items():
        name = row.lstrip("+")
        cfg = merge_options(INT8_RECIPE, {
            "train_file": train_file, "output_dir": str(work / name),
            "time_budget_min": args.qat_minutes, "init_from": str(floats[base]),
            "quantization": {"scheme": scheme, "vector_start_epoch": vector_start,
                             "activation_limbs": 1, "step_margin": 1.0, "learn_steps": True}})
        files[row] = work / f"{name}_int8.pt"
        if not files[row].is_file():
            export_potential(str(train_stage(TrainConfig(**cfg))), test_file, str(files[row]), int8=True)

    test = load_rmd17(test_file)
    results = {f"fp32 {base}": _measure(path, test, None, args.lee_frames, args.lee_rotations)
               for base, path in floats.items()}
    for row, path in files.items():
        results[row] = {f"{limbs}_limb": _measure(path, test, limbs, args.lee_frames, args.lee_rotations)
                        for limbs in (1, 2)}
    (work / "results.json").write_text(json.dumps(results, indent=1))

    print(f"\n{args.molecule}, {len(test)} test frames; F MAE meV/Å, E MAE meV, LEE meV/Å "
          f"({args.lee_frames} frames x {args.lee_rotations} rotations)\n")
    print("| row | W8A8: F MAE | E MAE | LEE | two limbs: F MAE | E MAE | LEE |")
    print("|---|---|---|---|---|---|---|")
    for row, r in results.items():
        cells = [r] if row.startswith("fp32") else [r["1_limb"], r["2_limb"]]
        text = " | ".join(f"{c['forces_mae_meV_per_A']:.2f} | {c['energy_mae_meV']:.2f} | {c['lee_meV_per_A']:.3f}"
                          for c in cells)
        print(f"| {row} | {text} |")


if __name__ == "__main__":
    main()
