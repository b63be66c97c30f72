"""openmm-ml registration of TransIP: ``MLPotential("transip", modelPath=...)``.

Found by openmm-ml through the ``openmmml.potentials`` entry point declared in pyproject.toml.
Torch and OpenMM-Torch are imported only when forces are added.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import openmm
import openmm.app
from openmmml.mlpotential import MLPotentialImpl, MLPotentialImplFactory

from transip_md import file_kinds  # standard library only: no torch import here


def _default_model_path() -> str:
    try:
        from transip_md.export import default_model_path
    except (ImportError, AttributeError) as err:
        raise ImportError(
            "MLPotential('transip') without modelPath uses the model shipped with transip-md, "
            "but this installation has no transip_md.export.default_model_path "
            f"({err}); pass modelPath='path/to/model.pt' or update transip-md"
        ) from err
    return os.fspath(default_model_path())


class TransIPPotentialImplFactory(MLPotentialImplFactory):
    """Creates :class:`TransIPPotentialImpl` objects for ``MLPotential("transip", ...)``."""

    def createImpl(self, name: str, modelPath: str | os.PathLike | None = None, **args) -> MLPotentialImpl:
        if args:
            raise ValueError(
                f"unknown option(s) for MLPotential('{name}'): {', '.join(sorted(args))}; "
                "the only constructor option is modelPath (charge, multiplicity and precision "
                "go to createSystem/createMixedSystem)"
            )
        return TransIPPotentialImpl(name, modelPath)


class TransIPPotentialImpl(MLPotentialImpl):
    """TransIP machine-learned inter-atomic potentials (exported TorchScript files).

    Create the potential from an exported model file, or leave ``modelPath`` out to use the
    model shipped with transip-md::

        potential = MLPotential("transip", modelPath="model.pt")

    ``createSystem`` and ``createMixedSystem`` accept these options:

    - ``charge`` (int, default 0): total charge of the atoms the model acts on.
    - ``multiplicity`` (int, default 1): their spin multiplicity 2S+1. Charge and multiplicity
      must fit the model's ranges and the electron count's parity; both are fixed when the
      System is created.
    - ``precision`` (None, ``"single"`` or ``"double"``): compute in the model file's own dtype
      (default) or cast the model.

    Example (vacuum ethanol, Langevin dynamics; runs as is with a model file ``model.pt``)::

        >>> import openmm
        >>> from openmm import unit
        >>> from ase.build import molecule
        >>> from openmmml import MLPotential
        >>> from transip_openmm import topology_from_ase
        >>> topology, positions = topology_from_ase(molecule("CH3CH2OH"))
        >>> potential = MLPotential("transip", modelPath="model.pt")
        >>> system = potential.createSystem(topology, charge=0, multiplicity=1)
        >>> integrator = openmm.LangevinMiddleIntegrator(
        ...     300 * unit.kelvin, 1 / unit.picosecond, 0.5 * unit.femtosecond)
        >>> simulation = openmm.app.Simulation(
        ...     topology, system, integrator, openmm.Platform.getPlatformByName("CPU"))
        >>> simulation.context.setPositions(positions)
        >>> simulation.step(10)
        >>> state = simulation.context.getState(getEnergy=True)
        >>> state.getPotentialEnergy().unit == unit.kilojoule_per_mole
        True

    ML/MM: ``potential.createMixedSystem(topology, mm_system, ml_atoms)`` models the ML atoms'
    internal energy with TransIP and everything else with the MM force field (mechanical
    embedding; ``interpolate=True`` adds the global parameter ``lambda_interpolate``, 0 = pure
    MM, 1 = ML/MM). TransIP is local (interactions reach at most layers x cutoff), so
    ``getMLLongRange()`` is False and periodic PME systems need no ``mlLongRange`` option.
    With ``interpolate=True`` the TransIP force scales its own energy by ``lambda_interpolate``
    instead of sitting inside openmm-ml's CustomCVForce (see ``createMixedSystem``); the
    energies are the same.

    Periodic systems: when the Topology has a box the force is periodic and reads the current
    box at every step (triclinic boxes and ``MonteCarloBarostat`` work). A box narrower than the
    model cutoff (perpendicular widths) is refused with a ValueError when the System is built.

    Errors are raised when the System is built, not at the first step: a missing model file
    (FileNotFoundError, already in ``MLPotential(...)``; a directory or FIFO there: ValueError,
    also there), an atom without element, an element the model does not know, an impossible
    charge/multiplicity, a box that is too small, or an unknown option (ValueError).
    """

    #: Options openmm-ml's embeddings forward to addForces; accepted and not used here.
    _EMBEDDING_OPTIONS = frozenset({"linkAtomDistances", "mlLongRange"})

    def __init__(self, name: str, modelPath: str | os.PathLike | None):
        self.name = name
        path = Path(os.fspath(modelPath) if modelPath is not None else _default_model_path())
        path = path.expanduser()
        # missing: FileNotFoundError; a directory, FIFO or device: ValueError saying which
        file_kinds.check_regular_file(path, "TransIP model file")
        self.modelPath = str(path)

    def addForces(
        self,
        topology: openmm.app.Topology,
        system: openmm.System,
        atoms: Iterable[int] | None,
        forceGroup: int,
        charge: int = 0,
        multiplicity: int = 1,
        precision: str | None = None,
        _scale_parameter: str | None = None,
        **args,
    ):
        unknown = sorted(set(args) - self._EMBEDDING_OPTIONS)
        if unknown:
            raise ValueError(
                f"unknown option(s) for the '{self.name}' potential: {', '.join(unknown)}; "
                "it accepts charge, multiplicity and precision"
            )
        from .torchforce import make_torch_force

        box = topology.getPeriodicBoxVectors()
        periodic = box is not None or system.usesPeriodicBoundaryConditions()
        if periodic and box is None:
            box = system.getDefaultPeriodicBoxVectors()
        force = make_torch_force(
            self.modelPath,
            topology,
            atoms=None if atoms is None else list(atoms),
            charge=charge,
            multiplicity=multiplicity,
            periodic=periodic,
            precision=precision,
            box_vectors=box,
            scale_parameter=_scale_parameter,
        )
        force.setForceGroup(forceGroup)
        system.addForce(force)

    def getMLLongRange(self) -> bool:
        return False

    def getSupportedEmbeddings(self) -> list[str]:
        return ["mechanical"]

    def createMixedSystem(
        self,
        topology: openmm.app.Topology,
        system: openmm.System,
        atoms: list[int],
        forceGroup: int,
        interpolate: bool,
        embedding: str,
        returnInfo: bool = False,
        **args,
    ):
        """openmm-ml's mechanical embedding, with the TransIP force kept out of CustomCVForce.

        openmm-ml interpolates by putting the ML forces inside a CustomCVForce, which clones them
        through XML serialization. Deserializing a TorchForce crashes the process with the PyPI
        builds openmm 8.6.1 + openmmtorch 1.5 (segfault in TorchForceProxy::deserialize), so
        with ``interpolate=True`` the embedding is built without ML forces and the TransIP force
        is added beside it, multiplying its own energy by the ``lambda_interpolate`` parameter.
        The energy is the same as openmm-ml's: lambda*(ML + embedding) + (1-lambda)*MM.
        """
        from openmmml.embeddings.mechanicalembedding import MechanicalEmbedding

        mechanical = MechanicalEmbedding()
        if not interpolate:
            return mechanical.createMixedSystem(
                self, topology, system, atoms, forceGroup, False, returnInfo=returnInfo, **args
            )
        info = mechanical.createMixedSystem(
            _NoMLForces(), topology, system, atoms, forceGroup, True, returnInfo=True, **args
        )
        if isinstance(info, openmm.System):  # an openmm-ml without returnInfo support
            info = dict(system=info, topology=topology)
        new_system, new_topology = info["system"], info["topology"]
        # Link-atom caps are appended to the end of the (copied) topology.
        caps = list(range(topology.getNumAtoms(), new_topology.getNumAtoms()))
        self.addForces(
            new_topology, new_system, list(atoms) + caps, forceGroup,
            _scale_parameter="lambda_interpolate", **args,
        )
        return info if returnInfo else new_system


class _NoMLForces(MLPotentialImpl):
    """Stands in for TransIP inside openmm-ml's embedding when interpolating (see above)."""

    def addForces(self, topology, system, atoms, forceGroup, **args):
        pass

    def getMLLongRange(self) -> bool:
        return False
