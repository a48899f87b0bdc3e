// Decode and ragged paged attention for CPUs, called from JAX through the XLA FFI.
//
// Both handlers share one engine: a work item is (sequence, query rows, a few KV heads, a
// range of key positions). It streams each key and value row of its range once, in the cache
// dtype, for every query head that reads that KV head, keeps a float32 online softmax per
// query vector, and files its partial (max, sum, weighted values) in a slot of its own. The
// items are taken by a few threads from one atomic counter; the partials of a query vector
// are merged (with its sink) after all items are done. Only positions inside a row's valid
// range are ever read, so whatever a cache holds elsewhere cannot reach an output, and every
// index read from an input is clamped before it addresses memory.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

enum class Kind { kF32, kBF16, kF16 };

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    const float magnitude = float(mantissa) * (1.0f / 16777216.0f);  // subnormal: m * 2^-24
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// One cache row (D elements) in float32.
template <Kind K>
inline void load_row(const void* src, float* dst, int64_t d) {
  if constexpr (K == Kind::kF32) {
    std::memcpy(dst, src, size_t(d) * 4);
  } else if constexpr (K == Kind::kBF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < d; ++i) dst[i] = bits_to_float(uint32_t(s[i]) << 16);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= d; i += 8) {
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(
                                    reinterpret_cast<const __m128i*>(s + i))));
    }
#endif
    for (; i < d; ++i) dst[i] = half_to_float(s[i]);
  }
}

inline float dot_f32(const float* a, const float* b, int64_t d) {
#if defined(__AVX512F__)
  if (d % 16 == 0) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= d; i += 32) {
      acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
      acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
    }
    if (i < d) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  }
#endif
  float lanes[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= d; i += 16)
    for (int l = 0; l < 16; ++l) lanes[l] += a[i + l] * b[i + l];
  float sum = 0;
  for (; i < d; ++i) sum += a[i] * b[i];
  for (int l = 0; l < 16; ++l) sum += lanes[l];
  return sum;
}

#if defined(__AVX512BF16__)
// q and k as bfloat16 bit patterns; d is a multiple of 32. Products accumulate in float32.
inline float dot_bf16(const uint16_t* q, const uint16_t* k, int64_t d) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= d; i += 64) {
    acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(q + i),
                            (__m512bh)_mm512_loadu_si512(k + i));
    acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_loadu_si512(q + i + 32),
                            (__m512bh)_mm512_loadu_si512(k + i + 32));
  }
  if (i < d)
    acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(q + i),
                            (__m512bh)_mm512_loadu_si512(k + i));
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
constexpr bool kHaveBf16Dot = true;
#else
inline float dot_bf16(const uint16_t*, const uint16_t*, int64_t) { return kNaN; }
constexpr bool kHaveBf16Dot = false;
#endif

inline void axpy(float w, const float* x, float* y, int64_t d) {
  for (int64_t i = 0; i < d; ++i) y[i] += w * x[i];
}

// exp(x) for x in [-87, 88] (clamped there), about 2 ulp; written branch-free so the block
// loops vectorize. NaN stays NaN.
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693145751953125f - n * 1.42860682030941723e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  n = n == n ? n : 0.0f;  // keeps the integer conversion defined; p carries the NaN
  return p * bits_to_float(uint32_t(int32_t(n) + 127) << 23);
}

inline float nan_max(float a, float b) {
  if (a != a || b != b) return kNaN;
  return a > b ? a : b;
}

struct Params {
  float scale;
  int64_t window_left;  // < 0: no window
  float soft_cap;       // <= 0: none
  bool has_sinks;
  int64_t block;        // keys scored before one softmax update
  int64_t heads_per_task;
  int64_t threads;      // <= 0: every core
  int64_t splits;
  int64_t prefetch;     // positions ahead; 0: none
  bool bf16_dot;        // the query is exactly bfloat16: score with bfloat16 dot products
};

struct Partial {  // a view of one partial's storage: m, l, then D accumulators
  float* p;
};

// Position j of KV head g -> pointers to its key and value rows.
struct DecodeRows {
  const char* key;
  const char* value;
  int64_t row_stride;  // bytes between positions (Hkv * D elements)
  int64_t head_bytes;  // D elements
  const char* k(int64_t j, int64_t g) const { return key + j * row_stride + g * head_bytes; }
  const char* v(int64_t j, int64_t g) const { return value + j * row_stride + g * head_bytes; }
};

struct PagedRows {
  const char* pages;
  const int32_t* table_row;  // this sequence's page table row
  int64_t num_pages, page_size, row_stride, head_bytes;
  const char* base(int64_t j) const {
    int64_t page = table_row[j / page_size];
    page = page < 0 ? 0 : (page >= num_pages ? num_pages - 1 : page);
    return pages + (page * page_size + j % page_size) * row_stride;
  }
  const char* k(int64_t j, int64_t g) const { return base(j) + (2 * g) * head_bytes; }
  const char* v(int64_t j, int64_t g) const { return base(j) + (2 * g + 1) * head_bytes; }
};

struct Scratch {
  std::vector<float> scores, key, value, query;
  std::vector<uint16_t> query_bf16;
  std::vector<float> m, l, acc;
  std::vector<int64_t> lo, hi;
};

// One work item: query vectors (rows x G heads for each KV head in [g0, g1)) against the
// positions [a, b). Query vector (r, h) reads positions [lo[r], hi[r]) only; q(r, h) gives
// its float32 row; slot(r, h) its partial storage.
template <Kind K, class Rows, class QueryAt, class SlotAt>
void run_item(const Rows& rows, int64_t g0, int64_t g1, int64_t group, int64_t nrows,
              const int64_t* lo, const int64_t* hi, int64_t a, int64_t b, int64_t d,
              const Params& prm, QueryAt q_at, SlotAt slot_at, Scratch& s) {
  const int64_t nq = nrows * group;  // query vectors per KV head
  const int64_t heads = g1 - g0;
  const int64_t block = prm.block;
  const bool bf16_dot = K == Kind::kBF16 && kHaveBf16Dot && prm.bf16_dot && d % 32 == 0;
  s.scores.resize(size_t(block * nq));
  s.key.resize(size_t(d));
  s.value.resize(size_t(d));
  s.query.resize(size_t(heads * nq * d));
  s.query_bf16.resize(size_t(heads * nq * d));
  s.m.assign(size_t(heads * nq), kNegInf);
  s.l.assign(size_t(heads * nq), 0.0f);
  s.acc.assign(size_t(heads * nq * d), 0.0f);
  for (int64_t hg = 0; hg < heads; ++hg)
    for (int64_t r = 0; r < nrows; ++r)
      for (int64_t e = 0; e < group; ++e) {
        const float* src = q_at(r, (g0 + hg) * group + e);
        float* dst = s.query.data() + ((hg * nq) + r * group + e) * d;
        std::memcpy(dst, src, size_t(d) * 4);
        uint16_t* dst16 = s.query_bf16.data() + ((hg * nq) + r * group + e) * d;
        for (int64_t i = 0; i < d; ++i) {
          uint32_t bits;
          std::memcpy(&bits, dst + i, 4);
          dst16[i] = uint16_t(bits >> 16);  // exact when the query came as bfloat16
        }
      }
  const float cap = prm.soft_cap;
  const bool capped = cap > 0;
  float* scores = s.scores.data();
  for (int64_t start = a; start < b; start += block) {
    const int64_t n = std::min(block, b - start);
    for (int64_t hg = 0; hg < heads; ++hg) {
      const int64_t g = g0 + hg;
      const float* query = s.query.data() + hg * nq * d;
      const uint16_t* query16 = s.query_bf16.data() + hg * nq * d;
      float* m = s.m.data() + hg * nq;
      float* l = s.l.data() + hg * nq;
      float* acc = s.acc.data() + hg * nq * d;
      // Scores of the block; positions outside a vector's range are never scored.
      for (int64_t t = 0; t < n; ++t) {
        const int64_t j = start + t;
        if (prm.prefetch > 0 && j + prm.prefetch < b) {
          __builtin_prefetch(rows.k(j + prm.prefetch, g));
          __builtin_prefetch(rows.v(j + prm.prefetch, g));
        }
        const char* krow = rows.k(j, g);
        const float* kf = reinterpret_cast<const float*>(krow);
        if (!bf16_dot && K != Kind::kF32) {
          load_row<K>(krow, s.key.data(), d);
          kf = s.key.data();
        }
        for (int64_t r = 0; r < nrows; ++r) {
          const bool inside = j >= lo[r] && j < hi[r];
          for (int64_t e = 0; e < group; ++e) {
            const int64_t qi = r * group + e;
            float z = kNegInf;
            if (inside) {
              z = bf16_dot ? dot_bf16(query16 + qi * d, reinterpret_cast<const uint16_t*>(krow), d)
                           : dot_f32(query + qi * d, kf, d);
              z *= prm.scale;
            }
            scores[t * nq + qi] = z;
          }
        }
      }
      if (capped) {
        for (int64_t i = 0; i < n * nq; ++i) {
          const float z = scores[i];
          const float e2 = exp_approx(2.0f * z / cap);
          const float capped_z = cap * (1.0f - 2.0f / (e2 + 1.0f));
          scores[i] = z == kNegInf ? kNegInf : capped_z;
        }
      }
      // Online softmax update of each query vector over the block.
      for (int64_t r = 0; r < nrows; ++r) {
        const int64_t j0 = std::max(start, lo[r]), j1 = std::min(start + n, hi[r]);
        for (int64_t e = 0; e < group; ++e) {
          const int64_t qi = r * group + e;
          if (j0 >= j1) continue;
          float block_max = kNegInf;
          for (int64_t j = j0; j < j1; ++j) block_max = nan_max(block_max, scores[(j - start) * nq + qi]);
          const float m_new = nan_max(m[qi], block_max);
          if (m_new == kNegInf) continue;  // every logit so far is -inf: nothing to add
          const float alpha = m[qi] == kNegInf ? 0.0f : std::exp(m[qi] - m_new);
          float sum = 0;
          for (int64_t j = j0; j < j1; ++j) {
            float& z = scores[(j - start) * nq + qi];
            z = exp_approx(z - m_new);
            sum += z;
          }
          l[qi] = l[qi] * alpha + sum;
          m[qi] = m_new;
          if (alpha != 1.0f) {
            float* ac = acc + qi * d;
            for (int64_t i = 0; i < d; ++i) ac[i] *= alpha;
          }
        }
      }
      // Weighted values: each value row read once for every vector that may see it.
      for (int64_t t = 0; t < n; ++t) {
        const int64_t j = start + t;
        const char* vrow = rows.v(j, g);
        const float* vf = reinterpret_cast<const float*>(vrow);
        bool loaded = K == Kind::kF32;
        for (int64_t r = 0; r < nrows; ++r) {
          if (j < lo[r] || j >= hi[r]) continue;
          if (!loaded) {
            load_row<K>(vrow, s.value.data(), d);
            vf = s.value.data();
            loaded = true;
          }
          for (int64_t e = 0; e < group; ++e) {
            const int64_t qi = r * group + e;
            if (m[qi] == kNegInf) continue;
            axpy(scores[t * nq + qi], vf, acc + qi * d, d);
          }
        }
      }
    }
  }
  for (int64_t hg = 0; hg < heads; ++hg)
    for (int64_t r = 0; r < nrows; ++r)
      for (int64_t e = 0; e < group; ++e) {
        const int64_t qi = r * group + e;
        float* out = slot_at(r, (g0 + hg) * group + e);
        out[0] = s.m[hg * nq + qi];
        out[1] = s.l[hg * nq + qi];
        std::memcpy(out + 2, s.acc.data() + (hg * nq + qi) * d, size_t(d) * 4);
      }
}

// Merges the partials of one query vector (and its sink) into its output row.
void finish(const float* parts, int64_t count, int64_t d, bool has_sink, float sink,
            float* out) {
  const int64_t stride = d + 2;
  float m = has_sink ? sink : kNegInf;
  for (int64_t s = 0; s < count; ++s)
    if (parts[s * stride + 1] != 0.0f || parts[s * stride] != kNegInf)
      m = nan_max(m, parts[s * stride]);
  std::fill(out, out + d, 0.0f);
  if (m == kNegInf) return;  // no key and no sink: an empty row is zeros
  float denominator = has_sink ? std::exp(sink - m) : 0.0f;
  for (int64_t s = 0; s < count; ++s) {
    const float* p = parts + s * stride;
    if (p[0] == kNegInf) continue;  // an empty partial
    const float w = std::exp(p[0] - m);
    denominator += p[1] * w;
    for (int64_t i = 0; i < d; ++i) out[i] += p[2 + i] * w;
  }
  if (denominator == 0.0f) {
    std::fill(out, out + d, 0.0f);
    return;
  }
  const float inverse = 1.0f / denominator;
  for (int64_t i = 0; i < d; ++i) out[i] *= inverse;
}

template <class Fn>
void parallel_for(int64_t count, int64_t threads, Fn fn) {
  if (threads <= 0) threads = std::max<int64_t>(1, std::thread::hardware_concurrency());
  threads = std::min(threads, count);
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    Scratch scratch;
    for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) fn(i, scratch);
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& thread : pool) thread.join();
}

struct Item {
  int64_t seq, row0, nrows, g0, g1, a, b, split;
};

bool kind_of(ffi::DataType type, Kind* kind) {
  switch (type) {
    case ffi::DataType::F32: *kind = Kind::kF32; return true;
    case ffi::DataType::BF16: *kind = Kind::kBF16; return true;
    case ffi::DataType::F16: *kind = Kind::kF16; return true;
    default: return false;
  }
}

int64_t clamp64(int64_t x, int64_t low, int64_t high) { return x < low ? low : (x > high ? high : x); }

// Cuts [lo, hi) into `splits` pieces whose lengths are multiples of `block`.
void split_range(int64_t lo, int64_t hi, int64_t splits, int64_t block, int64_t s,
                 int64_t* a, int64_t* b) {
  const int64_t len = hi - lo;
  int64_t chunk = (len + splits - 1) / splits;
  chunk = (chunk + block - 1) / block * block;
  *a = std::min(hi, lo + s * chunk);
  *b = std::min(hi, lo + (s + 1) * chunk);
}

Params read_params(float scale, int64_t window_left, float soft_cap, int64_t has_sinks,
                   int64_t block, int64_t heads_per_task, int64_t threads, int64_t splits,
                   int64_t prefetch, int64_t bf16_dot) {
  Params p{scale, window_left, soft_cap, has_sinks != 0, std::max<int64_t>(block, 1),
           std::max<int64_t>(heads_per_task, 1), threads, std::max<int64_t>(splits, 1),
           std::max<int64_t>(prefetch, 0), bf16_dot != 0};
  return p;
}

template <Kind K>
void decode_run(const float* q, const char* key, const char* value, const int32_t* start,
                const int32_t* end, const float* sinks, float* out, int64_t batch, int64_t len,
                int64_t q_heads, int64_t kv_heads, int64_t d, const Params& prm) {
  const int64_t group = q_heads / kv_heads;
  const int64_t elem = K == Kind::kF32 ? 4 : 2;
  std::vector<int64_t> lo(static_cast<size_t>(batch)), hi(static_cast<size_t>(batch));
  for (int64_t b = 0; b < batch; ++b) {
    hi[b] = clamp64(end[b], 0, len);
    lo[b] = clamp64(start[b], 0, hi[b]);
    if (prm.window_left >= 0) lo[b] = std::max(lo[b], hi[b] - 1 - prm.window_left);
  }
  const int64_t stride = d + 2;
  std::vector<float> parts(size_t(batch * q_heads * prm.splits * stride));
  for (size_t i = 0; i < parts.size(); i += size_t(stride)) { parts[i] = kNegInf; parts[i + 1] = 0; }
  std::vector<Item> items;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t g0 = 0; g0 < kv_heads; g0 += prm.heads_per_task)
      for (int64_t s = 0; s < prm.splits; ++s) {
        int64_t a, e;
        split_range(lo[b], hi[b], prm.splits, prm.block, s, &a, &e);
        if (a < e) items.push_back({b, 0, 1, g0, std::min(kv_heads, g0 + prm.heads_per_task), a, e, s});
      }
  parallel_for(int64_t(items.size()), prm.threads, [&](int64_t i, Scratch& scratch) {
    const Item& it = items[size_t(i)];
    const int64_t seq_bytes = len * kv_heads * d * elem;
    DecodeRows rows{key + it.seq * seq_bytes, value + it.seq * seq_bytes, kv_heads * d * elem, d * elem};
    run_item<K>(rows, it.g0, it.g1, group, 1, &lo[it.seq], &hi[it.seq], it.a, it.b, d, prm,
                [&](int64_t, int64_t h) { return q + (it.seq * q_heads + h) * d; },
                [&](int64_t, int64_t h) {
                  return parts.data() + ((it.seq * q_heads + h) * prm.splits + it.split) * stride;
                },
                scratch);
  });
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < q_heads; ++h)
      finish(parts.data() + (b * q_heads + h) * prm.splits * stride, prm.splits, d,
             prm.has_sinks, prm.has_sinks ? sinks[h] : 0.0f, out + (b * q_heads + h) * d);
}

ffi::Error decode_impl(ffi::Buffer<ffi::F32> query, ffi::AnyBuffer key, ffi::AnyBuffer value,
                       ffi::Buffer<ffi::S32> start, ffi::Buffer<ffi::S32> end,
                       ffi::Buffer<ffi::F32> sinks, ffi::ResultBuffer<ffi::F32> out,
                       float scale, int64_t window_left, float soft_cap, int64_t has_sinks,
                       int64_t block, int64_t heads_per_task, int64_t threads, int64_t splits,
                       int64_t prefetch, int64_t bf16_dot) {
  auto qd = query.dimensions();
  auto kd = key.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || value.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("decode: query must be [B, Hq, D], key/value [B, S, Hkv, D]");
  const int64_t batch = qd[0], q_heads = qd[1], d = qd[2], len = kd[1], kv_heads = kd[2];
  if (kd[0] != batch || kd[3] != d || kv_heads <= 0 || q_heads % kv_heads != 0 ||
      key.element_type() != value.element_type() ||
      start.element_count() != size_t(batch) || end.element_count() != size_t(batch) ||
      (has_sinks && sinks.element_count() != size_t(q_heads)))
    return ffi::Error::InvalidArgument("decode: inconsistent shapes");
  Kind kind;
  if (!kind_of(key.element_type(), &kind))
    return ffi::Error::InvalidArgument("decode: the cache must be float32, bfloat16 or float16");
  const Params prm = read_params(scale, window_left, soft_cap, has_sinks, block, heads_per_task,
                                 threads, splits, prefetch, bf16_dot);
  const char* k = static_cast<const char*>(key.untyped_data());
  const char* v = static_cast<const char*>(value.untyped_data());
#define ATTNBENCH_DECODE(KIND)                                                              \
  decode_run<KIND>(query.typed_data(), k, v, start.typed_data(), end.typed_data(),          \
                   sinks.typed_data(), out->typed_data(), batch, len, q_heads, kv_heads, d, \
                   prm)
  if (kind == Kind::kF32) ATTNBENCH_DECODE(Kind::kF32);
  else if (kind == Kind::kBF16) ATTNBENCH_DECODE(Kind::kBF16);
  else ATTNBENCH_DECODE(Kind::kF16);
#undef ATTNBENCH_DECODE
  return ffi::Error::Success();
}

template <Kind K>
void paged_run(const float* q, const char* pages, const int32_t* context_lens,
               const int32_t* table, const int32_t* query_start, int64_t num_seqs,
               const float* sinks, float* out, int64_t tokens, int64_t q_heads, int64_t kv_heads,
               int64_t d, int64_t num_pages, int64_t page_size, int64_t max_seqs,
               int64_t pages_per_seq, int64_t rows_per_task, const Params& prm) {
  const int64_t group = q_heads / kv_heads;
  const int64_t elem = K == Kind::kF32 ? 4 : 2;
  std::fill(out, out + tokens * q_heads * d, 0.0f);  // padding rows are zeros
  const int64_t seqs = clamp64(num_seqs, 0, max_seqs);
  // Each active sequence's rows, made disjoint and in bounds whatever the offsets say.
  std::vector<int64_t> row_begin(static_cast<size_t>(seqs)), row_end(static_cast<size_t>(seqs)), ctx(static_cast<size_t>(seqs));
  int64_t previous = clamp64(query_start[0], 0, tokens);
  for (int64_t i = 0; i < seqs; ++i) {
    row_begin[i] = previous;
    row_end[i] = clamp64(query_start[i + 1], previous, tokens);
    previous = row_end[i];
    ctx[i] = clamp64(context_lens[i], 0, pages_per_seq * page_size);
  }
  // Each row's key range [lo, hi): causal, within the context, cut by the window.
  std::vector<int64_t> lo(static_cast<size_t>(tokens), 0), hi(static_cast<size_t>(tokens), 0);
  for (int64_t i = 0; i < seqs; ++i) {
    const int64_t q_len = row_end[i] - row_begin[i];
    for (int64_t r = row_begin[i]; r < row_end[i]; ++r) {
      const int64_t p = ctx[i] - q_len + (r - row_begin[i]);
      int64_t low = 0, high = std::min(p + 1, ctx[i]);
      if (prm.window_left >= 0) low = std::max<int64_t>(0, p - prm.window_left);
      high = std::max<int64_t>(high, 0);
      lo[r] = std::min(low, high);
      hi[r] = high;
    }
  }
  const int64_t stride = d + 2;
  std::vector<float> parts(size_t(tokens * q_heads * prm.splits * stride));
  for (size_t i = 0; i < parts.size(); i += size_t(stride)) { parts[i] = kNegInf; parts[i + 1] = 0; }
  std::vector<Item> items;
  for (int64_t i = 0; i < seqs; ++i)
    for (int64_t r0 = row_begin[i]; r0 < row_end[i]; r0 += rows_per_task) {
      const int64_t nrows = std::min(rows_per_task, row_end[i] - r0);
      int64_t low = hi[r0], high = 0;  // the union of the rows' ranges
      for (int64_t r = r0; r < r0 + nrows; ++r)
        if (lo[r] < hi[r]) { low = std::min(low, lo[r]); high = std::max(high, hi[r]); }
      if (low >= high) continue;
      for (int64_t g0 = 0; g0 < kv_heads; g0 += prm.heads_per_task)
        for (int64_t s = 0; s < prm.splits; ++s) {
          int64_t a, e;
          split_range(low, high, prm.splits, prm.block, s, &a, &e);
          if (a < e) items.push_back({i, r0, nrows, g0, std::min(kv_heads, g0 + prm.heads_per_task), a, e, s});
        }
    }
  parallel_for(int64_t(items.size()), prm.threads, [&](int64_t n, Scratch& scratch) {
    const Item& it = items[size_t(n)];
    PagedRows rows{pages, table + it.seq * pages_per_seq, num_pages, page_size,
                   2 * kv_heads * d * elem, d * elem};
    run_item<K>(rows, it.g0, it.g1, group, it.nrows, &lo[it.row0], &hi[it.row0], it.a, it.b, d,
                prm, [&](int64_t r, int64_t h) { return q + ((it.row0 + r) * q_heads + h) * d; },
                [&](int64_t r, int64_t h) {
                  return parts.data() + (((it.row0 + r) * q_heads + h) * prm.splits + it.split) * stride;
                },
                scratch);
  });
  for (int64_t i = 0; i < seqs; ++i)
    for (int64_t r = row_begin[i]; r < row_end[i]; ++r)
      for (int64_t h = 0; h < q_heads; ++h)
        finish(parts.data() + (r * q_heads + h) * prm.splits * stride, prm.splits, d,
               prm.has_sinks, prm.has_sinks ? sinks[h] : 0.0f, out + (r * q_heads + h) * d);
}

ffi::Error paged_impl(ffi::Buffer<ffi::F32> queries, ffi::AnyBuffer kv_pages,
                      ffi::Buffer<ffi::S32> context_lens, ffi::Buffer<ffi::S32> page_table,
                      ffi::Buffer<ffi::S32> query_start_loc, ffi::Buffer<ffi::S32> num_seqs,
                      ffi::Buffer<ffi::F32> sinks, ffi::ResultBuffer<ffi::F32> out, float scale,
                      int64_t window_left, float soft_cap, int64_t has_sinks, int64_t block,
                      int64_t heads_per_task, int64_t threads, int64_t splits, int64_t prefetch,
                      int64_t bf16_dot, int64_t rows_per_task) {
  auto qd = queries.dimensions();
  auto pd = kv_pages.dimensions();
  auto td = page_table.dimensions();
  if (qd.size() != 3 || pd.size() != 4 || td.size() != 2)
    return ffi::Error::InvalidArgument("paged: bad ranks");
  const int64_t tokens = qd[0], q_heads = qd[1], d = qd[2];
  const int64_t num_pages = pd[0], page_size = pd[1], kv_heads = pd[2] / 2;
  const int64_t max_seqs = td[0], pages_per_seq = td[1];
  if (pd[3] != d || pd[2] % 2 != 0 || kv_heads <= 0 || q_heads % kv_heads != 0 ||
      num_pages <= 0 || page_size <= 0 || context_lens.element_count() != size_t(max_seqs) ||
      query_start_loc.element_count() != size_t(max_seqs + 1) || num_seqs.element_count() != 1 ||
      (has_sinks && sinks.element_count() != size_t(q_heads)))
    return ffi::Error::InvalidArgument("paged: inconsistent shapes");
  Kind kind;
  if (!kind_of(kv_pages.element_type(), &kind))
    return ffi::Error::InvalidArgument("paged: the cache must be float32, bfloat16 or float16");
  const Params prm = read_params(scale, window_left, soft_cap, has_sinks, block, heads_per_task,
                                 threads, splits, prefetch, bf16_dot);
  const char* pages = static_cast<const char*>(kv_pages.untyped_data());
#define ATTNBENCH_PAGED(KIND)                                                                 \
  paged_run<KIND>(queries.typed_data(), pages, context_lens.typed_data(),                    \
                  page_table.typed_data(), query_start_loc.typed_data(),                     \
                  num_seqs.typed_data()[0], sinks.typed_data(), out->typed_data(), tokens,   \
                  q_heads, kv_heads, d, num_pages, page_size, max_seqs, pages_per_seq,        \
                  std::max<int64_t>(rows_per_task, 1), prm)
  if (kind == Kind::kF32) ATTNBENCH_PAGED(Kind::kF32);
  else if (kind == Kind::kBF16) ATTNBENCH_PAGED(Kind::kBF16);
  else ATTNBENCH_PAGED(Kind::kF16);
#undef ATTNBENCH_PAGED
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    attnbench_decode, decode_impl,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::AnyBuffer>()
        .Arg<ffi::AnyBuffer>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Attr<float>("scale")
        .Attr<int64_t>("window_left")
        .Attr<float>("soft_cap")
        .Attr<int64_t>("has_sinks")
        .Attr<int64_t>("block")
        .Attr<int64_t>("heads_per_task")
        .Attr<int64_t>("threads")
        .Attr<int64_t>("splits")
        .Attr<int64_t>("prefetch")
        .Attr<int64_t>("bf16_dot"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    attnbench_paged, paged_impl,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::AnyBuffer>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Attr<float>("scale")
        .Attr<int64_t>("window_left")
        .Attr<float>("soft_cap")
        .Attr<int64_t>("has_sinks")
        .Attr<int64_t>("block")
        .Attr<int64_t>("heads_per_task")
        .Attr<int64_t>("threads")
        .Attr<int64_t>("splits")
        .Attr<int64_t>("prefetch")
        .Attr<int64_t>("bf16_dot")
        .Attr<int64_t>("rows_per_task"));
