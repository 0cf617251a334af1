"""Every bad input gets a clear error: one row per case, run through the CLIs (in-process, via
their ``main(argv)``) and the calculator.

A CLI row passes when the command exits with status 2 and prints exactly one line on stderr,
``PROG: error: ...``, holding the row's key words (never a traceback). A calculator row
passes when the call raises the row's exception type with the key words in its message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.io import write

from qeq_ase.cli import check as check_cli
from qeq_ase.md import driver as md
from qeq_ase.train import evaluate, export, fit
from qeq_ase.train import trainer as train
from qeq_ase.calculator import QEqCalculator
from qeq_ase.io.checkpoint import PotentialFileError
from qeq_ase.data.local_frame import OverlappingAtomsError

CLIS = {"qeq-md": md.main, "qeq-check": check_cli.main, "qeq-eval": evaluate.main, "qeq-fit": fit.main,
        "qeq-train": train.main, "qeq-export": export.main}


@dataclass
class Env:
    """What the rows refer to: files made once per module, by name."""

    tmp: Path
    tiny: Path
    rmd17: Path

    def file(self, name: str) -> str:
        return str(self.tmp / name)


@dataclass
class Row:
    case: str
    prog: str | None                  # a CLI, or None for a calculator row
    args: Callable[[Env], list[str]] | Callable[[Env], None]
    words: tuple[str, ...]
    error: type = ValueError          # calculator rows only


def cli(prog: str, case: str, args: Callable[[Env], list[str]], *words: str) -> Row:
    return Row(case, prog, args, words)


def calc(case: str, call: Callable[[Env], None], error: type, *words: str) -> Row:
    return Row(case, None, call, words, error)


def _atoms(calc_model, symbols, positions, **kwargs):
    atoms = Atoms(symbols, positions=positions, **kwargs)
    atoms.calc = calc_model
    return atoms.get_forces()


MD_START = ["rmd17:aspirin:0", "--no-progress", "--steps", "2"]

ROWS = [
    # qeq-check nve: ranges of the MD settings
    cli("qeq-check", "nve time-ps 0", lambda e: ["nve", str(e.tiny), "--time-ps", "0"], "--time-ps", "> 0"),
    cli("qeq-check", "nve time-ps -1", lambda e: ["nve", str(e.tiny), "--time-ps", "-1"], "--time-ps", "> 0"),
    cli("qeq-check", "nve timestep 0", lambda e: ["nve", str(e.tiny), "--timestep-fs", "0"], "--timestep-fs", "> 0"),
    cli("qeq-check", "nve timestep -0.5", lambda e: ["nve", str(e.tiny), "--timestep-fs", "-0.5"],
        "--timestep-fs", "> 0"),
    cli("qeq-check", "nve warmup -10", lambda e: ["nve", str(e.tiny), "--warmup-fs", "-10"], "--warmup-fs", ">= 0"),
    cli("qeq-check", "nve temperature -5", lambda e: ["nve", str(e.tiny), "--temperature-K", "-5"],
        "--temperature-K", ">= 0"),
    cli("qeq-check", "nve friction nan", lambda e: ["nve", str(e.tiny), "--friction-per-fs", "nan"],
        "--friction-per-fs", "finite"),
    cli("qeq-check", "nve shorter than two steps",
        lambda e: ["nve", str(e.tiny), "--time-ps", "0.0005", "--data-dir", str(e.rmd17)], "time_ps", "two"),
    # qeq-check equivariance
    cli("qeq-check", "equivariance frames 0", lambda e: ["equivariance", str(e.tiny), "--frames", "0"],
        "--frames", ">= 1"),
    cli("qeq-check", "equivariance frames -3", lambda e: ["equivariance", str(e.tiny), "--frames", "-3"],
        "--frames", ">= 1"),
    cli("qeq-check", "equivariance rotations 0", lambda e: ["equivariance", str(e.tiny), "--rotations", "0"],
        "--rotations", ">= 1"),
    cli("qeq-check", "equivariance frames 1.5", lambda e: ["equivariance", str(e.tiny), "--frames", "1.5"],
        "--frames", "integer"),
    cli("qeq-check", "equivariance unknown molecule",
        lambda e: ["equivariance", str(e.tiny), "--molecule", "aspirine", "--data-dir", str(e.rmd17)],
        "unknown rMD17 molecule", "aspirin"),
    cli("qeq-check", "equivariance missing data folder",
        lambda e: ["equivariance", str(e.tiny), "--data-dir", e.file("no_such_dir")], "not found", "--data-dir"),
    cli("qeq-check", "equivariance unknown potential", lambda e: ["equivariance", "no_such_potential"],
        "unknown potential", "aspirin_fp32"),
    cli("qeq-check", "int8 in float64", lambda e: ["nve", "aspirin_int8", "--dtype", "float64",
                                                   "--activation-limbs", "2"], "float32"),
    # qeq-md: MD settings
    cli("qeq-md", "timestep 0", lambda e: [*MD_START, "--timestep-fs", "0"], "--timestep-fs", "> 0"),
    cli("qeq-md", "timestep -0.5", lambda e: [*MD_START, "--timestep-fs", "-0.5"], "--timestep-fs", "> 0"),
    cli("qeq-md", "temperature -300", lambda e: [*MD_START, "--temperature-K", "-300"], "--temperature-K", ">= 0"),
    cli("qeq-md", "temperature -300 nve", lambda e: [*MD_START, "--ensemble", "nve", "--temperature-K", "-300"],
        "--temperature-K", ">= 0"),
    cli("qeq-md", "friction -0.01", lambda e: [*MD_START, "--friction-per-fs", "-0.01"], "--friction-per-fs", ">= 0"),
    cli("qeq-md", "tdamp 0", lambda e: [*MD_START, "--ensemble", "nose-hoover", "--tdamp-fs", "0"], "--tdamp-fs",
        "> 0"),
    cli("qeq-md", "tchain 1.5", lambda e: [*MD_START, "--ensemble", "nose-hoover", "--tchain", "1.5"], "--tchain",
        "integer"),
    cli("qeq-md", "nose-hoover at 0 K", lambda e: [*MD_START, "--ensemble", "nose-hoover", "--temperature-K", "0"],
        "nose-hoover", "temperature_K > 0"),
    cli("qeq-md", "friction with nve", lambda e: [*MD_START, "--ensemble", "nve", "--friction-per-fs", "0.1"],
        "'nve' takes no friction_per_fs"),
    cli("qeq-md", "steps -1", lambda e: [*MD_START, "--steps", "-1"], "--steps", ">= 0"),
    cli("qeq-md", "write-every 0", lambda e: [*MD_START, "--write-every", "0"], "--write-every", ">= 1"),
    cli("qeq-md", "flush-every 0", lambda e: [*MD_START, "--flush-every", "0"], "--flush-every", ">= 1"),
    cli("qeq-md", "threads 0", lambda e: [*MD_START, "--threads", "0"], "--threads", ">= 1"),
    cli("qeq-md", "timestep text", lambda e: [*MD_START, "--timestep-fs", "fast"], "--timestep-fs", "not a number"),
    cli("qeq-md", "unknown ensemble", lambda e: [*MD_START, "--ensemble", "npt"], "--ensemble", "langevin"),
    cli("qeq-md", "no start", lambda e: ["--steps", "2"], "start structure", "--resume"),
    # qeq-md: start structures, devices, models
    cli("qeq-md", "garbage xyz", lambda e: [e.file("bad.xyz"), "--model", str(e.tiny), "--trajectory",
                                            e.file("x1.h5")], "cannot read start structure", "bad.xyz"),
    cli("qeq-md", "text named npz", lambda e: [e.file("text.npz"), "--model", str(e.tiny), "--trajectory",
                                               e.file("x2.h5")], "cannot read start structure", "text.npz"),
    cli("qeq-md", "missing start", lambda e: [e.file("nothing.xyz"), "--trajectory", e.file("x3.h5")],
        "start structure not found"),
    cli("qeq-md", "bad rmd17 frame", lambda e: ["rmd17:aspirin:first", "--data-dir", str(e.rmd17),
                                                "--trajectory", e.file("x4.h5")], "bad rMD17 source"),
    cli("qeq-md", "rmd17 frame out of range", lambda e: ["rmd17:aspirin:99999", "--data-dir", str(e.rmd17),
                                                         "--trajectory", e.file("x5.h5")], "out of range"),
    cli("qeq-md", "cuda without cuda", lambda e: [*MD_START, "--device", "cuda:99"], "--device", "cuda"),
    cli("qeq-md", "unknown device", lambda e: [*MD_START, "--device", "tpu"], "--device", "torch device"),
    cli("qeq-md", "unknown potential", lambda e: [*MD_START, "--model", "aspirin_fp16", "--data-dir", str(e.rmd17),
                                                  "--trajectory", e.file("x6.h5")], "unknown potential"),
    cli("qeq-md", "element the potential lacks", lambda e: [e.file("nh3.xyz"), "--model", str(e.tiny),
                                                            "--trajectory", e.file("x7.h5")], "N (Z=7)"),
    cli("qeq-md", "coincident atoms", lambda e: [e.file("overlap.xyz"), "--model", str(e.tiny),
                                                 "--trajectory", e.file("x8.h5")], "atoms 0 and 1", "apart"),
    cli("qeq-md", "existing trajectory", lambda e: [*MD_START, "--model", str(e.tiny), "--data-dir", str(e.rmd17),
                                                    "--trajectory", e.file("done.h5")], "exists", "resume"),
    # qeq-md: trajectories to resume or convert
    cli("qeq-md", "resume missing file", lambda e: ["--resume", "--trajectory", e.file("missing.h5")], "not found"),
    cli("qeq-md", "resume truncated hdf5", lambda e: ["--resume", "--trajectory", e.file("truncated.h5")],
        "truncated.h5", "HDF5"),
    cli("qeq-md", "resume text file", lambda e: ["--resume", "--trajectory", e.file("text.h5")], "text.h5", "HDF5"),
    cli("qeq-md", "resume other settings", lambda e: ["--resume", "--trajectory", e.file("done.h5"),
                                                      "--timestep-fs", "1.0"], "timestep_fs", "0.5", "1.0"),
    cli("qeq-md", "resume other dtype", lambda e: ["--resume", "--trajectory", e.file("done.h5"),
                                                   "--dtype", "float32"], "float64", "float32"),
    cli("qeq-md", "convert truncated hdf5", lambda e: ["convert", e.file("truncated.h5"), e.file("out.extxyz")],
        "truncated.h5", "HDF5"),
    cli("qeq-md", "convert every 0", lambda e: ["convert", e.file("done.h5"), e.file("o.extxyz"), "--every", "0"],
        "--every", ">= 1"),
    # qeq-eval
    cli("qeq-eval", "frames -2", lambda e: [str(e.tiny), e.file("test.extxyz"), "--frames", "-2"], "--frames", ">= 1"),
    cli("qeq-eval", "batch-size 0", lambda e: [str(e.tiny), e.file("test.extxyz"), "--batch-size", "0"],
        "--batch-size", ">= 1"),
    cli("qeq-eval", "text named npz", lambda e: [str(e.tiny), e.file("text.npz")], "text.npz", "not a zip archive"),
    cli("qeq-eval", "unknown data format", lambda e: [str(e.tiny), e.file("data.csv")], "unknown data format"),
    cli("qeq-eval", "missing data", lambda e: [str(e.tiny), e.file("none.extxyz")], "not found"),
    cli("qeq-eval", "missing energy key", lambda e: [str(e.tiny), e.file("test.extxyz"), "--energy-key", "REF_E"],
        "REF_E", "--energy-key"),
    cli("qeq-eval", "int8 in float64", lambda e: ["aspirin_int8", e.file("test.extxyz"), "--dtype", "float64"],
        "float32"),
    cli("qeq-eval", "corrupt potential", lambda e: [e.file("corrupt.pt"), e.file("test.extxyz")],
        "corrupt.pt", "not a qeq-ase potential"),
    # qeq-fit
    cli("qeq-fit", "fp32-minutes 0", lambda e: [e.file("test.extxyz"), e.file("test.extxyz"), "--name", "m",
                                                "--fp32-minutes", "0"], "--fp32-minutes", "> 0"),
    cli("qeq-fit", "fp32-minutes -5", lambda e: [e.file("test.extxyz"), e.file("test.extxyz"), "--name", "m",
                                                 "--fp32-minutes", "-5"], "--fp32-minutes", "> 0"),
    cli("qeq-fit", "int8-minutes 0", lambda e: [e.file("test.extxyz"), e.file("test.extxyz"), "--name", "m",
                                                "--int8-minutes", "0"], "--int8-minutes", "> 0"),
    cli("qeq-fit", "n-val 0", lambda e: [e.file("test.extxyz"), e.file("test.extxyz"), "--name", "m",
                                         "--n-val", "0"], "--n-val", ">= 1"),
    cli("qeq-fit", "lr 0", lambda e: [e.file("test.extxyz"), e.file("test.extxyz"), "--name", "m", "--lr", "0"],
        "--lr", "> 0"),
    cli("qeq-fit", "name outside the output folder",
        lambda e: [e.file("test.extxyz"), e.file("test.extxyz"), "--name", "../../x", "-o", e.file("fit_out"),
                   "--work-dir", e.file("fit_work")], "--name", "plain file name"),
    cli("qeq-fit", "unreadable data", lambda e: [e.file("bad.xyz"), e.file("test.extxyz"), "--name", "m",
                                                 "-o", e.file("fit_out"), "--work-dir", e.file("fit_work")],
        "bad.xyz", "extended XYZ"),
    cli("qeq-fit", "missing data", lambda e: [e.file("none.extxyz"), e.file("test.extxyz"), "--name", "m",
                                              "-o", e.file("fit_out"), "--work-dir", e.file("fit_work")], "not found"),
    # qeq-train
    cli("qeq-train", "text file as config", lambda e: [e.file("hello.txt")], "hello.txt", "not a training config"),
    cli("qeq-train", "missing config", lambda e: [e.file("none.yaml")], "not found"),
    cli("qeq-train", "unknown option", lambda e: [e.file("typo.yaml")], "unknown training option", "lrr"),
    cli("qeq-train", "no train_file", lambda e: [e.file("no_data.yaml")], "train_file", "missing"),
    cli("qeq-train", "zero budget", lambda e: [e.file("zero_budget.yaml")], "time_budget_min", "> 0"),
    cli("qeq-train", "n_val 0", lambda e: [e.file("n_val0.yaml")], "n_val", ">= 1"),
    cli("qeq-train", "missing training data", lambda e: [e.file("missing_data.yaml")], "not found"),
    cli("qeq-train", "existing run folder", lambda e: [e.file("good.yaml"), "--output-dir", e.file("old_run")],
        "already holds a training run", "--resume", "--overwrite"),
    cli("qeq-train", "resume without checkpoint", lambda e: [e.file("good.yaml"), "--resume", "--output-dir",
                                                            e.file("empty_run")], "no checkpoint"),
    cli("qeq-train", "resume and overwrite", lambda e: [e.file("good.yaml"), "--resume", "--overwrite"],
        "--overwrite", "not allowed"),
    # qeq-export
    cli("qeq-export", "missing checkpoint", lambda e: [e.file("none.pt"), e.file("test.extxyz"), "-o",
                                                       e.file("o.pt")], "not found"),
    # the calculator
    calc("coincident atoms", lambda e: _atoms(QEqCalculator(e.tiny), "COH", [[0, 0, 0], [0, 0, 0], [1, 0, 0]]),
         OverlappingAtomsError, "atoms 0 and 1", "apart", "repulsion"),
    calc("near-coincident atoms", lambda e: _atoms(QEqCalculator(e.tiny), "CO", [[0, 0, 0], [1e-6, 0, 0]]),
         OverlappingAtomsError, "atoms 0 and 1", "1e-06"),
    calc("coincident periodic images", lambda e: _atoms(QEqCalculator(e.tiny), "CO", [[0, 0, 0], [5, 0, 0]],
                                                        cell=[5, 6, 7], pbc=True),
         OverlappingAtomsError, "atoms 0 and 1", "apart"),
    calc("NaN position", lambda e: _atoms(QEqCalculator(e.tiny), "CO", [[0, 0, 0], [np.nan, 0, 0]]),
         ValueError, "non-finite", "[1]"),
    calc("unknown element", lambda e: _atoms(QEqCalculator(e.tiny), "CN", [[0, 0, 0], [1.2, 0, 0]]),
         ValueError, "N (Z=7)", "not trained"),
    calc("zero periodic cell vector", lambda e: _atoms(QEqCalculator(e.tiny), "CO", [[0, 0, 0], [1.2, 0, 0]],
                                                       cell=[5, 0, 5], pbc=True), ValueError, "nonzero cell vectors"),
    calc("unknown potential", lambda e: QEqCalculator("aspirin_fp16"), ValueError, "unknown potential"),
    calc("int8 in float64", lambda e: QEqCalculator("aspirin_int8", dtype="float64"), ValueError, "float32"),
    calc("limbs for a float potential", lambda e: QEqCalculator(e.tiny, activation_limbs=2), ValueError,
         "INT8 potentials"),
    calc("corrupt potential file", lambda e: QEqCalculator(e.file("corrupt.pt")), PotentialFileError, "corrupt.pt"),
    calc("unknown dtype", lambda e: QEqCalculator(e.tiny, dtype="float16"), ValueError, "float16", "float32"),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_potential_path, rmd17_dir) -> Env:
    """Bad and good files for the rows, and a finished trajectory to resume."""
    from qeq_ase.data.dataset import load_rmd17, write_extxyz

    tmp = tmp_path_factory.mktemp("bad_inputs")
    (tmp / "bad.xyz").write_text("this is not\nan xyz file\n")
    (tmp / "text.npz").write_text("hello\n")
    (tmp / "text.h5").write_text("hello\n")
    (tmp / "hello.txt").write_text("hello\n")
    (tmp / "data.csv").write_text("1,2,3\n")
    (tmp / "corrupt.pt").write_bytes(b"\x00" * 64)
    write(tmp / "nh3.xyz", Atoms("NH3", positions=[[0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]))
    write(tmp / "overlap.xyz", Atoms("COH", positions=[[0, 0, 0], [0, 0, 0], [1.0, 0, 0]]))
    write_extxyz(load_rmd17(rmd17_dir / "rmd17_ethanol_test_01.npz").subset(np.arange(4)), tmp / "test.extxyz")
    train_file = str(rmd17_dir / "rmd17_ethanol_train_01.npz")
    configs = {
        "typo.yaml": f"train_file: {train_file}\nlrr: 0.01\n",
        "no_data.yaml": "lr: 0.01\n",
        "zero_budget.yaml": f"train_file: {train_file}\ntime_budget_min: 0\n",
        "n_val0.yaml": f"train_file: {train_file}\nn_val: 0\n",
        "missing_data.yaml": f"train_file: {tmp / 'none.npz'}\noutput_dir: {tmp / 'never'}\n",
        "good.yaml": f"train_file: {train_file}\noutput_dir: {tmp / 'never'}\n",
    }
    for name, text in configs.items():
        (tmp / name).write_text(text)
    (tmp / "old_run").mkdir()
    (tmp / "old_run" / "last.pt").write_bytes(b"a run")
    md.run_md("rmd17:aspirin:0", tiny_potential_path, steps=2, trajectory=tmp / "done.h5", data_dir=rmd17_dir,
              dtype="float64", progress=False)
    good = (tmp / "done.h5").read_bytes()
    (tmp / "truncated.h5").write_bytes(good[: len(good) // 3])
    return Env(tmp, tiny_potential_path, rmd17_dir)


def test_the_table_covers_the_issue():
    assert len(ROWS) >= 40
    assert len({(row.prog, row.case) for row in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[f"{row.prog or 'calculator'}: {row.case}" for row in ROWS])
def test_bad_input_gets_a_clear_error(row: Row, env: Env, capsys, monkeypatch):
    monkeypatch.chdir(env.tmp)
    monkeypatch.setenv("QEQ_RMD17_DIR", str(env.rmd17))
    threads = torch.get_num_threads()
    if row.prog is None:
        with pytest.raises(row.error) as info:
            row.args(env)
        message = str(info.value)
    else:
        with pytest.raises(SystemExit) as info:
            CLIS[row.prog](row.args(env))
        torch.set_num_threads(threads)
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert info.value.code == 2, captured.err
        assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
        message = lines[0]
        assert message.startswith(f"{row.prog}") and ": error: " in message, message
    for word in row.words:
        assert word in message, (word, message)
