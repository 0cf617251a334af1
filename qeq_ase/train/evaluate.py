"""Energy and force errors of a potential on reference frames (``qeq-eval``)."""

from __future__ import annotations

import json

import numpy as np
import torch

from ..cli.args import ArgumentParser, positive_int, user_errors
from ..data.dataset import Frames, load_frames
from ..data.graph import molecules_to_graph
from ..model.potential import Potential


def predict_frames(model: Potential, frames: Frames, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Predicted energies (eV ``[n_frames]``) and forces (eV/Å ``[n_frames, n_atoms, 3]``)."""
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    energies, forces = [], []
    for start in range(0, len(frames), batch_size):
        pos = frames.positions[start:start + batch_size]
        graph = molecules_to_graph([frames.numbers] * len(pos), list(pos), model.config.cutoff, dtype, device,
                                   centre=True)
        out = model.energy_and_forces(graph.positions, model.species_index(graph.numbers), graph.edge_index,
                                      graph.batch, graph.num_graphs)
        energies.append(out["energy"].detach().cpu().numpy())
        forces.append(out["forces"].detach().cpu().numpy().reshape(len(pos), frames.n_atoms, 3))
    return np.concatenate(energies), np.concatenate(forces)


def error_metrics(frames: Frames, energy: np.ndarray, forces: np.ndarray) -> dict[str, float]:
    """MAE and RMSE of energies (meV) and force components (meV/Å)."""
    de = (energy - frames.energy) * 1000.0
    df = (forces - frames.forces) * 1000.0
    return {
        "energy_mae_meV": float(np.abs(de).mean()),
        "energy_rmse_meV": float(np.sqrt((de ** 2).mean())),
        "forces_mae_meV_per_A": float(np.abs(df).mean()),
        "forces_rmse_meV_per_A": float(np.sqrt((df ** 2).mean())),
        "n_frames": int(len(frames)),
    }


def evaluate(model: Potential, frames: Frames, batch_size: int = 32) -> dict[str, float]:
    """Errors of ``model`` on ``frames``; see :func:`error_metrics`."""
    energy, forces = predict_frames(model, frames, batch_size)
    return error_metrics(frames, energy, forces)


def main(argv: list[str] | None = None) -> None:
    from ..kernels.glibc_malloc import keep_large_allocations
    from ..io.registry import load_model

    parser = ArgumentParser(prog="qeq-eval", description="Energy and force MAE of a potential on an rMD17 or extended XYZ file.")
    parser.add_argument("model", help="shipped potential name (e.g. aspirin_fp32) or path to a potential file")
    parser.add_argument("data", help="rMD17 .npz file (kcal/mol, converted on load) or extended XYZ (eV, eV/Å)")
    parser.add_argument("--energy-key", default="energy", help="extended XYZ: energy key")
    parser.add_argument("--forces-key", default="forces", help="extended XYZ: forces key")
    parser.add_argument("--frames", type=positive_int, default=None, help="evaluate only the first N frames")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                        help="float dtype of the model (INT8 potentials: float32 only)")
    parser.add_argument("--activation-limbs", type=int, choices=(1, 2), default=None,
                        help="int8 potentials: 1 (W8A8) or 2 (two-limb inputs); default: the file's")
    args = parser.parse_args(argv)
    keep_large_allocations()  # this command's own process (docs/speed.md)
    with user_errors("qeq-eval"):
        model, _ = load_model(args.model, dtype=getattr(torch, args.dtype))
        if args.activation_limbs is not None:
            from ..quant.int8_model import set_activation_limbs

            set_activation_limbs(model, args.activation_limbs)
        frames = load_frames(args.data, energy_key=args.energy_key, forces_key=args.forces_key)
        if args.frames:
            frames = frames.subset(np.arange(min(args.frames, len(frames))))
        errors = evaluate(model, frames, args.batch_size)  # refuses elements the potential does not know
    print(json.dumps(errors, indent=2))


if __name__ == "__main__":
    main()
