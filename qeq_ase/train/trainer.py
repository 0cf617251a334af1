"""Training: ``qeq-train CONFIG.yaml [--resume] [--device cuda]``.

Energy + force loss, AdamW, a warm-up then cosine learning-rate decay to ``min_lr`` at the
end of a fixed budget (epochs or wall-clock minutes, whichever runs out first), an
exponential moving average (EMA) of the weights that is validated each epoch, the best
EMA weights kept as a potential file, a checkpoint every epoch that ``--resume`` picks up
after an interruption, and a CSV log of the curves.

Quantization-aware training (``quantization:`` in the config) fine-tunes a float potential
(``init_from``) with fake-quantized layers (:mod:`qeq_ase.quant.qat`): activation steps are set by
a float calibration pass, then the scalar and the vector branch are switched on at their own
epochs (branch-separated QAT: vectors after a warm-up). ``best.pt`` then holds the QAT
weights (``precision: "qat"``), which ``qeq-export --int8`` turns into a real INT8 file.

Files in ``output_dir``: ``last.pt`` (resumable state), ``best.pt`` (potential file, best
validation EMA weights), ``final.pt`` (potential file, the EMA weights at the end of the
budget), ``log.csv``, ``config.yaml``. A folder that already holds a run (any of
:data:`RUN_FILES`) is refused unless the run is resumed or ``overwrite`` is given.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from ..cli.args import ArgumentParser, positive_int, torch_device, user_errors
from ..data.dataset import Frames, load_frames, train_val_split
from ..data.energy_reference import fit_reference_energies
from ..data.graph import molecules_to_graph
from ..io.checkpoint import load_potential_file, save_potential
from ..model.potential import Potential, build_potential
from .evaluate import evaluate

#: Files of a run in its output folder that a new run would replace or append to.
RUN_FILES = ("last.pt", "best.pt", "final.pt", "log.csv")


#: (option, type, lower bound, bound excluded) checked by TrainConfig: a zero or negative
#: budget would otherwise mean "no limit", a zero n_val an empty validation set.
_CONFIG_RANGES = (
    ("n_val", int, 1, False), ("n_train", int, 1, False), ("batch_size", int, 1, False),
    ("max_epochs", int, 1, False), ("time_budget_min", float, 0, True), ("lr", float, 0, True),
    ("min_lr", float, 0, False), ("warmup_epochs", float, 0, False), ("energy_weight", float, 0, False),
    ("force_weight", float, 0, False), ("ema_decay", float, 0, False), ("grad_clip", float, 0, True),
    ("weight_decay", float, 0, False),
)


@dataclass
class TrainConfig:
    """Options of a training run (the YAML config file holds these keys)."""

    train_file: str                                     # rMD17 .npz or extended XYZ (eV, eV/Å)
    output_dir: str = "runs/aspirin_fp32"
    n_val: int = 50
    n_train: int | None = None                          # None: every frame not used for validation
    split_seed: int = 0
    seed: int = 0
    architecture: str = "qeq-transformer"               # a name of qeq_ase.model.potential.ARCHITECTURES
    model: dict = field(default_factory=dict)          # its config's fields; species from the data
    batch_size: int = 8
    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.0                           # AdamW decay of weight matrices and embeddings
    warmup_epochs: float = 1.0
    max_epochs: int = 1000
    time_budget_min: float | None = None                # cosine ends here if reached before max_epochs
    energy_weight: float = 1.0                          # on (E_pred - E)^2, eV^2 per structure
    force_weight: float = 1.0                           # on (F_pred - F)^2, (eV/Å)^2 per component
    ema_decay: float = 0.999
    grad_clip: float = 10.0
    init_from: str | None = None                        # potential file to start from (fine-tuning)
    quantization: dict | None = None                    # QAT options, see QuantizationConfig
    device: str = "cpu"
    compile: bool = False                               # energy + forces as one compiled graph (compiled_forces)
    energy_key: str = "energy"                          # extended XYZ keys (e.g. MACE's REF_energy)
    forces_key: str = "forces"

    def __post_init__(self) -> None:
        for name, kind, low, strict in _CONFIG_RANGES:
            value = getattr(self, name)
            if value is None and name in ("n_train", "time_budget_min"):
                continue
            if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
                try:
                    value = float(value)
                    setattr(self, name, value)
                except ValueError:
                    pass
            ok_type = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
            if not ok_type or not math.isfinite(value) or value < low or (strict and value == low):
                raise ValueError(f"training option {name} must be {'an integer' if kind is int else 'a number'} "
                                 f"{'>' if strict else '>='} {low}, got {value!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"training option compile must be true or false, got {self.compile!r}")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "TrainConfig":
        """Read a YAML mapping of options; ValueError for anything else (one line)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"training config not found: {path}")
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not a YAML file ({' '.join(str(err).split())})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a training config: expected a YAML mapping of options "
                             f"(train_file: ..., output_dir: ...), got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown training option(s) {sorted(unknown)}; known: {sorted(known)}")
        if "train_file" not in data:
            raise ValueError(f"{path}: the option train_file (rMD17 .npz or extended XYZ) is missing")
        return cls(**data)


@dataclass
class QuantizationConfig:
    """Quantization-aware training options (the ``quantization:`` mapping of a config).

    Attributes:
        scheme: ``"full"`` (per-channel weights, LSQ scalars, MDDQ vectors) or ``"naive"``
            (per-tensor quantization of every tensor, vector components included).
        scalar_start_epoch: epoch (0-based, counted in this run) at which the scalar branch is switched on.
        vector_start_epoch: same for the vector branch (the warm-up of branch separation).
        calibration_batches: float batches that set the activation steps before training.
        weight_bits, activation_bits: bit widths.
        activation_limbs: 1 (W8A8 fake quantization, the paper's) or 2 (the two-limb inputs
            that ``qeq-export --int8`` ships by default; :func:`qeq_ase.quant.qat.set_activation_limbs`).
        step_margin: calibrated activation steps are multiplied by this (>= 1) before
            training (:func:`qeq_ase.quant.qat.widen_activation_steps`).
        learn_steps: train the activation steps (LSQ) or keep the calibrated ones.
    """

    scheme: str = "full"
    scalar_start_epoch: int = 0
    vector_start_epoch: int = 2
    calibration_batches: int = 4
    weight_bits: int = 8
    activation_bits: int = 8
    activation_limbs: int = 1
    step_margin: float = 1.0
    learn_steps: bool = True

    @classmethod
    def from_dict(cls, data: dict) -> "QuantizationConfig":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown quantization option(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**data)


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # short memory at the start
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)


def learning_rate(cfg: TrainConfig, progress: float, epoch_float: float) -> float:
    """Linear warm-up over ``warmup_epochs``, then cosine from ``lr`` to ``min_lr`` at progress 1."""
    if epoch_float < cfg.warmup_epochs:
        return cfg.lr * max(epoch_float / cfg.warmup_epochs, 0.01)
    p = min(max(progress, 0.0), 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * p))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices and embeddings only.

    Biases, LayerNorm gains, attention temperatures and quantizer steps are not decayed:
    pulling them towards zero is not a smoothness prior, it changes what they mean.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class Trainer:
    """Holds the state of one run; :meth:`run` trains until the budget is spent.

    ``resume`` continues the run in ``output_dir``; ``overwrite`` deletes its files first.
    Without either, a folder that holds a run is refused (``FileExistsError``).
    """

    def __init__(self, cfg: TrainConfig, resume: bool = False, overwrite: bool = False):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        replaced = _existing_run_files(self.out, resume, overwrite)
        self.device = torch.device(cfg.device)
        self.rng = np.random.default_rng(cfg.seed)  # batches; torch's global RNG is left alone

        frames = load_frames(cfg.train_file, energy_key=cfg.energy_key, forces_key=cfg.forces_key)
        train_idx, val_idx = train_val_split(len(frames), cfg.n_val, cfg.split_seed)
        if cfg.n_train is not None:
            if not 0 < cfg.n_train <= len(train_idx):
                raise ValueError(f"n_train={cfg.n_train} must lie in (0, {len(train_idx)}]")
            train_idx = np.sort(np.random.default_rng(cfg.split_seed).permutation(train_idx)[:cfg.n_train])
        self.train, self.val = frames.subset(train_idx), frames.subset(val_idx)
        self.data_info = {"file": os.path.basename(frames.source), "sha256": frames.sha256,
                          "n_train": len(self.train), "n_val": len(self.val), "split_seed": cfg.split_seed}

        self.quant = QuantizationConfig.from_dict(cfg.quantization) if cfg.quantization is not None else None
        if self.quant and not cfg.init_from:
            raise ValueError("quantization-aware training fine-tunes a float potential: set init_from")
        if cfg.init_from:
            self.model, _ = load_potential_file(cfg.init_from)
            if self.quant:
                self.model = self._to_qat(self.model)
        else:
            model_cfg = {"species": sorted(set(frames.numbers.tolist())), **cfg.model}
            with torch.random.fork_rng(devices=[]):  # seeded initial weights, the caller's RNG untouched
                torch.manual_seed(cfg.seed)
                self.model = build_potential(cfg.architecture, model_cfg)
            self._set_energy_statistics(self.train)
        self.model.to(self.device)
        self.ema = EMA(self.model, cfg.ema_decay)
        self.energy_and_forces = self._training_forward()
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, cfg.weight_decay), lr=cfg.lr)
        self.epoch, self.step, self.elapsed_s, self.best = 0, 0, 0.0, math.inf
        if resume:
            self._load_checkpoint(self.out / "last.pt")
        for name in replaced:  # only now: a config or data error above leaves the old run intact
            (self.out / name).unlink()
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "config.yaml", "w") as f:
            yaml.safe_dump(asdict(cfg), f, sort_keys=False)

    def _training_forward(self):
        """``(positions, species, edge_index, batch, num_graphs) -> {interaction_energy, forces}``."""
        if not self.cfg.compile:
            return partial(self.model.energy_and_forces, training=True)
        if self.quant:
            raise ValueError("compile: true is for float training; quantization-aware training runs eager")
        from .compiled_forces import CompiledEnergyForces

        return CompiledEnergyForces(self.model)

    def _to_qat(self, float_model: Potential) -> Potential:
        """The QAT twin of ``float_model`` with its activation steps calibrated on float batches."""
        from ..quant.qat import calibration, convert_to_qat, quantizer_parameters, set_activation_limbs, widen_activation_steps

        q = self.quant
        model = convert_to_qat(float_model, q.scheme, scalar=False, vector=False,
                               weight_bits=q.weight_bits, activation_bits=q.activation_bits).to(self.device)
        set_activation_limbs(model, q.activation_limbs)
        rng = np.random.default_rng(self.cfg.seed)
        with calibration(model):
            for _ in range(q.calibration_batches):
                index = rng.choice(len(self.train), self.cfg.batch_size, replace=False)
                graph, species, _, _ = self._batch(self.train, index, model)
                model.energy_and_forces(graph.positions, species, graph.edge_index, graph.batch, graph.num_graphs)
        widen_activation_steps(model, q.step_margin)
        for step in quantizer_parameters(model):
            step.requires_grad_(q.learn_steps)
        return model

    def _apply_quantization_schedule(self) -> None:
        """Branch-separated schedule: switch each branch on from its start epoch (model and EMA copy)."""
        if not self.quant:
            return
        from ..quant.qat import set_quantization

        for model in (self.model, self.ema.model):
            set_quantization(model, scalar=self.epoch >= self.quant.scalar_start_epoch,
                             vector=self.epoch >= self.quant.vector_start_epoch)

    def _fully_quantized(self) -> bool:
        """Whether the epoch just trained had every branch on (always true without QAT):
        a partly quantized epoch must not be picked as the best QAT model."""
        return not self.quant or self.epoch > max(self.quant.scalar_start_epoch, self.quant.vector_start_epoch)

    def _set_energy_statistics(self, frames: Frames) -> None:
        ref = fit_reference_energies([frames.numbers] * len(frames), frames.energy, self.model.config.species)
        self.model.reference_energy.copy_(torch.as_tensor(ref, dtype=torch.float64))
        self.model.energy_scale.fill_(float(np.sqrt((frames.forces ** 2).mean())))

    # --- checkpoints -------------------------------------------------------------------
    def _state(self) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "epoch": self.epoch, "step": self.step,
                "elapsed_s": self.elapsed_s, "best": self.best, "config": asdict(self.cfg),
                "model_config": self.model.config.to_dict(),
                "numpy_rng": self.rng.bit_generator.state}

    def _save_checkpoint(self) -> None:
        tmp = self.out / "last.pt.tmp"
        torch.save(self._state(), tmp)
        os.replace(tmp, self.out / "last.pt")

    def _load_checkpoint(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}; start a new run (--overwrite if the "
                                    "folder holds other files of a run)")
        state = torch.load(path, map_location=self.device, weights_only=True)
        if type(self.model.config).from_dict(state["model_config"]) != self.model.config:
            raise ValueError(f"{path} was written for model {state['model_config']}, not {self.model.config}")
        self.model.load_state_dict(state["model"])
        self.ema.model.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step, self.elapsed_s, self.best = state["epoch"], state["step"], state["elapsed_s"], state["best"]
        self.rng.bit_generator.state = state["numpy_rng"]
        print(f"resumed from {path}: epoch {self.epoch}, {self.elapsed_s / 60:.1f} min trained", file=sys.stderr)

    # --- training ----------------------------------------------------------------------
    def progress(self, epoch_float: float | None = None) -> float:
        """Fraction of the budget spent: epochs or wall-clock minutes, whichever is further."""
        p = (self.epoch if epoch_float is None else epoch_float) / self.cfg.max_epochs
        if self.cfg.time_budget_min:
            p = max(p, self.elapsed_s / (60.0 * self.cfg.time_budget_min))
        return p

    def _batch(self, frames: Frames, index: np.ndarray, model: Potential | None = None):
        model = model or self.model
        graph = molecules_to_graph([frames.numbers] * len(index), list(frames.positions[index]),
                                   model.config.cutoff, torch.float32, self.device, centre=True)
        species = model.species_index(graph.numbers)
        ref = model.reference_energy[species]
        target_e = torch.as_tensor(frames.energy[index], device=self.device)
        target_e = (target_e - torch.zeros_like(target_e).index_add_(0, graph.batch, ref)).float()
        target_f = torch.as_tensor(frames.forces[index].reshape(-1, 3), dtype=torch.float32, device=self.device)
        return graph, species, target_e, target_f

    def train_epoch(self) -> float:
        cfg, model = self.cfg, self.model
        self._apply_quantization_schedule()
        model.train()
        order = self.rng.permutation(len(self.train))
        batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        total, t0 = 0.0, time.perf_counter()
        bar = tqdm(batches, desc=f"epoch {self.epoch + 1}", leave=False, mininterval=2, file=sys.stderr,
                   disable=not sys.stderr.isatty())
        for k, index in enumerate(bar):
            epoch_float = self.epoch + k / len(batches)
            lr = learning_rate(cfg, self.progress(epoch_float), epoch_float)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            graph, species, target_e, target_f = self._batch(self.train, index)
            out = self.energy_and_forces(graph.positions, species, graph.edge_index, graph.batch, graph.num_graphs)
            loss = (cfg.energy_weight * (out["interaction_energy"] - target_e).pow(2).mean()
                    + cfg.force_weight * (out["forces"] - target_f).pow(2).mean())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.ema.update(model, self.step)
            self.step += 1
            total += loss.item()
            bar.set_postfix(loss=f"{loss.item():.3g}", lr=f"{lr:.2g}")
        self.elapsed_s += time.perf_counter() - t0
        self.epoch += 1
        return total / len(batches)

    def run(self) -> None:
        log_path = self.out / "log.csv"
        new_log = not log_path.exists()
        with open(log_path, "a", newline="") as f:
            log = csv.writer(f)
            if new_log:
                log.writerow(["epoch", "elapsed_min", "lr", "train_loss", "val_energy_mae_meV",
                              "val_forces_mae_meV_per_A"])
            errors = None
            while self.progress() < 1.0:
                train_loss = self.train_epoch()
                errors = evaluate(self.ema.model, self.val)
                e_mae, f_mae = errors["energy_mae_meV"], errors["forces_mae_meV_per_A"]
                lr = self.optimizer.param_groups[0]["lr"]
                log.writerow([self.epoch, f"{self.elapsed_s / 60:.2f}", f"{lr:.3e}", f"{train_loss:.5g}",
                              f"{e_mae:.3f}", f"{f_mae:.3f}"])
                f.flush()
                score = f_mae + e_mae  # meV/Å + meV: both errors matter for MD
                if score < self.best and self._fully_quantized():
                    self.best = score
                    self._save_potential("best.pt", errors)
                self._save_checkpoint()
                print(f"epoch {self.epoch:4d}  {self.elapsed_s / 60:6.1f} min  lr {lr:.2e}  loss {train_loss:.4g}  "
                      f"val E {e_mae:.2f} meV  F {f_mae:.2f} meV/Å", file=sys.stderr, flush=True)

            if errors is not None:
                self._save_potential("final.pt", errors)

    def _save_potential(self, name: str, val_errors: dict) -> None:
        metadata = {
            "training_data": self.data_info, "validation_errors": val_errors,
            "epochs": self.epoch, "training_minutes": round(self.elapsed_s / 60, 1),
            "training_config": asdict(self.cfg), "num_parameters": self.model.num_parameters(),
        }
        if self.quant:
            from ..quant.qat import quantization_state

            metadata["quantization"] = {**asdict(self.quant), "state": quantization_state(self.ema.model)}
        save_potential(self.out / name, self.ema.model, metadata, precision="qat" if self.quant else "fp32")


def _existing_run_files(out: Path, resume: bool, overwrite: bool) -> list[str]:
    """The :data:`RUN_FILES` in ``out`` that ``overwrite`` will delete; a folder holding a run
    is refused unless resuming or overwriting."""
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output_dir {out} is a file, not a folder")
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if resume or not existing:
        return []
    if not overwrite:
        raise FileExistsError(f"{out} already holds a training run ({', '.join(existing)}); pass --resume to "
                              "continue it or --overwrite to replace it")
    return existing


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="qeq-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML file with TrainConfig options")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last.pt")
    again.add_argument("--overwrite", action="store_true",
                       help="delete the run already in OUTPUT_DIR and start again")
    parser.add_argument("--device", type=torch_device, default=None, help="override the config's device (cpu, cuda)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads for this run")
    parser.add_argument("--output-dir", default=None, help="override the config's output_dir")
    args = parser.parse_args(argv)
    with user_errors("qeq-train"):
        cfg = TrainConfig.from_yaml(args.config)
        if args.device:
            cfg.device = args.device
        if args.output_dir:
            cfg.output_dir = args.output_dir
        if args.threads:
            torch.set_num_threads(args.threads)  # a command's own process: not a library side effect
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
    trainer.run()


if __name__ == "__main__":
    main()
