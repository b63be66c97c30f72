"""The exported file: fidelity to the eager model, metadata, validation, ASE calculator."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from ase.build import molecule

from conftest import make_potential, system_tensors
from transip_md.calculator import TransIPCalculator
from transip_md.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from transip_md.export import (FORMAT_VERSION, ModelFileError, export_checkpoint, export_potential,
                               load_exported, read_metadata)
from transip_md.model import named_config
from transip_md.systems import water_box


def _systems():
    oh = molecule("H2O")
    oh.pop(2)
    acetate = molecule("CH3COOH")
    acetate.pop(3)  # the acid H (index 3 is bonded to O)
    small = water_box(1, seed=3, triclinic=True)
    return {
        "ethanol": (molecule("CH3CH2OH"), 0, 1),
        "hydroxide": (oh, -1, 1),
        "acetate": (acetate, -1, 1),
        "water_box": (water_box(27, seed=1), 0, 1),
        "triclinic": (water_box(27, seed=2, triclinic=True), 0, 1),
        "small_cell": (small, 0, 1),
    }


@pytest.mark.parametrize("name", list(_systems()))
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 2e-5)])
def test_exported_file_reproduces_eager_model(tmp_path, name, dtype, rtol):
    atoms, charge, spin = _systems()[name]
    torch_dtype = getattr(torch, dtype)
    eager = make_potential(dtype=torch_dtype)
    path = tmp_path / "m.pt"
    export_potential(eager, path, dtype=dtype)
    exported = load_exported(path)
    args = (*system_tensors(atoms, torch_dtype), torch.tensor(charge), torch.tensor(spin))
    periodic = bool(atoms.pbc.any())
    for _ in range(2):  # the second call runs the optimised TorchScript graph
        a = eager.compute(*args, True, periodic)
        b = exported.compute(*args, True, periodic)
        assert abs(float(a["energy"] - b["energy"])) <= rtol * abs(float(a["energy"])) + 1e-12
        # forces: norm-relative (float32 round-off of individual small components is larger)
        f_err = float((a["forces"] - b["forces"]).norm() / a["forces"].norm())
        assert f_err <= rtol, f_err
        if periodic:
            s_err = float((a["stress"] - b["stress"]).norm() / a["stress"].norm())
            assert s_err <= 10 * rtol, s_err


def test_metadata_and_info_cli(tmp_path):
    pot = make_potential()
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, pot, named_config("tiny"), training={"mode": "learned", "steps": 7},
                    metrics={"equivariance_error": {"energy_mev_per_atom": 0.5, "force_relative": 0.1}})
    out = subprocess.run([sys.executable, "-m", "transip_md.export", str(ckpt), str(tmp_path / "m.pt")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    meta = read_metadata(tmp_path / "m.pt")
    assert meta["format_version"] == FORMAT_VERSION and meta["dtype"] == "float32"
    assert meta["elements"] == ["H", "C", "N", "O"]
    assert meta["cutoff"] == 4.0 and meta["num_layers"] == 2 and meta["receptive_field"] == 8.0
    assert meta["training"]["steps"] == 7 and meta["equivariance_error"]["force_relative"] == 0.1
    assert meta["units"]["openmm"]["energy"] == "kJ/mol"
    module = load_exported(tmp_path / "m.pt")
    assert json.loads(module.metadata_json)["elements"] == meta["elements"]
    info = subprocess.run([sys.executable, "-m", "transip_md.export", "--info", str(tmp_path / "m.pt")],
                          capture_output=True, text=True)
    assert info.returncode == 0 and "receptive field" in info.stdout and "8.0 Å" in info.stdout


def test_export_errors_leave_no_output(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "transip_md.export", *map(str, args)],
                              capture_output=True, text=True)

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 100)
    cases = {
        "missing": (tmp_path / "nope.pt", "not found"),
        "corrupt": (corrupt, "not a transip-md checkpoint"),
    }
    for name, (src, message) in cases.items():
        out = run(src, tmp_path / f"{name}.out.pt")
        assert out.returncode == 2 and message in out.stderr, (name, out.stderr)
        assert not (tmp_path / f"{name}.out.pt").exists()
    torch.save({"weight": torch.zeros(3)}, tmp_path / "foreign.pt")
    out = run(tmp_path / "foreign.pt", tmp_path / "f.out.pt")
    assert out.returncode == 2 and "bare state_dict" in out.stderr
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, make_potential(), named_config("tiny"))
    out = run(ckpt, tmp_path / "no_such_dir" / "m.pt")
    assert out.returncode == 2 and "does not exist" in out.stderr
    assert not list(tmp_path.glob("**/.m.pt*"))


def test_checkpoint_round_trip_and_version_guard(tmp_path):
    pot = make_potential()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, pot, named_config("tiny"), training={"mode": "none"})
    back = load_checkpoint(path)
    atoms = molecule("CH3OH")
    args = (*system_tensors(atoms), torch.tensor(0), torch.tensor(1), True, False)
    assert float(back.potential.compute(*args)["energy"]) == float(pot.compute(*args)["energy"])
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(tmp_path / "newer.pt")
    (tmp_path / "trunc.pt").write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "trunc.pt")


def test_model_file_version_guard(tmp_path):
    pot = make_potential()
    pot.format_version = 99
    path = tmp_path / "future.pt"
    meta = {"kind": "transip-md-model", "format_version": 99}
    torch.jit.save(torch.jit.script(pot), str(path), _extra_files={"metadata.json": json.dumps(meta)})
    with pytest.raises(ModelFileError, match="newer"):
        load_exported(path)
    with pytest.raises(ModelFileError, match="checkpoint"):
        ckpt = tmp_path / "ckpt.pt"
        save_checkpoint(ckpt, make_potential(), named_config("tiny"))
        load_exported(ckpt)


def test_ase_calculator_properties_and_errors(exported_tiny64):
    calc = TransIPCalculator(str(exported_tiny64))
    atoms = water_box(8, seed=0, triclinic=True)
    atoms.calc = calc
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    energies = atoms.get_potential_energies()
    assert abs(energies.sum() - energy) < 1e-10
    assert abs(forces.sum(0)).max() < 1e-10  # Newton's third law: no net force
    # stress by finite differences of a uniform strain
    stress = atoms.get_stress(voigt=False)
    h = 1e-5
    cell0 = atoms.cell.array.copy()
    ep, em = atoms.copy(), atoms.copy()
    ep.calc, em.calc = calc, calc
    ep.set_cell(cell0 * (1 + h), scale_atoms=True)
    em.set_cell(cell0 * (1 - h), scale_atoms=True)
    trace = (ep.get_potential_energy() - em.get_potential_energy()) / (2 * h) / atoms.get_volume()
    assert abs(np.trace(stress) - trace) < 1e-7
    mol = molecule("CH3CH2Cl")
    mol.calc = calc
    with pytest.raises(ValueError, match="element Cl"):
        mol.get_potential_energy()
    ion = molecule("H2O")
    ion.calc = calc
    e_neutral = ion.get_potential_energy()
    ion.info["charge"], ion.info["spin"] = 1, 2  # H2O+: 9 electrons, a doublet
    ion.calc = TransIPCalculator(str(exported_tiny64))
    assert abs(ion.get_potential_energy() - e_neutral) > 1e-6


# ----------------------------------------------------------------------------- file kinds (issue #14)
class _Opaque:
    """Pickled by torch.save into a file that a safe (weights_only) load refuses."""


def test_sniff_tells_every_kind_apart(tmp_path, exported_tiny64):
    from transip_md import file_kinds
    from transip_md.checkpoint import CHECKPOINT_KIND
    from transip_md.export.model_file import METADATA_NAME, MODEL_KIND

    assert (file_kinds.EXPORTED_KIND, file_kinds.CHECKPOINT_KIND, file_kinds.METADATA_NAME) == (
        MODEL_KIND, CHECKPOINT_KIND, METADATA_NAME)
    save_checkpoint(tmp_path / "ckpt.pt", make_potential(), named_config("tiny"))
    torch.save({"weight": torch.zeros(3)}, tmp_path / "state.pt")
    torch.jit.save(torch.jit.script(make_potential()), str(tmp_path / "script.pt"))
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "trunc.pt").write_bytes(exported_tiny64.read_bytes()[:3000])
    import zipfile
    with zipfile.ZipFile(tmp_path / "plain.zip", "w") as archive:
        archive.writestr("readme.txt", "hi")
    expected = {
        exported_tiny64: "exported", tmp_path / "ckpt.pt": "checkpoint",
        tmp_path / "state.pt": "torch-save", tmp_path / "script.pt": "torchscript",
        tmp_path / "empty.pt": "empty", tmp_path / "notes.txt": "not-zip",
        tmp_path / "trunc.pt": "not-zip", tmp_path / "plain.zip": "zip",
        tmp_path / "nope.pt": "missing", tmp_path: "directory",
    }
    for path, kind in expected.items():
        assert file_kinds.sniff(path) == kind, path


def test_load_checkpoint_names_an_exported_file_and_never_advises_unsafe_loading(tmp_path, exported_tiny64):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(exported_tiny64)
    message = str(info.value)
    assert "is an exported transip-md model, not a training checkpoint" in message
    assert "evaluate" in message and "weights_only" not in message
    torch.save({"kind": "transip-md-checkpoint", "x": _Opaque()}, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "unsafe.pt")
    message = str(info.value)
    assert "pickled Python objects" in message and "_Opaque" in message
    assert "weights_only" not in message and "arbitrary code" not in message


def test_run_cli_scrubs_unsafe_load_advice(capsys):
    from transip_md.cli import run_cli

    def main(argv):
        raise RuntimeError("Weights only load failed.\n(1) Re-running `torch.load` with `weights_only` "
                           "set to `False` will likely succeed\nCheck the docs for weights_only")

    assert run_cli(main) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "weights_only" not in err


def _checkpoint_and_export(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, make_potential(), named_config("tiny"))
    model = tmp_path / "m.pt"
    export_checkpoint(ckpt, model, dtype="float64")
    return ckpt, model


def test_export_checkpoint_output_rule(tmp_path):
    ckpt, model = _checkpoint_and_export(tmp_path)
    before = model.read_bytes()
    with pytest.raises(ModelFileError, match="use --force to replace it"):
        export_checkpoint(ckpt, model, dtype="float32", replace_export=False)
    assert model.read_bytes() == before
    export_checkpoint(ckpt, model, dtype="float32")  # the Python default replaces an export
    assert read_metadata(model)["dtype"] == "float32"
    ckpt_bytes = ckpt.read_bytes()
    with pytest.raises(ModelFileError, match=r"ckpt\.pt is a transip-md training checkpoint.*Did you mean"):
        export_checkpoint(ckpt, ckpt)
    assert ckpt.read_bytes() == ckpt_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "m.pt"]


def test_failed_fidelity_check_keeps_the_existing_file(tmp_path, monkeypatch):
    from transip_md.export import checkpoint_export

    ckpt, model = _checkpoint_and_export(tmp_path)
    before = model.read_bytes()
    monkeypatch.setitem(checkpoint_export.FIDELITY_RTOL, "float32", -1.0)  # every check fails
    with pytest.raises(ModelFileError, match=r"disagrees with the eager model.*m\.pt was not written or changed"):
        export_checkpoint(ckpt, model, dtype="float32")
    assert model.read_bytes() == before
    with pytest.raises(ModelFileError):
        export_checkpoint(ckpt, tmp_path / "new.pt", dtype="float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "m.pt"]  # no temporaries


def test_evaluate_exported_file_matches_its_checkpoint(tmp_path):
    from ase.calculators.emt import EMT

    from conftest import emt_frames
    from transip_md.data import frame_from_atoms, write_frames
    from transip_md.evaluate import evaluate

    box = water_box(8, seed=4, triclinic=True)
    box.calc = EMT()
    box.get_potential_energy()
    box.info.update(charge=0, spin=1, source="emt:waterbox")
    data = tmp_path / "data.extxyz"
    write_frames(emt_frames(6) + [frame_from_atoms(box)], data)
    ckpt, model = _checkpoint_and_export(tmp_path)  # float64
    a = evaluate(str(ckpt), str(data), rotations=2)
    b = evaluate(str(model), str(data), rotations=2)
    assert (a["model_kind"], b["model_kind"]) == ("checkpoint", "exported")
    for key in ("energy_mae_mev_per_atom", "force_mae_mev_per_A"):
        assert abs(a[key] - b[key]) < 1e-8, (key, a[key], b[key])
    assert a["per_source"].keys() == b["per_source"].keys() and b["frames"] == 7
    for key in ("energy_mev_per_atom", "force_relative"):
        assert abs(a["equivariance_error"][key] - b["equivariance_error"][key]) < 1e-6


def test_exported_parameters_are_frozen_and_forces_still_flow(exported_tiny64):
    """Exported parameters carry requires_grad=False (no weight-gradient bookkeeping in
    engines), and the forces are still -dE/dx: a central finite difference of the energy
    along one coordinate matches."""
    model = load_exported(exported_tiny64)
    assert not any(p.requires_grad for p in model.parameters())
    atoms = molecule("CH3CH2OH")
    positions, numbers, cell, pbc = system_tensors(atoms)
    charge, spin = torch.tensor(0), torch.tensor(1)
    forces = model.compute(positions, numbers, cell, pbc, charge, spin, True, False)["forces"]
    h = 1e-5
    shifted = []
    for sign in (1.0, -1.0):
        p = positions.clone()
        p[2, 1] += sign * h
        shifted.append(float(model.energy(p, numbers, cell, pbc, charge, spin)))
    numeric = -(shifted[0] - shifted[1]) / (2 * h)
    assert abs(float(forces[2, 1]) - numeric) <= 1e-6 * max(1.0, abs(numeric))
    assert not any(p.grad is not None for p in model.parameters())
