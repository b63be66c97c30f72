#pragma once
// CPU emulation of the CUDA subset the kernels of transip_md/ops/csrc/neighbor_attention_kernels.cu
// use, for tests/test_cuda_emulation.py: one std::thread per CUDA thread of a block (blocks run
// one after another), a block-wide std::barrier for __syncthreads, a per-warp barrier and an
// exchange array for shuffles, a mutex for atomics. It checks the kernels' index logic and
// arithmetic against the reference on a machine without a GPU; not their speed, nor races
// that only a GPU's scheduling would show.
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __restrict__
struct float4 { float x, y, z, w; };
struct float2 { float x, y; };
struct double2 { double x, y; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
struct Dim3 { unsigned x; };
extern thread_local Dim3 threadIdx;
extern thread_local Dim3 blockIdx;
extern std::barrier<>* g_block_bar;
extern std::barrier<>* g_warp_bar[64];
extern double g_xchg[64][32];
extern double* g_smem;
inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
template <typename V> V __shfl_xor_sync(unsigned, V v, int o) {
  int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  g_xchg[w][lane] = (double)v;
  g_warp_bar[w]->arrive_and_wait();
  V r = (V)g_xchg[w][lane ^ o];
  g_warp_bar[w]->arrive_and_wait();
  return r;
}
extern std::mutex g_atomic_mu;
template <typename V> V atomicAdd(V* p, V v) {
  std::lock_guard<std::mutex> l(g_atomic_mu);
  V o = *p;
  *p += v;
  return o;
}
inline void __trap() {
  std::fprintf(stderr, "TRAP\n");
  std::abort();
}
