"""Energy and forces of one fixed system through the model's static-shape path, optionally
replayed from a CUDA graph: the ASE calculator's ``cuda_graphs=True``.

A small system on a GPU is launch-bound: the dynamic path (``compute``) issues ~1,000 kernels
and several host synchronisations per call (the neighbour list's sizes are data-dependent).
``energy_static`` has fixed shapes and no host synchronisation (``model/static_shapes.py``),
so one call -- energy, then forces by autograd -- can be recorded once as a CUDA graph and
replayed with new positions and cell copied into the same input buffers. This is what
OpenMM-Torch does for ``make_torch_force(..., cuda_graphs=True)``; here it is done in Python
with ``torch.cuda.CUDAGraph`` because ASE has no graph support of its own.

The plan (neighbour capacity, cell list) is chosen from the first geometry with
:func:`~transip_md.model.static_shapes.plan_static_neighbors`. When the positions later break
a capacity, the static energy is NaN (detected on the device). :class:`StaticForces` then
answers that call with the dynamic path -- the correct result -- and replans with larger
capacities from the current geometry, so a run is never given wrong forces and never stops
for a crowded cell. A NaN that the dynamic path also gives is the model's or the input's
problem and is reported as the dynamic path reports it.
"""

from typing import Callable, Optional, Tuple

import numpy as np
import torch

from .model.static_shapes import StaticNeighborPlan, plan_static_neighbors, supports_cell_list

#: A replan after an overflow grows both capacities by at least this factor.
REPLAN_GROWTH = 1.5
#: Un-captured calls before the capture: TorchScript's profiling executor specialises the
#: graph on its first calls, and the capture must record the specialised one.
WARMUP_CALLS = 5


def static_energy_forces(model, inputs, plan: StaticNeighborPlan):
    """(energy, forces) through ``model.energy_static`` with ``plan``; forces by autograd.

    ``inputs`` = (positions, numbers, cell, pbc, charge, spin) as for ``compute``. Positions that
    require grad are used as they are (a CUDA graph's static input buffer), others are detached.
    No host synchronisation: this is what :func:`capture_static_graph` records.
    """
    positions, numbers, cell, pbc, charge, spin = inputs
    if not positions.requires_grad:
        positions = positions.detach().requires_grad_(True)
    if supports_cell_list(model):
        energy = model.energy_static(positions, numbers, cell, pbc, charge, spin, *plan.arguments())
    else:  # files from before the cell list: all pairs only
        energy = model.energy_static(positions, numbers, cell, pbc, charge, spin,
                                     plan.neighbor_capacity)
    # grad with inputs=: no AccumulateGrad node, nothing written to positions.grad
    (grad,) = torch.autograd.grad([energy], [positions])
    return energy.detach(), -grad


def capture_static_graph(model, inputs, plan: StaticNeighborPlan, warmup: int = 5):
    """Capture :func:`static_energy_forces` once into a CUDA graph.

    As the PyTorch CUDA-graphs notes prescribe: static input buffers, ``warmup`` eager calls on
    a side stream first (TorchScript's profiling executor specialises the graph on its first
    runs; cuBLAS sets up its workspaces), then one capture. Returns ``replay(positions=None)``,
    which copies ``positions`` (if given) into the static buffer, replays, and returns the
    static (energy, forces) outputs (overwritten by the next replay). The other inputs (cell,
    ...) are read from the tensors given here at every replay: copy new values into them.
    """
    if not torch.cuda.is_available() or inputs[0].device.type != "cuda":
        raise RuntimeError("CUDA-graph capture needs the inputs on a CUDA device")
    static_positions = inputs[0].detach().clone().requires_grad_(True)
    static_inputs = (static_positions,) + tuple(inputs[1:])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            static_energy_forces(model, static_inputs, plan)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        energy, forces = static_energy_forces(model, static_inputs, plan)
    torch.cuda.synchronize()

    def replay(positions=None):
        if positions is not None:
            with torch.no_grad():
                static_positions.copy_(positions)
        graph.replay()
        return energy, forces

    replay.graph = graph  # keeps the graph (and its memory pool) alive with the function
    return replay


class StaticForces:
    """``evaluate(positions, cell) -> (energy, forces)`` for fixed atoms, charge and spin.

    Args:
        model: an exported model (``load_exported``) with ``energy_static``.
        numbers, pbc: atomic numbers and periodicity (all axes periodic or none).
        charge, spin: total charge and spin multiplicity.
        cell: the initial cell (Å), used to plan the cell list.
        dtype, device: the model's dtype and the device it runs on.
        cuda_graph: record the call as a CUDA graph (``device`` must be CUDA).
        dynamic: ``dynamic(positions, cell) -> (energy, forces)`` through the model's dynamic
            path; answers the calls whose static energy overflowed a capacity.
        neighbor_capacity, cell_capacity: override the plan's defaults.
    """

    def __init__(self, model, numbers: np.ndarray, pbc: np.ndarray, charge: int, spin: int,
                 cell: np.ndarray, dtype: torch.dtype, device: torch.device, cuda_graph: bool,
                 dynamic: Callable[[np.ndarray, np.ndarray], Tuple[float, np.ndarray]],
                 neighbor_capacity: Optional[int] = None, cell_capacity: Optional[int] = None):
        pbc = np.asarray(pbc, dtype=bool)
        if pbc.any() and not pbc.all():
            raise ValueError("cuda_graphs needs a cell periodic along all three axes or none "
                             f"(atoms.pbc is {pbc.tolist()}); use cuda_graphs=False")
        # the model's declaration (energy_static) and the device are the loader's and the
        # calculator's to check, once, before anything is built (load_exported(needs=...));
        # capture_static_graph refuses non-CUDA inputs itself
        self.model, self.dtype, self.device = model, dtype, torch.device(device)
        self.cuda_graph, self.dynamic = cuda_graph, dynamic
        self.periodic = bool(pbc.all())
        self.cutoff = float(model.cutoff)
        self.cell_list = supports_cell_list(model)
        self.replans = 0
        self.static_disabled = False  # set when a replan finds no static plan for the box
        self.last_path = ""  # "static" or "dynamic": which path answered the last call
        n = len(numbers)
        self.plan = plan_static_neighbors(n, self.cutoff, np.asarray(cell), self.periodic,
                                          neighbor_capacity, cell_capacity, self.cell_list)
        # the inputs; a captured graph reads the cell from this tensor at every replay
        self.cell = torch.zeros((3, 3), dtype=dtype, device=self.device)
        self.inputs = (torch.zeros((n, 3), dtype=dtype, device=self.device),
                       torch.as_tensor(np.asarray(numbers), dtype=torch.long, device=self.device),
                       self.cell, torch.full((3,), self.periodic, dtype=torch.bool, device=self.device),
                       torch.tensor(int(charge), device=self.device),
                       torch.tensor(int(spin), device=self.device))
        self._replay = None

    def _static(self, positions: np.ndarray, cell: np.ndarray) -> Tuple[float, np.ndarray]:
        x = torch.as_tensor(np.asarray(positions), dtype=self.dtype, device=self.device)
        with torch.no_grad():
            self.cell.copy_(torch.as_tensor(np.asarray(cell), dtype=self.dtype))
        if not self.cuda_graph:
            energy, forces = static_energy_forces(self.model, (x,) + self.inputs[1:], self.plan)
        else:
            if self._replay is None:
                self._replay = capture_static_graph(self.model, (x,) + self.inputs[1:], self.plan,
                                                    WARMUP_CALLS)
            energy, forces = self._replay(x)
        return float(energy), forces.double().cpu().numpy()

    # ---------------------------------------------------------------- the public call
    def evaluate(self, positions: np.ndarray, cell: np.ndarray) -> Tuple[float, np.ndarray]:
        """Energy (eV) and forces (eV/Å, float64 numpy) at ``positions`` (Å) in ``cell``."""
        self.last_path = "dynamic"
        if self.static_disabled:
            return self.dynamic(positions, cell)
        energy, forces = self._static(positions, cell)
        if np.isfinite(energy):
            self.last_path = "static"
            return energy, forces
        # a capacity was exceeded (static_shapes._nan_if): the dynamic path's answer, then a
        # larger plan for the next calls
        energy, forces = self.dynamic(positions, cell)
        if np.isfinite(energy):
            self._replan(cell)
        return energy, forces

    def _replan(self, cell: np.ndarray) -> None:
        old = self.plan
        n = int(self.inputs[1].numel())
        grown = lambda c: min(max(int(np.ceil(REPLAN_GROWTH * c)), c + 1), n - 1)  # noqa: E731
        neighbor_capacity = grown(old.neighbor_capacity)
        cell_capacity = min(grown(old.cell_capacity), n) if old.uses_cell_list else None
        try:
            self.plan = plan_static_neighbors(n, self.cutoff, np.asarray(cell), self.periodic,
                                              neighbor_capacity, cell_capacity, self.cell_list)
        except ValueError:  # the box no longer allows a static plan: stay on the dynamic path
            self.plan = old
            self.static_disabled = True
        self._replay = None
        self.replans += 1
