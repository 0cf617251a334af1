"""CPU detection: AMX only where oneDNN may use it, and kernels compiled for torch's ISA level."""

import pytest

from qeq_ase.kernels import cpu_features


@pytest.fixture
def amx_cpu(monkeypatch):
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "amx_int8"}))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)


@pytest.mark.parametrize("limit, usable", [(None, True), ("ALL", True), ("avx512_core_amx", True),
                                           ("AVX512_CORE_VNNI", False), ("AVX2", False)])
def test_onednn_isa_limit_decides_whether_amx_is_usable(amx_cpu, monkeypatch, limit, usable):
    if limit is not None:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", limit)
    assert cpu_features.has_amx_int8() is usable


def test_no_amx_without_the_cpu_flag(monkeypatch):
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_vnni"}))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert not cpu_features.has_amx_int8()


@pytest.mark.parametrize("capability, flags, march", [
    ("AVX512", {"avx2", "avx512f"}, "native"),
    ("AVX2", {"avx2", "avx512f"}, "x86-64-v3"),  # ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU
    ("AVX2", {"avx2"}, "native"),  # a real AVX2 CPU
    ("DEFAULT", {"avx2"}, "x86-64-v2"),
])
def test_kernels_are_compiled_for_the_isa_torch_runs(monkeypatch, capability, flags, march):
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_features, "torch_cpu_capability", lambda: capability)
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset(flags))
    assert cpu_features.kernel_march() == march


def test_describe_names_the_cpu_and_its_isa():
    info = cpu_features.describe()
    assert set(info) == {"cpu", "isa_flags", "torch_capability", "onednn_isa_limit", "amx_int8_usable",
                         "int_mm_exact", "kernel_march"}
    assert info["amx_int8_usable"] == cpu_features.has_amx_int8()


def test_int8_products_are_exact_on_this_cpu_whichever_gemm_runs():
    """``int8_kernels.int_mm`` is exact here: ``torch._int_mm`` where the probe found it exact,
    else a float GEMM (also beyond the width where float32 would round)."""
    import torch

    from qeq_ase.quant.int8_kernels import EXACT_FLOAT_K, int_mm

    gen = torch.Generator().manual_seed(1)
    for m, k, n in ((1, 32, 17), (21, 128, 128), (300, 512, 64), (5, EXACT_FLOAT_K + 60, 8)):
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)
        b = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=gen)
        a[0], b[:, 0] = 127, 127
        assert torch.equal(int_mm(a, b), (a.long() @ b.long()).int())
