"""What this CPU and this torch build can run: ISA flags, AMX, and the compiler target of the
project's C++ kernels.

Two knobs that users and CI set to emulate an older CPU are honoured here, so that every
choice the package makes follows them:

* ``ONEDNN_MAX_CPU_ISA`` (oneDNN's own limit, e.g. ``AVX2`` or ``AVX512_CORE_VNNI``): a limit
  below ``AVX512_CORE_AMX`` means no AMX, whatever ``/proc/cpuinfo`` says.
* ``ATEN_CPU_CAPABILITY`` (torch's, e.g. ``avx2``): read through
  ``torch.backends.cpu.get_cpu_capability()``; the C++ kernels are compiled for that level
  (``-march=x86-64-v3`` for AVX2 on an AVX-512 CPU) instead of ``-march=native``.
"""

from __future__ import annotations

import functools
import os
import platform

#: Values of ``ONEDNN_MAX_CPU_ISA`` that do not limit oneDNN.
_NO_ISA_LIMIT = ("", "ALL", "DEFAULT")


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """``(model name, flags)`` of the first CPU in ``/proc/cpuinfo`` (empty off Linux)."""
    name, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    return name or platform.processor(), flags


def cpu_model_name() -> str:
    """The CPU's model name, e.g. ``"AMD EPYC"`` or ``"Intel(R) Xeon(R) Platinum 8488C"``."""
    return _cpuinfo()[0]


def cpu_flags() -> frozenset[str]:
    """The CPU's ISA flags as Linux lists them (``avx2``, ``avx512_vnni``, ``amx_int8``, ...)."""
    return _cpuinfo()[1]


def onednn_isa_limit() -> str:
    """oneDNN's ISA limit from ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``); ``""`` if unset."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()


def has_amx_int8() -> bool:
    """Whether oneDNN can use AMX-INT8 tiles here: the CPU has them and no ISA limit forbids them."""
    limit = onednn_isa_limit()
    return "amx_int8" in cpu_flags() and (limit in _NO_ISA_LIMIT or "AMX" in limit)


@functools.cache
def int_mm_is_exact() -> bool:
    """Whether ``torch._int_mm`` returns exact int32 products on this CPU.

    oneDNN's s8 x s8 GEMM is exact with VNNI or AMX. Without them (AVX2, AVX-512 without VNNI,
    or ``ONEDNN_MAX_CPU_ISA`` below VNNI) it adds 128 to one operand and sums u8 x s8 pairs in
    saturating int16 (``vpmaddubsw``), which returns wrong integers for large codes: a probe on
    a few shapes, run once per process, tells."""
    import torch

    gen = torch.Generator().manual_seed(0)
    for m in (1, 21, 64):
        a = torch.randint(-127, 128, (m, 128), dtype=torch.int8, generator=gen)
        b = torch.randint(-127, 128, (128, 48), dtype=torch.int8, generator=gen)
        a[0], b[:, 0] = 127, -127
        if not torch.equal(torch._int_mm(a, b), (a.long() @ b.long()).int()):
            return False
    return True


def torch_cpu_capability() -> str:
    """The vector ISA torch's own kernels dispatch to (``"AVX512"``, ``"AVX2"``, ``"DEFAULT"``, ...)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def kernel_march() -> str:
    """The ``-march`` target of the C++ kernels: the CPU itself, unless torch was told to run a
    lower ISA (``ATEN_CPU_CAPABILITY``) than the CPU has; then that ISA level, so that an
    emulated AVX2 machine also runs AVX2 kernels."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return "native"
    capability = torch_cpu_capability()
    flags = cpu_flags()
    if capability == "AVX2" and "avx512f" in flags:
        return "x86-64-v3"
    if capability == "DEFAULT" and "avx2" in flags:
        return "x86-64-v2"
    return "native"


def describe() -> dict:
    """A summary for ``qeq-info``: CPU model, vector ISA, AMX, oneDNN limit, kernel target."""
    flags = cpu_flags()
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
           if f in flags]
    return {"cpu": cpu_model_name(), "isa_flags": isa, "torch_capability": torch_cpu_capability(),
            "onednn_isa_limit": onednn_isa_limit() or "none", "amx_int8_usable": has_amx_int8(),
            "int_mm_exact": int_mm_is_exact(),
            "kernel_march": kernel_march()}
