// Shared declarations of the transip_ops library (fused neighbour attention, issue #16).
// The semantics are written out in /work/notes/fused_op.md and in transip_md/ops/__init__.py;
// transip_md/model/transformer.py (AttentionLayer.forward) is the reference they must equal.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <type_traits>
#include <vector>

namespace transip_ops {

using at::Tensor;

// Messages are built as ONE std::string with std::to_string and concatenation, never through
// iostreams, and TORCH_CHECK gets that single string (c10::str passes a lone std::string
// through without an ostringstream). Streaming a number from this g++-built library
// (ostringstream << int64_t, which c10::str does for several arguments) crashed inside the
// op with a torch wheel built by a newer GCC toolset (torch 2.11: its libstdc++ parts and ours
// disagree on the locale's num_put state). Strings, C strings and integers only; use
// c10::toString(ScalarType) and Device::str() for those.
namespace detail {
inline void cat_one(std::string& s, const char* p) { s += p ? p : "(null)"; }
inline void cat_one(std::string& s, const std::string& p) { s += p; }
template <typename I, std::enable_if_t<std::is_integral_v<I> && !std::is_same_v<I, bool> &&
                                           !std::is_same_v<I, char>, int> = 0>
inline void cat_one(std::string& s, I v) {
  s += std::to_string(v);
}
}  // namespace detail

template <typename... A>
std::string cat(const A&... a) {
  std::string s;
  (detail::cat_one(s, a), ...);
  return s;
}

// Sizes of one call, read from the inputs by check_inputs.
struct Dims {
  int64_t M;  // rows of x (R of them attend, the rest are ghost / neighbour-only rows)
  int64_t W;  // token width
  int64_t R;  // attending rows
  int64_t K;  // padded neighbour slots per row
  int64_t E;  // edge feature width
  int64_t H;  // heads
};

// Validates the eight forward inputs; errors name the argument, its expected and actual shape,
// dtype or device. `op` is the operator's name for the message.
Dims check_inputs(const char* op, const Tensor& x, const Tensor& gather_index, const Tensor& edge,
                  const Tensor& envelope, const Tensor& q_tok, const Tensor& q_edge,
                  const Tensor& bias, const Tensor& logit_self);

// Forward: {agg_tok, agg_edge, a_sum, a_self, row_max, denom}. row_max (m) and denom (D), both
// [R, H], are what the backward needs besides the inputs (it recomputes the logits).
std::vector<Tensor> forward_cpu(const Dims& d, const Tensor& x, const Tensor& gather_index,
                                const Tensor& edge, const Tensor& envelope, const Tensor& q_tok,
                                const Tensor& q_edge, const Tensor& bias,
                                const Tensor& logit_self);

// Backward: {dx, dedge, denvelope, dq_tok, dq_edge, dbias, dlogit_self}.
std::vector<Tensor> backward_cpu(const Dims& d, const Tensor& g_tok, const Tensor& g_edge,
                                 const Tensor& g_sum, const Tensor& g_self, const Tensor& x,
                                 const Tensor& gather_index, const Tensor& edge,
                                 const Tensor& envelope, const Tensor& q_tok,
                                 const Tensor& q_edge, const Tensor& bias,
                                 const Tensor& logit_self, const Tensor& row_max,
                                 const Tensor& denom);

// ---- neighbor_attention_qkv: the per-token key/value form (issue #16, memory and FLOPs) ----
// Inputs: qkv [M, 3W] (row j: q_j | k_j | v_j, head h owning columns h*D..h*D+D-1 of each
// third, D = W / H; only rows < R need q), gather_index [R, K], edge [R, K, E], envelope
// [R, K], q_edge [H, R, E] (head-major), bias [R, K, H], logit_self [R, H], scale (double):
//   l[i,k,h] = scale * q_i,h . k_{idx[i,k]},h + edge[i,k] . q_edge[h,i] + bias[i,k,h]
//   softmax with envelope weights and the self slot exactly as neighbor_attention
//   agg_v[i, h*D + c] = sum_k a[i,k,h] v_{idx[i,k]},h[c]     agg_edge, a_sum, a_self as before
// Per edge it costs ~2W + 2HE multiply-adds (the folded form: 2HW + 2HE) and it keeps no
// [R, H, W] tensor. Dims.W is the token width (qkv has 3W columns).
Dims check_inputs_qkv(const char* op, const Tensor& qkv, const Tensor& gather_index,
                      const Tensor& edge, const Tensor& envelope, const Tensor& q_edge,
                      const Tensor& bias, const Tensor& logit_self);

// Forward: {agg_v [R, W], agg_edge [R, H, E], a_sum, a_self, row_max, denom}.
std::vector<Tensor> forward_qkv_cpu(const Dims& d, const Tensor& qkv, const Tensor& gather_index,
                                    const Tensor& edge, const Tensor& envelope,
                                    const Tensor& q_edge, const Tensor& bias,
                                    const Tensor& logit_self, double scale);

// Backward: {dqkv [M, 3W], dedge, denvelope, dq_edge [H, R, E], dbias, dlogit_self}.
std::vector<Tensor> backward_qkv_cpu(const Dims& d, const Tensor& g_v, const Tensor& g_edge,
                                     const Tensor& g_sum, const Tensor& g_self,
                                     const Tensor& qkv, const Tensor& gather_index,
                                     const Tensor& edge, const Tensor& envelope,
                                     const Tensor& q_edge, const Tensor& bias,
                                     const Tensor& logit_self, const Tensor& row_max,
                                     const Tensor& denom, double scale);

// True when the library was compiled with its CUDA part (NVRTC + driver API).
bool built_with_cuda();

#ifdef TRANSIP_OPS_WITH_CUDA
std::vector<Tensor> forward_cuda(const Dims& d, const Tensor& x, const Tensor& gather_index,
                                 const Tensor& edge, const Tensor& envelope, const Tensor& q_tok,
                                 const Tensor& q_edge, const Tensor& bias,
                                 const Tensor& logit_self);
std::vector<Tensor> backward_cuda(const Dims& d, const Tensor& g_tok, const Tensor& g_edge,
                                  const Tensor& g_sum, const Tensor& g_self, const Tensor& x,
                                  const Tensor& gather_index, const Tensor& edge,
                                  const Tensor& envelope, const Tensor& q_tok,
                                  const Tensor& q_edge, const Tensor& bias,
                                  const Tensor& logit_self, const Tensor& row_max,
                                  const Tensor& denom);
std::vector<Tensor> forward_qkv_cuda(const Dims& d, const Tensor& qkv,
                                     const Tensor& gather_index, const Tensor& edge,
                                     const Tensor& envelope, const Tensor& q_edge,
                                     const Tensor& bias, const Tensor& logit_self, double scale);
std::vector<Tensor> backward_qkv_cuda(const Dims& d, const Tensor& g_v, const Tensor& g_edge,
                                      const Tensor& g_sum, const Tensor& g_self,
                                      const Tensor& qkv, const Tensor& gather_index,
                                      const Tensor& edge, const Tensor& envelope,
                                      const Tensor& q_edge, const Tensor& bias,
                                      const Tensor& logit_self, const Tensor& row_max,
                                      const Tensor& denom, double scale);
// Compiles the kernels with NVRTC for `arch` (e.g. 90) without needing a GPU; returns a line
// naming the NVRTC library used and the binary size, plus ptxas' register report when
// `verbose` (errors carry NVRTC's log).
std::string nvrtc_check(int64_t arch, std::string dtype, int64_t width, int64_t heads,
                        int64_t edge_width, bool verbose);
// The CUDA backward kernel that later calls use: "vector" (na_backward, the default) or
// "scalar" (na_backward_scalar, the original; also turns off the forward's 16-byte loads).
// Initially $TRANSIP_OPS_BACKWARD (read once); a non-empty `set` switches it. Returns it.
std::string cuda_backward_variant(std::string set);
// How the qkv backward forms the k / v parts: "gather" (the default: per-row sums over the
// slots that gathered the row, no atomics) or "atomic" (scatter with atomicAdd). Initially
// $TRANSIP_OPS_QKV_BACKWARD (read once); a non-empty `set` switches it. Returns it.
std::string cuda_qkv_backward_variant(std::string set);
#endif

}  // namespace transip_ops
