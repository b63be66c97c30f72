"""Products of 3-vectors with 3x3 cell (or strain) matrices, exact in the tensors' precision.

Written ``v @ cell``, these go to the GPU's matrix units, which compute float32 products in
TF32 (a 10-bit mantissa, ~5e-4 relative) as soon as a program sets
``torch.backends.cuda.matmul.allow_tf32 = True`` or ``torch.set_float32_matmul_precision("high")``,
as many training scripts do. Positions in a 30 Å box would then be off by ~0.01 Å, and the
forces of a model whose geometry went through them would be wrong by far more than the model's
own error. (On the H200 the shipped model's float32 force error against float64 went from
5.4e-4 to 0.32 with TF32 on, 2026-12-01, with every geometric product a matmul; this module is
the fix for that path.) As elementwise products and a sum these never touch the matrix units,
so the geometry is float32-exact whatever those settings; the network's own products may use
them where a study shows the accuracy holds (issue #16).
"""

from __future__ import annotations

from torch import Tensor


def rows_times(v: Tensor, m: Tensor) -> Tensor:
    """``v @ m`` for rows of 3-vectors ``v`` [..., 3] and a 3x3 matrix ``m`` (or a stack
    [..., 3, 3] broadcasting with ``v``), as elementwise products summed over the shared axis."""
    return (v.unsqueeze(-1) * m).sum(-2)
