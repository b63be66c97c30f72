"""The training loop: energy + force losses, optional learned-equivariance loss, AdamW + warmup/cosine
schedule, EMA, per-epoch validation, best checkpoint, resume and a learning curve."""

import copy
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import atomic_torch_save, load_checkpoint, save_checkpoint
from ..data.frames import Frame
from ..data.splits import batches_by_atoms
from ..metrics import accuracy, equivariance_error
from ..model.config import MAX_ATOMIC_NUMBER, ModelConfig
from ..model.equivariance import ContrastiveEquivariance, EquivarianceNetwork
from ..model.potential import TransIPPotential
from ..batch import collate, fit_element_energies, force_rms, make_rotations, predict, rotate_batch
from .config import LEARNED_MODES, TrainConfig

CHECKPOINT_NAME = "ckpt.pt"
RESUME_NAME = "last.pt"


def selection_score(record: Dict[str, float]) -> float:
    """The model-selection score of a validation record (lower is better): energy MAE in meV/atom
    plus force MAE in meV/Å. ckpt.pt holds the first record with the lowest score."""
    return record["val_energy_mae_mev_per_atom"] + record["val_force_mae_mev_per_A"]


def best_record(history: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """The history entry whose model is in ckpt.pt (first minimum, as the trainer keeps it)."""
    if not history:
        raise ValueError("no validation records yet")
    return min(history, key=selection_score)


LOG_HEADER = (f"{'epoch':>5} {'step':>7} {'train loss':>10} {'E MAE meV/atom':>14} "
              f"{'F MAE meV/Å':>11} {'lr':>8} {'time':>7}")


def format_record(record: Dict[str, float], is_best: bool) -> str:
    """One console row per validation; ``*`` marks a new best (the model saved to ckpt.pt)."""
    return (f"{record['epoch']:>5} {record['step']:>7} {record.get('train_total', math.nan):>10.4g} "
            f"{record['val_energy_mae_mev_per_atom']:>14.3f} {record['val_force_mae_mev_per_A']:>11.2f} "
            f"{record['lr']:>8.2e} {record['elapsed_s']:>6.0f}s" + (" *" if is_best else ""))


def format_summary(history: Sequence[Dict[str, float]]) -> str:
    """The closing lines: the best epoch (the model in ckpt.pt) and the last one."""
    best, last = best_record(history), history[-1]
    return (f"best epoch {best['epoch']}: energy MAE {best['val_energy_mae_mev_per_atom']:.3f} meV/atom, "
            f"force MAE {best['val_force_mae_mev_per_A']:.2f} meV/Å (score {selection_score(best):.2f}); "
            f"{CHECKPOINT_NAME} holds epoch {best['epoch']}\n"
            f"last epoch {last['epoch']}: energy MAE {last['val_energy_mae_mev_per_atom']:.3f} meV/atom, "
            f"force MAE {last['val_force_mae_mev_per_A']:.2f} meV/Å (score {selection_score(last):.2f})")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but CUDA is not available")
    return torch.device(name)


def initialise_potential(cfg: ModelConfig, frames: Sequence[Frame], dtype: torch.dtype) -> TransIPPotential:
    """A fresh potential with element references and scale fitted to the training frames."""
    potential = TransIPPotential(cfg).to(dtype)
    elements = sorted({int(z) for f in frames for z in f.numbers})
    for z in elements:
        if not 1 <= z <= MAX_ATOMIC_NUMBER:
            raise ValueError(f"training data contains atomic number {z}, outside 1..{MAX_ATOMIC_NUMBER}")
    potential.supported_elements[elements] = True
    refs = fit_element_energies(frames, MAX_ATOMIC_NUMBER)
    potential.network.element_energy.copy_(torch.as_tensor(refs, dtype=dtype))
    potential.network.energy_scale.fill_(force_rms(frames))
    return potential


class Trainer:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, train: Sequence[Frame],
                 val: Sequence[Frame], out_dir: Path, progress: bool = True,
                 provenance: Optional[Dict[str, Any]] = None,
                 log: Optional[Callable[[str], None]] = None):
        """``log`` receives the per-validation rows and the closing summary (default: printed
        above the progress bar); pass ``lambda line: None`` for silence."""
        if not train:
            raise ValueError("the training set is empty")
        if not val:
            raise ValueError("the validation set is empty")
        self.model_cfg, self.cfg = model_cfg, cfg
        self.train_frames, self.val_frames = list(train), list(val)
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.log = log if log is not None else tqdm.write
        self.provenance = provenance or {}
        self.device = pick_device(cfg.device)
        self.dtype = getattr(torch, cfg.dtype)
        torch.manual_seed(cfg.seed)
        self.potential = initialise_potential(model_cfg, self.train_frames, self.dtype).to(self.device)
        # Data were validated when read; skipping per-call checks avoids host syncs per step.
        self.potential.check_inputs = False
        # Per-atom map g (learned / learned-mse, and the optional MSE term of the contrastive
        # mode) and the paper's pooled map T (learned-contrastive); training-time only.
        mse = cfg.mode in ("learned", "learned-mse") or (
            cfg.mode == "learned-contrastive" and cfg.contrastive_mse_weight > 0)
        self.eqnet = EquivarianceNetwork(model_cfg).to(self.device, self.dtype) if mse else None
        self.contrast = (ContrastiveEquivariance(model_cfg, cfg.contrastive_temperature)
                         .to(self.device, self.dtype) if cfg.mode == "learned-contrastive" else None)
        params = list(self.potential.parameters())
        for extra in (self.eqnet, self.contrast):
            if extra is not None:
                params += list(extra.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = max(1, sum(1 for _ in batches_by_atoms(self.train_frames, cfg.batch_atoms, False, 0)))
        total = steps_per_epoch * cfg.epochs
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        self.run_start: Optional[float] = None  # time.time() at run()'s start (schedule_by_time)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.ema = copy.deepcopy(self.potential) if cfg.ema_decay else None
        self.rng = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0
        self.epoch = 0
        self.best_score = math.inf
        self.history: List[Dict[str, float]] = []
        self.last_val_step = 0
        self.stale_validations = 0  # validations since the last best (early stopping)
        self.stop_reason = ""
        self.train_atoms = 0  # atoms seen by optimiser steps (both views count once)
        self.train_step_seconds = 0.0  # wall time in the step loop, validation excluded

    # ---------------------------------------------------------------- schedule and EMA
    def _lr_factor(self, step: int) -> float:
        warm = max(1, self.cfg.warmup_steps)
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, self.total_steps - warm))
        if self.cfg.schedule_by_time and self.run_start is not None:
            progress = max(progress, min(1.0, (time.time() - self.run_start) / max(self.cfg.max_seconds, 1e-9)))
        return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * progress))

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        d = self.cfg.ema_decay
        for pe, p in zip(self.ema.parameters(), self.potential.parameters()):
            pe.mul_(d).add_(p, alpha=1.0 - d)

    def eval_model(self) -> TransIPPotential:
        return self.ema if self.ema is not None else self.potential

    # ---------------------------------------------------------------- losses
    def _losses(self, batch) -> Dict[str, torch.Tensor]:
        scale = self.potential.network.energy_scale
        cfg = self.cfg

        def data_loss(b, energy, forces):
            # Masked means with torch.where, not boolean indexing or .any(): those copy a
            # number to the host and stall the GPU's queue once per call.
            e_mask = torch.isfinite(b.energy)
            f_mask = torch.isfinite(b.forces).all(1, keepdim=True).expand_as(b.forces)
            de = torch.where(e_mask, (energy - b.energy) / b.n_atoms / scale, torch.zeros_like(energy))
            df = torch.where(f_mask, (forces - b.forces) / scale, torch.zeros_like(forces))
            e = de.pow(2).sum() / e_mask.sum().clamp_min(1)
            f = df.pow(2).sum() / f_mask.sum().clamp_min(1)
            return e, f

        if cfg.mode == "augment":
            batch = rotate_batch(batch, make_rotations(batch.n_systems, self.rng, self.dtype, self.device))
        energy, forces, hidden = predict(self.potential, batch, create_graph=True)
        e_loss, f_loss = data_loss(batch, energy, forces)
        out = {"energy": e_loss, "forces": f_loss}
        if cfg.mode in LEARNED_MODES:
            rot = make_rotations(batch.n_systems, self.rng, self.dtype, self.device)
            rbatch = rotate_batch(batch, rot)
            energy_r, forces_r, hidden_r = predict(self.potential, rbatch, create_graph=True)
            e_r, f_r = data_loss(rbatch, energy_r, forces_r)
            out["energy"] = 0.5 * (e_loss + e_r)
            out["forces"] = 0.5 * (f_loss + f_r)
            if self.contrast is not None:
                eq = self.contrast.loss(hidden, hidden_r, rot, batch.system)
                out["contrastive"] = eq
                if self.eqnet is not None:
                    mse = self.eqnet.loss(hidden, hidden_r, rot[batch.system])
                    out["equivariance_mse"] = mse
                    eq = eq + cfg.contrastive_mse_weight * mse
                out["equivariance"] = eq
            else:
                out["equivariance"] = self.eqnet.loss(hidden, hidden_r, rot[batch.system])
        total = cfg.energy_weight * out["energy"] + cfg.force_weight * out["forces"]
        if "equivariance" in out:
            total = total + cfg.equivariance_weight * out["equivariance"]
        out["total"] = total
        return out

    # ---------------------------------------------------------------- loop
    def run(self) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress,
                   desc=f"train[{cfg.mode}]", unit="step")
        # elapsed_s continues across --resume
        start = time.time() - (self.history[-1]["elapsed_s"] if self.history else 0.0)
        self.run_start = start
        self.log(LOG_HEADER)
        self.stop_reason = ""
        while self.epoch < cfg.epochs and self.step < self.total_steps and not self.stop_reason:
            self.potential.train()
            # Running sums stay on the device: one host copy per validation, not per step.
            sums: Dict[str, torch.Tensor] = {}
            count = 0
            t_loop = time.time()
            for frames in batches_by_atoms(self.train_frames, cfg.batch_atoms, True, cfg.seed + self.epoch):
                if self.step >= self.total_steps:
                    break
                if cfg.max_seconds is not None and time.time() - start >= cfg.max_seconds:
                    self.stop_reason = "max_seconds"
                    break
                self.train_atoms += sum(len(f) for f in frames)
                batch = collate(frames, self.dtype, self.device, self.potential.cutoff)
                losses = self._losses(batch)
                self.optimizer.zero_grad(set_to_none=True)
                losses["total"].backward()
                torch.nn.utils.clip_grad_norm_(
                    [p for g in self.optimizer.param_groups for p in g["params"]], cfg.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self._update_ema()
                self.step += 1
                count += 1
                with torch.no_grad():
                    for k, v in losses.items():
                        sums[k] = sums[k] + v.detach() if k in sums else v.detach().clone()
                bar.update(1)
                if self.progress and self.step % cfg.log_interval_steps == 0:
                    bar.set_postfix(loss=f"{float(losses['total'].detach()):.4g}")
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # once per epoch: atoms/s counts queued work
            self.train_step_seconds += time.time() - t_loop
            self.epoch += 1
            if cfg.max_seconds is not None and time.time() - start >= cfg.max_seconds:
                self.stop_reason = self.stop_reason or "max_seconds"
            final = (self.epoch >= cfg.epochs or self.step >= self.total_steps
                     or bool(self.stop_reason))
            due = final or self.step - self.last_val_step >= cfg.val_interval_steps
            if (count and due) or (final and not self.history):
                self._validate_and_save({k: float(v) / count for k, v in sums.items()},
                                        time.time() - start)
                self.last_val_step = self.step
                patience = cfg.early_stopping_patience
                if patience is not None and self.stale_validations >= patience:
                    self.stop_reason = "early_stopping"
        bar.close()
        if not self.stop_reason:
            self.stop_reason = "max_steps" if self.step >= self.total_steps else "epochs"
        self._finalise()
        if self.history:
            self.log(format_summary(self.history))
        return self.out_dir / CHECKPOINT_NAME

    def _validate_and_save(self, train_losses: Dict[str, float], elapsed: float) -> None:
        model = self.eval_model()
        model.eval()
        val = accuracy(model, self.val_frames)
        record = {"epoch": self.epoch, "step": self.step, "elapsed_s": elapsed,
                  "lr": self.scheduler.get_last_lr()[0],
                  "train_atoms_per_s": self.train_atoms / max(self.train_step_seconds, 1e-9),
                  "train_atoms": self.train_atoms, "train_step_seconds": self.train_step_seconds,
                  **{f"train_{k}": v for k, v in train_losses.items()},
                  "val_energy_mae_mev_per_atom": val["energy_mae_mev_per_atom"],
                  "val_force_mae_mev_per_A": val["force_mae_mev_per_A"]}
        self.history.append(record)
        score = selection_score(record)
        is_best = score < self.best_score
        self.stale_validations = 0 if is_best else self.stale_validations + 1
        if is_best:
            self.best_score = score
            save_checkpoint(self.out_dir / CHECKPOINT_NAME, model, self.model_cfg,
                            training=self._training_info(), metrics={"validation": val},
                            equivariance_state=self._equivariance_state())
        self._save_resume_state()
        (self.out_dir / "history.json").write_text(json.dumps(self.history, indent=1))
        self._plot()
        self.log(format_record(record, is_best))

    def _equivariance_state(self) -> Optional[Dict[str, torch.Tensor]]:
        """The training-only networks' weights (g under ``eqnet.``, T under ``contrast.``; the
        MSE mode keeps its historical unprefixed keys)."""
        if self.contrast is None:
            return self.eqnet.state_dict() if self.eqnet is not None else None
        state = {f"contrast.{k}": v for k, v in self.contrast.state_dict().items()}
        if self.eqnet is not None:
            state.update({f"eqnet.{k}": v for k, v in self.eqnet.state_dict().items()})
        return state

    def _training_info(self) -> Dict[str, Any]:
        return {"mode": self.cfg.mode, "steps": self.step, "epochs": self.epoch,
                "stop_reason": self.stop_reason or "running",
                "selection_score": self.best_score, "config": self.cfg.to_dict(),
                "train_frames": len(self.train_frames), "val_frames": len(self.val_frames),
                **self.provenance}

    def _save_resume_state(self) -> None:
        state = {
            "kind": "transip-md-resume", "step": self.step, "epoch": self.epoch,
            "best_score": self.best_score, "history": self.history,
            "model_config": self.model_cfg.to_dict(), "train_config": self.cfg.to_dict(),
            "potential": self.potential.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else {},
            "eqnet": self.eqnet.state_dict() if self.eqnet is not None else {},
            "contrast": self.contrast.state_dict() if self.contrast is not None else {},
            "stale_validations": self.stale_validations, "train_atoms": self.train_atoms,
            "train_step_seconds": self.train_step_seconds,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": self.rng.get_state(),
        }
        atomic_torch_save(state, self.out_dir / RESUME_NAME)

    def resume(self) -> None:
        path = self.out_dir / RESUME_NAME
        if not path.exists():
            raise FileNotFoundError(f"cannot resume: {path} does not exist")
        state = torch.load(path, map_location=self.device, weights_only=True)
        if state.get("kind") != "transip-md-resume":
            raise ValueError(f"{path} is not a transip-md resume state")
        if state["model_config"] != self.model_cfg.to_dict():
            raise ValueError(f"cannot resume from {path}: its model config differs from this run's")
        self.potential.load_state_dict(state["potential"])
        if self.ema is not None and state["ema"]:
            self.ema.load_state_dict(state["ema"])
        if self.eqnet is not None and state["eqnet"]:
            self.eqnet.load_state_dict(state["eqnet"])
        if self.contrast is not None and state.get("contrast"):
            self.contrast.load_state_dict(state["contrast"])
        self.stale_validations = state.get("stale_validations", 0)
        self.train_atoms = state.get("train_atoms", 0)
        self.train_step_seconds = state.get("train_step_seconds", 0.0)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.rng.set_state(state["rng"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.best_score, self.history = state["best_score"], state["history"]

    def _finalise(self) -> None:
        """Measure the equivariance error of the best model and store it in the checkpoint."""
        path = self.out_dir / CHECKPOINT_NAME
        ckpt = load_checkpoint(path, map_location=str(self.device))
        model = ckpt.potential.to(self.device)
        eq = equivariance_error(model, self.val_frames, n_rotations=self.cfg.eval_rotations,
                                seed=self.cfg.seed)
        metrics = dict(ckpt.metrics)
        metrics["equivariance_error"] = eq
        training = dict(ckpt.training, stop_reason=self.stop_reason)
        save_checkpoint(path, model, ckpt.config, training=training, metrics=metrics,
                        equivariance_state=ckpt.equivariance_state)

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in self.history]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        axes[0].plot(epochs, [r["val_energy_mae_mev_per_atom"] for r in self.history], "o-")
        axes[0].set_ylabel("val energy MAE (meV/atom)")
        axes[1].plot(epochs, [r["val_force_mae_mev_per_A"] for r in self.history], "o-")
        axes[1].set_ylabel("val force MAE (meV/Å)")
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.set_yscale("log")
        fig.suptitle(f"TransIP training ({self.cfg.mode})")
        fig.tight_layout()
        tmp = self.out_dir / ".learning_curve.tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(self.out_dir / "learning_curve.png")


def describe(frames: Sequence[Frame]) -> Dict[str, Any]:
    return {"frames": len(frames), "atoms": int(np.sum([len(f) for f in frames]))}
