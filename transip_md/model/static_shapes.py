"""Energy with static tensor shapes and no host synchronisation, for CUDA-graph capture.

A CUDA graph replays fixed kernels on fixed buffers, so every tensor shape must be known when
the graph is recorded and nothing may wait for the host (no ``.item()``, ``nonzero``, boolean
masks, ``bincount``, ``torch.linalg.inv``, ...). ``energy_static`` finds neighbours in one of two
such ways, chosen by Python ints fixed when an engine sets the run up:

* **all pairs** (``cell_capacity == 0``): the [N, N] minimum-image distance matrix and ``topk``.
  O(N^2), the cheapest for a few hundred atoms.
* **cell list** (``cell_capacity > 0``, grid ``grid_a x grid_b x grid_c``): atoms are binned into
  a fixed grid, each cell holds at most ``cell_capacity`` atoms, and each atom's candidates are
  the 27 cells around its own; ``topk`` then keeps the ``capacity`` nearest. O(N).

Every capacity is a promise the positions may break (a crowded cell, an atom with more than
``capacity`` neighbours, a barostat shrinking the box below the grid's cell width). Breaking one
would silently drop neighbours; it is detected on the device instead and turns the energy into
NaN, so the run stops. The remedy is a larger capacity (OpenMM: ``make_torch_force(...,
neighbor_capacity=..., cell_capacity=...)``).

:func:`plan_static_neighbors` (plain Python, for engines) chooses the path and its sizes from
the initial system.
"""

import inspect
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .cell_products import rows_times
from .contract import entry_point

# ------------------------------------------------------------------ planning (Python, host side)
#: Mean neighbour count (from the density) times this is the default neighbour capacity. The
#: network's cost grows with it. Measured in water (1,536 atoms, 300-500 K): the most crowded
#: atom had 1.2 x the mean; in a lattice box with 10 % empty sites, 1.35 x.
NEIGHBOR_MARGIN = 1.5
#: ... and the default neighbour capacity is at least this.
MIN_NEIGHBOR_CAPACITY = 32
#: Default cell capacity = ceil(CELL_MARGIN * mean + CELL_SPREAD * sqrt(mean)) atoms per cell:
#: 1.5 x the mean for dense cells plus three standard deviations of a Poisson count for sparse
#: ones. Measured in water (shipped model, Langevin MD at 300-500 K, 1,536 atoms, 125 cells of
#: mean 12.3): the fullest cell held 1.6-1.9 x the mean, i.e. mean + 2.2-3.1 Poisson standard
#: deviations; this default is mean + 4.7 of them. The mean, N / cells, does not change when a
#: barostat scales the box.
CELL_MARGIN = 1.5
CELL_SPREAD = 3.0
#: Periodic grids are sized for a box this much narrower than the initial one (a barostat
#: compresses a badly started box by a few per cent); below that the energy is NaN.
BOX_SHRINK_TOLERANCE = 0.05
#: Atom density (Å^-3) assumed for systems in vacuum, whose extent is unknown when the run is
#: set up (liquid water: 0.100; proteins with hydrogens: about 0.11).
VACUUM_DENSITY = 0.1
#: A sphere of a given volume fills this fraction of its bounding cube (pi / 6).
_SPHERE_IN_CUBE = math.pi / 6.0


@dataclass(frozen=True)
class StaticNeighborPlan:
    """The Python ints that fix every shape of ``energy_static``.

    ``cell_capacity == 0`` selects the all-pairs search (``grid`` unused).
    """

    neighbor_capacity: int
    cell_capacity: int = 0
    grid: Tuple[int, int, int] = (0, 0, 0)

    @property
    def uses_cell_list(self) -> bool:
        return self.cell_capacity > 0

    def arguments(self) -> Tuple[int, int, int, int, int]:
        """``capacity, cell_capacity, grid_a, grid_b, grid_c`` for ``energy_static``."""
        return (self.neighbor_capacity, self.cell_capacity) + tuple(self.grid)


def perpendicular_widths(cell: np.ndarray) -> np.ndarray:
    """Distances (Å) between opposite faces of a cell whose rows are the lattice vectors."""
    cell = np.asarray(cell, dtype=np.float64)
    volume = abs(float(np.linalg.det(cell)))
    areas = np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
    return volume / areas


def _expected_neighbors(density: float, cutoff: float) -> float:
    return density * 4.0 / 3.0 * math.pi * cutoff ** 3


def _default_neighbor_capacity(n_atoms: int, density: float, cutoff: float) -> int:
    estimate = math.ceil(NEIGHBOR_MARGIN * _expected_neighbors(density, cutoff))
    return min(n_atoms - 1, max(MIN_NEIGHBOR_CAPACITY, estimate))


def _default_cell_capacity(mean_per_cell: float) -> int:
    return max(1, math.ceil(CELL_MARGIN * mean_per_cell + CELL_SPREAD * math.sqrt(mean_per_cell)))


def _periodic_grid(cell: np.ndarray, cutoff: float) -> Tuple[int, int, int]:
    """Cells per axis, each at least one cutoff wide even after the box shrinks by
    ``BOX_SHRINK_TOLERANCE``."""
    widths = perpendicular_widths(cell) * (1.0 - BOX_SHRINK_TOLERANCE)
    dims = [int(math.floor(w / cutoff)) for w in widths]
    return dims[0], dims[1], dims[2]


def _vacuum_grid(n_atoms: int, cutoff: float) -> Tuple[Tuple[int, int, int], float]:
    """Grid and mean atoms per occupied cell for a compact cluster at ``VACUUM_DENSITY``:
    the cluster's bounding cube, cut into cells at least one cutoff wide."""
    extent = (n_atoms / VACUUM_DENSITY / _SPHERE_IN_CUBE) ** (1.0 / 3.0)
    n = max(1, int(math.floor(extent / cutoff)))
    width = max(extent / n, cutoff)
    return (n, n, n), VACUUM_DENSITY * width ** 3


def _check_requested(name: str, value: Optional[int], low: int, high: int) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or int(value) != value or not low <= int(value) <= high:
        raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")
    return int(value)


def plan_static_neighbors(
    n_atoms: int,
    cutoff: float,
    cell: Optional[np.ndarray],
    periodic: bool,
    neighbor_capacity: Optional[int] = None,
    cell_capacity: Optional[int] = None,
    cell_list: bool = True,
) -> StaticNeighborPlan:
    """Choose the neighbour search of ``energy_static`` from the initial system.

    Args:
        n_atoms: atoms the model sees (>= 2).
        cutoff: model cutoff (Å).
        cell: the initial periodic cell (Å, rows are lattice vectors); ignored when not periodic.
        periodic: periodic along all three axes (True) or in vacuum (False).
        neighbor_capacity: neighbours kept per atom; default ``NEIGHBOR_MARGIN`` x the mean count
            within the cutoff (from the box density; ``VACUUM_DENSITY`` in vacuum), at least
            ``MIN_NEIGHBOR_CAPACITY``, at most N - 1.
        cell_capacity: atoms per grid cell; default from the mean N / cells (see
            ``CELL_MARGIN``). Giving it forces the cell list wherever the grid allows one.
        cell_list: False = all pairs in any case (for model files that predate the cell list).

    The cell list is used when the grid has at least 3 cells along every periodic axis and its
    27 x ``cell_capacity`` candidates per atom are fewer than the N - 1 of all pairs; otherwise
    the all-pairs search is used (periodic boxes must then be at least twice the cutoff wide).
    """
    if n_atoms < 2:
        raise ValueError("the static-shape path needs at least two atoms")
    neighbor_capacity = _check_requested("neighbor_capacity", neighbor_capacity, 1, n_atoms - 1)
    cell_capacity = _check_requested("cell_capacity", cell_capacity, 1, n_atoms)
    if periodic:
        cell = np.asarray(cell, dtype=np.float64)
        density = n_atoms / abs(float(np.linalg.det(cell)))
        grid = _periodic_grid(cell, cutoff)
        usable = min(grid) >= 3  # with fewer cells a neighbour cell would be listed twice
        mean_per_cell = n_atoms / float(grid[0] * grid[1] * grid[2]) if usable else 0.0
    else:
        density = VACUUM_DENSITY
        grid, mean_per_cell = _vacuum_grid(n_atoms, cutoff)
        usable = True
    if usable and cell_list:
        chosen = cell_capacity or _default_cell_capacity(mean_per_cell)
        if cell_capacity is not None or 27 * chosen < n_atoms - 1:
            return StaticNeighborPlan(
                neighbor_capacity or _default_neighbor_capacity(n_atoms, density, cutoff),
                chosen, grid)
    if not periodic:  # all pairs in vacuum: every atom can be a neighbour, no overflow
        return StaticNeighborPlan(neighbor_capacity or n_atoms - 1)
    widths = perpendicular_widths(cell)
    if widths.min() < 2.0 * cutoff:
        raise ValueError(
            f"the static-shape path uses minimum-image displacements: the box must be at "
            f"least twice the model cutoff ({2 * cutoff:.2f} Å) wide, but its narrowest "
            f"width is {widths.min():.2f} Å")
    return StaticNeighborPlan(
        neighbor_capacity or _default_neighbor_capacity(n_atoms, density, cutoff))


def supports_cell_list(model) -> bool:
    """Whether a (scripted or eager) model's ``energy_static`` takes the cell-list arguments
    (files exported before it only have the all-pairs search)."""
    method = getattr(model, "energy_static", None)
    schema = getattr(method, "schema", None)
    if schema is not None:
        return "cell_capacity" in [argument.name for argument in schema.arguments]
    if method is None:
        return False
    return "cell_capacity" in inspect.signature(method).parameters


class StaticPlanBinding(nn.Module):
    """A model whose ``energy_static(..., capacity)`` runs with a fixed cell-list plan.

    For engine wrappers that call ``model.energy_static(positions, numbers, cell, pbc, charge,
    spin, capacity)`` and ``model.energy(...)``: the plan's ints become attributes here, which
    ``torch.jit.freeze`` folds into constants.
    """

    def __init__(self, model, plan: StaticNeighborPlan):
        super().__init__()
        self.model = model
        self.cell_capacity = int(plan.cell_capacity)
        self.grid_a, self.grid_b, self.grid_c = (int(n) for n in plan.grid)

    @torch.jit.export
    def energy(self, positions: Tensor, numbers: Tensor, cell: Tensor, pbc: Tensor,
               charge: Tensor, spin: Tensor) -> Tensor:
        return self.model.energy(positions, numbers, cell, pbc, charge, spin)

    @torch.jit.export
    def energy_static(self, positions: Tensor, numbers: Tensor, cell: Tensor, pbc: Tensor,
                      charge: Tensor, spin: Tensor, capacity: int) -> Tensor:
        return self.model.energy_static(positions, numbers, cell, pbc, charge, spin, capacity,
                                        self.cell_capacity, self.grid_a, self.grid_b, self.grid_c)


# ------------------------------------------------------------------ device side (TorchScript)
# No function below may read a device value on the host; sizes come from Python ints only.
# Excluded candidates get a squared distance of 1e30 (literal: TorchScript has no globals).

def _device_ints(values: List[int], device: torch.device) -> Tensor:
    """Python ints as a device tensor, by fill kernels: ``torch.tensor(values, device=...)``
    would copy from pageable host memory, which graph capture forbids."""
    return torch.stack([torch.full((), v, dtype=torch.long, device=device) for v in values])


def _effective_cell(cell: Tensor, pbc: Tensor) -> Tensor:
    """The cell with open axes replaced by unit vectors, so that its inverse always exists."""
    pbc_f = pbc.to(cell.dtype)
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device)
    return cell * pbc_f.unsqueeze(1) + eye * (1.0 - pbc_f).unsqueeze(1)


def _inverse(cell_eff: Tensor) -> Tensor:
    # inv_ex, not inv: inv checks for singularity on the host (a device sync), which breaks
    # CUDA-graph capture; cell_eff is invertible for any non-degenerate cell.
    return torch.linalg.inv_ex(cell_eff)[0]


def _no_overflow(device: torch.device) -> Tensor:
    return torch.zeros((), dtype=torch.bool, device=device)


def _nan_if(flag: Tensor, energy: Tensor) -> Tensor:
    """``energy``, or NaN where ``flag`` (a device bool) is set: a capacity was exceeded.

    A factor, not a term: adding NaN would leave the autograd forces finite (and wrong), and an
    engine moves atoms by the forces; NaN x energy makes them NaN too, so the run stops."""
    return energy * torch.where(flag, torch.full_like(energy, float("nan")),
                                torch.ones_like(energy))


def _all_pairs_neighbors(positions: Tensor, cell_eff: Tensor, pbc: Tensor, cutoff: float,
                         capacity: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(index [N, K], displacement [N, K, 3], overflow) of the K = ``capacity`` nearest atoms by
    all-pairs minimum image. Needs periodic cells at least 2 x cutoff wide."""
    n_atoms = positions.shape[0]
    pbc_f = pbc.to(positions.dtype)
    # Select neighbours without autograd over the dense [N, N, 3] displacements, then
    # recompute only the selected ones differentiably: the backward pass then never touches
    # an N^2 tensor. (detach(), not torch.no_grad(): under TorchScript the no_grad block gave
    # wrong gradients for the recomputed vectors below.)
    fixed = positions.detach()
    cell_fixed = cell_eff.detach()
    disp = fixed.unsqueeze(0) - fixed.unsqueeze(1)  # [i, j] = x_j - x_i
    frac = rows_times(disp, _inverse(cell_fixed))
    image = torch.round(frac) * pbc_f  # lattice vectors to subtract (minimum image)
    disp = rows_times(frac - image, cell_fixed)
    d2 = (disp * disp).sum(-1) + positions.new_full((n_atoms,), 1e30).diag()
    nearest, index = torch.topk(d2, capacity, dim=1, largest=False)
    nbr_image = image.gather(1, index.unsqueeze(-1).expand(n_atoms, capacity, 3))
    nbr_pos = positions.index_select(0, index.reshape(-1)).view(n_atoms, capacity, 3)
    nbr_vec = nbr_pos - positions.unsqueeze(1) - rows_times(nbr_image, cell_eff)
    overflow = _no_overflow(positions.device)
    if capacity < n_atoms - 1:  # otherwise every atom is a neighbour: no overflow possible
        # Conservative: NaN already when the capacity-th nearest is inside the cutoff.
        overflow = nearest[:, capacity - 1] < cutoff * cutoff
        overflow = overflow.any()
    return index, nbr_vec, overflow


def _grid_cells(frac: Tensor, inverse: Tensor, pbc: Tensor, cutoff: float,
                grid: List[int]) -> Tuple[Tensor, Tensor]:
    """Cell index (a, b, c) [N, 3] of every atom and a device flag "grid unusable".

    ``frac`` are coordinates in the effective cell's basis. Periodic axes: wrapped fractional
    coordinates, cells 1/n wide; unusable if a cell is thinner than the cutoff (the box shrank)
    or there are fewer than 3 cells (a neighbour cell would be listed twice). Open axes: the
    atoms' current bounding box, cells max(extent/n, one cutoff) wide (so never too thin).
    """
    dims = _device_ints(grid, frac.device)
    dims_f = dims.to(frac.dtype)
    # One cutoff measured in these coordinates, per axis (|column of the inverse| = 1 / width).
    reach = cutoff * torch.linalg.norm(inverse, dim=0)
    low = frac.min(dim=0).values
    extent = frac.max(dim=0).values - low
    width = torch.where(pbc, 1.0 / dims_f, torch.maximum(extent / dims_f, reach))
    offset = torch.where(pbc.unsqueeze(0), frac - torch.floor(frac), frac - low)
    cells = torch.floor(offset / width).to(torch.long)
    # Rounding can put an atom exactly on the far edge: it belongs to the last cell.
    cells = torch.minimum(cells.clamp(min=0), dims - 1)
    unusable = (pbc & ((reach > width) | (dims < 3))).any()
    return cells, unusable


def _cell_table(cell_id: Tensor, n_cells: int, cell_capacity: int) -> Tuple[Tensor, Tensor]:
    """Atoms of each cell [n_cells + 1, C] (padding N; the extra last row is an always-empty
    cell) and a device flag "some cell holds more than C atoms"."""
    n_atoms = cell_id.shape[0]
    device = cell_id.device
    # scatter_add into a fixed-size tensor, not bincount (whose output size depends on data).
    counts = torch.zeros(n_cells, dtype=torch.long, device=device).scatter_add(
        0, cell_id, torch.ones_like(cell_id))
    sorted_id, order = torch.sort(cell_id, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n_atoms, device=device) - starts.index_select(0, sorted_id)
    # Atoms beyond a cell's capacity are written to one spare slot past the table and dropped;
    # the overflow flag makes the energy NaN in that case.
    spare = (n_cells + 1) * cell_capacity
    slot = torch.where(rank < cell_capacity, sorted_id * cell_capacity + rank,
                       torch.full_like(rank, spare))
    table = torch.full((spare + 1,), n_atoms, dtype=torch.long, device=device)
    table = table.scatter(0, slot, order)
    overflow = counts.max() > cell_capacity
    return table[:spare].view(n_cells + 1, cell_capacity), overflow


def _neighbor_cells(grid: List[int], pbc: Tensor) -> Tuple[Tensor, Tensor]:
    """The 27 cells around each cell [n_cells, 27] and the lattice image [n_cells, 27, 3] at
    which each is seen: wrapped along periodic axes (image -1 or +1 across the box's faces),
    the empty cell (index n_cells) beyond the grid along open axes."""
    device = pbc.device
    n_cells = grid[0] * grid[1] * grid[2]
    dims = _device_ints(grid, device)
    axes = [torch.arange(n, device=device) for n in grid]
    own = torch.stack(torch.meshgrid(axes[0], axes[1], axes[2], indexing="ij"), -1).reshape(-1, 3)
    step = torch.arange(-1, 2, device=device)
    offsets = torch.stack(torch.meshgrid(step, step, step, indexing="ij"), -1).reshape(27, 3)
    around = own.unsqueeze(1) + offsets  # [n_cells, 27, 3], may lie outside the grid
    inside = ((around >= 0) & (around < dims)) | pbc
    image = torch.where(pbc, torch.div(around, dims, rounding_mode="floor"),
                        torch.zeros_like(around))
    around = around - image * dims
    flat = (around[..., 0] * grid[1] + around[..., 1]) * grid[2] + around[..., 2]
    return torch.where(inside.all(dim=-1), flat, torch.full_like(flat, n_cells)), image


def _cell_list_neighbors(positions: Tensor, cell_eff: Tensor, pbc: Tensor, cutoff: float,
                         capacity: int, cell_capacity: int,
                         grid: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """(index [N, K], displacement [N, K, 3], overflow) of the K nearest atoms among the 27
    cells around each atom's own (K = min(``capacity``, 27 ``cell_capacity``)).

    Atoms are wrapped into the cell; a candidate in a neighbour cell across a face of the box is
    seen at that cell's lattice image, which with >= 3 cells of >= one cutoff per periodic axis
    is its minimum image. (No per-candidate rounding or 3x3 products: the candidate distances
    are the bulk of the search's work.)
    """
    n_atoms = positions.shape[0]
    device = positions.device
    n_cells = grid[0] * grid[1] * grid[2]
    pbc_f = pbc.to(positions.dtype)
    # Search on detached copies; only the selected displacements are recomputed with autograd.
    fixed = positions.detach()
    cell_fixed = cell_eff.detach()
    inverse = _inverse(cell_fixed)
    frac = rows_times(fixed, inverse)
    wrap = torch.floor(frac) * pbc_f  # lattice vectors that bring each atom into the cell
    wrapped = fixed - rows_times(wrap, cell_fixed)
    cells, unusable = _grid_cells(frac, inverse, pbc, cutoff, grid)
    cell_id = (cells[:, 0] * grid[1] + cells[:, 1]) * grid[2] + cells[:, 2]
    table, crowded = _cell_table(cell_id, n_cells, cell_capacity)
    around, image = _neighbor_cells(grid, pbc)
    around = around.index_select(0, cell_id)  # [N, 27]
    image = image.index_select(0, cell_id).to(positions.dtype)  # [N, 27, 3]
    n_cand = 27 * cell_capacity
    cand = table.index_select(0, around.reshape(-1)).view(n_atoms, n_cand)
    centers = torch.arange(n_atoms, device=device).unsqueeze(1)
    real = (cand < n_atoms) & (cand != centers)  # not padding, not the atom itself
    cand = torch.where(real, cand, centers)  # harmless index for the distance below
    # candidate - centre = wrapped_j + image @ cell - wrapped_i; the last two terms per cell.
    to_cell = rows_times(image, cell_fixed) - wrapped.unsqueeze(1)  # [N, 27, 3]
    disp = (wrapped.index_select(0, cand.reshape(-1)).view(n_atoms, 27, cell_capacity, 3)
            + to_cell.unsqueeze(2))
    d2 = (disp * disp).sum(-1).view(n_atoms, n_cand)
    d2 = torch.where(real, d2, torch.full_like(d2, 1e30))
    k = min(capacity, n_cand)
    # One extra column tells whether an atom has more than K neighbours within the cutoff.
    k_search = min(k + 1, n_cand)
    nearest, pick = torch.topk(d2, k_search, dim=1, largest=False)
    too_many = _no_overflow(device)
    if k_search > k:
        too_many = (nearest[:, k] < cutoff * cutoff).any()
    pick = pick[:, :k]
    chosen = cand.gather(1, pick)
    chosen_real = real.gather(1, pick)
    # x_j - x_i + shift @ cell with the integer shift = image - wrap_j + wrap_i: the same
    # displacement, differentiable in the unwrapped positions and the cell.
    slot_cell = torch.div(pick, cell_capacity, rounding_mode="floor")
    chosen_image = image.gather(1, slot_cell.unsqueeze(-1).expand(n_atoms, k, 3))
    shift = (chosen_image - wrap.index_select(0, chosen.reshape(-1)).view(n_atoms, k, 3)
             + wrap.unsqueeze(1))
    nbr_pos = positions.index_select(0, chosen.reshape(-1)).view(n_atoms, k, 3)
    nbr_vec = nbr_pos - positions.unsqueeze(1) + rows_times(shift, cell_eff)
    # Slots without a real candidate: the network's padding (index N, beyond the cutoff).
    # (Built by arithmetic: far[0] = x would copy a host scalar to the device.)
    far = (torch.arange(3, device=device) == 0).to(positions.dtype) * (2.0 * cutoff)
    nbr_vec = torch.where(chosen_real.unsqueeze(-1), nbr_vec, far)
    index = torch.where(chosen_real, chosen, torch.full_like(chosen, n_atoms))
    return index, nbr_vec, unusable | crowded | too_many


class StaticShapeEnergy:
    """Mixin of :class:`~transip_md.model.potential.TransIPPotential`: ``energy_static``."""

    @torch.jit.export
    @entry_point(2, "Tensor: total energy (eV), static shapes, NaN on capacity overflow")
    def energy_static(
        self,
        positions: Tensor,
        numbers: Tensor,
        cell: Tensor,
        pbc: Tensor,
        charge: Tensor,
        spin: Tensor,
        capacity: int,
        cell_capacity: int = 0,
        grid_a: int = 0,
        grid_b: int = 0,
        grid_c: int = 0,
    ) -> Tensor:
        """Like :meth:`energy`, with static tensor shapes and no host synchronisation.

        For CUDA-graph capture (OpenMM-Torch ``useCUDAGraphs``): every shape depends on N and
        the Python ints below only; neighbours beyond the cutoff get a zero envelope and
        contribute nothing. :func:`plan_static_neighbors` chooses the ints.

        Args:
            capacity: neighbours kept per atom (K), 1..N-1.
            cell_capacity: 0 = all-pairs search (periodic cells at least 2 x cutoff wide);
                > 0 = cell list with at most this many atoms per cell.
            grid_a, grid_b, grid_c: cells along each lattice vector (cell list only); at
                least 3 along periodic axes, each cell at least one cutoff wide.

        The energy is NaN (checked on the device, so a run stops instead of silently dropping
        neighbours) when an atom has more than ``capacity`` neighbours within the cutoff
        (all pairs: ``capacity`` or more), a cell holds more than ``cell_capacity`` atoms, or a
        periodic cell of the grid is thinner than the cutoff or has fewer than 3 cells.
        """
        if capacity < 1 or capacity > positions.shape[0] - 1:
            raise ValueError("energy_static: capacity must be in 1..N-1")
        positions, numbers, cell, pbc, charge, spin = self._prepare(
            positions, numbers, cell, pbc, charge, spin)
        cell_eff = _effective_cell(cell, pbc)
        if cell_capacity > 0:
            if grid_a < 1 or grid_b < 1 or grid_c < 1:
                raise ValueError("energy_static: the cell list needs grid sizes >= 1")
            index, nbr_vec, overflow = _cell_list_neighbors(
                positions, cell_eff, pbc, self.cutoff, capacity, cell_capacity,
                [grid_a, grid_b, grid_c])
        else:
            index, nbr_vec, overflow = _all_pairs_neighbors(positions, cell_eff, pbc,
                                                            self.cutoff, capacity)
        q, m = self._per_atom_state(charge, spin, positions.shape[0])
        energies, _ = self.network(numbers, q, m, index, nbr_vec)
        return _nan_if(overflow, energies.sum())
