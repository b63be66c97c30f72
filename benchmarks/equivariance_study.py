"""Learned equivariance (MSE, contrastive) vs augmentation vs nothing vs MACE, at several data sizes.

Issue #17's study. Every run trains on a nested subset of one training pool (the 250-frame set is
inside the 1,000-frame set, ...), selects its model on the same validation frames, is scored on
the same held-out test frames, and gets the same wall-clock budget on the same GPU. Runs go side
by side as separate processes (one GPU; launch-bound small-molecule training leaves it mostly
idle, so parallel runs cost little each), each stopping at its budget or at early stopping.
Each finished run writes its own JSON at once; ``collect`` summarises whatever has finished
(table, ``--json``, MAE-vs-data-size plot), so a study cut short still reports.

  # the whole study (orchestrator; runs `worker` processes, then `collect`):
  python benchmarks/equivariance_study.py run --train pool*.extxyz --val val.extxyz \\
      --test test.extxyz --sizes 250 1000 4000 16000 --modes none augment learned-mse \\
      learned-contrastive mace --seeds 0 1 --run-seconds 240 --parallel 16 --out runs/study
  # summarise what finished (also works while runs are going):
  python benchmarks/equivariance_study.py collect --out runs/study \\
      --json benchmarks/results/equivariance_study_h200.json

Modes: ``none`` / ``augment`` / ``learned-mse`` / ``learned-contrastive`` are TransIP training
modes (transip_md/train/config.py); ``mace`` is MACE (mace-torch, MACE-OFF23-small
hyper-parameters: 96x0e, max_ell 3, correlation 3, 2 interactions, r_max 5 Å, 8 Bessel
functions) trained through its Python API with average E0s from the same training frames,
Adam(amsgrad) + EMA like mace_run_train's defaults, and the same early stopping on validation.
MACE sees no total charge (the organics recipe's ions have compositions no neutral closed-shell
molecule of the recipe shares, so this costs it nothing here).
"""

import argparse
import dataclasses
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

TRANSIP_MODES = ("none", "augment", "learned-mse", "learned-contrastive")
ALL_MODES = TRANSIP_MODES + ("mace",)


# ----------------------------------------------------------------------------- variants
def parse_variant(spec: str):
    """``"base"`` -> ("base", {}); ``"w128:width=128,heads=8"`` -> ("w128", {"width": 128,
    "heads": 8}): a label and ModelConfig overrides (ints, floats, true/false)."""
    label, _, body = spec.partition(":")
    overrides = {}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"variant '{spec}': '{item}' is not key=value")
        low = value.lower()
        if low in ("true", "false"):
            overrides[key] = low == "true"
        else:
            try:
                overrides[key] = int(value)
            except ValueError:
                overrides[key] = float(value)
    return label, overrides


def cell_mode(row: Dict) -> str:
    """The table's mode column: the training mode, with the architecture variant if any."""
    variant = row.get("variant", "base")
    return row["mode"] if variant == "base" else f"{row['mode']}+{variant}"


# ----------------------------------------------------------------------------- data
def load_split(paths: Sequence[str]):
    from transip_md.data import read_frames

    frames = []
    for path in paths:
        frames += read_frames(path)
    return frames


def nested_subset(pool, size: int, seed: int = 0):
    """The first ``size`` frames of one fixed permutation of the pool: smaller sets are inside
    larger ones, and the subset does not depend on the run's seed (only the training does)."""
    if size > len(pool):
        raise SystemExit(f"size {size} exceeds the {len(pool)} frames of the training pool")
    order = np.random.default_rng(seed).permutation(len(pool))
    return [pool[k] for k in order[:size]]


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


# ----------------------------------------------------------------------------- TransIP worker
def run_transip(args, train, val, test) -> Dict:
    import torch

    from transip_md.checkpoint import load_checkpoint
    from transip_md.metrics import accuracy, equivariance_error
    from transip_md.train import Trainer, load_config

    model_cfg, cfg = load_config(args.config)
    # a variant's keys: ModelConfig fields change the network, TrainConfig fields the training
    overrides = parse_variant(args.variant)[1]
    model_keys = {f.name for f in dataclasses.fields(model_cfg)}
    train_keys = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - model_keys - train_keys)
    if unknown:
        raise SystemExit(f"variant '{args.variant}': unknown keys {', '.join(unknown)}")
    model_cfg = dataclasses.replace(model_cfg, **{k: v for k, v in overrides.items()
                                                  if k in model_keys})
    train_overrides = {k: v for k, v in overrides.items() if k in train_keys}
    cfg.mode, cfg.seed, cfg.device = args.mode, args.seed, args.device
    cfg.epochs, cfg.max_steps = 10**6, args.max_steps
    cfg.batch_atoms = args.batch_atoms
    cfg.warmup_steps = min(cfg.warmup_steps, max(1, args.max_steps // 20))
    cfg.val_interval_steps = args.val_interval_steps
    cfg.early_stopping_patience = args.patience
    # The budget counts from the worker's start (data loading included), as MACE's does.
    cfg.max_seconds = max(1.0, args.run_seconds - (time.time() - args.t_start))
    # the cosine schedule spans the time budget (runs stop by time, at unknown step counts)
    cfg.schedule_by_time = args.schedule == "time"
    if args.lr is not None:
        cfg.lr = args.lr
    for key, value in train_overrides.items():  # after the study's own settings
        setattr(cfg, key, value)
    start = args.t_start
    trainer = Trainer(model_cfg, cfg, train, val, Path(args.run_dir), progress=False,
                      provenance={"study": "equivariance"}, log=lambda line: None)
    ckpt = load_checkpoint(trainer.run(), map_location=str(trainer.device))
    train_seconds = time.time() - start
    model = ckpt.potential.to(trainer.device)
    acc = accuracy(model, test)
    eq = equivariance_error(model, test, n_rotations=4, seed=123)
    history = trainer.history
    rates = [h["train_atoms_per_s"] for h in history if "train_atoms_per_s" in h]
    return {"energy_mae_mev_per_atom": acc["energy_mae_mev_per_atom"],
            "force_mae_mev_per_A": acc["force_mae_mev_per_A"],
            "eq_energy_mev_per_atom": eq["energy_mev_per_atom"],
            "eq_force_relative": eq["force_relative"],
            "steps": trainer.step, "best_step": ckpt.training["steps"],
            "train_seconds": train_seconds, "stop_reason": trainer.stop_reason,
            "train_atoms_per_s": rates[-1] if rates else math.nan,
            "schedule": args.schedule, "batch_atoms": cfg.batch_atoms, "lr": cfg.lr,
            "model_config": model_cfg.to_dict(),
            # validation learning curve: is the run converged (flat), at what step/time
            "val_curve": [{"step": h["step"], "elapsed_s": h["elapsed_s"], "lr": h["lr"],
                           "force_mae_mev_per_A": h["val_force_mae_mev_per_A"],
                           "energy_mae_mev_per_atom": h["val_energy_mae_mev_per_atom"]}
                          for h in history],
            "device": str(trainer.device),
            "gpu": torch.cuda.get_device_name() if trainer.device.type == "cuda" else ""}


# ----------------------------------------------------------------------------- MACE worker
def _mace_data(frames, z_table, cutoff: float):
    from ase import Atoms
    from mace import data as mdata

    keys = mdata.KeySpecification(info_keys={"energy": "REF_energy"},
                                  arrays_keys={"forces": "REF_forces"})
    out = []
    for f in frames:
        atoms = Atoms(f.numbers, positions=f.positions, cell=f.cell, pbc=f.pbc)
        atoms.info["REF_energy"] = float(f.energy)
        atoms.arrays["REF_forces"] = np.asarray(f.forces, dtype=float)
        config = mdata.config_from_atoms(atoms, key_specification=keys)
        out.append(mdata.AtomicData.from_config(config, z_table=z_table, cutoff=cutoff))
    return out


def _mace_errors(model, loader, device) -> Dict[str, float]:
    """Energy MAE (meV/atom) and force MAE (meV/Å, over components), as transip_md.metrics."""
    import torch

    e_err, f_err = [], []
    for batch in loader:
        batch = batch.to(device)
        out = model(batch.to_dict(), training=False, compute_force=True)
        n = (batch.ptr[1:] - batch.ptr[:-1]).to(out["energy"].dtype)
        e_err.append(((out["energy"].detach() - batch.energy).abs() / n).cpu())
        f_err.append((out["forces"].detach() - batch.forces).abs().reshape(-1).cpu())
    return {"energy_mae_mev_per_atom": 1000.0 * float(torch.cat(e_err).mean()),
            "force_mae_mev_per_A": 1000.0 * float(torch.cat(f_err).mean())}


def run_mace(args, train, val, test) -> Dict:
    # e3nn 0.4.4 (pinned by mace-torch) torch.load()s its bundled constants, which the
    # weights-only default of torch >= 2.6 refuses; it is package data, not user input.
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    import torch
    from e3nn import o3
    from mace import data as mdata
    from mace import modules, tools
    from mace.tools import torch_geometric
    from torch_ema import ExponentialMovingAverage

    start = args.t_start
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    torch.set_default_dtype(torch.float32)
    zs = sorted({int(z) for f in train for z in f.numbers})
    z_table = tools.AtomicNumberTable(zs)
    cutoff = 5.0
    train_data = _mace_data(train, z_table, cutoff)
    loader = torch_geometric.dataloader.DataLoader(train_data, batch_size=args.mace_batch,
                                                   shuffle=True, drop_last=False)
    val_loader = torch_geometric.dataloader.DataLoader(_mace_data(val, z_table, cutoff),
                                                       batch_size=64, shuffle=False)
    test_loader = torch_geometric.dataloader.DataLoader(_mace_data(test, z_table, cutoff),
                                                        batch_size=64, shuffle=False)
    # E0s 'average': least squares of energies on element counts of the training frames.
    configs = [mdata.Configuration(atomic_numbers=f.numbers, positions=f.positions,
                                   properties={"energy": float(f.energy)},
                                   property_weights={"energy": 1.0}) for f in train]
    e0 = mdata.compute_average_E0s(configs, z_table)
    forces_rms = float(np.sqrt(np.mean(np.concatenate([f.forces for f in train]) ** 2)))
    model = modules.ScaleShiftMACE(
        r_max=cutoff, num_bessel=8, num_polynomial_cutoff=5, max_ell=3,
        interaction_cls=modules.blocks.RealAgnosticResidualInteractionBlock,
        interaction_cls_first=modules.blocks.RealAgnosticInteractionBlock,
        num_interactions=2, num_elements=len(zs), hidden_irreps=o3.Irreps("96x0e"),
        MLP_irreps=o3.Irreps("16x0e"), atomic_energies=np.array([e0[z] for z in zs]),
        avg_num_neighbors=float(modules.compute_avg_num_neighbors(loader)), atomic_numbers=zs,
        correlation=3, gate=torch.nn.functional.silu,
        atomic_inter_scale=forces_rms, atomic_inter_shift=0.0,
    ).to(device)
    loss_fn = modules.WeightedEnergyForcesLoss(energy_weight=1.0, forces_weight=100.0).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.mace_lr, amsgrad=True)
    ema = ExponentialMovingAverage(model.parameters(), decay=0.99)
    best, best_state, stale, step, atoms, t_steps = math.inf, None, 0, 0, 0, 0.0
    stop_reason = "max_steps"
    val_every = max(1, args.val_interval_steps)
    curve: List[Dict] = []
    # mace_run_train's --swa stage: the last part of the budget weights energies 1000:100 at a
    # lower learning rate (the main stage's 1:100 weighting leaves energies poorly fitted)
    swa_at = args.run_seconds * (1.0 - args.mace_swa_fraction)
    in_swa = False
    while step < args.max_steps:
        t0 = time.time()
        done = False
        for batch in loader:
            if time.time() - start >= args.run_seconds:
                stop_reason, done = "max_seconds", True
                break
            if not in_swa and args.mace_swa_fraction > 0 and time.time() - start >= swa_at:
                in_swa, best, stale = True, math.inf, 0  # select the model within the stage
                loss_fn = modules.WeightedEnergyForcesLoss(energy_weight=1000.0,
                                                           forces_weight=100.0).to(device)
                for group in opt.param_groups:
                    group["lr"] = args.mace_swa_lr
            batch = batch.to(device)
            atoms += int(batch.num_nodes)
            out = model(batch.to_dict(), training=True, compute_force=True)
            loss = loss_fn(batch, out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            ema.update()
            step += 1
            if step % val_every == 0 or step >= args.max_steps:
                t_steps += time.time() - t0
                with ema.average_parameters():
                    err = _mace_errors(model, val_loader, device)
                    score = err["energy_mae_mev_per_atom"] + err["force_mae_mev_per_A"]
                    curve.append({"step": step, "elapsed_s": time.time() - start,
                                  "force_mae_mev_per_A": err["force_mae_mev_per_A"],
                                  "energy_mae_mev_per_atom": err["energy_mae_mev_per_atom"]})
                    if score < best:
                        best, stale = score, 0
                        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                        best_step = step
                    else:
                        stale += 1
                t0 = time.time()
                if args.patience is not None and stale >= args.patience:
                    stop_reason, done = "early_stopping", True
                    break
            if step >= args.max_steps:
                done = True
                break
        t_steps += time.time() - t0
        if done:
            break
    if best_state is None:  # stopped before the first validation: use the EMA weights
        ema.copy_to(model.parameters())
        best_step = step
    else:
        model.load_state_dict(best_state)
    train_seconds = time.time() - start
    err = _mace_errors(model, test_loader, device)
    return {**err, "eq_energy_mev_per_atom": None, "eq_force_relative": None,
            "eq_note": "MACE is rotation-equivariant by construction (not measured)",
            "steps": step, "best_step": best_step, "train_seconds": train_seconds,
            "stop_reason": stop_reason, "train_atoms_per_s": atoms / max(t_steps, 1e-9),
            "val_curve": curve, "device": str(device),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else ""}


def _terminated(signum, frame):
    raise SystemExit(f"stopped by signal {signum} (past its budget plus grace)")


def cmd_worker(args) -> int:
    args.t_start = time.time()
    signal.signal(signal.SIGTERM, _terminated)
    result_path = Path(args.result)
    if args.data_pickle:  # written once by `run`: 16 workers need not each parse the pool
        with open(args.data_pickle, "rb") as fh:
            data = pickle.load(fh)
        pool, val, test = data["pool"], data["val"], data["test"]
    else:
        pool, val, test = load_split(args.train), load_split(args.val), load_split(args.test)
    train = nested_subset(pool, args.size)
    val, test = val[: args.max_val], test[: args.max_test]
    job = {"train_frames": args.size, "mode": args.mode, "variant": parse_variant(args.variant)[0],
           "variant_spec": args.variant, "seed": args.seed,
           "budget_s": args.run_seconds, "val_frames": len(val), "test_frames": len(test)}
    try:
        result = (run_mace if args.mode == "mace" else run_transip)(args, train, val, test)
        write_json_atomic(result_path, {**job, **result, "status": "done"})
    except (Exception, SystemExit) as exc:  # recorded: collect says which run failed and why
        write_json_atomic(result_path, {**job, "status": "failed",
                                        "error": f"{type(exc).__name__}: {exc}"})
        raise
    return 0


# ----------------------------------------------------------------------------- orchestrator
def job_list(args) -> List[Dict]:
    """Seed 0 of every (size, mode) first, then further seeds: a study cut short still covers
    every cell once."""
    return [{"size": size, "mode": mode, "seed": seed, "variant": variant}
            for seed in args.seeds for size in args.sizes for mode in args.modes
            for variant in (args.variants if mode != "mace" else ["base"])]


def job_name(job: Dict) -> str:
    label = parse_variant(job["variant"])[0]
    return f"{job['mode']}{'' if label == 'base' else '+' + label}-n{job['size']}-s{job['seed']}"


def cmd_run(args) -> int:
    out = Path(args.out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    for mode in args.modes:
        if mode not in ALL_MODES:
            raise SystemExit(f"unknown mode '{mode}'; choose from {', '.join(ALL_MODES)}")
    pending = [j for j in job_list(args)
               if not (out / "results" / f"{job_name(j)}.json").exists()]  # resumable
    deadline = time.time() + args.total_seconds if args.total_seconds else math.inf
    data_pickle = out / "data.pkl"
    if pending and not data_pickle.exists():
        t0 = time.time()
        data = {"pool": load_split(args.train), "val": load_split(args.val),
                "test": load_split(args.test)}
        tmp = out / ".data.pkl.tmp"
        with open(tmp, "wb") as fh:
            pickle.dump(data, fh, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(data_pickle)
        print(f"read {len(data['pool'])} pool, {len(data['val'])} val, {len(data['test'])} test "
              f"frames in {time.time() - t0:.0f} s", flush=True)
    running: List = []
    print(f"{len(pending)} runs, {args.parallel} at a time, {args.run_seconds:.0f} s each", flush=True)
    while pending or running:
        running = [(p, j, t) for p, j, t in running if p.poll() is None]
        # a run still going past its budget plus a grace period is stopped (evaluation hung)
        for p, j, t in running:
            if time.time() - t > args.run_seconds + args.grace_seconds:
                p.send_signal(signal.SIGTERM)
        while pending and len(running) < args.parallel:
            left = deadline - time.time()
            if left < args.min_run_seconds + args.grace_seconds:
                print(f"total budget reached; {len(pending)} runs not started", flush=True)
                pending = []
                break
            job = pending.pop(0)
            name = job_name(job)
            budget = min(args.run_seconds, left - args.grace_seconds)
            cmd = [sys.executable, __file__, "worker", "--data-pickle", str(data_pickle),
                   "--size", str(job["size"]), "--mode", job["mode"],
                   "--seed", str(job["seed"]), "--variant", job["variant"],
                   "--run-seconds", str(budget),
                   "--result", str(out / "results" / f"{name}.json"),
                   "--run-dir", str(out / "runs" / name), *args.worker_args]
            log = open(out / "logs" / f"{name}.log", "w")
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                            job, time.time()))
            print(f"started {name} (budget {budget:.0f} s)", flush=True)
        time.sleep(2.0)
    print("all runs ended", flush=True)
    return cmd_collect(args)


# ----------------------------------------------------------------------------- collect
def read_rows(out: Path) -> List[Dict]:
    rows = []
    for path in sorted((out / "results").glob("*.json")):
        try:
            rows.append(json.loads(path.read_text()))
        except json.JSONDecodeError:
            pass  # a run writing right now (writes are atomic, so this is rare)
    return rows


def summarise(rows: List[Dict]) -> Dict:
    """Mean and spread over seeds for each (size, mode), and the issue's two goals."""
    cells: Dict = {}
    for r in rows:
        if r.get("status") == "done":
            cells.setdefault((r["train_frames"], cell_mode(r)), []).append(r)
    table = []
    for (size, mode), rs in sorted(cells.items()):
        def stat(key):
            v = np.array([r[key] for r in rs], dtype=float)
            return float(np.mean(v)), float(np.std(v))
        table.append({"train_frames": size, "mode": mode, "seeds": len(rs),
                      **{f"{k}_mean": stat(k)[0] for k in (
                          "energy_mae_mev_per_atom", "force_mae_mev_per_A", "eq_energy_mev_per_atom",
                          "eq_force_relative", "steps", "train_seconds", "train_atoms_per_s")},
                      "force_mae_std": stat("force_mae_mev_per_A")[1],
                      "stop_reasons": sorted({r["stop_reason"] for r in rs})})
    by = {(t["train_frames"], t["mode"]): t for t in table}
    goals = {"learned_vs_augment": [], "best_transip_vs_mace": []}
    for size in sorted({t["train_frames"] for t in table}):
        aug = by.get((size, "augment"))
        for mode in ("learned-mse", "learned-contrastive"):
            if aug and (size, mode) in by:
                change = by[(size, mode)]["force_mae_mev_per_A_mean"] / aug["force_mae_mev_per_A_mean"] - 1
                goals["learned_vs_augment"].append({
                    "train_frames": size, "mode": mode, "force_mae_change": change,
                    "goal_met": bool(change <= -0.40) if size <= 1000 else None})
        transip = [t for t in table if t["train_frames"] == size and t["mode"] != "mace"]
        if transip and (size, "mace") in by:
            best = min(transip, key=lambda t: t["force_mae_mev_per_A_mean"])
            ratio = best["force_mae_mev_per_A_mean"] / by[(size, "mace")]["force_mae_mev_per_A_mean"]
            goals["best_transip_vs_mace"].append({"train_frames": size, "best_mode": best["mode"],
                                                  "force_mae_ratio": ratio,
                                                  "goal_met": bool(ratio <= 1.10)})
    return {"table": table, "goals": goals}


def print_table(summary: Dict, rows: List[Dict]) -> None:
    header = (f"{'frames':>7} {'mode':>20} {'seeds':>5} {'E MAE meV/at':>12} {'F MAE meV/Å':>14} "
              f"{'eq |dE| meV/at':>14} {'eq |dF|/|F|':>11} {'steps':>7} {'wall s':>7} {'atoms/s':>8}")
    print("\n" + header)
    for t in summary["table"]:
        print(f"{t['train_frames']:>7} {t['mode']:>20} {t['seeds']:>5} "
              f"{t['energy_mae_mev_per_atom_mean']:>12.2f} "
              f"{t['force_mae_mev_per_A_mean']:>8.1f} ±{t['force_mae_std']:<5.1f} "
              f"{t['eq_energy_mev_per_atom_mean']:>14.3f} {t['eq_force_relative_mean']:>11.4f} "
              f"{t['steps_mean']:>7.0f} {t['train_seconds_mean']:>7.0f} "
              f"{t['train_atoms_per_s_mean']:>8.0f}")
    for g in summary["goals"]["learned_vs_augment"]:
        met = {True: "goal met", False: "goal missed", None: "(goal is for <= 1,000)"}[g["goal_met"]]
        print(f"  {g['train_frames']:>6} frames: {g['mode']} vs augment force MAE "
              f"{100 * g['force_mae_change']:+.1f} % {met} (goal <= -40 %)")
    for g in summary["goals"]["best_transip_vs_mace"]:
        print(f"  {g['train_frames']:>6} frames: best TransIP ({g['best_mode']}) / MACE force MAE "
              f"= {g['force_mae_ratio']:.2f} ({'goal met' if g['goal_met'] else 'goal missed'}; <= 1.10)")
    failed = [r for r in rows if r.get("status") == "failed"]
    for r in failed:
        print(f"  FAILED {cell_mode(r)} n={r['train_frames']} seed={r['seed']}: {r['error']}")


def plot(summary: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode in dict.fromkeys(t["mode"] for t in summary["table"]):  # variants too, in order
        ts = [t for t in summary["table"] if t["mode"] == mode]
        if not ts:
            continue
        x = [t["train_frames"] for t in ts]
        axes[0].errorbar(x, [t["force_mae_mev_per_A_mean"] for t in ts],
                         yerr=[t["force_mae_std"] for t in ts], marker="o", capsize=3, label=mode)
        axes[1].plot(x, [t["energy_mae_mev_per_atom_mean"] for t in ts], "o-", label=mode)
    axes[0].set_ylabel("test force MAE (meV/Å)")
    axes[1].set_ylabel("test energy MAE (meV/atom)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training frames")
    axes[0].legend(fontsize=8)
    fig.suptitle("TransIP equivariance modes vs MACE (same data, same wall budget)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def cmd_collect(args) -> int:
    rows = read_rows(Path(args.out))
    summary = summarise(rows)
    print_table(summary, rows)
    if args.json:
        json_path = Path(args.json)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(json_path, {"rows": rows, **summary,
                                      "args": {k: v for k, v in vars(args).items() if k != "func"}})
        if summary["table"]:
            plot(summary, json_path.with_suffix(".png"))
        print(f"wrote {json_path} and {json_path.with_suffix('.png')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def data_args(q, required=True):
        q.add_argument("--train", nargs="+", required=required, help="training pool file(s)")
        q.add_argument("--val", nargs="+", required=required)
        q.add_argument("--test", nargs="+", required=required)

    def train_args(q):
        q.add_argument("--config", default="transip-xs")
        q.add_argument("--batch-atoms", type=int, default=1024)
        q.add_argument("--lr", type=float, default=None, help="TransIP learning rate (default: config's)")
        q.add_argument("--max-steps", type=int, default=20000,
                       help="step cap (and, with --schedule steps, the length of TransIP's cosine schedule)")
        q.add_argument("--val-interval-steps", type=int, default=200)
        q.add_argument("--patience", type=int, default=8, help="validations without improvement")
        q.add_argument("--schedule", choices=("time", "steps"), default="time",
                       help="TransIP's cosine learning-rate schedule spans the run's time budget "
                            "(time) or --max-steps (steps; a run stopped by time ends unannealed)")
        q.add_argument("--max-val", type=int, default=300)
        q.add_argument("--max-test", type=int, default=1000)
        q.add_argument("--mace-batch", type=int, default=32, help="MACE frames per batch")
        q.add_argument("--mace-lr", type=float, default=0.01)
        # default 0: measured 2026-12-02 (1,000 frames, 270 s) 0.2 brought MACE's energy MAE from
        # ~250 to 9.4 meV/atom but its force MAE from ~40 to 75.8 meV/A; the study compares forces
        q.add_argument("--mace-swa-fraction", type=float, default=0.0,
                       help="last fraction of MACE's budget with energy weight 1000 (0: none)")
        q.add_argument("--mace-swa-lr", type=float, default=1e-3)
        q.add_argument("--device", default="auto")

    run = sub.add_parser("run", help="run the study: parallel worker processes, then collect")
    data_args(run)
    run.add_argument("--sizes", type=int, nargs="+", default=[250, 1000, 4000, 16000])
    run.add_argument("--modes", nargs="+", default=list(ALL_MODES))
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    run.add_argument("--variants", nargs="+", default=["base"],
                     help="TransIP variants, each 'label' or 'label:key=value,...' (ModelConfig "
                          "or TrainConfig overrides, e.g. filter:edge_filter=true "
                          "w128:width=128,heads=8 b4k:batch_atoms=4096,lr=0.002); every TransIP "
                          "mode runs with each")
    run.add_argument("--run-seconds", type=float, default=240.0, help="wall budget of each run")
    run.add_argument("--total-seconds", type=float, default=None,
                     help="no run starts unless it can have --min-run-seconds before this")
    run.add_argument("--min-run-seconds", type=float, default=60.0)
    run.add_argument("--grace-seconds", type=float, default=90.0,
                     help="evaluation time allowed after a run's budget")
    run.add_argument("--parallel", type=int, default=16)
    run.add_argument("--out", default="runs/equivariance_study")
    run.add_argument("--json", default=None)
    run.add_argument("--worker-args", nargs=argparse.REMAINDER, default=[],
                     help="passed to every worker (e.g. --worker-args --config transip-xs)")
    run.set_defaults(func=cmd_run)

    worker = sub.add_parser("worker", help="one run (started by `run`)")
    data_args(worker, required=False)
    worker.add_argument("--data-pickle", help="pool/val/test frames pickled by `run`")
    train_args(worker)
    worker.add_argument("--size", type=int, required=True)
    worker.add_argument("--mode", choices=ALL_MODES, required=True)
    worker.add_argument("--seed", type=int, default=0)
    worker.add_argument("--variant", default="base", help="architecture variant (see run)")
    worker.add_argument("--run-seconds", type=float, required=True)
    worker.add_argument("--result", required=True)
    worker.add_argument("--run-dir", required=True)
    worker.set_defaults(func=cmd_worker)

    collect = sub.add_parser("collect", help="summarise the finished runs")
    collect.add_argument("--out", default="runs/equivariance_study")
    collect.add_argument("--json", default=None)
    collect.set_defaults(func=cmd_collect)
    return p


def main() -> int:
    args = build_parser().parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
