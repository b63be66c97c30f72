"""A TransIP model as an OpenMM force, through OpenMM-Torch's ``TorchForce``.

:func:`make_torch_force` loads an exported TransIP TorchScript file, checks it against the
system at construction (elements, charge/multiplicity, box size) and wraps it in a small
scripted module that OpenMM-Torch calls at every step:

* positions arrive in nm (float64 on the Reference/CPU platforms, float32 or float64 on CUDA),
  the periodic box (rows = box vectors, nm) as the second argument when the force is periodic;
* the wrapper picks the ML atoms, converts nm -> Å and casts to the model's dtype, calls
  ``model.energy(positions, numbers, cell, pbc, charge, spin)`` and returns kJ/mol;
* OpenMM-Torch back-propagates that energy to get the forces.

Unit factors come from :mod:`transip_md.units` only.
"""

from __future__ import annotations

import copy
import ctypes
import importlib
import importlib.util
import os
import re
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import openmm
import openmm.app
import openmm.unit
import torch
from ase.data import atomic_numbers as _ASE_ATOMIC_NUMBERS
from ase.data import chemical_symbols as _ASE_SYMBOLS
from torch import Tensor, nn

from transip_md import file_kinds
from transip_md.model_errors import ScriptError, translate_model_error
from transip_md.units import ANGSTROM_PER_NM, KJ_PER_MOL_PER_EV

#: Names of the optional OpenMM global parameters (``global_parameters=True``).
CHARGE_PARAMETER = "transip_charge"
MULTIPLICITY_PARAMETER = "transip_multiplicity"

_NVRTC12 = "libnvrtc.so.12"

ModelLike = Union[str, os.PathLike, torch.jit.ScriptModule]
ElementLike = Union[openmm.app.Element, str, int]


# ----------------------------------------------------------------------------- imports
def _find_nvrtc12() -> Optional[str]:
    """Path of ``libnvrtc.so.12`` from an installed ``nvidia-cuda-nvrtc-cu12`` wheel, or None."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        # The wheel's layout: nvidia/cuda_nvrtc/lib (older) or nvidia/cu12/lib (newer).
        for sub in ("cuda_nvrtc", "cu12"):
            candidate = Path(location) / sub / "lib" / _NVRTC12
            if candidate.is_file():
                return str(candidate)
    return None


def import_openmmtorch(
    _import: Callable[[str], object] = importlib.import_module,
    _find_nvrtc: Callable[[], Optional[str]] = _find_nvrtc12,
):
    """Import and return the ``openmmtorch`` module.

    The PyPI ``openmmtorch`` 1.5 library lists ``libnvrtc.so.12`` as a needed library. A CUDA 12
    torch wheel brings it in when torch is imported first; a CUDA 13 or CPU-only torch does not.
    In that case the library is loaded from an installed ``nvidia-cuda-nvrtc-cu12`` wheel (with
    ``RTLD_GLOBAL``) and the import retried; if there is none, the ImportError says what to
    install. (The arguments exist for the tests.)
    """
    _import("torch")  # a CUDA 12 torch wheel loads its nvidia libraries, libnvrtc included
    try:
        module = _import("openmmtorch")
        _reload_torch_plugins()
        return module
    except ImportError as err:
        if _NVRTC12 not in str(err):
            if isinstance(err, ModuleNotFoundError) and err.name in ("openmmtorch", "_openmmtorch"):
                raise ImportError(
                    "OpenMM-Torch is not installed; install it with "
                    "`pip install openmmtorch==1.5` (or `pip install 'transip-md[openmm]'`)"
                ) from err
            raise
        first_error = err
    library = _find_nvrtc()
    if library is None:
        raise ImportError(
            "openmmtorch 1.5 needs " + _NVRTC12 + " (CUDA 12 NVRTC), which this torch build "
            f"(torch {torch.__version__}) does not provide. Either `pip install "
            "nvidia-cuda-nvrtc-cu12` so that it can be loaded from there, or install the torch "
            "that openmmtorch 1.5 was built against: `pip install 'torch>=2.9,<2.10'`"
        ) from first_error
    try:
        ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
        module = _import("openmmtorch")
        _reload_torch_plugins()
        return module
    except (OSError, ImportError) as err:
        raise ImportError(
            f"loaded {library} but `import openmmtorch` still failed ({err}); install the torch "
            "that openmmtorch 1.5 was built against: `pip install 'torch>=2.9,<2.10'`"
        ) from err


_plugins_reloaded = False


def _reload_torch_plugins() -> None:
    """Load the OpenMM-Torch platform plugins that failed when ``openmm`` was first imported.

    OpenMM loads its plugins when ``openmm`` is imported. If that happened before torch was
    imported, ``libOpenMMTorchReference.so`` (and the CUDA one) failed for want of torch's
    libraries, and every Context with a TorchForce fails with "does not support all required
    kernels". Now that torch is loaded, those plugins are loaded again, once.
    """
    global _plugins_reloaded
    if _plugins_reloaded:
        return
    _plugins_reloaded = True
    still_failing = []
    for failure in openmm.Platform.getPluginLoadFailures():
        match = re.match(r"Error loading library (.+?): ", failure)
        if match is None or "OpenMMTorch" not in os.path.basename(match.group(1)):
            continue
        try:
            openmm.Platform.loadPluginLibrary(match.group(1))
        except Exception as err:  # e.g. the OpenCL plugin on a machine without OpenCL
            still_failing.append(str(err))
    reference = [f for f in still_failing if "OpenMMTorchReference" in f]
    if reference:
        raise ImportError(
            "the OpenMM-Torch plugin for the Reference/CPU platforms cannot be loaded: "
            + reference[0]
        )


# ----------------------------------------------------------------------------- model file
def _load_model(path: str) -> torch.jit.ScriptModule:
    """Load an exported model file onto the CPU (OpenMM-Torch moves it to the platform's device).

    ``load_exported`` checks the file's metadata and format version (ModelFileError, a
    ValueError, for a file that is not an exported transip-md model).
    """
    from transip_md.export import load_exported

    return load_exported(path, device="cpu", needs=("energy", "validate"), who="OpenMM")


def _model_dtype(model: torch.jit.ScriptModule) -> torch.dtype:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float64


_PRECISIONS = {
    "single": torch.float32,
    "float32": torch.float32,
    "double": torch.float64,
    "float64": torch.float64,
}


def _resolve_precision(precision) -> Optional[torch.dtype]:
    if precision is None:
        return None
    if isinstance(precision, torch.dtype) and precision in (torch.float32, torch.float64):
        return precision
    key = str(precision).lower()
    if key not in _PRECISIONS:
        raise ValueError(
            f"precision={precision!r} is not understood; use None (the model's own dtype), "
            "'single' or 'double'"
        )
    return _PRECISIONS[key]


# ----------------------------------------------------------------------------- the wrapper
# Why the wrappers look the way they do (issue #6): OpenMM-Torch (1.5, Reference/CPU and CUDA
# kernels alike) runs ``torch::jit::freeze`` on the module before the first step. Freezing
# inlines every method that ``forward`` calls into ``forward``'s graph, recording for each inlined
# node a *raw* ``Function*`` to the method it came from (its InlinedCallStack), and then deletes
# the top-level module's methods other than ``forward`` (``removeUnusedAttrs`` ->
# ``CompilationUnit::unsafeRemoveMethod``). When the model later raises (NaN coordinates, two atoms
# at the same position, ...), ``InterpreterStateImpl::callstack()`` walks those inlined call
# stacks to build the TorchScript traceback and reads the deleted functions' names: a
# use-after-free (torch 2.9.1; valgrind shows the invalid reads), which segfaults or garbles the
# message depending on what has reused the memory. Submodule methods are not deleted (only types
# with attributes that freezing could not fold are cleaned up; there are none here), nor are free
# functions.
#
# So: the OpenMM-facing wrappers below have **no method besides ``forward``**. The shared work
# lives in the ``forward`` of a submodule (:class:`_TransIPEnergy`, attribute ``core``) and in the
# free function :func:`_state_from`. ``test_openmm_wrappers_survive_freezing``
# (tests/test_bad_inputs.py) checks both conditions; do not add helper methods to the wrappers.
# (A bare module whose ``forward`` calls the model directly was never affected, which is why
# a hand-made wrapper reported the same errors cleanly.)
class _TransIPEnergy(nn.Module):
    """The model call, shared by the wrappers: ``forward(positions, box, charge, multiplicity)``
    with positions and box in nm, returns the energy (kJ/mol) of the ML atoms."""

    def __init__(
        self,
        model: torch.jit.ScriptModule,
        numbers: Tensor,
        indices: Optional[Tensor],
        charge: int,
        multiplicity: int,
        periodic: bool,
        dtype: torch.dtype,
        capacity: int = 0,
    ):
        super().__init__()
        self.model = model
        # > 0: static-shape path (model.energy_static) with this many neighbours per atom,
        # for CUDA-graph capture; 0: the model's own neighbour list (dynamic shapes).
        self.capacity = int(capacity)
        self.register_buffer("numbers", numbers.to(torch.long))
        self.use_subset = indices is not None
        if indices is None:
            indices = torch.zeros(0, dtype=torch.long)
        self.register_buffer("indices", indices.to(torch.long))
        self.register_buffer("charge", torch.tensor(int(charge), dtype=torch.long))
        self.register_buffer("multiplicity", torch.tensor(int(multiplicity), dtype=torch.long))
        self.register_buffer("pbc", torch.full((3,), bool(periodic), dtype=torch.bool))
        # A zero cell for open boundaries; its dtype is the dtype the model computes in.
        self.register_buffer("open_cell", torch.zeros((3, 3), dtype=dtype))
        self.angstrom_per_nm = ANGSTROM_PER_NM
        self.kj_per_mol_per_ev = KJ_PER_MOL_PER_EV

    def forward(self, positions: Tensor, box: Tensor, charge: Tensor, multiplicity: Tensor) -> Tensor:
        """Energy (kJ/mol) of the ML atoms; ``positions`` and ``box`` in nm."""
        if self.use_subset:
            positions = positions.index_select(0, self.indices)
        dtype = self.open_cell.dtype
        positions_a = (positions * self.angstrom_per_nm).to(dtype)
        cell_a = (box * self.angstrom_per_nm).to(dtype)
        if self.capacity > 0:
            energy = self.model.energy_static(positions_a, self.numbers, cell_a, self.pbc, charge,
                                              multiplicity, self.capacity)
        else:
            energy = self.model.energy(positions_a, self.numbers, cell_a, self.pbc, charge,
                                       multiplicity)
        return energy.to(torch.float64) * self.kj_per_mol_per_ev


def _state_from(charge: Tensor, multiplicity: Tensor) -> Tuple[Tensor, Tensor]:
    """Global-parameter tensors (floats) -> integer charge and multiplicity tensors."""
    q = torch.round(charge.reshape(-1)[0]).to(torch.long)
    m = torch.round(multiplicity.reshape(-1)[0]).to(torch.long)
    return q, m


class _Wrapper(nn.Module):
    """Base of the scripted wrappers; subclasses only differ in ``forward``'s signature
    (OpenMM-Torch passes the box when periodic, then one tensor per global parameter).
    Subclasses must not define methods other than ``forward`` (see the note above)."""

    def __init__(self, core: _TransIPEnergy):
        super().__init__()
        self.core = core


class _Open(_Wrapper):
    def forward(self, positions: Tensor) -> Tensor:
        return self.core(positions, self.core.open_cell, self.core.charge, self.core.multiplicity)


class _Periodic(_Wrapper):
    def forward(self, positions: Tensor, box: Tensor) -> Tensor:
        return self.core(positions, box, self.core.charge, self.core.multiplicity)


class _OpenState(_Wrapper):
    def forward(self, positions: Tensor, charge: Tensor, multiplicity: Tensor) -> Tensor:
        q, m = _state_from(charge, multiplicity)
        return self.core(positions, self.core.open_cell, q, m)


class _PeriodicState(_Wrapper):
    def forward(self, positions: Tensor, box: Tensor, charge: Tensor, multiplicity: Tensor) -> Tensor:
        q, m = _state_from(charge, multiplicity)
        return self.core(positions, box, q, m)


class _OpenScaled(_Wrapper):
    def forward(self, positions: Tensor, scale: Tensor) -> Tensor:
        energy = self.core(positions, self.core.open_cell, self.core.charge, self.core.multiplicity)
        return scale.reshape(-1)[0].to(energy.dtype) * energy


class _PeriodicScaled(_Wrapper):
    def forward(self, positions: Tensor, box: Tensor, scale: Tensor) -> Tensor:
        energy = self.core(positions, box, self.core.charge, self.core.multiplicity)
        return scale.reshape(-1)[0].to(energy.dtype) * energy


#: (periodic, charge/multiplicity parameters, scale parameter) -> wrapper class
_WRAPPERS = {
    (False, False, False): _Open,
    (True, False, False): _Periodic,
    (False, True, False): _OpenState,
    (True, True, False): _PeriodicState,
    (False, False, True): _OpenScaled,
    (True, False, True): _PeriodicScaled,
}


def _script_wrapper(model, numbers: List[int], indices: Optional[Tensor], charge: int,
                    multiplicity: int, periodic: bool, dtype: torch.dtype, capacity: int,
                    state_parameters: bool, scale_parameter: bool) -> torch.jit.ScriptModule:
    """The scripted module that OpenMM-Torch calls (forward's arguments follow the force's
    periodicity and global parameters)."""
    core = _TransIPEnergy(model, torch.tensor(numbers, dtype=torch.long), indices, charge,
                          multiplicity, periodic, dtype, capacity)
    cls = _WRAPPERS[(periodic, state_parameters, scale_parameter)]
    return torch.jit.script(cls(core))


# ----------------------------------------------------------------------------- checks
def _atomic_number(element: ElementLike, where: str) -> int:
    if element is None:
        raise ValueError(f"{where} has no element; TransIP needs the element of every atom it models")
    if isinstance(element, openmm.app.Element):
        return int(element.atomic_number)
    if isinstance(element, (int, np.integer)) and not isinstance(element, bool):
        return int(element)
    if isinstance(element, str) and element in _ASE_ATOMIC_NUMBERS:
        return int(_ASE_ATOMIC_NUMBERS[element])
    raise ValueError(f"{where}: cannot read an element from {element!r}")


def _elements_of(topology_or_elements, atoms: Optional[List[int]]) -> Tuple[List[int], List[str]]:
    """Atomic numbers of the ML atoms and a description of each (for error messages)."""
    if isinstance(topology_or_elements, openmm.app.Topology):
        all_atoms = list(topology_or_elements.atoms())
        describe = [
            f"topology atom {a.index} (name '{a.name}', residue {a.residue.name} {a.residue.id})"
            for a in all_atoms
        ]
        elements = [a.element for a in all_atoms]
    else:
        elements = list(topology_or_elements)
        describe = [f"atom {k}" for k in range(len(elements))]
    n_total = len(elements)
    chosen = list(range(n_total)) if atoms is None else atoms
    bad = [a for a in chosen if a < 0 or a >= n_total]
    if bad:
        raise ValueError(f"atoms contains indices outside 0..{n_total - 1}: {bad[:5]}")
    numbers = [_atomic_number(elements[k], describe[k]) for k in chosen]
    return numbers, [describe[k] for k in chosen]


def _box_vectors_nm(box_vectors) -> np.ndarray:
    if openmm.unit.is_quantity(box_vectors):
        box_vectors = box_vectors.value_in_unit(openmm.unit.nanometer)
    rows = []
    for v in box_vectors:
        if openmm.unit.is_quantity(v):
            v = v.value_in_unit(openmm.unit.nanometer)
        rows.append([float(x) for x in v])
    box = np.array(rows, dtype=np.float64)
    if box.shape != (3, 3):
        raise ValueError(f"periodic box vectors must be three 3-vectors, got shape {box.shape}")
    return box


def box_widths_nm(box_vectors) -> np.ndarray:
    """Perpendicular widths (distances between opposite faces, nm) of a periodic box."""
    box = _box_vectors_nm(box_vectors)
    volume = abs(float(np.linalg.det(box)))
    areas = np.linalg.norm(
        np.stack([np.cross(box[1], box[2]), np.cross(box[2], box[0]), np.cross(box[0], box[1])]),
        axis=1,
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(areas > 0, volume / areas, 0.0)


def _check_box(model, box_vectors) -> None:
    """The model's own cell rule (the same in every engine); files without it check at the
    first evaluation."""
    if not hasattr(model, "validate_cell"):
        return
    cell = torch.tensor(_box_vectors_nm(box_vectors) * ANGSTROM_PER_NM, dtype=torch.float64)
    try:
        model.validate_cell(cell, torch.ones(3, dtype=torch.bool))
    except ScriptError as err:
        raise translate_model_error(err) from None


def _validate_state(model, numbers: List[int], charge: int, multiplicity: int, dtype) -> None:
    """Charge/multiplicity checks, by the model's own rules (ranges and electron count)."""
    n = len(numbers)
    spread = torch.zeros((n, 3), dtype=dtype)
    spread[:, 0] = torch.arange(n, dtype=dtype) * 10.0
    try:
        model.validate(
            spread,
            torch.tensor(numbers, dtype=torch.long),
            torch.tensor(int(charge), dtype=torch.long),
            torch.tensor(int(multiplicity), dtype=torch.long),
        )
        if hasattr(model, "validate_electrons"):
            model.validate_electrons(int(sum(numbers)), int(charge), int(multiplicity), n)
        else:
            warnings.warn("this model file predates the electron-count check; re-export it "
                          "with python -m transip_md.export to have charge/multiplicity checked")
    except ScriptError as err:
        raise translate_model_error(err) from None


# ----------------------------------------------------------------------------- public API
def _static_capacity(n_atoms: int, cutoff_a: float, periodic: bool, box_vectors,
                     requested: Optional[int], cell_capacity: Optional[int] = None,
                     cell_list: bool = True):
    """Neighbour search of the static-shape (CUDA-graph) path: a
    :class:`~transip_md.model.static_shapes.StaticNeighborPlan` (neighbour capacity, and the
    cell list's grid and cell capacity where one applies); checks its preconditions."""
    from transip_md.model.static_shapes import plan_static_neighbors

    if n_atoms < 2:
        raise ValueError("cuda_graphs needs at least two ML atoms")
    cell = None
    if periodic:
        if box_vectors is None:
            raise ValueError("cuda_graphs with a periodic force needs the box (topology or box_vectors)")
        cell = _box_vectors_nm(box_vectors) * ANGSTROM_PER_NM
    try:
        return plan_static_neighbors(n_atoms, cutoff_a, cell, periodic, requested, cell_capacity,
                                     cell_list)
    except ValueError as err:
        raise ValueError(f"cuda_graphs: {err}; use cuda_graphs=False for small boxes"
                         if "twice" in str(err) else f"cuda_graphs: {err}") from None


def make_torch_force(
    model_path: ModelLike,
    topology_or_elements,
    atoms: Optional[Sequence[int]] = None,
    charge: int = 0,
    multiplicity: int = 1,
    periodic: Optional[bool] = None,
    precision=None,
    *,
    box_vectors=None,
    global_parameters: bool = False,
    scale_parameter: Optional[str] = None,
    cuda_graphs: bool = False,
    neighbor_capacity: Optional[int] = None,
    cell_capacity: Optional[int] = None,
):
    """Build an ``openmmtorch.TorchForce`` that evaluates a TransIP model.

    Args:
        model_path: exported TransIP TorchScript file (or an already loaded ScriptModule).
        topology_or_elements: an ``openmm.app.Topology`` (elements from its atoms), or one
            element per particle (``openmm.app.Element``, symbol or atomic number).
        atoms: indices of the particles the model acts on (None: all of them). Forces on the
            other particles are zero.
        charge: total charge of the ML atoms (e).
        multiplicity: spin multiplicity 2S+1 of the ML atoms.
        periodic: None = periodic iff the topology has a box (or ``box_vectors`` is given).
            A periodic force gets the current box from OpenMM at every call, so triclinic
            boxes and barostats work.
        precision: None (the model file's dtype), ``'single'`` or ``'double'``.
        box_vectors: box to check when ``topology_or_elements`` is not a Topology with a box.
        global_parameters: also expose the charge and multiplicity as OpenMM global parameters
            ``transip_charge`` / ``transip_multiplicity`` (changeable with
            ``Context.setParameter``; values are rounded to integers). Off by default because
            two such forces in one System would share them.
        scale_parameter: name of a global parameter (default value 1) that multiplies the
            energy, e.g. ``"lambda_interpolate"`` for openmm-ml's ML/MM interpolation. Cannot be
            combined with ``global_parameters``.
        cuda_graphs: run the model through its static-shape path (``energy_static``: fixed
            tensor shapes, no host synchronisation) and set OpenMM-Torch's ``useCUDAGraphs``
            property, so that the CUDA platform captures one graph and replays it every step.
            Neighbours come from a cell list (O(N); grid fixed from the initial box, cells at
            least one cutoff wide with 5 % room for a shrinking box) or, for small systems,
            from all pairs (periodic boxes then at least twice the cutoff wide). Every size is
            fixed when the force is built, from the atom count and the box (the positions are
            not known yet); if the run outgrows one of them -- an atom with more than
            ``neighbor_capacity`` neighbours within the cutoff, a grid cell with more than
            ``cell_capacity`` atoms, a box compressed below the grid's cell width -- the
            energy becomes NaN, checked on the device, and OpenMM stops ("Particle coordinate
            is NaN" or NaN energies) instead of silently dropping neighbours. Remedy: build
            the force again with a larger ``neighbor_capacity=`` and/or ``cell_capacity=``
            (or from the compressed box).
        neighbor_capacity: neighbours per atom on the static path (default: 1.5 x the mean
            count expected from the box density, at least 32, at most N - 1; in vacuum N - 1
            for all pairs, else from a density of 0.1 atoms/Å^3).
        cell_capacity: atoms per cell of the static path's cell list (default: 1.5 x the mean
            N / cells + 3 x its square root; in vacuum the mean assumes a compact cluster at
            0.1 atoms/Å^3). Giving it selects the cell list wherever the grid allows one.

    Raises:
        FileNotFoundError: the model file does not exist.
        ValueError (also): the path is a directory, FIFO or device, not a model file.
        ValueError: an atom without element, an element the model does not know, an impossible
            charge/multiplicity, or a periodic box narrower than the model cutoff.
        ImportError: OpenMM-Torch cannot be imported (the message says what to install).

    Box sizes: the model builds its periodic images explicitly, so it is exact for any box at
    least one cutoff wide, including boxes narrower than twice the cutoff or the receptive field
    (an atom then interacts with its own images, as physics demands). Boxes narrower than the
    cutoff are refused at construction: they are almost always an Å/nm mix-up. The box is not
    re-checked during the run.
    """
    openmmtorch = import_openmmtorch()

    if isinstance(model_path, torch.jit.ScriptModule):
        model = model_path
        model_name = "the given model"
    else:
        path = Path(os.fspath(model_path)).expanduser()
        # missing: FileNotFoundError; a directory, FIFO or device: ValueError saying which
        file_kinds.check_regular_file(path, "TransIP model file")
        model = _load_model(str(path))
        model_name = str(path)

    dtype = _resolve_precision(precision)
    if dtype is not None and dtype != _model_dtype(model):
        if model is model_path:  # never change the caller's module in place
            model = copy.deepcopy(model)
        model = model.to(dtype)
    dtype = _model_dtype(model)

    for name, value in (("charge", charge), ("multiplicity", multiplicity)):
        if isinstance(value, bool) or int(value) != value:
            raise ValueError(f"{name} must be an integer, got {value!r}")

    atom_list: Optional[List[int]] = None
    if atoms is not None:
        atom_list = [int(a) for a in atoms]
        if len(atom_list) == 0:
            raise ValueError("atoms is empty: give the indices of at least one ML atom")
        if len(set(atom_list)) != len(atom_list):
            raise ValueError("atoms contains repeated indices")
    numbers, described = _elements_of(topology_or_elements, atom_list)

    known = {int(_ASE_ATOMIC_NUMBERS[s]) for s in model.element_list()}
    for z, where in zip(numbers, described):
        if z not in known:
            symbol = _ASE_SYMBOLS[z] if 0 < z < len(_ASE_SYMBOLS) else "?"
            raise ValueError(
                f"element {symbol} (Z={z}) of {where} is not supported by {model_name}; "
                f"it knows {', '.join(model.element_list())}"
            )
    _validate_state(model, numbers, charge, multiplicity, dtype)

    topology_box = None
    if isinstance(topology_or_elements, openmm.app.Topology):
        topology_box = topology_or_elements.getPeriodicBoxVectors()
    if box_vectors is None:
        box_vectors = topology_box
    if periodic is None:
        periodic = box_vectors is not None
    periodic = bool(periodic)
    if periodic and box_vectors is not None:
        _check_box(model, box_vectors)

    if global_parameters and scale_parameter is not None:
        raise ValueError("global_parameters and scale_parameter cannot be combined")
    indices = None if atom_list is None else torch.tensor(atom_list, dtype=torch.long)
    capacity = 0
    if cuda_graphs:
        from transip_md.model.static_shapes import StaticPlanBinding, supports_cell_list

        plan = _static_capacity(len(numbers), float(model.cutoff), periodic, box_vectors,
                                neighbor_capacity, cell_capacity)
        if plan.uses_cell_list and not supports_cell_list(model):
            warnings.warn(f"{model_name} predates the static-shape cell list; cuda_graphs uses "
                          "the O(N^2) all-pairs search. Re-export it with this transip-md "
                          "(python -m transip_md.export ...) for the O(N) one")
            plan = _static_capacity(len(numbers), float(model.cutoff), periodic, box_vectors,
                                    neighbor_capacity, cell_list=False)
        capacity = plan.neighbor_capacity
        if plan.uses_cell_list:
            # The wrapper calls model.energy_static(..., capacity); the binding adds the grid.
            model = StaticPlanBinding(model, plan)
    scripted = _script_wrapper(model, numbers, indices, charge, multiplicity, periodic, dtype,
                               capacity, bool(global_parameters), scale_parameter is not None)
    if os.environ.get("TRANSIP_TORCHFORCE_VIA_FILE"):
        # Hand OpenMM-Torch a file instead of an in-memory module: passing a module object
        # across the pybind boundary segfaults when the running torch is not the one the
        # openmmtorch wheel was built against (seen with torch 2.11 + openmmtorch 1.5).
        import tempfile

        handle, module_path = tempfile.mkstemp(prefix="transip-openmm-", suffix=".pt")
        os.close(handle)
        scripted.save(module_path)
        force = openmmtorch.TorchForce(module_path)
        os.unlink(module_path)
    else:
        force = openmmtorch.TorchForce(scripted)
    if cuda_graphs:
        force.setProperty("useCUDAGraphs", "true")
        # Plain calls before capture, so that TorchScript's profiling executor has settled
        # (it specialises the graph on the first runs) when the CUDA graph is recorded.
        force.setProperty("CUDAGraphWarmupSteps", "3")
    force.setUsesPeriodicBoundaryConditions(periodic)
    force.setName("TransIP")
    if global_parameters:
        force.addGlobalParameter(CHARGE_PARAMETER, float(charge))
        force.addGlobalParameter(MULTIPLICITY_PARAMETER, float(multiplicity))
    if scale_parameter is not None:
        force.addGlobalParameter(scale_parameter, 1.0)
    return force


def topology_from_ase(atoms, residue_name: str = "MOL", infer_bonds: bool = True):
    """An OpenMM Topology and positions (nm Quantity) for an ``ase.Atoms``.

    All atoms go into one residue of one chain; bonds are guessed from covalent radii (ASE's
    ``natural_cutoffs``) so that ``openmm.app.ForceField`` templates can match. The periodic
    box is set when any axis of ``atoms.pbc`` is periodic.
    """
    topology = openmm.app.Topology()
    chain = topology.addChain()
    residue = topology.addResidue(residue_name, chain)
    counts: dict = {}
    added = []
    for symbol in atoms.get_chemical_symbols():
        counts[symbol] = counts.get(symbol, 0) + 1
        added.append(
            topology.addAtom(f"{symbol}{counts[symbol]}", openmm.app.Element.getBySymbol(symbol), residue)
        )
    if infer_bonds and len(atoms) > 1:
        from ase.neighborlist import NeighborList, natural_cutoffs

        neighbors = NeighborList(natural_cutoffs(atoms), self_interaction=False, bothways=False)
        neighbors.update(atoms)
        for i in range(len(atoms)):
            for j in neighbors.get_neighbors(i)[0]:
                topology.addBond(added[i], added[int(j)])
    if any(atoms.pbc):
        topology.setPeriodicBoxVectors(
            [openmm.Vec3(*(row / ANGSTROM_PER_NM)) for row in np.asarray(atoms.cell)]
            * openmm.unit.nanometer
        )
    positions = openmm.unit.Quantity(
        [openmm.Vec3(*(p / ANGSTROM_PER_NM)) for p in atoms.positions], openmm.unit.nanometer
    )
    return topology, positions
