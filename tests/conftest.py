"""Shared fixtures: small random models, EMT-labelled frames and exported files.

Random weights are fine for the physics checks (forces = -dE/dx, invariances, engine agreement
hold for any weights); tests that need a *trained* model use the shipped default model.
"""

import dataclasses

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.calculators.emt import EMT

from transip_md.data import frame_from_atoms
from transip_md.model import TransIPPotential, named_config

ELEMENTS = (1, 6, 7, 8)


def make_potential(size: str = "tiny", dtype=torch.float64, seed: int = 0,
                   **options) -> TransIPPotential:
    """A random ``size`` model; ``options`` override ModelConfig fields (e.g. edge_filter=True)."""
    torch.manual_seed(seed)
    potential = TransIPPotential(dataclasses.replace(named_config(size), **options)).to(dtype)
    potential.supported_elements[list(ELEMENTS)] = True
    # Random weights give tiny energies; a larger scale makes forces O(1) eV/Å like real ones.
    potential.network.energy_scale.fill_(3.0)
    potential.eval()
    return potential


@pytest.fixture
def potential64() -> TransIPPotential:
    return make_potential()


def emt_frames(n: int, seed: int = 0, noise: float = 0.08):
    """Fast labelled frames (ASE's EMT knows H, C, N, O) for training tests."""
    rng = np.random.default_rng(seed)
    names = ["H2O", "CH4", "NH3", "CH3OH", "HCOOH", "CH3CH2OH"]
    frames = []
    for k in range(n):
        atoms = molecule(names[k % len(names)])
        atoms.positions += rng.normal(0.0, noise, atoms.positions.shape)
        atoms.info["charge"] = 0
        atoms.info["spin"] = 1
        atoms.info["source"] = f"emt:{names[k % len(names)]}"
        atoms.calc = EMT()
        atoms.get_potential_energy()
        frames.append(frame_from_atoms(atoms))
    return frames


ZERO, ONE = torch.tensor(0), torch.tensor(1)


def energy(pot, pos, z, cell, pbc, charge=ZERO, spin=ONE) -> float:
    return float(pot.compute(pos, z, cell, pbc, charge, spin, False, False)["energy"])


def central_difference_forces(pot, pos, z, cell, pbc, atoms, h=1e-5):
    """-dE/dx of ``atoms`` (indices) by central differences of step ``h`` Å."""
    out = torch.zeros((pos.shape[0], 3), dtype=torch.float64)
    for i in atoms:
        for a in range(3):
            p, m = pos.clone(), pos.clone()
            p[i, a] += h
            m[i, a] -= h
            out[i, a] = -(energy(pot, p, z, cell, pbc) - energy(pot, m, z, cell, pbc)) / (2 * h)
    return out


def assert_conservative_and_translation_invariant(pot, atoms):
    """compute()'s forces are -dE/dx (central differences, every atom; forces large enough for
    the check to mean something) and the energy does not move with a rigid translation."""
    pos, z, cell, pbc = system_tensors(atoms)
    forces = pot.compute(pos, z, cell, pbc, ZERO, ONE, True, False)["forces"]
    fd = central_difference_forces(pot, pos, z, cell, pbc, range(len(atoms)))
    assert forces.abs().max() > 1e-2, "forces suspiciously small for a meaningful check"
    np.testing.assert_allclose(forces.numpy(), fd.numpy(), atol=1e-7, rtol=1e-6)
    shifted = energy(pot, pos + torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64), z, cell, pbc)
    assert shifted == pytest.approx(energy(pot, pos, z, cell, pbc), rel=1e-12)


def assert_reference_export_only(pot, cfg, tmp_path, atoms, option: str):
    """A model with the architecture ``option`` (a ModelConfig flag the fused operators do not
    cover): its checkpoint exports with the reference kernels (the file equals the eager model
    on ``atoms``) and every fused export is refused naming the option, writing nothing."""
    from transip_md.checkpoint import save_checkpoint
    from transip_md.export import ModelFileError, export_checkpoint, load_exported

    ckpt = tmp_path / f"{option}.ckpt.pt"
    save_checkpoint(ckpt, pot, cfg, training={"mode": "augment", "steps": 1})
    out = tmp_path / f"{option}.pt"
    export_checkpoint(ckpt, out, dtype="float64")  # the export's own check: file = eager
    model = load_exported(out)
    pos, z, cell, pbc = system_tensors(atoms)
    ref = pot.compute(pos, z, cell, pbc, ZERO, ONE, True, False)
    got = model.compute(pos, z, cell, pbc, ZERO, ONE, True, False)
    assert float(got["energy"]) == pytest.approx(float(ref["energy"]), rel=1e-12)
    np.testing.assert_allclose(got["forces"].numpy(), ref["forces"].numpy(), atol=1e-12)
    for kernels in ("fused", "fused-qkv"):
        target = tmp_path / f"{option}-{kernels}.pt"
        with pytest.raises(ModelFileError, match=rf"{option}: true.*--kernels reference"):
            export_checkpoint(ckpt, target, dtype="float32", kernels=kernels)
        assert not target.exists()


def system_tensors(atoms, dtype=torch.float64):
    return (
        torch.tensor(atoms.positions, dtype=dtype),
        torch.tensor(atoms.numbers, dtype=torch.long),
        torch.tensor(np.asarray(atoms.cell), dtype=dtype),
        torch.tensor(atoms.pbc, dtype=torch.bool),
    )


@pytest.fixture(scope="session")
def exported_tiny64(tmp_path_factory):
    from transip_md.export import export_potential

    path = tmp_path_factory.mktemp("models") / "tiny64.pt"
    export_potential(make_potential(), path, dtype="float64")
    return path


@pytest.fixture(scope="session")
def exported_tiny32(tmp_path_factory):
    from transip_md.export import export_potential

    path = tmp_path_factory.mktemp("models") / "tiny32.pt"
    export_potential(make_potential(), path, dtype="float32")
    return path
