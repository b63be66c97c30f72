"""The shipped model: the demo end to end, and 300 K stability of the demo systems."""

import json
import subprocess
import sys

import numpy as np
import pytest
from ase import units
from ase.build import molecule
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from transip_md.calculator import TransIPCalculator
from transip_md.export import default_model_path, read_metadata
from transip_md.systems import water_box


@pytest.fixture(scope="module")
def shipped_model():
    path = default_model_path("float32")
    assert read_metadata(path)["elements"] == ["H", "C", "N", "O"]
    return path


def test_demo_runs_and_conserves_energy(tmp_path):
    out = subprocess.run([sys.executable, "-m", "transip_md.demo", "--out", str(tmp_path),
                          "--openmm-steps", "300", "--lammps-steps", "40"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["engine"].split()[0] for r in summary] == ["OpenMM", "LAMMPS"]
    for r in summary:
        assert np.all(np.isfinite(r["total_energy_ev"]))
        # float64 model, 0.5 fs: drift well below 1e-3 eV/atom/ps even in these short runs
        assert abs(r["drift_ev_per_atom_per_ps"]) < 1e-3, r
        assert r["fluctuation_ev_per_atom"] < 1e-3, r
    assert (tmp_path / "energy.png").stat().st_size > 1000
    assert (tmp_path / "lammps_water.lammpstrj").stat().st_size > 1000
    assert "ns/day" in out.stdout


def _bonded_pairs(atoms, scale=1.25):
    from ase.neighborlist import natural_cutoffs, neighbor_list

    i, j = neighbor_list("ij", atoms, natural_cutoffs(atoms, mult=scale))
    return i[i < j], j[i < j]


@pytest.mark.parametrize("system", ["ethanol", "water_box"])
def test_langevin_300k_is_stable(shipped_model, system):
    atoms = molecule("CH3CH2OH") if system == "ethanol" else water_box(27, seed=3)
    atoms.calc = TransIPCalculator(str(shipped_model))
    i, j = _bonded_pairs(atoms)
    d0 = np.array([atoms.get_distance(a, b, mic=True) for a, b in zip(i, j)])
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=300, friction=0.02,
                   rng=np.random.default_rng(1))
    energies = []
    dyn.attach(lambda: energies.append(atoms.get_potential_energy()), interval=10)
    dyn.run(200)
    d1 = np.array([atoms.get_distance(a, b, mic=True) for a, b in zip(i, j)])
    assert np.all(np.isfinite(energies)) and np.all(np.isfinite(atoms.positions))
    assert np.all(np.abs(d1 / d0 - 1.0) < 0.35), "a covalent bond broke or collapsed"
    temperature = atoms.get_temperature()
    assert 100 < temperature < 700, temperature
