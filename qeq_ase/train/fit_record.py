"""What a ``qeq-fit`` was fitted to, recorded beside its outputs, so a later fit never reuses stale ones.

The record (``NAME_fit.json`` beside the potential files and ``fit.json`` in the work
folder) holds the SHA-256 of the training and test files and every option that changes
the result (budgets, recipes, extended XYZ keys). A fit whose files exist is resumed or
skipped only when its record matches; otherwise it is refused, or with ``redo`` started
again from scratch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

RECORD_VERSION = 1
#: Options that do not change the fitted weights, left out of the record.
RUNTIME_OPTIONS = ("device",)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


class FitMismatchError(ValueError):
    """Files of a fit exist but were fitted to other data or options."""


def check_name(name: str) -> str:
    """``name`` if it is a plain file name (no folder part, so outputs stay in the output folder)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"--name must be a plain file name (letters, digits, '.', '_', '-', '+'; no '/' or '..'), "
                         f"got {name!r}")
    return name


def fit_record(name: str, train_sha256: str, test_sha256: str, options: dict) -> dict:
    """The record of a fit: data hashes and options, as plain JSON (runtime options removed)."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in RUNTIME_OPTIONS}
        return value

    record = {"record_version": RECORD_VERSION, "name": name, "train_sha256": train_sha256,
              "test_sha256": test_sha256, **strip(options)}
    return json.loads(json.dumps(record, sort_keys=True, default=str))


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check_or_reset(record: dict, guarded: list[tuple[Path, list[Path]]], redo: bool) -> None:
    """Let a fit go on with its existing files only where they match ``record``.

    ``guarded`` pairs each record file with the files and folders it vouches for. Existing
    files whose record differs from ``record`` (or is missing) are refused with
    :class:`FitMismatchError`, or with ``redo`` deleted; ``redo`` deletes them in any case.
    Then ``record`` is written to every record file.
    """
    problems, doomed = [], []
    for record_path, paths in guarded:
        existing = [p for p in paths if p.exists()]
        old = _read(record_path) if record_path.exists() else None
        if not existing:
            continue
        if old is not None and old != record:
            differ = [k for k in sorted(set(old) | set(record)) if old.get(k) != record.get(k)]
            problems.append(f"{record_path} records other inputs ({', '.join(differ)} differ)")
        elif old is None:
            problems.append(f"{', '.join(map(str, existing))} have no record of the inputs they were fitted to")
        else:
            continue
        doomed += existing
    if problems and not redo:
        raise FitMismatchError(f"{'; '.join(problems)}: pass --redo to fit again from scratch (replacing them), "
                               "or choose another --name, -o or --work-dir")
    if redo:
        doomed = [p for _, paths in guarded for p in paths if p.exists()]
    for path in doomed:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for record_path, _ in guarded:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = record_path.with_name(record_path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, record_path)
