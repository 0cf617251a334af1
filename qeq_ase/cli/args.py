"""Shared pieces of the command-line tools: argument types that check ranges, and one-line errors.

A user error on the command line ends a command with exit status 2 and one line on stderr
that names the problem (``PROG: error: ...``), as ``argparse`` does for its own errors; never
a traceback. The argument types below raise ``argparse.ArgumentTypeError``, which argparse
turns into that line with the option's name; :func:`user_errors` does the same for errors
found later in the user's data (files that do not exist or do not parse, settings that do
not fit a file).
"""

from __future__ import annotations

import argparse
import math
import sys
from contextlib import contextmanager
from typing import Iterator

#: Exceptions that mean "the input was wrong", not "qeq-ase is broken". ValueError covers
#: DatasetError, PotentialFileError and TrajectoryError; OSError covers missing, unreadable
#: and unwritable files.
USER_ERRORS = (ValueError, OSError, IndexError)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line: ``PROG: error: MESSAGE``."""

    def error(self, message: str):
        exit_with_error(self.prog, f"{message} (see {self.prog} --help)")


def _number(text: str, kind: type) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def bounded(kind: type, low: int, strict: bool, name: str):
    """An argparse type: a finite ``kind`` that is ``> low`` (``strict``) or ``>= low``."""
    def check(text: str):
        value = _number(text, kind)
        if value < low or (strict and value == low):
            what = "an integer " if kind is int else ""
            raise argparse.ArgumentTypeError(f"must be {what}{'>' if strict else '>='} {low}, got {text}")
        return value

    check.__name__ = check.__qualname__ = name
    check.__doc__ = f"argparse type: {'an integer' if kind is int else 'a finite number'} {'>' if strict else '>='} {low}."
    return check


positive_float = bounded(float, 0, True, "positive_float")
non_negative_float = bounded(float, 0, False, "non_negative_float")
positive_int = bounded(int, 1, False, "positive_int")
non_negative_int = bounded(int, 0, False, "non_negative_int")


def torch_device(text: str) -> str:
    """argparse type: a torch device that exists on this machine (``cpu``, ``cuda``, ``cuda:1``)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:0)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available to this torch; use cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s)")
    elif device.type != "cpu":
        available = getattr(torch, device.type, None)
        if available is None or not getattr(available, "is_available", lambda: False)():
            raise argparse.ArgumentTypeError(f"{text!r}: device type {device.type!r} is not available; use cpu")
    return text


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (file-reading libraries put newlines in theirs)."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return text


def exit_with_error(prog: str, err: BaseException | str) -> None:
    """Print ``PROG: error: MESSAGE`` (one line) to stderr and exit with status 2."""
    message = err if isinstance(err, str) else one_line(err)
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


@contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Turn :data:`USER_ERRORS` raised inside the block into :func:`exit_with_error`."""
    try:
        yield
    except USER_ERRORS as err:
        exit_with_error(prog, err)
