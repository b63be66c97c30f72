"""Accuracy and equivariance metrics of a potential on labelled frames."""

from collections import defaultdict
from typing import Dict, List, Sequence

import numpy as np
import torch

from .data.frames import Frame
from .data.splits import batches_by_atoms
from .model.potential import TransIPPotential
from .batch import collate, make_rotations, predict, rotate_batch
from .units import MEV_PER_EV


def _device_dtype(potential: TransIPPotential):
    p = potential.network.energy_scale
    return p.device, p.dtype


def _predict(potential, batch):
    """Energies [B] and forces [N, 3] of a batch. A model without the eager batched path (an
    exported file behind evaluate's adapter) provides ``predict_batch(batch)`` instead."""
    predict_batch = getattr(potential, "predict_batch", None)
    if predict_batch is not None:
        return predict_batch(batch)
    energy, forces, _ = predict(potential, batch)
    return energy, forces


def accuracy(
    potential: TransIPPotential, frames: Sequence[Frame], batch_atoms: int = 2048
) -> Dict[str, object]:
    """Energy MAE (meV/atom) and force MAE (meV/Å), overall and per ``source`` prefix."""
    device, dtype = _device_dtype(potential)
    e_err: Dict[str, List[float]] = defaultdict(list)
    f_err: Dict[str, List[float]] = defaultdict(list)
    for frames_b in batches_by_atoms(list(frames), batch_atoms, shuffle=False, seed=0):
        batch = collate(frames_b, dtype, device, potential.cutoff)
        energy, forces = _predict(potential, batch)
        energy = energy.detach().cpu().numpy()
        forces = forces.detach().cpu().numpy()
        starts = np.concatenate([[0], np.cumsum(batch.n_atoms.cpu().numpy())])
        for b, frame in enumerate(frames_b):
            group = frame.source.split("@")[0].split(":")[0] or "all"
            n = len(frame)
            if frame.energy is not None:
                e = abs(energy[b] - frame.energy) / n * MEV_PER_EV
                e_err[group].append(e)
                e_err["__all__"].append(e)
            if frame.forces is not None:
                f = np.abs(forces[starts[b]:starts[b + 1]] - frame.forces).ravel() * MEV_PER_EV
                f_err[group].extend(f.tolist())
                f_err["__all__"].extend(f.tolist())
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    groups = sorted(set(e_err) | set(f_err))
    per_source = {
        g: {"energy_mae_mev_per_atom": mean(e_err[g]), "force_mae_mev_per_A": mean(f_err[g]),
            "frames": len(e_err[g])}
        for g in groups if g != "__all__"
    }
    return {
        "energy_mae_mev_per_atom": mean(e_err["__all__"]),
        "force_mae_mev_per_A": mean(f_err["__all__"]),
        "frames": len(e_err["__all__"]),
        "per_source": per_source,
    }


def equivariance_error(
    potential: TransIPPotential, frames: Sequence[Frame], n_rotations: int = 8, seed: int = 0,
    max_frames: int = 64, batch_atoms: int = 2048,
) -> Dict[str, float]:
    """How far the model is from exact rotational behaviour, over Haar-random rotations.

    energy_mev_per_atom: mean |E(Rx) - E(x)| / N;  force_relative: mean ||F(Rx) - R F(x)|| /
    ||F(x)|| (norms over all atoms of a frame).
    """
    device, dtype = _device_dtype(potential)
    gen = torch.Generator().manual_seed(seed)
    frames = list(frames)[:max_frames]
    e_dev: List[float] = []
    f_rel: List[float] = []
    for frames_b in batches_by_atoms(frames, batch_atoms, shuffle=False, seed=0):
        batch = collate(frames_b, dtype, device, potential.cutoff)
        e0, f0 = _predict(potential, batch)
        e0, f0 = e0.detach(), f0.detach()
        for _ in range(n_rotations):
            rot = make_rotations(batch.n_systems, gen, dtype, device)
            rb = rotate_batch(batch, rot)
            e1, f1 = _predict(potential, rb)
            f0_rot = torch.einsum("nij,nj->ni", rot[batch.system], f0)
            de = (e1.detach() - e0).abs() / batch.n_atoms
            num = torch.zeros(batch.n_systems, dtype=dtype, device=device).index_add(
                0, batch.system, (f1.detach() - f0_rot).pow(2).sum(1))
            den = torch.zeros(batch.n_systems, dtype=dtype, device=device).index_add(
                0, batch.system, f0.pow(2).sum(1))
            e_dev.extend((de * MEV_PER_EV).cpu().tolist())
            f_rel.extend((num.sqrt() / den.sqrt().clamp_min(1e-12)).cpu().tolist())
    return {
        "energy_mev_per_atom": float(np.mean(e_dev)) if e_dev else float("nan"),
        "force_relative": float(np.mean(f_rel)) if f_rel else float("nan"),
        "rotations": n_rotations,
        "frames": len(frames),
    }
