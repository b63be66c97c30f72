"""A periodic box of TransIP water at 300 K and 1 bar (Langevin + MonteCarloBarostat).

    python water_box_barostat.py --model model.pt   # default: the model shipped with transip-md

The box is built on a grid (no input files), 27 molecules by default. Runs in well under a
minute on a laptop CPU.
"""

import argparse
import time

import numpy as np
import openmm
import openmm.unit as unit
from ase import Atoms
from ase.build import molecule
from openmmml import MLPotential

from transip_openmm import topology_from_ase


def water_box(n_side: int, spacing: float, seed: int = 0) -> Atoms:
    """n_side^3 randomly oriented waters on a cubic grid, spacing in Å (3.1 Å is ~1 g/cm^3)."""
    rng = np.random.default_rng(seed)
    water = molecule("H2O")
    water.positions -= water.get_center_of_mass()
    box = Atoms(cell=np.eye(3) * n_side * spacing, pbc=True)
    for index in np.ndindex(n_side, n_side, n_side):
        w = water.copy()
        w.rotate(rng.uniform(0, 360), rng.normal(size=3))
        w.positions += (np.array(index) + 0.5) * spacing
        box += w
    return box


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="exported TransIP model (default: shipped model)")
    parser.add_argument("--molecules-per-side", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="steps of 0.5 fs")
    parser.add_argument("--platform", default="CPU", help="OpenMM platform: Reference, CPU or CUDA")
    args = parser.parse_args()

    topology, positions = topology_from_ase(water_box(args.molecules_per_side, 3.1))
    system = MLPotential("transip", modelPath=args.model).createSystem(topology)
    # TorchForce declares no bonds, so the barostat scales atom positions, not molecule centres.
    system.addForce(openmm.MonteCarloBarostat(1 * unit.bar, 300 * unit.kelvin, 10))
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 0.5 * unit.femtosecond)
    simulation = openmm.app.Simulation(topology, system, integrator,
                                       openmm.Platform.getPlatformByName(args.platform))
    simulation.context.setPositions(positions)
    simulation.context.setVelocitiesToTemperature(300 * unit.kelvin, 1)

    mass = sum((system.getParticleMass(i) for i in range(system.getNumParticles())), 0 * unit.dalton)
    start = time.perf_counter()
    for block in range(5):
        simulation.step(args.steps // 5)
        state = simulation.context.getState(getEnergy=True)
        volume = state.getPeriodicBoxVolume()
        density = (mass / volume / unit.AVOGADRO_CONSTANT_NA).value_in_unit(unit.gram / unit.centimeter**3)
        print(f"step {(block + 1) * (args.steps // 5):4d}: "
              f"V = {volume.value_in_unit(unit.nanometer**3):.4f} nm^3, rho = {density:.3f} g/cm^3, "
              f"E_pot = {state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole):.2f} kJ/mol")
    print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
