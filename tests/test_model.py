"""Physics of the model itself: conservative forces, invariances, locality, periodic images."""

import numpy as np
import pytest
import torch
from ase.build import molecule

from conftest import ONE, ZERO, central_difference_forces, energy, system_tensors
from transip_md.model.neighbors import neighbor_pairs
from transip_md.systems import water_box

def test_forces_are_minus_energy_gradient(potential64):
    atoms = molecule("CH3CH2OH")
    pos, z, cell, pbc = system_tensors(atoms)
    forces = potential64.compute(pos, z, cell, pbc, ZERO, ONE, True, False)["forces"]
    idx = list(range(len(atoms)))
    fd = central_difference_forces(potential64, pos, z, cell, pbc, idx)
    assert forces.abs().max() > 1e-2, "forces suspiciously small for a meaningful check"
    np.testing.assert_allclose(forces[idx].numpy(), fd[idx].numpy(), atol=1e-7, rtol=1e-6)


def test_energy_and_forces_continuous_when_atom_crosses_cutoff(potential64):
    """Move atom 3 through r = rc of atom 0 (its only neighbour): no jump in energy or forces.

    The envelope vanishes with two derivatives at rc, so within 1e-3 Å of the crossing the
    energy changes by O(1e-9) and the force on the crossing atom is O(1e-6) at most.
    """
    rc = potential64.cutoff
    pos = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.1, 0.0], [-rc, 0.0, 0.0]],
                       dtype=torch.float64)
    z = torch.tensor([8, 1, 1, 7])
    cell, pbc = torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.bool)
    es, fs = [], []
    for x in np.linspace(rc - 1e-3, rc + 1e-3, 21):
        p = pos.clone()
        p[3, 0] = -float(x)
        out = potential64.compute(p, z, cell, pbc, ZERO, ONE, True, False)
        es.append(float(out["energy"]))
        fs.append(out["forces"].numpy().copy())
    steps_e = np.abs(np.diff(es))
    steps_f = np.abs(np.diff(np.array(fs), axis=0)).max()
    assert steps_e.max() < 1e-8 and steps_f < 1e-5
    assert np.abs(np.array(fs)[:, 3]).max() < 1e-5
    assert es[-1] == es[-2]  # beyond the cutoff atom 3 no longer interacts at all
    # finite-difference check right at the crossing, atom 3 straddles rc
    p = pos.clone()
    p[3, 0] = -(rc - 2e-6)
    fd = central_difference_forces(potential64, p, z, cell, pbc, [3], h=1e-5)
    f = potential64.compute(p, z, cell, pbc, ZERO, ONE, True, False)["forces"]
    np.testing.assert_allclose(f[3].numpy(), fd[3].numpy(), atol=1e-8)


def test_translation_and_permutation_invariance(potential64):
    atoms = molecule("CH3CONH2")
    pos, z, cell, pbc = system_tensors(atoms)
    ref = potential64.compute(pos, z, cell, pbc, ZERO, ONE, True, False)
    moved = potential64.compute(pos + torch.tensor([3.3, -7.1, 12.9], dtype=torch.float64),
                                z, cell, pbc, ZERO, ONE, True, False)
    assert abs(float(moved["energy"] - ref["energy"])) < 1e-10
    torch.testing.assert_close(moved["forces"], ref["forces"], atol=1e-10, rtol=0)
    perm = torch.randperm(len(atoms), generator=torch.Generator().manual_seed(3))
    permuted = potential64.compute(pos[perm], z[perm], cell, pbc, ZERO, ONE, True, False)
    assert abs(float(permuted["energy"] - ref["energy"])) < 1e-10
    torch.testing.assert_close(permuted["forces"], ref["forces"][perm], atol=1e-10, rtol=0)


def test_model_is_not_rotation_invariant_by_construction(potential64):
    """Rotation behaviour is learned, not built in: an untrained model must show it."""
    atoms = molecule("CH3OH")
    pos, z, cell, pbc = system_tensors(atoms)
    rot = torch.tensor(
        [[0.36, 0.48, -0.8], [-0.8, 0.6, 0.0], [0.48, 0.64, 0.6]], dtype=torch.float64)
    e0 = energy(potential64, pos, z, cell, pbc)
    e1 = energy(potential64, pos @ rot.T, z, cell, pbc)
    assert abs(e1 - e0) > 1e-8


@pytest.mark.parametrize("triclinic", [False, True])
def test_periodic_box_equals_explicit_replicas(potential64, triclinic):
    """Energy per cell of a periodic box = centre-cell energy of an explicitly replicated block."""
    atoms = water_box(8, seed=1, triclinic=triclinic)
    pos, z, cell, pbc = system_tensors(atoms)
    ref = potential64.compute(pos, z, cell, pbc, ZERO, ONE, True, True)
    n = len(atoms)
    reach = potential64.receptive_field
    heights = atoms.cell.volume / np.linalg.norm(np.cross(atoms.cell[[1, 2, 0]], atoms.cell[[2, 0, 1]]), axis=1)
    reps = [int(np.ceil(reach / h)) for h in heights]
    shifts = [(a, b, c) for a in range(-reps[0], reps[0] + 1) for b in range(-reps[1], reps[1] + 1)
              for c in range(-reps[2], reps[2] + 1)]
    shifts.sort(key=lambda s: sum(abs(v) for v in s))  # centre copy first
    block = torch.cat([pos + torch.tensor(s, dtype=torch.float64) @ cell for s in shifts])
    zb = z.repeat(len(shifts))
    i, j, _ = neighbor_pairs(block, torch.zeros(3, 3, dtype=torch.float64),
                             torch.zeros(3, dtype=torch.bool), potential64.cutoff)
    e_local, forces = potential64.local_energies_forces(block, zb, i, j, n, ZERO, ONE)
    assert abs(float(e_local.sum() - ref["energy"])) < 1e-9
    summed = forces.reshape(len(shifts), n, 3).sum(0)
    torch.testing.assert_close(summed, ref["forces"], atol=1e-9, rtol=0)


def test_small_cell_with_many_images_and_stress(potential64):
    """A cell thinner than the cutoff: multiple images; stress = (1/V) dE/dstrain."""
    atoms = water_box(1, seed=4, triclinic=True)
    pos, z, cell, pbc = system_tensors(atoms)
    assert min(atoms.cell.cellpar()[:3]) < potential64.cutoff
    out = potential64.compute(pos, z, cell, pbc, ZERO, ONE, True, True)
    vol = abs(float(torch.linalg.det(cell)))
    h = 1e-6
    for a, b in [(0, 0), (1, 2), (2, 1), (0, 1)]:
        eps = torch.zeros(3, 3, dtype=torch.float64)
        eps[a, b] = eps[b, a] = h / 2 if a != b else h
        de = (energy(potential64, pos @ (torch.eye(3, dtype=torch.float64) + eps), z,
                     cell @ (torch.eye(3, dtype=torch.float64) + eps), pbc)
              - energy(potential64, pos @ (torch.eye(3, dtype=torch.float64) - eps), z,
                       cell @ (torch.eye(3, dtype=torch.float64) - eps), pbc)) / (2 * h)
        # symmetric strain with eps_ab = eps_ba = h/2: dE/dh = V * stress_ab
        assert abs(float(out["stress"][a, b]) - de / vol) < 1e-8, (a, b)


def test_wrapping_atoms_by_lattice_vectors_changes_nothing(potential64):
    atoms = water_box(8, seed=2, triclinic=True)
    pos, z, cell, pbc = system_tensors(atoms)
    ref = potential64.compute(pos, z, cell, pbc, ZERO, ONE, True, True)
    k = torch.tensor([[2, -1, 0]] * 10 + [[0, 0, 0]] * (len(atoms) - 10), dtype=torch.float64)
    out = potential64.compute(pos + k @ cell, z, cell, pbc, ZERO, ONE, True, True)
    assert abs(float(out["energy"] - ref["energy"])) < 1e-9
    torch.testing.assert_close(out["forces"], ref["forces"], atol=1e-9, rtol=0)
    torch.testing.assert_close(out["stress"], ref["stress"], atol=1e-10, rtol=0)


def test_isolated_atom_has_finite_energy_and_zero_force(potential64):
    pos = torch.zeros((1, 3), dtype=torch.float64)
    out = potential64.compute(pos, torch.tensor([8]), torch.zeros(3, 3, dtype=torch.float64),
                              torch.zeros(3, dtype=torch.bool), ZERO, ONE, True, False)
    assert np.isfinite(float(out["energy"]))
    assert float(out["forces"].abs().max()) == 0.0


def test_charge_and_spin_change_the_energy(potential64):
    atoms = molecule("H2O")
    pos, z, cell, pbc = system_tensors(atoms)
    e0 = energy(potential64, pos, z, cell, pbc)
    assert abs(energy(potential64, pos, z, cell, pbc, charge=torch.tensor(-1)) - e0) > 1e-6
    assert abs(energy(potential64, pos, z, cell, pbc, spin=torch.tensor(3)) - e0) > 1e-6


def test_cell_list_matches_brute_force():
    atoms = water_box(300, seed=5, triclinic=True)
    pos = torch.tensor(atoms.positions)
    cell = torch.tensor(np.asarray(atoms.cell))
    pbc = torch.ones(3, dtype=torch.bool)
    a = neighbor_pairs(pos, cell, pbc, 5.0, brute_force_limit=0)
    b = neighbor_pairs(pos, cell, pbc, 5.0, brute_force_limit=10**12)
    key = lambda p: sorted(zip(p[0].tolist(), p[1].tolist(), map(tuple, p[2].tolist())))  # noqa: E731
    assert len(a[0]) > 10 * len(atoms)
    assert key(a) == key(b)
    # and against ASE's neighbour list
    from ase.neighborlist import neighbor_list

    i, j = neighbor_list("ij", atoms, 5.0)
    assert len(i) == len(a[0])


@pytest.mark.parametrize("bad,message", [
    ("nan", "not finite"), ("empty", "empty structure"), ("element", "element Cl"),
    ("overlap", "same position"), ("charge", "total charge"), ("cell", "zero length"),
])
def test_bad_inputs_raise_clear_errors(potential64, bad, message):
    atoms = molecule("H2O")
    pos, z, cell, pbc = system_tensors(atoms)
    charge = ZERO
    if bad == "nan":
        pos[1, 2] = float("nan")
    elif bad == "empty":
        pos, z = pos[:0], z[:0]
    elif bad == "element":
        z[2] = 17
    elif bad == "overlap":
        pos[2] = pos[1]
    elif bad == "charge":
        charge = torch.tensor(40)
    elif bad == "cell":
        cell = torch.zeros(3, 3, dtype=torch.float64)
        pbc = torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match=message):
        potential64.compute(pos, z, cell, pbc, charge, ONE, True, False)


def _attention_per_edge(layer, h, nbr_index, edge, envelope):
    """Reference: the attention layer written with explicit per-edge keys and values."""
    n_rows, n_slots = nbr_index.shape
    H, D, W = layer.heads, layer.head_dim, layer.width
    x = layer.norm_attn(h)
    q, k, v = layer.qkv(x).chunk(3, dim=-1)
    e_k, e_v, e_bias = layer.edge_proj(edge).split([W, W, H], dim=-1)
    pad = torch.cat([torch.arange(h.shape[0]), torch.tensor([0])])  # pad slot: any row
    k_ij = (k[pad[nbr_index]] + e_k).view(n_rows, n_slots, H, D)
    v_ij = (v[pad[nbr_index]] + e_v).view(n_rows, n_slots, H, D)
    s_k, s_v = layer.self_kv.chunk(2)
    q = q[:n_rows].view(n_rows, H, D) / D ** 0.5
    logit_nbr = torch.einsum("nhd,nkhd->nkh", q, k_ij) + e_bias
    logit_self = (q * (k[:n_rows] + s_k).view(n_rows, H, D)).sum(-1)
    w_nbr = envelope.unsqueeze(-1) * torch.exp(logit_nbr)
    w_self = torch.exp(logit_self)
    mixed = (w_self.unsqueeze(-1) * (v[:n_rows] + s_v).view(n_rows, H, D)
             + (w_nbr.unsqueeze(-1) * v_ij).sum(1)) / (w_self + w_nbr.sum(1)).unsqueeze(-1)
    out = h[:n_rows] + layer.out(mixed.reshape(n_rows, W))
    return out + layer.ffn(layer.norm_ffn(out))


def test_factored_attention_equals_per_edge_keys_and_values():
    """The layer folds Wk into the query and applies Wv after aggregation; it must be the same
    function as explicit k_ij / v_ij, also when rows < tokens (engine ghost atoms)."""
    from transip_md.model.config import named_config
    from transip_md.model.transformer import AttentionLayer

    torch.manual_seed(3)
    cfg = named_config("tiny")
    layer = AttentionLayer(cfg).double()
    for p in layer.parameters():
        p.data.normal_(0.0, 0.3)
    n_tokens, n_rows, n_slots = 11, 7, 5
    h = torch.randn(n_tokens, cfg.width, dtype=torch.float64)
    nbr_index = torch.randint(0, n_tokens, (n_rows, n_slots))
    nbr_index[0, 3:] = n_tokens  # padding slots
    edge = torch.randn(n_rows, n_slots, cfg.edge_width, dtype=torch.float64)
    envelope = torch.rand(n_rows, n_slots, dtype=torch.float64)
    envelope[0, 3:] = 0.0
    got = layer(h, nbr_index, edge, envelope)
    want = _attention_per_edge(layer, h, nbr_index, edge, envelope)
    assert got.shape == (n_rows, cfg.width)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("periodic", [True, False])
def test_low_memory_gradients_equal_the_plain_path(potential64, periodic):
    """compute() with low_memory (one layer's graph at a time) gives the same forces and stress."""
    atoms = water_box(27, seed=5, triclinic=True) if periodic else molecule("CH3CH2OH")
    scripted = torch.jit.script(potential64)
    args = (torch.tensor(atoms.positions), torch.tensor(atoms.numbers), torch.tensor(atoms.cell.array),
            torch.tensor(atoms.pbc), torch.tensor(0), torch.tensor(1), True, True)
    plain = scripted.compute(*args)
    scripted.low_memory = True
    checkpointed = scripted.compute(*args)
    assert set(plain) == set(checkpointed)
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- cutoff envelope
def _expanded_envelope(u, p):
    """The envelope's polynomial as written in the literature, in exact rationals' float64."""
    a, b, c = -(p + 1) * (p + 2) / 2, p * (p + 2), -p * (p + 1) / 2
    return np.where(u < 1.0, 1.0 + a * u ** p + b * u ** (p + 1) + c * u ** (p + 2), 0.0)


@pytest.mark.parametrize("exponent", [1, 3, 5, 6, 8])
def test_envelope_is_the_smooth_cutoff_polynomial(exponent):
    from transip_md.model.transformer import polynomial_envelope

    u = np.linspace(0.0, 1.2, 2401)
    got = polynomial_envelope(torch.tensor(u * 5.0, dtype=torch.float64), 5.0, exponent).numpy()
    np.testing.assert_allclose(got, _expanded_envelope(u, exponent), rtol=0, atol=1e-13)
    assert got[0] == 1.0 and np.all(got[u >= 1.0] == 0.0)
    # value, first and second derivative vanish at the cutoff: env = C (1 - u)^3 + O((1-u)^4)
    # with C = sum_{k<p} C(k+2, 2) = C(p+2, 3)
    C, rc, eps = exponent * (exponent + 1) * (exponent + 2) / 6, 5.0, 1e-4
    d = torch.tensor([rc * (1 - eps)], dtype=torch.float64, requires_grad=True)
    env = polynomial_envelope(d, rc, exponent)
    (g,) = torch.autograd.grad(env.sum(), d, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), d)
    np.testing.assert_allclose([env.item(), g.item(), gg.item()],
                               [C * eps ** 3, -3 * C * eps ** 2 / rc, 6 * C * eps / rc ** 2],
                               rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_envelope_is_positive_up_to_the_cutoff(dtype):
    """Inside the cutoff the envelope is > 0 down to the last representable distance: the
    attention mask ``envelope > 0`` is exactly ``distance < cutoff``. The expanded polynomial
    cancelled to noise of either sign there (float64: within ~1e-4 Å of a 5 Å cutoff), so the
    mask flipped at random and forces jumped under 1e-15 Å moves (seen in LAMMPS vs ASE)."""
    from transip_md.model.transformer import polynomial_envelope

    eps = torch.finfo(dtype).eps
    cutoff = 5.0
    gaps = torch.logspace(0, -12, 200, dtype=torch.float64)  # Å inside the cutoff
    d = (cutoff - gaps).to(dtype)
    d = d[d < cutoff]
    env = polynomial_envelope(d, cutoff, 6)
    assert bool((env > 0).all()), d[env <= 0]
    # and monotone: never larger closer to the cutoff (no noise floor)
    assert bool((env[1:] <= env[:-1] * (1 + 8 * eps)).all())
