"""The static-shape path behind ``cuda_graphs=True``: same energy and forces as the dynamic one.

CUDA-graph capture itself needs the CUDA platform (tested on the GPU machine, skipped here);
on Reference/CPU the property is ignored, so these tests check the static path's physics: the
all-pairs search for small boxes, the O(N) cell list for large ones
(``transip_md.model.static_shapes``; tests/test_static_neighbors.py tests it without OpenMM).
"""

import numpy as np
import openmm
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


# ----------------------------------------------------------------------------- O(N) cell list
def _static_plan(model_path, atoms):
    from transip_openmm.torchforce import _static_capacity

    model = torch.jit.load(str(model_path))
    return _static_capacity(len(atoms), float(model.cutoff), True, atoms.cell.array / 10, None)


@pytest.mark.parametrize("platform_name", ["Reference", "CPU", "CUDA"])
@pytest.mark.parametrize("triclinic", [False, True])
def test_cell_list_path_equals_model(model64, platform_name, triclinic):
    """1,536 / 1,029 atoms: large enough for the cell list, which must equal the dynamic path."""
    platform = platform_or_none(platform_name)
    if platform is None:
        pytest.skip(f"OpenMM platform {platform_name} is not installed here")
    atoms = water_box(343 if triclinic else 512, seed=3, triclinic=triclinic)
    assert _static_plan(model64, atoms).uses_cell_list
    force = make_torch_force(str(model64), list(atoms.get_chemical_symbols()), periodic=True,
                             box_vectors=atoms.cell.array / 10, cuda_graphs=True)
    context = context_for(system_with(force, atoms), positions_nm(atoms), platform)
    energy, forces = energy_forces(context)
    dynamic = make_torch_force(str(model64), list(atoms.get_chemical_symbols()), periodic=True,
                               box_vectors=atoms.cell.array / 10)
    e_dyn, f_dyn = energy_forces(context_for(system_with(dynamic, atoms), positions_nm(atoms),
                                             platform))
    e_ref, f_ref = reference(torch.jit.load(str(model64)), atoms)
    assert abs(energy - e_ref) <= 1e-10 * abs(e_ref)
    assert relative(forces, f_ref) <= 1e-10
    assert abs(energy - e_dyn) <= 1e-10 * abs(e_dyn)
    assert relative(forces, f_dyn) <= 1e-10


@pytest.mark.parametrize("capacities", [{"cell_capacity": 2}, {"neighbor_capacity": 4}])
def test_cell_list_overflow_gives_nan_energy_and_forces(model64, capacities):
    atoms = water_box(512, seed=3)
    force = make_torch_force(str(model64), list(atoms.get_chemical_symbols()), periodic=True,
                             box_vectors=atoms.cell.array / 10, cuda_graphs=True, **capacities)
    context = context_for(system_with(force, atoms), positions_nm(atoms),
                          platform_or_none("Reference"))
    energy, forces = energy_forces(context)
    assert np.isnan(energy)
    assert np.isnan(forces).all()  # the integrator sees NaN too: the run stops, never drifts


def test_cell_list_box_compressed_by_the_barostat_gives_nan(model64):
    """The grid is fixed from the initial box; a box later compressed below its cell width
    (here by setting it on the context, as a barostat would) is caught on the device."""
    atoms = water_box(512, seed=3)
    force = make_torch_force(str(model64), list(atoms.get_chemical_symbols()), periodic=True,
                             box_vectors=atoms.cell.array / 10, cuda_graphs=True)
    context = context_for(system_with(force, atoms), positions_nm(atoms),
                          platform_or_none("Reference"))
    scale = 0.75  # 24.8 Å box, 5 cells of 4.96 Å -> 3.7 Å < 4 Å cutoff
    context.setPeriodicBoxVectors(*[openmm.Vec3(*(row * scale / 10)) for row in atoms.cell.array])
    context.setPositions(positions_nm(atoms) * scale)
    energy, _ = energy_forces(context)
    assert np.isnan(energy)


def test_cell_list_wrapper_survives_freezing(model64):
    """The plan's ints live in a submodule (StaticPlanBinding); the wrapper keeps forward as its
    only method and freezing folds every attribute (see test_openmm_wrappers_survive_freezing)."""
    from transip_md.model.static_shapes import StaticPlanBinding
    from transip_openmm import torchforce

    atoms = water_box(512, seed=3)
    plan = _static_plan(model64, atoms)
    bound = StaticPlanBinding(torch.jit.load(str(model64)), plan)
    scripted = torchforce._script_wrapper(bound, list(atoms.numbers), None, 0, 1, True,
                                          torch.float64, plan.neighbor_capacity, False, False)
    assert scripted._c._method_names() == ["forward"]
    frozen = torch.jit.freeze(scripted.eval())
    assert [n.s("name") for n in frozen.graph.findAllNodes("prim::GetAttr")] == []
    positions = torch.tensor(atoms.positions / 10)
    box = torch.tensor(atoms.cell.array / 10)
    e_ref, _ = reference(torch.jit.load(str(model64)), atoms)
    assert abs(float(frozen(positions, box)) - e_ref) <= 1e-10 * abs(e_ref)


def test_file_without_cell_list_falls_back_to_all_pairs(model64, monkeypatch):
    """A model file exported before the cell list has only the all-pairs energy_static: the
    force still works (O(N^2)) and says how to get the O(N) search."""
    import transip_md.model.static_shapes as static_shapes

    monkeypatch.setattr(static_shapes, "supports_cell_list", lambda model: False)
    atoms = water_box(512, seed=3)
    with pytest.warns(UserWarning, match="predates the static-shape cell list"):
        force = make_torch_force(str(model64), list(atoms.get_chemical_symbols()), periodic=True,
                                 box_vectors=atoms.cell.array / 10, cuda_graphs=True)
    context = context_for(system_with(force, atoms), positions_nm(atoms),
                          platform_or_none("Reference"))
    energy, _ = energy_forces(context)
    e_ref, _ = reference(torch.jit.load(str(model64)), atoms)
    assert abs(energy - e_ref) <= 1e-10 * abs(e_ref)
