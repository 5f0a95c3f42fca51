// RMSNorm for CPU in one pass per row, with the numerics of transformers' Llama-family
// RMSNorm: in float32, y = x * rsqrt(mean(x^2) + eps); y rounded to x's dtype; out = weight * y
// (the product rounded to x's dtype). transformers spells this as ~8 separate tensor ops.

#if defined(__AVX512F__) && !defined(CPU_CAPABILITY_AVX512)
#define CPU_CAPABILITY_AVX512
#endif
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>

namespace {

using Vec = at::vec::Vectorized<float>;

template <typename T>
void rms_norm_rows(const T* x, const T* w, T* out, int64_t rows, int64_t n, float eps) {
  using VecT = at::vec::Vectorized<T>;
  constexpr bool reduced = !std::is_same_v<T, float>;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * n;
      T* yr = out + r * n;
      Vec acc(0.f);
      int64_t i = 0;
      if constexpr (reduced) {
        for (; i + VecT::size() <= n; i += VecT::size()) {
          auto [a, b] = at::vec::convert_to_float<T>(VecT::loadu(xr + i));
          acc = at::vec::fmadd(a, a, acc);
          acc = at::vec::fmadd(b, b, acc);
        }
      } else {
        for (; i + Vec::size() <= n; i += Vec::size()) {
          const Vec a = Vec::loadu(xr + i);
          acc = at::vec::fmadd(a, a, acc);
        }
      }
      float lanes[Vec::size()];
      acc.store(lanes);
      float ss = 0.f;
      for (int k = 0; k < Vec::size(); ++k) ss += lanes[k];
      for (int64_t k = i; k < n; ++k) ss += static_cast<float>(xr[k]) * static_cast<float>(xr[k]);
      const float scale = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
      for (int64_t k = 0; k < n; ++k) {
        // round the normalised value to T first, as transformers does, then scale by weight
        const T y = static_cast<T>(static_cast<float>(xr[k]) * scale);
        yr[k] = static_cast<T>(static_cast<float>(w[k]) * static_cast<float>(y));
      }
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm: CPU tensors only");
  TORCH_CHECK(weight.dim() == 1 && x.size(-1) == weight.size(0),
              "rms_norm: weight must be [hidden]");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "rms_norm: x and weight must share a dtype");
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t n = x.size(-1), rows = n ? xc.numel() / n : 0;
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    rms_norm_rows<T>(xc.data_ptr<T>(), wc.data_ptr<T>(), out.data_ptr<T>(), rows, n, eps);
  };
  switch (x.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK(false, "rms_norm: unsupported dtype ", x.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(e3rl, m) { m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor"); }

TORCH_LIBRARY_IMPL(e3rl, CPU, m) { m.impl("rms_norm", &rms_norm); }
