// CUDA kernels of the fused neighbour attention, compiled at run time by NVRTC (no nvcc, no
// CUDA toolkit on the user's machine; see transip_md/ops/build.py). This file is plain text
// embedded into libtransip_ops.so; neighbor_attention_cuda.cpp compiles it once per
// (GPU architecture, dtype, W, H, E) with those sizes as macros, so the loops over heads and
// columns have compile-time bounds and the per-head accumulators live in registers.
//
// Macros set by the host: SCALAR (float or double), W_ (token width), H_ (heads), E_ (edge
// width), NT (threads per block). K (slots), M (rows of x) are run-time arguments.
//
// One block handles one attending row i. Logits (forward) or weights and logit gradients
// (backward) of the row live in shared memory, or in a global scratch row when K * H is too
// large for it (lbuf != nullptr). Invalid slots (envelope <= 0) never need a logit; slots with
// envelope exactly 0 have weight 0 and are skipped where they would only add zeros.
// Semantics: transip_md/ops/__init__.py.
//
// Two backward kernels: na_backward_scalar (the original: one thread per column, one scalar
// atomicAdd per (slot, column) into dx) and na_backward (the default, TRANSIP_OPS_BACKWARD=
// vector): 16-byte loads of the x / q_tok / g_tok rows in phase 1 where aligned, and phase 3
// split into a dx scatter with vector atomics (float32 on sm_90+: atomicAdd(float4*) or
// (float2*), 4 or 2 columns per thread, slots shared out over thread groups; scalar atomicAdd
// for float64 and elsewhere) and an atomic-free pass for dq_tok, dedge, dq_edge. The host picks
// the kernel per call (neighbor_attention_cuda.cpp); both compute the same sums.
//
// naq_forward / naq_backward (end of the file) are the kernels of neighbor_attention_qkv (keys
// and values per token, qkv [M, 3W]), built on the plan of na_forward / na_backward_scalar.

typedef SCALAR T;
typedef long long i64;

#define NWARP (NT / 32)
#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float exp_t(float v) { return expf(v); }
__device__ __forceinline__ double exp_t(double v) { return exp(v); }
__device__ __forceinline__ float max_t(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_t(double a, double b) { return fmax(a, b); }

// 16-byte vectors of T for the aligned row loads (x, q_tok, g_tok rows when W % LV == 0 and
// the host found the base pointers 16-byte aligned: the `vec` kernel argument).
template <typename S>
struct Vec16;
template <>
struct Vec16<float> {
  typedef float4 type;
  enum { n = 4 };
};
template <>
struct Vec16<double> {
  typedef double2 type;
  enum { n = 2 };
};
typedef Vec16<T>::type VT;
#define LV (Vec16<T>::n)

// acc + a . b, summed in component order.
__device__ __forceinline__ float vdot(float acc, float4 a, float4 b) {
  acc += a.x * b.x;
  acc += a.y * b.y;
  acc += a.z * b.z;
  return acc + a.w * b.w;
}
__device__ __forceinline__ double vdot(double acc, double2 a, double2 b) {
  acc += a.x * b.x;
  return acc + a.y * b.y;
}

// Vector float atomics in global memory: compute capability 9.x and CUDA >= 12.2 (where the
// float2 / float4 overloads of atomicAdd exist). Elsewhere VA is 1 (scalar atomics).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 &&                                  \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 2))
#define HAVE_VEC_ATOMIC 1
#else
#define HAVE_VEC_ATOMIC 0
#endif

// Columns per thread in the vector kernel's dx scatter: 4 (float4 atomics) while the per-thread
// g_tok / q_tok columns (2 * H * VA registers) stay at 64, 2 up to H = 16, else 1.
__device__ constexpr int pick_va() {
  return (HAVE_VEC_ATOMIC && sizeof(T) == 4)
             ? ((H_ <= 8 && W_ % 4 == 0) ? 4 : ((H_ <= 16 && W_ % 2 == 0) ? 2 : 1))
             : 1;
}
#define VA (pick_va())

// dx[p .. p + V) += s[0 .. V); p is V * sizeof(T)-byte aligned (dx rows are W * sizeof(T)
// bytes, W % V == 0, dx's base is 16-byte aligned: checked on the host).
template <int V>
__device__ __forceinline__ void atomic_add_cols(T* p, const T* s) {
#if HAVE_VEC_ATOMIC
  if constexpr (V == 4) {
    atomicAdd(reinterpret_cast<float4*>(p), make_float4(s[0], s[1], s[2], s[3]));
  } else if constexpr (V == 2) {
    atomicAdd(reinterpret_cast<float2*>(p), make_float2(s[0], s[1]));
  } else
#endif
  {
#pragma unroll
    for (int v = 0; v < V; ++v) atomicAdd(p + v, s[v]);
  }
}

__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
  return v;
}

__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max_t(v, __shfl_xor_sync(FULL_MASK, v, o));
  return v;
}

// Row indices and envelopes of row i into shared memory. An index outside [0, M) would read
// or write out of bounds: stop the kernel (as torch's own device-side index assertions do;
// checking on the host would need a synchronisation).
__device__ __forceinline__ void load_slots(const i64* __restrict__ gidx,
                                           const T* __restrict__ env, i64 i, int K, i64 M,
                                           i64* s_idx, T* s_env) {
  for (int k = threadIdx.x; k < K; k += NT) {
    const i64 j = gidx[i * K + k];
    if (j < 0 || j >= M) __trap();
    s_idx[k] = j;
    s_env[k] = env[i * K + k];
  }
}

extern "C" __global__ void __launch_bounds__(NT)
na_forward(const T* __restrict__ x, const i64* __restrict__ gidx, const T* __restrict__ edge,
           const T* __restrict__ env, const T* __restrict__ q_tok, const T* __restrict__ q_edge,
           const T* __restrict__ bias, const T* __restrict__ logit_self, T* __restrict__ agg_tok,
           T* __restrict__ agg_edge, T* __restrict__ a_sum, T* __restrict__ a_self,
           T* __restrict__ row_max, T* __restrict__ denom, T* __restrict__ lbuf, int K, i64 M,
           int vec) {
  extern __shared__ double smem[];  // double: 8-byte alignment for every part below
  const i64 i = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  i64* s_idx = (i64*)smem;
  T* s_env = (T*)(s_idx + K);
  T* L = lbuf ? lbuf + i * K * H_ : s_env + K;  // [K, H]: logits, then weights a
  const T* qt = q_tok + i * H_ * W_;
  const T* qe = q_edge + i * H_ * E_;
  load_slots(gidx, env, i, K, M, s_idx, s_env);
  __syncthreads();

  // 1. Logits of the valid slots: one warp per slot, lanes over the columns.
  for (int k = warp; k < K; k += NWARP) {
    if (!(s_env[k] > (T)0)) continue;  // uniform over the warp
    const T* xk = x + s_idx[k] * W_;
    const T* ek = edge + (i * K + k) * E_;
    T acc[H_];
#pragma unroll
    for (int h = 0; h < H_; ++h) acc[h] = 0;
    // float4 loads where x and q_tok are 16-byte aligned (host check). Not for double: with
    // double2 ptxas spilled a register at W64-H4-E16, for little gain.
    if (sizeof(T) == 4 && W_ % LV == 0 && vec) {
      const VT* xv = reinterpret_cast<const VT*>(xk);
      for (int c = lane; c < W_ / LV; c += 32) {
        const VT v = xv[c];
#pragma unroll
        for (int h = 0; h < H_; ++h)
          acc[h] = vdot(acc[h], v, reinterpret_cast<const VT*>(qt + h * W_)[c]);
      }
    } else {
      for (int c = lane; c < W_; c += 32) {
        const T v = xk[c];
#pragma unroll
        for (int h = 0; h < H_; ++h) acc[h] += v * qt[h * W_ + c];
      }
    }
    for (int c = lane; c < E_; c += 32) {
      const T v = ek[c];
#pragma unroll
      for (int h = 0; h < H_; ++h) acc[h] += v * qe[h * E_ + c];
    }
#pragma unroll
    for (int h = 0; h < H_; ++h) acc[h] = warp_sum(acc[h]);
    if (lane == 0) {
#pragma unroll
      for (int h = 0; h < H_; ++h) L[k * H_ + h] = acc[h] + bias[(i * K + k) * H_ + h];
    }
  }
  __syncthreads();

  // 2. Softmax with the envelope: one warp per head, lanes over the slots.
  for (int h = warp; h < H_; h += NWARP) {
    const T ls = logit_self[i * H_ + h];
    T m = ls;
    for (int k = lane; k < K; k += 32)
      if (s_env[k] > (T)0) m = max_t(m, L[k * H_ + h]);
    m = warp_max(m);
    T s = 0;
    for (int k = lane; k < K; k += 32) {
      const T t = s_env[k] > (T)0 ? exp_t(L[k * H_ + h] - m) : (T)1;
      const T u = s_env[k] * t;
      L[k * H_ + h] = u;
      s += u;
    }
    const T u_self = exp_t(ls - m);
    const T D = u_self + warp_sum(s);
    T sa = 0;
    for (int k = lane; k < K; k += 32) {
      const T a = L[k * H_ + h] / D;
      L[k * H_ + h] = a;
      sa += a;
    }
    sa = warp_sum(sa);
    if (lane == 0) {
      row_max[i * H_ + h] = m;
      denom[i * H_ + h] = D;
      a_sum[i * H_ + h] = sa;
      a_self[i * H_ + h] = u_self / D;
    }
  }
  __syncthreads();

  // 3. Aggregation: threads over the W token columns and then the E edge columns, all heads
  // per thread (coalesced reads of each gathered row).
  for (int c = tid; c < W_ + E_; c += NT) {
    T acc[H_];
#pragma unroll
    for (int h = 0; h < H_; ++h) acc[h] = 0;
    if (c < W_) {
      for (int k = 0; k < K; ++k) {
        if (s_env[k] == (T)0) continue;  // uniform over the block
        const T v = x[s_idx[k] * W_ + c];
#pragma unroll
        for (int h = 0; h < H_; ++h) acc[h] += L[k * H_ + h] * v;
      }
#pragma unroll
      for (int h = 0; h < H_; ++h) agg_tok[(i * H_ + h) * W_ + c] = acc[h];
    } else {
      const int e = c - W_;
      for (int k = 0; k < K; ++k) {
        if (s_env[k] == (T)0) continue;
        const T v = edge[(i * K + k) * E_ + e];
#pragma unroll
        for (int h = 0; h < H_; ++h) acc[h] += L[k * H_ + h] * v;
      }
#pragma unroll
      for (int h = 0; h < H_; ++h) agg_edge[(i * H_ + h) * E_ + e] = acc[h];
    }
  }
}

// Backward. With ga[k,h] = g_tok[h].x_k + g_edge[h].e_k + g_sum[h] (the gradient reaching
// a[k,h]), c[h] = sum_k a ga + a_self g_self, t = valid ? exp(l - m) : 1:
//   dl[k,h] = valid ? a (ga - c) : 0          dlogit_self[h] = a_self (g_self - c)
//   denvelope[k] = sum_h (ga - c) t / D       dbias = dl
//   dq_tok[h] = sum_k dl x_k                  dq_edge[h] = sum_k dl e_k
//   dx[idx_k] += sum_h a g_tok[h] + dl q_tok[h]   (atomicAdd: rows share neighbours)
//   dedge[k] = sum_h a g_edge[h] + dl q_edge[h]
template <bool kVec>
__device__ __forceinline__ void
backward_body(const T* __restrict__ g_tok, const T* __restrict__ g_edge,
              const T* __restrict__ g_sum, const T* __restrict__ g_self, const T* __restrict__ x,
              const i64* __restrict__ gidx, const T* __restrict__ edge, const T* __restrict__ env,
              const T* __restrict__ q_tok, const T* __restrict__ q_edge, const T* __restrict__ bias,
              const T* __restrict__ logit_self, const T* __restrict__ row_max,
              const T* __restrict__ denom, T* __restrict__ dx, T* __restrict__ dedge,
              T* __restrict__ denv, T* __restrict__ dq_tok, T* __restrict__ dq_edge,
              T* __restrict__ dbias, T* __restrict__ dlogit_self, T* __restrict__ lbuf, int K,
              i64 M, int vec) {
  extern __shared__ double smem[];
  const i64 i = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  i64* s_idx = (i64*)smem;
  T* s_env = (T*)(s_idx + K);
  T* s_m = s_env + K;
  T* s_D = s_m + H_;
  T* s_c = s_D + H_;
  T* L = lbuf ? lbuf + i * 2 * K * H_ : s_c + H_;  // [K, H]: t, then a
  T* G = L + K * H_;                               // [K, H]: ga, then dl
  const T* qt = q_tok + i * H_ * W_;
  const T* qe = q_edge + i * H_ * E_;
  const T* gt = g_tok + i * H_ * W_;
  const T* ge = g_edge + i * H_ * E_;
  load_slots(gidx, env, i, K, M, s_idx, s_env);
  for (int h = tid; h < H_; h += NT) {
    s_m[h] = row_max[i * H_ + h];
    s_D[h] = denom[i * H_ + h];
  }
  __syncthreads();

  // 1. Per slot (one warp each): t from the recomputed logit, and ga.
  for (int k = warp; k < K; k += NWARP) {
    const bool valid = s_env[k] > (T)0;  // uniform over the warp
    const T* xk = x + s_idx[k] * W_;
    const T* ek = edge + (i * K + k) * E_;
    T al[H_], ag[H_];
#pragma unroll
    for (int h = 0; h < H_; ++h) al[h] = ag[h] = 0;
    // W part. 16-byte loads of the x, q_tok and g_tok rows in the vector kernel (all three
    // 16-byte aligned: host check); invalid slots need only ga.
    const bool vl = kVec && W_ % LV == 0 && vec;
    if (vl && valid) {
      const VT* xv = reinterpret_cast<const VT*>(xk);
      for (int c = lane; c < W_ / LV; c += 32) {
        const VT v = xv[c];
#pragma unroll
        for (int h = 0; h < H_; ++h) {
          al[h] = vdot(al[h], v, reinterpret_cast<const VT*>(qt + h * W_)[c]);
          ag[h] = vdot(ag[h], v, reinterpret_cast<const VT*>(gt + h * W_)[c]);
        }
      }
    } else if (vl) {
      const VT* xv = reinterpret_cast<const VT*>(xk);
      for (int c = lane; c < W_ / LV; c += 32) {
        const VT v = xv[c];
#pragma unroll
        for (int h = 0; h < H_; ++h)
          ag[h] = vdot(ag[h], v, reinterpret_cast<const VT*>(gt + h * W_)[c]);
      }
    } else if (valid) {
      for (int c = lane; c < W_; c += 32) {
        const T v = xk[c];
#pragma unroll
        for (int h = 0; h < H_; ++h) {
          al[h] += v * qt[h * W_ + c];
          ag[h] += v * gt[h * W_ + c];
        }
      }
    } else {
      for (int c = lane; c < W_; c += 32) {
        const T v = xk[c];
#pragma unroll
        for (int h = 0; h < H_; ++h) ag[h] += v * gt[h * W_ + c];
      }
    }
    // E part (scalar loads: edge rows and q_edge / g_edge carry no alignment promise).
    if (valid) {
      for (int c = lane; c < E_; c += 32) {
        const T v = ek[c];
#pragma unroll
        for (int h = 0; h < H_; ++h) {
          al[h] += v * qe[h * E_ + c];
          ag[h] += v * ge[h * E_ + c];
        }
      }
    } else {
      for (int c = lane; c < E_; c += 32) {
        const T v = ek[c];
#pragma unroll
        for (int h = 0; h < H_; ++h) ag[h] += v * ge[h * E_ + c];
      }
    }
#pragma unroll
    for (int h = 0; h < H_; ++h) {
      ag[h] = warp_sum(ag[h]);
      if (valid) al[h] = warp_sum(al[h]);
    }
    if (lane == 0) {
#pragma unroll
      for (int h = 0; h < H_; ++h) {
        L[k * H_ + h] =
            valid ? exp_t(al[h] + bias[(i * K + k) * H_ + h] - s_m[h]) : (T)1;
        G[k * H_ + h] = ag[h] + g_sum[i * H_ + h];
      }
    }
  }
  __syncthreads();

  // 2a. c[h] and dlogit_self: one warp per head.
  for (int h = warp; h < H_; h += NWARP) {
    const T D = s_D[h];
    T c = 0;
    for (int k = lane; k < K; k += 32) c += (s_env[k] * L[k * H_ + h] / D) * G[k * H_ + h];
    c = warp_sum(c);
    const T as = exp_t(logit_self[i * H_ + h] - s_m[h]) / D;
    const T gs = g_self[i * H_ + h];
    c += as * gs;
    if (lane == 0) {
      s_c[h] = c;
      dlogit_self[i * H_ + h] = as * (gs - c);
    }
  }
  __syncthreads();

  // 2b. Per slot: a, dl, dbias, denvelope.
  for (int k = tid; k < K; k += NT) {
    const T ek = s_env[k];
    const bool valid = ek > (T)0;
    T de = 0;
#pragma unroll
    for (int h = 0; h < H_; ++h) {
      const T t = L[k * H_ + h];
      const T D = s_D[h];
      const T a = ek * t / D;
      const T g = G[k * H_ + h] - s_c[h];
      de += g * t / D;
      const T dl = valid ? a * g : (T)0;
      L[k * H_ + h] = a;
      G[k * H_ + h] = dl;
      dbias[(i * K + k) * H_ + h] = dl;
    }
    denv[i * K + k] = de;
  }
  __syncthreads();

  if constexpr (kVec) {
    // 3a (vector kernel). dx scatter alone (it needs no x): thread (grp, q) owns the VA
    // columns [q VA, q VA + VA) and the slots k = grp, grp + G3, ...; one VA-wide atomic per
    // (slot, column group). With fewer column groups NQ than threads, G3 = NT / NQ groups of
    // threads share out the slots (threads tid >= G3 NQ idle); else G3 = 1 and each thread
    // takes the column groups q = tid, tid + NT, ... over all slots.
    constexpr int NQ = W_ / VA;
    constexpr int G3 = NQ >= NT ? 1 : NT / NQ;
    const int grp = tid / NQ;
    if (grp < G3) {
      for (int q = tid % NQ; q < NQ; q += NT) {
        T gr[H_][VA], qr[H_][VA];
#pragma unroll
        for (int h = 0; h < H_; ++h) {
#pragma unroll
          for (int v = 0; v < VA; ++v) {
            gr[h][v] = gt[h * W_ + q * VA + v];
            qr[h][v] = qt[h * W_ + q * VA + v];
          }
        }
        for (int k = grp; k < K; k += G3) {
          if (s_env[k] == (T)0) continue;  // a = dl = 0: nothing to add
          T sv[VA];
#pragma unroll
          for (int v = 0; v < VA; ++v) sv[v] = 0;
#pragma unroll
          for (int h = 0; h < H_; ++h) {
            const T a = L[k * H_ + h], dl = G[k * H_ + h];
#pragma unroll
            for (int v = 0; v < VA; ++v) sv[v] += a * gr[h][v] + dl * qr[h][v];
          }
          atomic_add_cols<VA>(dx + s_idx[k] * W_ + q * VA, sv);
        }
      }
    }
    // No barrier needed: 3a and 3b only read shared memory and write different outputs.
  }

  // 3. Column passes: dx (scattered; scalar kernel only), dq_tok over the W columns; dedge,
  // dq_edge over E.
  for (int c = tid; c < W_ + E_; c += NT) {
    T gr[H_], qr[H_], dq[H_];
    if (c < W_) {
#pragma unroll
      for (int h = 0; h < H_; ++h) {
        if (!kVec) {
          gr[h] = gt[h * W_ + c];
          qr[h] = qt[h * W_ + c];
        }
        dq[h] = 0;
      }
      for (int k = 0; k < K; ++k) {
        if (s_env[k] == (T)0) continue;  // a = dl = 0: nothing to add
        const i64 j = s_idx[k];
        const T v = x[j * W_ + c];
        T s = 0;
#pragma unroll
        for (int h = 0; h < H_; ++h) {
          if (!kVec) s += L[k * H_ + h] * gr[h] + G[k * H_ + h] * qr[h];
          dq[h] += G[k * H_ + h] * v;
        }
        if (!kVec) atomicAdd(dx + j * W_ + c, s);
      }
#pragma unroll
      for (int h = 0; h < H_; ++h) dq_tok[(i * H_ + h) * W_ + c] = dq[h];
    } else {
      const int e = c - W_;
#pragma unroll
      for (int h = 0; h < H_; ++h) {
        gr[h] = ge[h * E_ + e];
        qr[h] = qe[h * E_ + e];
        dq[h] = 0;
      }
      for (int k = 0; k < K; ++k) {
        T s = 0;
        if (s_env[k] != (T)0) {
          const T v = edge[(i * K + k) * E_ + e];
#pragma unroll
          for (int h = 0; h < H_; ++h) {
            s += L[k * H_ + h] * gr[h] + G[k * H_ + h] * qr[h];
            dq[h] += G[k * H_ + h] * v;
          }
        }
        dedge[(i * K + k) * E_ + e] = s;
      }
#pragma unroll
      for (int h = 0; h < H_; ++h) dq_edge[(i * H_ + h) * E_ + e] = dq[h];
    }
  }
}

#define NA_BACKWARD_PARAMS                                                                     \
  const T *__restrict__ g_tok, const T *__restrict__ g_edge, const T *__restrict__ g_sum,      \
      const T *__restrict__ g_self, const T *__restrict__ x, const i64 *__restrict__ gidx,     \
      const T *__restrict__ edge, const T *__restrict__ env, const T *__restrict__ q_tok,      \
      const T *__restrict__ q_edge, const T *__restrict__ bias,                               \
      const T *__restrict__ logit_self, const T *__restrict__ row_max,                        \
      const T *__restrict__ denom, T *__restrict__ dx, T *__restrict__ dedge,                 \
      T *__restrict__ denv, T *__restrict__ dq_tok, T *__restrict__ dq_edge,                  \
      T *__restrict__ dbias, T *__restrict__ dlogit_self, T *__restrict__ lbuf, int K, i64 M, \
      int vec
#define NA_BACKWARD_ARGS                                                                    \
  g_tok, g_edge, g_sum, g_self, x, gidx, edge, env, q_tok, q_edge, bias, logit_self, row_max, \
      denom, dx, dedge, denv, dq_tok, dq_edge, dbias, dlogit_self, lbuf, K, M, vec

// The original backward (TRANSIP_OPS_BACKWARD=scalar); `vec` is ignored.
extern "C" __global__ void __launch_bounds__(NT) na_backward_scalar(NA_BACKWARD_PARAMS) {
  backward_body<false>(NA_BACKWARD_ARGS);
}

// The default backward (TRANSIP_OPS_BACKWARD=vector); `vec` != 0: x, q_tok and g_tok are
// 16-byte aligned. dx must be 16-byte aligned (the host launches the scalar kernel otherwise).
extern "C" __global__ void __launch_bounds__(NT) na_backward(NA_BACKWARD_PARAMS) {
  backward_body<true>(NA_BACKWARD_ARGS);
}

// ============================================================================================
// neighbor_attention_qkv: per-token keys and values (transip_ops.h, "neighbor_attention_qkv").
// qkv [M, 3W] holds q_j | k_j | v_j per row; head h owns columns h D .. h D + D - 1 of each
// third (D = W / H; the host checks W % H == 0 before launching these kernels, which are
// compiled for any W_, H_ since the whole text is built for both operators). q_edge and
// dq_edge are head-major [H, R, E]. The plan is that of na_forward / na_backward_scalar: one
// block per attending row i, the row's [K, H] logits / weights in shared memory (or the
// global scratch row lbuf), atomics for the scatter into the gathered rows' k and v columns.

#define D_ (W_ >= H_ ? W_ / H_ : 1)  // head width (1 only in builds never launched: W_ < H_)
#define W3 (3 * W_)                  // qkv row length

// acc[h] += this lane's share of a[h D .. h D + D) . b[h D .. h D + D) (head_sums completes it):
// the lanes go over the columns of one head at a time, the heads unrolled (compile-time acc
// index: the accumulators stay in registers). With D < 32 lanes idle, but each lane then does
// H multiply-adds per slot, no more than lanes over all W columns with a select of the head
// (W / 32 column chunks times H selects); that variant also spilled registers under ptxas.
__device__ __forceinline__ void head_dots(T (&acc)[H_], const T* __restrict__ a,
                                          const T* __restrict__ b, int lane) {
#pragma unroll
  for (int h = 0; h < H_; ++h)
    for (int c = lane; c < D_; c += 32) acc[h] += a[h * D_ + c] * b[h * D_ + c];
}

// First edge column of thread tid in the column passes: the passes go over W token columns and
// then E edge columns as if they were one range of W + E columns dealt out round-robin (column
// W + e to thread (W + e) % NT), so the threads left idle by the last token round start the edge
// columns. Two loops instead of one with a branch: ptxas spilled registers in the latter.
__device__ __forceinline__ int first_edge_column(int tid) { return (tid + NT - W_ % NT) % NT; }

// Slots per group in the slot loops of the column passes (slot_column_sum): UCOL row loads in
// flight per thread. 8: no more registers than 4 at any checked size (W, H, E of test_ops).
#define UCOL 8

// sum over the slots k with use(s_env[k]) of w[k H] col[s_idx[k] W3], in slot order: one column
// of the gathered rows (col = qkv + part offset + c) weighted by one head's [K, H] values (w =
// the [K, H] array + the head). One gathered load per slot, each consumed at once, left these
// loops latency-bound (one load in flight per thread), so the slots go in groups of UCOL: the
// group's row loads (independent addresses) are all issued before its first multiply-add. A
// slot without use loads nothing (predicated load of 0) and adds w * 0 = 0 (w is finite): the
// same sums as skipping it. Every s_idx is a row in [0, M) (load_slots traps otherwise),
// padded slots included.
template <typename Use>
__device__ __forceinline__ T slot_column_sum(const T* __restrict__ col, const T* w,
                                             const i64* s_idx, const T* s_env, int K, Use use) {
  T acc = 0;
  int k = 0;
#pragma unroll 1
  for (; k + UCOL <= K; k += UCOL) {
    T a[UCOL], v[UCOL];
#pragma unroll
    for (int u = 0; u < UCOL; ++u) {
      v[u] = use(s_env[k + u]) ? col[s_idx[k + u] * W3] : (T)0;
      a[u] = w[(k + u) * H_];
    }
#pragma unroll
    for (int u = 0; u < UCOL; ++u) acc += a[u] * v[u];
  }
#pragma unroll 1
  for (; k < K; ++k)
    if (use(s_env[k])) acc += w[k * H_] * col[s_idx[k] * W3];
  return acc;
}

// The butterfly of head_sums: H_ padded to a power of two (the padding heads are zeros), or 0
// where it does not apply (H_ > 32: more heads than lanes).
__device__ constexpr int heads_p2() {
  int p = 1;
  while (p < H_) p <<= 1;
  return H_ <= 32 ? p : 0;
}
#define HP (heads_p2())

// One "transpose-reduce" round over the N values v[0 .. N) each lane still holds: partner lanes
// (lane ^ O, O = 16 N / HP) swap halves, the lane with bit O set keeping the upper half, so each
// sends and receives N / 2 values and both end with N / 2 pairwise sums. Template recursion:
// every index of v is a compile-time constant (registers, no local memory).
template <int N>
__device__ __forceinline__ void butterfly(T (&v)[HP > 0 ? HP : 1], int lane) {
  if constexpr (N > 1) {
    constexpr int half = N / 2, O = 16 * N / HP;
    const bool up = lane & O;
#pragma unroll
    for (int j = 0; j < half; ++j) {
      const T send = up ? v[j] : v[j + half];
      const T keep = up ? v[j + half] : v[j];
      v[j] = keep + __shfl_xor_sync(FULL_MASK, send, O);
    }
    butterfly<half>(v, lane);
  }
}

// Completes the per-lane partial sums acc[h] of a warp (every lane of it calling) and calls
// put(h, sum of acc[h] over the 32 lanes) exactly once per head h, from one lane of the warp.
// A warp_sum per head costs 5 H shuffles (40 at H = 8). The butterfly instead halves the values
// per lane each round: HP / 2 + HP / 4 + ... + 1 shuffles leave lane l with head l / (32 / HP)
// summed over its group of 32 / HP lanes, and log2(32 / HP) single-value rounds finish the
// group: HP - 1 + 5 - log2 HP shuffles (H = 8: 7 + 2 = 9; H = 16: 16; H = 32: 31; H = 1: 5;
// H = 6, padded to 8: 9 instead of 30), and the lanes of different heads store at once. Lanes of
// a group end with equal sums (the adds are commutative); the group's first lane stores. The
// summation order differs from warp_sum's, but forward and backward share it (same logits).
// H_ > 32: warp_sum per head (5 H shuffles), lane 0 stores.
template <typename Put>
__device__ __forceinline__ void head_sums(T (&acc)[H_], int lane, Put put) {
  if constexpr (HP > 0) {
    T v[HP > 0 ? HP : 1];
#pragma unroll
    for (int h = 0; h < HP; ++h) v[h] = h < H_ ? acc[h] : (T)0;
    butterfly<HP>(v, lane);
#pragma unroll
    for (int o = 16 / HP; o > 0; o >>= 1) v[0] += __shfl_xor_sync(FULL_MASK, v[0], o);
    constexpr int G = 32 / HP;  // lanes per head
    const int h = lane / G;
    if (lane % G == 0 && h < H_) put(h, v[0]);
  } else {
#pragma unroll
    for (int h = 0; h < H_; ++h) acc[h] = warp_sum(acc[h]);
    if (lane == 0) {
#pragma unroll
      for (int h = 0; h < H_; ++h) put(h, acc[h]);
    }
  }
}

// This lane's partial logits of one valid slot without the bias, for all heads (head_sums
// completes them): acc[h] = scale q_i,h . k_j,h + e . q_edge[h, i] (the edge row e; q_edge[h, i,
// c] at qe[h RE + c]). naq_forward and naq_backward share it and head_sums, so the backward
// recomputes the same logits.
__device__ __forceinline__ void slot_logits(T (&acc)[H_], const T* __restrict__ qi,
                                            const T* __restrict__ kj, const T* __restrict__ ek,
                                            const T* __restrict__ qe, i64 RE, T scale,
                                            int lane) {
#pragma unroll
  for (int h = 0; h < H_; ++h) acc[h] = 0;
  head_dots(acc, qi, kj, lane);
#pragma unroll
  for (int h = 0; h < H_; ++h) acc[h] *= scale;  // scale applies to the token dot only
  for (int c = lane; c < E_; c += 32) {
    const T v = ek[c];
#pragma unroll
    for (int h = 0; h < H_; ++h) acc[h] += v * qe[h * RE + c];
  }
}

// Forward. Per row i: l[k,h] = scale q_i,h . k_j,h + edge[i,k] . q_edge[h,i] + bias[i,k,h]
// (j = idx[i,k]), the envelope softmax of na_forward, then agg_v[i, c] = sum_k a[k, c / D]
// v_j[c] and agg_edge[i,h,e] = sum_k a[k,h] edge[i,k,e].
extern "C" __global__ void __launch_bounds__(NT)
naq_forward(const T* __restrict__ qkv, const i64* __restrict__ gidx, const T* __restrict__ edge,
            const T* __restrict__ env, const T* __restrict__ q_edge, const T* __restrict__ bias,
            const T* __restrict__ logit_self, T* __restrict__ agg_v, T* __restrict__ agg_edge,
            T* __restrict__ a_sum, T* __restrict__ a_self, T* __restrict__ row_max,
            T* __restrict__ denom, T* __restrict__ lbuf, int K, i64 M, i64 R, T scale) {
  extern __shared__ double smem[];  // double: 8-byte alignment for every part below
  const i64 i = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  i64* s_idx = (i64*)smem;
  T* s_env = (T*)(s_idx + K);
  T* L = lbuf ? lbuf + i * K * H_ : s_env + K;  // [K, H]: logits, then weights a
  const T* qi = qkv + i * W3;                   // q_i: the first third of row i
  const T* qe = q_edge + i * E_;                // q_edge[h, i, :] at qe + h RE (head-major)
  const i64 RE = R * E_;
  load_slots(gidx, env, i, K, M, s_idx, s_env);
  __syncthreads();

  // 1. Logits of the valid slots: one warp per slot, lanes over the columns; head_sums: 9
  // shuffles per slot at H = 8 (a warp_sum per head: 40).
  for (int k = warp; k < K; k += NWARP) {
    if (!(s_env[k] > (T)0)) continue;  // uniform over the warp
    T acc[H_];
    slot_logits(acc, qi, qkv + s_idx[k] * W3 + W_, edge + (i * K + k) * E_, qe, RE, scale, lane);
    head_sums(acc, lane, [&](int h, T l) { L[k * H_ + h] = l + bias[(i * K + k) * H_ + h]; });
  }
  __syncthreads();

  // 2. Softmax with the envelope (as na_forward): one warp per head, lanes over the slots.
  for (int h = warp; h < H_; h += NWARP) {
    const T ls = logit_self[i * H_ + h];
    T m = ls;
#pragma unroll 1
    for (int k = lane; k < K; k += 32)
      if (s_env[k] > (T)0) m = max_t(m, L[k * H_ + h]);
    m = warp_max(m);
    T s = 0;
#pragma unroll 1
    for (int k = lane; k < K; k += 32) {
      const T t = s_env[k] > (T)0 ? exp_t(L[k * H_ + h] - m) : (T)1;
      const T u = s_env[k] * t;
      L[k * H_ + h] = u;
      s += u;
    }
    const T u_self = exp_t(ls - m);
    const T D = u_self + warp_sum(s);
    T sa = 0;
#pragma unroll 1
    for (int k = lane; k < K; k += 32) {
      const T a = L[k * H_ + h] / D;
      L[k * H_ + h] = a;
      sa += a;
    }
    sa = warp_sum(sa);
    if (lane == 0) {
      row_max[i * H_ + h] = m;
      denom[i * H_ + h] = D;
      a_sum[i * H_ + h] = sa;
      a_self[i * H_ + h] = u_self / D;
    }
  }
  __syncthreads();

  // 3. Aggregation: threads over the W value columns (one head each; coalesced reads of each
  // gathered v row; UCOL slots' loads in flight per thread: slot_column_sum), then over the E
  // edge columns (all heads per thread). Slots with envelope 0 (a = 0) are skipped.
  // With the weights in shared memory (no lbuf) the pass gets a pointer the compiler knows is
  // shared (LDS, not generic loads): then ptxas keeps all UCOL row loads of a group ahead of
  // its multiply-adds within this kernel's 32 registers (float, W 256, H 8); through the
  // generic pointer it interleaved them (2-3 loads in flight).
  const auto agg = [&](const T* w) {
    for (int c = tid; c < W_; c += NT)
      agg_v[i * W_ + c] = slot_column_sum(qkv + 2 * W_ + c, w + c / D_, s_idx, s_env, K,
                                          [](T e) { return e != (T)0; });
  };
  if (lbuf)
    agg(L);
  else
    agg(s_env + K);
  for (int e = first_edge_column(tid); e < E_; e += NT) {
    T acc[H_];
#pragma unroll
    for (int h = 0; h < H_; ++h) acc[h] = 0;
    for (int k = 0; k < K; ++k) {
      if (s_env[k] == (T)0) continue;
      const T v = edge[(i * K + k) * E_ + e];
#pragma unroll
      for (int h = 0; h < H_; ++h) acc[h] += L[k * H_ + h] * v;
    }
#pragma unroll
    for (int h = 0; h < H_; ++h) agg_edge[(i * H_ + h) * E_ + e] = acc[h];
  }
}

// Backward. With ga[k,h] = g_v[i,h] . v_j,h + g_edge[i,h] . edge[i,k] + g_sum[i,h] and c, t, a,
// dl as in backward_body:
//   dqkv[i, c]          = scale sum_k dl[k, c/D] k_j[c]     (q part: plain store, block i only)
//   dqkv[j, W + c]     += scale dl[k, c/D] q_i[c]           (k part: atomicAdd)
//   dqkv[j, 2W + c]    += a[k, c/D] g_v[i, c]               (v part: atomicAdd)
//   dedge[i,k] = sum_h a g_edge[i,h] + dl q_edge[h,i]       dq_edge[h,i] = sum_k dl edge[i,k]
// dqkv must be zero on entry (rows >= R keep a zero q part). The scatters touch only columns
// >= W, so the plain q-part stores never race with them.
// With a_out (the "gather" variant) nothing is scattered: the weights a[i,k,h] go to a_out
// (dl already goes to dbias) and naq_backward_kv then sums the k / v parts per gathered row.
extern "C" __global__ void __launch_bounds__(NT)
naq_backward(const T* __restrict__ g_v, const T* __restrict__ g_edge,
             const T* __restrict__ g_sum, const T* __restrict__ g_self,
             const T* __restrict__ qkv, const i64* __restrict__ gidx,
             const T* __restrict__ edge, const T* __restrict__ env,
             const T* __restrict__ q_edge, const T* __restrict__ bias,
             const T* __restrict__ logit_self, const T* __restrict__ row_max,
             const T* __restrict__ denom, T* __restrict__ dqkv, T* __restrict__ dedge,
             T* __restrict__ denv, T* __restrict__ dq_edge, T* __restrict__ dbias,
             T* __restrict__ dlogit_self, T* __restrict__ lbuf, T* __restrict__ a_out, int K,
             i64 M, i64 R, T scale) {
  extern __shared__ double smem[];
  const i64 i = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const bool scatter = a_out == nullptr;  // else naq_backward_kv gathers the k / v parts
  i64* s_idx = (i64*)smem;
  T* s_env = (T*)(s_idx + K);
  T* s_m = s_env + K;
  T* s_D = s_m + H_;
  T* s_c = s_D + H_;
  T* L = lbuf ? lbuf + i * 2 * K * H_ : s_c + H_;  // [K, H]: t, then a
  T* G = L + K * H_;                               // [K, H]: ga, then dl
  const T* qi = qkv + i * W3;
  const T* gv = g_v + i * W_;
  const T* ge = g_edge + i * H_ * E_;
  const T* qe = q_edge + i * E_;  // q_edge[h, i, :] at qe + h RE (head-major)
  const i64 RE = R * E_;
  load_slots(gidx, env, i, K, M, s_idx, s_env);
  for (int h = tid; h < H_; h += NT) {
    s_m[h] = row_max[i * H_ + h];
    s_D[h] = denom[i * H_ + h];
  }
  __syncthreads();

  // 1. Per slot (one warp each): t from the recomputed logit (valid slots only), then ga.
  // The two are done one after the other (the edge row is read twice, from L1): with both sets
  // of H accumulators live at once ptxas spilled registers. head_sums: 2 x 9 shuffles per valid
  // slot at H = 8 (a warp_sum per head: 2 x 40).
  for (int k = warp; k < K; k += NWARP) {
    const bool valid = s_env[k] > (T)0;  // uniform over the warp
    const T* kj = qkv + s_idx[k] * W3 + W_;
    const T* ek = edge + (i * K + k) * E_;
    if (valid) {
      T al[H_];
      slot_logits(al, qi, kj, ek, qe, RE, scale, lane);
      head_sums(al, lane, [&](int h, T l) {
        L[k * H_ + h] = exp_t(l + bias[(i * K + k) * H_ + h] - s_m[h]);
      });
    } else {
      for (int h = lane; h < H_; h += 32) L[k * H_ + h] = 1;
    }
    T ag[H_];
#pragma unroll
    for (int h = 0; h < H_; ++h) ag[h] = 0;
    head_dots(ag, gv, kj + W_, lane);  // v_j follows k_j
    for (int c = lane; c < E_; c += 32) {
      const T v = ek[c];
#pragma unroll
      for (int h = 0; h < H_; ++h) ag[h] += v * ge[h * E_ + c];
    }
    head_sums(ag, lane, [&](int h, T g) { G[k * H_ + h] = g + g_sum[i * H_ + h]; });
  }
  __syncthreads();

  // 2a. c[h] and dlogit_self: one warp per head.
  for (int h = warp; h < H_; h += NWARP) {
    const T D = s_D[h];
    T c = 0;
    for (int k = lane; k < K; k += 32) c += (s_env[k] * L[k * H_ + h] / D) * G[k * H_ + h];
    c = warp_sum(c);
    const T as = exp_t(logit_self[i * H_ + h] - s_m[h]) / D;
    const T gs = g_self[i * H_ + h];
    c += as * gs;
    if (lane == 0) {
      s_c[h] = c;
      dlogit_self[i * H_ + h] = as * (gs - c);
    }
  }
  __syncthreads();

  // 2b. Per slot: a, dl, dbias, denvelope.
  for (int k = tid; k < K; k += NT) {
    const T ek = s_env[k];
    const bool valid = ek > (T)0;
    T de = 0;
#pragma unroll
    for (int h = 0; h < H_; ++h) {
      const T t = L[k * H_ + h];
      const T D = s_D[h];
      const T a = ek * t / D;
      const T g = G[k * H_ + h] - s_c[h];
      de += g * t / D;
      const T dl = valid ? a * g : (T)0;
      L[k * H_ + h] = a;
      G[k * H_ + h] = dl;
      dbias[(i * K + k) * H_ + h] = dl;
      if (!scatter) a_out[(i * K + k) * H_ + h] = a;
    }
    denv[i * K + k] = de;
  }
  __syncthreads();

  // 3. Column passes. Token column c (head c / D): the q part of row i, and the k / v parts of
  // each gathered row by atomicAdd (one scalar atomic per slot and part; slots with envelope 0
  // have a = dl = 0, invalid ones dl = 0: skipped). Then edge column e: dedge and dq_edge.
  // Without the scatter (gather variant) the token pass is its own loop: one branch per block,
  // and no registers for the scatter's operands (a shared loop spilled at W = 768, H = 16).
  if (scatter) {
    for (int c = tid; c < W_; c += NT) {
      const int hc = c / D_;
      const T sq = scale * qi[c];
      const T g = gv[c];
      T dq = 0;
      for (int k = 0; k < K; ++k) {
        const T ek = s_env[k];
        if (ek == (T)0) continue;  // uniform over the block
        T* dj = dqkv + s_idx[k] * W3;        // row j of dqkv
        const T* kj = qkv + s_idx[k] * W3 + W_;  // k_j
        if (ek > (T)0) {
          const T dl = G[k * H_ + hc];
          dq += dl * kj[c];
          atomicAdd(dj + W_ + c, dl * sq);
        }
        atomicAdd(dj + 2 * W_ + c, L[k * H_ + hc] * g);
      }
      dqkv[i * W3 + c] = scale * dq;
    }
  } else {
    // dq = sum over the valid slots (dl = 0 on the others) of dl k_j; UCOL slots' k_j loads in
    // flight per thread (slot_column_sum).
    for (int c = tid; c < W_; c += NT)
      dqkv[i * W3 + c] = scale * slot_column_sum(qkv + W_ + c, G + c / D_, s_idx, s_env, K,
                                                 [](T e) { return e > (T)0; });
  }
  for (int e = first_edge_column(tid); e < E_; e += NT) {
    T gr[H_], qr[H_], dq[H_];
#pragma unroll
    for (int h = 0; h < H_; ++h) {
      gr[h] = ge[h * E_ + e];
      qr[h] = qe[h * RE + e];
      dq[h] = 0;
    }
    for (int k = 0; k < K; ++k) {
      T s = 0;
      if (s_env[k] != (T)0) {
        const T v = edge[(i * K + k) * E_ + e];
#pragma unroll
        for (int h = 0; h < H_; ++h) {
          s += L[k * H_ + h] * gr[h] + G[k * H_ + h] * qr[h];
          dq[h] += G[k * H_ + h] * v;
        }
      }
      dedge[(i * K + k) * E_ + e] = s;
    }
#pragma unroll
    for (int h = 0; h < H_; ++h) dq_edge[(h * R + i) * E_ + e] = dq[h];
  }
}

// The k / v parts of dqkv without atomics (the "gather" variant of the qkv backward): one block
// per row j of qkv (ghost rows included), threads over the W columns, summing over the slots
// (i, k) that gathered row j. The host lists them in ascending slot order (a stable sort of the
// gather index): order[ptr[j] .. ptr[j + 1]) are flat slot numbers i K + k.
//   dqkv[j, W + c] = scale sum dl[i,k,c/D] q_i[c]      dqkv[j, 2W + c] = sum a[i,k,c/D] g_v[i,c]
// The sums of naq_backward's atomics, in a fixed order (deterministic), reading the q_i and
// g_v rows the way naq_forward reads the k_j / v_j rows. The q part is naq_backward's.
extern "C" __global__ void __launch_bounds__(NT)
naq_backward_kv(const T* __restrict__ qkv, const T* __restrict__ g_v, const T* __restrict__ dl,
                const T* __restrict__ aw, const i64* __restrict__ order,
                const i64* __restrict__ ptr, T* __restrict__ dqkv, int K, T scale) {
  constexpr int CPT = (W_ + NT - 1) / NT;  // columns per thread
  // Slots per group: 4 CPT loads per slot (two weights, two row entries per column), so 16
  // loads in flight at CPT 1 (40 registers at W 256 float: 6 blocks per SM instead of 8, but 4
  // slots in flight per thread instead of 1), 8 CPT at CPT > 1.
  constexpr int UKV = CPT > 1 ? 2 : 4;
  __shared__ i64 s_slot[NT];
  __shared__ i64 s_row[NT];
  const i64 j = blockIdx.x;
  const int tid = threadIdx.x;
  const i64 p0 = ptr[j], p1 = ptr[j + 1];
  T dk[CPT], dv[CPT];
#pragma unroll
  for (int u = 0; u < CPT; ++u) dk[u] = dv[u] = 0;
  for (i64 base = p0; base < p1; base += NT) {
    const int n = static_cast<int>(p1 - base < NT ? p1 - base : NT);
    __syncthreads();  // the previous chunk is done with s_slot / s_row
    if (tid < n) {
      const i64 s = order[base + tid];
      s_slot[tid] = s;
      s_row[tid] = s / K;
    }
    __syncthreads();
    // Slots in groups of UKV: the group's loads (dl, aw weights; q_i, g_v rows) are all issued
    // before its first multiply-add, UKV slots' loads in flight per thread instead of one (one
    // slot at a time the loop was latency-bound, ~5x below bandwidth on the H200). The sums
    // stay in slot order: the same results as one slot at a time, deterministic.
    int q = 0;
#pragma unroll 1
    for (; q + UKV <= n; q += UKV) {
      T wk[UKV][CPT], xk[UKV][CPT], wv[UKV][CPT], xv[UKV][CPT];
#pragma unroll
      for (int r = 0; r < UKV; ++r) {
        const i64 s = s_slot[q + r], i = s_row[q + r];
#pragma unroll
        for (int u = 0; u < CPT; ++u) {
          const int c = tid + u * NT;
          const bool in = c < W_;
          const int hc = in ? c / D_ : 0;
          wk[r][u] = in ? dl[s * H_ + hc] : (T)0;
          xk[r][u] = in ? qkv[i * W3 + c] : (T)0;
          wv[r][u] = in ? aw[s * H_ + hc] : (T)0;
          xv[r][u] = in ? g_v[i * W_ + c] : (T)0;
        }
      }
#pragma unroll
      for (int r = 0; r < UKV; ++r) {
#pragma unroll
        for (int u = 0; u < CPT; ++u) {
          dk[u] += wk[r][u] * xk[r][u];
          dv[u] += wv[r][u] * xv[r][u];
        }
      }
    }
#pragma unroll 1
    for (; q < n; ++q) {
      const i64 s = s_slot[q], i = s_row[q];
#pragma unroll
      for (int u = 0; u < CPT; ++u) {
        const int c = tid + u * NT;
        if (c < W_) {
          const int hc = c / D_;
          dk[u] += dl[s * H_ + hc] * qkv[i * W3 + c];
          dv[u] += aw[s * H_ + hc] * g_v[i * W_ + c];
        }
      }
    }
  }
#pragma unroll
  for (int u = 0; u < CPT; ++u) {
    const int c = tid + u * NT;
    if (c < W_) {
      dqkv[j * W3 + W_ + c] = scale * dk[u];
      dqkv[j * W3 + 2 * W_ + c] = dv[u];
    }
  }
}
