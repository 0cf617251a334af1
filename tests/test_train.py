"""The trainer: a short float run, resume after an interruption, and a QAT fine-tune."""

import csv
from pathlib import Path

import pytest
import torch
import yaml

from qeq_ase.io.checkpoint import read_potential_file
from qeq_ase.model.network import ModelConfig, QEqModel
from qeq_ase.train.trainer import EMA, TrainConfig, Trainer, learning_rate, parameter_groups

ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL = {"num_features": 16, "num_layers": 1, "num_heads": 2, "num_radial": 8}


def tiny_config(tmp_path, rmd17_dir, **overrides) -> TrainConfig:
    options = {"train_file": str(rmd17_dir / "rmd17_ethanol_train_01.npz"), "output_dir": str(tmp_path / "run"),
               "n_val": 20, "n_train": 192, "model": TINY_MODEL, "batch_size": 32, "lr": 5e-3, "warmup_epochs": 0.5,
               "max_epochs": 2}
    options.update(overrides)
    return TrainConfig(**options)


def log_rows(cfg):
    with open(f"{cfg.output_dir}/log.csv") as f:
        return list(csv.DictReader(f))


def test_learning_rate_warms_up_then_anneals_to_min_lr():
    cfg = TrainConfig(train_file="x", lr=1e-3, min_lr=1e-6, warmup_epochs=1)
    assert learning_rate(cfg, 0.0, 0.5) == pytest.approx(5e-4)
    assert learning_rate(cfg, 0.0, 1.0) == pytest.approx(1e-3)
    assert learning_rate(cfg, 0.5, 10) == pytest.approx((1e-3 + 1e-6) / 2)
    assert learning_rate(cfg, 1.0, 10) == pytest.approx(1e-6)


def test_ema_follows_the_model():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=100)
    torch.testing.assert_close(ema.model.weight, model.weight - 0.5)


def test_weight_decay_shrinks_matrices_and_embeddings_only():
    model = QEqModel(ModelConfig(species=[1, 6, 8], **TINY_MODEL))
    decay, rest = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in rest["params"])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([decay, rest], lr=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's own step is then 0: only the decay moves a weight
    optimizer.step()
    after = dict(model.named_parameters())
    torch.testing.assert_close(after["embedding.weight"], before["embedding.weight"] * 0.95)
    torch.testing.assert_close(after["layers.0.norm.weight"], before["layers.0.norm.weight"], rtol=0, atol=0)
    torch.testing.assert_close(after["layers.0.log_inv_temperature"], before["layers.0.log_inv_temperature"],
                               rtol=0, atol=0)


def test_training_reduces_error_and_resumes(tmp_path, rmd17_dir):
    cfg = tiny_config(tmp_path, rmd17_dir, max_epochs=2)
    Trainer(cfg).run()
    rows = log_rows(cfg)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    # resume: a larger budget continues from epoch 2, appending to the same log
    cfg.max_epochs = 3
    trainer = Trainer(cfg, resume=True)
    assert trainer.epoch == 2
    trainer.run()
    rows = log_rows(cfg)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["val_forces_mae_meV_per_A"]) < float(rows[0]["val_forces_mae_meV_per_A"])
    payload = read_potential_file(f"{cfg.output_dir}/best.pt")
    assert payload["precision"] == "fp32"
    assert payload["metadata"]["training_data"]["file"] == "rmd17_ethanol_train_01.npz"
    assert yaml.safe_load(open(f"{cfg.output_dir}/config.yaml"))["max_epochs"] == 3
    final = read_potential_file(f"{cfg.output_dir}/final.pt")  # the EMA weights of the last epoch
    assert final["metadata"]["epochs"] == 3
    assert final["metadata"]["validation_errors"]["forces_mae_meV_per_A"] == pytest.approx(
        float(rows[-1]["val_forces_mae_meV_per_A"]), abs=1e-3)
    for name, value in trainer.ema.model.state_dict().items():
        torch.testing.assert_close(final["state_dict"][name], value, rtol=0, atol=0)


def test_qat_fine_tune_switches_branches_on_separately(tmp_path, rmd17_dir):
    float_cfg = tiny_config(tmp_path, rmd17_dir, output_dir=str(tmp_path / "float"), max_epochs=1)
    Trainer(float_cfg).run()
    qat_cfg = tiny_config(tmp_path, rmd17_dir, output_dir=str(tmp_path / "qat"), max_epochs=3, lr=1e-3,
                          init_from=str(tmp_path / "float" / "best.pt"),
                          quantization={"scheme": "full", "scalar_start_epoch": 0, "vector_start_epoch": 1,
                                        "calibration_batches": 1})
    trainer = Trainer(qat_cfg)
    from qeq_ase.quant.qat import quantization_state, quantizer_parameters

    steps = {name: p.item() for name, p in trainer.model.named_parameters() if name.endswith(".step")}
    assert len(steps) == len(quantizer_parameters(trainer.model)) > 0
    # calibrated from float batches; layer 0's vector input is identically zero (v starts at 0)
    uncalibrated = sorted(name for name, step in steps.items() if step <= 0)
    assert all(name.startswith("layers.0.vector_in") for name in uncalibrated), uncalibrated
    trainer.train_epoch()
    assert quantization_state(trainer.model) == {"scalar": True, "vector": False}
    assert not trainer._fully_quantized()
    trainer.train_epoch()
    assert quantization_state(trainer.model) == {"scalar": True, "vector": True}
    assert quantization_state(trainer.ema.model) == {"scalar": True, "vector": True}
    trainer.run()
    payload = read_potential_file(f"{qat_cfg.output_dir}/best.pt")
    assert payload["precision"] == "qat"
    assert payload["metadata"]["quantization"]["state"] == {"scalar": True, "vector": True}
    assert payload["metadata"]["epochs"] >= 2  # an epoch with both branches on

    # qeq-export --int8: the real int8 model, evaluated and written with the QAT metadata
    from qeq_ase.train.export import export_potential
    from qeq_ase.quant.int8_model import int8_kernel_report
    from qeq_ase.io.registry import load_model

    out = tmp_path / "tiny_int8.pt"
    metadata = export_potential(f"{qat_cfg.output_dir}/best.pt", str(rmd17_dir / "rmd17_ethanol_test_01.npz"),
                                str(out), int8=True)
    exported = read_potential_file(out)
    assert exported["precision"] == "int8" and exported["metadata"]["quantization"]["scheme"] == "full"
    assert metadata["test_errors"]["n_frames"] == 1000 and metadata["quantization"]["vector_start_epoch"] == 1
    assert int8_kernel_report(load_model(out)[0])["int8_gemm_layers"] > 0
    with pytest.raises(ValueError, match="--int8 needs a quantization-aware"):
        export_potential(f"{tmp_path}/float/best.pt", str(rmd17_dir / "rmd17_ethanol_test_01.npz"),
                         str(tmp_path / "x.pt"), int8=True)


def test_qat_can_keep_the_calibrated_steps_with_a_margin(tmp_path, rmd17_dir):
    from qeq_ase.quant.qat import quantizer_parameters

    float_cfg = tiny_config(tmp_path, rmd17_dir, output_dir=str(tmp_path / "float"), max_epochs=1)
    Trainer(float_cfg).run()
    steps = {}
    for margin, learn in ((1.0, True), (2.0, False)):
        cfg = tiny_config(tmp_path, rmd17_dir, output_dir=str(tmp_path / f"qat{margin}"), max_epochs=1, lr=1e-3,
                          init_from=str(tmp_path / "float" / "best.pt"),
                          quantization={"scheme": "full", "vector_start_epoch": 0, "calibration_batches": 2,
                                        "step_margin": margin, "learn_steps": learn})
        trainer = Trainer(cfg)
        steps[margin] = [p.detach().clone() for p in quantizer_parameters(trainer.model)]
        trainer.train_epoch()
        after = [p.detach() for p in quantizer_parameters(trainer.model)]
        changed = sum(not torch.equal(a, b) for a, b in zip(after, steps[margin]))
        assert (changed > 0) if learn else (changed == 0), changed
    assert all(torch.equal(2.0 * a, b) for a, b in zip(steps[1.0], steps[2.0]))


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")))
def test_committed_configs_load(path):
    from qeq_ase.train.trainer import QuantizationConfig

    cfg = TrainConfig.from_yaml(ROOT / path)
    if cfg.quantization is not None:
        QuantizationConfig.from_dict(cfg.quantization)
        assert cfg.init_from, path
    assert cfg.train_file.startswith("../shared/rmd17/") and not cfg.output_dir.startswith("/"), path


def test_qat_requires_a_float_starting_point(tmp_path, rmd17_dir):
    with pytest.raises(ValueError, match="init_from"):
        Trainer(tiny_config(tmp_path, rmd17_dir, quantization={"scheme": "full"}))
    with pytest.raises(ValueError, match="unknown quantization option"):
        Trainer(tiny_config(tmp_path, rmd17_dir, init_from="x.pt", quantization={"sheme": "full"}))


def test_compile_option_is_a_boolean_and_float_only(tmp_path, rmd17_dir):
    with pytest.raises(ValueError, match="compile must be true or false"):
        tiny_config(tmp_path, rmd17_dir, compile="yes")
    potential = Trainer(tiny_config(tmp_path / "a", rmd17_dir))
    potential._save_potential("best.pt", {})
    with pytest.raises(ValueError, match="quantization-aware training runs eager"):
        Trainer(tiny_config(tmp_path / "b", rmd17_dir, compile=True, init_from=str(tmp_path / "a/run/best.pt"),
                            quantization={"scheme": "full"}))


@pytest.mark.slow
def test_compiled_training_matches_eager_training(tmp_path, rmd17_dir):
    """One epoch of each from the same seed: the same weights to float32 rounding."""
    weights = []
    for compile in (False, True):
        trainer = Trainer(tiny_config(tmp_path / str(compile), rmd17_dir, compile=compile, max_epochs=1))
        trainer.run()
        weights.append(trainer.model.state_dict())
    for name, eager in weights[0].items():
        torch.testing.assert_close(weights[1][name], eager, rtol=1e-3, atol=1e-5, msg=name)


def test_trainer_leaves_the_global_torch_rng_alone(tmp_path, rmd17_dir):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = Trainer(tiny_config(tmp_path / "a", rmd17_dir)).model.state_dict()
    assert torch.equal(torch.rand(3), expected)
    second = Trainer(tiny_config(tmp_path / "b", rmd17_dir)).model.state_dict()  # the seed sets the weights
    assert all(torch.equal(first[name], second[name]) for name in first)
