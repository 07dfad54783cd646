// y[M, N] = x[M, D] @ w[N, D]^T for a few rows M (1..8), float32, on the CPU.
//
// Why: a decode step multiplies a handful of rows by every weight of the
// model, so its cost is reading the weights once. XLA:CPU's and OpenBLAS's
// matrix-matrix paths read them at about half the memory's speed from M = 2
// on (they pack the weights into panels first), so a verify pass of 5 tokens
// cost ~1.6 plain steps (README, "Why a wider verify pass costs more here").
// This kernel streams each weight row once, from the front, and computes
// its M dot products while the row is in L1. The weights are stored [out,
// in] (``w[n]`` is output n's row), the layout ``kernels.cpu_matmul``
// prepares at load.
//
// Numerics: y[m, n] depends only on x[m] and w[n], summed in the same order
// for every M (16-lane partial sums in d order, fused multiply-adds, then a
// fixed pairwise reduction of the lanes), so a row's result is the same bits
// whatever else is in the pass: a verify pass and a plain step agree exactly.
//
// Threads: the output rows are cut into chunks that the calling thread and
// num_threads - 1 helpers on XLA's intra-op pool claim from a shared
// counter. The caller waits only for chunks already claimed, so a helper
// that never starts (a busy pool) costs nothing and cannot deadlock the call.
//
// Built on first use by kernels/cpu_matmul.py (-O3 -march=native against
// jax.ffi.include_dir()); registered as the XLA FFI target
// "specdec_rows_matmul".

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef float v4 __attribute__((vector_size(16), aligned(4)));

constexpr int kLanes = 16;
constexpr int64_t kChunk = 66;  // output rows per claimed chunk (a multiple of 3)

inline v16 Load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Fixed pairwise order: 16 -> 8 -> 4 -> 2 -> 1 lanes.
inline float LaneSum(v16 v) {
  v8 lo8, hi8;
  std::memcpy(&lo8, &v, sizeof(lo8));
  std::memcpy(&hi8, reinterpret_cast<const char*>(&v) + sizeof(lo8), sizeof(hi8));
  v8 s8 = lo8 + hi8;
  v4 lo4, hi4;
  std::memcpy(&lo4, &s8, sizeof(lo4));
  std::memcpy(&hi4, reinterpret_cast<const char*>(&s8) + sizeof(lo4), sizeof(hi4));
  v4 s4 = lo4 + hi4;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// Output rows [n0, n1) for all M rows of x, R output rows at a time; PF:
// how many weight rows ahead to prefetch into L2. Measured on the 2-core CI
// machine (SmolLM2's weights, layers chained as in the decoder, one process):
// without the prefetch the core runs out of outstanding misses from M = 2 on
// and streams at about two thirds of the memory's speed; with it, 8 rows cost
// ~1.1 one row (benchmarks/matmul_width.py --forms=dot,kernel).
template <int M, int R, int PF>
void Rows(const float* x, const float* w, float* y, int64_t d, int64_t n_out, int64_t n0,
          int64_t n1) {
  const int64_t full = d - d % kLanes;
  for (int64_t n = n0; n + R <= n1; n += R) {
    v16 acc[M][R] = {};
    for (int64_t j = 0; j < full; j += kLanes) {
      v16 wv[R];
      for (int r = 0; r < R; ++r) {
        const float* p = w + (n + r) * d + j;
        wv[r] = Load(p);
        if (n + r + PF < n_out) __builtin_prefetch(p + PF * d, /*rw=*/0, /*locality=*/2);
      }
      for (int m = 0; m < M; ++m) {
        const v16 xv = Load(x + m * d + j);
        for (int r = 0; r < R; ++r) acc[m][r] += xv * wv[r];
      }
    }
    for (int m = 0; m < M; ++m) {
      for (int r = 0; r < R; ++r) {
        float s = LaneSum(acc[m][r]);
        for (int64_t j = full; j < d; ++j) s += x[m * d + j] * w[(n + r) * d + j];
        y[m * n_out + n + r] = s;
      }
    }
  }
}

using RangeFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t,
                         int64_t);

// Three weight rows at a time (their x loads shared; M * 3 accumulators fit
// the registers up to M = 8), the last n_out % 3 rows one at a time.
template <int M>
void Range(const float* x, const float* w, float* y, int64_t d, int64_t n_out, int64_t n0,
           int64_t n1) {
  const int64_t n3 = n0 + (n1 - n0) / 3 * 3;
  Rows<M, 3, 4>(x, w, y, d, n_out, n0, n3);
  Rows<M, 1, 4>(x, w, y, d, n_out, n3, n1);
}

RangeFn RangeFor(int64_t m) {
  switch (m) {
    case 1: return Range<1>;
    case 2: return Range<2>;
    case 3: return Range<3>;
    case 4: return Range<4>;
    case 5: return Range<5>;
    case 6: return Range<6>;
    case 7: return Range<7>;
    case 8: return Range<8>;
  }
  return nullptr;
}

struct Work {
  RangeFn fn;
  const float* x;
  const float* w;
  float* y;
  int64_t d, n_out, num_chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  // Claims and runs chunks until none is left.
  void Drain() {
    for (int64_t c = next.fetch_add(1); c < num_chunks; c = next.fetch_add(1)) {
      const int64_t n0 = c * kChunk;
      const int64_t n1 = n0 + kChunk < n_out ? n0 + kChunk : n_out;
      fn(x, w, y, d, n_out, n0, n1);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error RowsMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1]) {
    return ffi::Error::InvalidArgument("specdec_rows_matmul: x must be [M, D], w [N, D]");
  }
  const int64_t m = xd[0], d = xd[1], n_out = wd[0];
  RangeFn fn = RangeFor(m);
  if (fn == nullptr) {
    return ffi::Error::InvalidArgument("specdec_rows_matmul: M must be 1..8");
  }
  auto work = std::make_shared<Work>();
  work->fn = fn;
  work->x = x.typed_data();
  work->w = w.typed_data();
  work->y = y->typed_data();
  work->d = d;
  work->n_out = n_out;
  work->num_chunks = (n_out + kChunk - 1) / kChunk;
  // The calling thread works too, so num_threads - 1 helpers fill the pool's
  // threads (measured: one more helper than that made a SmolLM2-shaped pass
  // ~20% slower on 2 cores: three threads then share two).
  const int64_t helpers =
      std::min<int64_t>(pool.num_threads() - 1, work->num_chunks - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([work] { work->Drain(); });
  }
  work->Drain();
  // The chunks still out are being computed right now (a chunk is a few
  // microseconds): spin, and yield the core if a helper was descheduled.
  for (int spins = 0; work->done.load(std::memory_order_acquire) < work->num_chunks; ++spins) {
    if (spins < 1000) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpecdecRowsMatmul, RowsMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
