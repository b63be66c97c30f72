"""Systems and evaluation helpers for tests/test_openmm.py (no test functions here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openmm
import openmm.app
import openmm.unit as u
import torch
from ase import Atoms
from ase.build import molecule

from transip_md.units import ANGSTROM_PER_NM, KJ_PER_MOL_PER_EV

REPO = Path(__file__).resolve().parents[1]
ETHANOL_XML = REPO / "openmm_plugin" / "examples" / "ethanol_opls.xml"
KJ_PER_MOL_NM = u.kilojoule_per_mole / u.nanometer


def platform_or_none(name: str):
    try:
        return openmm.Platform.getPlatformByName(name)
    except Exception:
        return None


def ethanol() -> Atoms:
    return molecule("CH3CH2OH")


def water_box(n_side: int = 2, spacing: float = 3.2, tilt: bool = False, seed: int = 0) -> Atoms:
    """n_side^3 randomly oriented waters on a grid in a periodic cell (Å).

    With ``tilt`` the cell is triclinic in OpenMM's reduced form (|b_x|, |c_x| <= a_x/2,
    |c_y| <= b_y/2).
    """
    rng = np.random.default_rng(seed)
    length = n_side * spacing
    cell = np.diag([length, length, length])
    if tilt:
        cell[1, 0] = 0.3 * length
        cell[2, 0] = -0.2 * length
        cell[2, 1] = 0.25 * length
    water = molecule("H2O")
    water.positions -= water.get_center_of_mass()
    atoms = Atoms(cell=cell, pbc=True)
    for i in range(n_side):
        for j in range(n_side):
            for k in range(n_side):
                w = water.copy()
                w.rotate(rng.uniform(0, 360), rng.normal(size=3))
                frac = (np.array([i, j, k]) + 0.5 + rng.uniform(-0.1, 0.1, 3)) / n_side
                w.positions += frac @ cell
                atoms += w
    return atoms


def reference(model, atoms: Atoms, charge: int = 0, multiplicity: int = 1):
    """(energy kJ/mol, forces kJ/mol/nm) from the model's own ASE-side entry point."""
    out = model.compute(
        torch.tensor(atoms.positions, dtype=torch.float64),
        torch.tensor(atoms.numbers, dtype=torch.long),
        torch.tensor(np.asarray(atoms.cell), dtype=torch.float64),
        torch.tensor(atoms.pbc, dtype=torch.bool),
        torch.tensor(charge),
        torch.tensor(multiplicity),
    )
    energy = float(out["energy"]) * KJ_PER_MOL_PER_EV
    forces = out["forces"].detach().double().numpy() * KJ_PER_MOL_PER_EV * ANGSTROM_PER_NM
    return energy, forces


def system_with(force, atoms: Atoms) -> openmm.System:
    system = openmm.System()
    for mass in atoms.get_masses():
        system.addParticle(float(mass))
    if any(atoms.pbc):
        system.setDefaultPeriodicBoxVectors(
            *[openmm.Vec3(*(row / ANGSTROM_PER_NM)) for row in np.asarray(atoms.cell)]
        )
    system.addForce(force)
    return system


def context_for(system, positions, platform, box=None, integrator=None) -> openmm.Context:
    integrator = integrator or openmm.VerletIntegrator(0.5 * u.femtosecond)
    # The CUDA platform's default 'single' precision hands TorchForce float32 positions
    # (~1e-7 relative rounding); the float64 tolerances need 'double'.
    properties = {"Precision": "double"} if platform.getName() == "CUDA" else {}
    context = openmm.Context(system, integrator, platform, properties)
    if box is not None:
        context.setPeriodicBoxVectors(*box)
    context.setPositions(positions)
    return context


def energy_forces(context: openmm.Context, groups=-1):
    state = context.getState(getEnergy=True, getForces=True, groups=groups)
    energy = state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
    forces = np.asarray(state.getForces(asNumpy=True).value_in_unit(KJ_PER_MOL_NM))
    return energy, forces


def energy_of(system, positions, platform=None) -> float:
    platform = platform or openmm.Platform.getPlatformByName("Reference")
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), platform)
    context.setPositions(positions)
    return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)


def positions_nm(atoms: Atoms):
    return [openmm.Vec3(*(p / ANGSTROM_PER_NM)) for p in atoms.positions] * u.nanometer


def relative(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def solvated_ethanol(n_waters: int = 12, seed: int = 1):
    """Ethanol (residue ETH, atoms 0-8) and TIP3P waters around it, as Topology + positions.

    Waters sit on a shell 4-6 Å from ethanol's centre, no box (for NoCutoff MM energies).
    """
    from transip_openmm import topology_from_ase

    eth = ethanol()
    eth.positions -= eth.get_center_of_mass()
    topology, _ = topology_from_ase(eth, residue_name="ETH")
    positions = [p for p in eth.positions]
    rng = np.random.default_rng(seed)
    water = molecule("H2O")
    water.positions -= water.get_center_of_mass()
    element = openmm.app.Element.getBySymbol
    chain = topology.addChain()
    placed = 0
    while placed < n_waters:
        direction = rng.normal(size=3)
        centre = direction / np.linalg.norm(direction) * rng.uniform(4.5, 6.5)
        w = water.copy()
        w.rotate(rng.uniform(0, 360), rng.normal(size=3))
        w.positions += centre
        if min(np.linalg.norm(np.asarray(positions)[:, None] - w.positions[None], axis=2).ravel()) < 2.2:
            continue
        residue = topology.addResidue("HOH", chain)
        o = topology.addAtom("O", element("O"), residue)
        h1 = topology.addAtom("H1", element("H"), residue)
        h2 = topology.addAtom("H2", element("H"), residue)
        topology.addBond(o, h1)
        topology.addBond(o, h2)
        positions.extend(w.positions)  # ASE's water is O, H, H
        placed += 1
    return topology, [openmm.Vec3(*(p / ANGSTROM_PER_NM)) for p in positions] * u.nanometer
