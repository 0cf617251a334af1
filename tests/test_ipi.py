"""qeq-ipi: an i-PI server with qeq-ase force clients records our calculator's energies."""

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import units
from ase.calculators.calculator import Calculator

from qeq_ase.calculator import QEqCalculator
from qeq_ase.md.ipi import connect, stress_mode, unix_socket_path
from ipi_harness import IPI_SCRIPT, needs_ipi, start, wait_for

#: i-PI input: 2 beads from the same positions, 3 steps; every bead's potential (Hartree,
#: printed to full precision) and positions (bohr, binary float64) at every step.
INPUT_XML = """<simulation verbosity="low" floatformat="%.17e" sockets_prefix="{prefix}">
  <output prefix="run">
    <properties stride="1" filename="out"> [ step, bead_potentials ] </properties>
    <trajectory filename="pos" stride="1" format="bin"> positions </trajectory>
  </output>
  <total_steps> 3 </total_steps>
  <prng> <seed> 12345 </seed> </prng>
  <ffsocket name="qeq" mode="unix" pbc="false"> <address> qeq </address> </ffsocket>
  <system>
    <initialize nbeads="2">
      <file mode="xyz"> start.xyz </file>
      <velocities mode="thermal" units="kelvin"> 300 </velocities>
    </initialize>
    <forces> <force forcefield="qeq"> </force> </forces>
    <motion mode="dynamics">
      <dynamics mode="nvt">
        <timestep units="femtosecond"> 0.5 </timestep>
        <thermostat mode="pile_l"> <tau units="femtosecond"> 100 </tau> </thermostat>
      </dynamics>
    </motion>
    <ensemble> <temperature units="kelvin"> 300 </temperature> </ensemble>
  </system>
</simulation>
"""


def read_ipi_binary(path: Path, natoms: int, frames: int) -> np.ndarray:
    """Positions ``[frames, natoms, 3]`` (bohr) of an i-PI ``format="bin"`` trajectory. A frame
    is the cell (9 float64), natoms (int64), the positions, the length of the names (int64),
    then names and title as UTF-32 (``ipi.utils.io.backends.io_binary``)."""
    data = path.read_bytes()
    size, rest = divmod(len(data), frames)
    assert rest == 0
    out = []
    for k in range(frames):
        start = k * size + 80 + 24 * natoms
        assert np.frombuffer(data, np.int64, count=1, offset=k * size + 72)[0] == natoms
        name_chars = int(np.frombuffer(data, np.int64, count=1, offset=start)[0])
        title = data[start + 8 + 4 * name_chars:(k + 1) * size].decode("utf-32-le")
        assert title.startswith(f"Step:  {k:10d}") and "positions{atomic_unit}" in title, title
        out.append(np.frombuffer(data, np.float64, count=3 * natoms, offset=k * size + 80).reshape(natoms, 3))
    return np.stack(out)


def read_bead_potentials(path: Path) -> np.ndarray:
    rows = [line.split() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return np.array(rows, dtype=np.float64)[:, 1:]  # drop the step column


@needs_ipi
def test_ipi_records_our_energies(tmp_path, aspirin, processes):
    atoms = aspirin
    lines = [str(len(atoms)), "# CELL(abcABC): 40 40 40 90 90 90 cell{angstrom} positions{angstrom}"]
    lines += [f"{s} {x:.17g} {y:.17g} {z:.17g}" for s, (x, y, z) in zip(atoms.get_chemical_symbols(), atoms.positions)]
    (tmp_path / "start.xyz").write_text("\n".join(lines) + "\n")
    (tmp_path / "input.xml").write_text(INPUT_XML.format(prefix=f"{tmp_path}/"))
    socket_path = tmp_path / "qeq"
    assert len(str(socket_path)) < 100, "UNIX socket paths are limited to 107 bytes"

    server = start(processes, [sys.executable, IPI_SCRIPT, "input.xml"], tmp_path / "ipi.log", tmp_path)
    threads = str(torch.get_num_threads())  # as in this process, so the reference rounds alike
    client = [sys.executable, "-m", "qeq_ase.md.ipi", "start.xyz", "--model", "aspirin_int8", "--unix", str(socket_path), "--threads", threads, "--connect-timeout", "30"]
    logs = [tmp_path / "ipi.log", tmp_path / "client_0.log", tmp_path / "client_1.log"]
    clients = [start(processes, client, log, tmp_path) for log in logs[1:]]
    wait_for(server, clients, logs, timeout_s=60)
    assert server.returncode == 0, (tmp_path / "ipi.log").read_text()[-2000:]
    for c in clients:
        c.wait(timeout=10)
    assert all(c.returncode == 0 for c in clients), [log.read_text()[-2000:] for log in logs[1:]]
    client_text = "".join(log.read_text() for log in logs[1:])
    assert client_text.count("there is no stress; the virial sent to i-PI is zero") == 2

    potentials_Ha = read_bead_potentials(tmp_path / "run.out")  # [steps + 1, beads]
    assert potentials_Ha.shape == (4, 2)  # steps 0-3
    frames = [read_ipi_binary(tmp_path / f"run.pos_{b}.bin", len(atoms), 4) for b in range(2)]
    np.testing.assert_array_equal(frames[0][0], frames[1][0])  # both beads start where the file says
    assert np.allclose(frames[0][0] * units.Bohr, atoms.positions, atol=1e-6)
    calc = QEqCalculator("aspirin_int8")
    for step in range(4):
        for bead in range(2):
            moved = atoms.copy()
            moved.positions = frames[bead][step] * units.Bohr  # as ASE's client converts
            moved.calc = calc
            ours = moved.get_potential_energy()
            # i-PI stores what ASE's client sent, energy / units.Ha; back with the same constant
            assert abs(potentials_Ha[step, bead] * units.Ha - ours) < 1e-6, (step, bead)
    assert not np.array_equal(frames[0][3], frames[0][0])  # the beads moved


def test_unix_socket_names_and_paths(tmp_path):
    assert unix_socket_path("qeq") == "/tmp/ipi_qeq"
    assert unix_socket_path(str(tmp_path / "s")) == str(tmp_path / "s")
    start_time = time.monotonic()
    with pytest.raises(ConnectionError, match="no i-PI server listening"):
        connect(unix=str(tmp_path / "nobody"), timeout_s=0.5)
    assert time.monotonic() - start_time < 5
    with pytest.raises(ValueError, match="either"):
        connect(unix="x", port=31415)


class _WithoutStress(Calculator):
    implemented_properties = ["energy", "forces"]


def test_stress_is_never_made_up(tiny_potential_path, aspirin):
    calc = QEqCalculator(tiny_potential_path)
    use_stress, message = stress_mode(aspirin, calc)
    assert not use_stress and "no stress" in message and "zero" in message
    crystal = aspirin.copy()
    crystal.cell, crystal.pbc = [12.0, 12.0, 12.0], True
    with pytest.raises(ValueError, match="made-up virial"):
        stress_mode(crystal, _WithoutStress())
    assert stress_mode(crystal, calc) == (True, "periodic structure: the virial sent to i-PI is -volume * stress")
