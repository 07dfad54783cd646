// CPU kernels for a decode step's few rows, float32, as XLA FFI calls:
//
// specdec_rows_matmul: y[M, N] = x[M, D] @ w[N, D]^T for M in 1..8.
//   A decode step multiplies a handful of rows by every weight of the model,
//   so its cost is reading the weights once. XLA:CPU's and OpenBLAS's
//   matrix-matrix paths read them at about half the memory's speed from M = 2
//   on, so a verify pass of 5 tokens cost ~1.6 plain steps. This kernel
//   streams each weight row once and computes its M dot products while the
//   row is in L1. The weights are stored [out, in] (``w[n]`` is output n's
//   row), the layout ``transformer.to_rows_layout`` prepares at load.
//
// specdec_decode_attention: attention of a few queries per row over the KV
//   cache, reading each query's visible slots only (no window copy), with a
//   block's not-yet-written keys and values overlaid on the slots they will
//   take (``transformer.PendingBlock``). A query sees slots 0..limit and then
//   a list of the block's entries (a draft tree's ancestors; none for a
//   chain, where limit is the query's position). XLA's form copied and
//   transposed a window of every layer's cache per step (~20% of a SmolLM2
//   step on the CI machine).
//
// Numerics: every output depends only on its own row (x[m] and w[n]; one
// query, its cache slots and the block's entries), summed in an order that
// does not depend on how many rows the call has (16-lane partial sums in
// input order with fused multiply-adds, then a fixed pairwise reduction of
// the lanes), so a row's result is the same bits in a verify pass as in a
// plain step.
//
// Threads: the work is cut into chunks that the calling thread and
// num_threads - 1 helpers on XLA's intra-op pool claim from a shared
// counter (``ParallelFor``). The caller waits only for chunks already
// claimed, so a helper that never starts (a busy pool) costs nothing and
// cannot deadlock the call.
//
// Built on first use by kernels/build.py (-O3 -march=native against
// jax.ffi.include_dir()).

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>
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

// Runs fn(c) for c in [0, num_chunks) on the calling thread and up to
// num_threads - 1 helpers of ``pool`` (module comment, "Threads").
class ParallelFor {
 public:
  static void Run(ffi::ThreadPool& pool, int64_t num_chunks, std::function<void(int64_t)> fn) {
    auto state = std::make_shared<State>();
    state->fn = std::move(fn);
    state->num_chunks = num_chunks;
    // The calling thread works too, so num_threads - 1 helpers fill the
    // pool's threads (one more made a SmolLM2-shaped pass ~20% slower on 2
    // cores: three threads then share two).
    const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, num_chunks - 1);
    for (int64_t i = 0; i < helpers; ++i) {
      pool.Schedule([state] { state->Drain(); });
    }
    state->Drain();
    // The chunks still out are being computed right now: spin, and yield the
    // core if a helper was descheduled.
    for (int spins = 0; state->done.load(std::memory_order_acquire) < num_chunks; ++spins) {
      if (spins < 1000) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  struct State {
    std::function<void(int64_t)> fn;
    int64_t num_chunks = 0;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};

    // Claims and runs chunks until none is left (a helper that starts after
    // the call returned finds none and touches nothing else).
    void Drain() {
      for (int64_t c = next.fetch_add(1); c < num_chunks; c = next.fetch_add(1)) {
        fn(c);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
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
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  ParallelFor::Run(pool, (n_out + kChunk - 1) / kChunk, [=](int64_t c) {
    const int64_t n0 = c * kChunk;
    fn(xp, wp, yp, d, n_out, n0, std::min(n0 + kChunk, n_out));
  });
  return ffi::Error::Success();
}


// ---------------------------------------------------------------------------
// specdec_decode_attention

// sum_h a[h] * b[h] in the kernels' fixed order (16-lane partial sums, then
// LaneSum, then the tail).
inline float Dot(const float* a, const float* b, int64_t h) {
  const int64_t full = h - h % kLanes;
  v16 acc = {};
  for (int64_t j = 0; j < full; j += kLanes) acc += Load(a + j) * Load(b + j);
  float s = LaneSum(acc);
  for (int64_t j = full; j < h; ++j) s += a[j] * b[j];
  return s;
}

struct AttentionShapes {
  int64_t batch, seq, heads, head_dim, slots, groups, block, extras;
};

// One (row b, query t, kv group g): the group's heads attend slots
// 0..limit[b, t] (each read from the block where entry[b, s] >= 0), then
// the block entries extra[b, t, :] lists up to its first -1, in that order.
void AttendGroup(const AttentionShapes& sh, const float* q, const float* k_cache,
                 const float* v_cache, const float* new_k, const float* new_v,
                 const int32_t* entry, const int32_t* limit, const int32_t* extra, float scale,
                 float* out, int64_t b, int64_t t, int64_t g, std::vector<float>& scores) {
  const int64_t h = sh.head_dim, per_group = sh.heads / sh.groups;
  const int64_t last = std::min<int64_t>(limit[b * sh.seq + t], sh.slots - 1);
  const int64_t in_cache = std::max<int64_t>(last + 1, 0);
  const int32_t* extra0 = extra + (b * sh.seq + t) * sh.extras;
  int64_t num_extra = 0;
  while (num_extra < sh.extras && extra0[num_extra] >= 0 && extra0[num_extra] < sh.block) {
    ++num_extra;
  }
  const int64_t count = in_cache + num_extra;
  const float* q0 = q + ((b * sh.seq + t) * sh.heads + g * per_group) * h;
  float* out0 = out + ((b * sh.seq + t) * sh.heads + g * per_group) * h;
  std::fill(out0, out0 + per_group * h, 0.0f);
  if (count <= 0) return;
  // The i-th key a query sees: slot i (or the block entry that takes it),
  // then the listed block entries.
  auto key_value = [&](int64_t i, const float** key, const float** value) {
    const int32_t e = i < in_cache ? entry[b * sh.slots + i] : extra0[i - in_cache];
    const int64_t offset = e >= 0 ? ((b * sh.block + e) * sh.groups + g) * h
                                  : ((b * sh.slots + i) * sh.groups + g) * h;
    *key = (e >= 0 ? new_k : k_cache) + offset;
    *value = (e >= 0 ? new_v : v_cache) + offset;
  };
  scores.resize(per_group * count);
  for (int64_t s = 0; s < count; ++s) {
    const float *key, *value;
    key_value(s, &key, &value);
    for (int64_t m = 0; m < per_group; ++m) scores[m * count + s] = Dot(q0 + m * h, key, h) * scale;
  }
  for (int64_t m = 0; m < per_group; ++m) {
    float* sc = scores.data() + m * count;
    const float top = *std::max_element(sc, sc + count);
    float total = 0.0f;
    for (int64_t s = 0; s < count; ++s) {
      sc[s] = std::exp(sc[s] - top);
      total += sc[s];
    }
    const float inv = 1.0f / total;
    for (int64_t s = 0; s < count; ++s) sc[s] *= inv;
  }
  for (int64_t s = 0; s < count; ++s) {
    const float *key, *value;
    key_value(s, &key, &value);
    for (int64_t m = 0; m < per_group; ++m) {
      const float p = scores[m * count + s];
      float* o = out0 + m * h;
      for (int64_t j = 0; j < h; ++j) o[j] += p * value[j];
    }
  }
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> k_cache, ffi::Buffer<ffi::F32> v_cache,
                               ffi::Buffer<ffi::F32> new_k, ffi::Buffer<ffi::F32> new_v,
                               ffi::Buffer<ffi::S32> entry, ffi::Buffer<ffi::S32> limit,
                               ffi::Buffer<ffi::S32> extra, float scale,
                               ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k_cache.dimensions(), nd = new_k.dimensions();
  const auto xd = extra.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || nd.size() != 4 || kd[0] != qd[0] || kd[3] != qd[3] ||
      nd[0] != qd[0] || nd[2] != kd[2] || nd[3] != qd[3] || qd[2] % kd[2] != 0 ||
      entry.dimensions().size() != 2 || entry.dimensions()[1] != kd[1] ||
      limit.dimensions().size() != 2 || limit.dimensions()[1] != qd[1] ||
      xd.size() != 3 || xd[0] != qd[0] || xd[1] != qd[1]) {
    return ffi::Error::InvalidArgument(
        "specdec_decode_attention: q [B, T, N, H], caches [B, S, G, H], block [B, T', G, H], "
        "entry [B, S], limit [B, T], extra [B, T, X]");
  }
  const AttentionShapes sh{qd[0], qd[1], qd[2], qd[3], kd[1], kd[2], nd[1], xd[2]};
  const float *qp = q.typed_data(), *kp = k_cache.typed_data(), *vp = v_cache.typed_data();
  const float *nkp = new_k.typed_data(), *nvp = new_v.typed_data();
  const int32_t *ep = entry.typed_data(), *lp = limit.typed_data(), *xp = extra.typed_data();
  float* op = out->typed_data();
  ParallelFor::Run(pool, sh.batch * sh.seq * sh.groups, [=](int64_t c) {
    thread_local std::vector<float> scores;
    const int64_t g = c % sh.groups, t = (c / sh.groups) % sh.seq, b = c / (sh.groups * sh.seq);
    AttendGroup(sh, qp, kp, vp, nkp, nvp, ep, lp, xp, scale, op, b, t, g, scores);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpecdecRowsMatmul, RowsMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpecdecDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q [B, T, N, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_cache [B, S, G, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_cache
                                  .Arg<ffi::Buffer<ffi::F32>>()   // new_k [B, T', G, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // new_v
                                  .Arg<ffi::Buffer<ffi::S32>>()   // entry [B, S]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // limit [B, T]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // extra [B, T, X]
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // [B, T, N, H]
