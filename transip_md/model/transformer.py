"""The TransIP network: a plain (non-equivariant) Transformer over atoms.

Atoms are tokens. Each token starts from embeddings of its element, the system's total charge
and its spin multiplicity. Geometry enters only through the displacement vectors r_ij and the
distances to neighbours within the cutoff, as ordinary features, so the network is exactly
translation invariant and local, but rotation behaviour is *learned* (see ``equivariance.py``).

Each layer is pre-LayerNorm multi-head attention of an atom over itself and its neighbours,
followed by a feed-forward block. Keys and values of a neighbour are its token projections plus
projections of the edge features; each head also gets a distance-dependent logit bias. The
attention weight of a neighbour is multiplied by a smooth envelope that vanishes with its first
two derivatives at the cutoff, and the atom always attends to itself, so the energy and forces
are continuous when atoms cross the cutoff and an isolated atom is well defined.

Neighbours are held in a dense padded layout: ``nbr_index[N, K]`` with padding pointing at a
dummy token N, ``nbr_vec[N, K, 3]`` with padding at a distance beyond the cutoff (envelope 0).
"""

import math
from typing import List, Tuple

import torch
from torch import Tensor, nn

from .config import MAX_ABS_CHARGE, MAX_ATOMIC_NUMBER, MAX_MULTIPLICITY, ModelConfig


def polynomial_envelope(distance: Tensor, cutoff: float, exponent: int) -> Tensor:
    """1 at d=0, 0 at d>=cutoff, with vanishing first and second derivatives at the cutoff."""
    u = distance / cutoff
    p = float(exponent)
    a = -(p + 1.0) * (p + 2.0) / 2.0
    b = p * (p + 2.0)
    c = -p * (p + 1.0) / 2.0
    up = u.pow(exponent)
    env = 1.0 + a * up + b * up * u + c * up * u * u
    return torch.where(u < 1.0, env, torch.zeros_like(env))


class EdgeEncoder(nn.Module):
    """Non-equivariant edge features from the raw displacement vector and its length."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cutoff = float(cfg.cutoff)
        self.register_buffer("centers", torch.linspace(0.0, cfg.cutoff, cfg.num_rbf))
        self.gamma = float((cfg.num_rbf / cfg.cutoff) ** 2)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.num_rbf + 3, cfg.edge_width),
            nn.SiLU(),
            nn.Linear(cfg.edge_width, cfg.edge_width),
            nn.SiLU(),
        )

    def forward(self, vec: Tensor, distance: Tensor) -> Tensor:
        rbf = torch.exp(-self.gamma * (distance.unsqueeze(-1) - self.centers) ** 2)
        return self.mlp(torch.cat([rbf, vec / self.cutoff], dim=-1))


class AttentionLayer(nn.Module):
    """One pre-LN Transformer block with envelope-weighted neighbour attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.width // cfg.heads
        self.width = cfg.width
        self.norm_attn = nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        # edge -> key offset, value offset, per-head logit bias
        self.edge_proj = nn.Linear(cfg.edge_width, 2 * cfg.width + cfg.heads)
        self.self_kv = nn.Parameter(torch.zeros(2 * cfg.width))
        self.out = nn.Linear(cfg.width, cfg.width)
        self.norm_ffn = nn.LayerNorm(cfg.width)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.width, cfg.ffn_factor * cfg.width),
            nn.SiLU(),
            nn.Linear(cfg.ffn_factor * cfg.width, cfg.width),
        )

    def forward(self, h: Tensor, nbr_index: Tensor, edge: Tensor, envelope: Tensor) -> Tensor:
        n_atoms = h.shape[0]
        k_nbr_count = nbr_index.shape[1]
        H, D = self.heads, self.head_dim
        x = self.norm_attn(h)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        # dummy token N for padded slots
        pad = torch.zeros((1, self.width), dtype=x.dtype, device=x.device)
        k_all = torch.cat([k, pad], 0)
        v_all = torch.cat([v, pad], 0)
        e_k, e_v, e_bias = self.edge_proj(edge).split([self.width, self.width, H], dim=-1)
        # index_select, not k_all[nbr_index]: its backward is an atomic index_add, whereas
        # advanced-indexing backward serialises over repeated indices (every padding slot
        # points at the dummy row) and took 97 % of GPU time in training.
        flat = nbr_index.reshape(-1)
        k_nbr = (k_all.index_select(0, flat).view(n_atoms, k_nbr_count, self.width) + e_k)
        v_nbr = (v_all.index_select(0, flat).view(n_atoms, k_nbr_count, self.width) + e_v)
        k_nbr = k_nbr.view(n_atoms, k_nbr_count, H, D)
        v_nbr = v_nbr.view(n_atoms, k_nbr_count, H, D)
        s_k, s_v = self.self_kv.chunk(2)
        k_self = (k + s_k).view(n_atoms, H, D)
        v_self = (v + s_v).view(n_atoms, H, D)
        q = q.view(n_atoms, H, D)

        scale = 1.0 / math.sqrt(D)
        logit_self = (q * k_self).sum(-1) * scale  # [N, H]
        logit_nbr = torch.einsum("nhd,nkhd->nkh", q, k_nbr) * scale + e_bias  # [N, K, H]
        valid = (envelope > 0.0).unsqueeze(-1)
        # Max-subtraction for numerical safety; it cancels exactly in the ratio below.
        masked = torch.where(valid, logit_nbr, torch.full_like(logit_nbr, -1e30))
        m = torch.maximum(logit_self, masked.max(dim=1).values).detach()
        w_self = torch.exp(logit_self - m)
        safe = torch.where(valid, logit_nbr, m.unsqueeze(1))
        w_nbr = envelope.unsqueeze(-1) * torch.exp(safe - m.unsqueeze(1))
        denom = w_self + w_nbr.sum(1)
        mixed = w_self.unsqueeze(-1) * v_self + (w_nbr.unsqueeze(-1) * v_nbr).sum(1)
        mixed = (mixed / denom.unsqueeze(-1)).reshape(n_atoms, self.width)
        h = h + self.out(mixed)
        return h + self.ffn(self.norm_ffn(h))


class TransIPNetwork(nn.Module):
    """Per-atom energies from elements, charge, spin and a dense neighbour layout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cutoff = float(cfg.cutoff)
        self.envelope_exponent = int(cfg.envelope_exponent)
        self.charge_offset = MAX_ABS_CHARGE
        self.element_embedding = nn.Embedding(MAX_ATOMIC_NUMBER + 1, cfg.width)
        self.charge_embedding = nn.Embedding(2 * MAX_ABS_CHARGE + 1, cfg.width)
        self.spin_embedding = nn.Embedding(MAX_MULTIPLICITY, cfg.width)
        self.edge_encoder = EdgeEncoder(cfg)
        self.layers = nn.ModuleList([AttentionLayer(cfg) for _ in range(cfg.layers)])
        self.readout = nn.Sequential(
            nn.LayerNorm(cfg.width),
            nn.Linear(cfg.width, cfg.width),
            nn.SiLU(),
            nn.Linear(cfg.width, 1),
        )
        # Energy normalisation and per-element reference energies (set from training data).
        self.register_buffer("energy_scale", torch.ones(()))
        self.register_buffer("element_energy", torch.zeros(MAX_ATOMIC_NUMBER + 1))

    def forward(
        self,
        numbers: Tensor,
        charge: Tensor,
        spin: Tensor,
        nbr_index: Tensor,
        nbr_vec: Tensor,
    ) -> Tuple[Tensor, List[Tensor]]:
        """Per-atom energies (eV) and the per-layer token embeddings.

        Args:
            numbers: [N] atomic numbers.  charge, spin: [N] total charge / multiplicity of the
            system each atom belongs to.  nbr_index: [N, K] (padding = N).  nbr_vec: [N, K, 3] Å.
        """
        h = (
            self.element_embedding(numbers)
            + self.charge_embedding(charge + self.charge_offset)
            + self.spin_embedding(spin - 1)
        )
        distance = torch.linalg.norm(nbr_vec, dim=-1)
        envelope = polynomial_envelope(distance, self.cutoff, self.envelope_exponent)
        edge = self.edge_encoder(nbr_vec, distance)
        hidden: List[Tensor] = []
        for layer in self.layers:
            h = layer(h, nbr_index, edge, envelope)
            hidden.append(h)
        out = self.readout(h).squeeze(-1)
        energies = out * self.energy_scale + self.element_energy.index_select(0, numbers)
        return energies, hidden
