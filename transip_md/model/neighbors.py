"""Neighbour search in plain TorchScript ops, so that it can live inside the exported file.

Two pieces:

* :func:`neighbor_pairs` finds every pair (i, j, S) with ``|x_j - x_i + S @ cell| < cutoff`` for
  open, periodic (orthorhombic or triclinic, any orientation) and mixed boundaries. Periodic
  images are generated explicitly out to the cutoff, so cells thinner than 2*cutoff (even thinner
  than the cutoff) are exact. The search itself is a cell list over sorted bin keys
  (``searchsorted``, no dense bin table), so it is O(N) in memory and O(N log N) in time.
* :func:`pairs_to_dense` turns a pair list into the padded ``[N, K]`` layout the attention layers
  use: row i holds the neighbours of atom i; padding slots point at a dummy atom index N.

The integer shifts S are returned instead of displacement vectors so that callers can recompute
the displacements differentiably from the *unwrapped* positions and the (possibly strained) cell;
that is what makes autograd forces and stresses exact.
"""

from typing import List, Tuple

import torch
from torch import Tensor

from .cell_products import rows_times

# TorchScript cannot close over module globals, so the tuning constants are default arguments:
# brute_force_limit: above this many candidate distances the O(N*M) search gives way to the
#   cell list;  chunk: central atoms per cell-list chunk (bounds temporary memory);
# max_images: a cell needing more periodic images than this along an axis is a unit mistake.

#: The one limit on thin periodic cells, for every engine (declared in the exported file).
MAX_IMAGES = 64


def cell_heights(cell: Tensor) -> Tensor:
    """Distances between opposite faces of the cell (Å), one per lattice vector."""
    volume = torch.abs(torch.linalg.det(cell))
    cross = torch.stack(
        [
            torch.linalg.cross(cell[1], cell[2]),
            torch.linalg.cross(cell[2], cell[0]),
            torch.linalg.cross(cell[0], cell[1]),
        ]
    )
    return volume / torch.linalg.norm(cross, dim=1)


def _check_cell(cell: Tensor, pbc: Tensor, cutoff: float, max_images: int = MAX_IMAGES) -> Tensor:
    """Validate the periodic cell and return the number of images needed per axis."""
    n_images = torch.zeros(3, dtype=torch.long)
    if not bool(pbc.any()):
        return n_images
    for a in range(3):
        if bool(pbc[a]) and float(torch.linalg.norm(cell[a])) <= 0.0:
            raise ValueError(
                "periodic cell vector " + str(a) + " has zero length; give a positive box (Å)"
            )
    det = float(torch.linalg.det(cell.to(torch.float64)))
    if det <= 1e-12:
        raise ValueError(
            "periodic cell is degenerate or left-handed (det = "
            + str(det)
            + " Å^3); give three independent lattice vectors in a right-handed order"
        )
    heights = cell_heights(cell.to(torch.float64))
    for a in range(3):
        if bool(pbc[a]):
            n = int(torch.ceil(cutoff / heights[a]).item())
            if n > max_images:
                raise ValueError(
                    "periodic cell is too thin along axis "
                    + str(a)
                    + " ("
                    + str(float(heights[a]))
                    + " Å between faces for a cutoff of "
                    + str(cutoff)
                    + " Å, more than " + str(max_images)
                    + " periodic images per axis); check the box size and units"
                )
            n_images[a] = n
    return n_images


def _periodic_points(
    positions: Tensor, cell: Tensor, pbc: Tensor, cutoff: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Wrap atoms into the cell and add the periodic images within ``cutoff`` of it.

    Returns (points, owner, image_shift, wrap): point coordinates (central atoms first, in the
    input order), the atom each point images, the integer lattice shift of each point, and the
    integer wrap applied to each atom (``positions - wrap @ cell`` lies in the cell).
    """
    n_atoms = positions.shape[0]
    device = positions.device
    n_images = _check_cell(cell, pbc, cutoff)
    if int(n_images.sum()) == 0:
        owner = torch.arange(n_atoms, device=device)
        zeros = torch.zeros((n_atoms, 3), dtype=positions.dtype, device=device)
        return positions, owner, zeros, zeros
    pbc_f = pbc.to(positions.dtype).to(device)
    frac = rows_times(positions, torch.linalg.inv(cell))
    wrap = torch.floor(frac) * pbc_f
    frac = frac - wrap
    wrapped = positions - rows_times(wrap, cell)
    # An image is kept if it lies within cutoff/height of the cell along every periodic axis.
    margin = cutoff / cell_heights(cell)
    ranges: List[Tensor] = []
    for a in range(3):
        n = int(n_images[a])
        ranges.append(torch.arange(-n, n + 1, device=device, dtype=positions.dtype))
    grid = torch.stack(torch.meshgrid(ranges[0], ranges[1], ranges[2], indexing="ij"), -1)
    shifts = grid.reshape(-1, 3)
    nonzero = shifts.abs().sum(1) > 0
    shifts = shifts[nonzero]
    # [S, N, 3] fractional coordinates of every candidate image
    cand = frac.unsqueeze(0) + shifts.unsqueeze(1)
    inside = ((cand >= -margin) & (cand <= 1.0 + margin)) | (pbc_f == 0)
    keep = inside.all(dim=2)
    nz = torch.nonzero(keep)
    s_idx, a_idx = nz[:, 0], nz[:, 1]
    image_shift = shifts[s_idx]
    points = torch.cat([wrapped, wrapped[a_idx] + rows_times(image_shift, cell)], 0)
    owner = torch.cat([torch.arange(n_atoms, device=device), a_idx], 0)
    all_shifts = torch.cat(
        [torch.zeros((n_atoms, 3), dtype=positions.dtype, device=device), image_shift], 0
    )
    return points, owner, all_shifts, wrap


def _search_brute_force(
    centers: Tensor, points: Tensor, cutoff: float
) -> Tuple[Tensor, Tensor]:
    dist2 = torch.cdist(centers, points).pow(2)
    nz = torch.nonzero(dist2 < cutoff * cutoff)
    return nz[:, 0], nz[:, 1]


def _search_cell_list(
    centers: Tensor, points: Tensor, cutoff: float, chunk: int = 8192
) -> Tuple[Tensor, Tensor]:
    """All (center, point) index pairs closer than cutoff, with bins of edge ``cutoff``."""
    device = points.device
    origin = points.min(dim=0).values
    bins = torch.floor((points - origin) / cutoff).to(torch.long)
    n_bins = bins.max(dim=0).values + 1
    stride = torch.stack(
        [torch.ones_like(n_bins[0]), n_bins[0], n_bins[0] * n_bins[1]]
    )
    keys = (bins * stride).sum(1)
    sorted_keys, order = torch.sort(keys)
    center_bins = torch.floor((centers - origin) / cutoff).to(torch.long)
    offsets = torch.stack(
        torch.meshgrid(
            torch.arange(-1, 2, device=device),
            torch.arange(-1, 2, device=device),
            torch.arange(-1, 2, device=device),
            indexing="ij",
        ),
        -1,
    ).reshape(27, 3)
    pieces_i: List[Tensor] = []
    pieces_p: List[Tensor] = []
    for start_atom in range(0, centers.shape[0], chunk):
        stop_atom = min(start_atom + chunk, centers.shape[0])
        nb = center_bins[start_atom:stop_atom].unsqueeze(1) + offsets  # [C, 27, 3]
        valid_bin = ((nb >= 0) & (nb < n_bins)).all(dim=2)
        nkeys = (nb * stride).sum(2)
        first = torch.searchsorted(sorted_keys, nkeys, right=False)
        last = torch.searchsorted(sorted_keys, nkeys, right=True)
        count = torch.where(valid_bin, last - first, torch.zeros_like(first))
        width = int(count.max()) if count.numel() > 0 else 0
        if width == 0:
            continue
        slot = first.unsqueeze(2) + torch.arange(width, device=device)  # [C, 27, W]
        ok = torch.arange(width, device=device) < count.unsqueeze(2)
        slot = torch.where(ok, slot, torch.zeros_like(slot))
        cand = order[slot.clamp(max=order.shape[0] - 1)]
        diff = points[cand] - centers[start_atom:stop_atom].view(-1, 1, 1, 3)
        close = ok & ((diff * diff).sum(3) < cutoff * cutoff)
        ci = torch.nonzero(close)[:, 0]
        pieces_i.append(ci + start_atom)
        pieces_p.append(cand[close])
    if len(pieces_i) == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    return torch.cat(pieces_i), torch.cat(pieces_p)


def neighbor_pairs(
    positions: Tensor,
    cell: Tensor,
    pbc: Tensor,
    cutoff: float,
    brute_force_limit: int = 4_000_000,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Every ordered pair closer than ``cutoff``.

    Args:
        positions: [N, 3] Å.
        cell: [3, 3] Å, rows are lattice vectors (ignored along non-periodic axes).
        pbc: [3] bool.
        cutoff: Å.

    Returns:
        (i, j, shift): int64 [P], int64 [P] and [P, 3] integer-valued shifts in the positions'
        dtype such that ``positions[j] - positions[i] + shift @ cell`` is the displacement.
        Pairs are sorted by i. An atom is never its own neighbour unless through a lattice shift.
    """
    with torch.no_grad():
        pos = positions.detach()
        cell_d = cell.detach().to(pos.dtype).to(pos.device)
        points, owner, image_shift, wrap = _periodic_points(pos, cell_d, pbc, cutoff)
        n_atoms = pos.shape[0]
        centers = points[:n_atoms]
        if n_atoms * points.shape[0] <= brute_force_limit:
            i, p = _search_brute_force(centers, points, cutoff)
        else:
            i, p = _search_cell_list(centers, points, cutoff)
        not_self = p != i
        i = i[not_self]
        p = p[not_self]
        # Sort by centre atom (stable, so the order within a row is deterministic).
        order = torch.argsort(i * points.shape[0] + p)
        i = i[order]
        p = p[order]
        j = owner[p]
        # displacement = wrapped_j + k@cell - wrapped_i = x_j - x_i + (k - w_j + w_i)@cell
        shift = image_shift[p] - wrap[j] + wrap[i]
    return i, j, shift


def pairs_to_dense(i: Tensor, n_atoms: int) -> Tuple[Tensor, Tensor, int]:
    """Row and slot of each pair in the padded [N, K] layout; pairs must be sorted by i.

    Returns (row, slot, K) with K >= 1 so that every tensor stays non-empty.
    """
    counts = torch.bincount(i, minlength=n_atoms)
    k_max = int(counts.max()) if counts.numel() > 0 else 0
    k_max = max(k_max, 1)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(i.shape[0], device=i.device) - starts[i]
    return i, slot, k_max
