"""ML/MM: ethanol modelled by TransIP inside a periodic box of classical TIP3P water.

    python mlmm_water.py --model model.pt           # default: the model shipped with transip-md

The MM force field is ``ethanol_opls.xml`` (beside this script; its charges and Lennard-Jones
parameters give the ethanol-water interactions) plus OpenMM's ``tip3p.xml``, with PME.
``createMixedSystem`` replaces ethanol's internal MM terms by TransIP (mechanical embedding).
With ``--interpolate`` the system gets the ``lambda_interpolate`` parameter (0 = pure MM,
1 = ML/MM). Runs in well under a minute on a laptop CPU.
"""

import argparse
import time
from pathlib import Path

import openmm
import openmm.app as app
import openmm.unit as unit
from ase.build import molecule
from openmmml import MLPotential

from transip_openmm import topology_from_ase

HERE = Path(__file__).resolve().parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="exported TransIP model (default: shipped model)")
    parser.add_argument("--steps", type=int, default=200, help="steps of 0.5 fs")
    parser.add_argument("--padding", type=float, default=0.7, help="water padding around ethanol (nm)")
    parser.add_argument("--interpolate", action="store_true", help="add lambda_interpolate")
    parser.add_argument("--platform", default="CPU", help="OpenMM platform: Reference, CPU or CUDA")
    args = parser.parse_args()

    topology, positions = topology_from_ase(molecule("CH3CH2OH"), residue_name="ETH")
    forcefield = app.ForceField(str(HERE / "ethanol_opls.xml"), "tip3p.xml")
    modeller = app.Modeller(topology, positions)
    modeller.addSolvent(forcefield, model="tip3p", padding=args.padding * unit.nanometer)
    mm_system = forcefield.createSystem(modeller.topology, nonbondedMethod=app.PME,
                                        nonbondedCutoff=0.6 * unit.nanometer, constraints=None,
                                        rigidWater=True)
    ml_atoms = [atom.index for atom in modeller.topology.atoms() if atom.residue.name == "ETH"]
    print(f"{modeller.topology.getNumAtoms()} atoms, ML region: {len(ml_atoms)} ethanol atoms")

    potential = MLPotential("transip", modelPath=args.model)
    system = potential.createMixedSystem(modeller.topology, mm_system, ml_atoms,
                                         interpolate=args.interpolate, charge=0, multiplicity=1)
    system.addForce(openmm.MonteCarloBarostat(1 * unit.bar, 300 * unit.kelvin, 25))
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 0.5 * unit.femtosecond)
    simulation = app.Simulation(modeller.topology, system, integrator,
                                openmm.Platform.getPlatformByName(args.platform))
    simulation.context.setPositions(modeller.positions)
    simulation.minimizeEnergy(maxIterations=100)
    simulation.context.setVelocitiesToTemperature(300 * unit.kelvin, 1)

    def energy():
        state = simulation.context.getState(getEnergy=True)
        return state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)

    if args.interpolate:
        for lam in (0.0, 0.5, 1.0):
            simulation.context.setParameter("lambda_interpolate", lam)
            print(f"lambda_interpolate = {lam:.1f}: E_pot = {energy():.2f} kJ/mol")
    start = time.perf_counter()
    for block in range(4):
        simulation.step(args.steps // 4)
        print(f"step {(block + 1) * (args.steps // 4):4d}: E_pot = {energy():.2f} kJ/mol")
    print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
