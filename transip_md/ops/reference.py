"""The fused operators' semantics in plain torch (the reference their tests and benchmarks use).

The same operations, in the same order, as the attention block of
:meth:`transip_md.model.transformer.AttentionLayer.forward`, with the operators' interfaces:
differentiable to any order through torch's autograd.
"""

from typing import Tuple

import torch
from torch import Tensor


def attention_weights(logit: Tensor, envelope: Tensor, logit_self: Tensor) -> Tuple[Tensor, Tensor]:
    """(a [R, K, H], a_self [R, H]): the envelope-weighted softmax over the slots and the self
    slot that both operators share (invalid slots, envelope <= 0, never read their logit)."""
    valid = (envelope > 0.0).unsqueeze(-1)
    masked = torch.where(valid, logit, torch.full_like(logit, -1e30))
    m = torch.maximum(logit_self, masked.max(dim=1).values).detach()
    u_self = torch.exp(logit_self - m)
    safe = torch.where(valid, logit, m.unsqueeze(1))
    u = envelope.unsqueeze(-1) * torch.exp(safe - m.unsqueeze(1))
    denom = u_self + u.sum(1)
    return u / denom.unsqueeze(1), u_self / denom


def neighbor_attention_reference(x: Tensor, gather_index: Tensor, edge: Tensor,
                                 envelope: Tensor, q_tok: Tensor, q_edge: Tensor, bias: Tensor,
                                 logit_self: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(agg_tok [R,H,W], agg_edge [R,H,E], a_sum [R,H], a_self [R,H]); see transip_md.ops."""
    n_rows, n_slots = gather_index.shape
    width = x.shape[1]
    x_nbr = x.index_select(0, gather_index.reshape(-1)).view(n_rows, n_slots, width)
    logit = (torch.bmm(x_nbr, q_tok.transpose(1, 2)) + torch.bmm(edge, q_edge.transpose(1, 2))
             + bias)  # [R, K, H]
    a, a_self = attention_weights(logit, envelope, logit_self)
    a_t = a.transpose(1, 2)
    return torch.bmm(a_t, x_nbr), torch.bmm(a_t, edge), a.sum(1), a_self


def neighbor_attention_qkv_reference(qkv: Tensor, gather_index: Tensor, edge: Tensor,
                                     envelope: Tensor, q_edge: Tensor, bias: Tensor,
                                     logit_self: Tensor, scale: float
                                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(agg_v [R,W], agg_edge [R,H,E], a_sum [R,H], a_self [R,H]) of the per-token key/value
    form; ``qkv`` [M, 3W], ``q_edge`` [H, R, E] (head-major); see transip_md.ops."""
    n_rows, n_slots = gather_index.shape
    heads = logit_self.shape[1]
    width = qkv.shape[1] // 3
    head_dim = width // heads
    q = qkv[:n_rows, :width].reshape(n_rows, heads, head_dim)
    flat = gather_index.reshape(-1)
    k_nbr = qkv[:, width:2 * width].index_select(0, flat).view(n_rows, n_slots, heads, head_dim)
    v_nbr = qkv[:, 2 * width:].index_select(0, flat).view(n_rows, n_slots, heads, head_dim)
    logit = (scale * torch.einsum("rkhd,rhd->rkh", k_nbr, q)
             + torch.einsum("rke,hre->rkh", edge, q_edge) + bias)
    a, a_self = attention_weights(logit, envelope, logit_self)
    agg_v = torch.einsum("rkh,rkhd->rhd", a, v_nbr).reshape(n_rows, width)
    return agg_v, torch.einsum("rkh,rke->rhe", a, edge), a.sum(1), a_self
