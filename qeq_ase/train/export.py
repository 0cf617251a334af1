"""Package a trained model as a shipped potential: ``qeq-export RUN/best.pt TEST.npz -o potentials/NAME.pt``.

``--int8`` takes a QAT checkpoint and writes the real int8 model
(:func:`qeq_ase.quant.int8_model.convert_to_int8`): int8 weight codes with scales, integer kernels.
``--activation-limbs`` (default 2) is the input encoding the file asks for at load time
(:func:`qeq_ase.quant.int8_model.set_activation_limbs`): 2 gives an energy smooth enough for MD,
1 is the paper's W8A8.

Evaluates the model on every frame of the test file and writes the errors into the
potential's metadata, next to the training data, epochs and architecture it already
carries, so the numbers in ``docs/`` can always be traced to the file and this command.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone

import torch

from ..cli.args import ArgumentParser, user_errors
from ..data.dataset import file_sha256, load_frames
from ..io.checkpoint import load_potential_file, read_potential_file, save_potential
from .evaluate import error_metrics, predict_frames

#: Errors on the first frames of the test file are recorded too, so that a test can
#: reproduce them quickly from the shipped file.
SUBSET_FRAMES = 100


def export_potential(checkpoint: str, test_file: str, output: str, name: str | None = None,
                     int8: bool = False, activation_limbs: int = 2, energy_key: str = "energy",
                     forces_key: str = "forces") -> dict:
    """Evaluate ``checkpoint`` on ``test_file`` and write it with full metadata to ``output``.

    ``int8=True``: ``checkpoint`` must be a QAT file; the int8 model with ``activation_limbs``
    is what gets evaluated and written. ``test_file`` is an rMD17 ``.npz`` or an extended XYZ
    file (whose energy and forces keys are ``energy_key`` and ``forces_key``).
    """
    precision = read_potential_file(checkpoint)["precision"]
    model, metadata = load_potential_file(checkpoint)
    if int8:
        if precision != "qat":
            raise ValueError(f"--int8 needs a quantization-aware (precision 'qat') checkpoint; "
                             f"{checkpoint} is {precision!r}: fine-tune it with a 'quantization:' training config")
        from ..quant.int8_model import convert_to_int8, set_activation_limbs

        model, precision = set_activation_limbs(convert_to_int8(model), activation_limbs), "int8"
        quant = dict(metadata.get("quantization") or {})  # the QAT options: keep its limbs under their own name
        quant["qat_activation_limbs"] = quant.pop("activation_limbs", 1)
        metadata = {**metadata, "quantization": quant}
    test = load_frames(test_file, energy_key=energy_key, forces_key=forces_key)
    energy, forces = predict_frames(model, test)
    errors = error_metrics(test, energy, forces)
    errors.update({"file": os.path.basename(test.source), "sha256": test.sha256})
    if precision == "int8":  # the GEMMs round floats differently: tests reproduce with the same one
        from ..quant.int8_model import int8_gemm

        errors["int8_gemm"] = int8_gemm(model)
    first = test.subset(range(min(SUBSET_FRAMES, len(test))))
    errors["first_frames"] = error_metrics(first, energy[:len(first)], forces[:len(first)])
    metadata = dict(metadata)
    init = (metadata.get("training_config") or {}).get("init_from")
    if init and os.path.isfile(init):  # read before writing: a restart may overwrite the file it began from
        start = read_potential_file(init)["metadata"]
        metadata["initialised_from"] = {
            "name": start.get("name"), "sha256": file_sha256(init), "epochs": start.get("epochs"),
            "training_minutes": start.get("training_minutes"), "initialised_from": start.get("initialised_from"),
        }
    metadata.update({
        "name": name or os.path.splitext(os.path.basename(output))[0],
        "test_errors": errors,
        "num_parameters": model.num_parameters(),
        "exported": {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                     "torch": str(torch.__version__), "machine": platform.processor() or platform.machine()},
    })
    if precision == "fp32":
        metadata["quantization"] = {"scheme": "none", "weights": "float32"}
    save_potential(output, model, metadata, precision=precision)
    return metadata


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="qeq-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="potential file written by qeq-train (RUN/best.pt)")
    parser.add_argument("test_file", help="rMD17 test .npz or extended XYZ file; every frame is evaluated")
    parser.add_argument("-o", "--output", required=True, help="output potential file, e.g. potentials/aspirin_fp32.pt")
    parser.add_argument("--name", default=None, help="potential name recorded in the metadata")
    parser.add_argument("--int8", action="store_true",
                        help="convert a QAT checkpoint to the real int8 model (int8 weights, integer kernels)")
    parser.add_argument("--activation-limbs", type=int, choices=(1, 2), default=2,
                        help="--int8: int8 codes per activation, 2 (smooth energy, for MD) or 1 (W8A8)")
    parser.add_argument("--energy-key", default="energy", help="extended XYZ test file: energy key")
    parser.add_argument("--forces-key", default="forces", help="extended XYZ test file: forces key")
    args = parser.parse_args(argv)
    with user_errors("qeq-export"):
        metadata = export_potential(args.checkpoint, args.test_file, args.output, args.name, args.int8,
                                    args.activation_limbs, args.energy_key, args.forces_key)
    print(json.dumps({"output": args.output, "test_errors": metadata["test_errors"]}, indent=2))


if __name__ == "__main__":
    main()
