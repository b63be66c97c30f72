"""The fused operator's semantics in plain torch (the reference its tests and benchmark use).

The same operations, in the same order, as the attention block of
:meth:`transip_md.model.transformer.AttentionLayer.forward`, with the operator's interface:
differentiable to any order through torch's autograd.
"""

from typing import Tuple

import torch
from torch import Tensor


def neighbor_attention_reference(x: Tensor, gather_index: Tensor, edge: Tensor,
                                 envelope: Tensor, q_tok: Tensor, q_edge: Tensor, bias: Tensor,
                                 logit_self: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(agg_tok [R,H,W], agg_edge [R,H,E], a_sum [R,H], a_self [R,H]); see transip_md.ops."""
    n_rows, n_slots = gather_index.shape
    width = x.shape[1]
    x_nbr = x.index_select(0, gather_index.reshape(-1)).view(n_rows, n_slots, width)
    logit = (torch.bmm(x_nbr, q_tok.transpose(1, 2)) + torch.bmm(edge, q_edge.transpose(1, 2))
             + bias)  # [R, K, H]
    valid = (envelope > 0.0).unsqueeze(-1)
    masked = torch.where(valid, logit, torch.full_like(logit, -1e30))
    m = torch.maximum(logit_self, masked.max(dim=1).values).detach()
    u_self = torch.exp(logit_self - m)
    safe = torch.where(valid, logit, m.unsqueeze(1))
    u = envelope.unsqueeze(-1) * torch.exp(safe - m.unsqueeze(1))
    denom = u_self + u.sum(1)
    a = u / denom.unsqueeze(1)
    a_t = a.transpose(1, 2)
    return torch.bmm(a_t, x_nbr), torch.bmm(a_t, edge), a.sum(1), u_self / denom
