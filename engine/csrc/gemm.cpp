// bf16 matrix products for few rows (decode steps) on CPUs with AVX512_BF16.
//
//   out[m, o] = sum_i x[m, i] * W[o, i] (+ bias[o]),   x, W bf16; float32 sums; out bf16
//
// At decode sizes (a few to a few dozen rows) a step streams every weight from memory once;
// oneDNN's bf16 GEMM reached ~5-13 GB/s of weights there on this project's machine (its
// blocking is made for many rows). Here the weight is stored in tiles of 16 outputs with
// input pairs interleaved ([O/16, I/2, 16, 2]): one 64-byte load holds 16 outputs x 2 inputs
// for one VDPBF16PS per row (the row's input pair broadcast), and blocks of 4 tiles x 6 rows
// keep their 24 sums in registers. Work is split over groups of tiles.
//
// Built only when the compiler targets AVX512_BF16 (``gemm_available()`` says so); the engine
// keeps oneDNN / torch's products elsewhere.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define E3RL_GEMM_BF16 1
#endif

namespace {

#if defined(E3RL_GEMM_BF16)
// NT consecutive tiles (16 outputs each) for R rows: acc[n][r] += W_tile(n) . x[r], then bias
// and a bf16 store. Each broadcast input pair feeds NT products and each weight load R.
template <int NT, int R>
void tile_block(const uint32_t* w, int64_t pairs, const uint32_t* x, const float* bias,
                c10::BFloat16* out, int64_t out_stride) {
  __m512 acc[NT][R];
  for (int n = 0; n < NT; ++n)
    for (int r = 0; r < R; ++r) acc[n][r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh wv[NT];
    for (int n = 0; n < NT; ++n)
      wv[n] = (__m512bh)_mm512_loadu_si512(w + (n * pairs + p) * 16);
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * pairs + p]));
      for (int n = 0; n < NT; ++n) acc[n][r] = _mm512_dpbf16_ps(acc[n][r], wv[n], xv);
    }
  }
  for (int n = 0; n < NT; ++n) {
    const __m512 b = bias ? _mm512_loadu_ps(bias + n * 16) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      const __m256bh y = _mm512_cvtneps_pbh(_mm512_add_ps(acc[n][r], b));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * out_stride + n * 16), (__m256i)y);
    }
  }
}

using BlockFn = void (*)(const uint32_t*, int64_t, const uint32_t*, const float*,
                         c10::BFloat16*, int64_t);

constexpr int kMaxTiles = 4, kMaxRows = 6;

template <int NT>
BlockFn pick_rows(int64_t rows) {
  switch (rows) {
    case 1: return tile_block<NT, 1>;
    case 2: return tile_block<NT, 2>;
    case 3: return tile_block<NT, 3>;
    case 4: return tile_block<NT, 4>;
    case 5: return tile_block<NT, 5>;
    default: return tile_block<NT, 6>;
  }
}

BlockFn pick(int64_t tiles, int64_t rows) {
  switch (tiles) {
    case 1: return pick_rows<1>(rows);
    case 2: return pick_rows<2>(rows);
    case 3: return pick_rows<3>(rows);
    default: return pick_rows<4>(rows);
  }
}
#endif

bool gemm_available() {
#if defined(E3RL_GEMM_BF16)
  return true;
#else
  return false;
#endif
}

// [O, I] -> [O/16, I/2, 16, 2]: the layout ``small_gemm`` reads.
at::Tensor tile_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 &&
                  weight.device().is_cpu(),
              "tile_weight: weight must be bf16 [out, in] on CPU");
  const int64_t o = weight.size(0), i = weight.size(1);
  TORCH_CHECK(o % 16 == 0 && i % 2 == 0, "tile_weight: out must be a multiple of 16 and in even");
  return weight.view({o / 16, 16, i / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

at::Tensor small_gemm(const at::Tensor& x, const at::Tensor& tiled,
                      const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(gemm_available(), "small_gemm: this build has no AVX512_BF16 kernel");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(),
              "small_gemm: x must be bf16 [rows, in] on CPU");
  TORCH_CHECK(tiled.dim() == 4 && tiled.size(2) == 16 && tiled.size(3) == 2 &&
                  tiled.scalar_type() == at::kBFloat16 && tiled.is_contiguous(),
              "small_gemm: weight must come from tile_weight");
  const int64_t rows = x.size(0), pairs = tiled.size(1), tiles = tiled.size(0);
  TORCH_CHECK(x.size(1) == 2 * pairs, "small_gemm: x has ", x.size(1), " inputs, weight ",
              2 * pairs);
  const at::Tensor xc = x.contiguous();
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == tiles * 16, "small_gemm: bias must be [out]");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  at::Tensor out = at::empty({rows, tiles * 16}, x.options());
#if defined(E3RL_GEMM_BF16)
  const auto* xp = reinterpret_cast<const uint32_t*>(xc.data_ptr<c10::BFloat16>());
  const auto* wp = reinterpret_cast<const uint32_t*>(tiled.data_ptr<c10::BFloat16>());
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  const int64_t out_stride = tiles * 16;
  // Threads take groups of up to kMaxTiles tiles; a group's weights come from memory for its
  // first block of rows and from cache for the others.
  const int64_t groups = (tiles + kMaxTiles - 1) / kMaxTiles;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t t0 = g * kMaxTiles, nt = std::min<int64_t>(kMaxTiles, tiles - t0);
      for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
        const int64_t r = std::min<int64_t>(kMaxRows, rows - r0);
        pick(nt, r)(wp + t0 * pairs * 16, pairs, xp + r0 * pairs, bp ? bp + t0 * 16 : nullptr,
                    op + r0 * out_stride + t0 * 16, out_stride);
      }
    }
  });
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(e3rl, m) {
  m.def("gemm_available() -> bool", &gemm_available);
  m.def("tile_weight(Tensor weight) -> Tensor");
  m.def("small_gemm(Tensor x, Tensor tiled, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(e3rl, CPU, m) {
  m.impl("tile_weight", &tile_weight);
  m.impl("small_gemm", &small_gemm);
}
