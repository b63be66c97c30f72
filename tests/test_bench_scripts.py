"""CPU-checkable pieces of the GPU benchmark scripts (gpu_bench.py, openmm_gpu.py,
equivariance_study.py, demo_retrain_table.py).

The benchmarks run once on a GPU machine with no chance to iterate there; what does not need a
GPU is checked here: the static-shape energy + forces that the ``graph`` variant captures, the
summary tables with missing or failed entries, and the openmm part's command line.
"""

import argparse
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_bench  # noqa: E402
from transip_md.export import load_exported  # noqa: E402
from transip_md.model.static_shapes import plan_static_neighbors  # noqa: E402


@pytest.fixture(scope="module")
def water600():
    return gpu_bench.box_tensors(600, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("search", ["planned", "cell list"])
def test_static_energy_forces_match_compute(exported_tiny32, water600, search):
    """energy_static + autograd (what the graph variant records) = compute()'s forces, for the
    plan gpu_bench makes (all pairs at this size) and for a forced cell list."""
    model = load_exported(exported_tiny32)
    model.check_inputs = False
    atoms, inputs = water600
    if search == "planned":
        plan = gpu_bench.static_plan(model, atoms)
    else:
        plan = plan_static_neighbors(len(atoms), float(model.cutoff), atoms.cell.array, True,
                                     cell_capacity=60)
        assert plan.uses_cell_list
    record = gpu_bench.plan_record(plan)
    assert record["search"] == ("cell list" if plan.uses_cell_list else "all pairs")
    assert record["neighbor_capacity"] == plan.neighbor_capacity
    reference = model.compute(*inputs, True, False)
    energy, forces = gpu_bench.static_energy_forces(model, inputs, plan)
    assert not inputs[0].requires_grad  # the caller's positions are left alone
    assert forces.shape == reference["forces"].shape
    scale = reference["forces"].abs().max()
    assert float((forces - reference["forces"]).abs().max() / scale) < 1e-5
    assert abs(float(energy) - float(reference["energy"])) <= 1e-5 * abs(float(reference["energy"]))


def test_static_energy_forces_uses_a_static_buffer(exported_tiny32, water600):
    """Positions that require grad (a CUDA graph's input buffer) are differentiated in place."""
    model = load_exported(exported_tiny32)
    atoms, inputs = water600
    plan = gpu_bench.static_plan(model, atoms)
    buffer = inputs[0].clone().requires_grad_(True)
    _, forces = gpu_bench.static_energy_forces(model, (buffer,) + tuple(inputs[1:]), plan)
    assert torch.isfinite(forces).all() and buffer.grad is None


def test_capture_refuses_cpu_inputs(exported_tiny32, water600):
    model = load_exported(exported_tiny32)
    atoms, inputs = water600
    with pytest.raises(RuntimeError, match="CUDA"):
        gpu_bench.capture_static_graph(model, inputs, gpu_bench.static_plan(model, atoms))


def test_tables_with_missing_and_failed_entries(capsys):
    row = {"atoms": 1536, "fp32_ms": 10.0, "tf32_ms": 8.0, "lowmem_ms": 12.0, "neighbor_list_ms": 0.5,
           "fp32_peak_gib": 1.0, "fp32_gib_per_10k_atoms": 6.5, "lowmem_gib_per_10k_atoms": 2.0,
           "lowmem_peak_gib": 0.3}
    graphed = dict(row, graph_ms=5.0, graph_peak_gib=0.8, graph_force_rel_err=1e-6,
                   graph_plan={"search": "cell list", "neighbor_capacity": 79, "cell_capacity": 41,
                               "grid": [5, 5, 5]})
    failed = dict(row, atoms=6144, graph_error="RuntimeError: capture failed")
    gpu_bench.print_transip_table([graphed, failed])
    results = {"transip": {"rows": [graphed, failed]},
               "transip-fused": {"rows": [dict(graphed, graph_ms=4.0), failed]},
               "transip-fused-qkv": {"rows": [dict(graphed, graph_ms=3.0)]},
               "mace": {"rows": [{"atoms": 1536, "plain_ms": 40.0, "cueq_ms": 12.0},
                                 {"atoms": 6144, "cueq_error": "x"}]}}
    gpu_bench.summary(results)
    gpu_bench.summary({"transip": {"error": "x"}, "mace": {"error": "y"}})
    out = capsys.readouterr().out
    assert "graph_error: RuntimeError: capture failed" in out
    assert "MACE cuEq / TransIP graph = 4.00" in out  # 12 ms / the best fused kind's 3 ms
    assert "fused-qkv graph ms" in out


def _args(**kw):
    base = dict(model=None, openmm_sizes=[1536], nvrtc_stub=None, graph_warmup=3)
    base.update(kw)
    return argparse.Namespace(**base)


def test_openmm_command_random_model_barely_moves(tmp_path):
    files = {"float32": tmp_path / "m.pt"}
    cmd = gpu_bench.openmm_command(_args(), files, tmp_path)
    assert "--no-relax" in cmd
    assert cmd[cmd.index("--timestep-fs") + 1] == str(gpu_bench.RANDOM_MODEL_TIMESTEP_FS)
    assert cmd[cmd.index("--sizes") + 1] == "512"
    trained = gpu_bench.openmm_command(_args(model="trained.pt"), files, tmp_path)
    assert "--no-relax" not in trained and "--timestep-fs" not in trained
    note = gpu_bench._openmm_note(_args(), {})
    assert note["timestep_fs"] == gpu_bench.RANDOM_MODEL_TIMESTEP_FS and "near-zero" in note["note"]


def test_openmm_gpu_options(monkeypatch):
    import openmm_gpu

    monkeypatch.setattr(sys, "argv", ["openmm_gpu.py", "--no-relax", "--timestep-fs", "0.001"])
    args = openmm_gpu.parse_args()
    assert args.relax is False and args.timestep_fs == 0.001 and args.ns_per_day_timestep_fs is None
    monkeypatch.setattr(sys, "argv", ["openmm_gpu.py"])
    args = openmm_gpu.parse_args()
    assert args.relax is True and args.timestep_fs == 0.5


def test_memory_profile_replays_the_heap(tmp_path):
    """benchmarks/memory_profile.py: the same energy from every kernel kind; the peak it replays
    from the allocation events is at least what the call's own tensors need; the gathered
    [R, K, W] neighbour tokens of the reference make its peak the largest, the per-token qkv
    operator's the smallest."""
    import json

    import memory_profile

    out = tmp_path / "mem.json"
    assert memory_profile.main(["--size", "tiny", "--atoms", "96", "--top", "3",
                                "--kernels", "reference,fused,fused-qkv", "--out", str(out)]) == 0
    runs = {r["kernels"]: r for r in json.loads(out.read_text())["runs"]}
    energies = [r["energy_ev"] for r in runs.values()]
    assert max(energies) - min(energies) <= 2e-5 * abs(energies[0])
    n_atoms = runs["reference"]["atoms"]
    forces_bytes = n_atoms * 3 * 4  # float32 forces alone
    for r in runs.values():
        assert r["peak_bytes"] > forces_bytes and r["alive_at_peak"]
    assert (runs["fused-qkv"]["peak_bytes"] < runs["fused"]["peak_bytes"]
            < runs["reference"]["peak_bytes"])


def test_study_variants_parse_name_and_group():
    """equivariance_study.py's variants: specs parse to typed overrides, job names and table
    cells carry the label, MACE runs once per size whatever the variants, and the best TransIP
    against MACE is chosen over the variants too."""
    import equivariance_study as study

    assert study.parse_variant("base") == ("base", {})
    label, over = study.parse_variant("w:edge_filter=true,width=128,lr=0.002")
    assert label == "w" and over == {"edge_filter": True, "width": 128, "lr": 0.002}
    assert isinstance(over["width"], int) and isinstance(over["lr"], float)
    with pytest.raises(SystemExit, match="not key=value"):
        study.parse_variant("w:width")

    args = argparse.Namespace(seeds=[0], sizes=[1000], modes=["augment", "mace"],
                              variants=["base", "w:width=128"])
    jobs = study.job_list(args)
    names = sorted(study.job_name(j) for j in jobs)
    assert names == ["augment+w-n1000-s0", "augment-n1000-s0", "mace-n1000-s0"]

    def row(mode, variant, mae):
        return {"status": "done", "train_frames": 1000, "mode": mode, "variant": variant,
                "seed": 0, "energy_mae_mev_per_atom": 1.0, "force_mae_mev_per_A": mae,
                "eq_energy_mev_per_atom": 0.0, "eq_force_relative": 0.0, "steps": 1,
                "train_seconds": 1.0, "train_atoms_per_s": 1.0, "stop_reason": "max_seconds"}

    summary = study.summarise([row("augment", "base", 80.0), row("augment", "w", 60.0),
                               row("mace", "base", 30.0)])
    assert {t["mode"] for t in summary["table"]} == {"augment", "augment+w", "mace"}
    best = summary["goals"]["best_transip_vs_mace"][0]
    assert best["best_mode"] == "augment+w" and best["force_mae_ratio"] == pytest.approx(2.0)


def test_demo_retrain_table_picks_the_best_validation_and_weights_the_clusters(tmp_path):
    """benchmarks/demo_retrain_table.py: the selection row is the validation with the lowest
    energy + force MAE (not the last one), the water-cluster MAE is frame-weighted, and a
    candidate without results is reported, not dropped silently."""
    import json
    import subprocess

    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    hist = [{"step": 100, "train_atoms_per_s": 10.0, "val_energy_mae_mev_per_atom": 5.0,
             "val_force_mae_mev_per_A": 50.0},
            {"step": 200, "train_atoms_per_s": 20.0, "val_energy_mae_mev_per_atom": 9.0,
             "val_force_mae_mev_per_A": 49.0}]
    (run / "history.json").write_text(json.dumps(hist))
    src = {"g2": (10, 80.0), "ion": (2, 30.0), "water2": (1, 10.0), "water3": (3, 30.0)}
    per = {k: {"frames": n, "force_mae_mev_per_A": f, "energy_mae_mev_per_atom": 1.0}
           for k, (n, f) in src.items()}
    (tmp_path / "eval_a_organics_test.json").write_text(json.dumps(
        {"per_source": per, "force_mae_mev_per_A": 70.0, "energy_mae_mev_per_atom": 1.0}))
    (tmp_path / "eval_a_water_test.json").write_text(json.dumps(
        {"per_source": {}, "force_mae_mev_per_A": 40.0, "energy_mae_mev_per_atom": 2.0}))
    out = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "demo_retrain_table.py"),
                           str(tmp_path), "a", "missing", "--json", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("missing ")
    (row,) = json.loads(out.read_text())["runs"]
    assert row["val_force_mae_mev_per_A"] == 50.0 and row["steps"] == 200  # best = first (55 < 58)
    t = row["test_force_mae_mev_per_A"]
    assert t["water_clusters"] == pytest.approx((10.0 + 3 * 30.0) / 4)
    assert (t["g2"], t["ion"], t["water_boxes"], t["organics_all"]) == (80.0, 30.0, 40.0, 70.0)
