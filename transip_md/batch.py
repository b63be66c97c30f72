"""Batches of variable-size systems and the batched forward pass used by training and metrics."""

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .data.frames import Frame
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

    @property
    def n_systems(self) -> int:
        return int(self.n_atoms.shape[0])


def collate(frames: Sequence[Frame], dtype: torch.dtype, device: torch.device) -> Batch:
    def cat(arrays) -> np.ndarray:
        return np.concatenate(arrays, axis=0)

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
    )


def rotate_batch(batch: Batch, rotations: Tensor) -> Batch:
    """The same batch with system b rotated by ``rotations[b]`` (positions, cells, forces)."""
    r_atom = rotations[batch.system]
    rot_vec = lambda v: torch.einsum("nij,nj->ni", r_atom, v)  # noqa: E731
    return Batch(
        positions=rot_vec(batch.positions),
        numbers=batch.numbers,
        system=batch.system,
        charge=batch.charge,
        spin=batch.spin,
        cell=torch.einsum("bij,bkj->bki", rotations, batch.cell),
        pbc=batch.pbc,
        energy=batch.energy,
        forces=rot_vec(batch.forces),
        n_atoms=batch.n_atoms,
        sources=batch.sources,
    )


def predict(
    potential: TransIPPotential, batch: Batch, create_graph: bool = False
) -> Tuple[Tensor, Tensor, List[Tensor]]:
    """Energies [B] (eV), forces [N, 3] (eV/Å) and per-layer embeddings for a batch."""
    positions = batch.positions.detach().requires_grad_(True)
    starts = torch.cumsum(batch.n_atoms, 0) - batch.n_atoms
    pieces_i: List[Tensor] = []
    pieces_j: List[Tensor] = []
    pieces_s: List[Tensor] = []
    for b in range(batch.n_systems):
        lo = int(starts[b])
        hi = lo + int(batch.n_atoms[b])
        i, j, s = neighbor_pairs(positions[lo:hi], batch.cell[b], batch.pbc[b], potential.cutoff)
        pieces_i.append(i + lo)
        pieces_j.append(j + lo)
        pieces_s.append(s @ batch.cell[b])
    i = torch.cat(pieces_i)
    j = torch.cat(pieces_j)
    shift = torch.cat(pieces_s)
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


