// CPU kernels of the fused neighbour attention: plain loops over rows, templated on the float
// type. Speed matters little here (CI and small CPU runs); clarity and exact agreement with the
// reference do. Each row i attends over its K slots with H heads (see transip_ops.h).
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


template <typename T>
void forward_rows(const Dims& d, const T* X, const int64_t* I, const T* EDGE, const T* ENV,
                  const T* QT, const T* QE, const T* B, const T* LS, T* agg_tok, T* agg_edge,
                  T* a_sum, T* a_self, T* row_max, T* denom) {
  const int64_t W = d.W, K = d.K, E = d.E, H = d.H;
  at::parallel_for(0, d.R, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<T> weight(K * H);  // logits, then u, then a
    for (int64_t i = begin; i < end; ++i) {
      const int64_t* idx = I + i * K;
      const T* env = ENV + i * K;
      // Logits of the valid slots (invalid ones are replaced by m and never read).
      for (int64_t k = 0; k < K; ++k) {
        if (!(env[k] > 0)) continue;
        const T* xk = X + idx[k] * W;
        const T* ek = EDGE + (i * K + k) * E;
        for (int64_t h = 0; h < H; ++h) {
          weight[k * H + h] = dot(xk, QT + (i * H + h) * W, W) + dot(ek, QE + (i * H + h) * E, E) +
                              B[(i * K + k) * H + h];
        }
      }
      cpu::softmax_row(K, H, env, LS + i * H, weight.data(), row_max + i * H, denom + i * H,
                       a_sum + i * H, a_self + i * H);
      T* out_tok = agg_tok + i * H * W;
      T* out_edge = agg_edge + i * H * E;
      std::fill(out_tok, out_tok + H * W, T(0));
      std::fill(out_edge, out_edge + H * E, T(0));
      for (int64_t k = 0; k < K; ++k) {
        const T* xk = X + idx[k] * W;
        const T* ek = EDGE + (i * K + k) * E;
        for (int64_t h = 0; h < H; ++h) {
          const T a = weight[k * H + h];
          if (a == T(0)) continue;  // envelope 0: contributes exactly 0 (finite inputs)
          axpy(a, xk, out_tok + h * W, W);
          axpy(a, ek, out_edge + h * E, E);
        }
      }
    }
  });
}

template <typename T>
void backward_rows(const Dims& d, const T* GT, const T* GE, const T* GS, const T* GSELF,
                   const T* X, const int64_t* I, const T* EDGE, const T* ENV, const T* QT,
                   const T* QE, const T* B, const T* LS, const T* MX, const T* DEN, T* dx,
                   T* dedge, T* denv, T* dqt, T* dqe, T* dbias, T* dls, T* A, T* DL) {
  const int64_t W = d.W, K = d.K, E = d.E, H = d.H;
  // Pass 1, parallel over rows: everything that belongs to row i alone. The weights a and the
  // logit gradients dl are kept (A, DL) for pass 2.
  at::parallel_for(0, d.R, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<T> t_buf(K * H), ga_buf(K * H), c(H);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t* idx = I + i * K;
      const T* env = ENV + i * K;
      T* a = A + i * K * H;
      T* dl = DL + i * K * H;
      for (int64_t k = 0; k < K; ++k) {
        const bool valid = env[k] > 0;
        const T* xk = X + idx[k] * W;
        const T* ek = EDGE + (i * K + k) * E;
        for (int64_t h = 0; h < H; ++h) {
          T t = 1;
          if (valid) {
            const T l = dot(xk, QT + (i * H + h) * W, W) + dot(ek, QE + (i * H + h) * E, E) +
                        B[(i * K + k) * H + h];
            t = std::exp(l - MX[i * H + h]);
          }
          t_buf[k * H + h] = t;
          a[k * H + h] = env[k] * t / DEN[i * H + h];
          ga_buf[k * H + h] = dot(GT + (i * H + h) * W, xk, W) +
                              dot(GE + (i * H + h) * E, ek, E) + GS[i * H + h];
        }
      }
      cpu::softmax_row_backward(K, H, env, LS + i * H, MX + i * H, DEN + i * H, GSELF + i * H, a,
                                ga_buf.data(), t_buf.data(), c.data(), dls + i * H, dl,
                                dbias + i * K * H, denv + i * K);
      T* gq_tok = dqt + i * H * W;
      T* gq_edge = dqe + i * H * E;
      std::fill(gq_tok, gq_tok + H * W, T(0));
      std::fill(gq_edge, gq_edge + H * E, T(0));
      for (int64_t k = 0; k < K; ++k) {
        const T* xk = X + idx[k] * W;
        const T* ek = EDGE + (i * K + k) * E;
        T* dek = dedge + (i * K + k) * E;
        std::fill(dek, dek + E, T(0));
        for (int64_t h = 0; h < H; ++h) {
          const T ak = a[k * H + h], dlk = dl[k * H + h];
          if (dlk != T(0)) {
            axpy(dlk, xk, gq_tok + h * W, W);
            axpy(dlk, ek, gq_edge + h * E, E);
            axpy(dlk, QE + (i * H + h) * E, dek, E);
          }
          if (ak != T(0)) axpy(ak, GE + (i * H + h) * E, dek, E);
        }
      }
    }
  });
  // Pass 2: the scatter into dx (slots of different rows may name the same row of x), made
  // race-free and deterministic by splitting the columns of x between tasks instead of rows.
  at::parallel_for(0, W, 16, [&](int64_t w0, int64_t w1) {
    const int64_t n = w1 - w0;
    for (int64_t i = 0; i < d.R; ++i) {
      for (int64_t k = 0; k < K; ++k) {
        T* dxk = dx + I[i * K + k] * W + w0;
        for (int64_t h = 0; h < H; ++h) {
          const T ak = A[(i * K + k) * H + h], dlk = DL[(i * K + k) * H + h];
          if (ak != T(0)) axpy(ak, GT + (i * H + h) * W + w0, dxk, n);
          if (dlk != T(0)) axpy(dlk, QT + (i * H + h) * W + w0, dxk, n);
        }
      }
    }
  });
}

}  // namespace

std::vector<Tensor> forward_cpu(const Dims& d, const Tensor& x, const Tensor& gather_index,
                                const Tensor& edge, const Tensor& envelope, const Tensor& q_tok,
                                const Tensor& q_edge, const Tensor& bias,
                                const Tensor& logit_self) {
  auto opt = x.options();
  Tensor agg_tok = at::empty({d.R, d.H, d.W}, opt);
  Tensor agg_edge = at::empty({d.R, d.H, d.E}, opt);
  Tensor a_sum = at::empty({d.R, d.H}, opt);
  Tensor a_self = at::empty({d.R, d.H}, opt);
  Tensor row_max = at::empty({d.R, d.H}, opt);
  Tensor denom = at::empty({d.R, d.H}, opt);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "transip_ops.neighbor_attention (CPU)", [&] {
    forward_rows<scalar_t>(d, x.data_ptr<scalar_t>(), gather_index.data_ptr<int64_t>(),
                           edge.data_ptr<scalar_t>(), envelope.data_ptr<scalar_t>(),
                           q_tok.data_ptr<scalar_t>(), q_edge.data_ptr<scalar_t>(),
                           bias.data_ptr<scalar_t>(), logit_self.data_ptr<scalar_t>(),
                           agg_tok.data_ptr<scalar_t>(), agg_edge.data_ptr<scalar_t>(),
                           a_sum.data_ptr<scalar_t>(), a_self.data_ptr<scalar_t>(),
                           row_max.data_ptr<scalar_t>(), denom.data_ptr<scalar_t>());
  });
  return {agg_tok, agg_edge, a_sum, a_self, row_max, denom};
}

std::vector<Tensor> backward_cpu(const Dims& d, const Tensor& g_tok, const Tensor& g_edge,
                                 const Tensor& g_sum, const Tensor& g_self, const Tensor& x,
                                 const Tensor& gather_index, const Tensor& edge,
                                 const Tensor& envelope, const Tensor& q_tok,
                                 const Tensor& q_edge, const Tensor& bias,
                                 const Tensor& logit_self, const Tensor& row_max,
                                 const Tensor& denom) {
  auto opt = x.options();
  Tensor dx = at::zeros({d.M, d.W}, opt);
  Tensor dedge = at::empty({d.R, d.K, d.E}, opt);
  Tensor denv = at::empty({d.R, d.K}, opt);
  Tensor dqt = at::empty({d.R, d.H, d.W}, opt);
  Tensor dqe = at::empty({d.R, d.H, d.E}, opt);
  Tensor dbias = at::empty({d.R, d.K, d.H}, opt);
  Tensor dls = at::empty({d.R, d.H}, opt);
  Tensor A = at::empty({d.R, d.K, d.H}, opt);
  Tensor DL = at::empty({d.R, d.K, d.H}, opt);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "transip_ops.neighbor_attention_backward (CPU)", [&] {
    backward_rows<scalar_t>(
        d, g_tok.data_ptr<scalar_t>(), g_edge.data_ptr<scalar_t>(), g_sum.data_ptr<scalar_t>(),
        g_self.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), gather_index.data_ptr<int64_t>(),
        edge.data_ptr<scalar_t>(), envelope.data_ptr<scalar_t>(), q_tok.data_ptr<scalar_t>(),
        q_edge.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(), logit_self.data_ptr<scalar_t>(),
        row_max.data_ptr<scalar_t>(), denom.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
        dedge.data_ptr<scalar_t>(), denv.data_ptr<scalar_t>(), dqt.data_ptr<scalar_t>(),
        dqe.data_ptr<scalar_t>(), dbias.data_ptr<scalar_t>(), dls.data_ptr<scalar_t>(),
        A.data_ptr<scalar_t>(), DL.data_ptr<scalar_t>());
  });
  return {dx, dedge, denv, dqt, dqe, dbias, dls};
}

}  // namespace transip_ops
