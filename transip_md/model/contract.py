"""What an exported file promises engines, declared by the code itself (export/CONTRACT.md).

Each engine-facing method carries :func:`entry_point` (its contract version and what it
returns); :func:`declared_entry_points` collects them from the class, so the list written into a
file is generated from the module and can never drift from what the file actually offers.
:func:`declaration` assembles the whole record (capabilities, limits, species, units, dtype,
torch version, operator library) that the exporter stores as typed module attributes, readable
from C++ without a JSON parser (``module.attr("capabilities").toGenericDict()``).
"""

from typing import Any, Callable, Dict

import torch

#: The attribute set on a function by :func:`entry_point`.
_MARK = "__transip_entry_point__"

#: The entry points of format 2 that format 3 renamed (old name -> new name). Loaders accept
#: the old names in old files; new files carry only the new ones.
FORMAT2_ALIASES = {"lammps": "local_energies_forces",
                   "lammps_periodic": "mapped_energies_forces_virial"}


def entry_point(version: int, returns: str) -> Callable:
    """Mark a method as part of the engine contract (keep it *below* ``@torch.jit.export``)."""
    def mark(fn: Callable) -> Callable:
        setattr(fn, _MARK, {"version": int(version), "returns": returns})
        return fn
    return mark


def declared_entry_points(cls: type) -> Dict[str, Dict[str, Any]]:
    """``{name: {"version": v, "returns": "..."}}`` of every marked method of ``cls``."""
    found = {}
    for name in sorted(dir(cls)):
        info = getattr(getattr(cls, name, None), _MARK, None)
        if info is not None:
            found[name] = dict(info)
    return found


def declaration(potential, dtype: torch.dtype, units: Dict[str, Dict[str, Any]],
                operator_library: str = "") -> Dict[str, Any]:
    """The engine-visible record of ``potential`` (see export/CONTRACT.md, "Declaration")."""
    from ase.data import atomic_numbers

    return {
        "capabilities": {name: info["version"]
                         for name, info in declared_entry_points(type(potential)).items()},
        "entry_point_returns": {name: info["returns"]
                                for name, info in declared_entry_points(type(potential)).items()},
        "limits": {
            "cutoff": float(potential.cutoff),
            "receptive_field": float(potential.receptive_field),
            "num_layers": float(potential.num_layers),
            "max_images": float(potential.max_images),
            "min_pair_distance": float(potential.min_pair_distance),
            "max_abs_charge": float(potential.max_abs_charge),
            "min_multiplicity": 1.0,
            "max_multiplicity": float(potential.max_multiplicity),
            # energy_static (CUDA graphs): periodic boxes at least this many cutoffs wide (its
            # all-pairs form uses minimum images; its cell list needs >= 3 cells per axis too,
            # checked on the device)
            "static_min_box_width_over_cutoff": 2.0,
        },
        "species": {symbol: int(atomic_numbers[symbol]) for symbol in potential.element_list()},
        "unit_factors": {
            "kj_per_mol_per_ev": float(units["openmm"]["kj_per_mol_per_ev"]),
            "angstrom_per_nm": float(units["openmm"]["angstrom_per_nm"]),
            "kcal_per_mol_per_ev": float(units["lammps_real"]["kcal_per_mol_per_ev"]),
        },
        "dtype": str(dtype).removeprefix("torch."),
        "torch_version": str(torch.__version__),
        "operator_library": operator_library,
    }
