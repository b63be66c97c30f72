"""Learned equivariance, the TransIP paper's contribution.

The Transformer is not equivariant by construction. Two training-time objectives push its
embedding space to transform predictably under rotations; both see the embeddings h(x) of
selected layers for a structure x and h(Rx) for the same structure rotated by a Haar-random R.

* ``learned`` / ``learned-mse`` (:class:`EquivarianceNetwork`, this project's first objective):
  a small network g(h, R) predicts the *per-atom* embeddings h(Rx) from h(x) and R; the loss is
  the squared difference normalised by the target's variance.
* ``learned-contrastive`` (:class:`ContrastiveEquivariance`, the paper's objective): a
  per-structure (pooled) embedding z(x), a small network T(z, R) conditioned on the relative
  rotation of the two views, and an InfoNCE loss over the batch: T(z(x), R) must be closer (in
  cosine similarity / temperature) to z(Rx) than to the rotated views of the other structures
  in the batch. Optionally the per-atom MSE above is added (``contrastive_mse_weight``).

What is taken from the paper (arXiv 2510.00027): pooled structure embeddings, a transformation
network conditioned on the relative rotation, a contrastive (InfoNCE-style) alignment of the
transformed embedding with the rotated view's embedding, trained jointly with the energy and
force losses on both views. What is our choice (not fixed by the paper as we use it): mean
pooling over a structure's atoms; T as a residual MLP on [z, vec(R)] (the 3x3 matrix, 9
numbers, as the rotation's encoding); cosine similarity; a symmetric InfoNCE (both directions);
the batch's other structures as the only negatives; temperature default 0.1; the layers used
(``ModelConfig.equivariance_layers``, default the last); the optional per-atom MSE term.

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


def selected_layers(cfg: ModelConfig) -> List[int]:
    """The layers named by ``cfg.equivariance_layers`` (negative = from the end), checked."""
    layer_ids = [l if l >= 0 else cfg.layers + l for l in cfg.equivariance_layers]
    for l in layer_ids:
        if not 0 <= l < cfg.layers:
            raise ValueError(f"equivariance layer {l} is outside 0..{cfg.layers - 1}")
    return layer_ids


def rotation_conditioned_maps(cfg: ModelConfig, count: int) -> nn.ModuleList:
    """``count`` MLPs on [embedding, vec(R)] -> embedding, the learned rotation action shared by
    both objectives (same layout, so checkpoints keep their parameter names)."""
    return nn.ModuleList(
        nn.Sequential(
            nn.Linear(cfg.width + 9, cfg.equivariance_hidden),
            nn.SiLU(),
            nn.Linear(cfg.equivariance_hidden, cfg.equivariance_hidden),
            nn.SiLU(),
            nn.Linear(cfg.equivariance_hidden, cfg.width),
        )
        for _ in range(count)
    )


class EquivarianceNetwork(nn.Module):
    """g_l(h, R) ≈ h_l(Rx) for each selected layer l (a residual MLP on [h, vec(R)])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layer_ids = selected_layers(cfg)
        self.maps = rotation_conditioned_maps(cfg, len(self.layer_ids))

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


def pool_per_structure(h: Tensor, system: Tensor, n_systems: int) -> Tensor:
    """Mean of per-atom rows ``h`` [N, W] over each structure (``system`` [N]) -> [B, W]."""
    total = h.new_zeros((n_systems, h.shape[1])).index_add(0, system, h)
    count = h.new_zeros((n_systems,)).index_add(0, system, h.new_ones((h.shape[0],)))
    return total / count.clamp_min(1.0).unsqueeze(1)


def info_nce(pred: Tensor, target: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE between rows of ``pred`` and ``target`` [B, W] (row b matches row b).

    Similarities are cosines divided by ``temperature``; the loss is the mean cross entropy of
    picking the matching row, from pred to target and from target to pred. With one row it is
    0 (there is nothing to contrast with).
    """
    if temperature <= 0:
        raise ValueError(f"contrastive temperature must be positive, got {temperature}")
    p = nn.functional.normalize(pred, dim=1)
    t = nn.functional.normalize(target, dim=1)
    logits = p @ t.transpose(0, 1) / temperature
    labels = torch.arange(pred.shape[0], device=pred.device)
    return 0.5 * (nn.functional.cross_entropy(logits, labels)
                  + nn.functional.cross_entropy(logits.transpose(0, 1), labels))


class ContrastiveEquivariance(nn.Module):
    """T_l(z, R) ≈ z_l(Rx) for pooled embeddings z_l of each selected layer l, scored by InfoNCE.

    ``rotation`` is the relative rotation between the two views (one per structure), so T is
    conditioned on R exactly as the per-atom network g is.
    """

    def __init__(self, cfg: ModelConfig, temperature: float = 0.1):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"contrastive temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.layer_ids = selected_layers(cfg)
        self.maps = rotation_conditioned_maps(cfg, len(self.layer_ids))

    def transform(self, k: int, z: Tensor, rotation: Tensor) -> Tensor:
        """T_k(z, R) for pooled embeddings z [B, W] and rotations [B, 3, 3]."""
        r = rotation.reshape(-1, 9).to(z.dtype)
        return z + self.maps[k](torch.cat([z, r], dim=1))

    def loss(self, hidden_x: List[Tensor], hidden_rx: List[Tensor], rotation: Tensor,
             system: Tensor) -> Tensor:
        """InfoNCE between T(z(x), R) and z(Rx), averaged over the selected layers.

        ``rotation`` [B, 3, 3] is per structure, ``system`` [N] maps atoms to structures.
        """
        n = int(rotation.shape[0])
        total = hidden_x[0].new_zeros(())
        for k, l in enumerate(self.layer_ids):
            z = pool_per_structure(hidden_x[l], system, n)
            z_rot = pool_per_structure(hidden_rx[l], system, n)
            total = total + info_nce(self.transform(k, z, rotation), z_rot, self.temperature)
        return total / len(self.layer_ids)
