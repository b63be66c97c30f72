"""Ready-made test and demo systems (water boxes), shared by tests, examples and benchmarks."""

import numpy as np
from ase import Atoms
from ase.build import molecule

#: Mass density of liquid water used for boxes (g/cm^3).
WATER_DENSITY = 1.0
_WATER_MASS_G = 18.015 / 6.02214076e23


def water_box(n_molecules: int, seed: int = 0, density: float = WATER_DENSITY,
              triclinic: bool = False) -> Atoms:
    """A periodic box of ``n_molecules`` randomly oriented waters on a jittered cubic lattice.

    Not equilibrated: a starting structure for tests, demos and timings. The density is
    ``density`` when ``n_molecules`` is a perfect cube (27, 64, 512, ...), lower otherwise. With
    ``triclinic`` the cell is sheared (same volume) so that engines see a general cell.
    """
    if n_molecules < 1:
        raise ValueError("n_molecules must be >= 1")
    rng = np.random.default_rng(seed)
    # One molecule per site of an n_side^3 lattice at the density's spacing: when n_molecules is
    # not a perfect cube some sites stay empty (lower density) rather than squeezing the lattice,
    # which would create unphysically close intermolecular contacts.
    spacing = (_WATER_MASS_G / density * 1e24) ** (1.0 / 3.0)  # Å
    n_side = int(round(n_molecules ** (1.0 / 3.0)))
    if n_side ** 3 < n_molecules:
        n_side += 1
    length = n_side * spacing
    sites = np.stack(np.meshgrid(*[np.arange(n_side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    sites = sites[rng.permutation(len(sites))[:n_molecules]]
    template = molecule("H2O")
    template.positions -= template.get_center_of_mass()
    cell = np.eye(3) * length
    if triclinic:  # shear at constant volume; molecules stay rigid
        cell[1, 0] = 0.25 * length
        cell[2, 0] = -0.15 * length
        cell[2, 1] = 0.2 * length
    positions, symbols = [], []
    for site in sites:
        # uniform (Haar) orientation from a normalised Gaussian quaternion; kept as it is (not
        # scipy's Rotation.random) so that the seeded boxes the tests and results use stay the same
        q = rng.normal(size=4)
        w, x, y, z = q / np.linalg.norm(q)
        rot = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
        centre = ((site + 0.5 + rng.uniform(-0.05, 0.05, 3)) / n_side) @ cell
        positions.extend(template.positions @ rot.T + centre)
        symbols.extend(template.get_chemical_symbols())
    atoms = Atoms(symbols=symbols, positions=positions, cell=cell, pbc=True)
    atoms.wrap()
    atoms.info["charge"] = 0
    atoms.info["spin"] = 1
    return atoms
