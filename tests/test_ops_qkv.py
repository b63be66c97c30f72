"""The per-token key/value operator ``transip_ops::neighbor_attention_qkv`` (issue #16).

Against its plain-torch reference (transip_md/ops/reference.py) in values and in the first
derivatives of every float input (1e-12 relative in float64, 2e-5 in float32 on the CPU; 1e-10 /
2e-5 on a GPU), gradcheck in float64, and, composed into :class:`FusedQKVAttentionLayer`,
against the reference :class:`AttentionLayer` with the same parameters (with and without
ghost rows, eager and TorchScript). A second derivative must refuse. The CUDA tests run where a
GPU is (the lent H200) and skip elsewhere.
"""

import copy
import math
import os

import pytest
import torch

import transip_md.ops as ops
from transip_md.ops import build as ops_build
from transip_md.model.config import named_config
from transip_md.model.fused_attention import FusedQKVAttentionLayer, use_fused_attention
from transip_md.model.transformer import AttentionLayer
from transip_md.ops.reference import neighbor_attention_qkv_reference as reference

HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU (CUDA kernels)")
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
GPU_TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
ORDER = ("qkv", "gather_index", "edge", "envelope", "q_edge", "bias", "logit_self")
FLOAT_ARGS = ("qkv", "edge", "envelope", "q_edge", "bias", "logit_self")
SHAPES = {
    "small": dict(R=5, M=7, K=6, W=16, H=2, E=4, padded=2),
    "many_padded": dict(R=6, M=9, K=24, W=9, H=3, E=5, padded=20),
    "ghost_rows": dict(R=3, M=12, K=5, W=12, H=4, E=3, padded=1),
    "all_valid": dict(R=4, M=4, K=4, W=8, H=2, E=2, all_valid=True),
}


@pytest.fixture(scope="module", autouse=True)
def library():
    ops.load_library()


def make_inputs(R=5, M=7, K=6, W=16, H=2, E=4, dtype=torch.float64, device="cpu", seed=0,
                padded=2, all_valid=False, negative_envelope=False):
    """Random inputs shaped like a layer's: rows >= R are ghosts (keys/values only); each row's
    last ``padded`` slots are padding (own index, envelope 0); neighbours repeat across rows
    and within a row (the scatter must add, not overwrite)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    idx = torch.randint(0, M, (R, K), generator=g)
    idx[:, 0] = (torch.arange(R) + 1) % M
    idx[:, 1] = idx[:, 0]
    envelope = torch.rand(R, K, generator=g, dtype=torch.float64) * 0.9 + 0.05
    if not all_valid and padded:
        idx[:, K - padded:] = torch.arange(R).unsqueeze(1)
        envelope[:, K - padded:] = 0.0
    if negative_envelope:  # invalid slot (no logit) whose weight env / D is still nonzero
        envelope[:, 2] = -0.3
    args = dict(qkv=rand(M, 3 * W) * 1.5, gather_index=idx, edge=rand(R, K, E),
                envelope=envelope, q_edge=rand(H, R, E), bias=rand(R, K, H),
                logit_self=rand(R, H) * 2)
    out = {k: (v.to(device) if k == "gather_index" else v.to(device=device, dtype=dtype))
           for k, v in args.items()}
    out["scale"] = 1.0 / math.sqrt(W // H)
    return out


def call(fn, args):
    return fn(*[args[k] for k in ORDER], args["scale"])


def op(*a):
    return torch.ops.transip_ops.neighbor_attention_qkv(*a)


def rel_err(a, b):
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def grads_of(fn, args, seed=1):
    """Outputs and the gradients of a random weighting of all four outputs."""
    leaves = {k: (v.detach().clone().requires_grad_(k in FLOAT_ARGS) if torch.is_tensor(v) else v)
              for k, v in args.items()}
    outs = call(fn, leaves)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)).sum()
               for o in outs)
    loss.backward()
    return [o.detach() for o in outs], {k: leaves[k].grad for k in FLOAT_ARGS}


# ----------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_forward_and_derivatives_match_reference(shape, dtype):
    args = make_inputs(dtype=dtype, **SHAPES[shape])
    got, got_grads = grads_of(op, args)
    want, want_grads = grads_of(reference, args)
    for name, a, b in zip(("agg_v", "agg_edge", "a_sum", "a_self"), got, want):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert rel_err(a, b) < TOL[dtype], f"{name}: {rel_err(a, b):.2e}"
    for name in FLOAT_ARGS:
        a, b = got_grads[name], want_grads[name]
        assert a.shape == b.shape, name
        assert rel_err(a, b) < TOL[dtype], f"d/d{name}: {rel_err(a, b):.2e}"
    # Not a tautology: the weights are a distribution over the self slot and the valid slots,
    # and with ghost rows the k/v rows >= R get gradients while their q columns get none.
    assert torch.allclose(got[2] + got[3], torch.ones_like(got[2]), atol=10 * TOL[dtype])
    R, W = args["gather_index"].shape[0], args["qkv"].shape[1] // 3
    assert torch.all(got_grads["qkv"][R:, :W] == 0)


def test_padding_slots_do_not_contribute():
    """What a padded (envelope 0) slot points at, and its edge features, change nothing."""
    args = make_inputs(**SHAPES["many_padded"])
    want = call(op, args)
    other = dict(args)
    idx = args["gather_index"].clone()
    idx[:, -5:] = (idx[:, -5:] + 3) % args["qkv"].shape[0]
    edge = args["edge"].clone()
    edge[:, -5:] += 100.0
    other.update(gather_index=idx, edge=edge)
    for a, b in zip(call(op, other), want):
        assert torch.equal(a, b)


def test_gradcheck_float64():
    args = make_inputs(R=3, M=5, K=4, W=6, H=2, E=3, padded=1)
    # Envelope 0 is a kink (the slot switches on): the envelope is checked where every slot is
    # valid, everything else with padding present.
    inputs = tuple(args[k].requires_grad_(k in FLOAT_ARGS and k != "envelope") for k in ORDER)
    assert torch.autograd.gradcheck(lambda *a: op(*a, args["scale"]), inputs, eps=1e-6,
                                    atol=1e-8, rtol=1e-6)
    args = make_inputs(R=3, M=5, K=4, W=6, H=2, E=3, all_valid=True, seed=2)
    inputs = tuple(args[k].requires_grad_(k in FLOAT_ARGS) for k in ORDER)
    assert torch.autograd.gradcheck(lambda *a: op(*a, args["scale"]), inputs, eps=1e-6,
                                    atol=1e-8, rtol=1e-6)


def test_double_backward_refuses():
    args = make_inputs()
    qkv = args["qkv"].clone().requires_grad_(True)
    out = op(qkv, *[args[k] for k in ORDER[1:]], args["scale"])
    (g,) = torch.autograd.grad(out[0].pow(2).sum(), [qkv], create_graph=True)
    with pytest.raises(RuntimeError, match="neighbor_attention_qkv has no double backward"):
        g.sum().backward()


@pytest.mark.parametrize("mutate, match", [
    (lambda a: a.update(qkv=a["qkv"][:, :-1]), r"'qkv' must have shape \[M, 3W\]"),
    (lambda a: a.update(q_edge=a["q_edge"].transpose(0, 1).contiguous()),
     r"'q_edge' must have shape \[H, R, E\]"),
    (lambda a: a.update(logit_self=a["logit_self"][:, :1].repeat(1, 3)),
     r"not a multiple of the H = 3 heads"),
    (lambda a: a.update(bias=a["bias"].float()), r"'bias' has dtype Float but qkv has Double"),
    (lambda a: a["gather_index"].__setitem__((0, 0), 99), r"'gather_index' has values in"),
], ids=["qkv", "q_edge", "heads", "dtype", "index"])
def test_bad_inputs_name_the_argument(mutate, match):
    args = make_inputs()
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        call(op, args)


# ----------------------------------------------------------------------------- the layer
def _layers(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    ref = AttentionLayer(named_config("tiny")).to(dtype)
    with torch.no_grad():
        for p in ref.parameters():  # non-zero everywhere (self_kv starts at zero)
            p.normal_(0.0, 0.3)
    fused = copy.deepcopy(ref)
    fused.__class__ = FusedQKVAttentionLayer
    return ref, fused


@pytest.mark.parametrize("rows", ["all", "ghosts"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_layer_equals_reference_layer(rows, dtype):
    """Same parameters, same function: outputs and d/d(tokens, edges, envelope)."""
    ref, fused = _layers(dtype)
    cfg = named_config("tiny")
    g = torch.Generator().manual_seed(3)
    M, K = 9, 7
    R = M if rows == "all" else 5
    h = torch.randn(M, cfg.width, generator=g, dtype=torch.float64).to(dtype)
    nbr = torch.randint(0, M + 1, (R, K), generator=g)  # M = padding
    edge = torch.randn(R, K, cfg.edge_width, generator=g, dtype=torch.float64).to(dtype)
    env = torch.rand(R, K, generator=g, dtype=torch.float64).to(dtype)
    env = torch.where(nbr == M, torch.zeros_like(env), env)
    outs = []
    for layer in (ref, fused):
        leaves = [t.clone().requires_grad_(True) for t in (h, edge, env)]
        y = layer(leaves[0], nbr, leaves[1], leaves[2])
        grads = torch.autograd.grad((y * y).sum(), leaves)
        outs.append((y.detach(),) + grads)
    for name, a, b in zip(("output", "d/dh", "d/dedge", "d/denvelope"), outs[1], outs[0]):
        assert rel_err(a, b) < TOL[dtype], f"{name}: {rel_err(a, b):.2e}"


def test_layer_scripts_and_switch_keeps_parameters():
    from conftest import make_potential

    ref = make_potential()
    fused = use_fused_attention(copy.deepcopy(ref), form="qkv")
    assert all(type(layer) is FusedQKVAttentionLayer for layer in fused.network.layers)
    a, b = ref.state_dict(), fused.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    ref_layer, layer = _layers()
    scripted = torch.jit.script(layer)
    cfg = named_config("tiny")
    h = torch.randn(6, cfg.width, dtype=torch.float64)
    nbr = torch.tensor([[1, 2, 6], [0, 2, 3], [5, 6, 6], [4, 0, 1], [3, 2, 1], [0, 1, 6]])
    edge = torch.randn(6, 3, cfg.edge_width, dtype=torch.float64)
    env = torch.where(nbr == 6, 0.0, 0.5).to(torch.float64)
    assert rel_err(scripted(h, nbr, edge, env), ref_layer(h, nbr, edge, env)) < 1e-12
    with pytest.raises(ValueError, match="unknown fused attention form"):
        use_fused_attention(copy.deepcopy(ref), form="flash")


# ----------------------------------------------------------------------------- edge encoder
def _encoders(dtype=torch.float64):
    from transip_md.model.fused_attention import FusedEdgeEncoder
    from transip_md.model.transformer import EdgeEncoder

    torch.manual_seed(1)
    ref = EdgeEncoder(named_config("tiny")).to(dtype)
    fused = copy.deepcopy(ref)
    fused.__class__ = FusedEdgeEncoder
    return ref, fused


def _edge_inputs(dtype=torch.float64, device="cpu", shape=(7, 5)):
    g = torch.Generator().manual_seed(4)
    vec = (torch.randn(*shape, 3, generator=g, dtype=torch.float64) * 2.0).to(device=device, dtype=dtype)
    return vec


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_edge_encoder_equals_reference_encoder(dtype):
    """Values and d/dvec (through the distance too, as the network uses it)."""
    ref, fused = _encoders(dtype)
    outs = []
    for enc in (ref, fused):
        vec = _edge_inputs(dtype).requires_grad_(True)
        y = enc(vec, torch.linalg.norm(vec, dim=-1))
        (g,) = torch.autograd.grad((y * y.detach().cos()).sum(), [vec])
        outs.append((y.detach(), g))
    for name, a, b in zip(("edge", "d/dvec"), outs[1], outs[0]):
        assert rel_err(a, b) < TOL[dtype], f"{name}: {rel_err(a, b):.2e}"


def test_edge_encoder_gradcheck_and_gradgradcheck():
    ref, _ = _encoders()
    first, second = ref.mlp[0], ref.mlp[2]
    vec = _edge_inputs(shape=(3, 2)).requires_grad_(True)
    dist = torch.linalg.norm(vec, dim=-1).detach().requires_grad_(True)
    leaves = [t.detach().clone().requires_grad_(True)
              for t in (ref.centers, first.weight, first.bias, second.weight, second.bias)]

    def fn(d, v, c, w1, b1, w2, b2):
        return torch.ops.transip_ops.edge_encoder(d, v, c, ref.gamma, 1.0 / ref.cutoff,
                                                  w1, b1, w2, b2)

    assert torch.autograd.gradcheck(fn, (dist, vec, *leaves), eps=1e-6, atol=1e-8, rtol=1e-6)
    # the backward recomputes with ATen operators, so second derivatives (training) are exact
    assert torch.autograd.gradgradcheck(fn, (dist, vec, *leaves), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_edge_encoder_keeps_only_its_inputs():
    """The point of the op: autograd keeps the inputs (distance, vec, weights), not the [.., E]
    activations that the reference encoder keeps for its backward."""
    ref, fused = _encoders()
    for enc in (ref, fused):
        for p in enc.parameters():
            p.requires_grad_(False)  # as in an exported file

    def saved_bytes(enc):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        vec = _edge_inputs(shape=(400, 30)).requires_grad_(True)
        distance = torch.linalg.norm(vec, dim=-1)  # outside: only the encoder's own saves
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            enc(vec, distance)
        return total[0]

    edge_bytes = 400 * 30 * named_config("tiny").edge_width * 8
    assert saved_bytes(ref) >= 2 * edge_bytes  # both SiLU pre-activations at least
    assert saved_bytes(fused) < 0.5 * edge_bytes


def test_fused_qkv_switch_covers_the_edge_encoder():
    from conftest import make_potential
    from transip_md.model.fused_attention import FusedEdgeEncoder

    ref = make_potential()
    assert type(use_fused_attention(copy.deepcopy(ref), form="qkv").network.edge_encoder) is FusedEdgeEncoder
    folded = use_fused_attention(copy.deepcopy(ref), form="folded")
    assert type(folded.network.edge_encoder) is not FusedEdgeEncoder


# ----------------------------------------------------------------------------- CUDA
GPU_SHAPES = dict(SHAPES)
# K * H too large for the kernels' shared memory (global scratch path), and TransIP-S's sizes.
GPU_SHAPES["big_k"] = dict(R=4, M=40, K=700, W=32, H=8, E=4, padded=100)
GPU_SHAPES["s_sizes"] = dict(R=64, M=96, K=48, W=256, H=8, E=64, padded=8)
# wider than one block of threads (head width 64), head width not a multiple of 32, more heads
# than warps
GPU_SHAPES["wide"] = dict(R=3, M=10, K=20, W=320, H=5, E=7, padded=4)
GPU_SHAPES["d48"] = dict(R=6, M=9, K=12, W=384, H=8, E=16, padded=3)
GPU_SHAPES["many_heads"] = dict(R=5, M=8, K=10, W=64, H=16, E=3, padded=2)
GPU_SHAPES["negative_envelope"] = dict(R=7, M=15, K=9, W=32, H=4, E=6, padded=2,
                                       negative_envelope=True)


@pytest.mark.skipif(not ops_build.toolchain().cuda.include,
                    reason="library built without its CUDA part")
def test_qkv_backward_variant_switch():
    """cuda_qkv_backward_variant: read from TRANSIP_OPS_QKV_BACKWARD once (default gather),
    switched for later calls; a bad name is refused naming both choices. Needs no GPU (the
    switch only picks a kernel)."""
    switch = torch.ops.transip_ops.cuda_qkv_backward_variant
    before = switch()
    if not os.environ.get("TRANSIP_OPS_QKV_BACKWARD"):
        assert before == "gather"
    try:
        assert switch("atomic") == "atomic" and switch() == "atomic"
        assert switch("gather") == "gather" and switch() == "gather"
        with pytest.raises(RuntimeError, match="must be 'atomic' or 'gather'; got 'fast'"):
            switch("fast")
        assert switch() == "gather"
    finally:
        switch(before)


@pytest.fixture(params=["gather", "atomic"])
def qkv_backward(request):
    """Runs a CUDA test with each way of forming the k / v gradients (the default restored)."""
    switch = torch.ops.transip_ops.cuda_qkv_backward_variant
    before = switch()
    switch(request.param)
    yield request.param
    switch(before)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", list(GPU_SHAPES), ids=list(GPU_SHAPES))
def test_cuda_matches_reference(shape, dtype, qkv_backward):
    args = make_inputs(dtype=dtype, device="cuda", **GPU_SHAPES[shape])
    cpu64 = make_inputs(dtype=torch.float64, **GPU_SHAPES[shape])
    got, got_grads = grads_of(op, args)
    want, want_grads = grads_of(reference, cpu64)
    for name, a, b in zip(("agg_v", "agg_edge", "a_sum", "a_self"), got, want):
        assert rel_err(a.cpu().double(), b) < GPU_TOL[dtype], f"{name}: {rel_err(a.cpu().double(), b):.2e}"
    for name in FLOAT_ARGS:
        a, b = got_grads[name].cpu().double(), want_grads[name]
        assert rel_err(a, b) < GPU_TOL[dtype], f"d/d{name}: {rel_err(a, b):.2e}"


@needs_gpu
@pytest.mark.gpu
def test_cuda_gather_backward_is_deterministic_and_default():
    """The default (gather) backward sums every row's k / v gradient in slot order: two calls
    give the same bits, where the atomic scatter's order varies from run to run."""
    assert torch.ops.transip_ops.cuda_qkv_backward_variant() == "gather"
    args = make_inputs(dtype=torch.float32, device="cuda", **GPU_SHAPES["s_sizes"])
    _, first = grads_of(op, args)
    _, second = grads_of(op, args)
    for name in FLOAT_ARGS:
        assert torch.equal(first[name], second[name]), name


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cuda_edge_encoder_equals_reference(dtype):
    ref, fused = _encoders(dtype)
    ref, fused = ref.cuda(), fused.cuda()
    outs = []
    for enc in (ref, fused):
        vec = _edge_inputs(dtype, "cuda", shape=(300, 40)).requires_grad_(True)
        y = enc(vec, torch.linalg.norm(vec, dim=-1))
        (g,) = torch.autograd.grad((y * y.detach().cos()).sum(), [vec])
        outs.append((y.detach(), g))
    for name, a, b in zip(("edge", "d/dvec"), outs[1], outs[0]):
        assert rel_err(a, b) < GPU_TOL[dtype], f"{name}: {rel_err(a, b):.2e}"


@needs_gpu
@pytest.mark.gpu
def test_cuda_layer_and_graph_capture():
    """The fused layer on the GPU equals the reference layer, also replayed from a CUDA graph."""
    ref, fused = _layers(torch.float32)
    ref, fused = ref.cuda(), fused.cuda()
    cfg = named_config("tiny")
    M, K = 300, 40
    g = torch.Generator().manual_seed(5)
    nbr = torch.randint(0, M + 1, (M, K), generator=g).cuda()
    edge = torch.randn(M, K, cfg.edge_width, generator=g).cuda()
    env = torch.where(nbr == M, 0.0, torch.rand(M, K, generator=g).cuda())
    h = torch.randn(M, cfg.width, generator=g).cuda().requires_grad_(True)

    def step():
        y = fused(h, nbr, edge, env)
        (gh,) = torch.autograd.grad((y * y).sum(), [h])
        return y.detach(), gh

    # The reference runs on a copy of h and its graph is dropped before the capture: a graph
    # kept alive from the default stream would make the captured backward wait on that stream
    # (autograd's AccumulateGrad stream sync), which invalidates the capture.
    h_ref = h.detach().clone().requires_grad_(True)
    want_y = ref(h_ref, nbr, edge, env)
    (want_g,) = torch.autograd.grad((want_y * want_y).sum(), [h_ref])
    want_y = want_y.detach()
    del h_ref
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        y, gh = step()
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(y, want_y) < 2e-5 and rel_err(gh, want_g) < 2e-5
