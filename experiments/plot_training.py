"""Plot the validation curves of training runs from their ``log.csv`` files.

    python experiments/plot_training.py runs/aspirin_fp32/log.csv runs/aspirin_int8/log.csv \
        -o docs/figures/aspirin_training.png

One panel for the force MAE and one for the energy MAE (validation, EMA weights, log scale)
against the training minutes recorded in each log. Needs matplotlib (``pip install .[plot]``).
"""

import argparse
import csv
from pathlib import Path


def read_log(path: Path) -> dict[str, list[float]]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{path}: no epochs logged")
    return {key: [float(row[key]) for row in rows] for key in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", type=Path, help="log.csv files written by qeq-train")
    parser.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_f, ax_e) = plt.subplots(1, 2, figsize=(10, 4))
    for path in args.logs:
        log = read_log(path)
        label = path.parent.name
        ax_f.plot(log["elapsed_min"], log["val_forces_mae_meV_per_A"], label=label)
        ax_e.plot(log["elapsed_min"], log["val_energy_mae_meV"], label=label)
    for ax, what in ((ax_f, "force MAE (meV/Å)"), (ax_e, "energy MAE (meV)")):
        ax.set_xlabel("training time (min)")
        ax.set_ylabel(f"validation {what}")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
