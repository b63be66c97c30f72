"""The static-shape O(N) cell list of ``energy_static`` (CUDA-graph path): exact, NaN on overflow.

CPU, float64, a small random-weight model: ``energy_static`` must give the dynamic path's energy
and forces (the network is the same; only the neighbour search differs) whenever no capacity is
exceeded, and NaN -- never a wrong finite number -- when one is.
"""

import math

import numpy as np
import pytest
import torch
from ase.build import molecule

from conftest import make_potential
from transip_md.model.static_shapes import (StaticNeighborPlan, StaticPlanBinding,
                                            perpendicular_widths, plan_static_neighbors,
                                            supports_cell_list)
from transip_md.systems import water_box

CUTOFF = 4.0  # the "tiny" model's


@pytest.fixture(scope="module")
def eager():
    return make_potential()


@pytest.fixture(scope="module")
def scripted():
    return torch.jit.script(make_potential())


def inputs(atoms):
    return (torch.tensor(atoms.positions, dtype=torch.float64),
            torch.tensor(atoms.numbers, dtype=torch.long),
            torch.tensor(np.asarray(atoms.cell), dtype=torch.float64),
            torch.tensor(atoms.pbc, dtype=torch.bool),
            torch.tensor(0), torch.tensor(1))


def dynamic(model, atoms):
    positions, *rest = inputs(atoms)
    positions.requires_grad_(True)
    energy = model.energy(positions, *rest)
    (grad,) = torch.autograd.grad(energy, positions)
    return float(energy.detach()), -grad.numpy()


def static(model, atoms, args):
    """(energy, forces) of energy_static with ``args`` = (capacity, cell_capacity, *grid)."""
    positions, *rest = inputs(atoms)
    positions.requires_grad_(True)
    energy = model.energy_static(positions, *rest, *args)
    (grad,) = torch.autograd.grad(energy, positions)
    return float(energy.detach()), -grad.numpy()


def assert_nan(model, atoms, args):
    """NaN energy *and* forces: an engine moves atoms by the forces, so they must stop it too."""
    energy, forces = static(model, atoms, args)
    assert math.isnan(energy)
    assert np.isnan(forces).all()


def assert_same(model, atoms, args):
    e_ref, f_ref = dynamic(model, atoms)
    e, f = static(model, atoms, args)
    assert abs(e - e_ref) <= 1e-10 * abs(e_ref), (e, e_ref)
    assert np.abs(f - f_ref).max() <= 1e-10 * np.abs(f_ref).max()


def plan_for(atoms, **kw):
    periodic = bool(atoms.pbc.all())
    return plan_static_neighbors(len(atoms), CUTOFF, np.asarray(atoms.cell) if periodic else None,
                                 periodic, **kw)


def cell_occupancy(atoms, grid):
    """Largest number of atoms in one cell of a periodic ``grid`` (numpy, independent)."""
    frac = atoms.get_scaled_positions(wrap=True)
    index = np.minimum(np.floor(frac * grid).astype(int), np.array(grid) - 1)
    flat = (index[:, 0] * grid[1] + index[:, 1]) * grid[2] + index[:, 2]
    return int(np.bincount(flat).max())


def max_neighbors(atoms):
    distances = atoms.get_all_distances(mic=bool(atoms.pbc.any()))
    return int(((distances < CUTOFF).sum(axis=1) - 1).max())


def in_vacuum(atoms):
    atoms = atoms.copy()
    atoms.pbc = False
    atoms.cell = np.zeros((3, 3))
    return atoms


# ----------------------------------------------------------------------------- exactness
def test_periodic_192_atoms_three_cells_per_axis(eager):
    atoms = water_box(64, seed=2)  # 12.4 Å box: 3 cells of 4.1 Å >= cutoff
    assert_same(eager, atoms, (60, 40, 3, 3, 3))


def test_periodic_1536_atoms_default_plan(eager):
    atoms = water_box(512, seed=3)
    plan = plan_for(atoms)
    assert plan.uses_cell_list and min(plan.grid) >= 3
    assert_same(eager, atoms, plan.arguments())


def test_triclinic_box(eager):
    atoms = water_box(343, seed=4, triclinic=True)
    plan = plan_for(atoms)
    assert plan.uses_cell_list
    assert_same(eager, atoms, plan.arguments())


def test_non_cubic_grid(eager):
    atoms = water_box(512, seed=5)
    atoms = atoms.repeat((1, 1, 2))  # 24.8 x 24.8 x 49.6 Å
    plan = plan_for(atoms)
    assert plan.grid[2] > plan.grid[0]
    assert_same(eager, atoms, plan.arguments())


def test_molecule_in_vacuum(eager):
    atoms = molecule("CH3CH2OH")
    n = len(atoms)
    for grid in ((1, 1, 1), (2, 2, 2), (3, 1, 2)):
        assert_same(eager, atoms, (n - 1, n, *grid))


def test_cluster_in_vacuum_default_plan(eager):
    atoms = in_vacuum(water_box(512, seed=6))
    plan = plan_for(atoms)
    assert plan.uses_cell_list
    assert_same(eager, atoms, plan.arguments())


def test_slab_periodic_in_two_axes(eager):
    atoms = water_box(512, seed=7)
    atoms.pbc = (True, True, False)
    assert_same(eager, atoms, (60, 40, 6, 6, 3))


def test_all_pairs_path_unchanged(eager):
    atoms = water_box(27, seed=3)
    assert_same(eager, atoms, (60,))
    assert_same(eager, atoms, (60, 0, 0, 0, 0))
    assert_nan(eager, atoms, (4,))  # its overflow now makes the forces NaN as well


def test_scripted_equals_eager(eager, scripted):
    for atoms, args in ((water_box(512, seed=3), None), (molecule("CH3CH2OH"), (8, 9, 2, 2, 2)),
                        (water_box(27, seed=1), (40,))):
        args = args or plan_for(atoms).arguments()
        e_eager, f_eager = static(eager, atoms, args)
        e_script, f_script = static(scripted, atoms, args)
        assert abs(e_script - e_eager) <= 1e-12 * abs(e_eager)
        assert np.abs(f_script - f_eager).max() <= 1e-10 * np.abs(f_eager).max()


# ----------------------------------------------------------------------------- overflow -> NaN
def test_cell_capacity_at_the_limit_is_exact_below_it_nan(eager):
    atoms = water_box(512, seed=3)
    plan = plan_for(atoms)
    fullest = cell_occupancy(atoms, plan.grid)
    assert_same(eager, atoms, (plan.neighbor_capacity, fullest, *plan.grid))
    assert_nan(eager, atoms, (plan.neighbor_capacity, fullest - 1, *plan.grid))


def test_neighbor_capacity_at_the_limit_is_exact_below_it_nan(eager):
    atoms = water_box(512, seed=3)
    plan = plan_for(atoms)
    most = max_neighbors(atoms)
    assert_same(eager, atoms, (most, plan.cell_capacity, *plan.grid))
    assert_nan(eager, atoms, (most - 1, plan.cell_capacity, *plan.grid))


def test_vacuum_cell_overflow_is_nan(eager):
    atoms = molecule("CH3CH2OH")
    assert_nan(eager, atoms, (8, 2, 1, 1, 1))


def test_box_shrunk_below_the_cell_width_is_nan(eager):
    atoms = water_box(512, seed=3)
    plan = plan_for(atoms)  # grid sized for 5 % compression
    width = perpendicular_widths(np.asarray(atoms.cell)).min() / max(plan.grid)
    slightly = atoms.copy()
    slightly.set_cell(atoms.cell * 0.97, scale_atoms=True)
    assert_same(eager, slightly, plan.arguments())  # within the tolerance: exact
    squeezed = atoms.copy()
    factor = 0.99 * CUTOFF / width  # cells now 1 % thinner than the cutoff
    squeezed.set_cell(atoms.cell * factor, scale_atoms=True)
    assert_nan(eager, squeezed, plan.arguments())


def test_fewer_than_three_periodic_cells_is_nan(eager):
    atoms = water_box(64, seed=2)
    assert_nan(eager, atoms, (60, 192, 2, 3, 3))


def test_bad_ints_are_refused(eager):
    atoms = water_box(64, seed=2)
    with pytest.raises(Exception, match="capacity"):
        static(eager, atoms, (0, 40, 3, 3, 3))
    with pytest.raises(Exception, match="grid"):
        static(eager, atoms, (60, 40, 0, 3, 3))


# ----------------------------------------------------------------------------- planning
def test_plan_chooses_all_pairs_for_small_systems_and_cells_for_large():
    small = water_box(64, seed=0)
    assert not plan_for(small).uses_cell_list
    assert plan_for(small).neighbor_capacity == math.ceil(
        1.5 * len(small) / small.get_volume() * 4 / 3 * math.pi * CUTOFF ** 3)
    large = plan_for(water_box(512, seed=0))
    assert large.uses_cell_list
    assert 27 * large.cell_capacity < 1536 - 1
    mean = 1536 / np.prod(large.grid)
    assert large.cell_capacity == math.ceil(1.5 * mean + 3.0 * math.sqrt(mean))
    # vacuum: all pairs keep every atom (no overflow possible) ...
    assert plan_for(molecule("CH3CH2OH")) == StaticNeighborPlan(8)
    # ... a requested cell capacity selects the cell list wherever the grid allows one
    forced = plan_for(small, cell_capacity=50)
    assert forced.uses_cell_list is False  # 12.4 Å * 0.95 / 4 Å < 3 cells: impossible
    assert plan_for(water_box(125, seed=0), cell_capacity=50).uses_cell_list


def test_plan_refuses_bad_requests():
    atoms = water_box(8, seed=1)  # 6.2 Å box < 2 x cutoff
    with pytest.raises(ValueError, match="twice"):
        plan_for(atoms)
    big = water_box(27, seed=1)
    for bad in (0, len(big), 2.5, True):
        with pytest.raises(ValueError, match="neighbor_capacity"):
            plan_for(big, neighbor_capacity=bad)
    with pytest.raises(ValueError, match="cell_capacity"):
        plan_for(big, cell_capacity=0)


class _AllPairsOnly(torch.nn.Module):
    """The signature of files exported before the cell list."""

    @torch.jit.export
    def energy_static(self, positions: torch.Tensor, numbers: torch.Tensor, cell: torch.Tensor,
                      pbc: torch.Tensor, charge: torch.Tensor, spin: torch.Tensor,
                      capacity: int) -> torch.Tensor:
        return positions.sum()

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return positions


def test_supports_cell_list(eager, scripted):
    assert supports_cell_list(eager)
    assert supports_cell_list(scripted)
    assert not supports_cell_list(torch.jit.script(_AllPairsOnly()))
    assert not supports_cell_list(object())


def test_binding_passes_the_plan(eager):
    atoms = water_box(512, seed=3)
    plan = plan_for(atoms)
    bound = torch.jit.script(StaticPlanBinding(torch.jit.script(make_potential()), plan))
    positions, *rest = inputs(atoms)
    with torch.no_grad():
        via_binding = float(bound.energy_static(positions, *rest, plan.neighbor_capacity))
        direct = float(eager.energy_static(positions, *rest, *plan.arguments()))
        passed_through = float(bound.energy(positions, *rest))
    assert abs(via_binding - direct) <= 1e-12 * abs(direct)
    assert abs(passed_through - direct) <= 1e-10 * abs(direct)


# ----------------------------------------------------------------------------- no host sync
#: TorchScript ops that wait for the device, copy host data to it, or have data-dependent shapes.
_SYNCING = {"aten::item", "aten::nonzero", "aten::masked_select", "aten::bincount",
            "aten::unique", "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim",
            "aten::linalg_inv", "aten::tolist", "aten::is_nonzero", "aten::cpu", "aten::tensor",
            "aten::index", "aten::index_put_", "aten::masked_fill_", "aten::_local_scalar_dense"}
#: Conversions that sync when their input is a tensor.
_TENSOR_TO_SCALAR = {"aten::Int", "aten::Float", "aten::Bool", "aten::ScalarImplicit",
                     "aten::IntImplicit", "aten::FloatImplicit"}


def _nodes(block):
    for node in block.nodes():
        yield node
        for inner in node.blocks():
            yield from _nodes(inner)


def test_energy_static_graph_has_no_host_synchronisation(scripted):
    graph = scripted.energy_static.graph.copy()
    torch._C._jit_pass_inline(graph)
    bad = []
    for node in _nodes(graph):
        kind = node.kind()
        tensor_input = any(isinstance(v.type(), torch._C.TensorType) for v in node.inputs())
        if kind in _SYNCING or (kind in _TENSOR_TO_SCALAR and tensor_input):
            bad.append(f"{kind}: {node.sourceRange()}")
        if kind == "prim::If":  # a branch on a tensor value needs it on the host
            assert not isinstance(next(node.inputs()).type(), torch._C.TensorType)
    assert bad == [], "\n".join(bad)


def _cuda_graph_energy_forces(model, atoms, args):
    """Warm up, capture energy + autograd forces in a CUDA graph, replay; host syncs inside
    any of it raise (torch's sync debug mode)."""
    device = torch.device("cuda")
    positions, numbers, cell, pbc, charge, spin = [t.to(device) for t in inputs(atoms)]
    positions.requires_grad_(True)

    def step():
        energy = model.energy_static(positions, numbers, cell, pbc, charge, spin, *args)
        (grad,) = torch.autograd.grad(energy, positions)
        return energy, grad

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up (TorchScript profiling runs) outside the capture
                step()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph, stream=stream):
            energy, grad = step()
        graph.replay()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return float(energy), -grad.cpu().numpy()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA GPU")
@pytest.mark.parametrize("n_molecules", [64, 512])  # all pairs, cell list
def test_cuda_graph_capture_and_replay(n_molecules):
    model = torch.jit.script(make_potential().cuda())
    atoms = water_box(n_molecules, seed=3)
    plan = plan_for(atoms)
    assert plan.uses_cell_list == (n_molecules == 512)
    energy, forces = _cuda_graph_energy_forces(model, atoms, plan.arguments())
    e_ref, f_ref = dynamic(make_potential(), atoms)
    assert abs(energy - e_ref) <= 1e-10 * abs(e_ref)
    assert np.abs(forces - f_ref).max() <= 1e-9 * np.abs(f_ref).max()
