"""Batches of variable-size systems and the batched forward pass used by training and metrics."""

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .data.frames import Frame
from .model.cell_products import rows_times
from .model.neighbors import neighbor_pairs
from .model.potential import TransIPPotential


@dataclass
class Batch:
    positions: Tensor  # [N, 3] Å
    numbers: Tensor  # [N]
    system: Tensor  # [N] index of the system each atom belongs to
    charge: Tensor  # [B]
    spin: Tensor  # [B]
    cell: Tensor  # [B, 3, 3]
    pbc: Tensor  # [B, 3]
    energy: Tensor  # [B] eV (NaN where unknown)
    forces: Tensor  # [N, 3] eV/Å (NaN where unknown)
    n_atoms: Tensor  # [B]
    sources: List[str]
    pair_i: Tensor  # [P] neighbour pairs (global atom indices), sorted by i
    pair_j: Tensor  # [P]
    pair_shift: Tensor  # [P, 3] integer lattice shifts (in units of the system's cell)

    @property
    def n_systems(self) -> int:
        return int(self.n_atoms.shape[0])


def frame_pairs(frame: Frame, cutoff: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbour pairs of a frame, computed once and cached on it.

    The pair set does not change under rotations (distances are preserved), so training can
    reuse it for every epoch and for the rotated copies; only displacements are recomputed.
    """
    cache = getattr(frame, "_pair_cache", None)
    if cache is not None and cache[0] == cutoff:
        return cache[1]
    i, j, s = neighbor_pairs(torch.as_tensor(frame.positions, dtype=torch.float64),
                             torch.as_tensor(np.asarray(frame.cell, dtype=float)),
                             torch.as_tensor(np.asarray(frame.pbc, dtype=bool)), cutoff)
    pairs = (i.numpy(), j.numpy(), s.numpy())
    object.__setattr__(frame, "_pair_cache", (cutoff, pairs))
    return pairs


def collate(frames: Sequence[Frame], dtype: torch.dtype, device: torch.device,
            cutoff: float) -> Batch:
    def cat(arrays) -> np.ndarray:
        return np.concatenate(arrays, axis=0)

    offsets = np.concatenate([[0], np.cumsum([len(f) for f in frames])[:-1]])
    pairs = [frame_pairs(f, cutoff) for f in frames]

    n_atoms = [len(f) for f in frames]
    forces = [f.forces if f.forces is not None else np.full((len(f), 3), np.nan) for f in frames]
    energy = [f.energy if f.energy is not None else np.nan for f in frames]
    as_t = lambda a, dt=dtype: torch.as_tensor(np.asarray(a), dtype=dt, device=device)  # noqa: E731
    return Batch(
        positions=as_t(cat([f.positions for f in frames])),
        numbers=as_t(cat([f.numbers for f in frames]), torch.long),
        system=as_t(np.repeat(np.arange(len(frames)), n_atoms), torch.long),
        charge=as_t([f.charge for f in frames], torch.long),
        spin=as_t([f.spin for f in frames], torch.long),
        cell=as_t(np.stack([np.asarray(f.cell, dtype=float) for f in frames])),
        pbc=as_t(np.stack([np.asarray(f.pbc, dtype=bool) for f in frames]), torch.bool),
        energy=as_t(energy),
        forces=as_t(cat(forces)),
        n_atoms=as_t(n_atoms, torch.long),
        sources=[f.source for f in frames],
        pair_i=as_t(cat([p[0] + o for p, o in zip(pairs, offsets)]), torch.long),
        pair_j=as_t(cat([p[1] + o for p, o in zip(pairs, offsets)]), torch.long),
        pair_shift=as_t(cat([p[2] for p in pairs])),
    )


def rotate_batch(batch: Batch, rotations: Tensor) -> Batch:
    """The same batch with system b rotated by ``rotations[b]`` (positions, cells, forces)."""
    # Elementwise products (model/cell_products.py): exact under TF32 matmul settings too.
    r_atom_t = rotations[batch.system].transpose(1, 2)
    rot_vec = lambda v: rows_times(v, r_atom_t)  # noqa: E731  v_n -> R_n v_n
    return Batch(
        positions=rot_vec(batch.positions),
        numbers=batch.numbers,
        system=batch.system,
        charge=batch.charge,
        spin=batch.spin,
        cell=rows_times(batch.cell, rotations.transpose(1, 2).unsqueeze(1)),  # each lattice row
        pbc=batch.pbc,
        energy=batch.energy,
        forces=rot_vec(batch.forces),
        n_atoms=batch.n_atoms,
        sources=batch.sources,
        pair_i=batch.pair_i,
        pair_j=batch.pair_j,
        pair_shift=batch.pair_shift,
    )


def predict(
    potential: TransIPPotential, batch: Batch, create_graph: bool = False
) -> Tuple[Tensor, Tensor, List[Tensor]]:
    """Energies [B] (eV), forces [N, 3] (eV/Å) and per-layer embeddings for a batch."""
    positions = batch.positions.detach().requires_grad_(True)
    i, j = batch.pair_i, batch.pair_j
    shift = rows_times(batch.pair_shift, batch.cell[batch.system[i]])
    energies, hidden = potential.atom_energies_from_pairs(
        positions, batch.numbers, batch.charge[batch.system], batch.spin[batch.system], i, j, shift
    )
    system_energy = torch.zeros(batch.n_systems, dtype=energies.dtype, device=energies.device)
    system_energy = system_energy.index_add(0, batch.system, energies)
    (grad,) = torch.autograd.grad(system_energy.sum(), positions, create_graph=create_graph)
    return system_energy, -grad, hidden


def fit_element_energies(frames: Sequence[Frame], max_z: int) -> np.ndarray:
    """Per-element reference energies by least squares: E ≈ Σ_Z n_Z e_Z (eV)."""
    labelled = [f for f in frames if f.energy is not None]
    if not labelled:
        raise ValueError("no frame carries an energy; cannot fit element reference energies")
    counts = np.zeros((len(labelled), max_z + 1))
    for row, f in enumerate(labelled):
        np.add.at(counts[row], f.numbers, 1)
    energies = np.array([f.energy for f in labelled])
    present = counts.sum(0) > 0
    sol, *_ = np.linalg.lstsq(counts[:, present], energies, rcond=None)
    refs = np.zeros(max_z + 1)
    refs[present] = sol
    return refs


def force_rms(frames: Sequence[Frame]) -> float:
    forces = [f.forces for f in frames if f.forces is not None]
    if not forces:
        return 1.0
    value = float(np.sqrt(np.mean(np.concatenate(forces) ** 2)))
    return value if value > 1e-8 else 1.0


def make_rotations(n: int, generator: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    from .model.equivariance import random_rotations

    return random_rotations(n, dtype=dtype, generator=generator, device=device)


