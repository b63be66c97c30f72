"""Named lists of starting systems for reference-data generation.

A recipe is a callable ``recipe(seed) -> list[System]``; it only builds geometries (no
quantum chemistry), so it is cheap and testable. :mod:`transip_md.data.generate` relaxes,
samples and labels them. New recipes are added with :func:`register_recipe`.

Labels double as provenance (``Frame.source``): ``"g2:<name>"``, ``"water<n>"`` and
``"ion:<formula>"``. The part before ``:`` (or the label without its trailing digits) is the
*kind*, which generation uses to interleave systems so that even a small ``n`` covers every
kind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from ase import Atoms
from ase.build import molecule
from ase.collections import g2

HCNO = frozenset("HCNO")


class System(NamedTuple):
    """A starting structure with its total charge and spin multiplicity (2S+1)."""

    atoms: Atoms
    charge: int
    mult: int
    label: str


RecipeFn = Callable[[int], list[System]]
RECIPES: dict[str, RecipeFn] = {}


def register_recipe(name: str) -> Callable[[RecipeFn], RecipeFn]:
    """Decorator adding a recipe to :data:`RECIPES` under ``name``."""

    def add(fn: RecipeFn) -> RecipeFn:
        if name in RECIPES:
            raise ValueError(f"recipe {name!r} is already registered")
        RECIPES[name] = fn
        return fn

    return add


def get_recipe(name: str) -> RecipeFn:
    """Look a recipe up by name, with an error that lists the valid names."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(
            f"unknown recipe {name!r}; available: {', '.join(sorted(RECIPES))}"
        ) from None


def recipe_summaries() -> dict[str, str]:
    """Every registered recipe's name and the first line of its docstring, sorted by name."""
    return {name: _first_line(RECIPES[name].__doc__) for name in sorted(RECIPES)}


def _first_line(doc: str | None) -> str:
    lines = [line.strip() for line in (doc or "").strip().splitlines()]
    return lines[0] if lines and lines[0] else "(no description)"


def system_kind(label: str) -> str:
    """``"g2:CH4"`` -> ``"g2"``, ``"water5"`` -> ``"water"``, ``"ion:OH-"`` -> ``"ion"``."""
    return label.split(":", 1)[0] if ":" in label else label.rstrip("0123456789")


# --- building blocks ---------------------------------------------------------------------


def _clean(atoms: Atoms) -> Atoms:
    """Copy without magnetic moments/charges/constraints: state is given by (charge, mult)."""
    out = Atoms(atoms.numbers, positions=atoms.positions.copy())
    out.center()
    return out


def g2_closed_shell_hcno() -> list[str]:
    """Names of G2 molecules made of H, C, N, O only that are closed-shell singlets.

    Closed shell here means an even electron count and no initial magnetic moments in the G2
    data; that excludes radicals (odd count) and triplets such as O2 (non-zero moments).
    """
    names = []
    for name in g2.names:
        atoms = g2[name]
        if len(atoms) < 2 or not set(atoms.get_chemical_symbols()) <= HCNO:
            continue
        if atoms.numbers.sum() % 2 == 0 and not np.any(atoms.get_initial_magnetic_moments()):
            names.append(name)
    return names


def g2_system(name: str) -> System:
    return System(_clean(g2[name]), 0, 1, f"g2:{name}")


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly distributed rotation matrix from a normalised Gaussian quaternion."""
    q = rng.standard_normal(4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def water_cluster(
    n_waters: int,
    rng: np.random.Generator,
    min_oo: float = 2.6,
    min_intermolecular: float = 1.6,
    volume_per_water: float = 32.0,
) -> Atoms:
    """``n_waters`` rigid G2 waters at random non-overlapping positions in a sphere.

    The sphere holds roughly liquid density, so the cluster is compact and gets hydrogen
    bonds after a short relaxation. Oxygens are at least ``min_oo`` apart and no two atoms of
    different molecules closer than ``min_intermolecular`` (keeps H atoms from landing on
    neighbours). If placement keeps failing the sphere is grown by 5 %.
    """
    template = _clean(molecule("H2O"))
    template.positions -= template.positions[template.numbers == 8][0]  # O at origin
    radius = max(1.5, (3.0 * n_waters * volume_per_water / (4.0 * np.pi)) ** (1.0 / 3.0))
    for _ in range(200):
        placed: list[np.ndarray] = []
        for _ in range(n_waters):
            for _ in range(500):
                centre = rng.uniform(-radius, radius, size=3)
                if centre @ centre > radius * radius:
                    continue
                xyz = template.positions @ _random_rotation(rng).T + centre
                if all(
                    np.linalg.norm(xyz[0] - other[0]) >= min_oo
                    and np.min(np.linalg.norm(xyz[:, None] - other[None], axis=-1))
                    >= min_intermolecular
                    for other in placed
                ):
                    placed.append(xyz)
                    break
            else:
                break  # this molecule did not fit: start the cluster again, a bit larger
        if len(placed) == n_waters:
            atoms = Atoms(np.tile(template.numbers, n_waters), positions=np.concatenate(placed))
            atoms.center()
            return atoms
        radius *= 1.05
    raise RuntimeError(f"could not place {n_waters} waters without overlap")


def _drop_acidic_h(name: str) -> Atoms:
    """Deprotonate a carboxylic acid: remove the H that is bonded to an O."""
    atoms = _clean(molecule(name))
    oxygens = np.flatnonzero(atoms.numbers == 8)
    for i in np.flatnonzero(atoms.numbers == 1):
        if np.min(np.linalg.norm(atoms.positions[oxygens] - atoms.positions[i], axis=1)) < 1.2:
            del atoms[int(i)]
            return atoms
    raise ValueError(f"{name} has no O-H hydrogen")


def _swap_first(name: str, old: str, new: str) -> Atoms:
    """Isoelectronic substitution, e.g. CH4 -> NH4+ by turning the C into an N."""
    atoms = _clean(molecule(name))
    symbols = atoms.get_chemical_symbols()
    symbols[symbols.index(old)] = new
    atoms.set_chemical_symbols(symbols)
    return atoms


def ion_systems() -> list[System]:
    """Small closed-shell ions common in aqueous/organic chemistry (singlets)."""
    hydroxide = Atoms("OH", positions=[[0.0, 0.0, 0.0], [0.0, 0.0, 0.97]])
    hydroxide.center()
    return [
        System(hydroxide, -1, 1, "ion:OH-"),
        System(_swap_first("NH3", "N", "O"), +1, 1, "ion:H3O+"),
        System(_swap_first("CH4", "C", "N"), +1, 1, "ion:NH4+"),
        System(_drop_acidic_h("HCOOH"), -1, 1, "ion:HCOO-"),
        System(_drop_acidic_h("CH3COOH"), -1, 1, "ion:CH3COO-"),
        System(_swap_first("C2H6", "C", "N"), +1, 1, "ion:CH3NH3+"),
    ]


# --- recipes -----------------------------------------------------------------------------


@register_recipe("organics-xtb")
def organics_xtb(seed: int) -> list[System]:
    """Closed-shell HCNO molecules of G2, water clusters (2-8) and six small ions."""
    rng = np.random.default_rng([seed, 0x3A7E5])
    systems = [g2_system(name) for name in g2_closed_shell_hcno()]
    systems += [System(water_cluster(k, rng), 0, 1, f"water{k}") for k in range(2, 9)]
    systems += ion_systems()
    return systems


@register_recipe("tiny-xtb")
def tiny_xtb(seed: int) -> list[System]:
    """Five small systems for tests: H2O, CH4, NH3, OH- and a water dimer."""
    rng = np.random.default_rng([seed, 0x3A7E5])
    ions = {s.label: s for s in ion_systems()}
    return [
        g2_system("H2O"),
        g2_system("CH4"),
        g2_system("NH3"),
        ions["ion:OH-"],
        System(water_cluster(2, rng), 0, 1, "water2"),
    ]


@register_recipe("water-box-xtb")
def water_box_xtb(seed: int) -> list[System]:
    """Periodic liquid-water boxes of 16 molecules at 1 g/cm^3 (cubic and triclinic).

    Bulk-like environments that clusters lack: the demo's periodic water MD needs them. xTB
    takes ~0.1 s per 48-atom periodic frame here (a 32-molecule box took ~6 s, so it is left
    out); sample with few temperatures, e.g. ``--temperatures 300 400 500``.
    """
    from ..systems import water_box

    return [
        System(water_box(16, seed=seed), 0, 1, "waterbox16"),
        System(water_box(16, seed=seed + 1, triclinic=True), 0, 1, "waterbox16tri"),
        System(water_box(16, seed=seed + 2), 0, 1, "waterbox16b"),
    ]
