// Fused elementwise passes of a Llama-family decoder layer on CPU, with transformers' numerics:
// each op computes in float32 and rounds to the tensor's dtype where transformers' separate
// tensor ops would (so bf16 results match op for op, up to the rare one-ulp difference of a
// differently ordered sum of squares or of the vectorised exp).
//
// - rms_norm: transformers' Llama-family RMSNorm in one pass per row: in float32,
//   y = x * rsqrt(mean(x^2) + eps); y rounded to x's dtype; out = weight * y (rounded), ~8 ops
//   in transformers;
// - add_rms_norm_: residual <- residual + x (rounded), returns RMSNorm(residual)
//   (transformers: ``h = residual + h; residual = h; h = norm(h)``, ~10 ops);
// - silu_mul: silu(gate) (rounded) * up (rounded) (``act_fn(gate_proj(x)) * up_proj(x)``);
// - qk_norm_rope_: per-head RMSNorm of q and k (Qwen3's q_norm/k_norm, optional) and the
//   rotary embedding, in place (``apply_rotary_pos_emb``: q * cos + rotate_half(q) * sin,
//   each product and the sum rounded), ~25 ops per layer in transformers.

#if defined(__AVX512F__) && !defined(CPU_CAPABILITY_AVX512)
#define CPU_CAPABILITY_AVX512
#endif
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

namespace {

using Vec = at::vec::Vectorized<float>;

// Rows per parallel task: at least ~16k elements each, so small decode batches stay on one
// thread (waking a second one costs more than the work).
int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

template <typename T>
float sum_of_squares(const T* x, int64_t n) {
  using VecT = at::vec::Vectorized<T>;
  Vec acc(0.f);
  int64_t i = 0;
  if constexpr (!std::is_same_v<T, float>) {
    for (; i + VecT::size() <= n; i += VecT::size()) {
      auto [a, b] = at::vec::convert_to_float<T>(VecT::loadu(x + i));
      acc = at::vec::fmadd(a, a, acc);
      acc = at::vec::fmadd(b, b, acc);
    }
  } else {
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const Vec a = Vec::loadu(x + i);
      acc = at::vec::fmadd(a, a, acc);
    }
  }
  float lanes[Vec::size()];
  acc.store(lanes);
  float ss = 0.f;
  for (int k = 0; k < Vec::size(); ++k) ss += lanes[k];
  for (int64_t k = i; k < n; ++k) ss += static_cast<float>(x[k]) * static_cast<float>(x[k]);
  return ss;
}

// y[k] = w[k] * T(x[k] * scale), as transformers' RMSNorm rounds (in place when y == x).
template <typename T>
void scale_row(const T* x, const T* w, T* y, int64_t n, float scale) {
  for (int64_t k = 0; k < n; ++k) {
    const T normed = static_cast<T>(static_cast<float>(x[k]) * scale);
    y[k] = static_cast<T>(static_cast<float>(w[k]) * static_cast<float>(normed));
  }
}

template <typename T>
void add_rms_norm_rows(T* residual, const T* x, const T* w, T* out, int64_t rows, int64_t n,
                       float eps) {
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* rr = residual + r * n;
      const T* xr = x + r * n;
      for (int64_t k = 0; k < n; ++k)
        rr[k] = static_cast<T>(static_cast<float>(rr[k]) + static_cast<float>(xr[k]));
      const float scale = 1.f / std::sqrt(sum_of_squares(rr, n) / static_cast<float>(n) + eps);
      scale_row(rr, w, out + r * n, n, scale);
    }
  });
}

// Runs fn(T{}) for float32, bfloat16 or float16 tensors.
template <typename Fn>
void dispatch(at::ScalarType dtype, const char* what, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK(false, what, ": unsupported dtype ", dtype);
  }
}

template <typename T>
void rms_norm_rows(const T* x, const T* w, T* out, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float scale = 1.f / std::sqrt(sum_of_squares(x + r * n, n) / static_cast<float>(n) + eps);
      scale_row(x + r * n, w, out + r * n, n, scale);
    }
  });
}

void check_rows(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(t.is_contiguous(), what, ": tensor must be contiguous");
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
  dispatch(x.scalar_type(), "rms_norm", [&](auto zero) {
    using scalar_t = decltype(zero);
    rms_norm_rows<scalar_t>(xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
                            out.data_ptr<scalar_t>(), rows, n, static_cast<float>(eps));
  });
  return out;
}

at::Tensor add_rms_norm_(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                         double eps) {
  check_rows(residual, "add_rms_norm_");
  check_rows(x, "add_rms_norm_");
  TORCH_CHECK(residual.sizes() == x.sizes(), "add_rms_norm_: residual and x differ in shape");
  TORCH_CHECK(weight.dim() == 1 && x.size(-1) == weight.size(0),
              "add_rms_norm_: weight must be [hidden]");
  TORCH_CHECK(x.scalar_type() == residual.scalar_type() &&
                  x.scalar_type() == weight.scalar_type(),
              "add_rms_norm_: residual, x and weight must share a dtype");
  const at::Tensor wc = weight.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  dispatch(x.scalar_type(), "add_rms_norm_", [&](auto zero) {
    using scalar_t = decltype(zero);
    add_rms_norm_rows<scalar_t>(residual.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                wc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, n,
                                static_cast<float>(eps));
  });
  return out;
}

template <typename T>
void silu_mul_rows(const T* gate, const T* up, T* out, int64_t rows, int64_t n) {
  using VecT = at::vec::Vectorized<T>;
  const Vec one(1.f);
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gate + r * n;
      const T* u = up + r * n;
      T* o = out + r * n;
      int64_t i = 0;
      if constexpr (!std::is_same_v<T, float>) {
        for (; i + VecT::size() <= n; i += VecT::size()) {
          auto [g0, g1] = at::vec::convert_to_float<T>(VecT::loadu(g + i));
          // silu rounded to T (transformers' act_fn output), then the product rounded
          const VecT act = at::vec::convert_from_float<T>(g0 / (one + g0.neg().exp()),
                                                          g1 / (one + g1.neg().exp()));
          auto [a0, a1] = at::vec::convert_to_float<T>(act);
          auto [u0, u1] = at::vec::convert_to_float<T>(VecT::loadu(u + i));
          at::vec::convert_from_float<T>(a0 * u0, a1 * u1).store(o + i);
        }
      } else {
        for (; i + Vec::size() <= n; i += Vec::size()) {
          const Vec gv = Vec::loadu(g + i);
          ((gv / (one + gv.neg().exp())) * Vec::loadu(u + i)).store(o + i);
        }
      }
      for (; i < n; ++i) {
        const float gf = static_cast<float>(g[i]);
        const T act = static_cast<T>(gf / (1.f + std::exp(-gf)));
        o[i] = static_cast<T>(static_cast<float>(act) * static_cast<float>(u[i]));
      }
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  check_rows(gate, "silu_mul");
  check_rows(up, "silu_mul");
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type(),
              "silu_mul: gate and up must share a shape and a dtype");
  at::Tensor out = at::empty_like(gate);
  const int64_t n = gate.size(-1), rows = n ? gate.numel() / n : 0;
  dispatch(gate.scalar_type(), "silu_mul", [&](auto zero) {
    using scalar_t = decltype(zero);
    silu_mul_rows<scalar_t>(gate.data_ptr<scalar_t>(), up.data_ptr<scalar_t>(),
                            out.data_ptr<scalar_t>(), rows, n);
  });
  return out;
}

// One head of one token, in place: optional RMSNorm with weight w, then the rotary embedding
// with this token's cos/sin (rotate_half pairs element k with k + d/2).
template <typename T>
void norm_rope_head(T* x, const T* w, const T* cos, const T* sin, int64_t d, float eps,
                    T* scratch) {
  if (w != nullptr) {
    const float scale = 1.f / std::sqrt(sum_of_squares(x, d) / static_cast<float>(d) + eps);
    scale_row(x, w, x, d, scale);
  }
  const int64_t half = d / 2;
  for (int64_t k = 0; k < d; ++k) scratch[k] = x[k];
  for (int64_t k = 0; k < d; ++k) {
    const float rotated = k < half ? -static_cast<float>(scratch[k + half])
                                   : static_cast<float>(scratch[k - half]);
    const T a = static_cast<T>(static_cast<float>(scratch[k]) * static_cast<float>(cos[k]));
    const T b = static_cast<T>(rotated * static_cast<float>(sin[k]));
    x[k] = static_cast<T>(static_cast<float>(a) + static_cast<float>(b));
  }
}

template <typename T>
void qk_norm_rope_rows(T* q, T* k, const T* qw, const T* kw, const T* cos, const T* sin,
                       int64_t tokens, int64_t hq, int64_t hk, int64_t d, int64_t q_stride,
                       int64_t k_stride, float eps) {
  const int64_t heads = hq + hk;
  at::parallel_for(0, tokens * heads, grain_rows(d), [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(d);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / heads, h = i % heads;
      T* x = h < hq ? q + t * q_stride + h * d : k + t * k_stride + (h - hq) * d;
      norm_rope_head(x, h < hq ? qw : kw, cos + t * d, sin + t * d, d, eps, scratch.data());
    }
  });
}

void qk_norm_rope_(at::Tensor& q, at::Tensor& k, const std::optional<at::Tensor>& q_weight,
                   const std::optional<at::Tensor>& k_weight, const at::Tensor& cos,
                   const at::Tensor& sin, double eps) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "qk_norm_rope_: q and k must be [T, heads, D]");
  const int64_t tokens = q.size(0), d = q.size(2);
  TORCH_CHECK(k.size(0) == tokens && k.size(2) == d, "qk_norm_rope_: q and k differ in T or D");
  TORCH_CHECK(d % 2 == 0, "qk_norm_rope_: head dim must be even");
  for (const at::Tensor* t : {&q, &k}) {
    TORCH_CHECK(t->device().is_cpu(), "qk_norm_rope_: CPU tensors only");
    TORCH_CHECK(t->stride(2) == 1 && t->stride(1) == d,
                "qk_norm_rope_: heads must be contiguous [heads, D] within a token");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "qk_norm_rope_: dtypes differ");
  }
  TORCH_CHECK(q_weight.has_value() == k_weight.has_value(),
              "qk_norm_rope_: give both norm weights or neither");
  const at::Tensor cc = cos.reshape({-1, d}).contiguous(), sc = sin.reshape({-1, d}).contiguous();
  TORCH_CHECK(cc.size(0) == tokens && sc.size(0) == tokens,
              "qk_norm_rope_: cos/sin must be [T, D]");
  TORCH_CHECK(cc.scalar_type() == q.scalar_type() && sc.scalar_type() == q.scalar_type(),
              "qk_norm_rope_: cos/sin must share q's dtype");
  at::Tensor qw, kw;
  if (q_weight.has_value()) {
    qw = q_weight->contiguous();
    kw = k_weight->contiguous();
    TORCH_CHECK(qw.numel() == d && kw.numel() == d, "qk_norm_rope_: norm weights must be [D]");
    TORCH_CHECK(qw.scalar_type() == q.scalar_type() && kw.scalar_type() == q.scalar_type(),
                "qk_norm_rope_: norm weights must share q's dtype");
  }
  dispatch(q.scalar_type(), "qk_norm_rope_", [&](auto zero) {
    using scalar_t = decltype(zero);
    qk_norm_rope_rows<scalar_t>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
        qw.defined() ? qw.data_ptr<scalar_t>() : nullptr,
        kw.defined() ? kw.data_ptr<scalar_t>() : nullptr, cc.data_ptr<scalar_t>(),
        sc.data_ptr<scalar_t>(), tokens, q.size(1), k.size(1), d, q.stride(0), k.stride(0),
        static_cast<float>(eps));
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(e3rl, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) residual, Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("qk_norm_rope_(Tensor(a!) q, Tensor(b!) k, Tensor? q_weight, Tensor? k_weight, "
        "Tensor cos, Tensor sin, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(e3rl, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm_", &add_rms_norm_);
  m.impl("silu_mul", &silu_mul);
  m.impl("qk_norm_rope_", &qk_norm_rope_);
}
