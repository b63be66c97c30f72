"""The static-shape path behind ``cuda_graphs=True``: same energy and forces as the dynamic one.

CUDA-graph capture itself needs the CUDA platform (tested on the GPU machine, skipped here);
on Reference/CPU the property is ignored, so these tests check the static path's physics.
"""

import numpy as np
import pytest
import torch

from conftest import make_potential
from openmm_helpers import context_for, energy_forces, platform_or_none, positions_nm, reference, relative, system_with
from transip_md.export import export_potential
from transip_md.systems import water_box
from transip_openmm import make_torch_force


@pytest.fixture(scope="module")
def model64(tmp_path_factory):
    path = tmp_path_factory.mktemp("static") / "m64.pt"
    export_potential(make_potential(), path, dtype="float64")
    return path


@pytest.mark.parametrize("platform_name", ["Reference", "CPU", "CUDA"])
@pytest.mark.parametrize("triclinic", [False, True])
def test_static_path_equals_model(model64, platform_name, triclinic):
    platform = platform_or_none(platform_name)
    if platform is None:
        pytest.skip(f"OpenMM platform {platform_name} is not installed here")
    atoms = water_box(27, seed=3, triclinic=triclinic)
    elements = list(atoms.get_chemical_symbols())
    force = make_torch_force(str(model64), elements, periodic=True, box_vectors=atoms.cell.array / 10,
                             cuda_graphs=True)
    assert force.getProperties()["useCUDAGraphs"] == "true"
    context = context_for(system_with(force, atoms), positions_nm(atoms), platform)
    energy, forces = energy_forces(context)
    e_ref, f_ref = reference(torch.jit.load(str(model64)), atoms)
    assert abs(energy - e_ref) <= 1e-9 * abs(e_ref)
    assert relative(forces, f_ref) <= 1e-9


def test_static_path_refuses_small_boxes_and_bad_capacity(model64):
    atoms = water_box(8, seed=1)  # 6.2 Å box < 2 x 4 Å cutoff
    with pytest.raises(ValueError, match="twice"):
        make_torch_force(str(model64), list(atoms.get_chemical_symbols()), periodic=True,
                         box_vectors=atoms.cell.array / 10, cuda_graphs=True)
    big = water_box(27, seed=1)
    with pytest.raises(ValueError, match="neighbor_capacity"):
        make_torch_force(str(model64), list(big.get_chemical_symbols()), periodic=True,
                         box_vectors=big.cell.array / 10, cuda_graphs=True, neighbor_capacity=0)


def test_static_path_overflow_gives_nan_not_wrong_forces(model64):
    atoms = water_box(27, seed=3)
    force = make_torch_force(str(model64), list(atoms.get_chemical_symbols()), periodic=True,
                             box_vectors=atoms.cell.array / 10, cuda_graphs=True, neighbor_capacity=4)
    context = context_for(system_with(force, atoms), positions_nm(atoms),
                          platform_or_none("Reference"))
    energy, _ = energy_forces(context)
    assert np.isnan(energy)
