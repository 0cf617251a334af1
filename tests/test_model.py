"""Physics of the network: symmetry, forces = -grad E, smooth cutoff, save/load."""

from pathlib import Path

import numpy as np
import pytest
import torch

from qeq_ase.io.checkpoint import PotentialFileError, load_potential_file, save_potential, unpack_state_dict
from qeq_ase.data.dataset import load_rmd17
from qeq_ase.model.network import ModelConfig, QEqModel
from qeq_ase.testing import assert_equivariant, assert_forces_match_finite_differences, predict, tiny_model

RMD17_DIR = Path(__file__).resolve().parents[2] / "shared" / "rmd17"


@pytest.fixture(scope="module")
def aspirin():
    path = RMD17_DIR / "rmd17_aspirin_test_01.npz"
    if not path.is_file():
        pytest.skip(f"rMD17 data not found at {RMD17_DIR}")
    frames = load_rmd17(path)
    return frames.numbers, frames.positions[:3]


VARIANTS = {
    "cosine-softmax": {},
    "dot-softmax": {"attention_normalization": False},
    "cosine-silu+neighbour-embedding": {"attention_activation": "silu", "neighbor_embedding": True},
    "dot-silu": {"attention_normalization": False, "attention_activation": "silu"},
    "no-feed-forward": {"feed_forward": False, "neighbor_embedding": True},
    "expnorm-basis": {"radial_basis": "expnorm", "neighbor_embedding": True},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_rotation_translation_and_permutation_symmetry_float64(aspirin, variant):
    """Energy invariant, forces equivariant to 1e-10 (TOLERANCES["float64"]) under three Haar-random
    float64 rotations per frame, translations up to 12 Å and a permutation of the atoms."""
    model = tiny_model(**VARIANTS[variant])
    numbers, frames = aspirin
    for seed, positions in enumerate(frames):
        assert_equivariant(model, (numbers, positions), rotations=3, translation_A=12.0, seed=seed)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forces_are_minus_energy_gradient(aspirin, variant):
    model = tiny_model(**VARIANTS[variant])
    numbers, frames = aspirin
    assert_forces_match_finite_differences(model, (numbers, frames[0]), components=[(0, 0), (5, 1), (12, 2), (20, 0)])


@pytest.mark.parametrize("variant", VARIANTS)
def test_energy_and_forces_are_smooth_at_the_cutoff(variant):
    """A pair moved through the cutoff: energy and force approach their far-apart values continuously."""
    model = tiny_model(**VARIANTS[variant])
    numbers = np.array([6, 8])
    cutoff = model.config.cutoff
    far_energy, _ = predict(model, numbers, np.array([[0.0, 0, 0], [cutoff + 1.0, 0, 0]]))
    for gap in [1e-2, 1e-3, 1e-4]:
        energy, forces = predict(model, numbers, np.array([[0.0, 0, 0], [cutoff - gap, 0, 0]]))
        assert abs(energy - far_energy) < 50 * gap ** 2  # envelope ~ (r_c - r)^2
        assert np.abs(forces).max() < 50 * gap
    energy_out, forces_out = predict(model, numbers, np.array([[0.0, 0, 0], [cutoff + 1e-4, 0, 0]]))
    assert energy_out == far_energy and np.abs(forces_out).max() == 0.0


def test_neighbour_embedding_equals_its_per_edge_sum():
    """The per-node sums of NeighborEmbedding give sum_j C(r_ij) R(r_ij) * e'(z_j), edge by edge."""
    model = tiny_model(neighbor_embedding=True)
    embedding = model.neighbor_embedding
    generator = torch.Generator().manual_seed(3)
    num_nodes, num_edges = 30, 200
    species = torch.randint(0, 3, (num_nodes,), generator=generator)
    edge_index = torch.randint(0, num_nodes, (2, num_edges), generator=generator)
    basis = torch.randn(num_edges, 8, dtype=torch.float64, generator=generator)
    envelope = torch.rand(num_edges, dtype=torch.float64, generator=generator)
    s = torch.randn(num_nodes, 16, dtype=torch.float64, generator=generator)
    per_edge = embedding.radial(basis) * envelope[:, None] * embedding.embedding(species[edge_index[0]])
    neighbors = torch.zeros(num_nodes, 16, dtype=torch.float64).index_add_(0, edge_index[1], per_edge)
    expected = embedding.combine(embedding.combine_in(torch.cat([s, neighbors], dim=-1)))
    torch.testing.assert_close(embedding(s, species, edge_index, basis, envelope), expected, rtol=1e-12, atol=1e-12)


def test_unknown_radial_basis_is_refused():
    with pytest.raises(ValueError, match="radial_basis"):
        tiny_model(radial_basis="gaussian")


def test_isolated_atom_and_empty_neighbourhood_are_finite():
    model = tiny_model()
    energy, forces = predict(model, np.array([8]), np.zeros((1, 3)))
    assert np.isfinite(energy) and np.all(forces == 0.0)


def test_attention_logits_are_bounded_by_temperature():
    model = tiny_model(attention_normalization=True)
    layer = model.layers[0]
    q = torch.randn(50, 2, 8, dtype=torch.float64) * 1e3
    k = torch.randn(50, 2, 8, dtype=torch.float64) * 1e3
    bound = layer.log_inv_temperature.exp().max().item()
    assert layer.attention_logits(q, k).abs().max().item() <= bound + 1e-9
    unnormalized = tiny_model(attention_normalization=False).layers[0].attention_logits(q, k)
    assert unnormalized.abs().max().item() > 1e4


def test_unknown_element_is_named():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"Z=\[7\]"):
        model.species_index(torch.tensor([1, 7, 6]))


def test_save_load_round_trip_gives_identical_outputs(tmp_path, aspirin):
    model = tiny_model(dtype=torch.float32)
    # torch.__version__ is a str subclass that weights_only loading refuses: saved as plain str
    path = save_potential(tmp_path / "tiny.pt", model, {"note": "test", "torch": torch.__version__})
    payload = torch.load(path, weights_only=True)  # safe loading works on the raw file
    assert payload["format_version"] == 2 and payload["metadata"]["species"] == [1, 6, 8]
    loaded, metadata = load_potential_file(path)
    assert metadata["note"] == "test" and metadata["units"]["energy"] == "eV"
    numbers, frames = aspirin
    e0, f0 = predict(model, numbers, frames[0])
    e1, f1 = predict(loaded, numbers, frames[0])
    assert e0 == e1
    np.testing.assert_array_equal(f0, f1)


def test_bad_potential_files_give_clear_errors(tmp_path):
    with pytest.raises(PotentialFileError, match="not found"):
        load_potential_file(tmp_path / "missing.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage")
    with pytest.raises(PotentialFileError, match="corrupt"):
        load_potential_file(tmp_path / "corrupt.pt")
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(PotentialFileError, match="not a qeq-ase potential"):
        load_potential_file(tmp_path / "other.pt")
    path = save_potential(tmp_path / "tiny.pt", tiny_model(dtype=torch.float32), {})
    payload = torch.load(path, weights_only=True)
    payload["model_config"]["num_features"] = 32
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(PotentialFileError, match="does not match"):
        load_potential_file(tmp_path / "mismatch.pt")
    payload = torch.load(path, weights_only=True)
    payload["tensors"]["data"]["float32"] = payload["tensors"]["data"]["float32"][:-10]  # truncated weights
    torch.save(payload, tmp_path / "truncated.pt")
    with pytest.raises(PotentialFileError, match="corrupt weights.*runs past"):
        load_potential_file(tmp_path / "truncated.pt")


def test_format_version_1_files_still_load(tmp_path, aspirin):
    """Version 1 stored the plain state dict; potentials written by earlier qeq-ase must keep working."""
    model = tiny_model(dtype=torch.float32)
    payload = torch.load(save_potential(tmp_path / "v2.pt", model, {}), weights_only=True)
    payload["format_version"] = 1
    payload["state_dict"] = unpack_state_dict(payload.pop("tensors"))
    torch.save(payload, tmp_path / "v1.pt")
    loaded, _ = load_potential_file(tmp_path / "v1.pt")
    numbers, frames = aspirin
    assert predict(loaded, numbers, frames[0])[0] == predict(model, numbers, frames[0])[0]


def test_linear_layers_follow_every_weight_update():
    """``W / sqrt(in)`` follows any update of a frozen layer's weight, also those that leave the
    version counter alone (``.data``; on CUDA the EMA update seemed to, docs/training.md)."""
    from qeq_ase.model.layers import ScalarLinear, VectorLinear

    for layer in (ScalarLinear(8, 4), VectorLinear(8, 4)):
        layer.requires_grad_(False)
        first = layer.effective_weight().clone()
        torch.testing.assert_close(first, layer.weight / 8 ** 0.5)
        with torch.no_grad():
            layer.weight.mul_(2.0)  # in place: a new version
        torch.testing.assert_close(layer.effective_weight(), 2 * first)
        layer.weight.data.mul_(0.5)  # no version bump
        torch.testing.assert_close(layer.effective_weight(), first)
        layer.weight.data.mul_(2.0)
        with torch.no_grad():
            torch._foreach_lerp_([layer.weight], [torch.zeros_like(layer.weight)], 0.5)
        torch.testing.assert_close(layer.effective_weight(), first)
        layer.load_state_dict({k: torch.ones_like(v) for k, v in layer.state_dict().items()})
        torch.testing.assert_close(layer.effective_weight(), torch.full((4, 8), 8 ** -0.5))
        layer.double()
        assert layer.effective_weight().dtype == torch.float64
        layer.requires_grad_(True)
        assert layer.effective_weight().requires_grad


def test_potential_files_name_their_architecture(tmp_path, monkeypatch):
    from qeq_ase.model import potential
    from qeq_ase.quant.int8_model import convert_to_int8
    from qeq_ase.quant.qat import calibration, convert_to_qat

    model = tiny_model(dtype=torch.float32)
    path = save_potential(tmp_path / "tiny.pt", model, {})
    payload = torch.load(path, weights_only=True)
    assert payload["architecture"] == "qeq-transformer"
    del payload["architecture"]  # files written before the key existed: the one architecture there was
    torch.save(payload, tmp_path / "unnamed.pt")
    assert type(load_potential_file(tmp_path / "unnamed.pt")[0]) is QEqModel
    payload["architecture"] = "mace"
    torch.save(payload, tmp_path / "mace.pt")
    with pytest.raises(PotentialFileError, match=r"'mace' model; this qeq-ase knows \['qeq-transformer'\]"):
        load_potential_file(tmp_path / "mace.pt")

    class Variant(QEqModel):  # a new architecture plugs in by registering its config and model classes
        architecture = "qeq-transformer-variant"

    monkeypatch.setattr(potential, "ARCHITECTURES", dict(potential.ARCHITECTURES))
    potential.register_architecture(ModelConfig, Variant)
    variant = Variant(model.config)
    variant.load_state_dict(model.state_dict())
    loaded, _ = load_potential_file(save_potential(tmp_path / "variant.pt", variant, {}))
    assert type(loaded) is Variant and isinstance(loaded, potential.Potential)

    # ... and QAT, the INT8 converter and the loader build that architecture, not QEqModel
    qat = convert_to_qat(variant, "full")
    with calibration(qat):
        predict(qat, np.array([6, 1, 8]), np.array([[0.0, 0, 0], [1.1, 0, 0], [0, 1.2, 0.1]]))
    int8 = convert_to_int8(qat, backend="eager")
    assert type(qat) is Variant and type(int8) is Variant
    loaded, meta = load_potential_file(save_potential(tmp_path / "variant_int8.pt", int8, {}, precision="int8"))
    assert type(loaded) is Variant and meta["quantization"]["scheme"] == "full"
