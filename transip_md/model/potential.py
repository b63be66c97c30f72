"""Energy, forces and stress of whole systems: neighbour search + network + autograd.

:class:`TransIPPotential` is the scriptable unit that training uses eagerly and the exporter
scripts into the engine file. Everything is in eV and Å; engines convert at their boundary.
This module holds the core (whole-system energies) and the Python/ASE and autograd-engine
entry points; the other audiences are mixins in their own modules:

* :mod:`.validation` - input checks (every engine's rules, once);
* :mod:`.low_memory` - activation-checkpointed gradients for large systems;
* :mod:`.static_shapes` - ``energy_static`` for CUDA-graph capture;
* :mod:`.engine_pairs` - entries for engines with their own neighbour lists and ghosts;
* :mod:`.halo` - the network in pieces for per-layer halo exchange.

The entry points an exported file offers are declared in :mod:`.contract`.
"""

from typing import Dict, List, Optional, Tuple

import torch
from ase.data import chemical_symbols
from torch import Tensor, nn

from .cell_products import rows_times
from .config import MAX_ABS_CHARGE, MAX_ATOMIC_NUMBER, MAX_MULTIPLICITY, ModelConfig
from .contract import entry_point
from .engine_pairs import EnginePairEntries
from .halo import HaloExchangeEntries
from .low_memory import LowMemoryGradients
from .neighbors import MAX_IMAGES, neighbor_pairs, pairs_to_dense
from .static_shapes import StaticShapeEnergy
from .transformer import TransIPNetwork
from .validation import InputChecks

#: Two atoms closer than this (Å) are treated as a broken input, not as physics.
MIN_PAIR_DISTANCE = 1e-2


class TransIPPotential(InputChecks, LowMemoryGradients, StaticShapeEnergy, EnginePairEntries,
                       HaloExchangeEntries, nn.Module):
    # The engine-visible declaration (model/contract.py), filled by the exporter; typed here
    # so that TorchScript keeps them as dictionaries that C++ reads without a JSON parser.
    capabilities: Dict[str, int]
    limits: Dict[str, float]
    species: Dict[str, int]
    unit_factors: Dict[str, float]
    operator_library: str

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cutoff = float(cfg.cutoff)
        self.num_layers = int(cfg.layers)
        self.network = TransIPNetwork(cfg)
        self.register_buffer(
            "supported_elements", torch.zeros(MAX_ATOMIC_NUMBER + 1, dtype=torch.bool)
        )
        self.symbols: List[str] = list(chemical_symbols[: MAX_ATOMIC_NUMBER + 1])
        self.check_inputs = True
        # Engines may set this for large systems: forces/stress from `compute` with one layer's
        # activations in memory at a time (about +30 % time; see _gradients_low_memory).
        self.low_memory = False
        self.min_pair_distance = MIN_PAIR_DISTANCE
        # Engine-facing metadata; the exporter fills these before scripting (see
        # export/CONTRACT.md). format_version 0 means "not an exported file".
        self.format_version = 0
        self.receptive_field = float(cfg.receptive_field)
        self.metadata_json = "{}"
        self.max_atomic_number = MAX_ATOMIC_NUMBER
        self.max_abs_charge = MAX_ABS_CHARGE
        self.max_multiplicity = MAX_MULTIPLICITY
        self.max_images = MAX_IMAGES
        self.capabilities = {}
        self.limits = {}
        self.species = {}
        self.unit_factors = {}
        self.operator_library = ""

    @torch.jit.export
    @entry_point(1, "List[str]: supported element symbols")
    def element_list(self) -> List[str]:
        out: List[str] = []
        for z in range(1, self.max_atomic_number + 1):
            if bool(self.supported_elements[z]):
                out.append(self.symbols[z])
        return out

    def _per_atom_state(self, charge: Tensor, spin: Tensor, n_atoms: int) -> Tuple[Tensor, Tensor]:
        """Total charge and multiplicity (scalar tensors) as per-atom int64 rows for the network."""
        q = charge.reshape(1).to(torch.long).expand(n_atoms)
        m = spin.reshape(1).to(torch.long).expand(n_atoms)
        return q, m

    def _prepare(
        self, positions: Tensor, numbers: Tensor, cell: Tensor, pbc: Tensor, charge: Tensor,
        spin: Tensor,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Cast to the model's dtype and move everything to the model's device.

        Engines may hand over positions on the GPU and the small tensors (numbers, cell, pbc,
        charge, spin) on the CPU; the model's parameters decide where the work happens.
        Positions keep their autograd graph (``.to`` is differentiable).
        """
        dtype = self.network.energy_scale.dtype
        device = self.network.energy_scale.device
        return (
            positions.to(device=device, dtype=dtype),
            numbers.to(device=device, dtype=torch.long),
            cell.to(device=device, dtype=dtype),
            pbc.to(device=device, dtype=torch.bool),
            charge.to(device),
            spin.to(device),
        )

    # ------------------------------------------------------------------ core
    def atom_energies_from_pairs(
        self,
        positions: Tensor,
        numbers: Tensor,
        charge: Tensor,
        spin: Tensor,
        i: Tensor,
        j: Tensor,
        shift: Tensor,
    ) -> Tuple[Tensor, List[Tensor]]:
        """Per-atom energies from a pair list sorted by i.

        ``positions[j] - positions[i] + shift`` is each pair's displacement (Å); ``charge`` and
        ``spin`` are per atom. Differentiable with respect to positions and shift.
        """
        nbr_index, nbr_vec = self._dense_neighbors(positions, i, j, shift)
        return self.network(numbers, charge, spin, nbr_index, nbr_vec)

    def _dense_neighbors(
        self, positions: Tensor, i: Tensor, j: Tensor, shift: Tensor, n_rows: int = -1
    ) -> Tuple[Tensor, Tensor]:
        """``nbr_index`` [R, K] (padding N) and displacements ``nbr_vec`` [R, K, 3] (padding
        beyond the cutoff) of a pair list sorted by i; differentiable in positions and shift.
        R = ``n_rows`` (the first atoms: an engine's local atoms), default all N atoms."""
        n_atoms = positions.shape[0]
        rows = n_atoms if n_rows < 0 else n_rows
        vec = positions.index_select(0, j) - positions.index_select(0, i) + shift
        if self.check_inputs:
            self._check_pair_distances(vec, i, j)
        row, slot, k_max = pairs_to_dense(i, rows)
        far = torch.zeros(3, dtype=positions.dtype, device=positions.device)
        far[0] = 2.0 * self.cutoff
        nbr_vec = far.expand(rows, k_max, 3).clone()
        nbr_vec = nbr_vec.index_put((row, slot), vec)
        nbr_index = torch.full((rows, k_max), n_atoms, dtype=torch.long, device=positions.device)
        nbr_index = nbr_index.index_put((row, slot), j)
        return nbr_index, nbr_vec

    def _system_energies(
        self,
        positions: Tensor,
        numbers: Tensor,
        cell: Tensor,
        pbc: Tensor,
        charge: Tensor,
        spin: Tensor,
        strain: Tensor,
    ) -> Tuple[Tensor, List[Tensor]]:
        """Per-atom energies of one system; ``strain`` (3x3, zeros) carries the virial."""
        i, j, s = neighbor_pairs(positions, cell, pbc, self.cutoff)
        deform = torch.eye(3, dtype=positions.dtype, device=positions.device) + strain
        pos = rows_times(positions, deform)
        shift = rows_times(s, rows_times(cell, deform))
        n_atoms = positions.shape[0]
        q, m = self._per_atom_state(charge, spin, n_atoms)
        return self.atom_energies_from_pairs(pos, numbers, q, m, i, j, shift)

    # ------------------------------------------------------------------ Python / ASE entry
    @torch.jit.export
    @entry_point(1, "Dict[str, Tensor]: energy, energies, forces, stress (eV, eV/Å, eV/Å^3)")
    def compute(
        self,
        positions: Tensor,
        numbers: Tensor,
        cell: Tensor,
        pbc: Tensor,
        charge: Tensor,
        spin: Tensor,
        compute_forces: bool = True,
        compute_stress: bool = False,
    ) -> Dict[str, Tensor]:
        """Energy (eV), per-atom energies, forces (eV/Å) and stress (eV/Å^3, 3x3) of one system.

        ``positions`` [N, 3] Å; ``numbers`` [N] int64; ``cell`` [3, 3] Å (rows are lattice
        vectors); ``pbc`` [3] bool; ``charge``, ``spin`` scalar tensors (total charge, spin
        multiplicity).
        """
        positions, numbers, cell, pbc, charge, spin = self._prepare(
            positions, numbers, cell, pbc, charge, spin)
        dtype = positions.dtype
        if self.check_inputs:
            self._validate_system(positions, numbers, cell, pbc, charge, spin)
        periodic = bool(pbc.any())
        positions = positions.detach().requires_grad_(compute_forces)
        strain = torch.zeros((3, 3), dtype=dtype, device=positions.device)
        want_stress = compute_stress and periodic
        strain.requires_grad_(want_stress)
        inputs: List[Tensor] = []
        if compute_forces:
            inputs.append(positions)
        if want_stress:
            inputs.append(strain)
        grads: List[Optional[Tensor]] = []
        if self.low_memory and len(inputs) > 0:
            energies, grads = self._gradients_low_memory(
                positions, numbers, cell, pbc, charge, spin, strain, inputs)
        else:
            energies, _ = self._system_energies(positions, numbers, cell, pbc, charge, spin, strain)
            if len(inputs) > 0:
                grads = torch.autograd.grad([energies.sum()], inputs, allow_unused=True)
        energy = energies.sum()
        out: Dict[str, Tensor] = {"energy": energy.detach(), "energies": energies.detach()}
        if len(inputs) > 0:
            k = 0
            if compute_forces:
                g = grads[k]
                out["forces"] = -g if g is not None else torch.zeros_like(positions)
                k += 1
            if want_stress:
                g = grads[k]
                volume = torch.abs(torch.linalg.det(cell))
                dedstrain = g if g is not None else torch.zeros_like(strain)
                out["stress"] = 0.5 * (dedstrain + dedstrain.T) / volume
        return out

    @torch.jit.export
    @entry_point(1, "Tensor: differentiable total energy (eV)")
    def energy(
        self,
        positions: Tensor,
        numbers: Tensor,
        cell: Tensor,
        pbc: Tensor,
        charge: Tensor,
        spin: Tensor,
    ) -> Tensor:
        """Differentiable total energy (eV) of one system; for engines that run autograd."""
        positions, numbers, cell, pbc, charge, spin = self._prepare(
            positions, numbers, cell, pbc, charge, spin)
        dtype = positions.dtype
        if self.check_inputs:
            self._validate_system(positions, numbers, cell, pbc, charge, spin)
        strain = torch.zeros((3, 3), dtype=dtype, device=positions.device)
        energies, _ = self._system_energies(positions, numbers, cell, pbc, charge, spin, strain)
        return energies.sum()

    @entry_point(1, "Dict[str, Tensor]: compute() with forces and stress")
    def forward(
        self,
        positions: Tensor,
        numbers: Tensor,
        cell: Tensor,
        pbc: Tensor,
        charge: Tensor,
        spin: Tensor,
    ) -> Dict[str, Tensor]:
        return self.compute(positions, numbers, cell, pbc, charge, spin, True, True)

