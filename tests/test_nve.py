"""Short NVE in ASE with the shipped model: velocity Verlet must conserve the total energy.

27 waters (81 atoms, periodic, 1 g/cm^3), 0.5 fs, 200 steps (0.1 ps) from 300 K, float64 and
float32 exports of the shipped ``transip-demo``. Drift is the slope of a linear fit of E_total(t)
(eV/atom/ps); fluctuation the standard deviation around that fit (eV/atom). OpenMM and LAMMPS
have their own short NVE tests (tests/test_openmm.py, tests/test_lammps.py);
``benchmarks/nve_drift.py`` runs the long version across engines.

On a 0.1 ps window the fitted slope is dominated by the O-H vibration's Verlet oscillation
(~5e-5 eV/atom), so the bounds are loose; a missing force term or a force that is not -dE/dx
would give drifts of order 1e-2 eV/atom/ps and more.
"""

import numpy as np
import pytest
from ase import units
from ase.md.verlet import VelocityVerlet

from transip_md.calculator import TransIPCalculator
from transip_md.export import default_model_path
from transip_md.md_analysis import energy_drift
from transip_md.systems import water_box

STEPS = 200
DT_FS = 0.5
BOUNDS = {  # dtype: (|drift| eV/atom/ps, fluctuation eV/atom)
    "float64": (1e-4, 3e-4),
    "float32": (1e-3, 3e-4),
}


def _thermalize(atoms, temperature_k, seed):
    from ase.md import velocitydistribution as vd

    rng = np.random.default_rng(seed)
    if hasattr(vd, "thermalize_momenta"):
        vd.thermalize_momenta(atoms, temperature_k, rng=rng)
    else:
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_k, rng=rng)
    vd.Stationary(atoms)


def nve_run(dtype: str, steps: int = STEPS, n_waters: int = 27, seed: int = 7):
    atoms = water_box(n_waters, seed=seed)
    atoms.calc = TransIPCalculator(str(default_model_path(dtype)))
    _thermalize(atoms, 300.0, seed)
    dyn = VelocityVerlet(atoms, DT_FS * units.fs)
    energies = []
    dyn.attach(lambda: energies.append(atoms.get_total_energy()), interval=1)
    dyn.run(steps)
    energies = np.array(energies)
    times_ps = np.arange(len(energies)) * DT_FS / 1000.0
    fit = energy_drift(times_ps, energies, len(atoms))
    n = len(atoms)
    return {"drift": fit["drift_ev_per_atom_per_ps"], "fluctuation": fit["fluctuation_ev_per_atom"],
            "span": float(np.ptp(energies) / n), "temperature": atoms.get_temperature(),
            "energies": energies}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_ase_velocity_verlet_conserves_energy(dtype):
    r = nve_run(dtype)
    drift_bound, fluct_bound = BOUNDS[dtype]
    print(f"\nASE NVE {dtype}: {STEPS} steps x {DT_FS} fs, drift {r['drift']:.2e} eV/atom/ps, "
          f"fluctuation {r['fluctuation']:.2e} eV/atom, span {r['span']:.2e} eV/atom, "
          f"T_end {r['temperature']:.0f} K")
    assert len(r["energies"]) == STEPS + 1 and np.isfinite(r["energies"]).all()
    assert abs(r["drift"]) < drift_bound, r["drift"]
    assert r["fluctuation"] < fluct_bound, r["fluctuation"]
    assert 50.0 < r["temperature"] < 1500.0  # the system really moved, and did not explode
