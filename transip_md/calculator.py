"""ASE calculator for exported TransIP models.

    from transip_md.calculator import TransIPCalculator
    atoms.calc = TransIPCalculator("model.pt")            # or TransIPCalculator() for the shipped model
    atoms.info["charge"], atoms.info["spin"] = -1, 1       # total charge, spin multiplicity
    atoms.get_potential_energy(); atoms.get_forces(); atoms.get_stress()
"""

from typing import List, Optional

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from .export import default_model_path, load_exported, read_metadata
from .model_errors import ScriptError, translate_model_error
from .static_forces import StaticForces


class TransIPCalculator(Calculator):
    """Energy (eV), forces (eV/Å), stress (eV/Å³, periodic cells) and per-atom energies.

    Args:
        model_path: an exported file (``python -m transip_md.export``); ``None`` uses the
            shipped default model.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        charge, spin: total charge and spin multiplicity; when ``None`` they are read from
            ``atoms.info["charge"]`` / ``atoms.info["spin"]`` (OMol25's keys), default 0 and 1.
        low_memory: one layer's activations at a time (large systems on a GPU).
        cuda_graphs: on a CUDA device, energy and forces through the model's static-shape path
            replayed from a CUDA graph (``transip_md/static_forces.py``): several times faster
            for small and mid-sized systems, which are launch-bound. The first call on a new
            system takes the dynamic path (it checks the input); per-atom energies and stress
            always do. A crowded cell or atom that breaks a capacity is detected on the device,
            answered by the dynamic path and followed by a larger plan, never by wrong forces.
        neighbor_capacity, cell_capacity: the static path's capacities (default: from the
            first geometry's density, as for OpenMM's ``make_torch_force(cuda_graphs=True)``).
    """

    implemented_properties: List[str] = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(self, model_path: Optional[str] = None, device: str = "cpu",
                 charge: Optional[int] = None, spin: Optional[int] = None,
                 low_memory: bool = False, cuda_graphs: bool = False,
                 neighbor_capacity: Optional[int] = None, cell_capacity: Optional[int] = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.model_path = str(model_path) if model_path is not None else str(default_model_path())
        self.metadata = read_metadata(self.model_path)
        self.device = torch.device(device)
        if cuda_graphs and self.device.type != "cuda":  # before the model file is read
            raise ValueError(f"cuda_graphs=True needs a CUDA device, not {self.device}")
        if cuda_graphs and low_memory:
            raise ValueError("cuda_graphs and low_memory exclude each other: the graph path "
                             "keeps every layer's activations (use one or the other)")
        needs = ("compute", "energy_static") if cuda_graphs else ("compute",)
        self.model = load_exported(self.model_path, device=self.device, needs=needs,
                                   who="the ASE calculator" + (" (cuda_graphs)" if cuda_graphs else ""))
        if low_memory:  # one layer's activations at a time: large systems on a GPU
            if not hasattr(self.model, "low_memory"):
                raise ValueError(f"{self.model_path} predates the low_memory option; re-export it "
                                 "with this transip-md (python -m transip_md.export ...)")
            self.model.low_memory = True
        self.dtype = getattr(torch, self.metadata["dtype"])
        self.charge = charge
        self.spin = spin
        self.cuda_graphs = bool(cuda_graphs)
        self._capacities = {"neighbor_capacity": neighbor_capacity, "cell_capacity": cell_capacity}
        self._static: Optional[StaticForces] = None
        self._static_key = None

    def _charge_spin(self, atoms) -> tuple:
        charge = self.charge if self.charge is not None else atoms.info.get("charge", 0)
        spin = self.spin if self.spin is not None else atoms.info.get("spin", 1)
        return int(charge), int(spin)

    def check_state(self, atoms, tol=1e-15):
        # ASE compares positions, numbers, cell, ...; the electronic state lives in atoms.info,
        # so a changed charge or multiplicity must also invalidate cached results.
        changes = super().check_state(atoms, tol)
        if self.atoms is not None and self._charge_spin(atoms) != self._charge_spin(self.atoms):
            changes = list(changes) + ["charge_spin"]
        return changes

    def _dynamic(self, positions, cell, charge: int, spin: int, want_stress: bool) -> dict:
        """One call of the model's dynamic path (``compute``), with its input checks."""
        as_t = lambda a, dt: torch.as_tensor(np.asarray(a), dtype=dt, device=self.device)  # noqa: E731
        try:
            out = self.model.compute(
                as_t(positions, self.dtype),
                as_t(self.atoms.numbers, torch.long),
                as_t(cell, self.dtype),
                as_t(self.atoms.pbc, torch.bool),
                torch.tensor(charge), torch.tensor(spin),
                True, want_stress,
            )
            # after compute: geometry mistakes (the common ones) are reported first
            if hasattr(self.model, "validate_electrons"):  # files of format >= 3
                self.model.validate_electrons(int(self.atoms.numbers.sum()), charge, spin,
                                              len(self.atoms))
        except ScriptError as exc:
            raise translate_model_error(exc) from None
        return out

    def _graphed(self, charge: int, spin: int) -> Optional[StaticForces]:
        """The CUDA-graph path for the current atoms, or None for this call: the first call
        on a new system (or charge, spin, periodicity) takes the dynamic path, which checks
        the input, and sets the graph path up for the calls after it."""
        key = (self.atoms.numbers.tobytes(), self.atoms.pbc.tobytes(), charge, spin)
        if self._static is not None and self._static_key == key:
            return self._static
        dynamic = lambda p, c: self._energy_forces(self._dynamic(p, c, charge, spin, False))  # noqa: E731
        self._static = StaticForces(self.model, self.atoms.numbers, self.atoms.pbc, charge, spin,
                                    self.atoms.cell.array, self.dtype, self.device, True, dynamic,
                                    **self._capacities)
        self._static_key = key
        return None

    @staticmethod
    def _energy_forces(out: dict):
        return float(out["energy"]), out["forces"].double().cpu().numpy()

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        charge, spin = self._charge_spin(self.atoms)
        want_stress = "stress" in properties and bool(self.atoms.pbc.any())
        static = None
        if self.cuda_graphs and not want_stress and "energies" not in properties:
            static = self._graphed(charge, spin)
        if static is not None:  # energy and forces only (no per-atom energies, no stress)
            energy, forces = static.evaluate(self.atoms.positions, self.atoms.cell.array)
            self.results.update(energy=energy, free_energy=energy, forces=forces)
            return
        out = self._dynamic(self.atoms.positions, self.atoms.cell.array, charge, spin, want_stress)
        energy = float(out["energy"])
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        self.results["energies"] = out["energies"].double().cpu().numpy()
        self.results["forces"] = out["forces"].double().cpu().numpy()
        if want_stress:
            self.results["stress"] = full_3x3_to_voigt_6_stress(out["stress"].double().cpu().numpy())
        elif "stress" in properties:
            from ase.calculators.calculator import PropertyNotImplementedError

            raise PropertyNotImplementedError("stress needs a periodic cell (atoms.pbc all False)")
