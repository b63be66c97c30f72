"""Geometry never goes through the matrix units.

On a GPU, ``v @ cell`` in float32 runs in TF32 (a 10-bit mantissa) once a program allows it
(``torch.backends.cuda.matmul.allow_tf32 = True``, common in training scripts), which rounds
positions by ~0.01 Å in a 30 Å box and ruins forces. Every product of 3-vectors with a cell or
strain matrix is therefore elementwise (transip_md/model/cell_products.py). CI has no TF32, so
the check is structural: no matrix-product operator of an energy + forces + stress call, or of
the static-shape path behind OpenMM's CUDA graphs (both searches), sees a 3-vector operand.
"""

import pytest
import torch
from conftest import make_potential

from transip_md.model.cell_products import rows_times
from transip_md.model.static_shapes import plan_static_neighbors
from transip_md.systems import water_box

MATRIX_OPS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::matmul",
              "aten::addbmm", "aten::mv", "aten::dot", "aten::linalg_solve",
              "aten::_linalg_solve_ex", "aten::linalg_solve_ex", "aten::einsum"}


def test_rows_times_is_the_matrix_product():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(3, 3, generator=g, dtype=torch.float64)
    for shape in [(5, 3), (4, 7, 3), (2, 4, 6, 3)]:
        v = torch.randn(*shape, generator=g, dtype=torch.float64)
        assert torch.allclose(rows_times(v, m), v @ m, rtol=0, atol=1e-13)
    stack = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
    v = torch.randn(4, 7, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(rows_times(v, stack), (v.unsqueeze(-2) @ stack).squeeze(-2), atol=1e-13)


def _vector_products(fn):
    """Matrix-product operators run by ``fn()`` on atoms' 3-vectors: an operand whose last axis
    has 3 entries and which is more than one 3x3 matrix. (The cell's own inverse, a 3x3 solve,
    is allowed: fractional coordinates only decide wraps and candidate cells, with margins, and
    every displacement is then rebuilt exactly from integer shifts.)"""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        fn()
    return sorted({(e.key if hasattr(e, "key") else e.name, str(e.input_shapes))
                   for e in prof.events() if e.name in MATRIX_OPS
                   and any(s and s[-1] == 3 and _numel(s) > 9 for s in e.input_shapes)})


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


@pytest.fixture(scope="module")
def water():
    atoms = water_box(216, seed=3)  # 648 atoms, periodic, ~18.6 Å: wide enough for a cell list
    cell = atoms.cell.array.copy()
    cell[1, 0] = 0.9  # triclinic: every lattice product has off-diagonal terms
    atoms.set_cell(cell, scale_atoms=False)
    return atoms


def _tensors(atoms):
    return (torch.tensor(atoms.positions), torch.tensor(atoms.numbers),
            torch.tensor(atoms.cell.array), torch.tensor([True, True, True]),
            torch.tensor(0), torch.tensor(1))


def test_energy_forces_stress_use_no_matrix_units_on_vectors(water):
    model = make_potential()
    args = _tensors(water)
    out = {}

    def call():
        out.update(model.compute(*args, True, True))

    assert _vector_products(call) == []
    assert float(out["forces"].abs().max()) > 1e-3 and float(out["stress"].abs().max()) > 0


@pytest.mark.parametrize("cell_list", [True, False], ids=["cell_list", "all_pairs"])
def test_static_shape_path_uses_no_matrix_units_on_vectors(water, cell_list):
    model = make_potential()
    positions, *rest = _tensors(water)
    # (a given cell capacity forces the cell list, which this box is too small to pay off)
    plan = plan_static_neighbors(len(water), float(model.cutoff), water.cell.array, True,
                                 cell_capacity=40 if cell_list else None, cell_list=cell_list)
    assert plan.uses_cell_list == cell_list

    def call():
        p = positions.clone().requires_grad_(True)
        energy = model.energy_static(p, *rest, *plan.arguments())
        torch.autograd.grad(energy, p)

    assert _vector_products(call) == []
