"""Seconds per training epoch (950 aspirin frames) of a model config, without running a full epoch.

    python benchmarks/training_speed.py configs/aspirin_fp32.yaml --threads 2

Times ``--steps`` optimizer steps (energy + force loss, double backward) after two warm-up
steps on real aspirin batches and extrapolates to one epoch. Run it on an idle machine:
a concurrent job on the same two cores inflates the figure.
"""

import argparse
import statistics
import time

import numpy as np
import torch

from qeq_ase.train import TrainConfig, Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig.from_yaml(args.config)
    cfg.output_dir = "runs/_speed_benchmark"
    trainer = Trainer(cfg, overwrite=True)  # a scratch folder
    model, rng = trainer.model, np.random.default_rng(0)
    times = []
    for step in range(args.steps + 2):
        index = rng.choice(len(trainer.train), cfg.batch_size, replace=False)
        start = time.perf_counter()
        graph, species, target_e, target_f = trainer._batch(trainer.train, index)
        out = model.energy_and_forces(graph.positions, species, graph.edge_index, graph.batch, graph.num_graphs,
                                      training=True)
        loss = (out["interaction_energy"] - target_e).pow(2).mean() + (out["forces"] - target_f).pow(2).mean()
        trainer.optimizer.zero_grad()
        loss.backward()
        trainer.optimizer.step()
        if step >= 2:
            times.append(time.perf_counter() - start)
    per_step = statistics.median(times)
    steps_per_epoch = -(-len(trainer.train) // cfg.batch_size)
    print(f"model: {model.config}")
    print(f"parameters: {model.num_parameters():,}  threads: {args.threads}  batch: {cfg.batch_size}")
    print(f"median step: {per_step * 1000:.1f} ms  ->  {per_step * steps_per_epoch:.1f} s/epoch "
          f"({steps_per_epoch} steps, {len(trainer.train)} frames)")


if __name__ == "__main__":
    main()
