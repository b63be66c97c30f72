"""benchmarks/nve_drift.py's shared start: one thermalisation (``--write-state``, OpenMM) read
by every engine's NVE (``--start-state``). ASE and LAMMPS (both velocity Verlet with
velocities at whole steps) must then begin with the same total energy, i.e. the state's
positions and velocities arrive in each engine in its own units unchanged."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import nve_drift  # noqa: E402


def test_engines_start_nve_from_the_shared_state(tmp_path, exported_tiny64):
    state = tmp_path / "state.extxyz"
    common = ["--dtypes", "float64", "--model", str(exported_tiny64), "--system", "water64"]
    assert nve_drift.main(["--engines", "openmm", "--nvt-ps", "0.005", "--write-state",
                           str(state), "--out", str(tmp_path / "w")] + common) == 0
    with pytest.raises(SystemExit):  # never over an existing file
        nve_drift.main(["--engines", "openmm", "--write-state", str(state),
                        "--out", str(tmp_path / "w")] + common)
    assert nve_drift.main(["--start-state", str(state), "--engines", "ase,lammps", "--ps", "0.002",
                           "--sample-fs", "0.5", "--out", str(tmp_path / "r")] + common) == 0
    runs = {r["engine"]: r for r in json.loads((tmp_path / "r" / "nve_drift.json").read_text())["results"]}
    ase, lammps = runs["ase"], runs["lammps"]
    assert ase["nvt_steps"] == lammps["nvt_steps"] == 0
    assert ase["start_state"]["thermalised_by"] == "openmm-CPU"
    # LAMMPS metal's force-to-acceleration constant differs from CODATA by 5.5e-8 relative
    # (benchmarks/trajectory_agreement.py): the first steps agree to that order
    for e_ase, e_lmp in zip(ase["total_energy_ev"][:3], lammps["total_energy_ev"][:3]):
        assert abs(e_ase - e_lmp) <= 1e-6 * abs(e_ase)
    assert abs(ase["temperature_k"][0] - lammps["temperature_k"][0]) <= 1e-5 * ase["temperature_k"][0]
