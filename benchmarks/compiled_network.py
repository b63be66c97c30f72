"""What would a compiled (TorchInductor) TransIP network buy over TorchScript? (issue #10)

    python benchmarks/compiled_network.py --size s --sizes 1536 6144 24576 --json out.json

The exported TorchScript file runs one CUDA kernel per operation and materialises the gathered
neighbour tokens [N, K, W] in device memory. Inductor can fuse the gather into its consumers
(the tokens of 24k atoms, 25 MB in float32, stay in the H100's L2 cache) and fuse the
element-wise work. This measures the network part of energy + forces (neighbour list and
displacements prepared once, outside the timing), in float32, for:

* ``eager``: the network as written (the same op sequence TorchScript runs);
* ``compiled``: ``torch.compile(network)`` (Inductor, static shapes, forward and backward graphs);
* ``compiled-gather``: ``torch.compile`` with the per-head logits/aggregation written as gathers
  and reductions instead of batched matrix products, so that Inductor can fuse them.

and the force error of each against a float64 eager reference. A benchmark, not a product path:
an AOTInductor ``.pt2`` for the LAMMPS plugin would be the way to ship what it shows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transip_md.model import TransIPPotential, named_config  # noqa: E402
from transip_md.model.neighbors import neighbor_pairs, pairs_to_dense  # noqa: E402
from transip_md.systems import water_box  # noqa: E402


def dense_inputs(potential, n_atoms: int, device, dtype):
    atoms = water_box(n_atoms // 3, seed=0)
    pos = torch.tensor(atoms.positions, dtype=dtype, device=device)
    cell = torch.tensor(atoms.cell.array, dtype=dtype, device=device)
    numbers = torch.tensor(atoms.numbers, device=device)
    i, j, s = neighbor_pairs(pos, cell, torch.tensor([True] * 3, device=device), potential.cutoff)
    vec = pos[j] - pos[i] + s.to(dtype) @ cell
    row, slot, k_max = pairs_to_dense(i, len(atoms))
    nbr_vec = torch.zeros(len(atoms), k_max, 3, dtype=dtype, device=device)
    nbr_vec[..., 0] = 2 * potential.cutoff
    nbr_vec[row, slot] = vec
    nbr_index = torch.full((len(atoms), k_max), len(atoms), dtype=torch.long, device=device)
    nbr_index[row, slot] = j
    q = torch.zeros(len(atoms), dtype=torch.long, device=device)
    return numbers, q, q + 1, nbr_index, nbr_vec


def attention_gather_reduce(self, h, nbr_index, edge, envelope):
    """AttentionLayer.forward with the two batched matrix products written as broadcast
    products + reductions over the gathered tokens: hopeless eagerly ([R, K, H, W]), but a form
    Inductor fuses into kernels that read the gathered rows without materialising them."""
    import math

    n_rows, n_slots = nbr_index.shape
    W, H, D, E = self.width, self.heads, self.head_dim, self.edge_width
    x = self.norm_attn(h)
    w_q, w_k, w_v = self.qkv.weight.split([W, W, W], dim=0)
    b_q, b_k, b_v = self.qkv.bias.split([W, W, W], dim=0)
    w_ek, w_ev, w_eb = self.edge_proj.weight.split([W, W, H], dim=0)
    b_ek, b_ev, b_eb = self.edge_proj.bias.split([W, W, H], dim=0)
    s_k, s_v = self.self_kv.chunk(2)
    x_rows = x[:n_rows]
    q = (torch.nn.functional.linear(x_rows, w_q, b_q) / math.sqrt(D)).view(n_rows, H, D)
    own = torch.arange(n_rows, device=nbr_index.device).unsqueeze(1)
    idx = torch.where(nbr_index < h.shape[0], nbr_index, own)
    x_nbr = x[idx]  # [R, K, W]: fused away by Inductor
    q_tok = torch.einsum("nhd,hdw->nhw", q, w_k.view(H, D, W))
    q_edge = torch.einsum("nhd,hde->nhe", q, w_ek.view(H, D, E))
    q_bias = (q * (b_k + b_ek).view(H, D)).sum(-1)
    logit_nbr = ((x_nbr.unsqueeze(2) * q_tok.unsqueeze(1)).sum(-1)
                 + (edge.unsqueeze(2) * q_edge.unsqueeze(1)).sum(-1)
                 + torch.nn.functional.linear(edge, w_eb, b_eb) + q_bias.unsqueeze(1))
    k_self = torch.nn.functional.linear(x_rows, w_k, b_k + s_k).view(n_rows, H, D)
    logit_self = (q * k_self).sum(-1)
    valid = (envelope > 0.0).unsqueeze(-1)
    masked = torch.where(valid, logit_nbr, torch.full_like(logit_nbr, -1e30))
    m = torch.maximum(logit_self, masked.max(dim=1).values).detach()
    w_self = torch.exp(logit_self - m)
    w_nbr = envelope.unsqueeze(-1) * torch.exp(torch.where(valid, logit_nbr, m.unsqueeze(1)) - m.unsqueeze(1))
    denom = w_self + w_nbr.sum(1)
    agg_tok = (w_nbr.unsqueeze(-1) * x_nbr.unsqueeze(2)).sum(1)  # [R, H, W]
    agg_edge = (w_nbr.unsqueeze(-1) * edge.unsqueeze(2)).sum(1)
    v_self = torch.nn.functional.linear(x_rows, w_v, b_v + s_v).view(n_rows, H, D)
    mixed = (torch.einsum("nhw,hdw->nhd", agg_tok, w_v.view(H, D, W))
             + torch.einsum("nhe,hde->nhd", agg_edge, w_ev.view(H, D, E))
             + w_nbr.sum(1).unsqueeze(-1) * (b_v + b_ev).view(H, D) + w_self.unsqueeze(-1) * v_self)
    out = h[:n_rows] + self.out((mixed / denom.unsqueeze(-1)).reshape(n_rows, W))
    return out + self.ffn(self.norm_ffn(out))


def energy_and_grad(network, inputs):
    numbers, q, m, nbr_index, nbr_vec = inputs
    vec = nbr_vec.detach().requires_grad_(True)
    energies, _ = network(numbers, q, m, nbr_index, vec)
    (grad,) = torch.autograd.grad(energies.sum(), [vec])
    return grad


def time_ms(fn, repeats=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def peak_gib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1024 ** 3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="s")
    p.add_argument("--sizes", type=int, nargs="+", default=[1536, 6144, 24576])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    potential = TransIPPotential(named_config(args.size))
    potential.network.energy_scale.data.fill_(3.0)
    net32 = potential.network.to(device).float().eval()
    net64 = TransIPPotential(named_config(args.size)).network
    net64.load_state_dict(net32.state_dict())
    net64 = net64.to(device).double().eval()
    compiled = torch.compile(net32, dynamic=False)
    import copy
    import types

    net_gr = copy.deepcopy(net32)
    for layer in net_gr.layers:
        layer.forward = types.MethodType(attention_gather_reduce, layer)
    compiled_gr = torch.compile(net_gr, dynamic=False)
    rows = []
    for n in args.sizes:
        inputs = dense_inputs(potential, n, device, torch.float32)
        inputs64 = tuple(t.double() if t.is_floating_point() else t for t in inputs)
        ref = energy_and_grad(net64, inputs64)
        row = {"atoms": n, "slots": int(inputs[3].shape[1])}
        for label, net in (("eager", net32), ("compiled", compiled), ("compiled-gather", compiled_gr)):
            try:
                call = lambda: energy_and_grad(net, inputs)  # noqa: E731
                row[f"{label}_ms"] = time_ms(call)
                row[f"{label}_peak_gib"] = peak_gib(call)
                g = call().double()
                row[f"{label}_grad_rel_err"] = float((g - ref).norm() / ref.norm())
            except Exception as exc:
                row[f"{label}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    labels = ("eager", "compiled", "compiled-gather")
    print(f"\n{'atoms':>7} " + " ".join(f"{l + ' ms':>20} {l + ' GiB':>20}" for l in labels))
    for r in rows:
        print(f"{r['atoms']:>7} " + " ".join(
            f"{r.get(l + '_ms', float('nan')):>20.2f} {r.get(l + '_peak_gib', float('nan')):>20.2f}" for l in labels))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
