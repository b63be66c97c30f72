// CPU kernels of neighbor_attention_qkv, the per-token key/value form of the fused neighbour
// attention (semantics in transip_ops.h and transip_md/ops/__init__.py). Plain loops over rows,
// templated on the float type, written like neighbor_attention_cpu.cpp: clarity and exact
// agreement with the reference first (CI and small CPU runs), speed second.
//
// Per row i and head h the token part of a logit is scale * q_i,h . k_j,h over the head's D
// columns only, and the value is v_j,h: per edge ~2W + 2HE multiply-adds instead of the folded
// form's 2HW + 2HE.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "neighbor_softmax_cpu.h"
#include "transip_ops.h"

namespace transip_ops {
namespace {

using cpu::axpy;
using cpu::dot;
using cpu::kRowGrain;


// Row views of qkv [M, 3W]: q, k and v of row j, head h (D columns each).
template <typename T>
struct QKV {
  const T* base;
  int64_t W, D;
  const T* q(int64_t j, int64_t h) const { return base + j * 3 * W + h * D; }
  const T* k(int64_t j, int64_t h) const { return base + j * 3 * W + W + h * D; }
  const T* v(int64_t j, int64_t h) const { return base + j * 3 * W + 2 * W + h * D; }
};

template <typename T>
inline T logit(const QKV<T>& t, T scale, int64_t i, int64_t j, int64_t h, const T* ek,
               const T* qe, T b, int64_t E) {
  return scale * dot(t.q(i, h), t.k(j, h), t.D) + dot(ek, qe, E) + b;
}

template <typename T>
void forward_rows(const Dims& d, const T* QKVP, const int64_t* I, const T* EDGE, const T* ENV,
                  const T* QE, const T* B, const T* LS, T scale, T* agg_v, T* agg_edge,
                  T* a_sum, T* a_self, T* row_max, T* denom) {
  const int64_t W = d.W, K = d.K, E = d.E, H = d.H, R = d.R, D = d.W / d.H;
  const QKV<T> t{QKVP, W, D};
  at::parallel_for(0, R, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<T> weight(K * H);  // logits, then u, then a
    for (int64_t i = begin; i < end; ++i) {
      const int64_t* idx = I + i * K;
      const T* env = ENV + i * K;
      for (int64_t k = 0; k < K; ++k) {
        if (!(env[k] > 0)) continue;  // invalid slots: replaced by m, never read
        const T* ek = EDGE + (i * K + k) * E;
        for (int64_t h = 0; h < H; ++h)
          weight[k * H + h] =
              logit(t, scale, i, idx[k], h, ek, QE + (h * R + i) * E, B[(i * K + k) * H + h], E);
      }
      cpu::softmax_row(K, H, env, LS + i * H, weight.data(), row_max + i * H, denom + i * H,
                       a_sum + i * H, a_self + i * H);
      T* out_v = agg_v + i * W;
      T* out_edge = agg_edge + i * H * E;
      std::fill(out_v, out_v + W, T(0));
      std::fill(out_edge, out_edge + H * E, T(0));
      for (int64_t k = 0; k < K; ++k) {
        const T* ek = EDGE + (i * K + k) * E;
        for (int64_t h = 0; h < H; ++h) {
          const T a = weight[k * H + h];
          if (a == T(0)) continue;  // envelope 0: contributes exactly 0 (finite inputs)
          axpy(a, t.v(idx[k], h), out_v + h * D, D);
          axpy(a, ek, out_edge + h * E, E);
        }
      }
    }
  });
}

template <typename T>
void backward_rows(const Dims& d, const T* GV, const T* GE, const T* GS, const T* GSELF,
                   const T* QKVP, const int64_t* I, const T* EDGE, const T* ENV, const T* QE,
                   const T* B, const T* LS, const T* MX, const T* DEN, T scale, T* dqkv,
                   T* dedge, T* denv, T* dqe, T* dbias, T* dls, T* A, T* DL) {
  const int64_t W = d.W, K = d.K, E = d.E, H = d.H, R = d.R, D = d.W / d.H;
  const QKV<T> t{QKVP, W, D};
  // Pass 1, parallel over rows: everything that belongs to row i alone (the q part of dqkv
  // included). The weights a and the logit gradients dl are kept (A, DL) for pass 2.
  at::parallel_for(0, R, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<T> e_buf(K * H), ga_buf(K * H), c(H);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t* idx = I + i * K;
      const T* env = ENV + i * K;
      T* a = A + i * K * H;
      T* dl = DL + i * K * H;
      for (int64_t k = 0; k < K; ++k) {
        const bool valid = env[k] > 0;
        const T* ek = EDGE + (i * K + k) * E;
        for (int64_t h = 0; h < H; ++h) {
          T e = 1;
          if (valid)
            e = std::exp(logit(t, scale, i, idx[k], h, ek, QE + (h * R + i) * E,
                               B[(i * K + k) * H + h], E) -
                         MX[i * H + h]);
          e_buf[k * H + h] = e;
          a[k * H + h] = env[k] * e / DEN[i * H + h];
          ga_buf[k * H + h] = dot(GV + i * W + h * D, t.v(idx[k], h), D) +
                              dot(GE + (i * H + h) * E, ek, E) + GS[i * H + h];
        }
      }
      cpu::softmax_row_backward(K, H, env, LS + i * H, MX + i * H, DEN + i * H, GSELF + i * H, a,
                                ga_buf.data(), e_buf.data(), c.data(), dls + i * H, dl,
                                dbias + i * K * H, denv + i * K);
      T* gq = dqkv + i * 3 * W;  // q part of row i: only this row's task writes it
      for (int64_t h = 0; h < H; ++h) std::fill(dqe + (h * R + i) * E, dqe + (h * R + i + 1) * E, T(0));
      for (int64_t k = 0; k < K; ++k) {
        const T* ek = EDGE + (i * K + k) * E;
        T* dek = dedge + (i * K + k) * E;
        std::fill(dek, dek + E, T(0));
        for (int64_t h = 0; h < H; ++h) {
          const T ak = a[k * H + h], dlk = dl[k * H + h];
          if (dlk != T(0)) {
            axpy(scale * dlk, t.k(idx[k], h), gq + h * D, D);
            axpy(dlk, ek, dqe + (h * R + i) * E, E);
            axpy(dlk, QE + (h * R + i) * E, dek, E);
          }
          if (ak != T(0)) axpy(ak, GE + (i * H + h) * E, dek, E);
        }
      }
    }
  });
  // Pass 2: the scatter into the k and v parts of dqkv (slots of different rows may name the
  // same row), race-free and deterministic: tasks split the heads, not the rows.
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t i = 0; i < R; ++i) {
      for (int64_t k = 0; k < K; ++k) {
        T* row = dqkv + I[i * K + k] * 3 * W;
        for (int64_t h = h0; h < h1; ++h) {
          const T ak = A[(i * K + k) * H + h], dlk = DL[(i * K + k) * H + h];
          if (dlk != T(0)) axpy(scale * dlk, t.q(i, h), row + W + h * D, D);
          if (ak != T(0)) axpy(ak, GV + i * W + h * D, row + 2 * W + h * D, D);
        }
      }
    }
  });
}

}  // namespace

std::vector<Tensor> forward_qkv_cpu(const Dims& d, const Tensor& qkv, const Tensor& gather_index,
                                    const Tensor& edge, const Tensor& envelope,
                                    const Tensor& q_edge, const Tensor& bias,
                                    const Tensor& logit_self, double scale) {
  auto opt = qkv.options();
  Tensor agg_v = at::empty({d.R, d.W}, opt);
  Tensor agg_edge = at::empty({d.R, d.H, d.E}, opt);
  Tensor a_sum = at::empty({d.R, d.H}, opt);
  Tensor a_self = at::empty({d.R, d.H}, opt);
  Tensor row_max = at::empty({d.R, d.H}, opt);
  Tensor denom = at::empty({d.R, d.H}, opt);
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "transip_ops.neighbor_attention_qkv (CPU)", [&] {
    forward_rows<scalar_t>(d, qkv.data_ptr<scalar_t>(), gather_index.data_ptr<int64_t>(),
                           edge.data_ptr<scalar_t>(), envelope.data_ptr<scalar_t>(),
                           q_edge.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
                           logit_self.data_ptr<scalar_t>(), static_cast<scalar_t>(scale),
                           agg_v.data_ptr<scalar_t>(), agg_edge.data_ptr<scalar_t>(),
                           a_sum.data_ptr<scalar_t>(), a_self.data_ptr<scalar_t>(),
                           row_max.data_ptr<scalar_t>(), denom.data_ptr<scalar_t>());
  });
  return {agg_v, agg_edge, a_sum, a_self, row_max, denom};
}

std::vector<Tensor> backward_qkv_cpu(const Dims& d, const Tensor& g_v, const Tensor& g_edge,
                                     const Tensor& g_sum, const Tensor& g_self,
                                     const Tensor& qkv, const Tensor& gather_index,
                                     const Tensor& edge, const Tensor& envelope,
                                     const Tensor& q_edge, const Tensor& bias,
                                     const Tensor& logit_self, const Tensor& row_max,
                                     const Tensor& denom, double scale) {
  auto opt = qkv.options();
  Tensor dqkv = at::zeros({d.M, 3 * d.W}, opt);
  Tensor dedge = at::empty({d.R, d.K, d.E}, opt);
  Tensor denv = at::empty({d.R, d.K}, opt);
  Tensor dqe = at::empty({d.H, d.R, d.E}, opt);
  Tensor dbias = at::empty({d.R, d.K, d.H}, opt);
  Tensor dls = at::empty({d.R, d.H}, opt);
  Tensor A = at::empty({d.R, d.K, d.H}, opt);
  Tensor DL = at::empty({d.R, d.K, d.H}, opt);
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "transip_ops.neighbor_attention_qkv_backward (CPU)", [&] {
    backward_rows<scalar_t>(
        d, g_v.data_ptr<scalar_t>(), g_edge.data_ptr<scalar_t>(), g_sum.data_ptr<scalar_t>(),
        g_self.data_ptr<scalar_t>(), qkv.data_ptr<scalar_t>(), gather_index.data_ptr<int64_t>(),
        edge.data_ptr<scalar_t>(), envelope.data_ptr<scalar_t>(), q_edge.data_ptr<scalar_t>(),
        bias.data_ptr<scalar_t>(), logit_self.data_ptr<scalar_t>(), row_max.data_ptr<scalar_t>(),
        denom.data_ptr<scalar_t>(), static_cast<scalar_t>(scale), dqkv.data_ptr<scalar_t>(),
        dedge.data_ptr<scalar_t>(), denv.data_ptr<scalar_t>(), dqe.data_ptr<scalar_t>(),
        dbias.data_ptr<scalar_t>(), dls.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
        DL.data_ptr<scalar_t>());
  });
  return {dqkv, dedge, denv, dqe, dbias, dls};
}

}  // namespace transip_ops
