"""Which potential an MD run used: recorded in its trajectory file, checked when it is resumed.

A trajectory records the model as the user named it (``model``), a SHA-256 of its weights
(``model_weights_sha256``: the state dict, so the same weights match whatever path or name
they were loaded by), the float ``dtype`` and, for INT8 potentials, ``activation_limbs``
(0 for other models). A resumed run must use the same four, or it continues another
potential energy surface from the old positions and velocities.
"""

from __future__ import annotations

import hashlib

import torch

from .trajectory import TrajectoryError

#: Trajectory attributes that name the model of a run.
IDENTITY_KEYS = ("model", "model_weights_sha256", "dtype", "activation_limbs")

#: ``model`` label of a run whose model was a Python object rather than a name or a path.
OBJECT_LABELS = ("<model>",)


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict: names, shapes and values, in order. Floating tensors
    are hashed as float64, so one file loaded in float32 or float64 has one hash."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        tensor = (tensor.double() if tensor.is_floating_point() else tensor).contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def activation_limbs_of(model: torch.nn.Module | None) -> int:
    """The activation limbs of an INT8 model (1 or 2); 0 for any other model."""
    from ..quant.int8_model import is_int8_model

    if model is None or not is_int8_model(model):
        return 0
    return int((getattr(model, "quantization", None) or {}).get("activation_limbs", 1))


def calculator_identity(calc) -> dict:
    """The :data:`IDENTITY_KEYS` of a calculator, as HDF5-storable strings and ints.

    For a calculator that is not a :class:`~qeq_ase.calculator.QEqCalculator` the model is
    its class name and the weights hash and dtype are empty.
    """
    model = getattr(calc, "model", None)
    is_torch = isinstance(model, torch.nn.Module)
    return {
        "model": str(getattr(calc, "model_label", type(calc).__name__)),
        "model_weights_sha256": weights_sha256(model) if is_torch else "",
        "dtype": str(getattr(calc, "dtype", "")).removeprefix("torch."),
        "activation_limbs": activation_limbs_of(model) if is_torch else 0,
    }


def describe(identity: dict) -> str:
    """``'ethanol_fp32' (float32, weights sha256 1a2b3c4d...)``, plus the limbs of INT8 models."""
    parts = [identity.get("dtype") or "?"]
    if identity.get("activation_limbs"):
        parts.append(f"activation_limbs {identity['activation_limbs']}")
    if identity.get("model_weights_sha256"):
        parts.append(f"weights sha256 {identity['model_weights_sha256'][:12]}")
    return f"{identity.get('model')!r} ({', '.join(parts)})"


def check_same_model(trajectory, recorded: dict, now: dict) -> None:
    """Raise :class:`TrajectoryError` naming both models unless ``now`` is the model of ``recorded``.

    Files written before the weights hash was recorded are compared by model label and dtype.
    """
    keys = [k for k in IDENTITY_KEYS if k in recorded]
    if recorded.get("model_weights_sha256") and now.get("model_weights_sha256"):
        keys.remove("model")  # the same weights under another name or path are the same model
    differ = [k for k in keys if recorded.get(k) != now.get(k)]
    if differ:
        raise TrajectoryError(
            f"cannot resume {trajectory}: it was run with model {describe(recorded)}, not {describe(now)} "
            f"(differs in {', '.join(differ)}); resume with the run's model or start a new trajectory")
