"""Time the phases of one training step (collate, forward+forces, backward) on a device, and
the trainer's own step loop in atoms/s (the issue #17 target: TransIP-S >= 50,000 atoms/s).

  python benchmarks/profile_training_step.py --data data/organics/val.extxyz --device cuda \
      --size s --batch-atoms 4096 --trainer-steps 60 --json benchmarks/results/train_speed.json

``--trainer-steps`` runs transip_md.train.Trainer itself (mode learned, EMA, AdamW, clipping:
everything a real step does) and reports its measured atoms/s; the phase timing below it uses
explicit synchronisation and so understates what the unsynchronised trainer reaches.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from transip_md.batch import collate, make_rotations, predict, rotate_batch
from transip_md.data import read_frames
from transip_md.data.splits import batches_by_atoms
from transip_md.model import named_config
from transip_md.model.equivariance import EquivarianceNetwork
from transip_md.train.trainer import initialise_potential


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--size", default="xs")
    p.add_argument("--batch-atoms", type=int, default=2048)
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--profile", action="store_true", help="print the torch profiler's top ops")
    p.add_argument("--trainer-steps", type=int, default=0,
                   help="also time this many steps of the real trainer (atoms/s)")
    p.add_argument("--mode", default="learned", help="training mode for --trainer-steps")
    p.add_argument("--json", help="write the measured numbers here")
    args = p.parse_args()
    dev = torch.device(args.device)
    frames = [f for path in args.data for f in read_frames(path)]
    cfg = named_config(args.size)
    pot = initialise_potential(cfg, frames, torch.float32).to(dev)
    pot.check_inputs = False
    eq = EquivarianceNetwork(cfg).to(dev)
    gen = torch.Generator().manual_seed(0)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)  # noqa: E731
    batches = list(batches_by_atoms(frames, args.batch_atoms, True, 0))[: args.steps + 2]
    t0 = time.perf_counter()
    for b in batches:
        collate(b, torch.float32, dev, pot.cutoff)  # fills the pair cache
    print(f"pair cache for {sum(len(b) for b in batches)} frames: {time.perf_counter() - t0:.2f} s")
    times = {"collate": 0.0, "forward+forces x2": 0.0, "backward": 0.0}
    for k, frames_b in enumerate(batches):
        sync(); t0 = time.perf_counter()
        batch = collate(frames_b, torch.float32, dev, pot.cutoff)
        sync(); t1 = time.perf_counter()
        e, f, h = predict(pot, batch, create_graph=True)
        rot = make_rotations(batch.n_systems, gen, torch.float32, dev)
        rb = rotate_batch(batch, rot)
        e2, f2, h2 = predict(pot, rb, create_graph=True)
        loss = (e - batch.energy).pow(2).mean() + (f - batch.forces).pow(2).mean() + (e2 - rb.energy).pow(2).mean() + (f2 - rb.forces).pow(2).mean() + eq.loss(h, h2, rot[batch.system])
        sync(); t2 = time.perf_counter()
        loss.backward()
        sync(); t3 = time.perf_counter()
        if k >= 2:
            times["collate"] += t1 - t0
            times["forward+forces x2"] += t2 - t1
            times["backward"] += t3 - t2

    if args.profile:
        with torch.profiler.profile() as prof:
            batch = collate(batches[0], torch.float32, dev, pot.cutoff)
            e, f, h = predict(pot, batch, create_graph=True)
            (e.sum() + f.pow(2).sum()).backward()
            sync()
        sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        if dev.type == "cuda":
            print(prof.key_averages().table(sort_by=sort, row_limit=12))
    n = len(batches) - 2
    print(f"atoms/batch ~{args.batch_atoms}, pairs last batch {batch.pair_i.numel()}, atoms {batch.positions.shape[0]}")
    for k, v in times.items():
        print(f"{k:>20}: {1000 * v / n:8.1f} ms/step")
    if dev.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    result = {"size": args.size, "batch_atoms": args.batch_atoms, "device": str(dev),
              "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "",
              "phase_ms_per_step": {k: 1000 * v / n for k, v in times.items()}}
    if args.trainer_steps:
        result["trainer"] = trainer_speed(args, frames, dev)
        print(f"trainer ({args.mode}, {args.trainer_steps} steps): "
              f"{result['trainer']['atoms_per_s']:.0f} atoms/s, {result['trainer']['steps_per_s']:.2f} steps/s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


def trainer_speed(args, frames, dev) -> dict:
    """atoms/s of the real trainer: one epoch of warm-up steps, then ``--trainer-steps`` timed
    (the trainer synchronises once per epoch, so the timed epoch includes all queued work)."""
    from transip_md.train import TrainConfig, Trainer

    cfg = TrainConfig(mode=args.mode, epochs=2, batch_atoms=args.batch_atoms, device=str(dev),
                      warmup_steps=10, ema_decay=0.999, seed=0)
    # two "epochs" over a frame list sized to the step count: the first warms up (allocator,
    # pair cache, cuBLAS handles), the second is timed from the trainer's own counters.
    per_step = max(1, args.batch_atoms // max(1, round(sum(len(f) for f in frames) / len(frames))))
    subset = (frames * (1 + args.trainer_steps * per_step // len(frames)))[: args.trainer_steps * per_step]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(named_config(args.size), cfg, subset, frames[:64], Path(tmp),
                          progress=False, log=lambda line: None)
        trainer.run()
    first, second = trainer.history[0], trainer.history[-1]
    atoms = second["train_atoms"] - first["train_atoms"]
    seconds = second["train_step_seconds"] - first["train_step_seconds"]
    steps = second["step"] - first["step"]
    return {"atoms_per_s": atoms / max(seconds, 1e-9), "steps_per_s": steps / max(seconds, 1e-9),
            "timed_steps": steps, "timed_atoms": atoms, "mode": args.mode,
            "note": "second epoch only (the first warms up); the trainer syncs once per epoch"}


if __name__ == "__main__":
    main()
