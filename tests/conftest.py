"""Shared fixtures: small random models, EMT-labelled frames and exported files.

Random weights are fine for the physics checks (forces = -dE/dx, invariances, engine agreement
hold for any weights); tests that need a *trained* model use the shipped default model.
"""

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.calculators.emt import EMT

from transip_md.data import Frame, frame_from_atoms
from transip_md.model import TransIPPotential, named_config

ELEMENTS = (1, 6, 7, 8)


def make_potential(size: str = "tiny", dtype=torch.float64, seed: int = 0) -> TransIPPotential:
    torch.manual_seed(seed)
    potential = TransIPPotential(named_config(size)).to(dtype)
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
