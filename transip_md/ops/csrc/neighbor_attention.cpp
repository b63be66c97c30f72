// Registration of the transip_ops operators, input checks and the autograd function.
//
//   neighbor_attention(x, gather_index, edge, envelope, q_tok, q_edge, bias, logit_self)
//       -> (agg_tok, agg_edge, a_sum, a_self)            differentiable (first order)
//   neighbor_attention_forward(...same...) -> (..., row_max, denom)      no autograd
//   neighbor_attention_backward(grads x4, inputs x8, row_max, denom) -> 7 input grads
//
//   neighbor_attention_qkv(qkv, gather_index, edge, envelope, q_edge, bias, logit_self, scale)
//       -> (agg_v, agg_edge, a_sum, a_self)   the per-token key/value form, same structure:
//   neighbor_attention_qkv_forward / neighbor_attention_qkv_backward (6 input grads)
//
// The autograd kernel is a torch::autograd::Function registered for the Autograd key, so the
// derivative works wherever the dispatcher runs the op: Python, TorchScript and libtorch C++
// (the LAMMPS plugin, the check program, OpenMM-Torch).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "transip_ops.h"

namespace transip_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kNoDoubleBackward =
    "transip_ops.neighbor_attention has no double backward; training uses the reference path";
constexpr const char* kNoDoubleBackwardQKV =
    "transip_ops.neighbor_attention_qkv has no double backward; training uses the reference "
    "path";

std::string shape_str(at::IntArrayRef s) {
  std::string o = "[";
  for (size_t i = 0; i < s.size(); ++i) o += cat(i ? ", " : "", s[i]);
  return o + "]";
}

std::string dtype_str(const Tensor& t) { return c10::toString(t.scalar_type()); }

void check_shape(const char* op, const char* name, const Tensor& t,
                 std::vector<int64_t> want, const char* meaning) {
  TORCH_CHECK(t.dim() == static_cast<int64_t>(want.size()) && t.sizes().vec() == want,
              cat(op, ": argument '", name, "' must have shape ", meaning, " = ",
                  shape_str(want), "; got ", shape_str(t.sizes())));
}

// `t` must share the dtype and device of the op's first argument `x` (named `x_name`).
void check_float(const char* op, const char* name, const Tensor& t, const Tensor& x,
                 const char* x_name = "x") {
  TORCH_CHECK(t.defined(), cat(op, ": argument '", name, "' is an undefined tensor"));
  TORCH_CHECK(t.scalar_type() == x.scalar_type(),
              cat(op, ": argument '", name, "' has dtype ", dtype_str(t), " but ", x_name,
                  " has ", dtype_str(x),
                  "; all float arguments must share one dtype (float32 or float64)"));
  TORCH_CHECK(t.device() == x.device(),
              cat(op, ": argument '", name, "' is on ", t.device().str(), " but ", x_name,
                  " is on ", x.device().str(), "; all arguments must be on one device"));
}

std::vector<Tensor> contiguous(std::initializer_list<Tensor> ts) {
  std::vector<Tensor> out;
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

// The checks both operators share, in the order their messages should come: the first
// argument (the token tensor, `name`), gather_index, every float argument's dtype and device
// against the first, the sizes R, K, E, H, then the shapes of the per-slot / per-row arguments.
void check_first(const char* op, const char* name, const Tensor& t, const char* layout) {
  TORCH_CHECK(t.defined(), cat(op, ": argument '", name, "' is an undefined tensor"));
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              cat(op, ": argument '", name, "' must be float32 or float64; got ", dtype_str(t)));
  TORCH_CHECK(t.dim() == 2, cat(op, ": argument '", name, "' must have shape ", layout,
                                "; got ", shape_str(t.sizes())));
}

void check_gather_index(const char* op, const Tensor& gather_index, const char* first_name,
                        const Tensor& first) {
  TORCH_CHECK(gather_index.defined() && gather_index.scalar_type() == at::kLong,
              cat(op, ": argument 'gather_index' must be an int64 tensor; got ",
                  gather_index.defined() ? dtype_str(gather_index) : std::string("undefined")));
  TORCH_CHECK(gather_index.device() == first.device(),
              cat(op, ": argument 'gather_index' is on ", gather_index.device().str(), " but ",
                  first_name, " is on ", first.device().str(),
                  "; all arguments must be on one device"));
  TORCH_CHECK(gather_index.dim() == 2,
              cat(op, ": argument 'gather_index' must have shape [R, K]; got ",
                  shape_str(gather_index.sizes())));
}

// R, K from gather_index, E from edge, H from logit_self; M and W are the caller's.
void read_slot_dims(const char* op, Dims& d, const Tensor& gather_index, const Tensor& edge,
                    const Tensor& logit_self, const char* first_name) {
  d.R = gather_index.size(0);
  d.K = gather_index.size(1);
  TORCH_CHECK(edge.dim() == 3, cat(op, ": argument 'edge' must have shape [R, K, E]; got ",
                                    shape_str(edge.sizes())));
  d.E = edge.size(2);
  TORCH_CHECK(logit_self.dim() == 2 && logit_self.size(1) > 0,
              cat(op, ": argument 'logit_self' must have shape [R, H]; got ",
                  shape_str(logit_self.sizes())));
  d.H = logit_self.size(1);
  TORCH_CHECK(d.R <= d.M, cat(op, ": gather_index has R = ", d.R, " rows but ", first_name,
                               " only M = ", d.M, " (rows >= R of ", first_name,
                               " are ghost rows; R <= M)"));
}

void check_slot_shapes(const char* op, const Dims& d, const Tensor& edge, const Tensor& envelope,
                       const Tensor& bias, const Tensor& logit_self) {
  check_shape(op, "edge", edge, {d.R, d.K, d.E}, "[R, K, E]");
  check_shape(op, "envelope", envelope, {d.R, d.K}, "[R, K]");
  check_shape(op, "bias", bias, {d.R, d.K, d.H}, "[R, K, H]");
  check_shape(op, "logit_self", logit_self, {d.R, d.H}, "[R, H]");
}

void check_index_range(const char* op, const Dims& d, const Tensor& gather_index,
                       const char* first_name) {
  if (!gather_index.device().is_cpu() || gather_index.numel() == 0) return;
  // Cheap on the CPU; on a GPU it would need a host sync (the kernels guard instead).
  const int64_t lo = gather_index.min().item<int64_t>();
  const int64_t hi = gather_index.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < d.M,
              cat(op, ": argument 'gather_index' has values in [", lo, ", ", hi, "] but ",
                  first_name, " has M = ", d.M,
                  " rows (padding slots must be remapped to the row's own index)"));
}

}  // namespace

Dims check_inputs(const char* op, const Tensor& x, const Tensor& gather_index, const Tensor& edge,
                  const Tensor& envelope, const Tensor& q_tok, const Tensor& q_edge,
                  const Tensor& bias, const Tensor& logit_self) {
  check_first(op, "x", x, "[M, W]");
  check_gather_index(op, gather_index, "x", x);
  check_float(op, "edge", edge, x);
  check_float(op, "envelope", envelope, x);
  check_float(op, "q_tok", q_tok, x);
  check_float(op, "q_edge", q_edge, x);
  check_float(op, "bias", bias, x);
  check_float(op, "logit_self", logit_self, x);
  Dims d{};
  d.M = x.size(0);
  d.W = x.size(1);
  read_slot_dims(op, d, gather_index, edge, logit_self, "x");
  check_slot_shapes(op, d, edge, envelope, bias, logit_self);
  check_shape(op, "q_tok", q_tok, {d.R, d.H, d.W}, "[R, H, W]");
  check_shape(op, "q_edge", q_edge, {d.R, d.H, d.E}, "[R, H, E]");
  check_index_range(op, d, gather_index, "x");
  return d;
}

Dims check_inputs_qkv(const char* op, const Tensor& qkv, const Tensor& gather_index,
                      const Tensor& edge, const Tensor& envelope, const Tensor& q_edge,
                      const Tensor& bias, const Tensor& logit_self) {
  check_first(op, "qkv", qkv, "[M, 3W] (queries | keys | values)");
  TORCH_CHECK(qkv.size(1) % 3 == 0,
              cat(op, ": argument 'qkv' must have shape [M, 3W] (queries | keys | values); got ",
                  shape_str(qkv.sizes())));
  check_gather_index(op, gather_index, "qkv", qkv);
  check_float(op, "edge", edge, qkv, "qkv");
  check_float(op, "envelope", envelope, qkv, "qkv");
  check_float(op, "q_edge", q_edge, qkv, "qkv");
  check_float(op, "bias", bias, qkv, "qkv");
  check_float(op, "logit_self", logit_self, qkv, "qkv");
  Dims d{};
  d.M = qkv.size(0);
  d.W = qkv.size(1) / 3;
  read_slot_dims(op, d, gather_index, edge, logit_self, "qkv");
  TORCH_CHECK(d.W % d.H == 0, cat(op, ": the token width W = ", d.W, " (qkv has 3W columns) ",
                                   "is not a multiple of the H = ", d.H, " heads of logit_self"));
  check_slot_shapes(op, d, edge, envelope, bias, logit_self);
  check_shape(op, "q_edge", q_edge, {d.H, d.R, d.E}, "[H, R, E]");
  check_index_range(op, d, gather_index, "qkv");
  return d;
}

bool built_with_cuda() {
#ifdef TRANSIP_OPS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

namespace {

using Tuple4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Tuple6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Tuple7 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

template <bool kCuda>
Tuple6 forward_kernel(const Tensor& x, const Tensor& gather_index, const Tensor& edge,
                      const Tensor& envelope, const Tensor& q_tok, const Tensor& q_edge,
                      const Tensor& bias, const Tensor& logit_self) {
  const char* op = "transip_ops.neighbor_attention";
  Dims d = check_inputs(op, x, gather_index, edge, envelope, q_tok, q_edge, bias, logit_self);
  auto c = contiguous({x, gather_index, edge, envelope, q_tok, q_edge, bias, logit_self});
  std::vector<Tensor> r;
  if constexpr (kCuda) {
#ifdef TRANSIP_OPS_WITH_CUDA
    r = forward_cuda(d, c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]);
#else
    TORCH_CHECK(false,
                cat(op, ": called on CUDA tensors but this transip_ops library was built "
                        "without its CUDA part (no CUDA headers cuda.h/nvrtc.h found at build "
                        "time, or torch has no CUDA); see transip_md.ops.cuda_available() and "
                        "the build log"));
#endif
  } else {
    r = forward_cpu(d, c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]);
  }
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

template <bool kCuda>
Tuple4 plain_kernel(const Tensor& x, const Tensor& gather_index, const Tensor& edge,
                    const Tensor& envelope, const Tensor& q_tok, const Tensor& q_edge,
                    const Tensor& bias, const Tensor& logit_self) {
  auto r = forward_kernel<kCuda>(x, gather_index, edge, envelope, q_tok, q_edge, bias,
                                 logit_self);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
}

template <bool kCuda>
Tuple7 backward_kernel(const Tensor& g_tok, const Tensor& g_edge, const Tensor& g_sum,
                       const Tensor& g_self, const Tensor& x, const Tensor& gather_index,
                       const Tensor& edge, const Tensor& envelope, const Tensor& q_tok,
                       const Tensor& q_edge, const Tensor& bias, const Tensor& logit_self,
                       const Tensor& row_max, const Tensor& denom) {
  const char* op = "transip_ops.neighbor_attention_backward";
  Dims d = check_inputs(op, x, gather_index, edge, envelope, q_tok, q_edge, bias, logit_self);
  check_float(op, "grad_agg_tok", g_tok, x);
  check_float(op, "grad_agg_edge", g_edge, x);
  check_float(op, "grad_a_sum", g_sum, x);
  check_float(op, "grad_a_self", g_self, x);
  check_float(op, "row_max", row_max, x);
  check_float(op, "denom", denom, x);
  check_shape(op, "grad_agg_tok", g_tok, {d.R, d.H, d.W}, "[R, H, W]");
  check_shape(op, "grad_agg_edge", g_edge, {d.R, d.H, d.E}, "[R, H, E]");
  check_shape(op, "grad_a_sum", g_sum, {d.R, d.H}, "[R, H]");
  check_shape(op, "grad_a_self", g_self, {d.R, d.H}, "[R, H]");
  check_shape(op, "row_max", row_max, {d.R, d.H}, "[R, H]");
  check_shape(op, "denom", denom, {d.R, d.H}, "[R, H]");
  auto c = contiguous({g_tok, g_edge, g_sum, g_self, x, gather_index, edge, envelope, q_tok,
                       q_edge, bias, logit_self, row_max, denom});
  std::vector<Tensor> r;
  if constexpr (kCuda) {
#ifdef TRANSIP_OPS_WITH_CUDA
    r = backward_cuda(d, c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10],
                      c[11], c[12], c[13]);
#else
    TORCH_CHECK(false, cat(op, ": called on CUDA tensors but this transip_ops library was "
                               "built without its CUDA part; see "
                               "transip_md.ops.cuda_available()"));
#endif
  } else {
    r = backward_cpu(d, c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10],
                     c[11], c[12], c[13]);
  }
  return {r[0], r[1], r[2], r[3], r[4], r[5], r[6]};
}

// The backward as its own autograd function: its forward computes the first derivatives, its
// backward (a second derivative) refuses. Without it, create_graph=True would silently return
// gradients that are constants to autograd.
class NeighborAttentionBackward : public torch::autograd::Function<NeighborAttentionBackward> {
 public:
  static variable_list forward(AutogradContext*, const Tensor& g_tok, const Tensor& g_edge,
                               const Tensor& g_sum, const Tensor& g_self, const Tensor& x,
                               const Tensor& gather_index, const Tensor& edge,
                               const Tensor& envelope, const Tensor& q_tok, const Tensor& q_edge,
                               const Tensor& bias, const Tensor& logit_self,
                               const Tensor& row_max, const Tensor& denom) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("transip_ops::neighbor_attention_backward", "")
                         .typed<Tuple7(const Tensor&, const Tensor&, const Tensor&,
                                       const Tensor&, const Tensor&, const Tensor&,
                                       const Tensor&, const Tensor&, const Tensor&,
                                       const Tensor&, const Tensor&, const Tensor&,
                                       const Tensor&, const Tensor&)>();
    auto r = op.call(g_tok, g_edge, g_sum, g_self, x, gather_index, edge, envelope, q_tok,
                     q_edge, bias, logit_self, row_max, denom);
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r),
            std::get<5>(r), std::get<6>(r)};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, kNoDoubleBackward);
  }
};

class NeighborAttention : public torch::autograd::Function<NeighborAttention> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& gather_index,
                               const Tensor& edge, const Tensor& envelope, const Tensor& q_tok,
                               const Tensor& q_edge, const Tensor& bias,
                               const Tensor& logit_self) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("transip_ops::neighbor_attention_forward", "")
                         .typed<Tuple6(const Tensor&, const Tensor&, const Tensor&,
                                       const Tensor&, const Tensor&, const Tensor&,
                                       const Tensor&, const Tensor&)>();
    auto r = op.call(x, gather_index, edge, envelope, q_tok, q_edge, bias, logit_self);
    ctx->save_for_backward({x, gather_index, edge, envelope, q_tok, q_edge, bias, logit_self,
                            std::get<4>(r), std::get<5>(r)});
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    // Unused outputs arrive as zeros (materialised grads); zeros cost a little, nothing more.
    auto g = NeighborAttentionBackward::apply(grads[0], grads[1], grads[2], grads[3], s[0], s[1],
                                              s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9]);
    return {g[0], Tensor(), g[1], g[2], g[3], g[4], g[5], g[6]};
  }
};

Tuple4 autograd_kernel(const Tensor& x, const Tensor& gather_index, const Tensor& edge,
                       const Tensor& envelope, const Tensor& q_tok, const Tensor& q_edge,
                       const Tensor& bias, const Tensor& logit_self) {
  auto r = NeighborAttention::apply(x, gather_index, edge, envelope, q_tok, q_edge, bias,
                                    logit_self);
  return {r[0], r[1], r[2], r[3]};
}

// Meta kernels: shapes only, after the same checks (torch.compile / export tracing, and a
// meta tensor mixed with real ones gets the device error naming the argument).
Tuple6 forward_meta(const Tensor& x, const Tensor& gather_index, const Tensor& edge,
                    const Tensor& envelope, const Tensor& q_tok, const Tensor& q_edge,
                    const Tensor& bias, const Tensor& logit_self) {
  Dims d = check_inputs("transip_ops.neighbor_attention", x, gather_index, edge, envelope, q_tok,
                        q_edge, bias, logit_self);
  auto opt = x.options();
  return {at::empty({d.R, d.H, d.W}, opt), at::empty({d.R, d.H, d.E}, opt),
          at::empty({d.R, d.H}, opt),      at::empty({d.R, d.H}, opt),
          at::empty({d.R, d.H}, opt),      at::empty({d.R, d.H}, opt)};
}

Tuple4 plain_meta(const Tensor& x, const Tensor& gather_index, const Tensor& edge,
                  const Tensor& envelope, const Tensor& q_tok, const Tensor& q_edge,
                  const Tensor& bias, const Tensor& logit_self) {
  auto r = forward_meta(x, gather_index, edge, envelope, q_tok, q_edge, bias, logit_self);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
}

Tuple7 backward_meta(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor& x,
                     const Tensor& gather_index, const Tensor& edge, const Tensor& envelope,
                     const Tensor& q_tok, const Tensor& q_edge, const Tensor& bias,
                     const Tensor& logit_self, const Tensor&, const Tensor&) {
  check_inputs("transip_ops.neighbor_attention_backward", x, gather_index, edge, envelope, q_tok,
               q_edge, bias, logit_self);
  return {at::empty_like(x),     at::empty_like(edge),   at::empty_like(envelope),
          at::empty_like(q_tok), at::empty_like(q_edge), at::empty_like(bias),
          at::empty_like(logit_self)};
}

// ---------------------------------------------------------------- neighbor_attention_qkv
template <bool kCuda>
Tuple6 qkv_forward_kernel(const Tensor& qkv, const Tensor& gather_index, const Tensor& edge,
                          const Tensor& envelope, const Tensor& q_edge, const Tensor& bias,
                          const Tensor& logit_self, double scale) {
  const char* op = "transip_ops.neighbor_attention_qkv";
  Dims d = check_inputs_qkv(op, qkv, gather_index, edge, envelope, q_edge, bias, logit_self);
  auto c = contiguous({qkv, gather_index, edge, envelope, q_edge, bias, logit_self});
  std::vector<Tensor> r;
  if constexpr (kCuda) {
#ifdef TRANSIP_OPS_WITH_CUDA
    r = forward_qkv_cuda(d, c[0], c[1], c[2], c[3], c[4], c[5], c[6], scale);
#else
    TORCH_CHECK(false, cat(op, ": called on CUDA tensors but this transip_ops library was "
                               "built without its CUDA part; see "
                               "transip_md.ops.cuda_available()"));
#endif
  } else {
    r = forward_qkv_cpu(d, c[0], c[1], c[2], c[3], c[4], c[5], c[6], scale);
  }
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

template <bool kCuda>
Tuple4 qkv_plain_kernel(const Tensor& qkv, const Tensor& gather_index, const Tensor& edge,
                        const Tensor& envelope, const Tensor& q_edge, const Tensor& bias,
                        const Tensor& logit_self, double scale) {
  auto r = qkv_forward_kernel<kCuda>(qkv, gather_index, edge, envelope, q_edge, bias,
                                     logit_self, scale);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
}

template <bool kCuda>
Tuple6 qkv_backward_kernel(const Tensor& g_v, const Tensor& g_edge, const Tensor& g_sum,
                           const Tensor& g_self, const Tensor& qkv, const Tensor& gather_index,
                           const Tensor& edge, const Tensor& envelope, const Tensor& q_edge,
                           const Tensor& bias, const Tensor& logit_self, const Tensor& row_max,
                           const Tensor& denom, double scale) {
  const char* op = "transip_ops.neighbor_attention_qkv_backward";
  Dims d = check_inputs_qkv(op, qkv, gather_index, edge, envelope, q_edge, bias, logit_self);
  check_float(op, "grad_agg_v", g_v, qkv, "qkv");
  check_float(op, "grad_agg_edge", g_edge, qkv, "qkv");
  check_float(op, "grad_a_sum", g_sum, qkv, "qkv");
  check_float(op, "grad_a_self", g_self, qkv, "qkv");
  check_float(op, "row_max", row_max, qkv, "qkv");
  check_float(op, "denom", denom, qkv, "qkv");
  check_shape(op, "grad_agg_v", g_v, {d.R, d.W}, "[R, W]");
  check_shape(op, "grad_agg_edge", g_edge, {d.R, d.H, d.E}, "[R, H, E]");
  check_shape(op, "grad_a_sum", g_sum, {d.R, d.H}, "[R, H]");
  check_shape(op, "grad_a_self", g_self, {d.R, d.H}, "[R, H]");
  check_shape(op, "row_max", row_max, {d.R, d.H}, "[R, H]");
  check_shape(op, "denom", denom, {d.R, d.H}, "[R, H]");
  auto c = contiguous({g_v, g_edge, g_sum, g_self, qkv, gather_index, edge, envelope, q_edge,
                       bias, logit_self, row_max, denom});
  std::vector<Tensor> r;
  if constexpr (kCuda) {
#ifdef TRANSIP_OPS_WITH_CUDA
    r = backward_qkv_cuda(d, c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10],
                          c[11], c[12], scale);
#else
    TORCH_CHECK(false, cat(op, ": called on CUDA tensors but this transip_ops library was "
                               "built without its CUDA part; see "
                               "transip_md.ops.cuda_available()"));
#endif
  } else {
    r = backward_qkv_cpu(d, c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10],
                         c[11], c[12], scale);
  }
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

class NeighborAttentionQKVBackward
    : public torch::autograd::Function<NeighborAttentionQKVBackward> {
 public:
  static variable_list forward(AutogradContext*, const Tensor& g_v, const Tensor& g_edge,
                               const Tensor& g_sum, const Tensor& g_self, const Tensor& qkv,
                               const Tensor& gather_index, const Tensor& edge,
                               const Tensor& envelope, const Tensor& q_edge, const Tensor& bias,
                               const Tensor& logit_self, const Tensor& row_max,
                               const Tensor& denom, double scale) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("transip_ops::neighbor_attention_qkv_backward", "")
                         .typed<Tuple6(const Tensor&, const Tensor&, const Tensor&,
                                       const Tensor&, const Tensor&, const Tensor&,
                                       const Tensor&, const Tensor&, const Tensor&,
                                       const Tensor&, const Tensor&, const Tensor&,
                                       const Tensor&, double)>();
    auto r = op.call(g_v, g_edge, g_sum, g_self, qkv, gather_index, edge, envelope, q_edge, bias,
                     logit_self, row_max, denom, scale);
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r),
            std::get<5>(r)};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, kNoDoubleBackwardQKV);
  }
};

class NeighborAttentionQKV : public torch::autograd::Function<NeighborAttentionQKV> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& qkv,
                               const Tensor& gather_index, const Tensor& edge,
                               const Tensor& envelope, const Tensor& q_edge, const Tensor& bias,
                               const Tensor& logit_self, double scale) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("transip_ops::neighbor_attention_qkv_forward", "")
                         .typed<Tuple6(const Tensor&, const Tensor&, const Tensor&,
                                       const Tensor&, const Tensor&, const Tensor&,
                                       const Tensor&, double)>();
    auto r = op.call(qkv, gather_index, edge, envelope, q_edge, bias, logit_self, scale);
    ctx->save_for_backward({qkv, gather_index, edge, envelope, q_edge, bias, logit_self,
                            std::get<4>(r), std::get<5>(r)});
    ctx->saved_data["scale"] = scale;
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const double scale = ctx->saved_data["scale"].toDouble();
    auto g = NeighborAttentionQKVBackward::apply(grads[0], grads[1], grads[2], grads[3], s[0],
                                                 s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8],
                                                 scale);
    return {g[0], Tensor(), g[1], g[2], g[3], g[4], g[5], Tensor()};
  }
};

Tuple4 qkv_autograd_kernel(const Tensor& qkv, const Tensor& gather_index, const Tensor& edge,
                           const Tensor& envelope, const Tensor& q_edge, const Tensor& bias,
                           const Tensor& logit_self, double scale) {
  auto r = NeighborAttentionQKV::apply(qkv, gather_index, edge, envelope, q_edge, bias,
                                       logit_self, scale);
  return {r[0], r[1], r[2], r[3]};
}

Tuple6 qkv_forward_meta(const Tensor& qkv, const Tensor& gather_index, const Tensor& edge,
                        const Tensor& envelope, const Tensor& q_edge, const Tensor& bias,
                        const Tensor& logit_self, double) {
  Dims d = check_inputs_qkv("transip_ops.neighbor_attention_qkv", qkv, gather_index, edge,
                            envelope, q_edge, bias, logit_self);
  auto opt = qkv.options();
  return {at::empty({d.R, d.W}, opt),  at::empty({d.R, d.H, d.E}, opt),
          at::empty({d.R, d.H}, opt),  at::empty({d.R, d.H}, opt),
          at::empty({d.R, d.H}, opt),  at::empty({d.R, d.H}, opt)};
}

Tuple4 qkv_plain_meta(const Tensor& qkv, const Tensor& gather_index, const Tensor& edge,
                      const Tensor& envelope, const Tensor& q_edge, const Tensor& bias,
                      const Tensor& logit_self, double scale) {
  auto r = qkv_forward_meta(qkv, gather_index, edge, envelope, q_edge, bias, logit_self, scale);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
}

Tuple6 qkv_backward_meta(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                         const Tensor& qkv, const Tensor& gather_index, const Tensor& edge,
                         const Tensor& envelope, const Tensor& q_edge, const Tensor& bias,
                         const Tensor& logit_self, const Tensor&, const Tensor&, double) {
  check_inputs_qkv("transip_ops.neighbor_attention_qkv_backward", qkv, gather_index, edge,
                   envelope, q_edge, bias, logit_self);
  return {at::empty_like(qkv),    at::empty_like(edge), at::empty_like(envelope),
          at::empty_like(q_edge), at::empty_like(bias), at::empty_like(logit_self)};
}

std::string build_info() {
  std::string o = "transip_ops: CPU kernels";
#ifdef TRANSIP_OPS_WITH_CUDA
  o += ", CUDA kernels (NVRTC at run time)";
#else
  o += ", no CUDA part";
#endif
  return o;
}

}  // namespace
}  // namespace transip_ops

TORCH_LIBRARY(transip_ops, m) {
  m.def(
      "neighbor_attention(Tensor x, Tensor gather_index, Tensor edge, Tensor envelope, "
      "Tensor q_tok, Tensor q_edge, Tensor bias, Tensor logit_self) "
      "-> (Tensor agg_tok, Tensor agg_edge, Tensor a_sum, Tensor a_self)");
  m.def(
      "neighbor_attention_forward(Tensor x, Tensor gather_index, Tensor edge, Tensor envelope, "
      "Tensor q_tok, Tensor q_edge, Tensor bias, Tensor logit_self) "
      "-> (Tensor agg_tok, Tensor agg_edge, Tensor a_sum, Tensor a_self, Tensor row_max, "
      "Tensor denom)");
  m.def(
      "neighbor_attention_backward(Tensor grad_agg_tok, Tensor grad_agg_edge, "
      "Tensor grad_a_sum, Tensor grad_a_self, Tensor x, Tensor gather_index, Tensor edge, "
      "Tensor envelope, Tensor q_tok, Tensor q_edge, Tensor bias, Tensor logit_self, "
      "Tensor row_max, Tensor denom) -> (Tensor grad_x, Tensor grad_edge, Tensor grad_envelope, "
      "Tensor grad_q_tok, Tensor grad_q_edge, Tensor grad_bias, Tensor grad_logit_self)");
  m.def(
      "neighbor_attention_qkv(Tensor qkv, Tensor gather_index, Tensor edge, Tensor envelope, "
      "Tensor q_edge, Tensor bias, Tensor logit_self, float scale) "
      "-> (Tensor agg_v, Tensor agg_edge, Tensor a_sum, Tensor a_self)");
  m.def(
      "neighbor_attention_qkv_forward(Tensor qkv, Tensor gather_index, Tensor edge, "
      "Tensor envelope, Tensor q_edge, Tensor bias, Tensor logit_self, float scale) "
      "-> (Tensor agg_v, Tensor agg_edge, Tensor a_sum, Tensor a_self, Tensor row_max, "
      "Tensor denom)");
  m.def(
      "neighbor_attention_qkv_backward(Tensor grad_agg_v, Tensor grad_agg_edge, "
      "Tensor grad_a_sum, Tensor grad_a_self, Tensor qkv, Tensor gather_index, Tensor edge, "
      "Tensor envelope, Tensor q_edge, Tensor bias, Tensor logit_self, Tensor row_max, "
      "Tensor denom, float scale) -> (Tensor grad_qkv, Tensor grad_edge, Tensor grad_envelope, "
      "Tensor grad_q_edge, Tensor grad_bias, Tensor grad_logit_self)");
  m.def("with_cuda() -> bool", &transip_ops::built_with_cuda);
  m.def("build_info() -> str", &transip_ops::build_info);
#ifdef TRANSIP_OPS_WITH_CUDA
  m.def("nvrtc_check(int arch, str dtype, int width, int heads, int edge_width, "
        "bool verbose=False) -> str",
        &transip_ops::nvrtc_check);
  m.def("cuda_backward_variant(str set=\"\") -> str", &transip_ops::cuda_backward_variant);
  m.def("cuda_qkv_backward_variant(str set=\"\") -> str",
        &transip_ops::cuda_qkv_backward_variant);
#endif
}

TORCH_LIBRARY_IMPL(transip_ops, CPU, m) {
  m.impl("neighbor_attention", &transip_ops::plain_kernel<false>);
  m.impl("neighbor_attention_forward", &transip_ops::forward_kernel<false>);
  m.impl("neighbor_attention_backward", &transip_ops::backward_kernel<false>);
  m.impl("neighbor_attention_qkv", &transip_ops::qkv_plain_kernel<false>);
  m.impl("neighbor_attention_qkv_forward", &transip_ops::qkv_forward_kernel<false>);
  m.impl("neighbor_attention_qkv_backward", &transip_ops::qkv_backward_kernel<false>);
}

TORCH_LIBRARY_IMPL(transip_ops, CUDA, m) {
  m.impl("neighbor_attention", &transip_ops::plain_kernel<true>);
  m.impl("neighbor_attention_forward", &transip_ops::forward_kernel<true>);
  m.impl("neighbor_attention_backward", &transip_ops::backward_kernel<true>);
  m.impl("neighbor_attention_qkv", &transip_ops::qkv_plain_kernel<true>);
  m.impl("neighbor_attention_qkv_forward", &transip_ops::qkv_forward_kernel<true>);
  m.impl("neighbor_attention_qkv_backward", &transip_ops::qkv_backward_kernel<true>);
}

TORCH_LIBRARY_IMPL(transip_ops, Meta, m) {
  m.impl("neighbor_attention", &transip_ops::plain_meta);
  m.impl("neighbor_attention_forward", &transip_ops::forward_meta);
  m.impl("neighbor_attention_backward", &transip_ops::backward_meta);
  m.impl("neighbor_attention_qkv", &transip_ops::qkv_plain_meta);
  m.impl("neighbor_attention_qkv_forward", &transip_ops::qkv_forward_meta);
  m.impl("neighbor_attention_qkv_backward", &transip_ops::qkv_backward_meta);
}

TORCH_LIBRARY_IMPL(transip_ops, Autograd, m) {
  m.impl("neighbor_attention", &transip_ops::autograd_kernel);
  m.impl("neighbor_attention_qkv", &transip_ops::qkv_autograd_kernel);
}
