"""OpenMM adapter for TransIP potentials.

* :func:`make_torch_force` — an ``openmmtorch.TorchForce`` for an exported TransIP model file;
* ``MLPotential("transip", modelPath=...)`` — the openmm-ml registration
  (:mod:`transip_openmm.mlpotential`, found through the ``openmmml.potentials`` entry point);
* :func:`topology_from_ase` — an OpenMM Topology and positions for an ``ase.Atoms``.

Attributes are imported lazily so that ``import openmmml`` (which loads every registered
potential) does not pay for torch and OpenMM-Torch until a TransIP force is built.
"""

# openmm-ml imports this package's ``mlpotential`` module from inside its own import (entry-point
# registration). Importing openmmml first, here, keeps that circle from handing openmm-ml a
# half-initialised ``transip_openmm.mlpotential`` when a user imports that module directly.
try:  # noqa: SIM105
    import openmmml  # noqa: F401
except Exception:  # openmm-ml missing or broken: only the MLPotential route needs it
    pass

_LAZY = {
    "make_torch_force": "torchforce",
    "topology_from_ase": "torchforce",
    "import_openmmtorch": "torchforce",
    "box_widths_nm": "torchforce",
    "CHARGE_PARAMETER": "torchforce",
    "MULTIPLICITY_PARAMETER": "torchforce",
    "TransIPPotentialImpl": "mlpotential",
    "TransIPPotentialImplFactory": "mlpotential",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
