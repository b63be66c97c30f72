"""The table of a demo retraining (benchmarks/demo_retrain.sh): per candidate the best validation
score (the selection: energy MAE meV/atom + force MAE meV/Å, as the trainer picks ckpt.pt), steps,
training atoms/s, and the test force MAE per source (g2, ion, water clusters, water boxes, all
organics). Prints it and writes the same rows as JSON.

  python benchmarks/demo_retrain_table.py RUN_DIR --json OUT.json NAME [NAME ...]

RUN_DIR holds runs/NAME/{history.json,config.yaml} and eval_NAME_{organics,water}_test.json.
"""

import argparse
import json
import sys
from pathlib import Path

from transip_md.atomic_io import atomic_output


def row(run_dir: Path, name: str) -> dict:
    hist = json.loads((run_dir / "runs" / name / "history.json").read_text())
    best = min(hist, key=lambda r: r["val_energy_mae_mev_per_atom"] + r["val_force_mae_mev_per_A"])
    org = json.loads((run_dir / f"eval_{name}_organics_test.json").read_text())
    wat = json.loads((run_dir / f"eval_{name}_water_test.json").read_text())
    per = org["per_source"]
    clusters = [r for key, r in per.items() if key.startswith("water")]
    frames = sum(r["frames"] for r in clusters)
    config = run_dir / "runs" / name / "config.yaml"
    return {
        "name": name,
        "config": config.read_text() if config.exists() else None,
        "val_energy_mae_mev_per_atom": best["val_energy_mae_mev_per_atom"],
        "val_force_mae_mev_per_A": best["val_force_mae_mev_per_A"],
        "steps": hist[-1]["step"], "train_atoms_per_s": hist[-1]["train_atoms_per_s"],
        "test_force_mae_mev_per_A": {
            "g2": per["g2"]["force_mae_mev_per_A"], "ion": per["ion"]["force_mae_mev_per_A"],
            "water_clusters": sum(r["force_mae_mev_per_A"] * r["frames"] for r in clusters) / max(frames, 1),
            "water_boxes": wat["force_mae_mev_per_A"], "organics_all": org["force_mae_mev_per_A"]},
        "test_energy_mae_mev_per_atom": {"organics_all": org["energy_mae_mev_per_atom"],
                                         "water_boxes": wat["energy_mae_mev_per_atom"]},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("names", nargs="+")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    rows = []
    print(f"{'run':<14} {'val E':>7} {'val F':>7} {'steps':>6} {'atoms/s':>8} | test F (meV/Å): "
          f"{'g2':>6} {'ion':>6} {'wclust':>6} {'wbox':>6} {'ALL':>6}")
    for name in args.names:
        try:
            r = row(args.run_dir, name)
        except (OSError, ValueError, KeyError) as exc:
            print(f"{name:<14} missing: {exc}")
            continue
        rows.append(r)
        t = r["test_force_mae_mev_per_A"]
        print(f"{name:<14} {r['val_energy_mae_mev_per_atom']:7.2f} {r['val_force_mae_mev_per_A']:7.2f} "
              f"{r['steps']:6d} {r['train_atoms_per_s']:8.0f} | {t['g2']:22.2f} {t['ion']:6.2f} "
              f"{t['water_clusters']:6.2f} {t['water_boxes']:6.2f} {t['organics_all']:6.2f}")
    if args.json:
        with atomic_output(args.json) as tmp:
            Path(tmp).write_text(json.dumps({"runs": rows}, indent=1))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
