"""The edge_filter architecture option (issue #17's lever): neighbour tokens filtered by their
edge features. Physics of the reference layer with it, its default-off compatibility, and the
export rule (reference yes, fused operators refused with a clear error)."""

import dataclasses

import pytest
import torch
from ase.build import molecule

from conftest import (assert_conservative_and_translation_invariant,
                      assert_reference_export_only, energy, make_potential, system_tensors)
from transip_md.model import TransIPPotential, named_config
from transip_md.model.config import ModelConfig


def filtered_potential(seed=0, scale_filter=0.5):
    cfg = dataclasses.replace(named_config("tiny"), edge_filter=True)
    pot = make_potential(seed=seed, edge_filter=True)
    with torch.no_grad():  # the filter starts at zero; give it weight so that it acts
        for layer in pot.network.layers:
            layer.filter.weight.normal_(0.0, scale_filter)
            layer.filter.bias.normal_(0.0, scale_filter)
    return pot.eval(), cfg


def test_config_option_is_absent_at_its_default():
    plain = named_config("tiny").to_dict()
    assert "edge_filter" not in plain and ModelConfig.from_dict(plain).edge_filter is False
    on = dataclasses.replace(named_config("tiny"), edge_filter=True).to_dict()
    assert on["edge_filter"] is True and ModelConfig.from_dict(on).edge_filter is True
    # a plain layer has no filter parameters: old state dicts load unchanged
    keys = TransIPPotential(named_config("tiny")).state_dict().keys()
    assert not any(".filter." in k for k in keys)


def test_zero_filter_is_the_plain_layer_and_a_trained_one_is_not():
    pot, cfg = filtered_potential()
    torch.manual_seed(3)
    plain = TransIPPotential(named_config("tiny")).to(torch.float64)
    state = {k: v for k, v in pot.state_dict().items() if ".filter." not in k}
    plain.load_state_dict(state)
    plain.eval()
    atoms = molecule("CH3CH2OH")
    pos, z, cell, pbc = system_tensors(atoms)
    e_filtered = energy(pot, pos, z, cell, pbc)
    assert abs(e_filtered - energy(plain, pos, z, cell, pbc)) > 1e-4
    with torch.no_grad():
        for layer in pot.network.layers:
            layer.filter.weight.zero_()
            layer.filter.bias.zero_()
    assert energy(pot, pos, z, cell, pbc) == pytest.approx(energy(plain, pos, z, cell, pbc),
                                                          rel=1e-14)


def test_filtered_forces_are_minus_energy_gradient_and_translation_invariant():
    pot, _ = filtered_potential()
    assert_conservative_and_translation_invariant(pot, molecule("CH3CH2OH"))


def test_export_reference_matches_and_fused_kernels_are_refused(tmp_path):
    pot, cfg = filtered_potential()
    assert_reference_export_only(pot, cfg, tmp_path, molecule("CH3CH2OH"), "edge_filter")
