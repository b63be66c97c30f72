// transip_ops::edge_encoder: the edge encoder of transformer.py (EdgeEncoder) with its
// activations recomputed in the backward instead of kept (issue #16, memory).
//
//   edge_encoder(distance [..], vec [.., 3], centers [C], gamma, inv_cutoff,
//                w1 [E, C + 3], b1 [E], w2 [E, E], b2 [E]) -> edge [.., E]
//   x    = cat(exp(-gamma (distance - centers)^2), vec * inv_cutoff)
//   edge = silu(silu(x w1^T + b1) w2^T + b2)
//
// Autograd keeps the pre-activations of both SiLUs and the radial basis, [.., E] twice and
// [.., C] twice per edge: for TransIP-S (E = 64, ~61 slots per atom) ~38 KiB per atom, alive
// through the whole backward. This function keeps only its inputs and recomputes them when its
// backward runs, which is last (the encoder is the first step of the forward), after the layers'
// saved tensors are freed. Extra cost: one more forward of the encoder.
//
// Written with ATen operators only, so one implementation serves every device (CPU and CUDA,
// also inside a CUDA graph: no host synchronisation). Derivatives with respect to every tensor
// input, to any order (the backward is ATen operators too).
#include <torch/autograd.h>
#include <torch/library.h>

#include "transip_ops.h"

namespace transip_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kOp = "transip_ops.edge_encoder";

std::string shape_of(const Tensor& t) {
  std::string o = "[";
  for (int64_t i = 0; i < t.dim(); ++i) o += cat(i ? ", " : "", t.size(i));
  return o + "]";
}

void check(const Tensor& distance, const Tensor& vec, const Tensor& centers, const Tensor& w1,
           const Tensor& b1, const Tensor& w2, const Tensor& b2) {
  const Tensor* all[] = {&distance, &vec, &centers, &w1, &b1, &w2, &b2};
  const char* names[] = {"distance", "vec", "centers", "w1", "b1", "w2", "b2"};
  for (int i = 0; i < 7; ++i) {
    TORCH_CHECK(all[i]->defined(), cat(kOp, ": argument '", names[i], "' is undefined"));
    TORCH_CHECK(all[i]->scalar_type() == distance.scalar_type() &&
                    all[i]->device() == distance.device(),
                cat(kOp, ": argument '", names[i], "' has dtype ",
                    std::string(c10::toString(all[i]->scalar_type())), " on ",
                    all[i]->device().str(), " but distance has ",
                    std::string(c10::toString(distance.scalar_type())), " on ",
                    distance.device().str(), "; all arguments must share dtype and device"));
  }
  TORCH_CHECK(distance.scalar_type() == at::kFloat || distance.scalar_type() == at::kDouble,
              cat(kOp, ": float32 or float64 expected"));
  TORCH_CHECK(vec.dim() == distance.dim() + 1 && vec.size(-1) == 3,
              cat(kOp, ": argument 'vec' must have shape distance.shape + [3]; got ",
                  shape_of(vec), " for distance ", shape_of(distance)));
  for (int64_t i = 0; i < distance.dim(); ++i)
    TORCH_CHECK(vec.size(i) == distance.size(i),
                cat(kOp, ": argument 'vec' must have shape distance.shape + [3]; got ",
                    shape_of(vec), " for distance ", shape_of(distance)));
  TORCH_CHECK(centers.dim() == 1, cat(kOp, ": argument 'centers' must be [C]; got ",
                                      shape_of(centers)));
  const int64_t C = centers.size(0);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == C + 3,
              cat(kOp, ": argument 'w1' must be [E, C + 3] = [E, ", C + 3, "]; got ",
                  shape_of(w1)));
  const int64_t E = w1.size(0);
  TORCH_CHECK(b1.dim() == 1 && b1.size(0) == E,
              cat(kOp, ": argument 'b1' must be [E] = [", E, "]; got ", shape_of(b1)));
  TORCH_CHECK(w2.dim() == 2 && w2.size(0) == E && w2.size(1) == E,
              cat(kOp, ": argument 'w2' must be [E, E] = [", E, ", ", E, "]; got ",
                  shape_of(w2)));
  TORCH_CHECK(b2.dim() == 1 && b2.size(0) == E,
              cat(kOp, ": argument 'b2' must be [E] = [", E, "]; got ", shape_of(b2)));
}

// The radial basis [.., C] and the first layer's input x [.., C + 3].
std::pair<Tensor, Tensor> basis(const Tensor& distance, const Tensor& vec, const Tensor& centers,
                                double gamma, double inv_cutoff) {
  Tensor rbf = at::exp((distance.unsqueeze(-1) - centers).square_().mul_(-gamma));
  Tensor x = at::cat({rbf, vec * inv_cutoff}, -1);
  return {rbf, x};
}

// silu'(z) = s (1 + z (1 - s)), s = sigmoid(z); times g, with one temporary.
Tensor times_silu_grad(const Tensor& g, const Tensor& z) {
  Tensor s = at::sigmoid(z);
  Tensor t = at::rsub(s, 1.0);  // 1 - s
  t.mul_(z).add_(1.0).mul_(s).mul_(g);
  return t;
}

Tensor edge_encoder_plain(const Tensor& distance, const Tensor& vec, const Tensor& centers,
                          double gamma, double inv_cutoff, const Tensor& w1, const Tensor& b1,
                          const Tensor& w2, const Tensor& b2) {
  check(distance, vec, centers, w1, b1, w2, b2);
  Tensor x = basis(distance, vec, centers, gamma, inv_cutoff).second;
  Tensor h = at::linear(x, w1, b1);
  at::silu_(h);
  Tensor out = at::linear(h, w2, b2);
  at::silu_(out);
  return out;
}

// Sum over every leading dimension of a [.., n] tensor: [rows, n].
Tensor rows_of(const Tensor& t) { return t.reshape({-1, t.size(-1)}); }

// The first derivatives by recomputation, with ATen operators only: under create_graph they
// are recorded like any other operators, so a second derivative is exact too.
variable_list backward_by_recomputation(const Tensor& g, const Tensor& distance,
                                        const Tensor& vec, const Tensor& centers, double gamma,
                                        double inv_cutoff, const Tensor& w1, const Tensor& b1,
                                        const Tensor& w2, const Tensor& b2, bool need_centers,
                                        bool need_weights) {
  auto [rbf, x] = basis(distance, vec, centers, gamma, inv_cutoff);
  Tensor z1 = at::linear(x, w1, b1);
  Tensor h1 = at::silu(z1);
  Tensor dz2 = times_silu_grad(g, at::linear(h1, w2, b2));
  Tensor dw2, db2, dw1, db1;
  if (need_weights) {
    dw2 = at::mm(rows_of(dz2).t(), rows_of(h1));
    db2 = rows_of(dz2).sum(0);
  }
  h1 = Tensor();  // dropped as soon as possible: the backward's own peak stays small
  Tensor dz1 = times_silu_grad(at::matmul(dz2, w2), z1);
  dz2 = Tensor();
  z1 = Tensor();
  if (need_weights) {
    dw1 = at::mm(rows_of(dz1).t(), rows_of(x));
    db1 = rows_of(dz1).sum(0);
  }
  Tensor dx = at::matmul(dz1, w1);  // [.., C + 3]
  dz1 = Tensor();
  const int64_t C = centers.size(0);
  // rbf = exp(-gamma diff^2), diff = distance - centers:
  // d/d distance = -2 gamma diff rbf, d/d centers = +2 gamma diff rbf
  Tensor g_diff = dx.narrow(-1, 0, C) * rbf * (distance.unsqueeze(-1) - centers);
  Tensor d_distance = g_diff.sum(-1) * (-2.0 * gamma);
  Tensor d_centers = need_centers ? rows_of(g_diff).sum(0) * (2.0 * gamma) : Tensor();
  Tensor d_vec = dx.narrow(-1, C, 3) * inv_cutoff;
  return {d_distance, d_vec, d_centers, dw1, db1, dw2, db2};
}

class EdgeEncoderFunction : public torch::autograd::Function<EdgeEncoderFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& distance, const Tensor& vec,
                        const Tensor& centers, double gamma, double inv_cutoff,
                        const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2) {
    ctx->save_for_backward({distance, vec, centers, w1, b1, w2, b2});
    ctx->saved_data["gamma"] = gamma;
    ctx->saved_data["inv_cutoff"] = inv_cutoff;
    return edge_encoder_plain(distance, vec, centers, gamma, inv_cutoff, w1, b1, w2, b2);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    // needs_input_grad counts tensor inputs only: distance 0, vec 1, centers 2, w1..b2 3..6.
    const bool need_centers = ctx->needs_input_grad(2);
    const bool need_weights = ctx->needs_input_grad(3) || ctx->needs_input_grad(4) ||
                              ctx->needs_input_grad(5) || ctx->needs_input_grad(6);
    auto g = backward_by_recomputation(grads[0], s[0], s[1], s[2],
                                       ctx->saved_data["gamma"].toDouble(),
                                       ctx->saved_data["inv_cutoff"].toDouble(), s[3], s[4], s[5],
                                       s[6], need_centers, need_weights);
    return {g[0], g[1], g[2], Tensor(), Tensor(), g[3], g[4], g[5], g[6]};
  }
};

Tensor edge_encoder_autograd(const Tensor& distance, const Tensor& vec, const Tensor& centers,
                             double gamma, double inv_cutoff, const Tensor& w1, const Tensor& b1,
                             const Tensor& w2, const Tensor& b2) {
  return EdgeEncoderFunction::apply(distance, vec, centers, gamma, inv_cutoff, w1, b1, w2, b2);
}

}  // namespace
}  // namespace transip_ops

TORCH_LIBRARY_FRAGMENT(transip_ops, m) {
  m.def(
      "edge_encoder(Tensor distance, Tensor vec, Tensor centers, float gamma, float inv_cutoff, "
      "Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> Tensor");
}

// ATen operators only: the same kernel for every backend (CompositeExplicitAutograd), and the
// recomputing autograd function for the Autograd key.
TORCH_LIBRARY_IMPL(transip_ops, CompositeExplicitAutograd, m) {
  m.impl("edge_encoder", &transip_ops::edge_encoder_plain);
}

TORCH_LIBRARY_IMPL(transip_ops, Autograd, m) {
  m.impl("edge_encoder", &transip_ops::edge_encoder_autograd);
}
