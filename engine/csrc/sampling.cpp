// Greedy sampling statistics for CPU in two passes over each row of float32 logits:
// the argmax (the first on ties, like torch.argmax), its log-probability and the entropy
// of softmax(row). The general sampler needs ~8 full passes (log_softmax, exp, masks,
// products, sums) for the same three numbers.

#if defined(__AVX512F__) && !defined(CPU_CAPABILITY_AVX512)
#define CPU_CAPABILITY_AVX512
#endif
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

namespace {

using Vec = at::vec::Vectorized<float>;

template <typename Op>
float reduce(const Vec& v, Op op) {
  float lanes[Vec::size()];
  v.store(lanes);
  float r = lanes[0];
  for (int i = 1; i < Vec::size(); ++i) r = op(r, lanes[i]);
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> greedy_sample(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous() &&
                  logits.device().is_cpu() && logits.size(1) > 0,
              "greedy_sample: logits must be contiguous float32 [N, V] on CPU, V > 0");
  const int64_t n = logits.size(0), vocab = logits.size(1);
  at::Tensor ids = at::empty({n}, logits.options().dtype(at::kLong));
  at::Tensor logprob = at::empty({n}, logits.options());
  at::Tensor entropy = at::empty({n}, logits.options());
  const float* x = logits.data_ptr<float>();
  int64_t* ids_p = ids.data_ptr<int64_t>();
  float* lp_p = logprob.data_ptr<float>();
  float* ent_p = entropy.data_ptr<float>();
  const int64_t full = vocab - vocab % Vec::size();
  // Rows per task: enough logits (~32k) that waking another thread pays for itself.
  const int64_t grain = std::max<int64_t>(1, 32768 / vocab);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = x + r * vocab;
      float m = -std::numeric_limits<float>::infinity();
      Vec vm(m);
      for (int64_t i = 0; i < full; i += Vec::size()) vm = at::vec::maximum(vm, Vec::loadu(row + i));
      // NaN-propagating maximum (at::vec::maximum propagates NaN; std::max may drop it)
      const auto nan_max = [](float a, float b) { return (std::isnan(a) || a > b) ? a : b; };
      m = reduce(vm, nan_max);
      for (int64_t i = full; i < vocab; ++i) m = nan_max(m, row[i]);
      int64_t arg = 0;
      if (std::isnan(m)) {  // torch.argmax: a NaN is the maximum, the first one wins
        while (arg < vocab && !std::isnan(row[arg])) ++arg;
      } else {
        while (arg < vocab && !(row[arg] == m)) ++arg;
      }
      if (arg == vocab) arg = 0;
      // z = x - m (>= a large negative number, so exp(z) * z is 0, not NaN, at -inf)
      const Vec vmax(m), floor(-1e30f);
      Vec vs(0.f), vt(0.f);
      for (int64_t i = 0; i < full; i += Vec::size()) {
        const Vec z = at::vec::maximum(Vec::loadu(row + i) - vmax, floor);
        const Vec e = z.exp();
        vs = vs + e;
        vt = at::vec::fmadd(e, z, vt);
      }
      float s = reduce(vs, [](float a, float b) { return a + b; });
      float t = reduce(vt, [](float a, float b) { return a + b; });
      for (int64_t i = full; i < vocab; ++i) {
        const float z = std::max(row[i] - m, -1e30f);
        const float e = std::exp(z);
        s += e;
        t += e * z;
      }
      const float log_s = std::log(s);
      ids_p[r] = arg;
      lp_p[r] = -log_s;
      ent_p[r] = log_s - t / s;
    }
  });
  return {ids, logprob, entropy};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(e3rl, m) {
  m.def("greedy_sample(Tensor logits) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(e3rl, CPU, m) { m.impl("greedy_sample", &greedy_sample); }
