// What both CPU attention operators share (neighbor_attention_cpu.cpp,
// neighbor_attention_qkv_cpu.cpp): the row loops' small vector helpers and task grain, and the
// per-row softmax: the envelope-weighted softmax over a row's K slots and its self slot, and
// its backward to the logits. Only the logits and the aggregated values differ between the
// two operators; this part is written once.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace transip_ops {
namespace cpu {

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
  for (int64_t c = 0; c < n; ++c) s += a[c] * b[c];
  return s;
}

template <typename T>
inline void axpy(T alpha, const T* x, T* y, int64_t n) {
  for (int64_t c = 0; c < n; ++c) y[c] += alpha * x[c];
}

// Rows per task: a row costs ~K*H*(W+E) multiply-adds, so a few rows already amortise the task.
constexpr int64_t kRowGrain = 8;

// weight [K, H]: in, the logits of the valid slots (envelope > 0; the others are not read);
// out, the normalised weights a. ls, row_max, denom, a_sum, a_self: the row's [H] entries.
template <typename T>
inline void softmax_row(int64_t K, int64_t H, const T* env, const T* ls, T* weight, T* row_max,
                        T* denom, T* a_sum, T* a_self) {
  for (int64_t h = 0; h < H; ++h) {
    T m = ls[h];
    for (int64_t k = 0; k < K; ++k)
      if (env[k] > 0) m = std::max(m, weight[k * H + h]);
    const T u_self = std::exp(ls[h] - m);
    T D = u_self;
    for (int64_t k = 0; k < K; ++k) {
      const T t = env[k] > 0 ? std::exp(weight[k * H + h] - m) : T(1);
      const T u = env[k] * t;
      weight[k * H + h] = u;
      D += u;
    }
    T sum = 0;
    for (int64_t k = 0; k < K; ++k) {
      weight[k * H + h] /= D;
      sum += weight[k * H + h];
    }
    row_max[h] = m;
    denom[h] = D;
    a_sum[h] = sum;
    a_self[h] = u_self / D;
  }
}

// Backward of softmax_row for one row. a, ga, t [K, H]: the weights, the gradients reaching
// them (dL/da) and t = valid ? exp(l - m) : 1; ls, mx, den, gself: the row's [H] entries.
// Writes c [H] (scratch), dls [H], dl [K, H] (the logit gradients, 0 for invalid slots),
// dbias [K, H] (= dl) and denv [K]:
//   c = sum_k a ga + a_self gself    dl = valid ? a (ga - c) : 0    dls = a_self (gself - c)
//   denv[k] = sum_h (ga - c) t / D
template <typename T>
inline void softmax_row_backward(int64_t K, int64_t H, const T* env, const T* ls, const T* mx,
                                 const T* den, const T* gself, const T* a, const T* ga,
                                 const T* t, T* c, T* dls, T* dl, T* dbias, T* denv) {
  for (int64_t h = 0; h < H; ++h) {
    const T as = std::exp(ls[h] - mx[h]) / den[h];
    T s = as * gself[h];
    for (int64_t k = 0; k < K; ++k) s += a[k * H + h] * ga[k * H + h];
    c[h] = s;
    dls[h] = as * (gself[h] - s);
  }
  for (int64_t k = 0; k < K; ++k) {
    const bool valid = env[k] > 0;
    T de = 0;
    for (int64_t h = 0; h < H; ++h) {
      const T g = ga[k * H + h] - c[h];
      de += g * t[k * H + h] / den[h];
      const T v = valid ? a[k * H + h] * g : T(0);
      dl[k * H + h] = v;
      dbias[k * H + h] = v;
    }
    denv[k] = de;
  }
}

}  // namespace cpu
}  // namespace transip_ops
