"""The paper's contrastive objective (mode learned-contrastive): InfoNCE over pooled embeddings
through a rotation-conditioned map T(z, R).

Checks: on a toy embedding that rotates exactly (blocks of 3-vectors), the exact T gives the
loss of perfectly matched views and beats a T that ignores or mistakes the rotation; a mismatched
pairing costs more than the matched one; gradients reach T and the encoder; and whether a short
training run lowers the model's measured rotation error below a run without rotations (it does
not yet: a strict xfail with the measured numbers; ~3 min of CPU, two 60-step runs)."""

import itertools

import numpy as np
import pytest
import torch

from conftest import emt_frames
from transip_md.batch import collate, make_rotations, predict, rotate_batch
from transip_md.checkpoint import load_checkpoint
from transip_md.metrics import equivariance_error
from transip_md.model import named_config
from transip_md.model.equivariance import (ContrastiveEquivariance, info_nce, pool_per_structure,
                                           random_rotations)
from transip_md.train import TrainConfig, Trainer
from transip_md.train.trainer import initialise_potential

TAU = 0.1


def toy_embedding(points: torch.Tensor, widths=(0.5, 1.0, 1.5, 2.0, 3.0)) -> torch.Tensor:
    """A rotation-equivariant structure embedding: sum_i w_k(|r_i|) r_i for several radial
    weights (points centred), flattened from [K, 3]. z(Rx) = (I_K ⊗ R) z(x) exactly."""
    r = points - points.mean(0)
    d = r.norm(dim=1, keepdim=True)
    return torch.stack([(torch.exp(-d / w) * r).sum(0) for w in widths]).reshape(-1)


def exact_t(z: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """The exact transformation of toy embeddings z [B, 3K] by rotations [B, 3, 3]."""
    return torch.einsum("bij,bkj->bki", rot, z.view(z.shape[0], -1, 3)).reshape(z.shape)


@pytest.fixture(scope="module")
def toy():
    gen = torch.Generator().manual_seed(0)
    structures = [torch.randn((6 + k, 3), generator=gen, dtype=torch.float64) * 1.5 for k in range(8)]
    rot = random_rotations(len(structures), generator=gen)
    z = torch.stack([toy_embedding(x) for x in structures])
    z_rot = torch.stack([toy_embedding(x @ r.T) for x, r in zip(structures, rot)])
    return z, z_rot, rot, gen


def test_exact_rotation_map_gives_the_matched_loss_and_beats_wrong_maps(toy):
    z, z_rot, rot, gen = toy
    # the toy embedding is exactly equivariant, so the exact T reproduces the rotated views
    assert torch.allclose(exact_t(z, rot), z_rot, atol=1e-10)
    matched = info_nce(z_rot, z_rot, TAU)
    exact = info_nce(exact_t(z, rot), z_rot, TAU)
    assert exact.item() == pytest.approx(matched.item(), abs=1e-9)
    ignores_rotation = info_nce(z, z_rot, TAU)
    wrong_rotation = info_nce(exact_t(z, random_rotations(len(z), generator=gen)), z_rot, TAU)
    assert exact < 0.5 * ignores_rotation, (exact, ignores_rotation)
    assert exact < 0.5 * wrong_rotation, (exact, wrong_rotation)


def test_mismatched_pairing_costs_more_than_the_matched_one(toy):
    _, z_rot, _, _ = toy
    matched = info_nce(z_rot, z_rot, TAU)
    for perm in list(itertools.permutations(range(4)))[1:]:  # every non-identity pairing of 4
        order = torch.tensor(list(perm) + list(range(4, len(z_rot))))
        assert info_nce(z_rot[order], z_rot, TAU) > matched + 0.1, perm


def test_info_nce_rejects_bad_temperature_and_is_zero_for_one_structure():
    with pytest.raises(ValueError, match="temperature"):
        info_nce(torch.ones(2, 3), torch.ones(2, 3), 0.0)
    assert info_nce(torch.randn(1, 5), torch.randn(1, 5), TAU).item() == pytest.approx(0.0, abs=1e-7)


def test_pooling_is_the_per_structure_mean():
    h = torch.arange(12, dtype=torch.float64).view(6, 2)
    system = torch.tensor([0, 0, 1, 1, 1, 2])
    pooled = pool_per_structure(h, system, 3)
    assert torch.allclose(pooled, torch.stack([h[:2].mean(0), h[2:5].mean(0), h[5:].mean(0)]))


def test_contrastive_loss_gradient_reaches_t_and_the_encoder():
    frames = emt_frames(6, seed=3)
    cfg = named_config("tiny")
    pot = initialise_potential(cfg, frames, torch.float64)
    pot.check_inputs = False
    head = ContrastiveEquivariance(cfg, temperature=TAU).to(torch.float64)
    batch = collate(frames, torch.float64, torch.device("cpu"), pot.cutoff)
    rot = make_rotations(batch.n_systems, torch.Generator().manual_seed(1), torch.float64, "cpu")
    _, _, hidden = predict(pot, batch, create_graph=True)
    _, _, hidden_r = predict(pot, rotate_batch(batch, rot), create_graph=True)
    loss = head.loss(hidden, hidden_r, rot, batch.system)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    t_grad = sum(float(p.grad.abs().sum()) for p in head.parameters() if p.grad is not None)
    enc = [p for n, p in pot.named_parameters() if n.startswith("network.layers.")]
    enc_grad = sum(float(p.grad.abs().sum()) for p in enc if p.grad is not None)
    assert t_grad > 0 and enc_grad > 0, (t_grad, enc_grad)
    # the rotation reaches T: its first layer's weights on vec(R) get a gradient
    first = head.maps[0][0].weight.grad
    assert float(first[:, cfg.width:].abs().sum()) > 0


def _train(mode, frames, out, steps=60):
    cfg = TrainConfig(mode=mode, epochs=100, max_steps=steps, batch_atoms=96, lr=3e-3,
                      warmup_steps=5, ema_decay=None, dtype="float64", seed=0)
    trainer = Trainer(named_config("tiny"), cfg, frames[:60], frames[60:], out, progress=False,
                      log=lambda line: None)
    return trainer, load_checkpoint(trainer.run())


@pytest.mark.xfail(strict=True, reason=(
    "measured 2026-12-01 (60 steps, tiny, float64, seed 0): contrastive alone leaves the "
    "rotation error where mode none has it (force 0.0899 vs 0.0894, energy 59.0 vs 56.6 "
    "meV/atom), while learned-mse lowers it by ~26 %; the pooled InfoNCE term constrains one "
    "vector per structure, not the per-atom features the forces come from. Remove this marker "
    "when a change to the objective makes the assertion hold (strict: a pass is reported)."))
def test_contrastive_training_lowers_rotation_error_vs_none(tmp_path):
    frames = emt_frames(72, seed=0)
    _, none = _train("none", frames, tmp_path / "none")
    trainer, learned = _train("learned-contrastive", frames, tmp_path / "contrastive")
    probe = frames[60:]
    e_none = equivariance_error(none.potential, probe, n_rotations=6, seed=7)
    e_con = equivariance_error(learned.potential, probe, n_rotations=6, seed=7)
    assert learned.training["mode"] == "learned-contrastive"
    # T's weights are kept beside the model, under their own prefix
    assert any(k.startswith("contrast.") for k in learned.equivariance_state)
    assert np.isfinite(trainer.history[-1]["train_contrastive"])
    assert e_con["force_relative"] < 0.85 * e_none["force_relative"], (e_con, e_none)
    assert e_con["energy_mev_per_atom"] < 0.85 * e_none["energy_mev_per_atom"], (e_con, e_none)
