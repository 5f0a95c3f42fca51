// Matrix products for the engine's linears on CPU: bf16 with AVX512_BF16, float32 with AVX-512.
//
//   out[m, o] = sum_i x[m, i] * W[o, i] (+ bias[o]),   float32 sums; out in x's dtype
//
// At decode sizes (a few to a few dozen rows) a step streams every weight from memory once;
// oneDNN's bf16 GEMM reached ~5-13 GB/s of weights there on this project's machine and MKL's
// float32 one ~5-13 GB/s (their blocking is made for many rows). Here the weight is stored in
// tiles of 16 outputs: bf16 with input pairs interleaved ([O/16, I/2, 16, 2]: one 64-byte load
// holds 16 outputs x 2 inputs for one VDPBF16PS per row, the row's input pair broadcast),
// float32 as [O/16, I, 16] (one FMA per load and row); blocks of 4 tiles x 6 rows keep their 24
// sums in registers. Threads take the next free group of tiles. A (gate, up) pair tiled
// together, tiles alternating, gives each projection through first_tile/tile_step and both
// with the SiLU-and-multiply in one pass (small_gemm_silu_mul).
//
// Built only when the compiler targets the instructions (``gemm_available(dtype)`` says so);
// the engine keeps oneDNN / torch's products elsewhere.

#if defined(__AVX512F__) && !defined(CPU_CAPABILITY_AVX512)
#define CPU_CAPABILITY_AVX512
#endif
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <atomic>

#if defined(__AVX512F__)
#include <immintrin.h>
#define E3RL_GEMM_F32 1
#if defined(__AVX512BF16__)
#define E3RL_GEMM_BF16 1
#endif
#endif

namespace {

constexpr int kMaxTiles = 4, kMaxRows = 6;

#if defined(E3RL_GEMM_BF16)
inline __m512 bf16_to_float(__m256bh v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)v), 16));
}

// What a block stores: each tile's sums (+ bias) rounded to bf16; or, for tiles that come in
// (gate, up) pairs, silu(gate) * up with transformers' roundings (gate and up rounded to bf16
// as their projections' outputs, silu rounded, the product rounded), one 16-wide output tile
// per pair, as ``kernels.silu_mul`` computes it from the two projections.
enum class Epilogue { kStore, kSiluMul };

// NT tiles (16 outputs each, ``tile_stride`` elements apart) for R rows:
// acc[n][r] += W_tile(n) . x[r], then the epilogue. Each broadcast input pair feeds NT
// products and each weight load R.
template <int NT, int R, Epilogue E>
void tile_block(const uint32_t* w, int64_t pairs, int64_t tile_stride, const uint32_t* x,
                const float* bias, c10::BFloat16* out, int64_t out_stride) {
  __m512 acc[NT][R];
  for (int n = 0; n < NT; ++n)
    for (int r = 0; r < R; ++r) acc[n][r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh wv[NT];
    for (int n = 0; n < NT; ++n)
      wv[n] = (__m512bh)_mm512_loadu_si512(w + n * tile_stride + p * 16);
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * pairs + p]));
      for (int n = 0; n < NT; ++n) acc[n][r] = _mm512_dpbf16_ps(acc[n][r], wv[n], xv);
    }
  }
  if constexpr (E == Epilogue::kSiluMul) {
    using Vec = at::vec::Vectorized<float>;
    const Vec one(1.f);
    for (int n = 0; n + 1 < NT; n += 2) {
      for (int r = 0; r < R; ++r) {
        const Vec gate(bf16_to_float(_mm512_cvtneps_pbh(acc[n][r])));
        const Vec up(bf16_to_float(_mm512_cvtneps_pbh(acc[n + 1][r])));
        const __m512 act = bf16_to_float(_mm512_cvtneps_pbh(gate / (one + gate.neg().exp())));
        const __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(act, up));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * out_stride + n / 2 * 16),
                            (__m256i)y);
      }
    }
  } else {
    for (int n = 0; n < NT; ++n) {
      const __m512 b = bias ? _mm512_loadu_ps(bias + n * 16) : _mm512_setzero_ps();
      for (int r = 0; r < R; ++r) {
        const __m256bh y = _mm512_cvtneps_pbh(_mm512_add_ps(acc[n][r], b));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * out_stride + n * 16),
                            (__m256i)y);
      }
    }
  }
}

using BlockFn = void (*)(const uint32_t*, int64_t, int64_t, const uint32_t*, const float*,
                         c10::BFloat16*, int64_t);

template <int NT, Epilogue E>
BlockFn pick_rows(int64_t rows) {
  switch (rows) {
    case 1: return tile_block<NT, 1, E>;
    case 2: return tile_block<NT, 2, E>;
    case 3: return tile_block<NT, 3, E>;
    case 4: return tile_block<NT, 4, E>;
    case 5: return tile_block<NT, 5, E>;
    default: return tile_block<NT, 6, E>;
  }
}

BlockFn pick(int64_t tiles, int64_t rows) {
  switch (tiles) {
    case 1: return pick_rows<1, Epilogue::kStore>(rows);
    case 2: return pick_rows<2, Epilogue::kStore>(rows);
    case 3: return pick_rows<3, Epilogue::kStore>(rows);
    default: return pick_rows<4, Epilogue::kStore>(rows);
  }
}

BlockFn pick_silu_mul(int64_t tiles, int64_t rows) {  // tiles: 2 or 4 (whole pairs)
  return tiles == 2 ? pick_rows<2, Epilogue::kSiluMul>(rows)
                    : pick_rows<4, Epilogue::kSiluMul>(rows);
}
#endif

#if defined(E3RL_GEMM_F32)
// float32: tiles [O/16, I, 16]; acc[n][r] += W_tile(n)[i] * x[r, i] (one FMA per load and
// row, the row's input broadcast), summed over i in order, then the bias.
template <int NT, int R>
void tile_block_f32(const float* w, int64_t in, const float* x, const float* bias, float* out,
                    int64_t out_stride) {
  __m512 acc[NT][R];
  for (int n = 0; n < NT; ++n)
    for (int r = 0; r < R; ++r) acc[n][r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < in; ++i) {
    __m512 wv[NT];
    for (int n = 0; n < NT; ++n) wv[n] = _mm512_loadu_ps(w + (n * in + i) * 16);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * in + i]);
      for (int n = 0; n < NT; ++n) acc[n][r] = _mm512_fmadd_ps(wv[n], xv, acc[n][r]);
    }
  }
  for (int n = 0; n < NT; ++n) {
    const __m512 b = bias ? _mm512_loadu_ps(bias + n * 16) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r)
      _mm512_storeu_ps(out + r * out_stride + n * 16, _mm512_add_ps(acc[n][r], b));
  }
}

using BlockFnF32 = void (*)(const float*, int64_t, const float*, const float*, float*, int64_t);

template <int NT>
BlockFnF32 pick_rows_f32(int64_t rows) {
  switch (rows) {
    case 1: return tile_block_f32<NT, 1>;
    case 2: return tile_block_f32<NT, 2>;
    case 3: return tile_block_f32<NT, 3>;
    case 4: return tile_block_f32<NT, 4>;
    case 5: return tile_block_f32<NT, 5>;
    default: return tile_block_f32<NT, 6>;
  }
}

BlockFnF32 pick_f32(int64_t tiles, int64_t rows) {
  switch (tiles) {
    case 1: return pick_rows_f32<1>(rows);
    case 2: return pick_rows_f32<2>(rows);
    case 3: return pick_rows_f32<3>(rows);
    default: return pick_rows_f32<4>(rows);
  }
}
#endif

bool gemm_available(c10::ScalarType dtype) {
#if defined(E3RL_GEMM_BF16)
  if (dtype == at::kBFloat16) return true;
#endif
#if defined(E3RL_GEMM_F32)
  if (dtype == at::kFloat) return true;
#endif
  return false;
}

// [O, I] -> bf16 [O/16, I/2, 16, 2] or float32 [O/16, I, 16]: the layout ``small_gemm`` reads.
at::Tensor tile_weight(const at::Tensor& weight) {
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(weight.dim() == 2 && (dtype == at::kBFloat16 || dtype == at::kFloat) &&
                  weight.device().is_cpu(),
              "tile_weight: weight must be bf16 or float32 [out, in] on CPU");
  const int64_t o = weight.size(0), i = weight.size(1);
  TORCH_CHECK(o % 16 == 0, "tile_weight: out must be a multiple of 16");
  if (dtype == at::kFloat) return weight.view({o / 16, 16, i}).permute({0, 2, 1}).contiguous();
  TORCH_CHECK(i % 2 == 0, "tile_weight: a bf16 weight needs an even number of inputs");
  return weight.view({o / 16, 16, i / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

// Threads take groups of up to kMaxTiles tiles, the next free one each (not a fixed half
// each: a thread that the OS preempts, e.g. for the server's front end on the same cores,
// leaves its share to the others instead of stalling the step); a group's weights come from
// memory for its first block of rows and from cache for the others. ``block(t0, nt, r0, r)``
// does one block.
template <typename Block>
void over_blocks(int64_t tiles, int64_t rows, const Block& block) {
  const int64_t groups = (tiles + kMaxTiles - 1) / kMaxTiles;
  const int64_t lanes = std::min<int64_t>(at::get_num_threads(), groups);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, lanes, 1, [&](int64_t, int64_t) {
    for (int64_t g; (g = next.fetch_add(1, std::memory_order_relaxed)) < groups;) {
      const int64_t t0 = g * kMaxTiles, nt = std::min<int64_t>(kMaxTiles, tiles - t0);
      for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows)
        block(t0, nt, r0, std::min<int64_t>(kMaxRows, rows - r0));
    }
  });
}

// Checks shared by the products; returns the number of inputs.
int64_t check_product(const at::Tensor& x, const at::Tensor& tiled, const char* name) {
  const auto dtype = tiled.scalar_type();
  const bool f32 = dtype == at::kFloat;
  TORCH_CHECK(gemm_available(dtype), name, ": this build has no ", dtype, " kernel");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == dtype && x.device().is_cpu(),
              name, ": x must be ", dtype, " [rows, in] on CPU, as the weight");
  TORCH_CHECK(tiled.is_contiguous() &&
                  (f32 ? tiled.dim() == 3 && tiled.size(2) == 16
                       : tiled.dim() == 4 && tiled.size(2) == 16 && tiled.size(3) == 2),
              name, ": weight must come from tile_weight");
  const int64_t in = f32 ? tiled.size(1) : 2 * tiled.size(1);
  TORCH_CHECK(x.size(1) == in, name, ": x has ", x.size(1), " inputs, weight ", in);
  return in;
}

// x @ W.T (+ bias) over the tiles first_tile, first_tile + tile_step, ... of ``tiled`` (a
// weight tiled from a (gate, up) pair: each projection's tiles alone).
at::Tensor small_gemm(const at::Tensor& x, const at::Tensor& tiled,
                      const std::optional<at::Tensor>& bias, int64_t first_tile,
                      int64_t tile_step) {
  const int64_t in = check_product(x, tiled, "small_gemm");
  const bool f32 = tiled.scalar_type() == at::kFloat;
  TORCH_CHECK(tile_step >= 1 && first_tile >= 0 && first_tile < std::max<int64_t>(tiled.size(0), 1),
              "small_gemm: first_tile ", first_tile, " / tile_step ", tile_step,
              " do not select tiles of the weight");
  const int64_t rows = x.size(0);
  const int64_t tiles = (tiled.size(0) - first_tile + tile_step - 1) / tile_step;
  const at::Tensor xc = x.contiguous();
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == tiles * 16, "small_gemm: bias must be [out]");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  at::Tensor out = at::empty({rows, tiles * 16}, x.options());
  const int64_t out_stride = tiles * 16;
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const int64_t tile_elems = in * 16 / (f32 ? 1 : 2);  // floats, or uint32 input pairs
  if (f32) {
#if defined(E3RL_GEMM_F32)
    TORCH_CHECK(tile_step == 1 && first_tile == 0, "small_gemm: float32 takes whole weights");
    const float* xp = xc.data_ptr<float>();
    const float* wp = tiled.data_ptr<float>();
    float* op = out.data_ptr<float>();
    over_blocks(tiles, rows, [&](int64_t t0, int64_t nt, int64_t r0, int64_t r) {
      pick_f32(nt, r)(wp + t0 * tile_elems, in, xp + r0 * in, bp ? bp + t0 * 16 : nullptr,
                      op + r0 * out_stride + t0 * 16, out_stride);
    });
#endif
    return out;
  }
#if defined(E3RL_GEMM_BF16)
  const int64_t pairs = in / 2;
  const auto* xp = reinterpret_cast<const uint32_t*>(xc.data_ptr<c10::BFloat16>());
  const auto* wp = reinterpret_cast<const uint32_t*>(tiled.data_ptr<c10::BFloat16>()) +
                   first_tile * tile_elems;
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  over_blocks(tiles, rows, [&](int64_t t0, int64_t nt, int64_t r0, int64_t r) {
    pick(nt, r)(wp + t0 * tile_step * tile_elems, pairs, tile_step * tile_elems, xp + r0 * pairs,
                bp ? bp + t0 * 16 : nullptr, op + r0 * out_stride + t0 * 16, out_stride);
  });
#endif
  return out;
}

// silu(x @ G.T) * (x @ U.T) from a weight tiled from G and U interleaved tile by tile
// (``tile_gate_up``): both products and the SiLU-and-multiply in one pass over the weight.
at::Tensor small_gemm_silu_mul(const at::Tensor& x, const at::Tensor& tiled) {
  const int64_t in = check_product(x, tiled, "small_gemm_silu_mul");
  TORCH_CHECK(tiled.scalar_type() == at::kBFloat16 && tiled.size(0) % 2 == 0,
              "small_gemm_silu_mul: weight must be bf16 (gate, up) tile pairs from tile_gate_up");
  const int64_t rows = x.size(0), tiles = tiled.size(0), out_stride = tiles / 2 * 16;
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({rows, out_stride}, x.options());
#if defined(E3RL_GEMM_BF16)
  const int64_t pairs = in / 2, tile_elems = pairs * 16;
  const auto* xp = reinterpret_cast<const uint32_t*>(xc.data_ptr<c10::BFloat16>());
  const auto* wp = reinterpret_cast<const uint32_t*>(tiled.data_ptr<c10::BFloat16>());
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  over_blocks(tiles, rows, [&](int64_t t0, int64_t nt, int64_t r0, int64_t r) {
    pick_silu_mul(nt, r)(wp + t0 * tile_elems, pairs, tile_elems, xp + r0 * pairs, nullptr,
                         op + r0 * out_stride + t0 / 2 * 16, out_stride);
  });
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(e3rl, m) {
  m.def("gemm_available(ScalarType dtype) -> bool", &gemm_available);
  m.def("tile_weight(Tensor weight) -> Tensor");
  m.def("small_gemm(Tensor x, Tensor tiled, Tensor? bias, int first_tile=0, int tile_step=1) "
        "-> Tensor");
  m.def("small_gemm_silu_mul(Tensor x, Tensor tiled) -> Tensor");
}

TORCH_LIBRARY_IMPL(e3rl, CPU, m) {
  m.impl("tile_weight", &tile_weight);
  m.impl("small_gemm", &small_gemm);
  m.impl("small_gemm_silu_mul", &small_gemm_silu_mul);
}
