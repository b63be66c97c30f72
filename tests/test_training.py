"""Training: learned equivariance measurably beats no rotation handling; CLI verbs; resume."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import emt_frames
from transip_md.checkpoint import load_checkpoint
from transip_md.data import write_frames
from transip_md.metrics import equivariance_error
from transip_md.model import named_config
from transip_md.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def frames():
    return emt_frames(72, seed=0)


def _train(mode, frames, out, steps=60):
    cfg = TrainConfig(mode=mode, epochs=100, max_steps=steps, batch_atoms=96, lr=3e-3,
                      warmup_steps=5, ema_decay=None, dtype="float64", seed=0)
    trainer = Trainer(named_config("tiny"), cfg, frames[:60], frames[60:], out, progress=False)
    return load_checkpoint(trainer.run())


def test_learned_equivariance_beats_no_rotations(frames, tmp_path):
    none = _train("none", frames, tmp_path / "none")
    learned = _train("learned", frames, tmp_path / "learned")
    probe = frames[60:]
    e_none = equivariance_error(none.potential, probe, n_rotations=6, seed=7)
    e_learned = equivariance_error(learned.potential, probe, n_rotations=6, seed=7)
    # stored in the checkpoint by the trainer as well
    assert "equivariance_error" in learned.metrics
    # Measured here: force 0.066 vs 0.089 (-26 %), energy 40 vs 57 meV/atom (-30 %) after 60
    # steps; deterministic for the seed. Require at least a 15 % reduction of both.
    assert e_learned["force_relative"] < 0.85 * e_none["force_relative"], (e_learned, e_none)
    assert e_learned["energy_mev_per_atom"] < 0.85 * e_none["energy_mev_per_atom"], (e_learned, e_none)


def test_train_evaluate_cli_and_resume(frames, tmp_path):
    write_frames(frames[:50], tmp_path / "train.extxyz")
    write_frames(frames[50:], tmp_path / "val.extxyz")
    run = [sys.executable, "-m", "transip_md.train", "--config", "transip-tiny",
           "--train", str(tmp_path / "train.extxyz"), "--val", str(tmp_path / "val.extxyz"),
           "--out", str(tmp_path / "run"), "--epochs", "2", "--no-progress"]
    subprocess.run(run, check=True, capture_output=True, text=True)
    ckpt = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert ckpt.training["mode"] == "learned" and ckpt.training["epochs"] <= 2
    assert (tmp_path / "run" / "learning_curve.png").stat().st_size > 1000
    # resume continues from last.pt up to the new epoch count
    done = subprocess.run(run[:-3] + ["--epochs", "3", "--resume", "--no-progress"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    out = subprocess.run([sys.executable, "-m", "transip_md.evaluate", str(tmp_path / "run" / "ckpt.pt"),
                          str(tmp_path / "val.extxyz"), "--json", str(tmp_path / "test.json"),
                          "--rotations", "2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "test.json").read_text())
    assert result["frames"] == len(frames) - 50
    assert result["force_mae_mev_per_A"] > 0 and "emt" in result["per_source"]
    assert "equivariance_error" in result


def test_element_references_fit_the_training_energies(frames):
    from transip_md.train.trainer import initialise_potential

    pot = initialise_potential(named_config("tiny"), frames, torch.float64)
    assert pot.element_list() == ["H", "C", "N", "O"]
    refs = pot.network.element_energy.numpy()
    # least squares: residuals are orthogonal to every element's count column
    counts = np.array([[np.sum(f.numbers == z) for z in (1, 6, 7, 8)] for f in frames])
    resid = np.array([f.energy - refs[f.numbers].sum() for f in frames])
    np.testing.assert_allclose(counts.T @ resid, 0.0, atol=1e-8)


def test_train_cli_reports_bad_config_cleanly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "transip_md.train", "--config", "nonexistent",
                          "--train", "x", "--val", "y", "--out", str(tmp_path / "r")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "error:" in out.stderr and "nonexistent" in out.stderr
