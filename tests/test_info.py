"""``qeq-info``: what a potential runs on this CPU."""

import json

import pytest

from qeq_ase.cli import info
from qeq_ase.quant import int8_kernels
from qeq_ase.kernels.cpu_features import cpu_model_name


def test_machine_report_names_the_cpu_the_gemm_and_the_kernels(capsys):
    assert info.main([]) == 0
    text = capsys.readouterr().out
    assert cpu_model_name() in text
    assert info.gemm_name(int8_kernels.resolve_gemm("auto")) in text
    for name in ("qeq_int8_kernels", "qeq_edge_attention", "qeq_node_update"):
        assert name in text


def test_potential_report_says_what_the_int8_potential_runs_here(capsys):
    assert info.main(["aspirin_int8", "--json", "--build"]) == 0
    report = json.loads(capsys.readouterr().out)
    row, machine = report["potentials"][0], report["machine"]
    assert row["precision"] == "int8" and row["activation_limbs"] == 2
    assert row["int8_gemm"] == info.gemm_name(machine["int8_gemm"])
    assert row["edge_messages"].startswith("fused C++")
    assert all(state == "loaded" for state in machine["kernels"].values())  # --build built and loaded them


def test_unknown_potential_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        info.main(["aspirin_fp33"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown potential 'aspirin_fp33'" in err and err.count("\n") == 1
