"""Path-integral NVT of aspirin at 300 K: i-PI integrates, qeq-ase clients give the forces.

Runs i-PI (PyPI ``ipi``) on ``pimd_aspirin_ipi.xml`` beside this script (8 beads, PILE-L
thermostat, 0.5 fs) with ``--clients`` ``qeq-ipi`` force clients in parallel, all on one
UNIX socket, then prints i-PI's quantum kinetic energy (the centroid-virial estimator,
``kinetic_cv``) beside the classical kinetic energy of the same run. Defaults take about a
minute on two cores. From the repository root (rMD17 in ``../shared/rmd17``)::

    python md_examples/pimd_aspirin_ipi.py                         # aspirin_int8, 8 beads, 800 steps
    python md_examples/pimd_aspirin_ipi.py --beads 16 --steps 4000 --clients 4

Output goes to ``--out-dir``: i-PI's input and log, the clients' logs, ``pimd.out``
(properties every 10 steps) and ``pimd.centroid.xyz`` (centroid every 100 steps, Å).

The classical column is ``(N_f / 2) k_B T`` with i-PI's instantaneous temperature of the
ring polymer (its ``temperature``, ``N_f = 3N - 3`` with the centre of mass fixed): what a
classical run at that temperature has. The quantum kinetic energy is larger: zero-point
motion of the stiff C-H, O-H, C=O modes. 8 beads and a short run are a demonstration, not
a converged estimate (hydrogen at 300 K wants 32 beads or more, and longer runs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

import qeq_ase
from qeq_ase.md.ipi import unix_socket_path
from qeq_ase.md.driver import load_start_structure

HERE = Path(__file__).resolve().parent
INPUT = HERE / "pimd_aspirin_ipi.xml"
K_B_EV_PER_K = 8.617333262e-5
PACKAGE_ROOT = str(Path(qeq_ase.__file__).resolve().parents[1])  # clients run the qeq_ase this script runs


def write_ipi_xyz(path: Path, atoms, box_A: float = 40.0) -> None:
    """i-PI's xyz: positions in Å, a cubic box (no periodic boundaries are applied)."""
    lines = [str(len(atoms)), f"# CELL(abcABC): {box_A} {box_A} {box_A} 90 90 90 cell{{angstrom}} positions{{angstrom}}"]
    lines += [f"{s} {x:.10f} {y:.10f} {z:.10f}" for s, (x, y, z) in zip(atoms.get_chemical_symbols(), atoms.positions)]
    path.write_text("\n".join(lines) + "\n")


def write_input(path: Path, args: argparse.Namespace, address: str) -> None:
    tree = ET.parse(INPUT)
    root = tree.getroot()
    root.find("total_steps").text = f" {args.steps} "
    root.find("prng/seed").text = f" {args.seed} "
    root.find("ffsocket/address").text = f" {address} "
    root.find("system/initialize").set("nbeads", str(args.beads))
    root.find("system/motion/dynamics/timestep").text = f" {args.timestep_fs} "
    root.find("system/ensemble/temperature").text = f" {args.temperature_K} "
    root.find("system/initialize/velocities").text = f" {args.temperature_K} "
    tree.write(path)


def ipi_command() -> list[str]:
    script = shutil.which("i-pi", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if script is None:
        raise SystemExit("i-PI is not installed: pip install ipi")
    return [sys.executable, script]


def wait_for_server(server: subprocess.Popen, clients: list[subprocess.Popen], timeout_s: float, out: Path) -> None:
    """Until i-PI exits; i-PI waits for clients forever, so stop if they all died or time is up."""
    deadline = time.monotonic() + timeout_s
    while server.poll() is None:
        if all(c.poll() is not None for c in clients):
            try:
                server.wait(timeout=5)  # they may have ended because i-PI is ending
            except subprocess.TimeoutExpired:
                raise SystemExit(f"the force clients exited before i-PI finished; see {out}/client_*.log") from None
        if time.monotonic() > deadline:
            raise SystemExit(f"stopped after --timeout-s {timeout_s:g} s; see {out}/ipi.log")
        time.sleep(0.2)
    if server.returncode != 0:
        raise SystemExit(f"i-PI failed (exit {server.returncode}); see {out / 'ipi.log'}")


def read_properties(path: Path) -> tuple[list[str], np.ndarray]:
    """Column names and rows of an i-PI properties file."""
    names = []
    for line in path.read_text().splitlines():
        if line.startswith("#") and "-->" in line:
            names.append(line.split("-->")[1].split(":")[0].strip().split("{")[0])
    return names, np.atleast_2d(np.loadtxt(path))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="aspirin_int8", help="shipped potential name or path")
    parser.add_argument("--start", default="rmd17:aspirin:0", help="start structure (file or rmd17:<mol>:<frame>)")
    parser.add_argument("--beads", type=int, default=8)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--timestep-fs", type=float, default=0.5)
    parser.add_argument("--temperature-K", type=float, default=300.0)
    parser.add_argument("--clients", type=int, default=2, help="qeq-ipi force clients in parallel")
    parser.add_argument("--threads-per-client", type=int, default=1)
    parser.add_argument("--seed", type=int, default=31415)
    parser.add_argument("--out-dir", default="runs/pimd_aspirin_ipi")
    parser.add_argument("--data-dir", default=None, help="rMD17 folder (default $QEQ_RMD17_DIR or ../shared/rmd17)")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="stop everything after this long")
    args = parser.parse_args(argv)

    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("pimd.*"):  # i-PI would back old outputs up instead of replacing them
        old.unlink()
    atoms = load_start_structure(args.start, args.data_dir)
    write_ipi_xyz(out / "aspirin_start.xyz", atoms)
    address = f"qeq_pimd_{os.getpid()}"
    write_input(out / "input.xml", args, address)
    client = [sys.executable, "-m", "qeq_ase.md.ipi", str(out / "aspirin_start.xyz"), "--model", args.model,
              "--unix", address, "--threads", str(args.threads_per_client)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")])))

    start = time.perf_counter()
    processes = []
    try:
        with open(out / "ipi.log", "w") as log:
            server = subprocess.Popen(ipi_command() + ["input.xml"], cwd=out, stdout=log, stderr=subprocess.STDOUT)
            processes.append(server)
            for k in range(args.clients):
                with open(out / f"client_{k}.log", "w") as client_log:
                    processes.append(subprocess.Popen(client, stdout=client_log, stderr=subprocess.STDOUT, env=env))
        wait_for_server(server, processes[1:], args.timeout_s, out)
        for process in processes[1:]:
            process.wait(timeout=30)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        Path(unix_socket_path(address)).unlink(missing_ok=True)  # left behind by a killed i-PI
    wall = time.perf_counter() - start

    names, rows = read_properties(out / "pimd.out")
    col = {name: rows[:, k] for k, name in enumerate(names)}
    n_free = 3 * len(atoms) - 3
    classical = 0.5 * n_free * K_B_EV_PER_K * col["temperature"]
    print(f"{args.beads} beads, {args.steps} steps of {args.timestep_fs} fs, {args.clients} clients, "
          f"{args.model}: {wall:.0f} s ({1e3 * wall / args.steps:.0f} ms per step)")
    print(f"{'step':>6} {'T (K)':>8} {'E_kin classical (eV)':>21} {'E_kin quantum, kinetic_cv (eV)':>31}")
    for k in range(0, len(rows), max(1, len(rows) // 10)):
        print(f"{int(col['step'][k]):>6} {col['temperature'][k]:>8.1f} {classical[k]:>21.3f} {col['kinetic_cv'][k]:>31.3f}")
    half = len(rows) // 2
    print(f"second-half averages: T = {col['temperature'][half:].mean():.1f} K, classical "
          f"{classical[half:].mean():.3f} eV ((N_f/2) k_B 300 K = {0.5 * n_free * K_B_EV_PER_K * args.temperature_K:.3f}), "
          f"quantum (kinetic_cv) {col['kinetic_cv'][half:].mean():.3f} eV")


if __name__ == "__main__":
    main()
