"""Forces and virials with one layer's activations in memory at a time (activation
checkpointing), for large systems; same values as the plain autograd path."""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .cell_products import rows_times
from .neighbors import neighbor_pairs


class LowMemoryGradients:
    """Mixin of :class:`~transip_md.model.potential.TransIPPotential`."""

    def _gradients_low_memory(
        self,
        positions: Tensor,
        numbers: Tensor,
        cell: Tensor,
        pbc: Tensor,
        charge: Tensor,
        spin: Tensor,
        strain: Tensor,
        inputs: List[Tensor],
    ) -> Tuple[Tensor, List[Optional[Tensor]]]:
        """Per-atom energies and d(sum)/d(inputs) holding one layer's autograd graph at a time.

        A forward sweep keeps only each layer's output tokens [N, W]; the backward sweep re-runs
        one layer at a time with autograd and hands its input gradient to the layer below
        (activation checkpointing). Edge features are detached leaves in the sweeps; they are
        recomputed with their graph at the end, and their accumulated gradients go through the
        edge encoder and the neighbour geometry to ``inputs`` in one last call. Same values as the plain path; memory is one layer's
        activations instead of all of them, for one extra forward pass.
        """
        i, j, s = neighbor_pairs(positions, cell, pbc, self.cutoff)
        deform = torch.eye(3, dtype=positions.dtype, device=positions.device) + strain
        shift = rows_times(s, rows_times(cell, deform))
        n_atoms = positions.shape[0]
        q, m = self._per_atom_state(charge, spin, n_atoms)
        return self._checkpointed_gradients(rows_times(positions, deform), numbers, q, m, i, j, shift,
                                            inputs)

    def _checkpointed_gradients(
        self,
        positions: Tensor,
        numbers: Tensor,
        q: Tensor,
        m: Tensor,
        i: Tensor,
        j: Tensor,
        shift: Tensor,
        inputs: List[Tensor],
    ) -> Tuple[Tensor, List[Optional[Tensor]]]:
        """The checkpointed sweeps of :meth:`_gradients_low_memory` for a pair list sorted by i
        (``positions[j] - positions[i] + shift``; q, m per atom)."""
        nbr_index, nbr_vec = self._dense_neighbors(positions, i, j, shift)
        net = self.network
        # Edge features without their graph during the sweeps (recomputed with it at the end).
        edge_fixed, env_fixed = net.edge_features(nbr_vec.detach())
        edge_fixed = edge_fixed.detach()
        env_fixed = env_fixed.detach()
        # Forward sweep: each layer's graph is dropped as soon as its output is detached.
        tokens: List[Tensor] = [net.embed(numbers, q, m).detach()]
        for layer in net.layers:
            tokens.append(layer(tokens[-1], nbr_index, edge_fixed, env_fixed).detach())
        last = tokens[-1].requires_grad_(True)
        energies = net.atom_energies(last, numbers)
        grad_h = torch.autograd.grad([energies.sum()], [last])[0]
        edge_leaf = edge_fixed.requires_grad_(True)
        env_leaf = env_fixed.requires_grad_(True)
        grad_edge = torch.zeros_like(edge_fixed)
        grad_env = torch.zeros_like(env_fixed)
        for index in range(self.num_layers - 1, -1, -1):
            h_in = tokens[index].requires_grad_(index > 0)
            out = net.run_layer(index, h_in, nbr_index, edge_leaf, env_leaf)
            wrt = [edge_leaf, env_leaf, h_in] if index > 0 else [edge_leaf, env_leaf]
            seed: List[Optional[Tensor]] = [grad_h]
            grads = torch.autograd.grad([out], wrt, seed, allow_unused=True)
            g_edge, g_env = grads[0], grads[1]
            if g_edge is not None:
                grad_edge = grad_edge + g_edge
            if g_env is not None:
                grad_env = grad_env + g_env
            if index > 0:
                g_h = grads[2]
                grad_h = g_h if g_h is not None else torch.zeros_like(h_in)
        edge, envelope = net.edge_features(nbr_vec)
        seeds: List[Optional[Tensor]] = [grad_edge, grad_env]
        result = torch.autograd.grad([edge, envelope], inputs, seeds, allow_unused=True)
        return energies.detach(), result

