"""Saving and loading potentials: one versioned, ``weights_only``-safe file format.

A potential file is a ``torch.save`` of a plain dict (tensors, numbers, strings, lists)::

    {"format": "qeq-ase-potential", "format_version": 2,
     "architecture": "qeq-transformer",      # qeq_ase.model.potential.ARCHITECTURES (none: this one)
     "precision": "fp32",                     # or "qat" (fake-quantized), "int8" (real int8)
     "model_config": {...},                   # ModelConfig.to_dict()
     "tensors": {"names": [...], "shapes": [...], "dtypes": [...],
                 "data": {"int8": <1-D tensor>, "float32": <1-D tensor>, ...}},
     "metadata": {"units": {...}, "species": [...], "cutoff": 5.0,
                  "training_data": {...}, "test_errors": {...}, ...}}

``tensors`` is the state dict (EMA weights for trained models) packed into one flat
tensor per dtype (:func:`pack_state_dict`): ``torch.save`` spends ~200 bytes of zip
records and pickle per tensor, which for an int8 file of ~80 small tensors would be
~2% of its size. Version 1 files (``"state_dict"``: the plain state dict) still load.

By precision:

* ``"fp32"``: the float state dict of :class:`~qeq_ase.model.network.QEqModel`.
* ``"qat"``: the state dict of the QAT model (:mod:`qeq_ase.quant.qat`, float weights plus
  activation steps); ``metadata["quantization"]`` has ``scheme``, ``weight_bits``,
  ``activation_bits`` and optionally ``state`` (which branches are on).
* ``"int8"``: :func:`qeq_ase.quant.int8_model.int8_state_dict` (int8 weight codes, float32
  per-channel scales and activation steps, no float copy of the quantized weights);
  ``metadata["quantization"]`` is :func:`qeq_ase.quant.int8_model.quantization_metadata`, whose
  ``scheme`` and ``activation_bits`` the loader needs. INT8 models compute in float32.

It loads with ``torch.load(weights_only=True)``: no pickled classes, no code execution.
Bump ``FORMAT_VERSION`` when the layout of this dict or the meaning of a key changes,
and teach :func:`load_potential_file` to read the old layout.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ..model.network import QEqModel
from ..model.potential import Potential, architecture_classes, build_potential

FORMAT_NAME = "qeq-ase-potential"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
UNITS = {"energy": "eV", "forces": "eV/Angstrom", "length": "Angstrom"}


#: Precisions a potential file can hold (see the module docstring).
PRECISIONS = ("fp32", "qat", "int8")


class PotentialFileError(ValueError):
    """A potential file is missing, corrupt or incompatible with this version of qeq-ase."""


def _int8_quantization(model: Potential, given: dict | None) -> dict:
    """The model's own description, plus the caller's extra keys; conflicting keys raise."""
    if not isinstance(getattr(model, "quantization", None), dict):
        raise ValueError("the int8 model has no 'quantization' description: build it with "
                         "int8_model.convert_to_int8 or int8_model.build_int8_model")
    own = dict(model.quantization)
    conflicts = sorted(k for k in own if given and k in given and given[k] != own[k])
    if conflicts:
        raise ValueError(f"metadata['quantization'] contradicts the int8 model on {conflicts}: "
                         f"{ {k: given[k] for k in conflicts} } vs { {k: own[k] for k in conflicts} }")
    return {**(given or {}), **own}


def pack_state_dict(state_dict: dict[str, torch.Tensor]) -> dict:
    """The state dict as one flat tensor per dtype plus the names, shapes and dtypes to cut it."""
    names, shapes, dtypes, chunks = [], [], [], {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        names.append(name)
        shapes.append(list(tensor.shape))
        dtypes.append(dtype)
        chunks.setdefault(dtype, []).append(tensor.reshape(-1))
    return {"names": names, "shapes": shapes, "dtypes": dtypes,
            "data": {dtype: torch.cat(parts) for dtype, parts in chunks.items()}}


def unpack_state_dict(packed: dict) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_state_dict`; raises ``ValueError`` if the pieces do not add up."""
    data, offsets, out = packed["data"], {}, {}
    for name, shape, dtype in zip(packed["names"], packed["shapes"], packed["dtypes"], strict=True):
        start, count = offsets.get(dtype, 0), math.prod(shape)
        if dtype not in data or start + count > data[dtype].numel():
            raise ValueError(f"tensor {name!r} ({dtype} {shape}) runs past the stored {dtype} data")
        out[name] = data[dtype][start:start + count].reshape(shape).clone()
        offsets[dtype] = start + count
    leftover = {dtype: blob.numel() - offsets.get(dtype, 0) for dtype, blob in data.items()}
    if any(leftover.values()):
        raise ValueError(f"stored data not used by any tensor: {leftover}")
    return out


def save_potential(path: str | os.PathLike, model: Potential, metadata: dict, precision: str = "fp32",
                   state_dict: dict | None = None) -> Path:
    """Write ``model`` (or an explicit ``state_dict``) with its metadata; atomic on POSIX.

    ``precision="int8"`` takes a model from :func:`qeq_ase.quant.int8_model.convert_to_int8`
    (or ``build_int8_model``) and records its ``quantization`` description in the metadata.
    """
    from ..quant.int8_model import check_int8_state_dict, int8_state_dict, is_int8_model

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if (precision == "int8") != is_int8_model(model):
        kind = "an int8" if is_int8_model(model) else "a float or QAT"
        raise ValueError(f"cannot save {kind} model with precision={precision!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"units": dict(UNITS), "species": list(model.config.species), "cutoff": model.config.cutoff}
    meta.update(metadata)
    if precision == "int8":
        meta["quantization"] = _int8_quantization(model, metadata.get("quantization"))
        state_dict = int8_state_dict(model) if state_dict is None else check_int8_state_dict(model, state_dict)
    try:  # plain JSON types only: str subclasses such as torch.__version__ would not load with weights_only
        meta = json.loads(json.dumps(meta))
    except TypeError as err:
        raise ValueError(f"potential metadata must hold JSON types only ({err})") from err
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "architecture": type(model).architecture,
        "precision": precision,
        "model_config": model.config.to_dict(),
        "tensors": pack_state_dict(state_dict if state_dict is not None else model.state_dict()),
        "metadata": meta,
    }
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_potential_file(path: str | os.PathLike) -> dict:
    """Load and validate the raw dict of a potential file (no model is built).

    The returned dict has the unpacked ``"state_dict"`` whatever the file's version.
    """
    path = Path(path)
    if not path.is_file():
        raise PotentialFileError(f"potential file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated/garbage files
        detail = " ".join(str(err).split())
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        raise PotentialFileError(f"{path} is corrupt or not a qeq-ase potential ({type(err).__name__}: {detail})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise PotentialFileError(f"{path} is not a qeq-ase potential file (no '{FORMAT_NAME}' header)")
    version = payload.get("format_version")
    if version not in READABLE_VERSIONS:
        raise PotentialFileError(
            f"{path} has format version {version}; this qeq-ase reads versions {READABLE_VERSIONS}: "
            "upgrade qeq-ase or re-export the potential"
        )
    weights_key = "state_dict" if version == 1 else "tensors"
    for key in ("precision", "model_config", weights_key, "metadata"):
        if key not in payload:
            raise PotentialFileError(f"{path} is incomplete: missing '{key}'")
    if version > 1:
        try:
            payload["state_dict"] = unpack_state_dict(payload.pop("tensors"))
        except (KeyError, TypeError, ValueError) as err:
            raise PotentialFileError(f"{path} has corrupt weights ({type(err).__name__}: {err})") from err
    return payload


def load_potential_file(path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> tuple[Potential, dict]:
    """Build the model stored in a potential file; returns ``(model, metadata)``.

    Dispatches on the file's precision: ``"fp32"`` (float model, ``dtype`` float32 or
    float64), ``"qat"`` (fake-quantized QAT model) and ``"int8"`` (real int8 layers; float32
    only: ``dtype=torch.float64`` raises ``ValueError``).
    """
    payload = read_potential_file(path)
    precision, metadata = payload["precision"], payload["metadata"]
    if precision not in PRECISIONS:
        raise PotentialFileError(f"{path} holds a {precision!r} potential; this qeq-ase reads {PRECISIONS}")
    if precision == "int8" and dtype != torch.float32:
        raise ValueError(f"{path} is an int8 potential, which computes in float32; dtype={dtype} is not possible")
    quant = metadata.get("quantization")
    if precision != "fp32" and not (isinstance(quant, dict) and "scheme" in quant):
        raise PotentialFileError(f"{path} is a {precision} potential without metadata['quantization']['scheme']")
    architecture = payload.get("architecture", QEqModel.architecture)
    try:
        config_class, _ = architecture_classes(architecture)
    except ValueError as err:
        raise PotentialFileError(f"{path} holds a {architecture!r} model; {err}") from err
    try:
        config = config_class.from_dict(payload["model_config"])
        if precision == "int8":
            from ..quant.int8_model import build_int8_model, set_activation_limbs

            model = build_int8_model(config, payload["state_dict"], quant["scheme"], quant.get("activation_bits", 8),
                                     architecture=architecture)
            set_activation_limbs(model, quant.get("activation_limbs", 1))
        else:
            model = (build_potential(architecture, config) if precision == "fp32"
                     else _build_qat(config, quant, architecture))
            model.load_state_dict(payload["state_dict"])
    except (RuntimeError, ValueError, TypeError, KeyError) as err:
        raise PotentialFileError(f"{path} does not match this qeq-ase {precision} model ({err})") from err
    model = model.to(device=device, dtype=dtype)  # reference energies stay float64 (QEqModel._apply)
    model.eval()
    return model, metadata


def _build_qat(config, quant: dict, architecture: str) -> Potential:
    from ..quant.qat import build_qat_model, set_activation_limbs, set_quantization

    model = build_qat_model(config, quant["scheme"], quant.get("weight_bits", 8), quant.get("activation_bits", 8),
                            architecture)
    set_activation_limbs(model, quant.get("activation_limbs", 1))
    state = quant.get("state") or {}
    set_quantization(model, **{b: state[b] for b in ("scalar", "vector") if isinstance(state.get(b), bool)})
    return model
