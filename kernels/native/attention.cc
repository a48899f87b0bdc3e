// Decode and ragged paged attention for CPUs, called from JAX through the XLA FFI.
//
// Both handlers share one engine: a work item is (sequence, query rows, a few KV heads, a
// range of key positions). It streams each key and value row of its range once, in the cache
// dtype, for every query head that reads that KV head, keeps a float32 online softmax per
// query vector, and files its partial (max, sum, weighted values) in a slot of its own. The
// items are taken by a few threads from one atomic counter; the partials of a query vector
// are merged (with its sink) after all items are done. Where the CPU has AVX-512 and the
// head size is a multiple of 16, an item walks each block one KV head at a time (the block's
// scores and that head's accumulators stay in L1) and widens rows to float32 in registers as
// it reads them; elsewhere a portable engine does the same work. Only positions inside a
// row's valid range are ever read, so whatever a cache holds elsewhere cannot reach an output, and every
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

#if defined(__AVX512F__)
// The four horizontal sums of a0..a3 -> out[0..3], in a shuffle tree shared by all four.
inline void reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3, float* out) {
  const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  __m512 sum = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, 0x44), _mm512_shuffle_ps(s01, s23, 0xEE));
  // Each 128-bit lane now holds partial sums [a0, a1, a2, a3]; add the four lanes.
  sum = _mm512_add_ps(sum, _mm512_shuffle_f32x4(sum, sum, 0x4E));
  sum = _mm512_add_ps(sum, _mm512_shuffle_f32x4(sum, sum, 0xB1));
  _mm_storeu_ps(out, _mm512_castps512_ps128(sum));
}
#endif

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

// Four queries (rows q, q + d, ...) against one key, bfloat16 products, d % 32 == 0.
inline void dot4_bf16(const uint16_t* q, const uint16_t* k, int64_t d, float* out) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < d; i += 32) {
    const __m512bh key = (__m512bh)_mm512_loadu_si512(k + i);
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(q + i), key);
    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(q + d + i), key);
    a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(q + 2 * d + i), key);
    a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(q + 3 * d + i), key);
  }
  reduce4(a0, a1, a2, a3, out);
}
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
  const char* kb(int64_t j) const { return key + j * row_stride; }
  const char* vb(int64_t j) const { return value + j * row_stride; }
  int64_t ko(int64_t g) const { return g * head_bytes; }
  int64_t vo(int64_t g) const { return g * head_bytes; }
  const char* k(int64_t j, int64_t g) const { return kb(j) + ko(g); }
  const char* v(int64_t j, int64_t g) const { return vb(j) + vo(g); }
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
  // A position's keys and values of every head share one page row: look it up once.
  const char* kb(int64_t j) const { return base(j); }
  const char* vb(int64_t j) const { return base(j); }
  int64_t ko(int64_t g) const { return 2 * g * head_bytes; }
  int64_t vo(int64_t g) const { return (2 * g + 1) * head_bytes; }
  const char* k(int64_t j, int64_t g) const { return base(j) + ko(g); }
  const char* v(int64_t j, int64_t g) const { return base(j) + vo(g); }
};

struct Scratch {
  std::vector<float> scores, key, value, query;
  std::vector<const char*> key_rows, value_rows, head_rows;
  std::vector<uint16_t> query_bf16;
  std::vector<float> m, l, acc;
};

// The largest of z[0..n) with NaN winning over everything (a NaN logit must reach the output).
inline float block_max(const float* z, int64_t n) {
  int64_t t = 0;
  float result = kNegInf;
  bool nan = false;
#if defined(__AVX512F__)
  __m512 m = _mm512_set1_ps(kNegInf);
  __mmask16 unordered = 0;
  for (; t + 16 <= n; t += 16) {
    const __m512 x = _mm512_loadu_ps(z + t);
    unordered |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, x);
  }
  result = _mm512_reduce_max_ps(m);
  nan = unordered != 0;
#endif
  for (; t < n; ++t) {
    nan |= z[t] != z[t];
    result = z[t] > result ? z[t] : result;
  }
  return nan ? kNaN : result;
}

#if defined(__AVX512F__)
inline __m512 exp_approx(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  // max/min return their second operand when the first is NaN, so NaN would become a bound;
  // the blend below puts it back.
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif

// z[t] = exp(z[t] - m) for t in [0, n); returns their sum. NaN in z stays NaN.
inline float exp_and_sum(float* z, int64_t n, float m) {
  int64_t t = 0;
  float sum = 0.0f;
#if defined(__AVX512F__)
  const __m512 shift = _mm512_set1_ps(m);
  __m512 total = _mm512_setzero_ps();
  for (; t + 16 <= n; t += 16) {
    const __m512 x = _mm512_sub_ps(_mm512_loadu_ps(z + t), shift);
    const __mmask16 unordered = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    __m512 e = exp_approx(x);
    e = _mm512_mask_blend_ps(unordered, e, x);
    _mm512_storeu_ps(z + t, e);
    total = _mm512_add_ps(total, e);
  }
  sum = _mm512_reduce_add_ps(total);
#endif
  for (; t < n; ++t) {
    z[t] = exp_approx(z[t] - m);
    sum += z[t];
  }
  return sum;
}

// acc[e][0..d) += sum over t of w[e * w_stride + t] * v[t * d ..] for `count` query vectors
// e that see the same key range (the heads of one row), t in [t0, t1).
template <int kCount>
inline void weighted_sum_fixed(const float* w, int64_t w_stride, const float* v, int64_t d,
                               int64_t t0, int64_t t1, float* acc, int64_t acc_stride) {
#if defined(__AVX512F__)
  int64_t c = 0;
  for (; c + 64 <= d; c += 64) {
    __m512 a[kCount][4];
    for (int e = 0; e < kCount; ++e)
      for (int u = 0; u < 4; ++u) a[e][u] = _mm512_loadu_ps(acc + e * acc_stride + c + 16 * u);
    for (int64_t t = t0; t < t1; ++t) {
      const float* row = v + t * d + c;
      const __m512 x0 = _mm512_loadu_ps(row), x1 = _mm512_loadu_ps(row + 16);
      const __m512 x2 = _mm512_loadu_ps(row + 32), x3 = _mm512_loadu_ps(row + 48);
      for (int e = 0; e < kCount; ++e) {
        const __m512 weight = _mm512_set1_ps(w[e * w_stride + t]);
        a[e][0] = _mm512_fmadd_ps(weight, x0, a[e][0]);
        a[e][1] = _mm512_fmadd_ps(weight, x1, a[e][1]);
        a[e][2] = _mm512_fmadd_ps(weight, x2, a[e][2]);
        a[e][3] = _mm512_fmadd_ps(weight, x3, a[e][3]);
      }
    }
    for (int e = 0; e < kCount; ++e)
      for (int u = 0; u < 4; ++u) _mm512_storeu_ps(acc + e * acc_stride + c + 16 * u, a[e][u]);
  }
  if (c == d) return;
  v += c;
  acc += c;
  const int64_t rest = d - c;
#else
  const int64_t rest = d;
#endif
  for (int64_t t = t0; t < t1; ++t)
    for (int e = 0; e < kCount; ++e) {
      const float weight = w[e * w_stride + t];
      float* out = acc + e * acc_stride;
      const float* row = v + t * d;
      for (int64_t i = 0; i < rest; ++i) out[i] += weight * row[i];
    }
}

inline void weighted_sum(const float* w, int64_t w_stride, const float* v, int64_t d,
                         int64_t t0, int64_t t1, float* acc, int64_t acc_stride, int64_t count) {
  int64_t e = 0;
  for (; e + 4 <= count; e += 4)
    weighted_sum_fixed<4>(w + e * w_stride, w_stride, v, d, t0, t1, acc + e * acc_stride, acc_stride);
  switch (count - e) {
    case 3: weighted_sum_fixed<3>(w + e * w_stride, w_stride, v, d, t0, t1, acc + e * acc_stride, acc_stride); break;
    case 2: weighted_sum_fixed<2>(w + e * w_stride, w_stride, v, d, t0, t1, acc + e * acc_stride, acc_stride); break;
    case 1: weighted_sum_fixed<1>(w + e * w_stride, w_stride, v, d, t0, t1, acc + e * acc_stride, acc_stride); break;
    default: break;
  }
}

#if defined(__AVX512F__)
// Sixteen elements of a cache row from element i, in float32 (bfloat16 widens by a shift).
template <Kind K>
inline __m512 load16(const char* row, int64_t i) {
  if constexpr (K == Kind::kF32) {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + i);
  } else {
    const __m256i bits = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(reinterpret_cast<const uint16_t*>(row) + i));
    if constexpr (K == Kind::kBF16)
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    else
      return _mm512_cvtph_ps(bits);
  }
}

// Scores of kCount (1..4) query vectors (rows of q, d apart, scale folded in) against one
// key row, d % 16 == 0 -> out[0..kCount). Float32 products: on CPUs whose bfloat16 dot
// instruction does half an FMA's work per cycle, widening the key is the faster way.
template <Kind K, int kCount>
inline void score_row(const float* q, const char* key, int64_t d, float* out) {
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                 _mm512_setzero_ps()};
  for (int64_t i = 0; i < d; i += 16) {
    const __m512 k = load16<K>(key, i);
    for (int e = 0; e < kCount; ++e)
      a[e] = _mm512_fmadd_ps(_mm512_loadu_ps(q + e * d + i), k, a[e]);
  }
  float sums[4];
  reduce4(a[0], a[1], a[2], a[3], sums);
  for (int e = 0; e < kCount; ++e) out[e] = sums[e];
}

// acc[e][c, c + 16 kVecs) += sum over t in [t0, t1) of w[e * w_stride + t] * row_t[c, ...)
// for kCount query vectors; the value rows are widened as they are read.
template <Kind K, int kCount, int kVecs>
inline void weigh_columns(const float* w, int64_t w_stride, const char* const* rows, int64_t c,
                          int64_t t0, int64_t t1, float* acc, int64_t acc_stride) {
  __m512 a[kCount][kVecs];
  for (int e = 0; e < kCount; ++e)
    for (int u = 0; u < kVecs; ++u) a[e][u] = _mm512_loadu_ps(acc + e * acc_stride + c + 16 * u);
  for (int64_t t = t0; t < t1; ++t) {
    __m512 x[kVecs];
    for (int u = 0; u < kVecs; ++u) x[u] = load16<K>(rows[t], c + 16 * u);
    for (int e = 0; e < kCount; ++e) {
      const __m512 weight = _mm512_set1_ps(w[e * w_stride + t]);
      for (int u = 0; u < kVecs; ++u) a[e][u] = _mm512_fmadd_ps(weight, x[u], a[e][u]);
    }
  }
  for (int e = 0; e < kCount; ++e)
    for (int u = 0; u < kVecs; ++u) _mm512_storeu_ps(acc + e * acc_stride + c + 16 * u, a[e][u]);
}

template <Kind K, int kCount>
inline void weigh_rows(const float* w, int64_t w_stride, const char* const* rows, int64_t d,
                       int64_t t0, int64_t t1, float* acc, int64_t acc_stride) {
  int64_t c = 0;
  for (; c + 64 <= d; c += 64)
    weigh_columns<K, kCount, 4>(w, w_stride, rows, c, t0, t1, acc, acc_stride);
  switch ((d - c) / 16) {
    case 3: weigh_columns<K, kCount, 3>(w, w_stride, rows, c, t0, t1, acc, acc_stride); break;
    case 2: weigh_columns<K, kCount, 2>(w, w_stride, rows, c, t0, t1, acc, acc_stride); break;
    case 1: weigh_columns<K, kCount, 1>(w, w_stride, rows, c, t0, t1, acc, acc_stride); break;
    default: break;
  }
}

// weigh_rows for any number of query vectors, four at a time.
template <Kind K>
inline void weigh(const float* w, int64_t w_stride, const char* const* rows, int64_t d,
                  int64_t t0, int64_t t1, float* acc, int64_t acc_stride, int64_t count) {
  int64_t e = 0;
  for (; e + 4 <= count; e += 4)
    weigh_rows<K, 4>(w + e * w_stride, w_stride, rows, d, t0, t1, acc + e * acc_stride, acc_stride);
  switch (count - e) {
    case 3: weigh_rows<K, 3>(w + e * w_stride, w_stride, rows, d, t0, t1, acc + e * acc_stride, acc_stride); break;
    case 2: weigh_rows<K, 2>(w + e * w_stride, w_stride, rows, d, t0, t1, acc + e * acc_stride, acc_stride); break;
    case 1: weigh_rows<K, 1>(w + e * w_stride, w_stride, rows, d, t0, t1, acc + e * acc_stride, acc_stride); break;
    default: break;
  }
}

// Scores of `count` query vectors against one key row, four at a time.
template <Kind K>
inline void score(const float* q, const char* key, int64_t d, int64_t count, float* scores,
                  int64_t block) {
  float z[4];
  int64_t e = 0;
  for (; e + 4 <= count; e += 4) {
    score_row<K, 4>(q + e * d, key, d, z);
    for (int u = 0; u < 4; ++u) scores[(e + u) * block] = z[u];
  }
  const int64_t rest = count - e;
  if (rest == 3) score_row<K, 3>(q + e * d, key, d, z);
  else if (rest == 2) score_row<K, 2>(q + e * d, key, d, z);
  else if (rest == 1) score_row<K, 1>(q + e * d, key, d, z);
  for (int64_t u = 0; u < rest; ++u) scores[(e + u) * block] = z[u];
}
// score<> with bfloat16 products (float32 sums) against a bfloat16 key row, d % 32 == 0.
inline void score_bf16(const uint16_t* q, const uint16_t* key, int64_t d, int64_t count,
                       float scale, float* scores, int64_t block) {
  int64_t e = 0;
#if defined(__AVX512BF16__)
  for (; e + 4 <= count; e += 4) {
    float z[4];
    dot4_bf16(q + e * d, key, d, z);
    for (int u = 0; u < 4; ++u) scores[(e + u) * block] = z[u] * scale;
  }
#endif
  for (; e < count; ++e) scores[e * block] = dot_bf16(q + e * d, key, d) * scale;
}
#endif

// One work item, on any CPU and head size: query vectors (rows x G heads for each KV head
// in [g0, g1)) against the positions [a, b). The vectors of row r read positions [lo[r], hi[r]) only; q_at(r, h)
// gives the float32 query of row r, head h; slot_at(r, h) its partial's storage.
template <Kind K, class Rows, class QueryAt, class SlotAt>
void run_item(const Rows& rows, int64_t g0, int64_t g1, int64_t group, int64_t nrows,
              const int64_t* lo, const int64_t* hi, int64_t a, int64_t b, int64_t d,
              const Params& prm, QueryAt q_at, SlotAt slot_at, Scratch& s) {
  const int64_t nq = nrows * group;  // query vectors per KV head
  const int64_t heads = g1 - g0;
  const int64_t block = prm.block;
  s.scores.resize(size_t(heads * nq * block));
  s.key.resize(size_t(d));
  s.value.resize(size_t(heads * block * d));
  s.query.resize(size_t(heads * nq * d));
  s.m.assign(size_t(heads * nq), kNegInf);
  s.l.assign(size_t(heads * nq), 0.0f);
  s.acc.assign(size_t(heads * nq * d), 0.0f);
  for (int64_t hg = 0; hg < heads; ++hg)
    for (int64_t r = 0; r < nrows; ++r)
      for (int64_t e = 0; e < group; ++e) {
        const int64_t at = (hg * nq) + r * group + e;
        std::memcpy(s.query.data() + at * d, q_at(r, (g0 + hg) * group + e), size_t(d) * 4);
      }
  const float cap = prm.soft_cap;
  const int64_t row_bytes = d * (K == Kind::kF32 ? 4 : 2);
  // Positions are walked in order with all of the item's heads at each, so an item with
  // several heads streams the cache layout (position-major) instead of striding through it.
  auto prefetch = [&](int64_t j) {
    const char* kbase = rows.kb(j);
    const char* vbase = rows.vb(j);
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t off = 0; off < row_bytes; off += 64) {
        __builtin_prefetch(kbase + rows.ko(g) + off);
        __builtin_prefetch(vbase + rows.vo(g) + off);
      }
  };
  for (int64_t start = a; start < b; start += block) {
    const int64_t n = std::min(block, b - start);
    // Scores [head][query vector][position], each key row read once.
    for (int64_t t = 0; t < n; ++t) {
      const int64_t j = start + t;
      if (prm.prefetch > 0 && j + prm.prefetch < b) prefetch(j + prm.prefetch);
      const char* kbase = rows.kb(j);
      for (int64_t hg = 0; hg < heads; ++hg) {
        const int64_t g = g0 + hg;
        const char* krow = kbase + rows.ko(g);
        const float* kf = reinterpret_cast<const float*>(krow);
        bool loaded = K == Kind::kF32;
        float* scores = s.scores.data() + hg * nq * block;
        const float* query = s.query.data() + hg * nq * d;
        for (int64_t r = 0; r < nrows; ++r) {
          if (j < lo[r] || j >= hi[r]) continue;
          if (!loaded) {
            load_row<K>(krow, s.key.data(), d);
            kf = s.key.data();
            loaded = true;
          }
          for (int64_t e = 0; e < group; ++e) {
            const int64_t qi = r * group + e;
            scores[qi * block + t] = dot_f32(query + qi * d, kf, d) * prm.scale;
          }
        }
      }
    }
    // Values [head][position][D] in float32 (the cache's own rows when they are float32
    // and lie back to back).
    const float* values[64];
    bool direct = K == Kind::kF32;
    for (int64_t hg = 0; hg < heads && direct; ++hg)
      direct = n == 1 || rows.v(start + n - 1, g0 + hg) == rows.v(start, g0 + hg) + (n - 1) * row_bytes;
    for (int64_t hg = 0; hg < heads; ++hg)
      values[hg] = direct ? reinterpret_cast<const float*>(rows.v(start, g0 + hg))
                          : s.value.data() + hg * block * d;
    if (!direct)
      for (int64_t t = 0; t < n; ++t) {
        const char* vbase = rows.vb(start + t);
        for (int64_t hg = 0; hg < heads; ++hg)
          load_row<K>(vbase + rows.vo(g0 + hg), s.value.data() + (hg * block + t) * d, d);
      }
    for (int64_t hg = 0; hg < heads; ++hg) {
      float* scores = s.scores.data() + hg * nq * block;
      float* m = s.m.data() + hg * nq;
      float* l = s.l.data() + hg * nq;
      float* acc = s.acc.data() + hg * nq * d;
      // Online softmax of each vector over its positions of the block, then its values.
      for (int64_t r = 0; r < nrows; ++r) {
        const int64_t t0 = std::max(start, lo[r]) - start, t1 = std::min(start + n, hi[r]) - start;
        if (t0 >= t1) continue;
        for (int64_t e = 0; e < group; ++e) {
          const int64_t qi = r * group + e;
          float* z = scores + qi * block;
          if (cap > 0)
            for (int64_t t = t0; t < t1; ++t) z[t] = cap * std::tanh(z[t] / cap);
          const float m_new = nan_max(m[qi], block_max(z + t0, t1 - t0));
          if (m_new == kNegInf) {  // every logit so far is -inf: nothing to add yet
            std::fill(z + t0, z + t1, 0.0f);
            continue;
          }
          const float alpha = m[qi] == kNegInf ? 0.0f : std::exp(m[qi] - m_new);
          l[qi] = l[qi] * alpha + exp_and_sum(z + t0, t1 - t0, m_new);
          m[qi] = m_new;
          if (alpha != 1.0f) {
            float* ac = acc + qi * d;
            for (int64_t i = 0; i < d; ++i) ac[i] *= alpha;
          }
        }
        weighted_sum(scores + r * group * block, block, values[hg], d, t0, t1,
                     acc + r * group * d, d, group);
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

#if defined(__AVX512F__)
// run_item for d % 16 == 0 on AVX-512: one KV head at a time through each block, so the
// block's scores and the head's accumulators stay in L1, keys and values widened to
// float32 as they are read (no copy of the block), and each position's page looked up
// once per block instead of once per head.
template <Kind K, class Rows, class QueryAt, class SlotAt>
void run_item_wide(const Rows& rows, int64_t g0, int64_t g1, int64_t group, int64_t nrows,
                   const int64_t* lo, const int64_t* hi, int64_t a, int64_t b, int64_t d,
                   const Params& prm, QueryAt q_at, SlotAt slot_at, Scratch& s) {
  const int64_t nq = nrows * group;  // query vectors per KV head
  const int64_t heads = g1 - g0;
  const int64_t block = prm.block;
  s.scores.resize(size_t(nq * block));
  s.query.resize(size_t(heads * nq * d));
  s.key_rows.resize(size_t(block));
  s.value_rows.resize(size_t(block));
  s.head_rows.resize(size_t(block));
  s.m.assign(size_t(heads * nq), kNegInf);
  s.l.assign(size_t(heads * nq), 0.0f);
  s.acc.assign(size_t(heads * nq * d), 0.0f);
  // Many query vectors share each key and value row (prefill rows, wide GQA groups, MQA):
  // widen the block once instead of once per four of them.
  const bool widen_once = K != Kind::kF32 && nq > 8;
  if (widen_once) {
    s.key.resize(size_t(d));
    s.value.resize(size_t(block * d));
  }
  // bfloat16 products score the exact bfloat16 query and scale each score; float32 ones
  // fold the scale into the query (one multiply per query element, not per score).
  const bool bf16_dot = K == Kind::kBF16 && kHaveBf16Dot && prm.bf16_dot && d % 32 == 0;
  if (bf16_dot) s.query_bf16.resize(size_t(heads * nq * d));
  for (int64_t hg = 0; hg < heads; ++hg)
    for (int64_t r = 0; r < nrows; ++r)
      for (int64_t e = 0; e < group; ++e) {
        const float* src = q_at(r, (g0 + hg) * group + e);
        const int64_t at = ((hg * nq) + r * group + e) * d;
        float* dst = s.query.data() + at;
        for (int64_t i = 0; i < d; ++i) dst[i] = src[i] * prm.scale;
        if (bf16_dot)
          for (int64_t i = 0; i < d; ++i) {
            uint32_t bits;
            std::memcpy(&bits, src + i, 4);
            s.query_bf16[size_t(at + i)] = uint16_t(bits >> 16);  // exact: the query is bfloat16
          }
      }
  const float cap = prm.soft_cap;
  const int64_t row_bytes = d * (K == Kind::kF32 ? 4 : 2);
  for (int64_t start = a; start < b; start += block) {
    const int64_t n = std::min(block, b - start);
    for (int64_t t = 0; t < n; ++t) {
      s.key_rows[size_t(t)] = rows.kb(start + t);
      s.value_rows[size_t(t)] = rows.vb(start + t);
    }
    for (int64_t hg = 0; hg < heads; ++hg) {
      const int64_t g = g0 + hg;
      const float* query = s.query.data() + hg * nq * d;
      float* scores = s.scores.data();
      // Scores [query vector][position] of this head. Its rows are a strided stream the
      // hardware does not prefetch, hence the prefetch of a row `prefetch` positions on.
      // The rows of a prefill item score the union of their ranges; each row's softmax
      // below reads only its own positions.
      for (int64_t t = 0; t < n; ++t) {
        const int64_t j = start + t;
        if (prm.prefetch > 0 && j + prm.prefetch < b) {
          const char* kahead = rows.k(j + prm.prefetch, g);
          const char* vahead = rows.v(j + prm.prefetch, g);
          for (int64_t off = 0; off < row_bytes; off += 64) {
            __builtin_prefetch(kahead + off);
            __builtin_prefetch(vahead + off);
          }
        }
        const char* key = s.key_rows[size_t(t)] + rows.ko(g);
        if (bf16_dot) {
          score_bf16(s.query_bf16.data() + hg * nq * d, reinterpret_cast<const uint16_t*>(key), d,
                     nq, prm.scale, scores + t, block);
        } else if (widen_once) {
          for (int64_t i = 0; i < d; i += 16) _mm512_storeu_ps(s.key.data() + i, load16<K>(key, i));
          score<Kind::kF32>(query, reinterpret_cast<const char*>(s.key.data()), d, nq, scores + t,
                            block);
        } else {
          score<K>(query, key, d, nq, scores + t, block);
        }
      }
      // This head's value rows: the cache's own, or the block widened once for many rows.
      const char** values = s.head_rows.data();
      for (int64_t t = 0; t < n; ++t) {
        const char* row = s.value_rows[size_t(t)] + rows.vo(g);
        if (widen_once) {
          float* dst = s.value.data() + t * d;
          for (int64_t i = 0; i < d; i += 16) _mm512_storeu_ps(dst + i, load16<K>(row, i));
          row = reinterpret_cast<const char*>(dst);
        }
        values[t] = row;
      }
      float* m = s.m.data() + hg * nq;
      float* l = s.l.data() + hg * nq;
      float* acc = s.acc.data() + hg * nq * d;
      for (int64_t r = 0; r < nrows; ++r) {
        const int64_t t0 = std::max(start, lo[r]) - start, t1 = std::min(start + n, hi[r]) - start;
        if (t0 >= t1) continue;
        for (int64_t e = 0; e < group; ++e) {
          const int64_t qi = r * group + e;
          float* z = scores + qi * block;
          if (cap > 0)
            for (int64_t t = t0; t < t1; ++t) z[t] = cap * std::tanh(z[t] / cap);
          const float m_new = nan_max(m[qi], block_max(z + t0, t1 - t0));
          if (m_new == kNegInf) {
            std::fill(z + t0, z + t1, 0.0f);
            continue;
          }
          const float alpha = m[qi] == kNegInf ? 0.0f : std::exp(m[qi] - m_new);
          l[qi] = l[qi] * alpha + exp_and_sum(z + t0, t1 - t0, m_new);
          m[qi] = m_new;
          if (alpha != 1.0f) {
            float* ac = acc + qi * d;
            for (int64_t i = 0; i < d; ++i) ac[i] *= alpha;
          }
        }
        if (widen_once)
          weigh<Kind::kF32>(scores + r * group * block, block, values, d, t0, t1,
                            acc + r * group * d, d, group);
        else
          weigh<K>(scores + r * group * block, block, values, d, t0, t1, acc + r * group * d,
                   d, group);
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
#endif

// The engine for this item: the AVX-512 one where the head size allows, else the portable one.
template <Kind K, class Rows, class QueryAt, class SlotAt>
void run_item_on_cpu(const Rows& rows, int64_t g0, int64_t g1, int64_t group, int64_t nrows,
                     const int64_t* lo, const int64_t* hi, int64_t a, int64_t b, int64_t d,
                     const Params& prm, QueryAt q_at, SlotAt slot_at, Scratch& s) {
#if defined(__AVX512F__)
  if (d % 16 == 0) {
    run_item_wide<K>(rows, g0, g1, group, nrows, lo, hi, a, b, d, prm, q_at, slot_at, s);
    return;
  }
#endif
  run_item<K>(rows, g0, g1, group, nrows, lo, hi, a, b, d, prm, q_at, slot_at, s);
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
           std::clamp<int64_t>(heads_per_task, 1, 64), threads, std::max<int64_t>(splits, 1),
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
    run_item_on_cpu<K>(rows, it.g0, it.g1, group, 1, &lo[it.seq], &hi[it.seq], it.a, it.b, d, prm,
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
    run_item_on_cpu<K>(rows, it.g0, it.g1, group, it.nrows, &lo[it.row0], &hi[it.row0], it.a, it.b, d,
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
