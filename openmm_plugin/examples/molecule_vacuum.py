"""Ethanol in vacuum with a TransIP model: NVE (energy conservation) then Langevin at 300 K.

    python molecule_vacuum.py --model model.pt      # default: the model shipped with transip-md

Runs in well under a minute on a laptop CPU.
"""

import argparse
import time

import numpy as np
import openmm
import openmm.unit as unit
from ase.build import molecule
from openmmml import MLPotential

from transip_openmm import topology_from_ase


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="exported TransIP model (default: shipped model)")
    parser.add_argument("--steps", type=int, default=200, help="steps of each run (0.5 fs)")
    parser.add_argument("--platform", default="CPU", help="OpenMM platform: Reference, CPU or CUDA")
    args = parser.parse_args()

    topology, positions = topology_from_ase(molecule("CH3CH2OH"))
    potential = MLPotential("transip", modelPath=args.model)
    system = potential.createSystem(topology, charge=0, multiplicity=1, removeCMMotion=False)
    platform = openmm.Platform.getPlatformByName(args.platform)

    # NVE: velocity Verlet, total energy should stay flat.
    verlet = openmm.VerletIntegrator(0.5 * unit.femtosecond)
    context = openmm.Context(system, verlet, platform)
    context.setPositions(positions)
    context.setVelocitiesToTemperature(300 * unit.kelvin, 1)
    totals, kinetic = [], []
    start = time.perf_counter()
    for _ in range(args.steps // 10):
        state = context.getState(getEnergy=True)
        k = state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole)
        totals.append(k + state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        kinetic.append(k)
        verlet.step(10)
    totals = np.array(totals)
    print(f"NVE   {args.steps} steps in {time.perf_counter() - start:.1f} s: "
          f"max |E - E0| = {np.abs(totals - totals[0]).max():.2e} kJ/mol, "
          f"std(kinetic) = {np.std(kinetic):.3f} kJ/mol")

    # NVT: Langevin middle integrator at 300 K from the NVE end point.
    langevin = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 5 / unit.picosecond, 0.5 * unit.femtosecond)
    state = context.getState(getPositions=True, getVelocities=True)
    context = openmm.Context(system, langevin, platform)
    context.setPositions(state.getPositions())
    context.setVelocities(state.getVelocities())
    dof = 3 * system.getNumParticles()
    for block in range(4):
        langevin.step(args.steps // 4)
        kinetic = context.getState(getEnergy=True).getKineticEnergy()
        temperature = (2 * kinetic / (dof * unit.MOLAR_GAS_CONSTANT_R)).value_in_unit(unit.kelvin)
        print(f"NVT   step {(block + 1) * (args.steps // 4):4d}: T = {temperature:6.1f} K")


if __name__ == "__main__":
    main()
