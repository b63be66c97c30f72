#!/usr/bin/env python
"""Write LAMMPS data files of water for the TransIP example decks.

``atom_style atomic``, ``units metal`` (Å), type 1 = O, type 2 = H. Three shapes:

* a periodic box of N rigid-geometry water molecules at a given density (default 1 g/cm^3);
* the same in a triclinic cell (``--tilt``);
* a cluster of N molecules in a large empty box, for ``boundary f f f`` / ``s s s`` (``--vacuum``).

Examples::

    python make_water_box.py --molecules 64 -o water.data
    python make_water_box.py --molecules 64 --tilt 0.15 -o water_tri.data
    python make_water_box.py --molecules 3 --vacuum 30 -o water_trimer.data

Molecules sit on a jittered grid with random orientations (seeded), so every file is
reproducible and no two atoms of different molecules are closer than ~1.5 Å. The geometry is
not equilibrated: run a short NVT first (the decks do).

The functions are importable (the tests use them): :func:`water_box`, :func:`water_cluster`,
:func:`write_lammps_data`.
"""

import argparse
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from ase import Atoms
from ase.data import atomic_masses, atomic_numbers

#: Water geometry (TIP3P-like): O-H bond (Å) and H-O-H angle (degrees).
OH_BOND = 0.9572
HOH_ANGLE = 104.52
#: Mass of one water molecule (amu) and Avogadro's number, for the density.
WATER_MASS = 2 * atomic_masses[1] + atomic_masses[8]
AVOGADRO = 6.02214076e23

TYPE_ORDER = ("O", "H")


def _water_molecule() -> np.ndarray:
    """O, H, H positions (Å) of one molecule with O at the origin."""
    half = math.radians(HOH_ANGLE) / 2.0
    return np.array(
        [
            [0.0, 0.0, 0.0],
            [OH_BOND * math.sin(half), OH_BOND * math.cos(half), 0.0],
            [-OH_BOND * math.sin(half), OH_BOND * math.cos(half), 0.0],
        ]
    )


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _place_molecules(n: int, cell: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Positions [3n, 3] of n molecules on a jittered fractional grid of ``cell`` (rows)."""
    per_axis = int(math.ceil(n ** (1.0 / 3.0) - 1e-9))
    sites = np.array(
        [(i, j, k) for i in range(per_axis) for j in range(per_axis) for k in range(per_axis)],
        dtype=float,
    )
    chosen = sites[rng.permutation(len(sites))[:n]]
    frac = (chosen + 0.5 + rng.uniform(-0.05, 0.05, size=chosen.shape)) / per_axis
    centres = frac @ cell
    mol = _water_molecule()
    mol -= mol.mean(axis=0)
    out = [c + mol @ _random_rotation(rng).T for c in centres]
    return np.concatenate(out, axis=0)


def water_box(
    molecules: int = 64, density: float = 1.0, tilt: float = 0.0, seed: int = 0
) -> Atoms:
    """Periodic water box at ``density`` g/cm^3.

    ``tilt`` > 0 gives a triclinic cell (LAMMPS' restricted form: a along x, b in the xy
    plane) with tilt factors xy = tilt*lx, xz = -tilt*lx/2, yz = tilt*ly/2 and the same volume.
    """
    if molecules < 1:
        raise ValueError("molecules must be >= 1")
    if density <= 0:
        raise ValueError("density must be positive (g/cm^3)")
    if not 0.0 <= tilt <= 0.5:
        raise ValueError("tilt must be in [0, 0.5] (LAMMPS limits tilt factors to half a box)")
    volume = molecules * WATER_MASS / (density * AVOGADRO) * 1e24  # Å^3
    length = volume ** (1.0 / 3.0)
    cell = np.diag([length, length, length])
    cell[1, 0] = tilt * length
    cell[2, 0] = -0.5 * tilt * length
    cell[2, 1] = 0.5 * tilt * length
    rng = np.random.default_rng(seed)
    positions = _place_molecules(molecules, cell, rng)
    atoms = Atoms("OH2" * molecules, positions=positions, cell=cell, pbc=True)
    return atoms


def water_cluster(molecules: int = 3, vacuum: float = 30.0, seed: int = 0) -> Atoms:
    """``molecules`` waters packed at ~1 g/cm^3 in the corner of an empty cubic box of edge
    ``vacuum`` Å (non-periodic; the corner placement leaves most MPI subdomains empty)."""
    core = water_box(molecules, 1.0, 0.0, seed)
    positions = core.positions - core.positions.min(axis=0) + 1.0
    if positions.max() > vacuum - 1.0:
        raise ValueError(f"vacuum box {vacuum} Å is too small for {molecules} molecules")
    return Atoms(core.symbols, positions=positions, cell=np.eye(3) * vacuum, pbc=False)


def write_lammps_data(
    path, atoms: Atoms, ids: Optional[Sequence[int]] = None, type_order=TYPE_ORDER
) -> Path:
    """Write ``atoms`` as a LAMMPS data file (atom_style atomic, units metal).

    The cell must be in LAMMPS' restricted form (lower triangular rows: a = (lx,0,0),
    b = (xy,ly,0), c = (xz,yz,lz)); the box origin is 0. ``ids`` are the atom IDs to write
    (default 1..N; any distinct positive integers, e.g. to test non-consecutive IDs).
    """
    path = Path(path)
    cell = np.asarray(atoms.cell.array, dtype=float)
    if abs(cell[0, 1]) > 1e-12 or abs(cell[0, 2]) > 1e-12 or abs(cell[1, 2]) > 1e-12:
        raise ValueError("cell is not in LAMMPS' restricted triclinic (lower-triangular) form")
    symbols = atoms.get_chemical_symbols()
    unknown = sorted(set(symbols) - set(type_order))
    if unknown:
        raise ValueError(f"symbols {unknown} not in type_order {type_order}")
    if ids is None:
        ids = range(1, len(atoms) + 1)
    ids = [int(i) for i in ids]
    if len(ids) != len(atoms) or len(set(ids)) != len(ids) or min(ids) < 1:
        raise ValueError("ids must be len(atoms) distinct positive integers")
    lines = [f"# water, {len(atoms)} atoms; written by make_water_box.py (types: "
             + ", ".join(f"{k + 1}={s}" for k, s in enumerate(type_order)) + ")", ""]
    lines += [f"{len(atoms)} atoms", f"{len(type_order)} atom types", ""]
    lines += [f"0.0 {cell[0, 0]:.16g} xlo xhi", f"0.0 {cell[1, 1]:.16g} ylo yhi",
              f"0.0 {cell[2, 2]:.16g} zlo zhi"]
    if np.any(np.abs([cell[1, 0], cell[2, 0], cell[2, 1]]) > 0):
        lines.append(f"{cell[1, 0]:.16g} {cell[2, 0]:.16g} {cell[2, 1]:.16g} xy xz yz")
    lines += ["", "Masses", ""]
    lines += [f"{k + 1} {atomic_masses[atomic_numbers[s]]:.6f}  # {s}"
              for k, s in enumerate(type_order)]
    lines += ["", "Atoms # atomic", ""]
    for aid, sym, (x, y, z) in zip(ids, symbols, atoms.positions):
        lines.append(f"{aid} {type_order.index(sym) + 1} {x:.16g} {y:.16g} {z:.16g}")
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--molecules", "-n", type=int, default=64, help="number of waters (64)")
    ap.add_argument("--density", type=float, default=1.0, help="g/cm^3 (1.0)")
    ap.add_argument("--tilt", type=float, default=0.0,
                    help="triclinic tilt fraction in [0, 0.5] (0 = orthogonal)")
    ap.add_argument("--vacuum", type=float, default=None, metavar="EDGE",
                    help="write a non-periodic cluster in an empty box of this edge (Å)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", default="water.data")
    args = ap.parse_args(argv)
    if args.vacuum is not None:
        atoms = water_cluster(args.molecules, args.vacuum, args.seed)
    else:
        atoms = water_box(args.molecules, args.density, args.tilt, args.seed)
    path = write_lammps_data(args.output, atoms)
    print(f"wrote {path}: {len(atoms)} atoms, cell {atoms.cell.lengths().round(3).tolist()} Å"
          + (f", angles {atoms.cell.angles().round(2).tolist()}" if args.tilt else ""))


if __name__ == "__main__":
    main()
