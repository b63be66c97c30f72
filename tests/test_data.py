"""Tests for transip_md.data: I/O round trips, validation, splits, batching, xTB generation, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import ase.db
import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from transip_md.data import (
    Frame,
    batches_by_atoms,
    frame_from_atoms,
    frame_to_atoms,
    read_frames,
    split_frames,
    write_frames,
)

REPO = Path(__file__).resolve().parents[1]


def make_frame(n_atoms=3, seed=0, charge=0, spin=1, source="", periodic=False) -> Frame:
    rng = np.random.default_rng(seed)
    cell = np.diag([7.0, 8.0, 9.0]) if periodic else np.zeros((3, 3))
    return Frame(
        numbers=rng.choice([1, 6, 7, 8], size=n_atoms).astype(np.int64),
        positions=rng.uniform(0, 5, size=(n_atoms, 3)),
        energy=float(rng.normal(-100, 10)),
        forces=rng.normal(size=(n_atoms, 3)),
        charge=charge,
        spin=spin,
        cell=cell,
        pbc=np.array([periodic] * 3),
        source=source,
    )


def assert_same(a: Frame, b: Frame, atol=1e-7):
    np.testing.assert_array_equal(a.numbers, b.numbers)
    np.testing.assert_allclose(a.positions, b.positions, atol=atol, rtol=0)
    assert a.energy == pytest.approx(b.energy, abs=1e-9)
    np.testing.assert_allclose(a.forces, b.forces, atol=atol, rtol=0)
    assert (a.charge, a.spin, a.source) == (b.charge, b.spin, b.source)
    np.testing.assert_allclose(a.cell, b.cell, atol=atol)
    np.testing.assert_array_equal(a.pbc, b.pbc)


FRAMES = [
    make_frame(3, 0, charge=-1, spin=1, source="ion:OH-@700K"),
    make_frame(5, 1, charge=0, spin=3, source="g2:CH3OH@500K", periodic=True),
    make_frame(2, 2, charge=1, spin=2, source=""),
]


# --- frames / readers --------------------------------------------------------------------


def test_extxyz_round_trip(tmp_path):
    path = tmp_path / "frames.extxyz"
    write_frames(FRAMES, path)
    back = read_frames(path)
    assert len(back) == len(FRAMES)
    for a, b in zip(FRAMES, back):
        assert_same(a, b)
        assert b.numbers.dtype == np.int64 and b.positions.dtype == np.float64
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    assert [f.source for f in read_frames(path, index="1:")] == [f.source for f in FRAMES[1:]]
    assert len(read_frames(path, index=-1)) == 1


def test_frame_atoms_round_trip():
    for frame in FRAMES:
        atoms = frame_to_atoms(frame)
        assert atoms.info["charge"] == frame.charge and atoms.info["spin"] == frame.spin
        assert_same(frame, frame_from_atoms(atoms), atol=0)


def _write_db(path, frames, where, **connect_kwargs):
    """Store frames as OMol25 does (charge/spin/source in row.data) or as key_value_pairs."""
    db = ase.db.connect(str(path), **connect_kwargs)
    for frame in frames:
        atoms = frame_to_atoms(frame)
        extra = {"charge": frame.charge, "spin": frame.spin, "source": frame.source}
        atoms.info = {}
        if where == "data":
            db.write(atoms, data=extra)
        else:
            db.write(atoms, **extra)
    if hasattr(db, "close"):
        db.close()


@pytest.mark.parametrize(
    "name, where, kwargs",
    [
        ("frames.db", "kvp", {}),
        ("frames.json", "data", {}),
        ("frames.aselmdb", "data", {"type": "aselmdb"}),
    ],
)
def test_database_round_trip(tmp_path, name, where, kwargs):
    path = tmp_path / name
    _write_db(path, FRAMES, where, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # charge/spin must be found: no "missing" warning
        back = read_frames(path)
    assert len(back) == len(FRAMES)
    for a, b in zip(FRAMES, back):
        assert_same(a, b, atol=1e-12)


def test_missing_charge_spin_uses_defaults_with_one_warning(tmp_path):
    atoms = [Atoms("H2O", positions=np.eye(3)), Atoms("CH4", positions=np.arange(15.0).reshape(5, 3))]
    for a in atoms:
        a.calc = SinglePointCalculator(a, energy=-1.0, forces=np.zeros((len(a), 3)))
    path = tmp_path / "plain.extxyz"
    ase.io.write(path, atoms, format="extxyz")
    with pytest.warns(UserWarning, match="charge") as record:
        frames = read_frames(path)
    assert len([w for w in record if "charge" in str(w.message)]) == 1
    assert all(f.charge == 0 and f.spin == 1 for f in frames)
    assert frames[0].energy == -1.0

    with pytest.warns(UserWarning, match="spin") as record:
        frame = frame_from_atoms(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7]]), default_spin=3)
    assert len(record) == 1 and frame.spin == 3 and frame.energy is None and frame.forces is None


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.extxyz"):
        read_frames(tmp_path / "nope.extxyz")
    with pytest.raises(ValueError, match=r"\.pdb.*\.extxyz"):
        read_frames(tmp_path / "x.pdb")
    bad = tmp_path / "bad.extxyz"
    bad.write_text("this is\nnot xyz\n")
    with pytest.raises(ValueError, match="bad.extxyz"):
        read_frames(bad)
    bad_db = tmp_path / "bad.db"
    bad_db.write_text("not sqlite")
    with pytest.raises(ValueError, match="bad.db"):
        read_frames(bad_db)


def test_validation_nan_and_empty(tmp_path):
    positions = np.zeros((4, 3))
    positions[0] = [0.0, 0.0, 0.0]
    positions[1] = [1.0, 0.0, 0.0]
    positions[2] = [np.nan, 0.0, 0.0]
    atoms = Atoms("H4", positions=positions)
    atoms.info.update(charge=0, spin=1)
    with pytest.raises(ValueError, match="index 2"):
        frame_from_atoms(atoms)
    path = tmp_path / "nan.extxyz"
    ase.io.write(path, atoms, format="extxyz")
    with pytest.raises(ValueError, match=r"nan.extxyz.*index 2"):
        read_frames(path)
    with pytest.raises(ValueError, match="empty"):
        frame_from_atoms(Atoms())


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.extxyz"

    def exploding():
        yield FRAMES[0]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_frames(exploding(), target)
    assert list(tmp_path.iterdir()) == []

    # An existing file is not clobbered by a failed rewrite.
    write_frames(FRAMES, target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError):
        write_frames(exploding(), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.extxyz"]

    missing = tmp_path / "no_such_dir" / "x.extxyz"
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        write_frames(FRAMES, missing)
    blocker = tmp_path / "plainfile"
    blocker.write_text("")
    with pytest.raises(OSError, match="plainfile"):
        write_frames(FRAMES, blocker / "x.extxyz")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_write_to_unwritable_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="locked"):
            write_frames(FRAMES, locked / "x.extxyz")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


# --- splits and batches ------------------------------------------------------------------


def _many(n=53):
    return [make_frame(1 + i % 7, i, source=f"traj{i % 9}") for i in range(n)]


def test_split_deterministic_disjoint_complete():
    frames = _many()
    a = split_frames(frames, (0.8, 0.1, 0.1), seed=3)
    b = split_frames(frames, (0.8, 0.1, 0.1), seed=3)
    c = split_frames(frames, (0.8, 0.1, 0.1), seed=4)
    ids = [[id(f) for f in part] for part in a]
    assert ids == [[id(f) for f in part] for part in b]
    assert ids != [[id(f) for f in part] for part in c]
    flat = [i for part in ids for i in part]
    assert sorted(flat) == sorted(id(f) for f in frames) and len(set(flat)) == len(frames)
    assert [len(p) for p in a] == [43, 5, 5]  # largest remainder: 42.4, 5.3, 5.3
    with pytest.raises(ValueError):
        split_frames(frames, (0.5, 0.4))


def test_split_group_by_source_keeps_groups_together():
    frames = _many()
    parts = split_frames(frames, (0.6, 0.2, 0.2), seed=0, group_by_source=True)
    owner = {}
    for k, part in enumerate(parts):
        for f in part:
            assert owner.setdefault(f.source, k) == k
    assert sum(map(len, parts)) == len(frames)
    assert all(parts)  # every split received at least one group


def test_batches_by_atoms():
    frames = _many() + [make_frame(40, 99)]  # one frame larger than the budget
    for shuffle in (False, True):
        batches = list(batches_by_atoms(frames, max_atoms=16, shuffle=shuffle, seed=1))
        seen = [id(f) for batch in batches for f in batch]
        assert sorted(seen) == sorted(id(f) for f in frames) and len(seen) == len(frames)
        for batch in batches:
            total = sum(len(f) for f in batch)
            assert total <= 16 or len(batch) == 1
    again = list(batches_by_atoms(frames, 16, shuffle=True, seed=1))
    assert [[id(f) for f in b] for b in again] == [[id(f) for f in b] for b in batches]
    assert [id(b[0]) for b in batches_by_atoms(frames, 16)][0] == id(frames[0])


# --- xTB generation ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transip_md.data.generate import generate

    out = tmp_path_factory.mktemp("gen") / "tiny.extxyz"
    frames = generate("tiny-xtb", 12, seed=0, out=out, progress=False)
    return frames, out


def test_generate_deterministic_and_complete(tiny):
    from transip_md.data.generate import generate

    frames, out = tiny
    assert len(frames) == 12
    again = generate("tiny-xtb", 12, seed=0, progress=False)
    assert [f.energy for f in frames] == [f.energy for f in again]
    other = generate("tiny-xtb", 12, seed=1, progress=False)
    assert [f.energy for f in frames] != [f.energy for f in other]
    kinds = {f.source.split("@")[0] for f in frames}
    assert kinds == {"g2:H2O", "g2:CH4", "g2:NH3", "ion:OH-", "water2"}
    assert {f.source.split("@")[1] for f in frames} == {"300K", "500K", "700K", "1000K"}
    for a, b in zip(frames, read_frames(out)):
        assert_same(a, b)


def test_generate_charges(tiny):
    frames, _ = tiny
    for f in frames:
        expected = -1 if f.source.startswith("ion:OH-") else 0
        assert (f.charge, f.spin) == (expected, 1)
        assert (f.numbers.sum() - f.charge) % 2 == 0  # closed shell


def test_generate_forces_are_energy_gradient(tiny):
    from transip_md.data.generate import LABEL_ACCURACY, xtb_calculator

    frames, _ = tiny
    frame = next(f for f in frames if f.source.startswith("water2"))
    atoms = Atoms(frame.numbers, positions=frame.positions)
    atoms.calc = xtb_calculator(frame.charge, frame.spin, LABEL_ACCURACY)
    h = 2e-3
    for atom in (0, 1, 4):
        for axis in range(3):
            energies = []
            for sign in (1, -1):
                displaced = atoms.copy()
                displaced.calc = atoms.calc
                displaced.positions[atom, axis] += sign * h
                energies.append(displaced.get_potential_energy())
            numeric = -(energies[0] - energies[1]) / (2 * h)
            assert numeric == pytest.approx(frame.forces[atom, axis], abs=1e-3)


def test_generate_resamples_failed_labels(monkeypatch, caplog):
    import transip_md.data.generate as gen

    real, calls = gen.xtb_label, []

    def flaky(positions, system, source):
        calls.append(source)
        return None if len(calls) % 2 else real(positions, system, source)  # every other fails

    monkeypatch.setattr(gen, "xtb_label", flaky)
    with caplog.at_level("WARNING", logger=gen.__name__):
        frames = gen.generate("tiny-xtb", 3, seed=0, progress=False)
    assert len(frames) == 3 and all(np.isfinite(f.forces).all() for f in frames)
    assert "3 xTB evaluations failed" in caplog.text


def test_organics_recipe_systems():
    from transip_md.data.recipes import RECIPES, system_kind

    systems = RECIPES["organics-xtb"](0)
    labels = [s.label for s in systems]
    assert len(labels) == len(set(labels))
    assert {system_kind(label) for label in labels} == {"g2", "water", "ion"}
    assert "g2:O2" not in labels and "g2:CH3" not in labels  # triplet, radical
    assert {f"water{k}" for k in range(2, 9)} <= set(labels)
    charges = {s.label: s.charge for s in systems if s.label.startswith("ion:")}
    assert charges == {"ion:OH-": -1, "ion:H3O+": 1, "ion:NH4+": 1,
                       "ion:HCOO-": -1, "ion:CH3COO-": -1, "ion:CH3NH3+": 1}
    for s in systems:
        assert set(s.atoms.get_chemical_symbols()) <= set("HCNO")
        assert (s.atoms.numbers.sum() - s.charge) % 2 == 0 and s.mult == 1
        if s.label.startswith("water"):
            o = s.atoms.positions[s.atoms.numbers == 8]
            d = np.linalg.norm(o[:, None] - o[None], axis=-1)[np.triu_indices(len(o), 1)]
            assert d.min() >= 2.6
    again = RECIPES["organics-xtb"](0)
    np.testing.assert_array_equal(systems[-7].atoms.positions, again[-7].atoms.positions)


# --- CLI ---------------------------------------------------------------------------------


def run_cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "transip_md.data", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )


def test_cli_generate_split_info(tmp_path):
    out = tmp_path / "gen.extxyz"
    res = run_cli("generate", "--recipe", "tiny-xtb", "--n", 10, "--seed", 0, "--out", out,
                  "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert len(read_frames(out)) == 10

    res = run_cli("split", out, "--fractions", 0.6, 0.2, 0.2, "--out-dir", tmp_path / "s",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    sizes = [len(read_frames(tmp_path / "s" / f"{n}.extxyz")) for n in ("train", "val", "test")]
    assert sizes == [6, 2, 2]

    res = run_cli("info", out, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "frames: 10" in res.stdout and "-1: " in res.stdout and "ion:OH-" in res.stdout


def test_cli_errors(tmp_path):
    out = tmp_path / "x.extxyz"
    res = run_cli("generate", "--recipe", "no-such", "--n", 3, "--out", out, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.startswith("error:") and "no-such" in res.stderr and "tiny-xtb" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not out.exists()

    res = run_cli("info", tmp_path / "missing.extxyz", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("error:") and "missing.extxyz" in res.stderr

    res = run_cli("generate", "--recipe", "tiny-xtb", cwd=tmp_path)  # argparse error
    assert res.returncode == 2 and res.stderr.startswith("error:")
    assert len(res.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
