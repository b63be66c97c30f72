"""Compiled fast-path operators of transip-md (issue #16): ``torch.ops.transip_ops.*``.

One shared library, ``libtransip_ops.so``, built with g++ on first use (no nvcc, no CUDA
toolkit: CUDA kernels are compiled at run time by NVRTC; see :mod:`transip_md.ops.build`) and
registered with ``TORCH_LIBRARY(transip_ops, ...)``, so Python, TorchScript and libtorch C++
programs that load it all see the same operators.

``torch.ops.transip_ops.neighbor_attention(x, gather_index, edge, envelope, q_tok, q_edge,
bias, logit_self) -> (agg_tok, agg_edge, a_sum, a_self)``, all float arguments of one dtype
(float32 or float64) on one device, ``gather_index`` int64::

    x [M, W]  gather_index [R, K]  edge [R, K, E]  envelope [R, K]
    q_tok [R, H, W]  q_edge [R, H, E]  bias [R, K, H]  logit_self [R, H]

    l[k,h]   = x[idx[k]] . q_tok[h] + edge[k] . q_edge[h] + bias[k,h]
    valid[k] = envelope[k] > 0
    m[h]     = max(logit_self[h], max_{valid k} l[k,h])           (a constant for autograd)
    u[k,h]   = envelope[k] * exp(valid[k] ? l[k,h] - m[h] : 0);  u_self = exp(logit_self - m)
    D[h]     = u_self[h] + sum_k u[k,h];   a = u / D;   a_self = u_self / D
    agg_tok[h] = sum_k a[k,h] x[idx[k]]    agg_edge[h] = sum_k a[k,h] edge[k]
    a_sum[h]   = sum_k a[k,h]              a_self[h]

the neighbour attention of ``transip_md.model.transformer.AttentionLayer.forward``. First
derivatives with respect to every float input are implemented (C++ autograd function); a second
derivative raises "transip_ops.neighbor_attention has no double backward; training uses the
reference path". On the CPU ``gather_index`` is range-checked; on a GPU an index outside
``[0, M)`` stops the kernel (a device-side trap, like torch's own index assertions).

``torch.ops.transip_ops.neighbor_attention_qkv(qkv, gather_index, edge, envelope, q_edge, bias,
logit_self, scale) -> (agg_v, agg_edge, a_sum, a_self)``, the per-token key/value form (the
same layer function; :class:`transip_md.model.fused_attention.FusedQKVAttentionLayer`)::

    qkv [M, 3W] (row j = q_j | k_j | v_j; head h owns columns h*D..h*D+D-1 of each, D = W/H)
    gather_index [R, K]  edge [R, K, E]  envelope [R, K]  q_edge [H, R, E]  bias [R, K, H]
    logit_self [R, H]  scale (float)

    l[k,h] = scale * q_i,h . k_idx[k],h + edge[k] . q_edge[h] + bias[k,h]
    (softmax, a, a_self, agg_edge, a_sum as above)
    agg_v[h*D + c] = sum_k a[k,h] v_idx[k],h[c]                     agg_v [R, W]

First derivatives with respect to qkv (its q columns for rows < R, k and v columns summed over
the slots that gathered each row), edge, envelope, q_edge, bias and logit_self; no double
backward. On CUDA those k / v sums are formed without atomics by default (``gather``: a stable
sort of ``gather_index`` lists each row's slots, one kernel sums them in slot order, so the bits
repeat run to run) or with atomicAdd (``atomic``), chosen by ``TRANSIP_OPS_QKV_BACKWARD`` or
``torch.ops.transip_ops.cuda_qkv_backward_variant``; H200, TransIP-S layer at 24,576 rows:
8.86 vs 9.19 ms forward+backward.

``torch.ops.transip_ops.edge_encoder(distance, vec, centers, gamma, inv_cutoff, w1, b1, w2, b2)``
is :class:`transip_md.model.transformer.EdgeEncoder` (radial basis + two Linear/SiLU layers)
with its activations recomputed in the backward instead of kept; ATen operators only, so the
same code runs on every device, and derivatives to any order.

Two CUDA backward kernels exist for ``neighbor_attention``: the default (``scalar``: one atomic add per column of the
scattered token gradient) and ``vector`` (float4/float2 atomics and 16-byte loads, float32 on
sm_90+), chosen by ``TRANSIP_OPS_BACKWARD`` or ``torch.ops.transip_ops.cuda_backward_variant``.
Both are tested against the reference; on an H200 the vector one was slower (11.1 vs 9.2 ms per
forward+backward at 24,576 rows: its registers halve the blocks per SM).
"""

from __future__ import annotations

import threading
from pathlib import Path

LIBRARY_NAME = "transip_ops"

_lock = threading.Lock()
_loaded_path: "Path | None" = None


class OperatorLibraryError(RuntimeError):
    """The operator library could not be built or loaded; the message says why."""


def library_path(build: bool = True) -> Path:
    """The built ``libtransip_ops.so`` for the current sources and torch (built on first use into
    the project's cache directory; ``build=False`` raises OperatorLibraryError instead)."""
    from . import build as _build

    try:
        target = _build.target_path()
        if target.exists():
            return target
        if not build:
            raise OperatorLibraryError(
                f"the transip_ops library is not built yet ({target}); call "
                "transip_md.ops.load_library() or `python -m transip_md.ops build`")
        return _build.build_library()
    except _build.BuildError as exc:
        raise OperatorLibraryError(f"building the transip_ops library failed: {exc}") from exc


def load_library() -> None:
    """Build the library if needed and load it into this process (idempotent)."""
    global _loaded_path
    with _lock:
        if _loaded_path is not None:
            return
        import torch

        path = library_path()
        try:
            torch.ops.load_library(str(path))
        except (OSError, RuntimeError) as exc:
            raise OperatorLibraryError(
                f"loading the transip_ops library {path} failed: {exc}") from exc
        _loaded_path = path


def is_loaded() -> bool:
    """True once :func:`load_library` succeeded in this process."""
    return _loaded_path is not None


def cuda_available() -> bool:
    """True when the library was built with its CUDA part (CUDA headers found at build time and
    torch built with CUDA). Loads the library. It says nothing about a GPU being present."""
    load_library()
    import torch

    return bool(torch.ops.transip_ops.with_cuda())


__all__ = ["LIBRARY_NAME", "OperatorLibraryError", "library_path", "load_library", "is_loaded",
           "cuda_available"]
