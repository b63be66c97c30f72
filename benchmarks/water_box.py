"""Periodic boxes of liquid-density water for benchmarks (no equilibration: random orientations
on a cubic lattice)."""

import math

import numpy as np
from ase import Atoms

#: Volume of one water molecule at 1 g/cm^3 (Å^3): 18.015 g/mol / (N_A * 1 g/cm^3).
VOLUME_PER_MOLECULE = 18.015 / 0.602214076
O_H = 0.9572  # Å
H_O_H = math.radians(104.52)


def _random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """n uniformly distributed rotation matrices (from random unit quaternions)."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], 1)


def water_box(n_molecules: int, seed: int = 0, density: float = 1.0) -> Atoms:
    """``n_molecules`` randomly oriented waters (O, H, H each) in a periodic cube at ``density``
    g/cm^3. Molecules sit on randomly chosen sites of the smallest cubic lattice with enough
    sites, so neighbouring oxygens are about 2.7-3.1 Å apart."""
    if n_molecules < 1:
        raise ValueError(f"n_molecules must be positive, got {n_molecules}")
    rng = np.random.default_rng(seed)
    length = (n_molecules * VOLUME_PER_MOLECULE / density) ** (1.0 / 3.0)
    k = math.ceil(round(n_molecules ** (1.0 / 3.0), 9))
    spacing = length / k
    sites = rng.choice(k ** 3, size=n_molecules, replace=False)
    grid = np.stack(np.unravel_index(sites, (k, k, k)), -1).astype(float)
    centres = (grid + 0.5) * spacing
    half = 0.5 * H_O_H
    local = np.array([[0.0, 0.0, 0.0],
                      [O_H * math.sin(half), 0.0, O_H * math.cos(half)],
                      [-O_H * math.sin(half), 0.0, O_H * math.cos(half)]])
    local -= local.mean(0)
    rot = _random_rotations(rng, n_molecules)
    positions = centres[:, None, :] + np.einsum("mij,aj->mai", rot, local)
    atoms = Atoms("OH2" * n_molecules, positions=positions.reshape(-1, 3),
                  cell=[length] * 3, pbc=True)
    atoms.wrap()
    return atoms
