"""Energy with static tensor shapes and no host synchronisation, for CUDA-graph capture."""


import torch
from torch import Tensor

from .contract import entry_point


class StaticShapeEnergy:
    """Mixin of :class:`~transip_md.model.potential.TransIPPotential`: ``energy_static``."""

    @torch.jit.export
    @entry_point(1, "Tensor: total energy (eV), static shapes, NaN on neighbour overflow")
    def energy_static(
        self,
        positions: Tensor,
        numbers: Tensor,
        cell: Tensor,
        pbc: Tensor,
        charge: Tensor,
        spin: Tensor,
        capacity: int,
    ) -> Tensor:
        """Like :meth:`energy`, with static tensor shapes and no host synchronisation.

        For CUDA-graph capture (OpenMM-Torch ``useCUDAGraphs``): all-pairs minimum-image
        displacements, then the ``capacity`` nearest neighbours of each atom (``topk``), so
        every shape depends on N and ``capacity`` only. Neighbours beyond the cutoff get a zero
        envelope and contribute nothing. Requirements (not checked here, the caller checks):
        1 <= capacity <= N - 1, periodic cells at least 2 x cutoff wide, and at most
        ``capacity`` neighbours within the cutoff; if an atom has more, the energy is NaN
        (checked on the device, so a run stops instead of silently dropping neighbours).
        """
        positions, numbers, cell, pbc, charge, spin = self._prepare(
            positions, numbers, cell, pbc, charge, spin)
        n_atoms = positions.shape[0]
        pbc_f = pbc.to(positions.dtype)
        eye = torch.eye(3, dtype=positions.dtype, device=positions.device)
        # Open axes use the identity "cell" so that the inverse always exists.
        cell_eff = cell * pbc_f.unsqueeze(1) + eye * (1.0 - pbc_f).unsqueeze(1)
        # Select neighbours without autograd over the dense [N, N, 3] displacements, then
        # recompute only the selected ones differentiably: the backward pass then never touches
        # an N^2 tensor.
        # (detach(), not torch.no_grad(): under TorchScript the no_grad block gave wrong
        # gradients for the recomputed vectors below.)
        fixed = positions.detach()
        cell_fixed = cell_eff.detach()
        disp = fixed.unsqueeze(0) - fixed.unsqueeze(1)  # [i, j] = x_j - x_i
        # inv_ex, not inv: inv checks for singularity on the host (a device sync), which
        # breaks CUDA-graph capture; cell_eff is invertible by construction.
        frac = disp @ torch.linalg.inv_ex(cell_fixed)[0]
        image = torch.round(frac) * pbc_f  # lattice vectors to subtract (minimum image)
        disp = (frac - image) @ cell_fixed
        d2 = (disp * disp).sum(-1) + eye.new_full((n_atoms,), 1e30).diag()
        nearest, index = torch.topk(d2, capacity, dim=1, largest=False)
        nbr_image = image.gather(1, index.unsqueeze(-1).expand(n_atoms, capacity, 3))
        nbr_pos = positions.index_select(0, index.reshape(-1)).view(n_atoms, capacity, 3)
        nbr_vec = nbr_pos - positions.unsqueeze(1) - nbr_image @ cell_eff
        q, m = self._per_atom_state(charge, spin, n_atoms)
        energies, _ = self.network(numbers, q, m, index, nbr_vec)
        energy = energies.sum()
        if capacity < n_atoms - 1:  # otherwise every atom is a neighbour: no overflow possible
            overflow = (nearest[:, capacity - 1] < self.cutoff * self.cutoff).any()
            energy = energy + torch.where(overflow, torch.full_like(energy, float("nan")),
                                          torch.zeros_like(energy))
        return energy

