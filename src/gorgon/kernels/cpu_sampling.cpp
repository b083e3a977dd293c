// Greedy pick over float32 logits rows: the index of each row's first maximum and its log-probability.
//
// Replaces torch's argmax + log_softmax + gather for all-greedy steps, which cost 0.25 ms for the 5 rows of
// a verified candidate tree on the embedded model's 49152-token vocabulary (argmax alone 0.17 ms: it is not
// vectorised). Each row is computed on its own by one fixed instruction sequence (a lane-wise sum in
// vocabulary order, one fixed shuffle-tree reduction), so a row's result never depends on the other rows.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <limits>

#include "cpu_math.h"

namespace {

constexpr int64_t kLanes = 16;

// (index of the first maximum, -log(sum_j e^(x_j - max))): the chosen token's log-softmax value.
std::pair<int64_t, float> pick_row(const float* x, int64_t V) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t full = V / kLanes * kLanes;
  const __mmask16 tail = (__mmask16)((1u << (V - full)) - 1);
  __m512 vmax = _mm512_set1_ps(ninf);
  __mmask16 nan = 0;
  for (int64_t i = 0; i < full; i += kLanes) {
    const __m512 v = _mm512_loadu_ps(x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, v);
  }
  const __m512 last = _mm512_mask_loadu_ps(_mm512_set1_ps(ninf), tail, x + full);
  nan |= _mm512_cmp_ps_mask(last, last, _CMP_UNORD_Q);
  if (nan) {  // max ignores NaNs: torch.argmax picks the first NaN (its log-probability is NaN too)
    for (int64_t i = 0;; ++i)
      if (std::isnan(x[i])) return {i, std::numeric_limits<float>::quiet_NaN()};
  }
  vmax = _mm512_max_ps(vmax, last);
  const float m = _mm512_reduce_max_ps(vmax);
  if (m == ninf) return {0, std::numeric_limits<float>::quiet_NaN()};  // nothing possible: as log_softmax gives
  const __m512 mv = _mm512_set1_ps(m);
  int64_t arg = -1;
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t i = 0; i < full; i += kLanes) {
    const __m512 v = _mm512_loadu_ps(x + i);
    if (arg < 0) {
      const __mmask16 hit = _mm512_cmp_ps_mask(v, mv, _CMP_EQ_OQ);
      if (hit) arg = i + __builtin_ctz(hit);
    }
    vsum = _mm512_add_ps(vsum, gorgon::exp_neg(_mm512_sub_ps(v, mv)));
  }
  if (tail) {
    const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(ninf), tail, x + full);
    const __mmask16 hit = _mm512_mask_cmp_ps_mask(tail, v, mv, _CMP_EQ_OQ);
    if (arg < 0 && hit) arg = full + __builtin_ctz(hit);
    vsum = _mm512_add_ps(vsum, gorgon::exp_neg(_mm512_sub_ps(v, mv)));
  }
  return {arg, -std::log(_mm512_reduce_add_ps(vsum))};
}

}  // namespace

// logits [N, V] float32 -> (token ids [N] int64, log-probabilities [N] float32).
std::vector<torch::Tensor> greedy_pick(torch::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat32, "greedy_pick: float32 [N, V] logits");
  TORCH_CHECK(logits.size(1) > 0, "greedy_pick: empty vocabulary");
  logits = logits.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  auto ids = torch::empty({N}, logits.options().dtype(torch::kLong));
  auto logprobs = torch::empty({N}, logits.options());
  const float* x = logits.data_ptr<float>();
  int64_t* out_ids = ids.data_ptr<int64_t>();
  float* out_lp = logprobs.data_ptr<float>();
  at::parallel_for(0, N, 2, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const auto [arg, lp] = pick_row(x + r * V, V);
      out_ids[r] = arg;
      out_lp[r] = lp;
    }
  });
  return {ids, logprobs};
}
