"""Seconds per training epoch of a model config, eager against compiled, without a full epoch.

    python benchmarks/training_speed.py configs/recipes/aspirin/fp32.yaml --threads 2

Times ``--steps`` optimizer steps (energy + force loss, double backward) on real batches of
the config's training file, alternating rounds of the eager double backward
(``Model.energy_and_forces(training=True)``) and the compiled force graph
(:mod:`qeq_ase.train.compiled_forces`, ``compile: true``), and extrapolates to one epoch. Before
timing, it checks on one float64 batch that both give the same loss and weight gradients.
``--baseline-tree`` also times the eager step of another checkout (the previous commit) in
the same run. Run it on an idle machine: a concurrent job on the same cores inflates the figures.
"""

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from qeq_ase.train.compiled_forces import CompiledEnergyForces
from qeq_ase.train.trainer import TrainConfig, Trainer


def loss_and_step(trainer, forward, batch) -> float:
    graph, species, target_e, target_f = batch
    out = forward(graph.positions, species, graph.edge_index, graph.batch, graph.num_graphs)
    cfg = trainer.cfg
    loss = (cfg.energy_weight * (out["interaction_energy"] - target_e).pow(2).mean()
            + cfg.force_weight * (out["forces"] - target_f).pow(2).mean())
    trainer.optimizer.zero_grad()
    loss.backward()
    trainer.optimizer.step()
    return loss.item()


def float64_agreement(trainer, batch) -> tuple[float, float]:
    """Relative loss difference and largest relative gradient difference, eager vs compiled, float64."""
    model = copy.deepcopy(trainer.model).double()
    graph, species, target_e, target_f = batch
    positions, target_e, target_f = graph.positions.double(), target_e.double(), target_f.double()
    results = []
    for forward in (lambda *a: model.energy_and_forces(*a, training=True), CompiledEnergyForces(model)):
        out = forward(positions, species, graph.edge_index, graph.batch, graph.num_graphs)
        loss = (out["interaction_energy"] - target_e).pow(2).mean() + (out["forces"] - target_f).pow(2).mean()
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)))
    (loss_e, grad_e), (loss_c, grad_c) = results
    worst = max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(grad_e, grad_c) if a is not None)
    return abs(loss_c.item() - loss_e.item()) / abs(loss_e.item()), worst


def baseline_eager_ms(tree: str, args) -> float:
    """Median eager step (ms) of another checkout, timed by its own copy of this loop."""
    code = ("import sys, time, statistics, numpy as np, torch\n"
            "from qeq_ase.train.trainer import TrainConfig, Trainer\n"
            f"torch.set_num_threads({args.threads})\n"
            f"cfg = TrainConfig.from_yaml({args.config!r}); cfg.output_dir = 'runs/_speed_baseline'\n"
            "t = Trainer(cfg, overwrite=True); rng = np.random.default_rng(1); times = []\n"
            f"for step in range({args.steps} + 2):\n"
            "    b = t._batch(t.train, rng.choice(len(t.train), cfg.batch_size, replace=False))\n"
            "    s = time.perf_counter()\n"
            "    out = t.model.energy_and_forces(b[0].positions, b[1], b[0].edge_index, b[0].batch, b[0].num_graphs, training=True)\n"
            "    loss = (out['interaction_energy'] - b[2]).pow(2).mean() + (out['forces'] - b[3]).pow(2).mean()\n"
            "    t.optimizer.zero_grad(); loss.backward(); t.optimizer.step()\n"
            "    times.append(time.perf_counter() - s)\n"
            "print(statistics.median(times[2:]) * 1000)\n")
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of each")
    parser.add_argument("--baseline-tree", default=None, help="a checkout whose eager step is timed too")
    parser.add_argument("--profile", action="store_true", help="print the ops that take the compiled step's time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig.from_yaml(args.config)
    cfg.output_dir, cfg.compile = "runs/_speed_benchmark", False
    trainer = Trainer(cfg, overwrite=True)  # a scratch folder
    rng = np.random.default_rng(0)

    def batch():
        return trainer._batch(trainer.train, rng.choice(len(trainer.train), cfg.batch_size, replace=False))

    loss_diff, grad_diff = float64_agreement(trainer, batch())
    print(f"float64, one batch: relative loss difference {loss_diff:.1e}, largest relative gradient "
          f"difference {grad_diff:.1e} (compiled vs eager)")
    eager = lambda *a: trainer.model.energy_and_forces(*a, training=True)  # noqa: E731
    compiled = CompiledEnergyForces(trainer.model)
    start = time.perf_counter()
    loss_and_step(trainer, compiled, batch())
    print(f"compile (first step): {time.perf_counter() - start:.0f} s")
    medians = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        for name, forward in (("eager", eager), ("compiled", compiled)):
            times = []
            for step in range(args.steps + 2):
                b = batch()
                t0 = time.perf_counter()
                loss_and_step(trainer, forward, b)
                if step >= 2:
                    times.append(time.perf_counter() - t0)
            medians[name].append(statistics.median(times) * 1000)
    if args.baseline_tree:
        medians["baseline eager"] = [baseline_eager_ms(args.baseline_tree, args)]
    steps_per_epoch = -(-len(trainer.train) // cfg.batch_size)
    print(f"model: {trainer.model.config}")
    print(f"parameters: {trainer.model.num_parameters():,}  threads: {args.threads}  batch: {cfg.batch_size}  "
          f"({steps_per_epoch} steps, {len(trainer.train)} frames per epoch)")
    for name, ms in medians.items():
        print(f"{name:>15}: median step {' / '.join(f'{m:.1f}' for m in ms)} ms -> "
              f"{' / '.join(f'{m * steps_per_epoch / 1000:.1f}' for m in ms)} s/epoch")
    ratio = [c / e for c, e in zip(medians["compiled"], medians["eager"])]
    print(f"compiled / eager time per step: {' / '.join(f'{r:.2f}' for r in ratio)}")
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                loss_and_step(trainer, compiled, batch())
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
