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

With ``edge_filter`` (off by default; issue #17's accuracy study) each gathered neighbour
token is first multiplied by (1 + F e_ij), a learned per-channel function of the edge features,
so that a neighbour's element and its geometry enter its key and value jointly instead of as a
sum (SchNet's continuous filter inside the attention). What comes from the paper and what is
ours: atoms as tokens, a plain non-equivariant Transformer, energies invariant and forces by
gradient, and learned equivariance through a rotation-conditioned network are the paper's; the
local (cutoff) attention with edge features, the per-head distance bias, the envelope weights,
the self token, the charge/spin embeddings and the edge filter are our choices. The paper
attends over all atoms with rotary encodings of centred coordinates; here attention stays within
the cutoff (the local contract LAMMPS' domain decomposition needs); ``rotary_keys`` (off by
default) adds rotary encodings of the relative positions r_ij inside it, our local form of the
paper's encoding (the edge tensor then carries r_ij in its last 3 channels for the layers).

Neighbours are held in a dense padded layout: ``nbr_index[N, K]`` with padding pointing at a
dummy token N, ``nbr_vec[N, K, 3]`` with padding at a distance beyond the cutoff (envelope 0).
"""

import math
from typing import List, Tuple

import torch
from torch import Tensor, nn

from .config import MAX_ABS_CHARGE, MAX_ATOMIC_NUMBER, MAX_MULTIPLICITY, ModelConfig


def polynomial_envelope(distance: Tensor, cutoff: float, exponent: int) -> Tensor:
    """1 at d=0, 0 at d>=cutoff, with vanishing first and second derivatives at the cutoff.

    The polynomial 1 + a u^p + b u^(p+1) + c u^(p+2) (u = d / cutoff, a = -(p+1)(p+2)/2,
    b = p(p+2), c = -p(p+1)/2) has a triple root at u = 1 and is evaluated in that factored
    form, (1 - u)^3 sum_{k<p} C(k+2, 2) u^k: positive and accurate up to the cutoff. Expanded,
    its terms cancel there to rounding noise of either sign (float64: +-5e-15 within 1e-4 Å of
    a 5 Å cutoff; float32 much wider), which flipped the attention mask ``envelope > 0`` at
    random and made the forces jump by ~1e-9 eV/Å under 1e-15 Å moves.
    """
    u = distance / cutoff
    series = torch.zeros_like(u)
    for k in range(exponent - 1, -1, -1):  # Horner: sum_k C(k+2, 2) u^k
        series = series * u + float((k + 1) * (k + 2) // 2)
    w = 1.0 - u
    env = w * w * w * series
    return torch.where(u < 1.0, env, torch.zeros_like(env))


class EdgeEncoder(nn.Module):
    """Non-equivariant edge features from the raw displacement vector and its length."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cutoff = float(cfg.cutoff)
        self.register_buffer("centers", torch.linspace(0.0, cfg.cutoff, cfg.num_rbf))
        # gamma = 1 / (2 sigma^2); rbf_width_factor scales sigma (1.0: the original basis).
        self.gamma = float((cfg.num_rbf / cfg.cutoff) ** 2 / cfg.rbf_width_factor ** 2)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.num_rbf + 3, cfg.edge_width),
            nn.SiLU(),
            nn.Linear(cfg.edge_width, cfg.edge_width),
            nn.SiLU(),
        )

    def forward(self, vec: Tensor, distance: Tensor) -> Tensor:
        rbf = torch.exp(-self.gamma * (distance.unsqueeze(-1) - self.centers) ** 2)
        return self.mlp(torch.cat([rbf, vec / self.cutoff], dim=-1))


def rotary_frequencies(pairs: int, cutoff: float, dtype: torch.dtype,
                       device: torch.device) -> Tuple[Tensor, Tensor]:
    """(omega [pairs] in rad/Å, axis [pairs]) of ``rotary_keys``: channel pair p of every head
    turns with the component ``axis[p]`` (x, y, z in turn) of r_ij, wavelengths geometric from
    twice the cutoff (smooth over the neighbourhood) down to 1 Å (a bond length). Computed where
    used, not stored: buffers would add tensor records to every exported file, rotary or not."""
    longest = 2.0 * cutoff
    ratio = torch.arange(pairs, dtype=torch.float64, device=device) / float(max(pairs - 1, 1))
    wavelength = longest * torch.pow(torch.full_like(ratio, 1.0 / longest), ratio)
    omega = (2.0 * math.pi / wavelength).to(dtype)
    return omega, torch.arange(pairs, device=device) % 3


class AttentionLayer(nn.Module):
    """One pre-LN Transformer block with envelope-weighted neighbour attention.

    The parameters define per-edge keys and values ``k_ij = Wk x_j + bk + Wek e_ij + bek`` and
    ``v_ij = Wv x_j + bv + Wev e_ij + bev`` (x = normalised tokens, e = edge features). They are
    never materialised: both are linear, so the layer instead folds ``Wk`` into the query
    (``q~ = Wk_h^T q_h``, one [W] vector per head) and applies ``Wv`` after aggregation
    (``Wv_h Σ_j a_ij x_j``). Per edge only the gathered token ``x_j`` is held, once, and both the
    logits and the aggregation are batched matrix products. Same function, same parameters,
    about a third of the memory traffic of the per-edge form.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.width // cfg.heads
        self.width = cfg.width
        self.edge_width = cfg.edge_width
        self.norm_attn = nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        # edge -> key offset, value offset, per-head logit bias
        self.edge_proj = nn.Linear(cfg.edge_width, 2 * cfg.width + cfg.heads)
        self.self_kv = nn.Parameter(torch.zeros(2 * cfg.width))
        self.edge_filter = bool(cfg.edge_filter)
        if self.edge_filter:  # F of the filtered tokens x_j (1 + F e_ij), zero at the start
            self.filter = nn.Linear(cfg.edge_width, cfg.width)
            nn.init.zeros_(self.filter.weight)
            nn.init.zeros_(self.filter.bias)
        else:  # no parameters: state dicts of plain layers stay as they were
            self.filter = nn.Identity()
        self.rotary_keys = bool(cfg.rotary_keys)
        self.cutoff = float(cfg.cutoff)  # the rotary wavelengths' scale
        self.out = nn.Linear(cfg.width, cfg.width)
        self.norm_ffn = nn.LayerNorm(cfg.width)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.width, cfg.ffn_factor * cfg.width),
            nn.SiLU(),
            nn.Linear(cfg.ffn_factor * cfg.width, cfg.width),
        )

    def forward(self, h: Tensor, nbr_index: Tensor, edge: Tensor, envelope: Tensor) -> Tensor:
        """New embeddings of the first ``R = nbr_index.shape[0]`` atoms of ``h`` [M >= R, W].

        ``nbr_index`` [R, K] indexes rows of ``h`` (padding = M); ``edge`` [R, K, E] and
        ``envelope`` [R, K] belong to those slots. With R < M the extra rows of ``h`` are
        neighbours only (ghost atoms of an engine's domain decomposition).
        """
        vec = edge  # read only with rotary_keys
        if self.rotary_keys:  # r_ij rides in the last 3 channels (edge_features); sliced only
            # here: a slice's backward writes a full-size gradient, in every layer of every model
            vec = edge[..., self.edge_width:]
            edge = edge[..., :self.edge_width]
        x, gather_index, q_tok, q_edge, bias, logit_self, v_self = self._queries(h, nbr_index, edge)
        n_rows, n_slots = gather_index.shape[0], gather_index.shape[1]
        # index_select, not x[nbr_index]: advanced-indexing backward serialises over repeated
        # indices and took 97 % of GPU time in training.
        x_nbr = x.index_select(0, gather_index.reshape(-1)).view(n_rows, n_slots, self.width)
        if self.edge_filter:  # the neighbour's token filtered by its geometry (config.py)
            x_nbr = x_nbr * (1.0 + self.filter(edge))
        if self.rotary_keys:  # q_tok is q [R, H, D]: token keys per edge, rotated by r_ij
            logit_tok = self._rotary_logits(q_tok, x_nbr, vec)
        else:
            logit_tok = torch.bmm(x_nbr, q_tok.transpose(1, 2))
        logit_nbr = logit_tok + torch.bmm(edge, q_edge.transpose(1, 2)) + bias  # [R, K, H]

        valid = (envelope > 0.0).unsqueeze(-1)
        # Max-subtraction for numerical safety; it cancels exactly in the ratio below.
        masked = torch.where(valid, logit_nbr, torch.full_like(logit_nbr, -1e30))
        m = torch.maximum(logit_self, masked.max(dim=1).values).detach()
        w_self = torch.exp(logit_self - m)
        safe = torch.where(valid, logit_nbr, m.unsqueeze(1))
        w_nbr = envelope.unsqueeze(-1) * torch.exp(safe - m.unsqueeze(1))  # [R, K, H]
        denom = w_self + w_nbr.sum(1)

        # Values: aggregate x_j and e_ij with the weights, then apply Wv / Wev per head.
        w_t = w_nbr.transpose(1, 2)  # [R, H, K]
        mixed = self._values(torch.bmm(w_t, x_nbr), torch.bmm(w_t, edge), w_nbr.sum(1), w_self,
                             v_self)
        return self._finish(h, mixed / denom.unsqueeze(-1))

    def _rotary_logits(self, q: Tensor, x_nbr: Tensor, vec: Tensor) -> Tensor:
        """Token part of the logits [R, K, H] with rotary keys: q_i,h . R(r_ij) k_ij,h, k_ij =
        Wk x_ij + bk (x_ij the gathered, maybe filtered, token), R rotating channel pairs
        (2p, 2p + 1) of each head by omega_p (r_ij)_{axis p}."""
        n_rows, n_slots = x_nbr.shape[0], x_nbr.shape[1]
        W, H, D = self.width, self.heads, self.head_dim
        k = nn.functional.linear(x_nbr, self.qkv.weight[W:2 * W], self.qkv.bias[W:2 * W])
        k = k.view(n_rows, n_slots, H, D // 2, 2)
        omega, axis = rotary_frequencies(D // 2, self.cutoff, vec.dtype, vec.device)
        angle = (vec.index_select(-1, axis) * omega).unsqueeze(2)
        cos, sin = torch.cos(angle), torch.sin(angle)  # [R, K, 1, D / 2]
        k_a, k_b = k[..., 0], k[..., 1]
        q2 = q.view(n_rows, 1, H, D // 2, 2)
        return ((k_a * cos - k_b * sin) * q2[..., 0] + (k_a * sin + k_b * cos) * q2[..., 1]).sum(-1)

    # The parts before and after the attention weights, shared with the fused layer
    # (fused_attention.py), which replaces only the block between them by one operator.
    def _queries(
        self, h: Tensor, nbr_index: Tensor, edge: Tensor
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(x, gather_index, q_tok, q_edge, bias, logit_self, v_self): normalised tokens [M, W],
        neighbour rows [R, K], the query folded with Wk [R, H, W] and Wek [R, H, E], the
        per-slot logit bias [R, K, H], the self logit [R, H] and the self value [R, H, D]."""
        n_rows = nbr_index.shape[0]
        W, H, D, E = self.width, self.heads, self.head_dim, self.edge_width
        x = self.norm_attn(h)
        w_k = self.qkv.weight[W:2 * W]
        b_k = self.qkv.bias[W:2 * W]
        w_ek, w_eb = self.edge_proj.weight[:W], self.edge_proj.weight[2 * W:]
        b_ek, b_eb = self.edge_proj.bias[:W], self.edge_proj.bias[2 * W:]
        s_k, s_v = self.self_kv.chunk(2)
        # Without ghost rows (every engine but a multi-rank LAMMPS halo) no slice: its backward
        # would add a zero fill and a copy of [M, W] per use.
        x_rows = x if n_rows == x.shape[0] else x[:n_rows]
        scale = 1.0 / math.sqrt(D)
        # q, the self key and the self value from one product with the qkv weights.
        q, k_self, v_self = self.qkv(x_rows).split([W, W, W], dim=1)
        q = (q * scale).view(n_rows, H, D)

        # Padded slots (index M) have envelope 0 and never contribute; here they read the row's
        # own token instead of a shared dummy row, so that the backward index_add spreads their
        # (zero) gradients over all rows instead of piling every padding slot's atomic adds onto
        # one row (that contention made the index_add the largest kernel on a GPU).
        own_row = torch.arange(n_rows, device=nbr_index.device).unsqueeze(1)
        gather_index = torch.where(nbr_index < h.shape[0], nbr_index, own_row)

        # Logits q.k_ij with Wk and Wek folded into the query: one batched product per head
        # with [Wk_h | Wek_h], split into the token part [R, H, W] and the edge part [R, H, E].
        w_fold = torch.cat([w_k.view(H, D, W), w_ek.view(H, D, E)], dim=2)  # [H, D, W + E]
        q_fold = torch.bmm(q.transpose(0, 1), w_fold).transpose(0, 1)  # [R, H, W + E]
        q_tok, q_edge = q_fold.split([W, E], dim=2)
        q_bias = (q * (b_k + b_ek).view(H, D)).sum(-1)  # [R, H]
        if self.rotary_keys:  # token keys are formed (and rotated) per edge, bk with them
            q_tok = q
            q_bias = (q * b_ek.view(H, D)).sum(-1)
        bias = nn.functional.linear(edge, w_eb, b_eb) + q_bias.unsqueeze(1)  # [R, K, H]
        logit_self = (q * (k_self + s_k).view(n_rows, H, D)).sum(-1)  # [R, H]
        v_self = (v_self + s_v).view(n_rows, H, D)
        return x, gather_index, q_tok, q_edge, bias, logit_self, v_self

    def _values(self, agg_tok: Tensor, agg_edge: Tensor, w_sum: Tensor, w_self: Tensor,
                v_self: Tensor) -> Tensor:
        """Attention output [R, H, D] from the weighted sums of neighbour tokens [R, H, W] and
        edges [R, H, E], the summed neighbour weights [R, H] and the self weight [R, H]."""
        W, H, D, E = self.width, self.heads, self.head_dim, self.edge_width
        w_v = self.qkv.weight[2 * W:]
        b_v = self.qkv.bias[2 * W:]
        w_ev = self.edge_proj.weight[W:2 * W]
        b_ev = self.edge_proj.bias[W:2 * W]
        return (
            torch.einsum("nhw,hdw->nhd", agg_tok, w_v.view(H, D, W))
            + torch.einsum("nhe,hde->nhd", agg_edge, w_ev.view(H, D, E))
            + w_sum.unsqueeze(-1) * (b_v + b_ev).view(H, D)
            + w_self.unsqueeze(-1) * v_self
        )

    def _finish(self, h: Tensor, mixed: Tensor) -> Tensor:
        """Output projection, residual and feed-forward block of the normalised ``mixed``."""
        n_rows = mixed.shape[0]
        h_rows = h if n_rows == h.shape[0] else h[:n_rows]
        out = h_rows + self.out(mixed.reshape(n_rows, self.width))
        return out + self.ffn(self.norm_ffn(out))


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
        self.rotary_keys = bool(cfg.rotary_keys)
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

    def embed(self, numbers: Tensor, charge: Tensor, spin: Tensor) -> Tensor:
        """Initial tokens [N, W]: element + total charge + multiplicity (no geometry)."""
        return (
            self.element_embedding(numbers)
            + self.charge_embedding(charge + self.charge_offset)
            + self.spin_embedding(spin - 1)
        )

    def edge_features(self, nbr_vec: Tensor) -> Tuple[Tensor, Tensor]:
        """Edge features [R, K, E] and cutoff envelope [R, K] of displacement vectors [R, K, 3]."""
        distance = torch.linalg.norm(nbr_vec, dim=-1)
        envelope = polynomial_envelope(distance, self.cutoff, self.envelope_exponent)
        edge = self.edge_encoder(nbr_vec, distance)
        if self.rotary_keys:  # the layers' rotary encoding reads r_ij from the last 3 channels
            edge = torch.cat([edge, nbr_vec.to(edge.dtype)], dim=-1)
        return edge, envelope

    def run_layer(
        self, index: int, h: Tensor, nbr_index: Tensor, edge: Tensor, envelope: Tensor
    ) -> Tensor:
        """Layer ``index`` alone (engines that exchange features between layers call this)."""
        out = h
        for k, layer in enumerate(self.layers):
            if k == index:
                out = layer(h, nbr_index, edge, envelope)
        return out

    def atom_energies(self, h: Tensor, numbers: Tensor) -> Tensor:
        """Per-atom energies (eV) from final tokens [R, W] of atoms with ``numbers`` [R]."""
        out = self.readout(h).squeeze(-1)
        return out * self.energy_scale + self.element_energy.index_select(0, numbers)

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
        h = self.embed(numbers, charge, spin)
        edge, envelope = self.edge_features(nbr_vec)
        hidden: List[Tensor] = []
        for layer in self.layers:
            h = layer(h, nbr_index, edge, envelope)
            hidden.append(h)
        return self.atom_energies(h, numbers), hidden
