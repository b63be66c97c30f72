"""Entry points for engines that bring their own neighbour list and ghost atoms (LAMMPS):
pairs from the engine, per-atom energies, forces on every row, virial."""

from typing import Tuple

import torch
from torch import Tensor

from .contract import entry_point


class EnginePairEntries:
    """Mixin of :class:`~transip_md.model.potential.TransIPPotential`."""

    def _prepare_engine(
        self, positions: Tensor, numbers: Tensor, charge: Tensor, spin: Tensor,
        fresh_leaf: bool = True,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Inputs of the engine entry points on the model's device/dtype, validated, and
        positions as a fresh autograd leaf (``fresh_leaf``) or keeping the caller's graph."""
        dtype = self.network.energy_scale.dtype
        device = self.network.energy_scale.device
        positions = positions.to(device=device, dtype=dtype)
        numbers = numbers.to(device=device, dtype=torch.long)
        charge = charge.to(device)
        spin = spin.to(device)
        if self.check_inputs:
            self.validate(positions, numbers, charge, spin)
        if fresh_leaf:
            positions = positions.detach().requires_grad_(True)
        return positions, numbers, charge, spin

    def _engine_pairs(
        self, positions: Tensor, edge_i: Tensor, edge_j: Tensor, edge_shift: Tensor
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """The engine's pairs within the cutoff (its lists include the skin), sorted by i."""
        device = positions.device
        edge_i = edge_i.to(device)
        edge_j = edge_j.to(device)
        edge_shift = edge_shift.to(device=device, dtype=positions.dtype)
        with torch.no_grad():
            d = positions[edge_j] - positions[edge_i] + edge_shift
            keep = (d * d).sum(1) < self.cutoff * self.cutoff
            order = torch.argsort(edge_i[keep], stable=True)
            return edge_i[keep][order], edge_j[keep][order], edge_shift[keep][order]

    @torch.jit.export
    @entry_point(1, "Tuple[Tensor, Tensor]: local per-atom energies (eV), forces on all rows (eV/Å)")
    def local_energies_forces(
        self,
        positions: Tensor,
        numbers: Tensor,
        edge_i: Tensor,
        edge_j: Tensor,
        nlocal: int,
        charge: Tensor,
        spin: Tensor,
    ) -> Tuple[Tensor, Tensor]:
        """Per-atom energies of the local atoms (eV) and forces on all atoms (eV/Å).

        ``positions`` [Ntot, 3] Å of local then ghost atoms (ghosts are periodic images or
        other ranks' atoms, already at their image positions); ``numbers`` [Ntot]; ``edge_i``,
        ``edge_j`` the engine's full neighbour pairs (both directions, any order, may include
        pairs beyond the cutoff, which are dropped). Only local energies are summed, so forces
        on ghosts must be added back to their owners by the engine (reverse communication).
        Exact when ghosts extend to the receptive field (layers x cutoff).
        """
        positions, numbers, charge, spin = self._prepare_engine(positions, numbers, charge, spin)
        zero_shift = torch.zeros((edge_i.shape[0], 3), dtype=positions.dtype, device=positions.device)
        i, j, shift = self._engine_pairs(positions, edge_i, edge_j, zero_shift)
        n_total = positions.shape[0]
        q, m = self._per_atom_state(charge, spin, n_total)
        energies, _ = self.atom_energies_from_pairs(positions, numbers, q, m, i, j, shift)
        local = energies[:nlocal]
        grads = torch.autograd.grad([local.sum()], [positions], allow_unused=True)
        g = grads[0]
        forces = -g if g is not None else torch.zeros_like(positions)
        return local.detach(), forces

    @torch.jit.export
    @entry_point(1, "Tuple[Tensor, Tensor, Tensor]: energies (eV), forces (eV/Å), virial [6] (eV)")
    def mapped_energies_forces_virial(
        self,
        positions: Tensor,
        numbers: Tensor,
        edge_i: Tensor,
        edge_j: Tensor,
        edge_shift: Tensor,
        charge: Tensor,
        spin: Tensor,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Owner-mapped evaluation: energies [N] (eV), forces [N, 3] (eV/Å), virial [6] (eV).

        For an engine that holds every atom of a periodic system (LAMMPS on one rank): rows are
        the owned atoms only; each periodic-image neighbour is mapped back to the atom it images,
        with ``edge_shift`` [E, 3] (Å) = image position - owner position, so the displacement is
        ``positions[j] - positions[i] + edge_shift``. The model then runs on N atoms instead of
        the whole receptive-field ghost shell. The virial is -Σ_edges r ⊗ ∂E/∂r in LAMMPS order
        (xx, yy, zz, xy, xz, yz), equal to Σ x·f over atoms and images.
        """
        positions, numbers, charge, spin = self._prepare_engine(positions, numbers, charge, spin)
        dtype = positions.dtype
        device = positions.device
        i, j, shift = self._engine_pairs(positions, edge_i, edge_j, edge_shift)
        shift = shift.detach().requires_grad_(True)
        n_atoms = positions.shape[0]
        q, m = self._per_atom_state(charge, spin, n_atoms)
        if self.low_memory:
            energies, grads = self._checkpointed_gradients(
                positions, numbers, q, m, i, j, shift, [positions, shift])
        else:
            energies, _ = self.atom_energies_from_pairs(positions, numbers, q, m, i, j, shift)
            grads = torch.autograd.grad([energies.sum()], [positions, shift], allow_unused=True)
        g_pos = grads[0]
        g_shift = grads[1]
        forces = -g_pos if g_pos is not None else torch.zeros_like(positions)
        virial = torch.zeros(6, dtype=dtype, device=device)
        if g_shift is not None:
            with torch.no_grad():
                vec = positions.detach()[j] - positions.detach()[i] + shift.detach()
                w = -(vec.unsqueeze(2) * g_shift.unsqueeze(1)).sum(0)
                virial = torch.stack([w[0, 0], w[1, 1], w[2, 2], w[0, 1], w[0, 2], w[1, 2]])
        return energies.detach(), forces, virial

