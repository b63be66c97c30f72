"""Input checks of the model: the one place where engines' inputs are judged.

Every engine gets the same answer for the same bad input because the rules live here, inside
the exported file. Messages name the problem; those about particular atoms end with a
machine-readable suffix `` [atom rows: i j]`` (rows of the model input) that an engine with its
own atom numbering (LAMMPS IDs) translates, and that Python strips (rows are atom indices there).
"""


import torch
from torch import Tensor

from .contract import entry_point
from .neighbors import _check_cell


class InputChecks:
    """Mixin of :class:`~transip_md.model.potential.TransIPPotential`: validation entry points."""

    @torch.jit.export
    @entry_point(1, "None; raises ValueError on bad per-atom input")
    def validate(self, positions: Tensor, numbers: Tensor, charge: Tensor, spin: Tensor) -> None:
        """Raise a ValueError naming the first problem in the inputs."""
        n_atoms = positions.shape[0]
        if n_atoms == 0:
            raise ValueError("empty structure: no atoms were given")
        if positions.dim() != 2 or positions.shape[1] != 3:
            raise ValueError("positions must have shape [N, 3]")
        if numbers.shape[0] != n_atoms:
            raise ValueError(
                "got " + str(numbers.shape[0]) + " atomic numbers for " + str(n_atoms) + " atoms"
            )
        finite = torch.isfinite(positions).all(dim=1)
        if not bool(finite.all()):
            bad = int(torch.nonzero(~finite)[0, 0])
            raise ValueError(
                "position of atom " + str(bad) + " is not finite (NaN or inf)"
                + " [atom rows: " + str(bad) + "]"
            )
        in_range = (numbers >= 1) & (numbers <= self.max_atomic_number)
        if not bool(in_range.all()):
            bad = int(torch.nonzero(~in_range)[0, 0])
            raise ValueError(
                "atom " + str(bad) + " has atomic number " + str(int(numbers[bad]))
                + ", outside 1.." + str(self.max_atomic_number) + " [atom rows: " + str(bad) + "]"
            )
        known = self.supported_elements[numbers]
        if not bool(known.all()):
            bad = int(torch.nonzero(~known)[0, 0])
            z = int(numbers[bad])
            raise ValueError(
                "element " + self.symbols[z] + " (Z=" + str(z) + ", atom index " + str(bad)
                + ") is not supported by this model; it knows " + ", ".join(self.element_list())
                + " [atom rows: " + str(bad) + "]"
            )
        q = int(charge.reshape(-1)[0])
        if q < -self.max_abs_charge or q > self.max_abs_charge:
            raise ValueError(
                "total charge " + str(q) + " is outside the model's range -"
                + str(self.max_abs_charge) + ".." + str(self.max_abs_charge)
            )
        s = int(spin.reshape(-1)[0])
        if s < 1 or s > self.max_multiplicity:
            raise ValueError(
                "spin multiplicity " + str(s) + " is outside the model's range 1.."
                + str(self.max_multiplicity)
            )

    @torch.jit.export
    @entry_point(1, "None; raises ValueError on an impossible charge/multiplicity")
    def validate_electrons(
        self, total_atomic_number: int, charge: int, multiplicity: int, n_atoms: int
    ) -> None:
        """Raise a ValueError when ``charge`` and ``multiplicity`` are impossible for the system.

        The one electron-count rule every engine applies (engines with domain decomposition
        pass the sums over all ranks): electrons = sum(Z) - charge must be >= 0, and
        multiplicity - 1 unpaired electrons must not exceed them and must share their parity.
        """
        electrons = total_atomic_number - charge
        where = (" (charge " + str(charge) + ", " + str(n_atoms) + " atoms, total atomic number "
                 + str(total_atomic_number) + ")")
        if electrons < 0:
            raise ValueError("charge " + str(charge) + " leaves a negative electron count" + where)
        unpaired = multiplicity - 1
        if unpaired > electrons:
            raise ValueError(
                "multiplicity " + str(multiplicity) + " needs " + str(unpaired)
                + " unpaired electrons but there are only " + str(electrons) + " electrons" + where
            )
        if (electrons - unpaired) % 2 != 0:
            odd = electrons % 2 == 1
            raise ValueError(
                "multiplicity " + str(multiplicity) + " is impossible for " + str(electrons)
                + " electrons" + where + ": an " + ("odd" if odd else "even")
                + " electron count needs an " + ("even" if odd else "odd") + " multiplicity"
            )

    def _validate_system(self, positions: Tensor, numbers: Tensor, cell: Tensor, pbc: Tensor,
                         charge: Tensor, spin: Tensor) -> None:
        """Per-atom checks and the cell of a whole system (not an engine's local + ghost slice).

        The electron count (:meth:`validate_electrons`) is not checked per evaluation: engines
        call it once per system (ASE per calculation, OpenMM when the force is built, LAMMPS at
        setup with sums over all ranks), so training on arbitrary labelled data is unaffected."""
        self.validate(positions, numbers, charge, spin)
        self.validate_cell(cell, pbc)


    def _check_pair_distances(self, vec: Tensor, i: Tensor, j: Tensor) -> None:
        """Raise a ValueError naming two atoms closer than ``min_pair_distance``."""
        if vec.shape[0] == 0:
            return
        d2 = (vec.detach() * vec.detach()).sum(1)
        k = int(torch.argmin(d2))
        if float(d2[k]) < self.min_pair_distance * self.min_pair_distance:
            raise ValueError(
                "atoms " + str(int(i[k])) + " and " + str(int(j[k]))
                + " are at the same position (distance " + str(float(torch.sqrt(d2[k]))) + " Å)"
                + " [atom rows: " + str(int(i[k])) + " " + str(int(j[k])) + "]"
            )


    @torch.jit.export
    @entry_point(1, "None; raises ValueError on an unusable periodic cell")
    def validate_cell(self, cell: Tensor, pbc: Tensor) -> None:
        """Raise a ValueError for a periodic cell the model cannot use (zero, degenerate,
        left-handed, or needing more than ``max_images`` periodic images per axis)."""
        _check_cell(cell.to(torch.float64), pbc.to(torch.bool), self.cutoff, self.max_images)
