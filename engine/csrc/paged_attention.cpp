// Paged attention for CPU, one query row at a time: each row attends over its sequence's K/V
// blocks straight from the pool (no gather copy), grouped-query aware.
//
//   out[s, h, :] = softmax(scale * q[s, h] . K_s^T) V_s   over the first context_lens[s]
//   tokens of row s's sequence, whose token t lives in block block_tables[r, t / bs], row
//   t % bs, with r = row_tables[s] (or r = s without row_tables: one decode token per
//   sequence). With row_tables the rows of a prefill chunk share their sequence's table and
//   each attends causally (context_lens = its position + 1).
//
// Work is split over (sequence, KV head); the query heads sharing a KV head are computed
// together so each K/V row is read once. Scores, softmax and accumulation are float32
// (online softmax over spans of up to 256 tokens of whole blocks: scores of a span first,
// one softmax step, then its values); the output is written in the cache's dtype. Prompt
// chunks in bf16 with AVX512_BF16 go in tiles of up to 16 rows per KV head instead
// (attend_tile: each K/V chunk rearranged once for all of the tile's rows, products with
// VDPBF16PS, probabilities rounded to bf16 for P x V).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#ifndef CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY_AVX512
#endif
#endif
#include <ATen/cpu/vec/vec.h>

namespace {

// Block kernels: scores of one block for the query heads of one KV head, and the weighted sum
// of its values into their accumulators (see scores_block / accumulate_block below).
template <typename T>
using ScoresFn = void (*)(const float*, const T*, const T*, int64_t, int64_t, int64_t, float,
                          float*);
template <typename T>
using AccumulateFn = void (*)(const T*, int64_t, int64_t, int64_t, const float*, const float*,
                              float*);

#if defined(__AVX512F__)
// 16 floats from 16 elements of the cache's dtype.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

// row[0:dim] = float(src[0:dim])
template <typename T>
inline void to_float(const T* src, float* row, int64_t dim) {
  int64_t d = 0;
#if defined(__AVX512F__)
  for (; d + 16 <= dim; d += 16) _mm512_storeu_ps(row + d, load16(src + d));
#endif
  for (; d < dim; ++d) row[d] = static_cast<float>(src[d]);
}

inline float dot(const float* a, const float* b, int64_t dim) {
  int64_t d = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; d + 16 <= dim; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; d < dim; ++d) sum += a[d] * b[d];
  return sum;
}

// acc[0:dim] += p * row[0:dim]
inline void axpy(float p, const float* row, float* acc, int64_t dim) {
  int64_t d = 0;
#if defined(__AVX512F__)
  const __m512 pv = _mm512_set1_ps(p);
  for (; d + 16 <= dim; d += 16)
    _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(pv, _mm512_loadu_ps(row + d), _mm512_loadu_ps(acc + d)));
#endif
  for (; d < dim; ++d) acc[d] += p * row[d];
}

#if defined(__AVX512F__)
// One block of one KV head with the head dim (CH x 16) and the query heads per KV head (G)
// known at compile time, so queries and accumulators stay in registers.
//   p[j * p_stride + t] = scale * q_j . k_t                      (scores_block)
//   acc_j = acc_j * correction_j + sum_t p[j * p_stride + t] v_t  (accumulate_block)
// The four horizontal sums of a0..a3, as one 128-bit vector [sum a0, sum a1, sum a2, sum a3]
// (a transpose-and-add: ~13 instructions instead of four separate reductions).
inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512 u = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))));
  const __m512 v = _mm512_add_ps(u, _mm512_shuffle_f32x4(u, u, 0x4E));  // swap 256-bit halves
  const __m512 w = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1));  // swap 128-bit lanes
  return _mm512_castps512_ps128(w);
}

template <int CH, int G, typename T>
inline void scores_block(const float* qf, const T* /*q*/, const T* kb, int64_t token_stride, int64_t nt,
                         int64_t p_stride, float scale, float* p) {
  __m512 qr[G][CH];
  for (int j = 0; j < G; ++j)
    for (int c = 0; c < CH; ++c) qr[j][c] = _mm512_loadu_ps(qf + j * CH * 16 + c * 16);
  const __m128 vscale = _mm_set1_ps(scale);
  int64_t t = 0;
  for (; t + 4 <= nt; t += 4) {  // four tokens at a time: independent chains, shared reductions
    __m512 acc[G][4];
    for (int r = 0; r < 4; ++r) {
      const T* kr = kb + (t + r) * token_stride;
      __m512 kv[CH];
      for (int c = 0; c < CH; ++c) kv[c] = load16(kr + c * 16);
      for (int j = 0; j < G; ++j) {
        __m512 a = _mm512_mul_ps(qr[j][0], kv[0]);
        for (int c = 1; c < CH; ++c) a = _mm512_fmadd_ps(qr[j][c], kv[c], a);
        acc[j][r] = a;
      }
    }
    for (int j = 0; j < G; ++j)
      _mm_storeu_ps(p + j * p_stride + t, _mm_mul_ps(reduce4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]), vscale));
  }
  for (; t < nt; ++t) {
    const T* kr = kb + t * token_stride;
    __m512 kv[CH];
    for (int c = 0; c < CH; ++c) kv[c] = load16(kr + c * 16);
    for (int j = 0; j < G; ++j) {
      __m512 a = _mm512_mul_ps(qr[j][0], kv[0]);
      for (int c = 1; c < CH; ++c) a = _mm512_fmadd_ps(qr[j][c], kv[c], a);
      p[j * p_stride + t] = _mm512_reduce_add_ps(a) * scale;
    }
  }
}

template <int CH, int G, typename T>
inline void accumulate_block(const T* vb, int64_t token_stride, int64_t nt, int64_t p_stride,
                             const float* p, const float* correction, float* acc) {
  __m512 ar[G][CH];
  for (int j = 0; j < G; ++j) {
    const __m512 corr = _mm512_set1_ps(correction[j]);
    for (int c = 0; c < CH; ++c) ar[j][c] = _mm512_mul_ps(corr, _mm512_loadu_ps(acc + j * CH * 16 + c * 16));
  }
  for (int64_t t = 0; t < nt; ++t) {
    const T* vr = vb + t * token_stride;
    __m512 vv[CH];
    for (int c = 0; c < CH; ++c) vv[c] = load16(vr + c * 16);
    for (int j = 0; j < G; ++j) {
      const __m512 pt = _mm512_set1_ps(p[j * p_stride + t]);
      for (int c = 0; c < CH; ++c) ar[j][c] = _mm512_fmadd_ps(pt, vv[c], ar[j][c]);
    }
  }
  for (int j = 0; j < G; ++j)
    for (int c = 0; c < CH; ++c) _mm512_storeu_ps(acc + j * CH * 16 + c * 16, ar[j][c]);
}

// Online-softmax step for one block of scores, in place (p becomes exp(p - new max)); updates
// the running max m and sum l and returns the factor that rescales earlier accumulations.
inline float softmax_block(float* p, int64_t nt, float& m, float& l) {
  using Vec = at::vec::Vectorized<float>;
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < nt; t += 16) {
    const __mmask16 k = nt - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (nt - t)) - 1);
    mx = _mm512_mask_max_ps(mx, k, mx, _mm512_maskz_loadu_ps(k, p + t));
  }
  const float new_max = std::max(m, _mm512_reduce_max_ps(mx));
  const float correction = std::exp(m - new_max);
  const Vec vmax(new_max);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < nt; t += 16) {
    const __mmask16 k = nt - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (nt - t)) - 1);
    const __m512 e = (Vec(_mm512_maskz_loadu_ps(k, p + t)) - vmax).exp_u20();
    _mm512_mask_storeu_ps(p + t, k, e);
    sum = _mm512_mask_add_ps(sum, k, sum, e);
  }
  l = l * correction + _mm512_reduce_add_ps(sum);
  m = new_max;
  return correction;
}


#if defined(__AVX512BF16__)
// scores_block for bf16 caches with AVX512_BF16: q . k from the bf16 query and key rows with
// VDPBF16PS (products exact in float32, float32 sums, as with the converted rows, in another
// order), without converting each key row to float32 first. Z = head dim / 32.
template <int Z, int G>
inline void scores_block_bf16(const float* /*qf*/, const c10::BFloat16* q,
                              const c10::BFloat16* kb, int64_t token_stride, int64_t nt,
                              int64_t p_stride, float scale, float* p) {
  __m512bh qr[G][Z];
  for (int j = 0; j < G; ++j)
    for (int z = 0; z < Z; ++z) qr[j][z] = (__m512bh)_mm512_loadu_si512(q + j * Z * 32 + z * 32);
  const __m128 vscale = _mm_set1_ps(scale);
  int64_t t = 0;
  for (; t + 4 <= nt; t += 4) {
    __m512 acc[G][4];
    for (int r = 0; r < 4; ++r) {
      const c10::BFloat16* kr = kb + (t + r) * token_stride;
      __m512bh kv[Z];
      for (int z = 0; z < Z; ++z) kv[z] = (__m512bh)_mm512_loadu_si512(kr + z * 32);
      for (int j = 0; j < G; ++j) {
        __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), qr[j][0], kv[0]);
        for (int z = 1; z < Z; ++z) a = _mm512_dpbf16_ps(a, qr[j][z], kv[z]);
        acc[j][r] = a;
      }
    }
    for (int j = 0; j < G; ++j)
      _mm_storeu_ps(p + j * p_stride + t, _mm_mul_ps(reduce4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]), vscale));
  }
  for (; t < nt; ++t) {
    const c10::BFloat16* kr = kb + t * token_stride;
    __m512bh kv[Z];
    for (int z = 0; z < Z; ++z) kv[z] = (__m512bh)_mm512_loadu_si512(kr + z * 32);
    for (int j = 0; j < G; ++j) {
      __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), qr[j][0], kv[0]);
      for (int z = 1; z < Z; ++z) a = _mm512_dpbf16_ps(a, qr[j][z], kv[z]);
      p[j * p_stride + t] = _mm512_reduce_add_ps(a) * scale;
    }
  }
}
#endif

template <int CH, int G, typename T>
ScoresFn<T> pick_scores() {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) return scores_block_bf16<CH / 2, G>;
#endif
  return scores_block<CH, G, T>;
}

template <int CH, typename T>
bool pick_group(int64_t group, ScoresFn<T>& scores, AccumulateFn<T>& accumulate) {
  switch (group) {
#define E3RL_GROUP(G) case G: scores = pick_scores<CH, G, T>(); accumulate = accumulate_block<CH, G, T>; return true;
    E3RL_GROUP(1) E3RL_GROUP(2) E3RL_GROUP(3) E3RL_GROUP(4) E3RL_GROUP(5) E3RL_GROUP(6)
    E3RL_GROUP(7) E3RL_GROUP(8)
#undef E3RL_GROUP
    default: return false;
  }
}

// Register-resident kernels for head dims 64 and 128 and up to 8 query heads per KV head.
template <typename T>
bool pick_block_kernels(int64_t dim, int64_t group, ScoresFn<T>& scores, AccumulateFn<T>& accumulate) {
  if (dim == 64) return pick_group<4, T>(group, scores, accumulate);
  if (dim == 128) return pick_group<8, T>(group, scores, accumulate);
  return false;
}
#endif

// Brings the rows of one block that a work item reads into L2 ahead of use (into L1 it
// measured slower: 16 KB in flight evicts the block being read). Blocks
// are scattered in the pool, and the hardware prefetcher does not cross into them.
template <typename T>
inline void prefetch_block(const T* base, int64_t nt, int64_t token_stride, int64_t row_bytes) {
#if defined(__AVX512F__)
  for (int64_t t = 0; t < nt; ++t) {
    const char* row = reinterpret_cast<const char*>(base + t * token_stride);
    for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(row + off, _MM_HINT_T1);
  }
#endif
}

#if defined(__AVX512BF16__)
// Prompt rows in tiles (bf16 caches, AVX512_BF16): up to kTileRows consecutive rows of one
// sequence (the same table, contexts c0, c0 + 1, ...) and one KV head per work item. Each
// 16-token chunk of K/V is read and rearranged once for all of the tile's rows x query heads:
// K transposed (dims in pairs) so that one VDPBF16PS gives a query head's scores of 16 tokens
// with no horizontal sums, V interleaved by token pairs so that one VDPBF16PS adds two tokens'
// values into 16 dims of the output (probabilities rounded to bf16 for it, as flash attention
// does; scores, softmax and sums in float32). One online-softmax step per span of
// NC = 256 / D chunks.
constexpr int64_t kTileRows = 16;
constexpr int64_t kTileMinRows = 4;  // shorter runs of prompt rows take the per-row path

struct TileScratch {
  std::vector<__m512i> kt, vp;  // [NC][D / 2] (16 tokens each), [NC][8 pairs][D / 16]
  std::vector<float> acc, m, l;  // [rows * group][D], [rows * group] x 2
};

template <int D>
void attend_tile(const c10::BFloat16* q, int64_t q_row_stride, const c10::BFloat16* k,
                 const c10::BFloat16* v, const int64_t* table, int64_t block_stride,
                 int64_t token_stride, int64_t bs, int64_t c0, int64_t rows, int64_t group,
                 float scale, c10::BFloat16* o, TileScratch& w) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int NC = 256 / D, P = D / 2, C = D / 16, H = D == 64 ? 4 : 2;
  const int64_t heads = rows * group, cmax = c0 + rows - 1;
  w.kt.resize(NC * P);
  w.vp.resize(NC * 8 * C);
  w.acc.assign(heads * D, 0.f);
  w.m.assign(heads, -std::numeric_limits<float>::infinity());
  w.l.assign(heads, 0.f);
  // token t of a chunk is (token_stride / 2) 32-bit words after token t - 1
  const __m512i gather_idx = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
      _mm512_set1_epi32(static_cast<int>(token_stride / 2)));
  __m512i lo_idx, hi_idx;  // (a[i], b[i]) pairs of the first / second 16 of 32 bf16
  {
    alignas(64) int16_t lo[32], hi[32];
    for (int i = 0; i < 16; ++i) {
      lo[2 * i] = i, lo[2 * i + 1] = 32 + i;
      hi[2 * i] = 16 + i, hi[2 * i + 1] = 48 + i;
    }
    lo_idx = _mm512_load_si512(lo);
    hi_idx = _mm512_load_si512(hi);
  }
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  alignas(64) uint32_t pp[H * NC * 8];  // probabilities of the span, bf16 token pairs
  for (int64_t t0 = 0; t0 < cmax; t0 += NC * 16) {
    const int64_t chunks = std::min<int64_t>(NC, (cmax - t0 + 15) / 16);
    for (int64_t c = 0; c < chunks; ++c) {  // rearrange the span's K and V chunks
      const int64_t tc = t0 + c * 16, nt = std::min<int64_t>(16, cmax - tc);
      const int64_t within = (tc % bs) * token_stride + table[tc / bs] * block_stride;
      const int* kb = reinterpret_cast<const int*>(k + within);
      const __mmask16 valid = static_cast<__mmask16>((1u << nt) - 1);
      for (int p = 0; p < P; ++p)
        w.kt[c * P + p] = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, gather_idx,
                                                      kb + p, 4);
      const c10::BFloat16* vb = v + within;
      for (int tp = 0; tp < 8; ++tp) {
        for (int h = 0; h < D / 32; ++h) {
          const __m512i a = 2 * tp < nt ? _mm512_loadu_si512(vb + 2 * tp * token_stride + 32 * h)
                                        : _mm512_setzero_si512();
          const __m512i b = 2 * tp + 1 < nt
                                ? _mm512_loadu_si512(vb + (2 * tp + 1) * token_stride + 32 * h)
                                : _mm512_setzero_si512();
          w.vp[(c * 8 + tp) * C + 2 * h] = _mm512_permutex2var_epi16(a, lo_idx, b);
          w.vp[(c * 8 + tp) * C + 2 * h + 1] = _mm512_permutex2var_epi16(a, hi_idx, b);
        }
      }
    }
    // The tile's query heads (row r, head j: r * group + j) H at a time: each K/V load feeds
    // H products, and H x NC (scores) or 2 x H x C (values) sums run side by side.
    for (int64_t g0 = 0; g0 < heads; g0 += H) {
      const int* qp[H];
      int64_t ctx[H];
      bool live[H];
      int64_t nch = 0;  // chunks of the span the group's longest row reads
      for (int i = 0; i < H; ++i) {
        const int64_t hj = std::min(g0 + i, heads - 1), r = hj / group;
        qp[i] = reinterpret_cast<const int*>(q + r * q_row_stride + (hj % group) * D);
        ctx[i] = c0 + r;
        live[i] = g0 + i < heads && ctx[i] > t0;
        if (live[i]) nch = std::max<int64_t>(nch, std::min<int64_t>(chunks, (ctx[i] - t0 + 15) / 16));
      }
      if (nch == 0) continue;
      __m512 s[H][NC];
      for (int i = 0; i < H; ++i)
        for (int c = 0; c < NC; ++c) s[i][c] = _mm512_setzero_ps();
      for (int p = 0; p < P; ++p) {
        __m512bh qb[H];
        for (int i = 0; i < H; ++i) qb[i] = (__m512bh)_mm512_set1_epi32(qp[i][p]);
#pragma GCC unroll 8
        for (int c = 0; c < NC; ++c) {
          if (c >= nch) break;
          const __m512bh kv = (__m512bh)w.kt[c * P + p];
          for (int i = 0; i < H; ++i) s[i][c] = _mm512_dpbf16_ps(s[i][c], kv, qb[i]);
        }
      }
      float corr[H];
      for (int i = 0; i < H; ++i) {
        uint32_t* ppi = pp + i * NC * 8;
        if (!live[i]) {
          std::fill(ppi, ppi + NC * 8, 0u);
          corr[i] = 1.f;
          continue;
        }
        const int64_t hj = g0 + i;
        __m512 mx = neg_inf;
        for (int64_t c = 0; c < nch; ++c) {
          const int64_t valid = std::clamp<int64_t>(ctx[i] - (t0 + c * 16), 0, 16);
          const __mmask16 km = static_cast<__mmask16>((1u << valid) - 1);
          s[i][c] = _mm512_maskz_mul_ps(km, s[i][c], _mm512_set1_ps(scale));
          s[i][c] = _mm512_mask_mov_ps(neg_inf, km, s[i][c]);
          mx = _mm512_max_ps(mx, s[i][c]);
        }
        const float new_max = std::max(w.m[hj], _mm512_reduce_max_ps(mx));
        corr[i] = std::exp(w.m[hj] - new_max);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t c = 0; c < nch; ++c) {
          const __mmask16 km = _mm512_cmp_ps_mask(s[i][c], neg_inf, _CMP_NEQ_OQ);
          const __m512 e = _mm512_maskz_mov_ps(km, (Vec(s[i][c]) - Vec(new_max)).exp_u20());
          sum = _mm512_add_ps(sum, e);
          _mm256_store_si256(reinterpret_cast<__m256i*>(ppi + c * 8), (__m256i)_mm512_cvtneps_pbh(e));
        }
        w.l[hj] = w.l[hj] * corr[i] + _mm512_reduce_add_ps(sum);
        w.m[hj] = new_max;
      }
      __m512 a[H][C];
      for (int i = 0; i < H; ++i) {
        const __m512 vc = _mm512_set1_ps(corr[i]);
        const float* acc = w.acc.data() + std::min(g0 + i, heads - 1) * D;
        for (int c = 0; c < C; ++c) a[i][c] = _mm512_mul_ps(vc, _mm512_loadu_ps(acc + 16 * c));
      }
      for (int64_t tp = 0; tp < nch * 8; ++tp) {
        __m512bh pb[H];
        for (int i = 0; i < H; ++i) pb[i] = (__m512bh)_mm512_set1_epi32(static_cast<int>(pp[i * NC * 8 + tp]));
        const __m512i* vp = w.vp.data() + tp * C;
        for (int c = 0; c < C; ++c) {
          const __m512bh vv = (__m512bh)vp[c];
          for (int i = 0; i < H; ++i) a[i][c] = _mm512_dpbf16_ps(a[i][c], vv, pb[i]);
        }
      }
      for (int i = 0; i < H; ++i) {
        if (!live[i]) continue;
        float* acc = w.acc.data() + (g0 + i) * D;
        for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + 16 * c, a[i][c]);
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < group; ++j) {
      const int64_t hj = r * group + j;
      const float inv = w.l[hj] > 0.f ? 1.f / w.l[hj] : 0.f;
      c10::BFloat16* orow = o + r * q_row_stride + j * D;
      for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<c10::BFloat16>(w.acc[hj * D + d] * inv);
    }
  }
}
#endif

// The most tokens whose scores are computed before one softmax step (whole blocks; at least one).
constexpr int64_t kSpanTokens = 256;

template <typename T>
void decode_impl(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                 const at::Tensor& v_cache, const at::Tensor& block_tables,
                 const int64_t* row_tables, const at::Tensor& context_lens, double scale) {
  using Vec = at::vec::Vectorized<float>;
  const int64_t n = query.size(0), num_heads = query.size(1), dim = query.size(2);
  const int64_t bs = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  const int64_t block_stride = bs * num_kv_heads * dim, token_stride = num_kv_heads * dim;
  const T* q = query.data_ptr<T>();
  const T* k = k_cache.data_ptr<T>();
  const T* v = v_cache.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const float fscale = static_cast<float>(scale);
  // Work items: a tile of prompt rows and one KV head (rows > 0, bf16 with AVX512_BF16), or
  // one row (rows == 0) with all heads (each K/V block is read front to back, which the
  // prefetcher follows) or, with fewer items than threads can share, one KV head.
  struct Item {
    int64_t s, rows, h0;
  };
  std::vector<Item> work;
  std::vector<int64_t> single;
  bool tiles = false;
#if defined(__AVX512BF16__)
  tiles = std::is_same_v<T, c10::BFloat16> && row_tables != nullptr && bs % 16 == 0 &&
          (dim == 64 || dim == 128);
#endif
  for (int64_t s = 0; s < n;) {
    int64_t run = 1;  // consecutive rows of one sequence, contexts one apart: a prompt chunk
    if (tiles)
      while (s + run < n && row_tables[s + run] == row_tables[s] && lens[s + run] == lens[s] + run)
        ++run;
#if defined(__AVX512BF16__)
    if (run >= kTileMinRows) {
      for (int64_t r = 0; r < run; r += kTileRows)
        for (int64_t h = 0; h < num_kv_heads; ++h)
          work.push_back({s + r, std::min(kTileRows, run - r), h});
      s += run;
      continue;
    }
#endif
    for (int64_t r = 0; r < run; ++r) single.push_back(s + r);
    s += run;
  }
  // longest contexts first, so that no long tile starts last
  std::stable_sort(work.begin(), work.end(), [&](const Item& a, const Item& b) {
    return lens[a.s] + a.rows > lens[b.s] + b.rows;
  });
  const int64_t splits =
      static_cast<int64_t>(work.size() + single.size()) >= 2 * at::get_num_threads() ? 1 : num_kv_heads;
  const int64_t item_kv_heads = num_kv_heads / splits, item_heads = item_kv_heads * group;
  ScoresFn<T> fast_scores = nullptr;
  AccumulateFn<T> fast_accumulate = nullptr;
#if defined(__AVX512F__)
  pick_block_kernels<T>(dim, group, fast_scores, fast_accumulate);
#endif

  // Scores of a span of whole blocks (up to kSpanTokens tokens) are computed before one online
  // softmax step over them all: its reductions and rescaling run once per span, not per block.
  const int64_t span_blocks = std::max<int64_t>(1, kSpanTokens / bs), span = span_blocks * bs;
  const int64_t row_bytes = item_kv_heads * dim * static_cast<int64_t>(sizeof(T));

  // Each thread takes the next free item (contiguous ranges would give one thread all the
  // long sequences, which arrive sorted by length; a fixed deal would leave a thread that the
  // OS preempts, e.g. for the server's front end, holding up the step with its share).
  for (const int64_t s : single)
    for (int64_t h = 0; h < splits; ++h) work.push_back({s, 0, h * item_kv_heads});
  const int64_t items = static_cast<int64_t>(work.size());
  const int64_t lanes = std::min<int64_t>(at::get_num_threads(), items);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, lanes, 1, [&](int64_t, int64_t) {
    std::vector<float> qf(item_heads * dim), acc(item_heads * dim), row(dim), p(item_heads * span);
    std::vector<float> m(item_heads), l(item_heads), corr(item_heads), ones(item_heads, 1.f);
#if defined(__AVX512BF16__)
    TileScratch tile;
#endif
    for (int64_t w; (w = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
      const int64_t s = work[w].s, h0 = work[w].h0;
#if defined(__AVX512BF16__)
      if (work[w].rows > 0) {
        if constexpr (std::is_same_v<T, c10::BFloat16>) {
          const int64_t* table = tables + row_tables[s] * max_blocks;
          const int64_t off = (s * num_heads + h0 * group) * dim;
          (dim == 64 ? attend_tile<64> : attend_tile<128>)(
              q + off, num_heads * dim, k + h0 * dim, v + h0 * dim, table, block_stride,
              token_stride, bs, lens[s], work[w].rows, group, fscale, o + off, tile);
        }
        continue;
      }
#endif
      const int64_t ctx = lens[s], ctx_blocks = (ctx + bs - 1) / bs;
      const int64_t* table = tables + (row_tables ? row_tables[s] : s) * max_blocks;
      const T* qrow = q + (s * num_heads + h0 * group) * dim;
      const auto tokens = [&](int64_t b) { return std::min(bs, ctx - b * bs); };
      const auto k_block = [&](int64_t b) { return k + table[b] * block_stride + h0 * dim; };
      const auto v_block = [&](int64_t b) { return v + table[b] * block_stride + h0 * dim; };
      to_float(qrow, qf.data(), item_heads * dim);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t b0 = 0; b0 < ctx_blocks; b0 += span_blocks) {
        const int64_t b1 = std::min(ctx_blocks, b0 + span_blocks);
        const int64_t span_len = std::min(ctx, b1 * bs) - b0 * bs;
        // p[j * span + t]: the score of the span's token t for query head j of the item
        for (int64_t b = b0; b < b1; ++b) {  // scores; meanwhile the next K (or first V) block
          const int64_t nb = b + 1 < b1 ? b + 1 : b0;
          prefetch_block(b + 1 < b1 ? k_block(nb) : v_block(nb), tokens(nb), token_stride,
                         row_bytes);
          const T* kb = k_block(b);
          const int64_t nt = tokens(b), off = (b - b0) * bs;
          if (fast_scores) {
            for (int64_t hh = 0; hh < item_kv_heads; ++hh)
              fast_scores(qf.data() + hh * group * dim, qrow + hh * group * dim, kb + hh * dim,
                          token_stride, nt, span, fscale, p.data() + hh * group * span + off);
            continue;
          }
          for (int64_t t = 0; t < nt; ++t) {
            for (int64_t hh = 0; hh < item_kv_heads; ++hh) {
              to_float(kb + t * token_stride + hh * dim, row.data(), dim);
              for (int64_t j = hh * group; j < (hh + 1) * group; ++j)
                p[j * span + off + t] = dot(qf.data() + j * dim, row.data(), dim) * fscale;
            }
          }
        }
        for (int64_t j = 0; j < item_heads; ++j) {
          float* pj = p.data() + j * span;
#if defined(__AVX512F__)
          corr[j] = softmax_block(pj, span_len, m[j], l[j]);
#else
          float block_max = pj[0];
          for (int64_t t = 1; t < span_len; ++t) block_max = std::max(block_max, pj[t]);
          const float new_max = std::max(m[j], block_max);
          const float correction = std::exp(m[j] - new_max);
          float sum = 0.f;
          for (int64_t t = 0; t < span_len; t += Vec::size()) {
            const int64_t c = std::min<int64_t>(Vec::size(), span_len - t);
            const Vec e = (Vec::loadu(pj + t, c) - Vec(new_max)).exp_u20();
            e.store(pj + t, c);
            for (int64_t i = 0; i < c; ++i) sum += pj[t + i];
          }
          l[j] = l[j] * correction + sum;
          m[j] = new_max;
          corr[j] = correction;
#endif
        }
        for (int64_t b = b0; b < b1; ++b) {  // values; meanwhile the next V (or K) block
          if (b + 1 < b1)
            prefetch_block(v_block(b + 1), tokens(b + 1), token_stride, row_bytes);
          else if (b1 < ctx_blocks)
            prefetch_block(k_block(b1), tokens(b1), token_stride, row_bytes);
          const T* vb = v_block(b);
          const int64_t nt = tokens(b), off = (b - b0) * bs;
          // earlier spans' sums are rescaled once, with the span's first block
          const float* scale_by = b == b0 ? corr.data() : ones.data();
          if (fast_accumulate) {
            for (int64_t hh = 0; hh < item_kv_heads; ++hh)
              fast_accumulate(vb + hh * dim, token_stride, nt, span,
                              p.data() + hh * group * span + off, scale_by + hh * group,
                              acc.data() + hh * group * dim);
            continue;
          }
          for (int64_t j = 0; j < item_heads; ++j) {
            if (scale_by[j] == 1.f) continue;
            float* aj = acc.data() + j * dim;
            for (int64_t d = 0; d < dim; ++d) aj[d] *= scale_by[j];
          }
          for (int64_t t = 0; t < nt; ++t) {
            for (int64_t hh = 0; hh < item_kv_heads; ++hh) {
              to_float(vb + t * token_stride + hh * dim, row.data(), dim);
              for (int64_t j = hh * group; j < (hh + 1) * group; ++j)
                axpy(p[j * span + off + t], row.data(), acc.data() + j * dim, dim);
            }
          }
        }
      }
      T* orow = o + (s * num_heads + h0 * group) * dim;
      for (int64_t j = 0; j < item_heads; ++j) {
        const float inv = l[j] > 0.f ? 1.f / l[j] : 0.f;
        for (int64_t d = 0; d < dim; ++d) orow[j * dim + d] = static_cast<T>(acc[j * dim + d] * inv);
      }
    }
  });
}

void paged_decode_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, double scale,
                            const std::optional<at::Tensor>& row_tables) {
  TORCH_CHECK(query.dim() == 3 && out.sizes() == query.sizes(), "query and out must be [n, H, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "k_cache and v_cache must be [blocks, block_size, Hkv, D]");
  TORCH_CHECK(query.size(2) == k_cache.size(3), "head_dim of query and cache differ");
  TORCH_CHECK(query.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == at::kLong &&
                  (row_tables.has_value() || block_tables.size(0) == query.size(0)),
              "block_tables must be int64 [n, max_blocks]");
  if (row_tables.has_value()) {
    TORCH_CHECK(row_tables->dim() == 1 && row_tables->size(0) == query.size(0) &&
                    row_tables->scalar_type() == at::kLong && row_tables->is_contiguous() &&
                    row_tables->device().is_cpu(),
                "row_tables must be contiguous int64 [n] on CPU");
  }
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == query.size(0) &&
                  context_lens.scalar_type() == at::kLong,
              "context_lens must be int64 [n]");
  for (const at::Tensor* t : {static_cast<const at::Tensor*>(&out), &query, &k_cache, &v_cache, &block_tables, &context_lens}) {
    TORCH_CHECK(t->is_contiguous() && t->device().is_cpu(), "all tensors must be contiguous, on CPU");
  }
  TORCH_CHECK(query.scalar_type() == k_cache.scalar_type() && out.scalar_type() == k_cache.scalar_type(),
              "query, out and cache must share a dtype");
  // Block ids index raw memory below: check every one that will be read.
  const int64_t num_blocks = k_cache.size(0), bs = k_cache.size(1), max_blocks = block_tables.size(1);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* rows = row_tables.has_value() ? row_tables->data_ptr<int64_t>() : nullptr;
  // Each table is checked once, up to the longest context read through it.
  std::vector<int64_t> reach(block_tables.size(0), 0);
  for (int64_t s = 0; s < query.size(0); ++s) {
    TORCH_CHECK(lens[s] >= 1 && lens[s] <= max_blocks * bs, "context_lens[", s, "] = ", lens[s],
                " is outside [1, ", max_blocks * bs, "]");
    const int64_t r = rows ? rows[s] : s;
    TORCH_CHECK(r >= 0 && r < block_tables.size(0), "row_tables[", s, "] = ", r,
                " is not a row of block_tables");
    reach[r] = std::max(reach[r], lens[s]);
  }
  for (int64_t r = 0; r < block_tables.size(0); ++r) {
    for (int64_t b = 0; b * bs < reach[r]; ++b) {
      const int64_t id = tables[r * max_blocks + b];
      TORCH_CHECK(id >= 0 && id < num_blocks, "block_tables[", r, ", ", b, "] = ", id,
                  " is not a block of the cache (", num_blocks, " blocks)");
    }
  }
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    decode_impl<T>(out, query, k_cache, v_cache, block_tables, rows, context_lens, scale);
  };
  switch (query.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK(false, "paged_decode_attention: unsupported dtype ", query.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY(e3rl, m) {
  m.def("paged_decode_attention(Tensor(a!) out, Tensor query, Tensor k_cache, Tensor v_cache, "
        "Tensor block_tables, Tensor context_lens, float scale, Tensor? row_tables=None) -> ()");
}

TORCH_LIBRARY_IMPL(e3rl, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
