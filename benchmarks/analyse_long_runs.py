"""Analysis of the long GPU runs of issue #18: NVE energy drift with a block-average uncertainty,
soak flatness (steps/s, GPU memory, temperature), one table, one JSON, one PNG.

  python benchmarks/analyse_long_runs.py /tmp/longruns --json OUT/long_runs.json --png OUT/long_runs.png

Reads every ``*/nve_drift.json`` (written by ``benchmarks/nve_drift.py``, complete or partial) and
every ``*/soak.json`` (``benchmarks/soak.py``) below the directory.

Drift. E_total(t) of the NVE part is cut into K consecutive blocks of equal length (default
max(0.5 ps, run/20)); the block means are fitted by a straight line and the slope's standard
error comes from the scatter of the block means about that line (K - 2 degrees of freedom).
Averaging within a block removes the fast Verlet oscillation of E_total, and blocks longer than
the noise's correlation time make the block means nearly independent, so the error is honest
where the per-sample least-squares error (also reported, ``naive``) is far too small for
correlated noise. With fewer than 4 blocks no uncertainty is given. Goal per dtype (|drift|,
eV/atom/ps): float64 1e-6, float32 1e-4; ``met`` means |drift| <= goal, ``met_2sigma`` means
|drift| + 2 sigma <= goal (the goal is met whatever the fit's noise).

Soak. Per 10,000-step block: steps/s, GPU memory and the block-mean temperature. Goals: no NaN
and no crash; steps/s and memory within 5 % first block to last; every block's mean temperature
within 2 % of the target.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

GOALS = {"float64": 1e-6, "float32": 1e-4}  # |drift| eV/atom/ps
FLAT_TOLERANCE = 0.05  # soak: steps/s and memory, last block vs first
TEMPERATURE_TOLERANCE = 0.02  # soak: block-mean temperature vs target
MIN_BLOCKS = 4
#: The issue's lengths: NVE >= 20 ps (50 ps where speed allows), soak steps per engine.
NVE_MIN_PS = 20.0
SOAK_MIN_STEPS = {"openmm": 200_000, "lammps": 40_000}


def block_drift(times_ps: Sequence[float], energies_ev: Sequence[float], n_atoms: int,
                block_ps: Optional[float] = None) -> Dict[str, float]:
    """Drift (eV/atom/ps) of E_total(t) from a line through block means, with its standard error.

    Returns ``drift``, ``sigma`` (NaN with fewer than MIN_BLOCKS blocks), ``n_blocks``,
    ``block_ps``, ``naive_sigma`` (per-sample OLS error, which ignores correlation) and
    ``fluctuation`` (std of E_total about the per-sample fit, eV/atom)."""
    t = np.asarray(times_ps, dtype=np.float64)
    e = np.asarray(energies_ev, dtype=np.float64) / float(n_atoms)
    if t.shape != e.shape or t.ndim != 1 or len(t) < 3:
        raise ValueError(f"need >= 3 matching samples of time and energy, got {t.shape} and {e.shape}")
    if not np.all(np.isfinite(e)):
        raise ValueError(f"non-finite total energy at sample {int(np.argmin(np.isfinite(e)))}")
    span = float(t[-1] - t[0])
    if span <= 0:
        raise ValueError("times must increase")
    slope, icpt = np.polyfit(t, e, 1)
    resid = e - (slope * t + icpt)
    dt_c = t - t.mean()
    naive = math.sqrt(float(resid @ resid) / max(len(t) - 2, 1) / float(dt_c @ dt_c))
    if block_ps is None:
        block_ps = max(0.5, span / 20.0)
    n_blocks = int(span // block_ps + 1e-9)
    out = {"fluctuation": float(resid.std()), "naive_sigma": naive, "block_ps": float(block_ps),
           "n_blocks": n_blocks, "drift": float(slope), "sigma": float("nan")}
    if n_blocks < 2:
        return out  # too short to block: the per-sample slope only
    index = np.floor((t - t[0]) / block_ps + 1e-9).astype(int)
    keep = index < n_blocks
    counts = np.bincount(index[keep], minlength=n_blocks)
    if np.any(counts == 0):
        raise ValueError(f"a {block_ps:g} ps block holds no sample; sample more often")
    tb = np.bincount(index[keep], weights=t[keep], minlength=n_blocks) / counts
    eb = np.bincount(index[keep], weights=e[keep], minlength=n_blocks) / counts
    b_slope, b_icpt = np.polyfit(tb, eb, 1)
    out["drift"] = float(b_slope)
    if n_blocks >= MIN_BLOCKS:
        r = eb - (b_slope * tb + b_icpt)
        tc = tb - tb.mean()
        out["sigma"] = math.sqrt(float(r @ r) / (n_blocks - 2) / float(tc @ tc))
    return out


def goal_status(drift: float, sigma: float, dtype: str) -> Dict[str, object]:
    goal = GOALS[dtype]
    return {"goal_ev_per_atom_per_ps": goal, "met": bool(abs(drift) <= goal),
            "met_2sigma": bool(math.isfinite(sigma) and abs(drift) + 2 * sigma <= goal)}


# ----------------------------------------------------------------------------- NVE runs
def nve_rows(root: Path) -> List[Dict]:
    rows = []
    for path in sorted(root.glob("*/nve_drift.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            rows.append({"run": path.parent.name, "error": f"unreadable {path}: {exc}"})
            continue
        results = doc.get("results", [])
        for r in results:
            rows.append(nve_row(run_name(path.parent.name, r, len(results)), r))
    return rows


def run_name(folder: str, r: Dict, n_results: int) -> str:
    """The folder (one run per folder, as long_runs.sh makes them), else folder:variant-dtype."""
    return folder if n_results == 1 else f"{folder}:{r.get('variant', r.get('engine'))}-{r.get('dtype')}"


def nve_row(name: str, r: Dict) -> Dict:
    row = {"run": name, "engine": r.get("engine"), "variant": r.get("variant", ""),
           "dtype": r.get("dtype"), "n_atoms": r.get("n_atoms"), "partial": bool(r.get("partial")),
           "stopped_by_budget": bool(r.get("stopped_by_budget")), "ps_target": r.get("ps"),
           "nvt_ps": r.get("nvt_ps")}
    if "error" in r:
        row["error"] = r["error"]
        return row
    t, e = r.get("times_ps", []), r.get("total_energy_ev", [])
    row["ps_reached"] = float(t[-1]) if t else 0.0
    row["steps_per_s"] = (r["steps_done"] / r["seconds"]) if r.get("seconds") else None
    row["mean_temperature_k"] = float(np.mean(r["temperature_k"])) if r.get("temperature_k") else None
    row["reached_issue_length"] = row["ps_reached"] >= NVE_MIN_PS - 1e-9
    if len(t) < 3 or t[-1] <= t[0]:
        row["error"] = f"only {len(t)} NVE samples"
        return row
    try:
        fit = block_drift(t, e, r["n_atoms"])
    except ValueError as exc:
        row["error"] = str(exc)
        return row
    row.update({"drift_ev_per_atom_per_ps": fit["drift"], "sigma_ev_per_atom_per_ps": fit["sigma"],
                "naive_sigma_ev_per_atom_per_ps": fit["naive_sigma"], "n_blocks": fit["n_blocks"],
                "block_ps": fit["block_ps"], "fluctuation_ev_per_atom": fit["fluctuation"]})
    row.update(goal_status(fit["drift"], fit["sigma"], r["dtype"]))
    return row


# ----------------------------------------------------------------------------- soak runs
def soak_rows(root: Path) -> List[Dict]:
    rows = []
    for path in sorted(root.glob("*/soak.json")):
        try:
            rows.append(soak_summary(path.parent.name, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as exc:
            rows.append({"run": path.parent.name, "error": f"unreadable {path}: {exc}"})
    return rows


def _relative_change(first, last) -> Optional[float]:
    if first is None or last is None or not first:
        return None
    return (last - first) / first


def soak_summary(name: str, doc: Dict) -> Dict:
    """Flatness and temperature verdicts from a soak.json's blocks."""
    blocks = doc.get("blocks", [])
    target = float(doc.get("temperature_k", 300.0))
    row = {"run": name, "engine": doc.get("engine"), "variant": doc.get("variant", ""),
           "dtype": doc.get("dtype"), "n_atoms": doc.get("n_atoms"), "steps_target": doc.get("steps"),
           "steps_done": sum(b["steps"] for b in blocks), "n_blocks": len(blocks),
           "finished": bool(doc.get("finished")), "stopped_by_budget": bool(doc.get("stopped_by_budget")),
           "memory_source": doc.get("memory_source"), "error": doc.get("error")}
    # soak.py --partners: untimed steps waiting for the partners' warm-up, and after the last
    # block keeping the GPU load on until they ended (None: no partners)
    row["partner_wait_steps"] = doc.get("partner_wait_steps")
    row["hold_steps"] = (sum(b["steps"] for b in doc["hold_blocks"]) if "hold_blocks" in doc else None)
    row["ps_done"] = row["steps_done"] * float(doc.get("timestep_fs", 0.5)) / 1000.0
    row["reached_issue_length"] = row["steps_done"] >= SOAK_MIN_STEPS.get(row["engine"] or "", 0)
    row["nan"] = any(not math.isfinite(b.get("potential_energy_ev", float("nan"))) for b in blocks)
    if not blocks:
        return row
    first, last = blocks[0], blocks[-1]
    row["steps_per_s_first"], row["steps_per_s_last"] = first["steps_per_s"], last["steps_per_s"]
    row["steps_per_s_change"] = _relative_change(first["steps_per_s"], last["steps_per_s"])
    for key in ("torch_allocated_mb", "torch_reserved_mb", "process_used_mb"):
        a, b = first.get(key), last.get(key)
        row[key + "_first"], row[key + "_last"] = a, b
        row[key + "_change"] = _relative_change(a, b)
    temps = [b["mean_temperature_k"] for b in blocks]
    row["temperature_k_blocks"] = temps
    row["temperature_max_deviation"] = max(abs(x - target) / target for x in temps)
    changes = [row["steps_per_s_change"]] + [row[k + "_change"] for k in
                                             ("torch_allocated_mb", "torch_reserved_mb", "process_used_mb")]
    measured = [c for c in changes if c is not None]
    row["flat"] = bool(len(blocks) >= 2 and measured and all(abs(c) <= FLAT_TOLERANCE for c in measured))
    row["temperature_ok"] = bool(row["temperature_max_deviation"] <= TEMPERATURE_TOLERANCE)
    # Other processes on the GPU (soak.py counts nvidia-smi's compute apps per block): a run that
    # starts or ends beside the soak moves its steps/s without any fault of its own. Where the
    # first and last blocks saw different loads, the steps/s change is also given between the
    # first block and the last block that saw the first block's load.
    loads = [b.get("gpu_processes") for b in blocks]
    row["gpu_processes_first"], row["gpu_processes_last"] = loads[0], loads[-1]
    row["load_changed"] = bool(loads[0] is not None and loads[-1] is not None and loads[0] != loads[-1])
    same = [b for b in blocks if b.get("gpu_processes") == loads[0]] if row["load_changed"] else []
    row["steps_per_s_change_same_load"] = (
        _relative_change(first["steps_per_s"], same[-1]["steps_per_s"]) if len(same) >= 2 else None)
    row["ok"] = bool(row["flat"] and row["temperature_ok"] and not row["nan"] and not row["error"])
    return row


# ----------------------------------------------------------------------------- output
def _f(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def table(nve: List[Dict], soak: List[Dict]) -> str:
    lines = ["NVE drift (block-average fit; sigma = standard error; goal |drift| <= 1e-6 float64, "
             "1e-4 float32 eV/atom/ps)",
             f"{'run':<34} {'atoms':>5} {'ps':>6} {'steps/s':>8} {'drift':>10} {'sigma':>8} "
             f"{'blocks':>6} {'<T> K':>6} {'goal':>12} note"]
    for r in nve:
        if "drift_ev_per_atom_per_ps" not in r:
            lines.append(f"{r['run']:<34} FAILED/NO DATA: {str(r.get('error'))[:90]}")
            continue
        goal = "met (2 sig)" if r["met_2sigma"] else ("met" if r["met"] else "NOT met")
        notes = []
        if not r["reached_issue_length"]:
            notes.append(f"SHORT: {r['ps_reached']:.3g} of >= {NVE_MIN_PS:g} ps")
        if r["stopped_by_budget"]:
            notes.append("stopped at wall budget")
        if r["partial"]:
            notes.append("partial (still running at collect)")
        lines.append(f"{r['run']:<34} {r['n_atoms']:>5} {r['ps_reached']:>6.3g} "
                     f"{_f(r['steps_per_s'], '8.1f')} {r['drift_ev_per_atom_per_ps']:>10.2e} "
                     f"{_f(r['sigma_ev_per_atom_per_ps'], '8.1e')} {r['n_blocks']:>6} "
                     f"{_f(r['mean_temperature_k'], '6.0f')} {goal:>12} {'; '.join(notes)}")
    lines += ["", "Soak (per-block steps/s and GPU memory, last vs first block; block-mean T vs target)",
              f"{'run':<28} {'steps':>8} {'blocks':>6} {'steps/s 1st':>11} {'last':>7} {'chg':>7} "
              f"{'alloc MB':>9} {'chg':>7} {'resv MB':>8} {'chg':>7} {'proc MB':>8} {'chg':>7} "
              f"{'max|dT|':>7} {'verdict':>8} note"]
    for r in soak:
        if not r.get("n_blocks"):
            lines.append(f"{r['run']:<28} NO BLOCK DONE: {str(r.get('error'))[:90]}")
            continue
        notes = []
        if not r["reached_issue_length"]:
            notes.append(f"SHORT: {r['steps_done']} of {SOAK_MIN_STEPS.get(r['engine'], 0)} steps")
        if r["stopped_by_budget"]:
            notes.append("stopped at wall budget")
        if r.get("error"):
            notes.append(f"error: {r['error'][:60]}")
        if r["nan"]:
            notes.append("NaN")
        if r.get("load_changed"):
            notes.append(f"GPU load changed ({r['gpu_processes_first']} -> {r['gpu_processes_last']} "
                         f"processes); steps/s at the first block's load: "
                         f"{_f(r['steps_per_s_change_same_load'], '+.1%')}")
        lines.append(
            f"{r['run']:<28} {r['steps_done']:>8} {r['n_blocks']:>6} {_f(r['steps_per_s_first'], '11.1f')} "
            f"{_f(r['steps_per_s_last'], '7.1f')} {_f(r['steps_per_s_change'], '+7.1%')} "
            f"{_f(r['torch_allocated_mb_last'], '9.1f')} {_f(r['torch_allocated_mb_change'], '+7.1%')} "
            f"{_f(r['torch_reserved_mb_last'], '8.1f')} {_f(r['torch_reserved_mb_change'], '+7.1%')} "
            f"{_f(r['process_used_mb_last'], '8.0f')} {_f(r['process_used_mb_change'], '+7.1%')} "
            f"{_f(r['temperature_max_deviation'], '7.1%')} {'ok' if r['ok'] else 'NOT ok':>8} {'; '.join(notes)}")
    if soak:
        src = sorted({str(r.get("memory_source")) for r in soak})
        lines.append("memory: " + " | ".join(src))
    return "\n".join(lines)


def plot(root: Path, nve: List[Dict], soak: List[Dict], path: Path) -> None:
    """Block means of E_total(t) - E_0 per NVE run (one panel per dtype), soak steps/s and
    memory per block (relative to the first block)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # rows of panels only for what was run: NVE (one panel per dtype), soak (steps/s, memory)
    rows = [kind for kind, present in (("nve", nve), ("soak", soak)) if present] or ["nve"]
    fig, grid = plt.subplots(len(rows), 2, figsize=(13, 4.5 * len(rows)), squeeze=False)
    axes = {kind: grid[i] for i, kind in enumerate(rows)}
    series = {}
    for p in sorted(root.glob("*/nve_drift.json")):
        try:
            results = json.loads(p.read_text()).get("results", [])
            for r in results:
                if len(r.get("times_ps", [])) >= 3:
                    series[run_name(p.parent.name, r, len(results))] = r
        except (OSError, json.JSONDecodeError):
            pass
    for ax, dtype in zip(axes.get("nve", ()), ("float64", "float32")):
        for i, row in enumerate(r for r in nve if r.get("dtype") == dtype and "drift_ev_per_atom_per_ps" in r):
            r = series.get(row["run"])
            if r is None:
                continue
            t = np.asarray(r["times_ps"])
            e = (np.asarray(r["total_energy_ev"]) - r["total_energy_ev"][0]) / r["n_atoms"] * 1e3
            idx = np.floor((t - t[0]) / row["block_ps"]).astype(int)
            n = max(row["n_blocks"], 1)
            k = idx < n
            cnt = np.maximum(np.bincount(idx[k], minlength=n), 1)
            tb = np.bincount(idx[k], weights=t[k], minlength=n) / cnt
            eb = np.bincount(idx[k], weights=e[k], minlength=n) / cnt
            c = f"C{i % 10}"
            ax.plot(t, e, "-", lw=0.2, alpha=0.25, color=c)
            ax.plot(tb, eb, "o-", ms=3, lw=1, color=c,
                    label=f"{row['run']}: {row['drift_ev_per_atom_per_ps']:.1e} "
                          f"+- {_f(row['sigma_ev_per_atom_per_ps'], '.0e')}")
        ax.set_title(f"NVE {dtype}: E_total - E_0 (faint: samples, dots: block means)\n"
                     f"drift eV/atom/ps +- sigma; goal {GOALS[dtype]:.0e}", fontsize=9)
        ax.set_xlabel("NVE time (ps)")
        ax.set_ylabel("meV/atom")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    docs = {}
    for p in sorted(root.glob("*/soak.json")):
        try:
            docs[p.parent.name] = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    if "soak" not in axes:
        docs = {}
    ax_rate, ax_mem = axes.get("soak", (None, None))
    for i, (name, doc) in enumerate(docs.items()):
        blocks = doc.get("blocks", [])
        if not blocks:
            continue
        steps = np.cumsum([b["steps"] for b in blocks])
        rate = np.array([b["steps_per_s"] for b in blocks])
        ax_rate.plot(steps, rate / rate[0], "o-", color=f"C{i}",
                     label=f"{name} ({rate[0]:.0f} steps/s first)")
        for key, style in (("torch_allocated_mb", "o-"), ("torch_reserved_mb", "s--"),
                           ("process_used_mb", "^:")):
            vals = [b.get(key) for b in blocks]
            if all(v for v in vals):
                v = np.array(vals, dtype=float)
                ax_mem.plot(steps, v / v[0], style, color=f"C{i}", label=f"{name} {key} ({v[0]:.0f} MB first)")
    for ax, what in ((ax_rate, "steps/s"), (ax_mem, "GPU memory")) if docs else ():
        ax.axhspan(1 - FLAT_TOLERANCE, 1 + FLAT_TOLERANCE, color="0.9")
        ax.set_title(f"soak: {what} per block / first block (grey: +-5 %)", fontsize=9)
        ax.set_xlabel("steps")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="directory whose sub-folders hold nve_drift.json / soak.json")
    p.add_argument("--json", default=None, help="summary JSON to write")
    p.add_argument("--png", default=None, help="plot to write")
    p.add_argument("--txt", default=None, help="also write the table here")
    args = p.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        p.error(f"{root} is not a directory")
    nve, soak = nve_rows(root), soak_rows(root)
    text = table(nve, soak)
    print(text)
    if args.txt:
        _atomic_write(Path(args.txt), text + "\n")
    if args.json:
        _atomic_write(Path(args.json), json.dumps({"goals_ev_per_atom_per_ps": GOALS,
                                                   "nve_min_ps": NVE_MIN_PS, "soak_min_steps": SOAK_MIN_STEPS,
                                                   "nve": nve, "soak": soak}, indent=1, default=str))
    if args.png:
        plot(root, nve, soak, Path(args.png))
    return 0 if nve or soak else 1


if __name__ == "__main__":
    sys.exit(main())
