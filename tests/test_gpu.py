"""CUDA paths of the exported file: same energies/forces/stress as on the CPU.

Skipped (with a reason) where torch sees no CUDA device; run on the lent GPU machine.
"""

import os
import tempfile

import pytest
import torch
from ase.build import molecule

from conftest import make_potential, system_tensors
from transip_md.export import export_potential, load_exported
from transip_md.systems import water_box

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs an NVIDIA GPU (torch sees no CUDA device)")]


def _systems():
    acetate = molecule("CH3COOH")
    acetate.pop(3)  # the acid H
    return {"acetate": (acetate, -1), "water_box": (water_box(64, seed=1), 0),
            "triclinic": (water_box(64, seed=2, triclinic=True), 0),
            "small_cell": (water_box(1, seed=3, triclinic=True), 0),
            "large_box": (water_box(2000, seed=4), 0)}


@pytest.mark.parametrize("name", list(_systems()))
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 2e-5)])
def test_cuda_equals_cpu(tmp_path, name, dtype, rtol):
    atoms, charge = _systems()[name]
    path = tmp_path / "m.pt"
    export_potential(make_potential(), path, dtype=dtype)
    cpu = load_exported(path, "cpu")
    gpu = load_exported(path, "cuda")
    torch_dtype = getattr(torch, dtype)
    args = (*system_tensors(atoms, torch_dtype), torch.tensor(charge), torch.tensor(1))
    periodic = bool(atoms.pbc.any())
    a = cpu.compute(*args, True, periodic)
    for _ in range(2):
        b = gpu.compute(*[t.cuda() for t in args], True, periodic)
        assert abs(float(a["energy"] - b["energy"].cpu())) <= rtol * abs(float(a["energy"]))
        assert float((a["forces"] - b["forces"].cpu()).norm() / a["forces"].norm()) <= rtol
        if periodic:
            assert float((a["stress"] - b["stress"].cpu()).norm() / a["stress"].norm()) <= 10 * rtol


def test_cuda_eager_equals_exported():
    eager = make_potential().cuda()
    atoms = water_box(27, seed=5, triclinic=True)
    args = (*[t.cuda() for t in system_tensors(atoms)], torch.tensor(0), torch.tensor(1))
    with tempfile.TemporaryDirectory() as d:
        export_potential(make_potential(), os.path.join(d, "m.pt"), dtype="float64")
        gpu = load_exported(os.path.join(d, "m.pt"), "cuda")
        a = eager.compute(*args, True, True)
        b = gpu.compute(*args, True, True)
    assert abs(float(a["energy"] - b["energy"])) < 1e-10 * abs(float(a["energy"]))
    assert float((a["forces"] - b["forces"]).norm() / a["forces"].norm()) < 1e-10


@pytest.mark.parametrize("name", ["acetate", "water_box", "triclinic", "large_box"])
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 2e-5)])
def test_ase_cuda_graphs_equal_the_dynamic_path(tmp_path, name, dtype, rtol):
    """TransIPCalculator(cuda_graphs=True): the replayed graph gives the dynamic path's energy
    and forces, call after call on new positions (the graph reads its input buffers), and a
    short NVE run follows the same trajectory."""
    import numpy as np
    from ase.md.verlet import VelocityVerlet
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase import units

    from transip_md.calculator import TransIPCalculator

    atoms, charge = _systems()[name]
    atoms.info["charge"] = charge
    path = tmp_path / "m.pt"
    export_potential(make_potential(), path, dtype=dtype)
    plain = TransIPCalculator(str(path), device="cuda")
    graphed = TransIPCalculator(str(path), device="cuda", cuda_graphs=True)
    rng = np.random.default_rng(0)
    for call in range(4):  # call 0: dynamic (input check), 1: capture, 2-3: replays
        moved = atoms.copy()
        moved.positions += rng.normal(0, 0.02, atoms.positions.shape)
        e_plain = plain.get_potential_energy(moved)
        f_plain = plain.get_forces(moved)
        e_graph = graphed.get_potential_energy(moved)
        f_graph = graphed.get_forces(moved)
        assert abs(e_graph - e_plain) <= rtol * max(1.0, abs(e_plain)), call
        assert np.linalg.norm(f_graph - f_plain) <= rtol * np.linalg.norm(f_plain), call
    assert graphed._static.last_path == "static"
    runs = []
    for calc in (plain, graphed):
        a = atoms.copy()
        MaxwellBoltzmannDistribution(a, temperature_K=300, rng=np.random.default_rng(1))
        a.calc = calc
        VelocityVerlet(a, 0.5 * units.fs).run(20)
        runs.append(a.positions.copy())
    assert np.abs(runs[0] - runs[1]).max() < (1e-8 if dtype == "float64" else 1e-3)
