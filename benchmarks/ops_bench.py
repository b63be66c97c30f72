"""Timing of the fused neighbour-attention operator (issue #16) against the reference.

  python benchmarks/ops_bench.py [--device cuda] [--dtype float32] [--json OUT.json]

Two comparisons at TransIP-S sizes (W=256, H=8, E=64; R=24,576 rows, K=96 slots of which 64
valid, the rest padding), forward alone and forward + backward (the gradient an MD step needs):

* ``op``    : torch.ops.transip_ops.neighbor_attention vs the same function in plain torch
              (transip_md/ops/reference.py), all inputs requiring grad; on CUDA both backward
              kernels, rows ``fused-scalar`` (na_backward_scalar, the original) and
              ``fused-vector`` (na_backward: vector atomics, 16-byte loads), switched with
              torch.ops.transip_ops.cuda_backward_variant (TRANSIP_OPS_BACKWARD sets the
              default, which the ``layer`` case uses);
* ``layer`` : one whole AttentionLayer (reference) vs FusedAttentionLayer (the same parameters,
              the op inside; transip_md/model/fused_attention.py) and FusedQKVAttentionLayer
              (``fused-qkv``: neighbor_attention_qkv, the per-token key/value form), gradient
              w.r.t. h and edge; on CUDA ``fused-qkv`` is its default backward (gather: the
              k / v gradients summed per row, no atomics) and ``fused-qkv-atomic`` the scatter
              with atomicAdd (torch.ops.transip_ops.cuda_qkv_backward_variant).

Each timing is the median of --repeat runs after --warmup runs (CUDA events on a GPU), with the
peak memory allocated during one run. Before timing, the outputs and gradients are compared
(max relative difference printed): a fast wrong answer is not a result. Writes a JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import transip_md.ops as ops  # noqa: E402
from transip_md.ops.reference import neighbor_attention_reference  # noqa: E402

FLOAT_ARGS = ("x", "edge", "envelope", "q_tok", "q_edge", "bias", "logit_self")
ORDER = ("x", "gather_index", "edge", "envelope", "q_tok", "q_edge", "bias", "logit_self")


def op_inputs(R, M, K, valid, W, H, E, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, M, (R, K), generator=g)
    env = torch.rand(R, K, generator=g, dtype=torch.float64) * 0.9 + 0.05
    idx[:, valid:] = torch.arange(R).unsqueeze(1)
    env[:, valid:] = 0.0
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    args = dict(x=rnd(M, W), gather_index=idx, edge=rnd(R, K, E), envelope=env,
                q_tok=rnd(R, H, W) * 2 / math.sqrt(W), q_edge=rnd(R, H, E) / math.sqrt(E),
                bias=rnd(R, K, H), logit_self=rnd(R, H))
    return {k: (v.to(device) if k == "gather_index" else v.to(device=device, dtype=dtype))
            for k, v in args.items()}


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


class Timer:
    def __init__(self, device):
        self.device = device

    def __call__(self, fn, warmup, repeat):
        cuda = self.device.type == "cuda"
        for _ in range(warmup):
            fn()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times = []
        for _ in range(repeat):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
        return statistics.median(times), peak


def _variants(device):
    """(impl name, backward variant or None) of the fused op to time on `device`."""
    if device.type == "cuda" and hasattr(torch.ops.transip_ops, "cuda_backward_variant"):
        return [("fused-scalar", "scalar"), ("fused-vector", "vector")]
    return [("fused", None)]


def bench_op(args, timer, warmup, repeat):
    leaves = {k: (v.clone().requires_grad_(k in FLOAT_ARGS)) for k, v in args.items()}
    fused = lambda *a: torch.ops.transip_ops.neighbor_attention(*a)
    impls = [("reference", neighbor_attention_reference, None)]
    impls += [(name, fused, variant) for name, variant in _variants(args["x"].device)]
    default = (torch.ops.transip_ops.cuda_backward_variant()
               if any(v for _, _, v in impls) else None)

    def use(variant):
        if variant is not None:
            torch.ops.transip_ops.cuda_backward_variant(variant)

    rows = {}
    # correctness first
    w = None
    results = {}
    for name, fn, variant in impls:
        use(variant)
        outs = fn(*[leaves[k] for k in ORDER])
        if w is None:
            g = torch.Generator(device=outs[0].device).manual_seed(1)
            w = [torch.randn(o.shape, generator=g, device=o.device, dtype=o.dtype) for o in outs]
        grads = torch.autograd.grad(sum((o * wi).sum() for o, wi in zip(outs, w)),
                                    [leaves[k] for k in FLOAT_ARGS])
        results[name] = [o.detach() for o in outs] + list(grads)
    errs = {name: max(rel(a, b) for a, b in zip(results[name], results["reference"]))
            for name, _, _ in impls[1:]}
    for name, fn, variant in impls:
        use(variant)

        def fwd():
            with torch.no_grad():
                fn(*[args[k] for k in ORDER])

        def fwd_bwd():
            outs = fn(*[leaves[k] for k in ORDER])
            torch.autograd.grad(sum((o * wi).sum() for o, wi in zip(outs, w)),
                                [leaves[k] for k in FLOAT_ARGS])

        rows[name] = {"forward_ms": timer(fwd, warmup, repeat),
                      "forward_backward_ms": timer(fwd_bwd, warmup, repeat)}
    use(default)
    return rows, errs


def bench_layer(R, M, K, valid, dtype, device, timer, warmup, repeat):
    from transip_md.model.config import named_config
    from transip_md.model.fused_attention import FusedAttentionLayer, FusedQKVAttentionLayer
    from transip_md.model.transformer import AttentionLayer

    torch.manual_seed(0)
    cfg = named_config("s")
    ref = AttentionLayer(cfg).to(device=device, dtype=dtype)
    fused = copy.deepcopy(ref)
    fused.__class__ = FusedAttentionLayer
    fused_qkv = copy.deepcopy(ref)
    fused_qkv.__class__ = FusedQKVAttentionLayer
    layers = [("reference", ref, None), ("fused", fused, None), ("fused-qkv", fused_qkv, "gather")]
    switch = getattr(torch.ops.transip_ops, "cuda_qkv_backward_variant", None)
    if device.type == "cuda" and switch is not None:
        layers.append(("fused-qkv-atomic", fused_qkv, "atomic"))
    default = switch() if switch is not None and device.type == "cuda" else None

    def use(variant):
        if variant is not None and default is not None:
            switch(variant)

    a = op_inputs(R, M, K, valid, cfg.width, cfg.heads, cfg.edge_width, dtype, device)
    nbr = torch.where(a["envelope"] > 0, a["gather_index"], torch.full_like(a["gather_index"], M))
    h = torch.randn(M, cfg.width, device=device, dtype=dtype, requires_grad=True)
    edge = a["edge"].clone().requires_grad_(True)
    env = a["envelope"]
    outs = {}
    for name, layer, variant in layers:
        use(variant)
        y = layer(h, nbr, edge, env)
        outs[name] = [y.detach()] + list(torch.autograd.grad(y.sum(), (h, edge)))
    errs = {name: max(rel(x, y) for x, y in zip(outs[name], outs["reference"]))
            for name, _, _ in layers[1:]}
    rows = {}
    for name, layer, variant in layers:
        use(variant)

        def fwd():
            with torch.no_grad():
                layer(h, nbr, edge, env)

        def fwd_bwd():
            torch.autograd.grad(layer(h, nbr, edge, env).sum(), (h, edge))

        rows[name] = {"forward_ms": timer(fwd, warmup, repeat),
                      "forward_backward_ms": timer(fwd_bwd, warmup, repeat)}
    use(default)
    return rows, errs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="+", default=["float32", "float64"])
    p.add_argument("--rows", type=int, default=24576)
    p.add_argument("--slots", type=int, default=96)
    p.add_argument("--valid", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--json", type=Path, default=None)
    opt = p.parse_args(argv)
    device = torch.device(opt.device)
    ops.load_library()
    timer = Timer(device)
    R, M, K, V = opt.rows, opt.rows, opt.slots, opt.valid
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or "cpu",
              "torch": torch.__version__, "library": str(ops.library_path(build=False)),
              "sizes": dict(R=R, M=M, K=K, valid=V, W=256, H=8, E=64), "results": []}
    print(f"{'case':<8}{'dtype':<9}{'impl':<14}{'fwd ms':>9}{'fwd MiB':>9}{'f+b ms':>9}"
          f"{'f+b MiB':>9}{'speed-up':>10}{'max rel diff':>14}")
    for dt in opt.dtype:
        dtype = getattr(torch, dt)
        args = op_inputs(R, M, K, V, 256, 8, 64, dtype, device)
        for case, (rows, errs) in (("op", bench_op(args, timer, opt.warmup, opt.repeat)),
                                  ("layer", bench_layer(R, M, K, V, dtype, device, timer,
                                                        opt.warmup, opt.repeat))):
            ref_fb = rows["reference"]["forward_backward_ms"][0]
            for impl, r in rows.items():
                (f_ms, f_mb), (fb_ms, fb_mb) = r["forward_ms"], r["forward_backward_ms"]
                speed = ref_fb / fb_ms
                err = errs.get(impl, float("nan"))
                print(f"{case:<8}{dt:<9}{impl:<14}{f_ms:9.2f}{f_mb:9.0f}{fb_ms:9.2f}{fb_mb:9.0f}"
                      f"{speed:10.2f}{err:14.2e}")
                report["results"].append(dict(case=case, dtype=dt, impl=impl, forward_ms=f_ms,
                                              forward_peak_mib=f_mb, forward_backward_ms=fb_ms,
                                              forward_backward_peak_mib=fb_mb,
                                              speedup_forward_backward=speed,
                                              max_rel_diff_vs_reference=err))
    if opt.json:
        opt.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = opt.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(opt.json)
        print(f"wrote {opt.json}")


if __name__ == "__main__":
    main()
