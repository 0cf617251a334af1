"""Fit a float32 and then an INT8 potential to one molecule's data: ``qeq-fit TRAIN TEST --name NAME``.

The whole recipe of the shipped potentials in one resumable command:

1. float32 training (``qeq-train`` with the shipped architecture) on TRAIN (rMD17 ``.npz``
   or extended XYZ), a fixed time budget with the learning rate annealed to its end;
2. ``qeq-export`` of its best epoch, evaluated on every frame of TEST -> ``NAME_fp32.pt``;
3. quantization-aware fine-tuning from that file (full scheme: per-channel int8 weights,
   LSQ scalar activations, MDDQ vectors, vector branch after a warm-up);
4. ``qeq-export --int8`` -> ``NAME_int8.pt`` (int8 weights, integer kernels, two-limb inputs).

Every stage writes its files under ``--work-dir/NAME``; run the same command again after an
interruption and it resumes the stage it was in and skips the finished ones. The hashes of
the data files and the options are recorded beside the outputs (:mod:`qeq_ase.train.fit_record`):
a fit with other data or options whose files exist is refused, or with ``--redo`` started
again from scratch, so finished stages are never reused for other inputs. Both outputs
load by path: ``QEqCalculator("OUT/NAME_int8.pt")``.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch

from ..cli.args import ArgumentParser, positive_float, positive_int, torch_device, user_errors
from ..data.dataset import load_frames
from ..io.checkpoint import read_potential_file
from .export import export_potential
from .fit_record import check_name, check_or_reset, fit_record
from .trainer import Trainer, TrainConfig

#: The float recipe: the first stage of aspirin's (configs/recipes/aspirin/fp32.yaml), the one
#: measured best from scratch (docs/training.md, "Why the recipe"), on the compiled training step.
FP32_RECIPE: dict = {
    "n_val": 50,
    "model": {"cutoff": 5.0, "num_features": 128, "num_layers": 4, "num_heads": 8, "num_radial": 16,
              "radial_basis": "expnorm", "neighbor_embedding": True, "attention_normalization": True},
    "batch_size": 8, "lr": 1.0e-2, "min_lr": 1.0e-6, "warmup_epochs": 2, "max_epochs": 5000,
    "energy_weight": 0.01, "force_weight": 1.0, "ema_decay": 0.999, "compile": True,
}
#: The QAT recipe of every shipped INT8 file (configs/recipes/*/int8.yaml): trained on the
#: two-limb inputs the exported file runs with, activation steps calibrated with a 2x margin
#: and kept fixed (learned LSQ steps shrank until test frames were clipped; docs/quantization.md).
INT8_RECIPE: dict = {
    "n_val": 50, "batch_size": 8, "lr": 2.0e-4, "min_lr": 1.0e-6, "warmup_epochs": 0.5, "max_epochs": 200,
    "energy_weight": 1.0, "force_weight": 1.0, "ema_decay": 0.999,
    "quantization": {"scheme": "full", "scalar_start_epoch": 0, "vector_start_epoch": 3, "calibration_batches": 8,
                     "activation_limbs": 2, "step_margin": 2.0, "learn_steps": False},
}


def train_stage(cfg: TrainConfig) -> Path:
    """Run (or resume, or skip if its budget is spent) one training stage; its best file."""
    out = Path(cfg.output_dir)
    resume = (out / "last.pt").is_file()
    Trainer(cfg, resume=resume, overwrite=not resume).run()  # the fit record vouches for the folder
    best = out / "best.pt"
    if not best.is_file():
        raise RuntimeError(f"{out}: training ended without a best model; a QAT stage keeps only epochs after "
                           f"its vector warm-up (vector_start_epoch), so give it a longer budget")
    return best


def fit_potential(train_file: str, test_file: str, name: str, output_dir: str = "potentials_fitted",
                  work_dir: str = "runs/fit", fp32_minutes: float = 60.0, int8_minutes: float = 15.0,
                  fp32_options: dict | None = None, int8_options: dict | None = None,
                  energy_key: str = "energy", forces_key: str = "forces", redo: bool = False) -> dict[str, Path]:
    """Fit ``NAME_fp32.pt`` and ``NAME_int8.pt`` into ``output_dir``; resumes where it stopped.

    ``fp32_options`` and ``int8_options`` override :class:`TrainConfig` keys of the two
    recipes (:data:`FP32_RECIPE`, :data:`INT8_RECIPE`), e.g. ``{"lr": 2e-2, "device": "cuda"}``.
    Existing files of a fit with other data or options raise
    :class:`~qeq_ase.train.fit_record.FitMismatchError`; ``redo=True`` deletes them and fits again.
    Returns the paths of the two potential files.
    """
    check_name(name)
    for label, minutes in (("fp32_minutes", fp32_minutes), ("int8_minutes", int8_minutes)):
        if not (isinstance(minutes, (int, float)) and math.isfinite(minutes) and minutes > 0):
            raise ValueError(f"{label} must be a positive number of minutes, got {minutes!r}")
    # fail before any training on unreadable data
    train, test = (load_frames(path, energy_key=energy_key, forces_key=forces_key) for path in (train_file, test_file))
    work, out = Path(work_dir) / name, Path(output_dir)
    files = {"fp32": out / f"{name}_fp32.pt", "int8": out / f"{name}_int8.pt"}
    record = fit_record(name, train.sha256, test.sha256, {
        "energy_key": energy_key, "forces_key": forces_key, "fp32_minutes": fp32_minutes,
        "int8_minutes": int8_minutes, "fp32_options": fp32_options or {}, "int8_options": int8_options or {}})
    check_or_reset(record, [(out / f"{name}_fit.json", list(files.values())), (work / "fit.json", [work])], redo)
    stages = (
        ("fp32", FP32_RECIPE, {"time_budget_min": fp32_minutes}, fp32_options),
        ("int8", INT8_RECIPE, {"time_budget_min": int8_minutes, "init_from": str(files["fp32"])}, int8_options),
    )
    for kind, recipe, stage, options in stages:
        if files[kind].is_file():
            continue
        merged = merge_options(recipe, {"train_file": str(train_file), "output_dir": str(work / kind),
                                        "energy_key": energy_key, "forces_key": forces_key, **stage}, options or {})
        best = train_stage(TrainConfig(**merged))
        export_potential(str(best), test_file, str(files[kind]), name=f"{name}_{kind}", int8=kind == "int8",
                         energy_key=energy_key, forces_key=forces_key)
    return files


def merge_options(*layers: dict) -> dict:
    """Later layers override earlier ones; nested mappings (``model``, ``quantization``) merge key by key."""
    merged: dict = {}
    for layer in layers:
        for key, value in copy.deepcopy(layer).items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key].update(value)
            else:
                merged[key] = value
    return merged


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="qeq-fit", description=__doc__.split("\n\n")[0])
    parser.add_argument("train_file", help="training data: rMD17 .npz or extended XYZ (eV, eV/Å)")
    parser.add_argument("test_file", help="held-out test data in the same format; every frame is evaluated")
    parser.add_argument("--name", required=True, help="potential name: files NAME_fp32.pt and NAME_int8.pt")
    parser.add_argument("-o", "--output-dir", default="potentials_fitted", help="where the two potential files go")
    parser.add_argument("--work-dir", default="runs/fit", help="checkpoints and logs, WORK_DIR/NAME/{fp32,int8}")
    parser.add_argument("--fp32-minutes", type=positive_float, default=60.0,
                        help="float32 training budget (minutes, > 0)")
    parser.add_argument("--int8-minutes", type=positive_float, default=15.0,
                        help="quantization-aware fine-tune budget (minutes, > 0)")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help=f"float32 peak learning rate (default {FP32_RECIPE['lr']})")
    parser.add_argument("--n-val", type=positive_int, default=None,
                        help="validation frames split off the training file (default 50)")
    parser.add_argument("--energy-key", default="energy", help="extended XYZ: energy key (e.g. REF_energy)")
    parser.add_argument("--forces-key", default="forces", help="extended XYZ: forces key (e.g. REF_forces)")
    parser.add_argument("--redo", action="store_true",
                        help="delete this NAME's outputs and work files and fit again "
                        "(needed when data or options changed)")
    parser.add_argument("--device", type=torch_device, default="cpu")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads for this run")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # a command's own process: not a library side effect
    common = {"device": args.device, **({"n_val": args.n_val} if args.n_val is not None else {})}
    fp32_options = {**common, **({"lr": args.lr} if args.lr is not None else {})}
    with user_errors("qeq-fit"):
        files = fit_potential(args.train_file, args.test_file, args.name, args.output_dir, args.work_dir,
                              args.fp32_minutes, args.int8_minutes, fp32_options, common,
                              args.energy_key, args.forces_key, redo=args.redo)
    summary = {}
    for kind, path in files.items():
        errors = read_potential_file(path)["metadata"]["test_errors"]
        summary[kind] = {"file": str(path), "energy_mae_meV": errors["energy_mae_meV"],
                         "forces_mae_meV_per_A": errors["forces_mae_meV_per_A"]}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
