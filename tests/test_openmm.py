"""TransIP in OpenMM through OpenMM-Torch: real Contexts on the Reference and CPU platforms.

Every number OpenMM reports is compared with the model's own ASE-side entry point
(``model.compute``), converted with transip_md.units.
"""

from __future__ import annotations

import doctest
import importlib.metadata
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
openmm = pytest.importorskip("openmm")
pytest.importorskip("openmmtorch")
pytest.importorskip("openmmml")

import openmm.app as app  # noqa: E402
from ase.build import molecule  # noqa: E402
import openmm.unit as u  # noqa: E402
from openmmml import MLPotential  # noqa: E402

from transip_md.export import export_potential  # noqa: E402
from transip_md.model import TransIPPotential, named_config  # noqa: E402
from transip_openmm import make_torch_force, topology_from_ase  # noqa: E402
from transip_openmm import torchforce as tf  # noqa: E402
from transip_openmm.mlpotential import TransIPPotentialImpl, TransIPPotentialImplFactory  # noqa: E402

from openmm_helpers import (  # noqa: E402
    ETHANOL_XML,
    context_for,
    energy_forces,
    energy_of,
    ethanol,
    platform_or_none,
    positions_nm,
    reference,
    relative,
    solvated_ethanol,
    system_with,
    water_box,
)

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """The one place test models are made: a tiny random TransIP in float64 and float32."""
    directory = tmp_path_factory.mktemp("transip_models")
    torch.manual_seed(0)
    model = TransIPPotential(named_config("tiny")).double()
    model.supported_elements[[1, 6, 7, 8]] = True
    paths = {}
    for dtype, name in ((torch.float64, "float64"), (torch.float32, "float32")):
        path = directory / f"model_{name}.pt"
        export_potential(model, path, dtype=name)
        paths[dtype] = str(path)
    return paths


@pytest.fixture(scope="module")
def model64(model_files):
    return model_files[torch.float64]


@pytest.fixture(params=["Reference", "CPU", "CUDA"])
def platform(request):
    name = request.param
    found = platform_or_none(name)
    if found is None:
        pytest.skip(f"OpenMM platform {name} is not installed here")
    if name == "CUDA" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    return found


def _loaded(path):
    return torch.jit.load(path)


# ----------------------------------------------------------------------------- registration
def test_entry_point_resolves_to_factory(model64):
    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="openmmml.potentials")}
    assert names.get("transip") == "transip_openmm.mlpotential:TransIPPotentialImplFactory"
    assert isinstance(MLPotential._implFactories["transip"], TransIPPotentialImplFactory)
    potential = MLPotential("transip", modelPath=model64)
    assert isinstance(potential._impl, TransIPPotentialImpl)
    assert "mechanical" in potential.getSupportedEmbeddings()


# ----------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_vacuum_energy_forces_match_model(model_files, platform, dtype):
    atoms = ethanol()
    topology, positions = topology_from_ase(atoms)
    potential = MLPotential("transip", modelPath=model_files[dtype])
    system = potential.createSystem(topology)
    context = context_for(system, positions, platform)
    energy, forces = energy_forces(context)
    ref_energy, ref_forces = reference(_loaded(model_files[dtype]), atoms)
    assert abs(energy - ref_energy) <= TOLERANCE[dtype] * abs(ref_energy)
    assert relative(forces, ref_forces) <= TOLERANCE[dtype]


def test_single_precision_option_casts_a_double_model(model64):
    atoms = ethanol()
    topology, positions = topology_from_ase(atoms)
    force = make_torch_force(model64, topology, precision="single")
    context = context_for(system_with(force, atoms), positions, platform_or_none("Reference"))
    energy, forces = energy_forces(context)
    ref_energy, ref_forces = reference(_loaded(model64), atoms)
    assert abs(energy - ref_energy) <= 1e-5 * abs(ref_energy)
    assert relative(forces, ref_forces) <= 1e-5
    assert abs(energy - ref_energy) > 0  # it really ran in float32


def test_periodic_triclinic_box_matches_model(model64, platform):
    atoms = water_box(n_side=3, spacing=3.1, tilt=True)
    topology, positions = topology_from_ase(atoms)
    system = MLPotential("transip", modelPath=model64).createSystem(topology)
    assert system.usesPeriodicBoundaryConditions()
    context = context_for(system, positions, platform)
    energy, forces = energy_forces(context)
    ref_energy, ref_forces = reference(_loaded(model64), atoms)
    assert abs(energy - ref_energy) <= 1e-9 * abs(ref_energy)
    assert relative(forces, ref_forces) <= 1e-9


def test_lattice_translations_change_nothing(model64):
    atoms = water_box(n_side=2, spacing=3.2, tilt=True)
    topology, positions = topology_from_ase(atoms)
    force = make_torch_force(model64, topology)
    context = context_for(system_with(force, atoms), positions, platform_or_none("Reference"))
    energy, forces = energy_forces(context)

    rng = np.random.default_rng(3)
    moved = atoms.copy()
    moved.positions += rng.integers(-2, 3, size=(len(atoms), 3)) @ np.asarray(atoms.cell)
    moved.positions += np.array([0.37, -1.21, 2.05])  # and a rigid shift of everything
    context.setPositions(positions_nm(moved))
    energy2, forces2 = energy_forces(context)
    assert abs(energy2 - energy) <= 1e-9 * abs(energy)
    assert relative(forces2, forces) <= 1e-9


def test_subset_forces_act_on_ml_atoms_only(model64):
    topology, positions = solvated_ethanol(n_waters=4)
    force = make_torch_force(model64, topology, atoms=range(9))
    system = openmm.System()
    for atom in topology.atoms():
        system.addParticle(atom.element.mass)
    system.addForce(force)
    context = context_for(system, positions, platform_or_none("Reference"))
    energy, forces = energy_forces(context)
    eth = ethanol()
    eth.positions = np.asarray(positions.value_in_unit(u.angstrom))[:9]
    ref_energy, ref_forces = reference(_loaded(model64), eth)
    assert abs(energy - ref_energy) <= 1e-9 * abs(ref_energy)
    assert relative(forces[:9], ref_forces) <= 1e-9
    assert np.all(forces[9:] == 0.0)


def test_charge_and_multiplicity_as_global_parameters(model64):
    atoms = ethanol()
    topology, positions = topology_from_ase(atoms)
    force = make_torch_force(model64, topology, global_parameters=True)
    context = context_for(system_with(force, atoms), positions, platform_or_none("Reference"))
    model = _loaded(model64)
    assert energy_forces(context)[0] == pytest.approx(reference(model, atoms)[0], rel=1e-12)
    context.setParameter(tf.CHARGE_PARAMETER, 1)
    context.setParameter(tf.MULTIPLICITY_PARAMETER, 2)
    energy, forces = energy_forces(context)
    ref_energy, ref_forces = reference(model, atoms, charge=1, multiplicity=2)
    assert abs(energy - ref_energy) <= 1e-9 * abs(ref_energy)
    assert relative(forces, ref_forces) <= 1e-9


def test_charge_and_multiplicity_reach_the_model(model64):
    atoms = ethanol()
    topology, positions = topology_from_ase(atoms)
    system = MLPotential("transip", modelPath=model64).createSystem(topology, charge=1, multiplicity=2)
    energy = energy_of(system, positions)
    neutral = reference(_loaded(model64), atoms)[0]
    assert energy == pytest.approx(reference(_loaded(model64), atoms, 1, 2)[0], rel=1e-9)
    assert abs(energy - neutral) > 1e-6


# ----------------------------------------------------------------------------- dynamics
def test_nve_energy_drift_is_small(model64):
    atoms = ethanol()
    topology, positions = topology_from_ase(atoms)
    system = MLPotential("transip", modelPath=model64).createSystem(topology, removeCMMotion=False)
    integrator = openmm.VerletIntegrator(0.5 * u.femtosecond)
    context = context_for(system, positions, platform_or_none("Reference"), integrator=integrator)
    context.setVelocitiesToTemperature(300 * u.kelvin, 7)
    total, kinetic = [], []
    for _ in range(41):
        state = context.getState(getEnergy=True)
        k = state.getKineticEnergy().value_in_unit(u.kilojoule_per_mole)
        p = state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
        total.append(k + p)
        kinetic.append(k)
        integrator.step(5)
    total, kinetic = np.array(total), np.array(kinetic)
    drift = float(np.abs(total - total[0]).max())
    fluctuation = float(kinetic.std())
    print(f"NVE 200 x 0.5 fs: max |E - E0| = {drift:.3e} kJ/mol, std(KE) = {fluctuation:.3f} "
          f"kJ/mol, ratio {drift / fluctuation:.2e}")
    assert fluctuation > 0.1  # the model really exchanges energy with the atoms
    assert drift < 1e-2 * fluctuation


def test_monte_carlo_barostat_changes_triclinic_box(model64):
    atoms = water_box(n_side=2, spacing=3.1, tilt=True)
    topology, positions = topology_from_ase(atoms)
    system = MLPotential("transip", modelPath=model64).createSystem(topology)
    system.addForce(openmm.MonteCarloBarostat(1 * u.bar, 300 * u.kelvin, 1))
    integrator = openmm.LangevinMiddleIntegrator(300 * u.kelvin, 1 / u.picosecond, 0.5 * u.femtosecond)
    integrator.setRandomNumberSeed(11)
    context = context_for(system, positions, platform_or_none("Reference"), integrator=integrator)
    context.setVelocitiesToTemperature(300 * u.kelvin, 11)
    start = context.getState().getPeriodicBoxVolume().value_in_unit(u.nanometer**3)
    integrator.step(25)
    state = context.getState(getEnergy=True, getPositions=True)
    end = state.getPeriodicBoxVolume().value_in_unit(u.nanometer**3)
    assert end != start
    assert np.isfinite(state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole))
    # The force follows the box: the energy at the new box is the model's energy there.
    moved = atoms.copy()
    box = np.asarray(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(u.angstrom))
    moved.set_cell(box)
    moved.positions = np.asarray(state.getPositions(asNumpy=True).value_in_unit(u.angstrom))
    energy = state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
    assert energy == pytest.approx(reference(_loaded(model64), moved)[0], rel=1e-9)


# ----------------------------------------------------------------------------- ML/MM
def test_mixed_system_interpolates_between_mm_and_ml(model64):
    topology, positions = solvated_ethanol(n_waters=12)
    forcefield = app.ForceField(str(ETHANOL_XML), "tip3p.xml")
    mm_system = forcefield.createSystem(topology, nonbondedMethod=app.NoCutoff, constraints=None,
                                        rigidWater=False)
    ml_atoms = list(range(9))
    potential = MLPotential("transip", modelPath=model64)

    # Independent pieces: MM energy of ethanol alone (its internal terms) and its ML energy.
    eth = ethanol()
    eth_topology, _ = topology_from_ase(eth, residue_name="ETH")
    eth_mm = forcefield.createSystem(eth_topology, nonbondedMethod=app.NoCutoff, constraints=None)
    eth_positions = positions[:9]
    e_mm = energy_of(mm_system, positions)
    e_mm_internal = energy_of(eth_mm, eth_positions)
    e_ml = energy_of(potential.createSystem(eth_topology), eth_positions)
    expected_ml_mm = e_mm - e_mm_internal + e_ml

    plain = potential.createMixedSystem(topology, mm_system, ml_atoms)
    assert energy_of(plain, positions) == pytest.approx(expected_ml_mm, rel=1e-9, abs=1e-8)

    mixed = potential.createMixedSystem(topology, mm_system, ml_atoms, interpolate=True)
    context = context_for(mixed, positions, platform_or_none("Reference"))

    def at(lam):
        context.setParameter("lambda_interpolate", lam)
        return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)

    assert at(0.0) == pytest.approx(e_mm, rel=1e-9, abs=1e-6)
    assert at(1.0) == pytest.approx(expected_ml_mm, rel=1e-9, abs=1e-6)
    assert at(0.25) == pytest.approx(0.75 * e_mm + 0.25 * expected_ml_mm, rel=1e-9, abs=1e-6)


# ----------------------------------------------------------------------------- errors
def test_element_unknown_to_model_is_refused(model64):
    topology, _ = topology_from_ase(molecule("CH3Cl"))
    with pytest.raises(ValueError, match=r"element Cl \(Z=17\).*not supported.*knows H, C, N, O"):
        make_torch_force(model64, topology)
    with pytest.raises(ValueError, match="Cl"):
        MLPotential("transip", modelPath=model64).createSystem(topology)


def test_atom_without_element_is_refused(model64):
    topology, _ = topology_from_ase(ethanol())
    residue = next(topology.residues())
    topology.addAtom("EP", None, residue)
    with pytest.raises(ValueError, match=r"topology atom 9 \(name 'EP'.*has no element"):
        make_torch_force(model64, topology)
    # Outside the ML subset an element-less particle (a virtual site, say) is fine.
    make_torch_force(model64, topology, atoms=range(9))


def test_missing_model_file_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "model.pt"
    topology, _ = topology_from_ase(ethanol())
    with pytest.raises(FileNotFoundError, match="nowhere/model.pt"):
        make_torch_force(missing, topology)
    with pytest.raises(FileNotFoundError, match="nowhere/model.pt"):
        MLPotential("transip", modelPath=str(missing))


def test_file_that_is_not_an_exported_model_is_refused(model64, tmp_path):
    plain = tmp_path / "plain_script.pt"
    torch.jit.save(torch.jit.load(model64), str(plain))  # no metadata record
    topology, _ = topology_from_ase(ethanol())
    with pytest.raises(ValueError, match="not an exported transip-md model"):
        make_torch_force(plain, topology)


def test_merged_pdb_atoms_show_in_the_electron_count_message(model64, tmp_path):
    """ASE writes every ethanol atom of one residue with a bare element name; OpenMM's PDBFile
    then merges atoms of equal name (9 become 3). The electron-count message names the atom
    count, so the user sees that the topology lost atoms."""
    import warnings

    from ase.io import write
    from openmm.app import PDBFile

    path = tmp_path / "ethanol.pdb"
    write(path, ethanol())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # OpenMM's own "duplicate atom" warnings
        topology = PDBFile(str(path)).topology
    assert topology.getNumAtoms() == 3
    with pytest.raises(ValueError, match=r"15 electrons \(charge 0, 3 atoms, total atomic number 15\)"):
        make_torch_force(model64, topology)


def test_box_too_thin_is_refused(model64):
    """The model's one cell rule (more than max_images periodic images per axis is a units
    mistake), the same words as ASE; a box merely narrower than the cutoff is accepted (more
    images), as in every engine that builds images itself."""
    atoms = ethanol()
    atoms.set_cell([0.05, 8.0, 8.0])
    atoms.pbc = True
    topology, _ = topology_from_ase(atoms)
    with pytest.raises(ValueError, match=r"too thin along axis 0 .*64 periodic images per axis"):
        make_torch_force(model64, topology)
    with pytest.raises(ValueError, match="too thin"):
        MLPotential("transip", modelPath=model64).createSystem(topology)
    atoms.set_cell([3.5, 8.0, 8.0])
    make_torch_force(model64, topology_from_ase(atoms)[0])  # narrower than the cutoff: fine


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(multiplicity=2), "multiplicity 2 is impossible for 26 electrons"),
        (dict(charge=40), "total charge 40 is outside"),
        (dict(charge=0.5), "charge must be an integer"),
        (dict(precision="half"), "precision='half' is not understood"),
        (dict(atoms=[]), "atoms is empty"),
        (dict(atoms=[0, 99]), "outside 0..8"),
    ],
)
def test_bad_options_are_refused(model64, kwargs, message):
    topology, _ = topology_from_ase(ethanol())
    with pytest.raises(ValueError, match=message):
        make_torch_force(model64, topology, **kwargs)


def test_unknown_mlpotential_options_are_named(model64):
    topology, _ = topology_from_ase(ethanol())
    with pytest.raises(ValueError, match="frobnicate"):
        MLPotential("transip", modelPath=model64, frobnicate=1)
    with pytest.raises(ValueError, match="spin"):
        MLPotential("transip", modelPath=model64).createSystem(topology, spin=1)


# ----------------------------------------------------------------------------- defaults, imports, manual
def test_default_model_path_comes_from_transip_md_export(model64, monkeypatch):
    fake = types.ModuleType("transip_md.export")
    fake.default_model_path = lambda: model64
    monkeypatch.setitem(sys.modules, "transip_md.export", fake)
    assert MLPotential("transip")._impl.modelPath == model64

    monkeypatch.setitem(sys.modules, "transip_md.export", types.ModuleType("transip_md.export"))
    with pytest.raises(ImportError, match="pass modelPath="):
        MLPotential("transip")


def test_import_openmmtorch_loads_nvrtc12_or_says_what_to_install():
    missing = ImportError("libnvrtc.so.12: cannot open shared object file: No such file or directory")
    calls = []

    def importer_failing_once(name):
        calls.append(name)
        if name == "openmmtorch" and calls.count("openmmtorch") == 1:
            raise missing
        return types.ModuleType(name)

    # The wheel's library is found and loaded (libc stands in for it), then the import retried.
    module = tf.import_openmmtorch(_import=importer_failing_once, _find_nvrtc=lambda: "libc.so.6")
    assert module.__name__ == "openmmtorch" and calls.count("openmmtorch") == 2

    def importer_always_failing(name):
        if name == "openmmtorch":
            raise missing
        return types.ModuleType(name)

    with pytest.raises(ImportError, match="pip install nvidia-cuda-nvrtc-cu12"):
        tf.import_openmmtorch(_import=importer_always_failing, _find_nvrtc=lambda: None)

    def importer_not_installed(name):
        if name == "openmmtorch":
            raise ModuleNotFoundError("No module named 'openmmtorch'", name="openmmtorch")
        return types.ModuleType(name)

    with pytest.raises(ImportError, match="pip install openmmtorch==1.5"):
        tf.import_openmmtorch(_import=importer_not_installed)
    assert tf._find_nvrtc12() is None or tf._find_nvrtc12().endswith("libnvrtc.so.12")


def test_manual_example_runs(model64, tmp_path, monkeypatch):
    """The Impl's class docstring is the user manual; its example must run as written."""
    shutil.copy(model64, tmp_path / "model.pt")
    monkeypatch.chdir(tmp_path)
    test = doctest.DocTestParser().get_doctest(
        TransIPPotentialImpl.__doc__, {}, "TransIPPotentialImpl", None, 0
    )
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 5 and result.failed == 0


def test_works_when_openmm_is_imported_before_torch(model64):
    """Importing openmm first leaves OpenMM-Torch's Reference plugin unloaded (it needs torch's
    libraries); make_torch_force must load it again, or every Context fails."""
    script = (
        "import openmm, openmm.unit as u\n"
        "from ase.build import molecule\n"
        "from openmmml import MLPotential\n"
        "from transip_openmm import topology_from_ase\n"
        "top, pos = topology_from_ase(molecule('CH3CH2OH'))\n"
        f"system = MLPotential('transip', modelPath={model64!r}).createSystem(top)\n"
        "ctx = openmm.Context(system, openmm.VerletIntegrator(0.001),\n"
        "                     openmm.Platform.getPlatformByName('Reference'))\n"
        "ctx.setPositions(pos)\n"
        "print(ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(u.kilojoule_per_mole))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert np.isfinite(float(done.stdout.strip().splitlines()[-1]))
