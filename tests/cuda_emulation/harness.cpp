// Entry points of the emulated qkv kernels for tests/test_cuda_emulation.py (ctypes). The
// kernel text is included as kernels_emu.cu, which the test writes from the real file with the
// CUDA-only declarations (dynamic / static shared memory, extern "C") rewritten for the shim.
#include <functional>
#include <memory>

#include "shim.h"
thread_local Dim3 threadIdx;
thread_local Dim3 blockIdx;
std::barrier<>* g_block_bar;
std::barrier<>* g_warp_bar[64];
double g_xchg[64][32];
double* g_smem;
std::mutex g_atomic_mu;
#include "kernels_emu.cu"

// Runs `body` as `blocks` blocks of NT threads, one block at a time, with `shared` bytes of
// dynamic shared memory.
static void run(long long blocks, size_t shared, const std::function<void()>& body) {
  std::vector<double> smem(shared / 8 + 16);
  g_smem = smem.data();
  std::barrier<> block_bar(NT);
  g_block_bar = &block_bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
  for (int w = 0; w < NT / 32; ++w) {
    warp_bars.emplace_back(new std::barrier<>(32));
    g_warp_bar[w] = warp_bars.back().get();
  }
  for (long long b = 0; b < blocks; ++b) {
    std::vector<std::thread> threads;
    for (int t = 0; t < NT; ++t)
      threads.emplace_back([&, t, b] {
        threadIdx.x = t;
        blockIdx.x = static_cast<unsigned>(b);
        body();
      });
    for (auto& th : threads) th.join();
  }
}

extern "C" void fwd(const T* qkv, const i64* gidx, const T* edge, const T* env, const T* q_edge,
                    const T* bias, const T* ls, T* agg_v, T* agg_edge, T* a_sum, T* a_self,
                    T* row_max, T* denom, T* lbuf, int K, i64 M, i64 R, T scale, size_t shared) {
  run(R, shared, [=] {
    naq_forward(qkv, gidx, edge, env, q_edge, bias, ls, agg_v, agg_edge, a_sum, a_self, row_max,
                denom, lbuf, K, M, R, scale);
  });
}

extern "C" void bwd(const T* g_v, const T* g_edge, const T* g_sum, const T* g_self, const T* qkv,
                    const i64* gidx, const T* edge, const T* env, const T* q_edge, const T* bias,
                    const T* ls, const T* rm, const T* dn, T* dqkv, T* dedge, T* denv, T* dqe,
                    T* dbias, T* dls, T* lbuf, T* a_out, int K, i64 M, i64 R, T scale,
                    size_t shared) {
  run(R, shared, [=] {
    naq_backward(g_v, g_edge, g_sum, g_self, qkv, gidx, edge, env, q_edge, bias, ls, rm, dn,
                 dqkv, dedge, denv, dqe, dbias, dls, lbuf, a_out, K, M, R, scale);
  });
}

extern "C" void bwd_kv(const T* qkv, const T* g_v, const T* dl, const T* aw, const i64* order,
                       const i64* ptr, T* dqkv, int K, i64 M, T scale) {
  run(M, 0, [=] { naq_backward_kv(qkv, g_v, dl, aw, order, ptr, dqkv, K, scale); });
}
