"""Errors of a potential on its own training frames, its validation frames and the test file.

    python benchmarks/generalisation_gap.py aspirin_fp32 --molecule aspirin --frames 200

The training and validation frames are those ``qeq-train`` used (``train_val_split`` of the
``train_01`` file with the metadata's ``n_val`` and ``split_seed``; a file trained with
``n_train`` used a subset of these training frames). A training error far below the test
error says the model is limited by how it generalises from the 950 frames, not by how far
its optimiser got.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from qeq_ase.data.dataset import RMD17_MOLECULES, load_rmd17, rmd17_path, train_val_split
from qeq_ase.train.evaluate import evaluate
from qeq_ase.md.driver import default_rmd17_dir
from qeq_ase.io.registry import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("potential", help="potential name or file")
    parser.add_argument("--molecule", required=True, choices=RMD17_MOLECULES)
    parser.add_argument("--frames", type=int, default=200, help="at most N frames of each set")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, metadata = load_model(args.potential)
    data = metadata.get("training_data", {})
    data_dir = args.data_dir or default_rmd17_dir()
    train_file = load_rmd17(rmd17_path(args.molecule, "train", data_dir))
    train_idx, val_idx = train_val_split(len(train_file), data.get("n_val", 50), data.get("split_seed", 0))
    test = load_rmd17(rmd17_path(args.molecule, "test", data_dir))
    sets = {"train": train_file.subset(train_idx[:args.frames]),
            "validation": train_file.subset(val_idx[:args.frames]),
            "test": test.subset(np.arange(min(args.frames, len(test))))}
    print(f"{args.potential}: MAE on the first {args.frames} frames of each set")
    print(f"{'set':<11} {'frames':>6} {'F (meV/Å)':>10} {'E (meV)':>8}")
    for name, frames in sets.items():
        errors = evaluate(model, frames)
        print(f"{name:<11} {len(frames):>6} {errors['forces_mae_meV_per_A']:>10.2f} {errors['energy_mae_meV']:>8.2f}")


if __name__ == "__main__":
    main()
