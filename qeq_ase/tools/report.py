"""``qeq-report``: regenerate ``docs/results.md`` and its plots from the shipped potentials.

For every rMD17 molecule with shipped ``<molecule>_fp32`` and ``<molecule>_int8`` files:

- energy and force MAE on all frames of the molecule's ``test_01`` file, as ``qeq-export``
  measured and recorded them in the file (``--recompute`` evaluates them again);
- the INT8/fp32 force-error ratio against the bar of 1.10;
- LEE, the mean |F(Rx) - R F(x)| over atoms, test frames and random rotations;
- NVE drift after a Langevin warm-up (:func:`qeq_ase.checks.conservation.check_energy_conservation`);
- file size, parameter count, and the time of one energy + forces call through the ASE
  calculator, fp32 and INT8 timed in the same run;
- the published float32 errors of MACE, Allegro and NequIP (:mod:`qeq_ase.tools.published_rmd17`).

Measurements are kept in ``results.json`` beside the report, keyed by each potential file's
SHA-256 and the measurement settings, so a rerun measures only potentials that changed.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from ..data.dataset import RMD17_MOLECULES, file_sha256, load_rmd17, rmd17_path
from ..io.checkpoint import read_potential_file
from ..io.registry import potentials_dir
from ..kernels.cpu_features import cpu_model_name
from ..kernels.edge_kernel import default_edge_backend, resolve_edge_backend
from ..quant.int8_kernels import resolve_gemm
from ..quant.int8_linear import auto_backward_is_int8
from .published_rmd17 import PUBLISHED_RMD17, SOURCE

INT8_FORCE_RATIO_BAR = 1.10
REPORT_VERSION = 1


def default_settings(nve_ps: float = 1.0, threads: int = 1) -> dict:
    """What a measurement depends on besides the potential file (part of the cache key)."""
    return {"report_version": REPORT_VERSION, "lee_frames": 5, "lee_rotations": 4, "nve_ps": nve_ps,
            "nve_timestep_fs": 0.5, "nve_warmup_fs": 200.0, "temperature_K": 300.0, "speed_calls": 40,
            "threads": threads, "torch": str(torch.__version__),
            "edge_kernel": resolve_edge_backend(default_edge_backend())}


def time_calculator(path: Path, atoms: Atoms, calls: int, seed: int = 0) -> float:
    """Median milliseconds of one energy + forces call through :class:`QEqCalculator`."""
    from ..calculator import QEqCalculator

    atoms = atoms.copy()
    atoms.calc = QEqCalculator(str(path))
    rng = np.random.default_rng(seed)
    start = atoms.positions.copy()
    times = []
    for k in range(calls + 5):
        atoms.positions = start + rng.normal(0.0, 0.01, start.shape)  # a new geometry: no cached result
        t0 = time.perf_counter()
        atoms.get_forces()
        if k >= 5:
            times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def first_test_frame(molecule: str, data_dir: Path) -> Atoms:
    """Frame 0 of the molecule's ``test_01`` file, the structure every potential is timed on."""
    test = load_rmd17(rmd17_path(molecule, "test", data_dir))
    return Atoms(numbers=test.numbers, positions=test.positions[0])


def measure_potential(path: Path, molecule: str, data_dir: Path, settings: dict, recompute: bool = False) -> dict:
    """Every figure of the report for one potential file."""
    from ..checks.conservation import check_energy_conservation
    from ..checks.equivariance import check_equivariance
    from ..train.evaluate import evaluate
    from ..io.registry import load_model

    payload = read_potential_file(path)
    meta = payload["metadata"]
    test = load_rmd17(rmd17_path(molecule, "test", data_dir))
    errors = meta["test_errors"]
    if recompute:
        errors = evaluate(load_model(path)[0], test)
    index = np.linspace(0, len(test) - 1, settings["lee_frames"]).astype(int)
    lee = check_equivariance(path, test.numbers, test.positions[index], n_rotations=settings["lee_rotations"])
    nve = check_energy_conservation(path, f"rmd17:{molecule}:0", time_ps=settings["nve_ps"],
                                    timestep_fs=settings["nve_timestep_fs"], warmup_fs=settings["nve_warmup_fs"],
                                    temperature_K=settings["temperature_K"], data_dir=data_dir, progress=False)
    return {
        "precision": payload["precision"],
        "energy_mae_meV": errors["energy_mae_meV"], "forces_mae_meV_per_A": errors["forces_mae_meV_per_A"],
        "test_frames": errors["n_frames"], "errors_recomputed": recompute,
        "lee_mean_meV_per_A": lee.lee_mean_meV_per_A,
        "nve_drift_meV_per_atom_per_ps": nve.drift_meV_per_atom_per_ps,
        "nve_total_energy_std_meV": nve.total_energy_std_meV,
        "ms_per_call": time_calculator(path, first_test_frame(molecule, data_dir), settings["speed_calls"]),
        "size_bytes": path.stat().st_size, "num_parameters": meta.get("num_parameters"),
        **training_totals(meta),
    }


def training_totals(meta: dict) -> dict:
    """Epochs and minutes of a file's training, with those of the files it was started from
    (a float restart) when they were float too; an INT8 file's own QAT only."""
    epochs, minutes = meta.get("epochs") or 0, meta.get("training_minutes") or 0.0
    start = meta.get("initialised_from")
    if not (meta.get("training_config") or {}).get("quantization"):
        while start:
            epochs, minutes = epochs + (start.get("epochs") or 0), minutes + (start.get("training_minutes") or 0.0)
            start = start.get("initialised_from")
    return {"epochs": epochs, "training_minutes": round(minutes, 1)}


def collect(data_dir: Path, results_json: Path, settings: dict, potentials: Path | None = None,
            recompute: bool = False, log=print, retime: bool = False) -> dict:
    """Measurements of every ``<molecule>_{fp32,int8}.pt`` in ``potentials`` (default: the
    shipped ones), reusing cached measurements of unchanged files. ``retime``: time the
    calculator of every file again (the one timing of the report; LEE, NVE and errors are
    kept), e.g. once the machine is idle after measuring beside a training run. A file
    measured anew has its partner (same molecule, other precision) timed again with it."""
    folder = Path(potentials) if potentials is not None else potentials_dir()
    cache = json.loads(results_json.read_text()) if results_json.is_file() else {}
    cached = cache.get("potentials", {})
    results = {}
    for molecule in RMD17_MOLECULES:
        measured, kept = [], []
        for precision in ("fp32", "int8"):
            name = f"{molecule}_{precision}"
            path = folder / f"{name}.pt"
            if not path.is_file():
                continue
            sha = file_sha256(path)
            old = cached.get(name, {})
            # an INT8 file's speed and MD figures also depend on the int8 GEMMs it runs, forward and backward
            gemm = resolve_gemm("auto")
            own = settings if precision == "fp32" else {
                **settings, "int8_gemm": gemm,
                "int8_backward": "every layer" if auto_backward_is_int8(gemm) else "edge filters"}
            if old.get("sha256") == sha and old.get("settings") == own and not recompute:
                results[name] = old
                kept.append((name, path))
                continue
            log(f"measuring {name} ...")
            measured.append(name)
            results[name] = {"sha256": sha, "settings": own, "molecule": molecule,
                             **measure_potential(path, molecule, data_dir, own, recompute)}
        # The speed-up column divides the pair's timings: when one file was measured anew, time
        # its cached partner again too, so both come from this run on this machine.
        for name, path in kept if retime or measured else ():
            log(f"timing {name} ...")
            speed_calls = results[name]["settings"]["speed_calls"]
            results[name] = {**results[name],
                             "ms_per_call": time_calculator(path, first_test_frame(molecule, data_dir), speed_calls)}
    return results


def _fmt(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def render_markdown(results: dict, settings: dict, figure_names: list[str]) -> str:
    """``docs/results.md`` from the measurements."""
    machine = cpu_model_name() or platform.machine()
    int8 = [r["settings"] for r in results.values() if r["precision"] == "int8"]
    gemms = sorted({r.get("int8_gemm", "int_mm") for r in int8})
    backwards = sorted({r.get("int8_backward", "edge filters") for r in int8})
    lines = [
        "# Results on rMD17 (generated)",
        "",
        f"Generated by `qeq-report` on {datetime.now(timezone.utc):%Y-%m-%d} ({machine}, torch "
        f"{settings['torch']}, {settings['threads']} thread(s)) from the files in `potentials/`; "
        "do not edit by hand. Regenerate with `qeq-report` (measurements of unchanged files are reused "
        "from `docs/results.json`).",
        "",
        "Errors are on all frames of each molecule's `rmd17_<molecule>_test_01.npz`, recorded by "
        "`qeq-export` in the potential's metadata. Every potential was trained only on the "
        "molecule's `train_01` file (950 training + 50 validation frames).",
        "",
        "## Accuracy: energy MAE (meV) / force MAE (meV/Å)",
        "",
        "| molecule | ours fp32 | ours INT8 | INT8/fp32 force | ≤ 1.10 | MACE | Allegro | NequIP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    missing = []
    for molecule in RMD17_MOLECULES:
        fp32, int8 = results.get(f"{molecule}_fp32"), results.get(f"{molecule}_int8")
        if not fp32 and not int8:
            missing.append(molecule)
            continue
        cells = [f"{_fmt(r['energy_mae_meV'])} / {_fmt(r['forces_mae_meV_per_A'])}" if r else "not shipped"
                 for r in (fp32, int8)]
        ratio = int8["forces_mae_meV_per_A"] / fp32["forces_mae_meV_per_A"] if fp32 and int8 else None
        ok = "–" if ratio is None else ("yes" if ratio <= INT8_FORCE_RATIO_BAR else "**no**")
        published = [f"{PUBLISHED_RMD17[m][molecule][0]} / {PUBLISHED_RMD17[m][molecule][1]}"
                     for m in ("MACE", "Allegro", "NequIP")]
        lines.append(f"| {molecule} | {cells[0]} | {cells[1]} | {_fmt(ratio, 2)} | {ok} | " + " | ".join(published) + " |")
    lines += ["", f"Published figures: {SOURCE} (`qeq_ase/tools/published_rmd17.py`, checked against the table's text).", ""]
    if missing:
        lines += [f"Not shipped yet (no `_fp32` or `_int8` file): {', '.join(missing)}.", ""]
    lines += [
        "## Physics and cost",
        "",
        f"LEE: mean |F(Rx) − R F(x)| over atoms, {settings['lee_frames']} test frames × "
        f"{settings['lee_rotations']} random rotations, float32. NVE: {settings['nve_ps']} ps velocity Verlet "
        f"at {settings['nve_timestep_fs']} fs after a {settings['nve_warmup_fs']:.0f} fs Langevin warm-up at "
        f"{settings['temperature_K']:.0f} K from test frame 0; drift is the slope of a line through the "
        f"total energy. Time: median of {settings['speed_calls']} energy + forces calls through the ASE "
        f"calculator on one molecule, {settings['threads']} thread(s); INT8 GEMM {', '.join(gemms) or '–'} "
        f"(`qeq_ase.quant.int8_kernels.GEMMS`), int8 input-gradient GEMMs in {', '.join(backwards) or '–'}.",
        "",
        "| molecule | LEE fp32 / INT8 (meV/Å) | NVE drift fp32 / INT8 (meV/atom/ps) | std E fp32 / INT8 (meV) "
        "| size fp32 / INT8 (bytes) | size ratio | ms/call fp32 / INT8 | INT8 speed-up | training epochs / min "
        "fp32, INT8 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for molecule in RMD17_MOLECULES:
        fp32, int8 = results.get(f"{molecule}_fp32"), results.get(f"{molecule}_int8")
        if not (fp32 and int8):
            continue
        pair = lambda key, d: f"{_fmt(fp32[key], d)} / {_fmt(int8[key], d)}"  # noqa: E731
        lines.append(
            f"| {molecule} | {pair('lee_mean_meV_per_A', 3)} | {pair('nve_drift_meV_per_atom_per_ps', 3)} "
            f"| {pair('nve_total_energy_std_meV', 2)} | {fp32['size_bytes']:,} / {int8['size_bytes']:,} "
            f"| {int8['size_bytes'] / fp32['size_bytes']:.3f} | {pair('ms_per_call', 1)} "
            f"| {fp32['ms_per_call'] / int8['ms_per_call']:.2f}x | {fp32['epochs']} / {fp32['training_minutes']}, "
            f"{int8['epochs']} / {int8['training_minutes']} |")
    lines.append("")
    for name in figure_names:
        lines += [f"![{name}](figures/{name})", ""]
    return "\n".join(lines)


def plot_forces(results: dict, path: Path) -> bool:
    """Grouped bars of force MAE per molecule: ours fp32 and INT8 beside the published models
    (False if there is nothing to plot or matplotlib, the ``plot`` extra, is missing)."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    molecules = [m for m in RMD17_MOLECULES if f"{m}_fp32" in results or f"{m}_int8" in results]
    if not molecules:
        return False
    series = {"ours fp32": [results.get(f"{m}_fp32", {}).get("forces_mae_meV_per_A", np.nan) for m in molecules],
              "ours INT8": [results.get(f"{m}_int8", {}).get("forces_mae_meV_per_A", np.nan) for m in molecules]}
    for model in ("MACE", "Allegro", "NequIP"):
        series[f"{model} (published)"] = [PUBLISHED_RMD17[model][m][1] for m in molecules]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(molecules)), 4))
    width = 0.8 / len(series)
    x = np.arange(len(molecules))
    for k, (label, values) in enumerate(series.items()):
        ax.bar(x + (k - (len(series) - 1) / 2) * width, values, width, label=label)
    ax.set_xticks(x, molecules, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("force MAE on test_01 (meV/Å)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(output: Path, data_dir: Path, settings: dict, potentials: Path | None = None,
                 recompute: bool = False, log=print, retime: bool = False) -> dict:
    """Measure (or reuse), then write ``output``, ``results.json`` beside it and the figure."""
    results_json = output.with_suffix(".json")
    results = collect(data_dir, results_json, settings, potentials, recompute, log, retime)
    results_json.write_text(json.dumps({"settings": settings, "potentials": results}, indent=1) + "\n")
    figures = output.parent / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    names = ["results_forces.png"] if plot_forces(results, figures / "results_forces.png") else []
    output.write_text(render_markdown(results, settings, names))
    return results


def main(argv: list[str] | None = None) -> None:
    from ..md.driver import default_rmd17_dir

    parser = argparse.ArgumentParser(prog="qeq-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="docs/results.md", help="report file (results.json goes beside it)")
    parser.add_argument("--data-dir", default=None, help="rMD17 folder (default $QEQ_RMD17_DIR or ../shared/rmd17)")
    parser.add_argument("--potentials", default=None, help="folder of <molecule>_{fp32,int8}.pt (default: the shipped ones)")
    parser.add_argument("--nve-ps", type=float, default=1.0, help="NVE length per potential (ps)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every measurement")
    parser.add_argument("--recompute", action="store_true",
                        help="evaluate test errors again instead of reading them from the files; measure everything anew")
    parser.add_argument("--retime", action="store_true",
                        help="time every calculator again, keeping the other cached measurements (run it idle)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # a command's own process: not a library side effect
    write_report(Path(args.output), Path(args.data_dir or default_rmd17_dir()),
                 default_settings(args.nve_ps, args.threads), args.potentials, args.recompute, retime=args.retime)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
