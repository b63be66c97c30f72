"""The ASE calculator's static-shape path (``cuda_graphs=True``, transip_md/static_forces.py).

On the CPU the same class runs without the graph: it must give the dynamic path's energy and
forces (1e-10 relative, float64), recover from a broken capacity with the correct answer, and
refuse what it cannot do with a clear error. The graph replay itself is tested on the GPU
(test_gpu.py)."""

import numpy as np
import pytest
from ase.build import molecule

from transip_md.calculator import TransIPCalculator
from transip_md.static_forces import StaticForces
from transip_md.systems import water_box


def _static(calc, atoms, **capacities) -> StaticForces:
    charge, spin = calc._charge_spin(atoms)
    calc.atoms = atoms.copy()
    dynamic = lambda p, c: calc._energy_forces(calc._dynamic(p, c, charge, spin, False))  # noqa: E731
    return StaticForces(calc.model, atoms.numbers, atoms.pbc, charge, spin, atoms.cell.array,
                        calc.dtype, calc.device, False, dynamic, **capacities)


def _reference(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces()


def _close(a, b, rtol=1e-10):
    scale = max(1.0, float(np.abs(b).max()))
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= rtol * scale


@pytest.mark.parametrize("system", ["water", "water_unwrapped", "ethanol"])
def test_static_path_equals_dynamic(exported_tiny64, system):
    calc = TransIPCalculator(str(exported_tiny64))
    if system == "ethanol":
        atoms = molecule("CH3CH2OH")
    else:
        atoms = water_box(64, seed=7)
        if system == "water_unwrapped":  # MD does not wrap: atoms several boxes away
            shift = np.zeros_like(atoms.positions)
            shift[::3] = atoms.cell.array[0] * 2 - atoms.cell.array[2]
            atoms.positions += shift
    static = _static(calc, atoms)
    e_ref, f_ref = _reference(calc, atoms)
    energy, forces = static.evaluate(atoms.positions, atoms.cell.array)
    assert static.last_path == "static"
    _close(energy, e_ref)
    _close(forces, f_ref)
    # a second geometry through the same buffers
    atoms.positions += np.random.default_rng(0).normal(0, 0.02, atoms.positions.shape)
    e_ref, f_ref = _reference(calc, atoms)
    energy, forces = static.evaluate(atoms.positions, atoms.cell.array)
    _close(energy, e_ref)
    _close(forces, f_ref)


def test_broken_capacity_gives_the_dynamic_answer_then_a_larger_plan(exported_tiny64):
    calc = TransIPCalculator(str(exported_tiny64))
    atoms = water_box(64, seed=7)
    static = _static(calc, atoms, neighbor_capacity=4)  # far fewer than the ~40 neighbours
    e_ref, f_ref = _reference(calc, atoms)
    paths = []
    for _ in range(8):
        energy, forces = static.evaluate(atoms.positions, atoms.cell.array)
        paths.append(static.last_path)
        _close(energy, e_ref)  # whichever path answered: the right energy and forces
        _close(forces, f_ref)
    assert paths[0] == "dynamic" and paths[-1] == "static", paths
    assert static.replans >= 1 and static.plan.neighbor_capacity > 4


def test_cuda_graphs_refusals(exported_tiny64):
    with pytest.raises(ValueError, match="CUDA device"):
        TransIPCalculator(str(exported_tiny64), cuda_graphs=True)
    calc = TransIPCalculator(str(exported_tiny64))
    atoms = water_box(64, seed=7)
    atoms.pbc = [True, True, False]
    with pytest.raises(ValueError, match="all three axes or none"):
        _static(calc, atoms)
