"""Serve a qeq-ase potential to an i-PI server (path-integral MD and more): ``qeq-ipi``.

i-PI (PyPI ``ipi``) runs the integrator, the ring polymer and the thermostats; force
clients connect to it over a socket, receive positions and send back energy, forces and
virial. ``qeq-ipi`` is such a client: ASE's own i-PI client
(:class:`ase.calculators.socketio.SocketClient`) around a
:class:`~qeq_ase.calculator.QEqCalculator`. Start i-PI first, then one ``qeq-ipi`` per
parallel force evaluation (i-PI hands the beads to whichever client is free)::

    i-pi input.xml &                                        # <ffsocket mode="unix"><address>qeq</address>
    qeq-ipi rmd17:aspirin:0 --model aspirin_int8 --unix qeq &
    qeq-ipi rmd17:aspirin:0 --model aspirin_int8 --unix qeq &

    qeq-ipi start.xyz --model aspirin_int8 --host server.example.org --port 31415   # TCP, another machine

The structure argument gives the atoms (elements and order must be those of i-PI's input;
positions and cell come from i-PI at every step). ``--unix NAME`` connects to
``/tmp/ipi_NAME`` (i-PI's default ``sockets_prefix``), a NAME containing ``/`` is taken as
the socket's path (i-PI's ``<simulation sockets_prefix=...>`` plus ``<address>``). The
client waits up to ``--connect-timeout`` seconds for the server to listen, and exits when
i-PI ends the run.

Stress: the i-PI protocol always carries a virial. A gas-phase molecule (no periodic
direction) has none, so the client says so on start-up and sends a zero virial: i-PI's
pressure and stress outputs mean nothing for such a run (NVE/NVT only, not NPT). For a
periodic structure the virial is ``-volume * stress`` from the calculator; if the
calculator cannot give a stress, the client refuses to start rather than send zeros.
(ASE's ``SocketClient.run`` on its own would send zeros for any structure, and its
``irun`` would fail at the first step of a periodic one.)
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from typing import TextIO

from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.calculators.socketio import IPIProtocol, SocketClient
from ase.parallel import world

#: i-PI's and ASE's default prefix of UNIX socket paths.
IPI_SOCKET_PREFIX = "/tmp/ipi_"


def unix_socket_path(address: str) -> str:
    """``NAME`` -> ``/tmp/ipi_NAME`` (i-PI's default); an address containing ``/`` is a path."""
    return address if "/" in address else IPI_SOCKET_PREFIX + address


def connect(unix: str | None = None, host: str = "localhost", port: int | None = None,
            timeout_s: float = 60.0) -> socket.socket:
    """A socket connected to an i-PI server, retried until it listens or ``timeout_s`` passes."""
    if (unix is None) == (port is None):
        raise ValueError("give either a UNIX socket (unix=...) or a TCP port (port=...)")
    deadline = time.monotonic() + timeout_s
    while True:
        if unix is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: str | tuple[str, int] = unix_socket_path(unix)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # i-PI's many small messages
            target = (host, port)
        try:
            sock.connect(target)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise ConnectionError(f"no i-PI server listening at {target} after {timeout_s:g} s") from None
            time.sleep(0.2)


class QEqSocketClient(SocketClient):
    """ASE's :class:`~ase.calculators.socketio.SocketClient` on a socket connected by :func:`connect`.

    ASE's own constructor only reaches UNIX sockets under ``/tmp/ipi_`` and does not retry;
    the protocol loop (``run``/``irun``) is ASE's, unchanged.
    """

    def __init__(self, sock: socket.socket, log: TextIO | None = None):
        self.comm = world
        self.host, self.port, self.unixsocket = None, None, None
        self.protocol = IPIProtocol(sock, txt=log)
        self.log = self.protocol.log
        self.closed = False
        self.bead_index = 0
        self.bead_initbytes = b""
        self.state = "READY"


def stress_mode(atoms: Atoms, calc: Calculator) -> tuple[bool, str]:
    """``(use_stress, message)``: whether i-PI gets a virial from the stress, and why.

    Raises ``ValueError`` for a periodic structure whose calculator has no stress.
    """
    if not any(atoms.pbc):
        return False, ("gas-phase structure (no periodic direction): there is no stress; the virial sent "
                       "to i-PI is zero, so i-PI's pressure and stress outputs are not meaningful (NVE/NVT only)")
    if "stress" not in calc.implemented_properties:
        raise ValueError(f"the structure is periodic (pbc={atoms.pbc.tolist()}) but {type(calc).__name__} "
                         "has no stress: i-PI would get a made-up virial. Serve it as a gas-phase molecule "
                         "(pbc=False) for NVE/NVT")
    return True, "periodic structure: the virial sent to i-PI is -volume * stress"


def serve(atoms: Atoms, calc: Calculator, sock: socket.socket, log: TextIO | None = None,
          announce: bool = True) -> int:
    """Answer i-PI's force requests with ``calc`` until the server ends the run; returns the count.

    ``announce`` prints what is sent for the virial (:func:`stress_mode`) to stderr.
    """
    use_stress, message = stress_mode(atoms, calc)
    if announce:
        print(f"qeq-ipi: {message}", file=sys.stderr, flush=True)
    atoms = atoms.copy()
    atoms.calc = calc
    client = QEqSocketClient(sock, log=log)
    count = 0
    for _ in client.irun(atoms, use_stress=use_stress):
        count += 1
    return count


def main(argv: list[str] | None = None) -> None:
    from ..cli.args import ArgumentParser, positive_float, positive_int, user_errors

    parser = ArgumentParser(prog="qeq-ipi", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("structure", help="atoms in i-PI's order: ASE-readable file or rmd17:<molecule>:<frame>")
    parser.add_argument("--model", default="aspirin_int8", help="shipped potential name or path (default aspirin_int8)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--unix", metavar="NAME", help="UNIX socket: /tmp/ipi_NAME, or a path if NAME contains '/'")
    where.add_argument("--port", type=positive_int, help="TCP port of the i-PI server (with --host)")
    parser.add_argument("--host", default="localhost", help="TCP host of the i-PI server (default localhost)")
    parser.add_argument("--connect-timeout", type=positive_float, default=60.0,
                        help="seconds to wait for the server to listen (default 60)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--activation-limbs", type=int, choices=(1, 2), default=None,
                        help="int8 potentials: 1 (W8A8) or 2 (two-limb inputs); default: the file's")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--data-dir", default=None, help="rMD17 folder (default $QEQ_RMD17_DIR or ../shared/rmd17)")
    parser.add_argument("--log", action="store_true", help="print every protocol message to stdout")
    args = parser.parse_args(argv)
    import torch

    from ..calculator import QEqCalculator
    from ..kernels.glibc_malloc import keep_large_allocations
    from .driver import load_start_structure

    if args.threads:
        torch.set_num_threads(args.threads)  # this command's own process
    keep_large_allocations()
    with user_errors("qeq-ipi"):
        atoms = load_start_structure(args.structure, args.data_dir)
        calc = QEqCalculator(args.model, dtype=args.dtype, activation_limbs=args.activation_limbs)
        stress_mode(atoms, calc)  # refuse before connecting
        sock = connect(args.unix, args.host, args.port, args.connect_timeout)
        count = serve(atoms, calc, sock, log=sys.stdout if args.log else None)
    print(f"qeq-ipi: served {count} force evaluations", file=sys.stderr)


if __name__ == "__main__":
    main()
