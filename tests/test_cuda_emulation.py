"""The CUDA kernels of neighbor_attention_qkv, run on the CPU through a CUDA emulation.

CI has no GPU, so the operator's CUDA code would otherwise only be compiled there (NVRTC,
tests/test_ops.py) and run once per GPU session. Here the real kernel text
(transip_md/ops/csrc/neighbor_attention_kernels.cu) is built with g++ against a small shim
(tests/cuda_emulation/shim.h: a thread per CUDA thread, barriers for __syncthreads and warp
shuffles) and its forward and both backward variants (atomic scatter; gather: naq_backward then
naq_backward_kv over the host's stable sort) are compared with the plain-torch reference, values
and every first derivative. The launches follow neighbor_attention_cuda.cpp: one block per row,
the same shared-memory plan and global scratch rows when K * H does not fit.
"""

import ctypes
import math
import subprocess
from pathlib import Path

import pytest
import torch

from transip_md.native_build import compiler
from transip_md.ops.reference import neighbor_attention_qkv_reference as reference

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "transip_md" / "ops" / "csrc" / "neighbor_attention_kernels.cu"
SHIM = Path(__file__).resolve().parent / "cuda_emulation"
THREADS = 256  # kThreads of neighbor_attention_cuda.cpp
SHARED_LIMIT = 48 * 1024  # kSharedLimit of neighbor_attention_cuda.cpp
ORDER = ("qkv", "gather_index", "edge", "envelope", "q_edge", "bias", "logit_self")
FLOAT_ARGS = ("qkv", "edge", "envelope", "q_edge", "bias", "logit_self")
TOL = {"double": 1e-11, "float": 2e-5}
# (dtype, R, M, K, W, H, E, padded slots, a negative envelope): ghost rows (R < M), repeated
# neighbours, an invalid slot with nonzero weight, global scratch (K * H beyond shared memory).
CASES = {
    "ghosts_negative_f64": ("double", 7, 15, 9, 32, 4, 6, 2, True),
    "small_f32": ("float", 5, 7, 6, 16, 2, 4, 2, False),
    "scratch_f32": ("float", 1, 6, 420, 32, 16, 4, 20, False),
    # The head classes of head_sums' butterfly (the per-slot logit sums): H = 1 (no transpose
    # rounds), H = 6 (padded to 8: zero heads), H = 32 (one lane per head, no single-value
    # rounds) and H = 64 (> 32 lanes: the per-head warp_sum fallback).
    "h1_f64": ("double", 3, 5, 5, 8, 1, 3, 1, False),
    "h6_padded_f32": ("float", 4, 7, 7, 24, 6, 5, 2, True),
    "h32_f32": ("float", 2, 5, 6, 64, 32, 4, 1, False),
    "h64_fallback_f64": ("double", 2, 4, 5, 64, 64, 3, 1, True),
    # W > 256 threads: two columns per thread (naq_backward_kv's slot groups with CPT = 2);
    # K = 12: one group of 8 slots of slot_column_sum plus a remainder of 4.
    "w512_two_columns_f32": ("float", 3, 6, 12, 512, 8, 4, 3, True),
}
# Each emulated shuffle is two barriers of 32 threads, so the scratch case (many slots x heads)
# is the slow one: it runs with the default variant only (its global-scratch path is the same
# code in both).
SLOW = {"scratch_f32"}


def _emulated_source() -> str:
    """The kernel text with the CUDA-only declarations rewritten for the shim."""
    text = KERNELS.read_text()
    text = text.replace("extern __shared__ double smem[];", "double* smem = g_smem;")
    text = text.replace('extern "C" __global__', "__global__")
    return text.replace("\n  __shared__ ", "\n  static ")  # the kernels' fixed shared arrays


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    cxx, _ = compiler()
    out = tmp_path_factory.mktemp("cuda_emulation")
    (out / "kernels_emu.cu").write_text(_emulated_source())
    libs = {}

    def get(scalar, W, H, E):
        key = (scalar, W, H, E)
        if key not in libs:
            so = out / f"emu_{scalar}_{W}_{H}_{E}.so"
            cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", f"-DSCALAR={scalar}",
                   f"-DW_={W}", f"-DH_={H}", f"-DE_={E}", f"-DNT={THREADS}", f"-I{out}",
                   f"-I{SHIM}", str(SHIM / "harness.cpp"), "-o", str(so), "-lpthread"]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            libs[key] = ctypes.CDLL(str(so))
        return libs[key]

    return get


def _inputs(R, M, K, W, H, E, padded, negative):
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    idx = torch.randint(0, M, (R, K), generator=g)
    idx[:, 0] = (torch.arange(R) + 1) % M
    idx[:, 1] = idx[:, 0]  # a repeated neighbour: its gradients must add
    env = torch.rand(R, K, generator=g, dtype=torch.float64) * 0.9 + 0.05
    idx[:, K - padded:] = torch.arange(R).unsqueeze(1)
    env[:, K - padded:] = 0.0
    if negative:
        env[:, 2] = -0.3
    return dict(qkv=rand(M, 3 * W) * 1.5, gather_index=idx, edge=rand(R, K, E), envelope=env,
                q_edge=rand(H, R, E), bias=rand(R, K, H), logit_self=rand(R, H) * 2)


def _rel(a, b):
    scale = b.abs().max().item() or 1.0
    return (a.double() - b).abs().max().item() / scale


@pytest.mark.parametrize("variant", ["gather", "atomic"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_emulated_cuda_kernels_match_reference(build, case, variant):
    if case in SLOW and variant != "gather":
        pytest.skip("the scratch shape runs with the default variant only (emulation time)")
    scalar, R, M, K, W, H, E, padded, negative = CASES[case]
    lib = build(scalar, W, H, E)
    dtype = torch.float64 if scalar == "double" else torch.float32
    c_t = ctypes.c_double if scalar == "double" else ctypes.c_float
    es = 8 if scalar == "double" else 4
    a = _inputs(R, M, K, W, H, E, padded, negative)
    scale = 1.0 / math.sqrt(W // H)
    x = {k: (v.contiguous() if k == "gather_index" else v.to(dtype).contiguous())
         for k, v in a.items()}
    ptr = lambda t: ctypes.c_void_p(t.data_ptr()) if t is not None else None  # noqa: E731
    ints = (ctypes.c_int(K), ctypes.c_longlong(M), ctypes.c_longlong(R), c_t(scale))

    # forward: plan_shared(op, d, elem, stats=0, arrays=1)
    base = K * (8 + es)
    full = base + K * H * es
    scratch = torch.empty(R, K * H, dtype=dtype) if full > SHARED_LIMIT else None
    outs = ([torch.empty(R, W, dtype=dtype), torch.empty(R, H, E, dtype=dtype)]
            + [torch.empty(R, H, dtype=dtype) for _ in range(4)])
    lib.fwd(*[ptr(x[k]) for k in ORDER], *[ptr(o) for o in outs], ptr(scratch), *ints,
            ctypes.c_size_t(base if scratch is not None else full))

    leaves = {k: (v.clone().requires_grad_(True) if k in FLOAT_ARGS else v) for k, v in a.items()}
    want = reference(*[leaves[k] for k in ORDER], scale)
    errs = {n: _rel(o, w.detach()) for n, o, w in zip(("agg_v", "agg_edge", "a_sum", "a_self"),
                                                        outs[:4], want)}
    g = torch.Generator().manual_seed(5)
    upstream = [torch.randn(w.shape, generator=g, dtype=torch.float64) for w in want]
    want_grads = torch.autograd.grad(want, [leaves[n] for n in FLOAT_ARGS], upstream)

    # backward: plan_shared(op, d, elem, stats=3, arrays=2); dqkv as backward_qkv_cuda makes it
    base = K * (8 + es) + 3 * H * es
    full = base + 2 * K * H * es
    scratch = torch.empty(R, 2 * K * H, dtype=dtype) if full > SHARED_LIMIT else None
    gather = variant == "gather"
    dqkv = torch.zeros(M, 3 * W, dtype=dtype)
    if gather:  # every entry must be written: NaN where the kernels would leave garbage
        dqkv.fill_(float("nan"))
        dqkv[R:, :W] = 0.0
    grads = [dqkv, torch.empty(R, K, E, dtype=dtype), torch.empty(R, K, dtype=dtype),
             torch.empty(H, R, E, dtype=dtype), torch.empty(R, K, H, dtype=dtype),
             torch.empty(R, H, dtype=dtype)]
    weights = torch.empty(R, K, H, dtype=dtype) if gather else None
    up = [u.to(dtype).contiguous() for u in upstream]
    lib.bwd(*[ptr(u) for u in up], *[ptr(x[k]) for k in ORDER], ptr(outs[4]), ptr(outs[5]),
            *[ptr(t) for t in grads], ptr(scratch), ptr(weights), *ints,
            ctypes.c_size_t(base if scratch is not None else full))
    if gather:  # the host part of backward_qkv_cuda: slots by gathered row, stable
        key = torch.where(x["envelope"] != 0, x["gather_index"], M).reshape(-1).to(torch.int32)
        sorted_key, order = torch.sort(key, stable=True)
        row_ptr = torch.searchsorted(sorted_key, torch.arange(M + 1, dtype=torch.int32))
        lib.bwd_kv(ptr(x["qkv"]), ptr(up[0]), ptr(grads[4]), ptr(weights), ptr(order.contiguous()),
                   ptr(row_ptr.contiguous()), ptr(dqkv), ctypes.c_int(K), ctypes.c_longlong(M),
                   c_t(scale))
    for name, got, w in zip(FLOAT_ARGS, grads, want_grads):
        errs["d" + name] = _rel(got, w)
    bad = {k: v for k, v in errs.items() if not v < TOL[scalar]}  # NaN fails too
    assert not bad, bad
