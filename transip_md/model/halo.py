"""The network in pieces for domain decomposition (export/CONTRACT.md, halo exchange): an
engine exchanges per-atom features of boundary atoms between layers (forward communication)
and sends the gradients its ghost atoms received back to their owners (reverse communication)."""

from typing import Tuple

import torch
from torch import Tensor

from .contract import entry_point


class HaloExchangeEntries:
    """Mixin of :class:`~transip_md.model.potential.TransIPPotential`: ``halo_*``."""

    @torch.jit.export
    @entry_point(1, "int: features per atom exchanged between layers")
    def halo_feature_width(self) -> int:
        """W: the number of features per atom exchanged between layers."""
        return int(self.network.element_embedding.weight.shape[1])

    @torch.jit.export
    @entry_point(1, "Tuple[Tensor, Tensor, Tensor]: nbr_index, edge, envelope of local atoms")
    def halo_edges(
        self,
        positions: Tensor,
        numbers: Tensor,
        edge_i: Tensor,
        edge_j: Tensor,
        nlocal: int,
        charge: Tensor,
        spin: Tensor,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Dense neighbour layout and edge features of the ``nlocal`` local atoms.

        ``positions`` [Ntot, 3] Å (local atoms first, then ghosts, at their image positions;
        differentiable: the engine passes a leaf and later back-propagates through ``edge`` and
        ``envelope`` to it); ``numbers`` [Ntot]; ``edge_i``, ``edge_j`` the engine's neighbour
        pairs. Pairs beyond the cutoff and pairs whose centre is not local are dropped.
        Returns ``nbr_index`` [nlocal, K] (rows of the feature matrix, padding = Ntot),
        ``edge`` [nlocal, K, E] and ``envelope`` [nlocal, K]. Validates the inputs like the
        other entry points (element, charge, spin, atoms at the same position).
        """
        n_total = positions.shape[0]
        if nlocal < 0 or nlocal > n_total:
            raise ValueError(
                "nlocal = " + str(nlocal) + " is outside 0.." + str(n_total) + " (atoms given)"
            )
        # The engine back-propagates to its own positions leaf: keep the graph.
        positions, numbers, charge, spin = self._prepare_engine(
            positions, numbers, charge, spin, False)
        edge_i = edge_i.to(positions.device)
        edge_j = edge_j.to(positions.device)
        local = edge_i < nlocal
        edge_i = edge_i[local]
        edge_j = edge_j[local]
        zero_shift = torch.zeros((edge_i.shape[0], 3), dtype=positions.dtype,
                                 device=positions.device)
        i, j, shift = self._engine_pairs(positions, edge_i, edge_j, zero_shift)
        nbr_index, nbr_vec = self._dense_neighbors(positions, i, j, shift, nlocal)
        edge, envelope = self.network.edge_features(nbr_vec)
        return nbr_index, edge, envelope

    @torch.jit.export
    @entry_point(1, "Tensor: input features [Ntot, W]")
    def halo_embed(self, numbers: Tensor, charge: Tensor, spin: Tensor) -> Tensor:
        """Input features h0 [Ntot, W] of local and ghost atoms (no geometry: no exchange)."""
        device = self.network.energy_scale.device
        numbers = numbers.to(device=device, dtype=torch.long)
        n_total = numbers.shape[0]
        q, m = self._per_atom_state(charge.to(device), spin.to(device), n_total)
        return self.network.embed(numbers, q, m)

    @torch.jit.export
    @entry_point(1, "Tensor: features [nlocal, W] after one layer")
    def halo_layer(
        self, layer: int, h: Tensor, nbr_index: Tensor, edge: Tensor, envelope: Tensor
    ) -> Tensor:
        """Attention layer ``layer`` (0-based) on the local atoms: new features [nlocal, W] from
        ``h`` [Ntot, W] of local and ghost atoms (ghost rows as their owners computed them)."""
        if layer < 0 or layer >= self.num_layers:
            raise ValueError(
                "layer " + str(layer) + " does not exist (the model has " + str(self.num_layers)
                + " layers)"
            )
        dtype = self.network.energy_scale.dtype
        device = self.network.energy_scale.device
        h = h.to(device=device, dtype=dtype)
        nbr_index = nbr_index.to(device)
        return self.network.run_layer(layer, h, nbr_index, edge, envelope)

    @torch.jit.export
    @entry_point(1, "Tensor: per-atom energies [nlocal] (eV)")
    def halo_readout(self, h: Tensor, numbers: Tensor) -> Tensor:
        """Per-atom energies [nlocal] (eV) from the last layer's features of the local atoms."""
        dtype = self.network.energy_scale.dtype
        device = self.network.energy_scale.device
        h = h.to(device=device, dtype=dtype)
        numbers = numbers.to(device=device, dtype=torch.long)
        return self.network.atom_energies(h, numbers)

