"""Is training on an accelerator the same as on the CPU? (docs/training.md, "Training on a GPU")

Two checks on the aspirin configs, printed as figures:

1. One training batch (16 frames, the shipped float file): loss, forces and parameter
   gradients on the device in float32 against the CPU in float64.
2. A few epochs of a GPU config: the trainer's EMA (``torch._foreach_lerp_``) against a
   float64 shadow EMA, and the validation errors of the same EMA weights on the device and
   on a CPU copy. On correct code the two validations agree.

    python experiments/device_training_check.py ../shared/rmd17/rmd17_aspirin_train_01.npz \
        configs/experiments/gpu/aspirin_fp32_gpu_b32.yaml --epochs 5
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch

import qeq_ase.data.neighbors as neighbors
from qeq_ase.io.checkpoint import load_potential_file
from qeq_ase.data.dataset import load_frames
from qeq_ase.train.evaluate import evaluate
from qeq_ase.data.graph import molecules_to_graph
from qeq_ase.train.trainer import TrainConfig, Trainer


def batch_gradients(model, frames, device, dtype):
    """Loss, forces and parameter gradients of the first 16 frames (the training loss)."""
    model = copy.deepcopy(model).to(device=device, dtype=dtype)
    model.reference_energy.data = model.reference_energy.data.double()
    index = np.arange(16)
    graph = molecules_to_graph([frames.numbers] * len(index), list(frames.positions[index]),
                               model.config.cutoff, dtype, device)
    species = model.species_index(graph.numbers)
    target_e = torch.as_tensor(frames.energy[index], device=device)
    target_e = (target_e - torch.zeros_like(target_e).index_add_(0, graph.batch, model.reference_energy[species])).to(dtype)
    target_f = torch.as_tensor(frames.forces[index].reshape(-1, 3), dtype=dtype, device=device)
    out = model.energy_and_forces(graph.positions, species, graph.edge_index, graph.batch, graph.num_graphs,
                                  training=True)
    loss = 0.2 * (out["interaction_energy"] - target_e).pow(2).mean() + (out["forces"] - target_f).pow(2).mean()
    loss.backward()
    grads = {n: p.grad.double().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), out["forces"].detach().double().cpu(), grads


def check_batch(potential: str, frames, device: str) -> None:
    model, _ = load_potential_file(potential)
    ref_loss, ref_forces, ref_grads = batch_gradients(model, frames, "cpu", torch.float64)
    for name, (dev, dtype) in {"cpu float32": ("cpu", torch.float32), f"{device} float32": (device, torch.float32)}.items():
        loss, forces, grads = batch_gradients(model, frames, dev, dtype)
        worst = max(((grads[n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in ref_grads.items())
        print(f"{name}: loss {loss:.6e} (cpu float64 {ref_loss:.6e}), forces rel. error "
              f"{((forces - ref_forces).norm() / ref_forces.norm()).item():.1e}, worst gradient rel. error {worst:.1e}")


def check_ema_and_validation(config: str, device: str, epochs: int) -> None:
    cfg = TrainConfig.from_yaml(config)
    cfg.device, cfg.output_dir, cfg.time_budget_min = device, "runs/device_training_check", 600
    trainer = Trainer(cfg, overwrite=True)  # a scratch folder
    shadow = [p.detach().double().cpu().clone() for p in trainer.ema.model.parameters()]
    update = trainer.ema.update

    def update_with_shadow(model, step):
        update(model, step)
        decay = min(trainer.ema.decay, (1 + step) / (10 + step))  # the formula of train.EMA
        for s, p in zip(shadow, model.parameters()):
            s.mul_(decay).add_(p.detach().double().cpu(), alpha=1 - decay)

    trainer.ema.update = update_with_shadow
    errors = lambda e: f"F {e['forces_mae_meV_per_A']:.2f} meV/Å, E {e['energy_mae_meV']:.2f} meV"
    for epoch in range(1, epochs + 1):
        loss = trainer.train_epoch()
        ema = trainer.ema.model
        drift = max(((p.detach().double().cpu() - s).abs().max() / s.abs().max().clamp_min(1e-12)).item()
                    for p, s in zip(ema.parameters(), shadow))
        print(f"epoch {epoch}: train loss {loss:.4g}, EMA vs float64 shadow {drift:.1e}; validation of the EMA "
              f"on {device}: {errors(evaluate(ema, trainer.val))}; on a CPU copy: "
              f"{errors(evaluate(copy.deepcopy(ema).cpu(), trainer.val))}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("train_file", help="rmd17_aspirin_train_01.npz")
    parser.add_argument("config", help="a training config, e.g. configs/experiments/gpu/aspirin_fp32_gpu_b32.yaml")
    parser.add_argument("--potential", default="potentials/aspirin_fp32.pt", help="float file of check 1")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    neighbors.AUTO_DENSE_MAX_ATOMS = 10 ** 9  # CPU copies too: the dense path needs no matscipy on the device
    check_batch(args.potential, load_frames(args.train_file), args.device)
    check_ema_and_validation(args.config, args.device, args.epochs)


if __name__ == "__main__":
    main()
