"""Learned equivariance, the TransIP paper's contribution.

The Transformer is not equivariant by construction. During training a small network g(h, R)
receives the per-atom embeddings h(x) of selected layers and a rotation R and predicts the
embeddings the Transformer produces for the rotated input, h(Rx). The equivariance loss is the
normalised squared difference between g(h(x), R) and h(Rx); minimising it with the energy and
force losses pushes the embedding space to transform predictably under rotations.

This module only holds training-time parts; nothing here is exported to engines.
"""

from typing import List, Optional

import torch
from torch import Tensor, nn

from .config import ModelConfig


def random_rotations(
    n: int, dtype: torch.dtype = torch.float64, generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> Tensor:
    """``n`` rotation matrices drawn uniformly (Haar measure) from SO(3).

    A normalised 4D Gaussian is a uniformly random unit quaternion, whose rotation matrix is
    Haar distributed.
    """
    q = torch.randn((n, 4), dtype=torch.float64, generator=generator)
    q = q / torch.linalg.norm(q, dim=1, keepdim=True)
    w, x, y, z = q.unbind(1)
    rot = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        ],
        dim=1,
    ).reshape(n, 3, 3)
    return rot.to(dtype=dtype, device=device)


class EquivarianceNetwork(nn.Module):
    """g_l(h, R) ≈ h_l(Rx) for each selected layer l (a residual MLP on [h, vec(R)])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layer_ids = [l if l >= 0 else cfg.layers + l for l in cfg.equivariance_layers]
        for l in self.layer_ids:
            if not 0 <= l < cfg.layers:
                raise ValueError(f"equivariance layer {l} is outside 0..{cfg.layers - 1}")
        self.maps = nn.ModuleList(
            nn.Sequential(
                nn.Linear(cfg.width + 9, cfg.equivariance_hidden),
                nn.SiLU(),
                nn.Linear(cfg.equivariance_hidden, cfg.equivariance_hidden),
                nn.SiLU(),
                nn.Linear(cfg.equivariance_hidden, cfg.width),
            )
            for _ in self.layer_ids
        )

    def forward(self, hidden: List[Tensor], rotation_per_atom: Tensor) -> List[Tensor]:
        r = rotation_per_atom.reshape(-1, 9).to(hidden[0].dtype)
        return [h_l + g(torch.cat([h_l, r], dim=1))
                for g, h_l in zip(self.maps, (hidden[l] for l in self.layer_ids))]

    def loss(self, hidden_x: List[Tensor], hidden_rx: List[Tensor], rotation_per_atom: Tensor) -> Tensor:
        """Normalised MSE between predicted and actual rotated embeddings, averaged over layers.

        Normalising by the variance of the target stops the trivial solution of shrinking all
        embeddings towards a constant.
        """
        preds = self.forward(hidden_x, rotation_per_atom)
        total = hidden_x[0].new_zeros(())
        for pred, l in zip(preds, self.layer_ids):
            target = hidden_rx[l]
            var = (target - target.mean(0, keepdim=True)).pow(2).sum(1).mean()
            total = total + (pred - target).pow(2).sum(1).mean() / (var + 1e-8)
        return total / len(self.layer_ids)
