"""The rotary_keys architecture option (issue #17's lever "rotary encodings of relative positions
inside the local attention"): token keys rotated by r_ij. Physics of the reference layer with it,
its default-off compatibility, the paths that carry the edge tensor (halo entry points, low-memory
gradients, the exported file) and the export rule (fused operators refused)."""

import dataclasses

import numpy as np
import pytest
import torch
from ase.build import molecule

from conftest import (ONE, ZERO, assert_conservative_and_translation_invariant,
                      assert_reference_export_only, energy, make_potential,
                      system_tensors)
from transip_md.model import named_config
from transip_md.model.config import ModelConfig
from transip_md.systems import water_box


def rotary_potential(seed=0, rotary=True):
    pot = make_potential(seed=seed, rotary_keys=rotary)
    return pot, dataclasses.replace(named_config("tiny"), rotary_keys=rotary)


def test_config_option_is_absent_at_its_default_and_needs_even_heads():
    plain = named_config("tiny").to_dict()
    assert "rotary_keys" not in plain and ModelConfig.from_dict(plain).rotary_keys is False
    on = dataclasses.replace(named_config("tiny"), rotary_keys=True).to_dict()
    assert on["rotary_keys"] is True and ModelConfig.from_dict(on).rotary_keys is True
    with pytest.raises(ValueError, match="rotary_keys needs an even head width, got 3"):
        ModelConfig(width=12, heads=4, rotary_keys=True)
    # no new parameters: a plain model's state dict loads into a rotary one and back
    rot, _ = rotary_potential()
    plain_pot, _ = rotary_potential(rotary=False)
    assert rot.state_dict().keys() == plain_pot.state_dict().keys()


def test_rotary_changes_the_function_and_depends_on_the_relative_position_only():
    rot, _ = rotary_potential()
    plain, _ = rotary_potential(rotary=False)
    plain.load_state_dict(rot.state_dict())
    atoms = molecule("CH3CH2OH")
    pos, z, cell, pbc = system_tensors(atoms)
    e_rot = energy(rot, pos, z, cell, pbc)
    assert abs(e_rot - energy(plain, pos, z, cell, pbc)) > 1e-4
    shifted = energy(rot, pos + torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64), z, cell, pbc)
    assert shifted == pytest.approx(e_rot, rel=1e-12)
    # the keys turn with r_ij, so the model is not rotation invariant by construction
    rz = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert abs(energy(rot, pos @ rz.T, z, cell, pbc) - e_rot) > 1e-6


def test_rotary_forces_are_minus_energy_gradient_and_translation_invariant():
    pot, _ = rotary_potential()
    assert_conservative_and_translation_invariant(pot, molecule("CH3CH2OH"))


def test_periodic_low_memory_and_halo_paths_give_the_same_answer():
    """The edge tensor carries r_ij to the layers; every path that passes it through (low-memory
    gradients, the halo entry points an engine calls) must give compute()'s numbers."""
    pot, _ = rotary_potential()
    atoms = water_box(8, seed=1)
    pos, z, cell, pbc = system_tensors(atoms)
    ref = pot.compute(pos, z, cell, pbc, ZERO, ONE, True, False)
    pot.low_memory = True
    low = pot.compute(pos, z, cell, pbc, ZERO, ONE, True, False)
    pot.low_memory = False
    assert float(low["energy"]) == pytest.approx(float(ref["energy"]), rel=1e-12)
    np.testing.assert_allclose(low["forces"].numpy(), ref["forces"].numpy(), atol=1e-11)
    # halo on one "rank" of a cluster: every atom local, the engine's pairs all pairs
    mol = molecule("CH3CH2OH")
    mpos, mz, mcell, mpbc = system_tensors(mol)
    n = len(mol)
    i, j = [t.flatten() for t in torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")]
    keep = i != j
    leaf = mpos.clone().requires_grad_(True)
    nbr_index, edge, envelope = pot.halo_edges(leaf, mz, i[keep], j[keep], n, ZERO, ONE)
    assert edge.shape[-1] == pot.network.layers[0].edge_width + 3
    h = pot.halo_embed(mz, ZERO, ONE)
    for layer in range(pot.num_layers):
        h = pot.halo_layer(layer, h, nbr_index, edge, envelope)
    e_halo = pot.halo_readout(h, mz).sum()
    (grad,) = torch.autograd.grad(e_halo, leaf)
    ref_mol = pot.compute(mpos, mz, mcell, mpbc, ZERO, ONE, True, False)
    assert float(e_halo.detach()) == pytest.approx(float(ref_mol["energy"]), rel=1e-12)
    np.testing.assert_allclose(-grad.numpy(), ref_mol["forces"].numpy(), atol=1e-11)


def test_export_reference_matches_and_fused_kernels_are_refused(tmp_path):
    pot, cfg = rotary_potential()
    assert_reference_export_only(pot, cfg, tmp_path, water_box(8, seed=2), "rotary_keys")
