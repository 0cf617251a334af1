"""Running an i-PI server and qeq-ipi clients from a test (tests/test_ipi.py, tests/test_stress.py)."""

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qeq_ase

PACKAGE_ROOT = str(Path(qeq_ase.__file__).resolve().parents[1])
IPI_SCRIPT = shutil.which("i-pi", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
needs_ipi = pytest.mark.skipif(importlib.util.find_spec("ipi") is None or IPI_SCRIPT is None,
                               reason="i-PI is not installed (pip install ipi)")


def start(processes: list, command: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")])))
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
    processes.append(process)
    return process


def wait_for(server: subprocess.Popen, clients: list[subprocess.Popen], logs: list[Path], timeout_s: float) -> None:
    """Until the server exits; fails if it times out or every client died first."""
    deadline = time.monotonic() + timeout_s
    while server.poll() is None:
        if all(c.poll() is not None for c in clients) or time.monotonic() > deadline:
            time.sleep(0.5)  # the server may be finishing
            if server.poll() is None:
                text = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs)
                pytest.fail(f"i-PI did not finish (clients exited: {[c.poll() for c in clients]})\n{text}")
        time.sleep(0.1)
